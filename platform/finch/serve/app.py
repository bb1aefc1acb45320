"""`finch serve`: the Ray Serve application around finch's vLLM engine and OpenAI-compatible API.

One deployment, its own `@serve.deployment` around vLLM's async engine (Ray's `ray.serve.llm`
needs `ray[llm]`, which pins the CUDA vLLM build, and loads adapters from s3/gs/azure paths only). Each replica holds the
base model and loads registry adapters on demand from the admin routes. The base model may itself
be a fully fine-tuned registry entry (model.path 'registry:NAME[@vN]'), served in its trained
template; adapters trained on that entry serve on it like on any base.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from ray import serve

from finch.config import ConfigError, ServeConfig, validate_config
from finch.memory import serving_memory
from finch.models.source import ModelSource
from finch.precision import Device, device_of_workers
from finch.registry.models import resolve_served_model
from finch.registry.store import RegistryEntry, RegistryError, resolve_entry
from finch.runtime import cache_root
from finch.serve.directory import ReplicaAdapters, open_directory, remove_directory
from finch.serve.metrics import scrape_urls

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@serve.ingress()
class FinchServer:
    """A replica: the engine plus the FastAPI app, which Ray Serve drives as its ASGI ingress."""

    def __init__(
        self,
        config: dict[str, Any],
        model: ModelSource,
        base_entry: RegistryEntry | None,
        initial_adapters: dict[str, str],
        api_key: str | None,
    ):
        from finch.models.tokenizer import load_tokenizer, stop_token_ids
        from finch.precision import detect_device, sixteen_bit_type
        from finch.serve.api import build_api
        from finch.serve.engine import ServingEngine
        from finch.serve.state import ApiState

        self.config = validate_config(config, schema=ServeConfig)
        model_path = model.here()
        zero_adapters = cache_root() / "zero-adapters"
        # `finch serve` resolved model.dtype for the replicas' device (see run); 'auto' left by another
        # caller is resolved here, on that device.
        dtype = self.config.model.dtype
        if dtype == "auto":
            dtype = sixteen_bit_type(detect_device(self.config.server.gpus_per_replica > 0))
        self.engine = ServingEngine.start(
            self.config.engine,
            model_path,
            self.config.registry_dir,
            zero_adapters,
            dtype,
            self.config.server.gpus_per_replica,
            on_demand=self.config.on_demand,
            latest_ttl_s=self.config.server.adapter_sync_s,
        )
        replica = serve.get_replica_context().replica_id.unique_id
        directory = open_directory(self.config.name, initial_adapters)
        self.replica_adapters = ReplicaAdapters(self.engine, directory, replica, self.config.server.adapter_sync_s)
        self.sync_task: asyncio.Task | None = None  # held so the loop is not garbage-collected
        tokenizer = load_tokenizer(model_path)
        state = ApiState(
            config=self.config,
            engine=self.engine,
            replica_adapters=self.replica_adapters,
            tokenizer=tokenizer,
            base_template=base_template(self.config.template, base_entry, tokenizer),
            stop_token_ids=stop_token_ids(model_path, tokenizer),
            api_key=api_key,
            base_system_prompt=base_entry.system_prompt if base_entry else None,
            tool_parser=tool_parser(self.config.server.tool_parser)(tokenizer)
            if self.config.server.tool_parser
            else None,
        )
        self.api = build_api(state, on_startup=self.load_adapters)

    async def load_adapters(self) -> None:
        """Runs at app startup, in the replica's event loop, where vLLM's client lives."""
        await self.engine.warm_up()
        await self.replica_adapters.sync()  # the application's current set: the config's, plus admin changes since
        self.sync_task = asyncio.create_task(self.replica_adapters.sync_forever())

    def __serve_build_asgi_app__(self):
        return self.api


def base_template(template: str, base_entry: RegistryEntry | None, tokenizer: Any) -> str:
    """The base model's prompt template: a registry fine-tune's trained one, unless the config names one."""
    from finch.data.templates import resolve_template

    if base_entry is not None and template == "auto":
        return base_entry.manifest["template"]
    return resolve_template(template, tokenizer)


def tool_parser(name: str) -> Any:
    """vLLM's tool parser class registered as `name`."""
    from vllm.tool_parsers import ToolParserManager

    try:
        return ToolParserManager.get_tool_parser(name)
    except KeyError:
        raise ConfigError(
            f"server.tool_parser {name!r} is not one of vLLM's: {', '.join(ToolParserManager.list_registered())}"
        ) from None


def api_key_of(config: ServeConfig) -> str | None:
    return os.environ.get(config.server.api_key_env) or None


def build_application(config: ServeConfig, model: ModelSource, base_entry: RegistryEntry | None = None) -> Any:
    """The deployment, bound; `base_entry`: the registry entry `model` is, for a served full fine-tune."""
    server = config.server
    api_key = api_key_of(config)
    if server.host not in LOOPBACK and api_key is None:
        raise ConfigError(
            f"server.host {server.host} exposes the API beyond this machine: set an API key in ${server.api_key_env}"
        )
    if server.tool_parser:
        tool_parser(server.tool_parser)  # a wrong name fails here, not in every replica
    deployment = serve.deployment(FinchServer).options(
        name="finch",
        num_replicas=server.num_replicas,
        max_ongoing_requests=server.max_ongoing_requests,
        max_queued_requests=server.max_queued_requests,
        # Past capacity: 503 with Retry-After, which OpenAI clients honour when they retry.
        backpressure_config={"status_code": 503, "retry_after_s": server.retry_after_s},
        health_check_timeout_s=server.health_check_timeout_s,
        **replica_resources(config),
    )
    # Resolved here, once: every replica loads the same versions, and a missing adapter fails now.
    entries = [resolve_entry(config.registry_dir, ref) for ref in config.adapters]
    for entry in entries:
        try:
            entry.check_generates("be served")
        except RegistryError as err:
            raise ConfigError(f"adapters: {err}") from None
    initial_adapters = {entry.name: entry.ref for entry in entries}
    return deployment.bind(config.model_dump(mode="json"), model, base_entry, initial_adapters, api_key)


def replica_resources(config: ServeConfig) -> dict[str, Any]:
    """What Ray reserves for a replica. With more than one GPU, a placement group of one bundle per
    GPU on one node: the replica runs in the first bundle and vLLM's Ray executor puts one
    tensor-parallel worker on each bundle's GPU (the replica itself then holds none)."""
    server = config.server
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    tensor_parallel = config.tensor_parallel_size
    if tensor_parallel == 1:
        return {
            "ray_actor_options": {
                "num_cpus": server.cpus_per_replica,
                "num_gpus": server.gpus_per_replica,
                "runtime_env": {"env_vars": env},
            }
        }
    return {
        "ray_actor_options": {"num_cpus": server.cpus_per_replica, "num_gpus": 0, "runtime_env": {"env_vars": env}},
        "placement_group_bundles": [{"CPU": server.cpus_per_replica, "GPU": 1}] + [{"GPU": 1}] * (tensor_parallel - 1),
        "placement_group_strategy": "STRICT_PACK",
    }


def run(config: ServeConfig, blocking: bool = True) -> str:
    """Start Ray Serve on config.server.host:port and deploy; returns the base URL."""
    from finch.runtime import init_ray

    model, base_entry = resolve_served_model(config.model, config.registry_dir)
    if base_entry is not None:
        print(f"finch: base model {base_entry.ref}, fully fine-tuned, from {base_entry.path}", flush=True)
    init_ray()
    device = device_of_workers(config.server.gpus_per_replica > 0)
    config = with_served_dtype(config, device)
    check_serving_memory(config, model, device)
    application = build_application(config, model, base_entry)
    # The proxy's own timeout is a backstop: finch's answers first, with a JSON 504 (openai_api.respond).
    proxy_timeout_s = config.server.request_timeout_s + 10
    serve.start(
        http_options={"host": config.server.host, "port": config.server.port, "request_timeout_s": proxy_timeout_s}
    )
    remove_directory(config.name)
    serve.run(application, name=config.name, route_prefix="/")
    url = f"http://{config.server.host}:{config.server.port}"
    print(f"finch: serving on {url} (chat page at {url}/, OpenAI API at {url}/v1)", flush=True)
    print(f"finch: Prometheus metrics on every Ray node: {', '.join(scrape_urls())}", flush=True)
    if blocking:
        print("finch: Ctrl-C stops", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            stop(config)
    return url


def with_served_dtype(config: ServeConfig, device: Device) -> ServeConfig:
    """`config` with model.dtype resolved for the replicas' device, said once."""
    from finch.precision import inference_dtype

    dtype, warnings = inference_dtype(config.model.dtype, device)
    print(f"finch: serving in {dtype} on {device.name}: {device.evidence}", flush=True)
    for warning in warnings:
        print(f"finch: warning: {warning}", flush=True)
    return config.model_copy(update={"model": config.model.model_copy(update={"dtype": dtype})})


def check_serving_memory(config: ServeConfig, model: ModelSource, device: Device) -> None:
    """On GPUs: print what a replica's GPU holds (finch/memory.py) and refuse an engine whose KV cache
    would not hold one request of engine.max_model_len tokens (vLLM would fail at start, or serve
    one request at a time)."""
    if device.kind != "cuda":
        return
    estimate, kv_tokens = serving_memory(config, model.folder, device.memory_gib)
    print(
        f"finch: memory {estimate.describe()} (estimate; {device.name}: {device.memory_gib:.1f} GiB): "
        f"KV cache for about {kv_tokens:,} tokens",
        flush=True,
    )
    if kv_tokens < config.engine.max_model_len:
        raise ConfigError(
            f"a replica's KV cache would hold about {kv_tokens:,} tokens, less than one request of engine.max_model_len "
            f"{config.engine.max_model_len}: lower engine.max_loras or engine.max_lora_rank, raise "
            "engine.gpu_memory_utilization, or use bigger GPUs or more of them (server.gpus_per_replica)"
        )


def stop(config: ServeConfig) -> None:
    serve.shutdown()
    remove_directory(config.name)
