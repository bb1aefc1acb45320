"""Prometheus metrics of `finch serve` per served model, through Ray's application metrics.

Ray Serve tags each metric with the deployment, replica and application it comes from, and Ray's
metrics agent exports it, prefixed `ray_`, on every node's metrics port with Ray Serve's own
`ray_serve_*` metrics (requests and latency at the proxy, the queue before the replicas). finch
adds what only it knows: which model a request was for, its tokens, its time to the first token,
and what the on-demand adapter cache did (docs/serve.md#metrics).

The `model` label stays bounded: "base", a pinned adapter's served name, an on-demand adapter's
registry name without its version, or "unknown" for a request refused before its model was known
(never the client's own string).
"""

from __future__ import annotations

import contextvars
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

BASE = "base"
UNKNOWN = "unknown"
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300]
FIRST_TOKEN_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


@dataclass(frozen=True)
class Instruments:
    requests: Any
    prompt_tokens: Any
    completion_tokens: Any
    latency: Any
    first_token: Any
    running: Any
    adapter_loads: Any
    adapter_evictions: Any
    adapter_lookups: Any
    adapters_cached: Any


@functools.cache
def instruments() -> Instruments:
    """Made on first use, in the replica: Ray Serve tags a metric with the replica it is made in."""
    from ray.serve.metrics import Counter, Gauge, Histogram

    model = ("model",)
    return Instruments(
        requests=Counter(
            "finch_requests",
            "Chat and completion requests answered, by model, endpoint and HTTP status",
            ("model", "endpoint", "status"),
        ),
        prompt_tokens=Counter("finch_prompt_tokens", "Prompt tokens of requests the engine started answering", model),
        completion_tokens=Counter("finch_completion_tokens", "Tokens generated", model),
        latency=Histogram(
            "finch_request_latency_seconds",
            "Time to a request's last byte (a stream's [DONE]), requests answered 2xx",
            LATENCY_BUCKETS_S,
            model,
        ),
        first_token=Histogram(
            "finch_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token",
            FIRST_TOKEN_BUCKETS_S,
            model,
        ),
        running=Gauge("finch_requests_running", "Requests this replica is answering, by model", model),
        adapter_loads=Counter(
            "finch_adapter_loads",
            "Adapters loaded into the engine: pinned (config, admin, sync) or on demand",
            ("model", "kind"),
        ),
        adapter_evictions=Counter("finch_adapter_evictions", "On-demand adapters evicted to make room", model),
        adapter_lookups=Counter(
            "finch_adapter_cache_lookups",
            "Requests for on-demand adapters: hit (loaded already) or miss",
            ("model", "result"),
        ),
        adapters_cached=Gauge("finch_adapters_cached", "On-demand adapters this replica holds"),
    )


def model_label(adapter: str | None) -> str:
    """The `model` label of what a request was routed to (ServingEngine.generate's `adapter`)."""
    return adapter.partition("@")[0] if adapter else BASE


@dataclass
class Metered:
    """One chat or completion request, from its first byte in to its last byte out."""

    endpoint: str
    started: float = field(default_factory=time.monotonic)
    model: str = UNKNOWN
    status: int = 500  # until a response starts: an exception that escapes the app is a 500
    prompt_tokens: int = 0
    answers: Any = None  # protocol.Answers; read at the end, when a stream's count is complete
    first_token_s: float | None = None


_current: contextvars.ContextVar[Metered | None] = contextvars.ContextVar("finch_metered", default=None)
_running: dict[str, int] = {}


class Metering:
    """ASGI middleware that meters chat and completion requests, whatever answers them: the endpoint,
    an error handler or an inner middleware's refusal. The outermost of the app's middleware, so the
    request's context (where openai_api's calls below find it) reaches all of them."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        endpoint = endpoint_of(scope)
        if endpoint is None:
            return await self.app(scope, receive, send)
        metered = Metered(endpoint)
        token = _current.set(metered)

        async def watched_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                metered.status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            _current.reset(token)
            record(metered, time.monotonic())


def endpoint_of(scope: dict[str, Any]) -> str | None:
    """The `endpoint` label of a metered route, under any route prefix (Serve's route_prefix); None for the others."""
    if scope["type"] != "http":
        return None
    return next((name for path, name in ENDPOINTS.items() if scope["path"].endswith(path)), None)


def routed(adapter: str | None) -> None:
    """The request being metered was routed to `adapter` (None: the base model)."""
    metered = _current.get()
    if metered is not None and metered.model == UNKNOWN:
        metered.model = model_label(adapter)
        count_running(metered.model, 1)


def first_output(prompt_tokens: int, answers: Any) -> None:
    """The engine has answered the request's first token; its answers fill `answers` from here on."""
    metered = _current.get()
    if metered is not None:
        metered.first_token_s = time.monotonic() - metered.started
        metered.prompt_tokens, metered.answers = prompt_tokens, answers


def record(metered: Metered, ended: float) -> None:
    metrics = instruments()
    tags = {"model": metered.model}
    metrics.requests.inc(1, tags | {"endpoint": metered.endpoint, "status": str(metered.status)})
    if metered.status < 400:
        metrics.latency.observe(ended - metered.started, tags)
    if metered.first_token_s is not None:
        metrics.first_token.observe(metered.first_token_s, tags)
    add(metrics.prompt_tokens, metered.prompt_tokens, tags)
    add(metrics.completion_tokens, metered.answers.completion_tokens if metered.answers else 0, tags)
    if metered.model != UNKNOWN:
        count_running(metered.model, -1)


def add(counter: Any, value: int, tags: dict[str, str]) -> None:
    if value > 0:  # Ray's counters refuse 0
        counter.inc(value, tags)


def count_running(model: str, change: int) -> None:
    _running[model] = _running.get(model, 0) + change
    instruments().running.set(_running[model], {"model": model})


def adapter_loaded(adapter: str, kind: str, cached: int | None = None) -> None:
    """`kind`: "pinned" or "on_demand"; `cached`: on-demand adapters held now."""
    instruments().adapter_loads.inc(1, {"model": model_label(adapter), "kind": kind})
    if cached is not None:
        instruments().adapters_cached.set(cached)


def adapter_evicted(adapter: str, cached: int) -> None:
    instruments().adapter_evictions.inc(1, {"model": model_label(adapter)})
    instruments().adapters_cached.set(cached)


def adapter_lookup(adapter: str, hit: bool) -> None:
    instruments().adapter_lookups.inc(1, {"model": model_label(adapter), "result": "hit" if hit else "miss"})


def scrape_urls() -> list[str]:
    """Every live Ray node's Prometheus endpoint, where Ray's metrics agent exports these metrics."""
    import ray

    return [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node["Alive"]
    ]
