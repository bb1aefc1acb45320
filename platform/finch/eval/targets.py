"""What one evaluation compares: the base model and registry entries, grouped by the engine that
generates for them.

Adapters of one base model share an engine (vLLM applies a different adapter per request in the
same batches); 'base' runs on that engine too. A fully fine-tuned entry is a model of its own and
gets an engine of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from finch.config import ConfigError, EngineConfig, EvalConfig, ModelConfig
from finch.data.templates import resolve_template
from finch.fingerprint import fingerprint_model_folder
from finch.models.source import ModelSource, resolve_model_source
from finch.models.tokenizer import load_tokenizer
from finch.registry.models import trained_base_source
from finch.registry.store import RegistryEntry, resolve_entry

BASE = "base"
# vLLM accepts only these values of max_lora_rank (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class Target:
    name: str  # 'base', an entry's ref (name@vN), or a sweep's trial
    template: str
    system_prompt: str | None  # the one the adapter saw in training; none for the base model, as in finch serve
    adapter_path: str = ""  # the LoRA folder; '' for the engine's own model (the base, or a fully fine-tuned entry)
    entry: RegistryEntry | None = None  # where scores are recorded


@dataclass(frozen=True)
class EngineGroup:
    model: ModelSource
    model_config: ModelConfig  # dtype 'auto' or as trained; trust_remote_code always off
    targets: tuple[Target, ...]

    @property
    def adapters(self) -> list[Target]:
        return [t for t in self.targets if t.adapter_path]

    def engine_settings(self, engine: EngineConfig, on_gpu: bool) -> EngineConfig:
        """engine, with room for every adapter of the group in one batch (plus the zero adapter that
        stands for the base model on CPU) and max_lora_rank set to the largest adapter rank."""
        from finch.serve.engine import adapter_rank

        slots = len(self.adapters) + (0 if on_gpu else 1)
        max_loras = max(engine.max_loras, slots, 1 if on_gpu else 2)
        # Exactly the rank the adapters need: every LoRA product is sized by max_lora_rank.
        ranks = [adapter_rank(t.adapter_path) for t in self.adapters]
        rank = next(r for r in VLLM_LORA_RANKS if r >= max(ranks, default=1))
        return engine.model_copy(
            update={
                "max_loras": max_loras,
                "max_cpu_loras": max(engine.max_cpu_loras, max_loras),
                "max_lora_rank": rank,
            }
        )


def engine_groups(config: EvalConfig) -> list[EngineGroup]:
    entries = {ref: resolve_entry(config.registry_dir, ref) for ref in dict.fromkeys(config.models) if ref != BASE}
    for entry in entries.values():
        entry.check_generates("be evaluated on generated answers")
    adapters = [e for e in entries.values() if e.kind == "adapter"]
    groups = []
    if BASE in config.models or adapters:
        groups.append(_base_group(config, adapters))
    for entry in (e for e in entries.values() if e.kind == "model"):
        folder = str(entry.path)
        model = untrusted(ModelConfig.model_validate(entry.manifest["config"]["model"])).model_copy(
            update={"path": folder}
        )
        groups.append(EngineGroup(ModelSource(folder, folder), model, (_entry_target(entry),)))
    return groups


def _base_group(config: EvalConfig, adapters: list[RegistryEntry]) -> EngineGroup:
    from finch.serve.engine import check_servable

    if config.model is not None:
        source, model = resolve_model_source(config.model), config.model
    elif adapters:
        source, model = (
            trained_base_source(adapters),
            ModelConfig.model_validate(adapters[0].manifest["config"]["model"]),
        )
    else:
        raise ConfigError("evaluating 'base' alone needs model.path (the base model to evaluate)")
    fingerprint = fingerprint_model_folder(source.folder)
    for entry in adapters:
        check_servable(entry, fingerprint, max_lora_rank=max(VLLM_LORA_RANKS))
    targets = (
        [Target(BASE, resolve_template(config.template, load_tokenizer(source.folder)), None)]
        if BASE in config.models
        else []
    )
    return EngineGroup(source, untrusted(model), tuple(targets + [_entry_target(e) for e in adapters]))


def untrusted(model: ModelConfig) -> ModelConfig:
    # A registry manifest is data, not a trust decision: never run model code because of it.
    return model.model_copy(update={"trust_remote_code": False})


def _entry_target(entry: RegistryEntry) -> Target:
    adapter = str(entry.path) if entry.kind == "adapter" else ""
    return Target(entry.ref, entry.manifest["template"], entry.system_prompt, adapter, entry)
