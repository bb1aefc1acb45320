"""Registry entries as models: the base model adapters were trained on (checked by fingerprint),
a fully fine-tuned entry served as `finch serve`'s model (`model.path: registry:NAME[@vN]`), and
the adapter a run trains on from (`lora.init_adapter`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finch.config import ConfigError, LoraConfig, ModelConfig, RunConfig, validate_config
from finch.fingerprint import fingerprint_model_folder
from finch.models.source import ModelSource, resolve_model_source
from finch.registry.store import RegistryEntry, RegistryError, resolve_entry


def trained_base_folder(entries: list[RegistryEntry]) -> str:
    """The local folder of the base model registry entries were trained on."""
    return trained_base_source(entries).folder


def trained_base_source(entries: list[RegistryEntry]) -> ModelSource:
    """The base model registry entries were trained on (at the commit they were trained on, for hub
    models), checked by fingerprint."""
    bases = {entry.manifest["base_model"]["fingerprint"] for entry in entries}
    if len(bases) != 1:
        raise RegistryError(f"adapters {', '.join(e.ref for e in entries)} were trained on different base models")
    model = validate_config(entries[0].manifest["config"]).model
    source = resolve_model_source(
        model.model_copy(update={"revision": entries[0].manifest["base_model"].get("revision")})
    )
    if fingerprint_model_folder(source.folder) not in bases:
        raise RegistryError(
            f"base model at {source.folder} is not the one {entries[0].ref} was trained on (fingerprint differs)"
        )
    return source


def resolve_served_model(model: ModelConfig, registry_dir: str | Path) -> tuple[ModelSource, RegistryEntry | None]:
    """`finch serve`'s base model: `model.path` as resolve_model_source takes it, or the fully
    fine-tuned entry of `registry_dir` that 'registry:NAME[@vN]' names (the latest version without
    @vN, pinned here for every replica), returned too: its prompt template and system prompt go with it."""
    if model.registry_ref is None:
        return resolve_model_source(model), None
    try:
        entry = resolve_entry(registry_dir, model.registry_ref)
    except RegistryError as err:
        raise ConfigError(
            f"model.path {model.path!r}: {err} (`finch registry list --registry {registry_dir}` lists its entries)"
        ) from None
    try:
        entry.check_generates("be served")
    except RegistryError as err:
        raise ConfigError(f"model.path {model.path!r}: {err}") from None
    if entry.kind != "model":
        raise ConfigError(
            f"model.path {model.path!r}: {entry.ref} is a LoRA adapter, not a fully fine-tuned model: serve its base model "
            f"({entry.manifest.get('base_model', {}).get('id', 'the one it was trained on')}) as model.path and put "
            f"{entry.ref} in adapters"
        )
    return registry_model_source(entry), entry


def registry_model_source(entry: RegistryEntry) -> ModelSource:
    """A fully fine-tuned registry entry as a model: its own folder, which every node reads from the
    registry (shared storage, as for adapters)."""
    # vLLM reads *.safetensors whenever a folder has any, and publish never registers pickled weights.
    if not any(entry.path.glob("*.safetensors")):
        raise RegistryError(f"{entry.ref} has no *.safetensors weights at {entry.path} (finch loads safetensors only)")
    folder = str(entry.path)
    return ModelSource(folder, folder)


def pin_init_adapter(config: RunConfig) -> RunConfig:
    """The run with `lora.init_adapter` pinned to the version it starts from, and that adapter's
    LoRA shape as the run's (a value the user set otherwise is refused, naming the key)."""
    ref = config.lora.init_adapter
    if ref is None:
        return config
    entry = init_adapter_entry(config.registry_dir, ref)
    if entry.kind != "adapter":
        raise ConfigError(f"lora.init_adapter {ref!r}: {entry.ref} is a full model, not a LoRA adapter")
    if entry.is_reward_model != (config.train.objective == "reward"):
        kinds = {True: "a reward model", False: "a generating adapter"}
        raise ConfigError(
            f"lora.init_adapter {ref!r}: {entry.ref} is {kinds[entry.is_reward_model]}, and train.objective "
            f"{config.train.objective} trains {kinds[config.train.objective == 'reward']}"
        )
    peft = json.loads((entry.path / "adapter_config.json").read_text())
    shape = {name: peft[peft_name] for name, peft_name in LoraConfig.SHAPE.items()}
    shape["target_modules"] = sorted(shape["target_modules"])  # PEFT saves 'all-linear' as the names it found
    for name in config.lora.model_fields_set & set(shape):
        mine = getattr(config.lora, name)
        if name == "target_modules" and mine == "all-linear":
            continue  # which names that is depends on the model: the adapter's list is them
        if (sorted(mine) if name == "target_modules" else mine) != shape[name]:
            raise ConfigError(
                f"lora.{name} is {mine!r}, but lora.init_adapter {entry.ref} was trained with {shape[name]!r}: "
                f"drop lora.{name} (the adapter's is used)"
            )
    lora = config.lora.model_copy(update={**shape, "init_adapter": entry.ref})
    return config.model_copy(update={"lora": lora})


def init_adapter_entry(registry_dir: str | Path, ref: str) -> RegistryEntry:
    try:
        return resolve_entry(registry_dir, ref)
    except RegistryError as err:
        raise ConfigError(f"lora.init_adapter {ref!r}: {err}") from None


def check_init_adapter_base(config: RunConfig, model: ModelSource) -> None:
    """The adapter a run starts from was trained on this base model (the same weights)."""
    if config.lora.init_adapter is None:
        return
    entry = init_adapter_entry(config.registry_dir, config.lora.init_adapter)
    if entry.manifest["base_model"]["fingerprint"] != fingerprint_model_folder(model.folder):
        raise ConfigError(
            f"lora.init_adapter {entry.ref} was trained on {entry.manifest['base_model']['id']}, not on "
            f"model.path {config.model.path} (the weights' fingerprints differ)"
        )


def load_init_adapter(model: Any, config: RunConfig) -> None:
    """Set the fresh adapter of `model` (a PeftModel of the run's LoRA shape) to the weights of
    `lora.init_adapter`; every adapter tensor must be there, and nothing else."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if config.lora.init_adapter is None:
        return
    entry = init_adapter_entry(config.registry_dir, config.lora.init_adapter)
    weights = load_file(entry.path / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, weights)
    expected = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    missing = sorted(name for name in result.missing_keys if name in expected)
    if missing or result.unexpected_keys:
        raise RegistryError(
            f"lora.init_adapter {entry.ref} does not fit this run's model: "
            f"{len(missing)} adapter tensors missing (e.g. {missing[:1]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:1]})"
        )


def pin_reward_models(config: RunConfig) -> RunConfig:
    """The run with each `reward_model` reward of grpo.rewards pinned to the version it found, after
    checking that the entry is a reward model."""
    rewards = []
    for reward in config.grpo.rewards:
        if reward.name == "reward_model":
            entry = reward_model_entry(config.registry_dir, reward)
            reward = reward.model_copy(update={"model": entry.ref})
        rewards.append(reward)
    return config.model_copy(update={"grpo": config.grpo.model_copy(update={"rewards": rewards})})


def reward_model_entry(registry_dir: str | Path, reward: Any) -> RegistryEntry:
    try:
        entry = resolve_entry(registry_dir, reward.model)
    except RegistryError as err:
        raise ConfigError(f"reward {reward.key}: model {reward.model!r}: {err}") from None
    if not entry.is_reward_model:
        raise ConfigError(f"reward {reward.key}: {entry.ref} is not a reward model (train.objective reward)")
    return entry


def check_reward_models(config: RunConfig, model: ModelSource, template: str) -> None:
    """Reward models read the policy's prompt and completion tokens as they are: they must have been
    trained on the same base model (its tokenizer) and prompt template."""
    for reward in config.grpo.rewards:
        if reward.name != "reward_model":
            continue
        entry = reward_model_entry(config.registry_dir, reward)
        if entry.manifest["base_model"]["fingerprint"] != fingerprint_model_folder(model.folder):
            raise ConfigError(
                f"reward {reward.key}: {entry.ref} was trained on {entry.manifest['base_model']['id']}, not on "
                f"model.path {config.model.path}: it would read other tokens than the policy writes"
            )
        if entry.manifest.get("template") != template:
            raise ConfigError(
                f"reward {reward.key}: {entry.ref} was trained on the {entry.manifest.get('template')} template; "
                f"this run renders prompts with {template} (data.template)"
            )


def load_reward_model(entry: RegistryEntry, base_folder: str, dtype: str, device: Any) -> Any:
    """A registry reward model ready to score, in eval mode on `device`: a LoRA entry on the base
    model in `base_folder` (its trained score head comes with the adapter), or a full model."""
    from peft import PeftModel

    from finch.models.loading import load_base_model

    folder = base_folder if entry.kind == "adapter" else str(registry_model_source(entry).folder)
    model = load_base_model(ModelConfig(path=folder, dtype=dtype), folder, reward_head=True)
    if entry.kind == "adapter":
        model = PeftModel.from_pretrained(model, entry.path)  # reads adapter_model.safetensors only
    return model.to(device).eval()
