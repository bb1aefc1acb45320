"""`finch serve` under hostile input, adapter churn under load, a killed replica, and its security
defaults: real Ray Serve + vLLM (CPU build) on 127.0.0.1, over real HTTP.

The long load run (500 requests, numbers for docs/reliability.md) is bench/serve_load.py; these
tests run the same kinds of traffic, shorter, and assert what a user relies on.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from finch.config import ServeConfig, validate_config
from finch.registry.store import MANIFEST, resolve_entry
from tests.conftest import REPO, free_port, make_adapter
from tests.integration.test_serve_engine import register

pytestmark = pytest.mark.integration
API_KEY = "reliability-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADAPTERS = ("a1", "a2", "a3", "a4")
MAX_BODY = 64 * 1024
QUESTION = [{"role": "user", "content": "Name a colour."}]
# How long the killed replica's replacement may take to serve. Ray Serve 2.60 has no start-up
# timeout (server.health_check_timeout_s only applies once a replica runs): this wait is the only
# limit, and when it ran out the test used to go on and find 1 of 2 replicas answering.
# Measured in this test on a 2-core x86 machine, from the kill to both replicas RUNNING: 64-91 s in
# 4 runs, 2 of them with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 (an AVX2-only CPU's
# kernels; no slower). Serve notices the dead actor at its next health check (10 s period) and
# starts a new one, 14-15 s after the kill; that one imports vLLM, starts the engine and loads 4
# adapters while the other replica serves 4 request streams on the same 2 cores (the engine alone,
# on an idle machine: 13-27 s). check_health meanwhile answered within 1.1 s, far inside the 120 s
# health_check_timeout_s. At least 3x the slowest start-up:
REPLACEMENT_WAIT_S = 300


class PickleBomb:
    """Unpickling this creates `marker`: proof that something loaded a pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory, tiny_serving_model_dir, tiny_model_dir):
    """Two replicas, an API key, adapters a1-a3 loaded and a4 in the registry; plus two entries that
    must be refused: a pickled `.bin` adapter and an adapter trained on another base."""
    from ray import serve

    from finch.serve.app import run

    tmp = tmp_path_factory.mktemp("reliability-serve")
    registry = tmp / "registry"
    for seed, name in enumerate(ADAPTERS, start=1):
        register(registry, name, make_adapter(tiny_serving_model_dir, tmp / name, seed), tiny_serving_model_dir)
    register(registry, "other-base", make_adapter(tiny_model_dir, tmp / "other-base", 9), tiny_model_dir)
    marker = tmp / "unpickled"
    pickled = resolve_entry(registry, "a1").path.parent.parent / "pickled" / "v1"
    shutil.copytree(resolve_entry(registry, "a1").path, pickled)
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(PickleBomb(marker)))
    manifest = json.loads((pickled / MANIFEST).read_text()) | {"name": "pickled"}
    (pickled / MANIFEST).write_text(json.dumps(manifest))

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINCH_API_KEY", API_KEY)
        config = validate_config(
            {
                "name": "reliable",
                "model": {"path": str(tiny_serving_model_dir), "dtype": "float32"},
                "template": "chat",
                "registry_dir": str(registry),
                "adapters": ["a1", "a2", "a3"],
                "engine": {"max_model_len": 128, "max_loras": 4, "max_lora_rank": 8},
                "server": {
                    "port": free_port(),
                    "max_tokens_limit": 32,
                    "request_timeout_s": 60,
                    "num_replicas": 2,
                    "cpus_per_replica": 0.5,
                    "adapter_sync_s": 0.5,
                    "max_request_bytes": MAX_BODY,
                },
            },
            schema=ServeConfig,
        )
        url = run(config, blocking=False)
        yield url, config, marker
    serve.shutdown()


def chat(url: str, model: str, max_tokens: int = 4, **extra) -> httpx.Response:
    body = {"model": model, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0} | extra
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)


def route_list(config: ServeConfig) -> list[tuple[str, str]]:
    """(method, path) of every route the served app has, from the app finch builds (no engine needed)."""
    from finch.serve.api import build_api
    from finch.serve.state import ApiState

    app = build_api(ApiState(config, None, None, None, "", [], API_KEY))
    return [(method, route.path) for route in app.routes for method in sorted(route.methods - {"HEAD"})]


def test_every_route_but_the_chat_page_needs_the_api_key(served):
    url, config, _ = served
    routes = route_list(config)
    assert ("POST", "/v1/chat/completions") in routes and ("GET", "/openapi.json") in routes
    for method, path in routes:
        target = url + path.replace("{name}", "a1")
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY + "x"}):
            response = httpx.request(method, target, headers=headers, json={}, timeout=30)
            if path == "/":  # the page is static; the key is typed into it and sent with its API calls
                assert response.status_code == 200 and "text/html" in response.headers["content-type"]
            else:
                assert response.status_code == 401, (method, path, response.text)
                assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health", headers=AUTH).json() == {"status": "ok"}


def hostile_requests(url: str) -> list[tuple[str, dict, set[int]]]:
    """(what, httpx.request kwargs, accepted statuses)."""
    post = {"method": "POST", "url": f"{url}/v1/chat/completions", "headers": AUTH}
    base = {"model": "base", "messages": QUESTION}

    def chunks():  # no Content-Length: the server has to count
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024

    return [
        ("declared oversize body", post | {"json": base | {"pad": "x" * MAX_BODY}}, {413}),
        ("streamed oversize body", post | {"content": chunks()}, {413}),
        (
            "invalid UTF-8",
            post
            | {
                "content": b'{"model": "base", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
                "headers": AUTH | {"content-type": "application/json"},
            },
            {400, 422},
        ),
        ("not JSON", post | {"content": b"{nope", "headers": AUTH | {"content-type": "application/json"}}, {400, 422}),
        ("negative max_tokens", post | {"json": base | {"max_tokens": -5}}, {422}),
        ("huge max_tokens", post | {"json": base | {"max_tokens": 10**12}}, {422}),
        ("huge seed", post | {"json": base | {"seed": 2**80}}, {422}),
        ("no messages", post | {"json": {"model": "base", "messages": []}}, {422}),
        ("unknown adapter", post | {"json": base | {"model": "nope"}}, {404}),
        ("unknown version", post | {"json": base | {"model": "a1@v9"}}, {404}),
        (
            "prompt over the context",
            post | {"json": base | {"messages": [{"role": "user", "content": "red " * 400}]}},
            {400},
        ),
        (
            "empty completion prompt",
            {
                "method": "POST",
                "url": f"{url}/v1/completions",
                "headers": AUTH,
                "json": {"model": "base", "prompt": ""},
            },
            {400},
        ),
        *[
            (
                f"load {ref!r}",
                {"method": "POST", "url": f"{url}/admin/adapters", "headers": AUTH, "json": {"adapter": ref}},
                {400, 404},
            )
            for ref in ("../a1", "a1/../../etc", "/etc/passwd", "..", "a1\n", "nope")
        ],
        (
            "serve under a traversal name",
            {
                "method": "POST",
                "url": f"{url}/admin/adapters",
                "headers": AUTH,
                "json": {"adapter": "a4", "name": "../x"},
            },
            {400, 409, 422},
        ),
        (
            "unload a traversal name",
            {"method": "DELETE", "url": f"{url}/admin/adapters/..%2F..%2Fetc", "headers": AUTH},
            {404},
        ),
        (
            "pickled .bin adapter",
            {"method": "POST", "url": f"{url}/admin/adapters", "headers": AUTH, "json": {"adapter": "pickled"}},
            {409},
        ),
        (
            "adapter of another base",
            {"method": "POST", "url": f"{url}/admin/adapters", "headers": AUTH, "json": {"adapter": "other-base"}},
            {409},
        ),
    ]


def refusals_logged() -> str:
    import ray

    # Serve's replica log files, or the replica's stderr once vLLM has set up its own logging
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return "".join(
        p.read_text(errors="replace") for p in [*logs.glob("worker-*.err"), *logs.glob("serve/replica_reliable_*")]
    )


def test_hostile_requests_are_refused_with_4xx_json_and_logged(served):
    url, _, marker = served
    for what, request, accepted in hostile_requests(url):
        response = httpx.request(**request, timeout=60)
        assert response.status_code in accepted, (what, response.status_code, response.text)
        assert response.json()["error"]["message"], what
    assert not marker.exists(), "a pickled adapter file was unpickled"
    served_models = httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]
    assert sorted(m["id"] for m in served_models) == ["a1", "a2", "a3", "base"]
    deadline = time.monotonic() + 30  # Serve flushes replica logs to files asynchronously
    while (logged := refusals_logged()).count("finch: refused") < len(
        hostile_requests(url)
    ) and time.monotonic() < deadline:
        time.sleep(1)
    for status in (413, 422, 404, 409, 400):
        assert f": {status} " in logged, f"no logged refusal with status {status}"
    assert chat(url, "a1").status_code == 200  # and the server goes on


def test_no_generated_request_gets_a_5xx(served):
    """Schemathesis requests from the served OpenAPI schema, valid and invalid, on every operation."""
    url, *_ = served
    schema = schemathesis.openapi.from_dict(httpx.get(f"{url}/openapi.json", headers=AUTH).json())
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
        )
        def no_server_error(case):
            case.call_and_validate(base_url=url, headers=AUTH, checks=[schemathesis.checks.not_a_server_error])

        no_server_error()
    assert len(operations) == 7, [f"{o.method} {o.path}" for o in operations]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def test_adapter_churn_under_concurrent_traffic_fails_no_request(served):
    """120 requests at concurrency 16 over base + 3 adapters while a4 is loaded and unloaded and a1
    is swapped for a new version: every request answers 200."""
    url, *_ = served
    rng = random.Random(0)
    models = [rng.choice(["base", "a1", "a2", "a3"]) for _ in range(120)]
    stop = threading.Event()
    churn_statuses: list[int] = []

    def churn():
        while not stop.is_set():
            for request in (
                {"method": "POST", "json": {"adapter": "a4"}},
                {"method": "DELETE", "url_tail": "/a4"},
                {"method": "POST", "json": {"adapter": "a1"}},
            ):
                tail = request.pop("url_tail", "")
                response = httpx.request(url=f"{url}/admin/adapters{tail}", headers=AUTH, timeout=120, **request)
                churn_statuses.append(response.status_code)

    def timed(model: str) -> tuple[int, float]:
        started = time.monotonic()
        return chat(url, model, max_tokens=8).status_code, time.monotonic() - started

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(timed, models))
    stop.set()
    churner.join(timeout=120)
    statuses = [status for status, _ in results]
    latencies = [seconds for _, seconds in results]
    print(
        f"churn: {len(churn_statuses)} admin calls; "
        f"p50 {percentile(latencies, 0.5):.2f} s, p99 {percentile(latencies, 0.99):.2f} s"
    )
    assert statuses == [200] * len(models), statuses
    assert len(churn_statuses) >= 3 and set(churn_statuses) == {200}, churn_statuses


def replica_pids() -> dict[str, int]:
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    actors = list_actors(
        address=address, filters=[("class_name", "=", "ServeReplica:reliable:finch"), ("state", "=", "ALIVE")]
    )
    return {actor["actor_id"]: actor["pid"] for actor in actors}


def replaced_and_running(victim: int) -> bool:
    """Two live replicas, neither of them `victim`, and Serve routes to both."""
    from ray import serve

    pids = replica_pids()
    running = serve.status().applications["reliable"].deployments["finch"].replica_states.get("RUNNING", 0)
    return len(pids) == 2 and victim not in pids.values() and running == 2


def test_a_killed_replica_is_replaced_and_serves_the_current_adapters(served):
    url, *_ = served
    assert httpx.post(f"{url}/admin/adapters", json={"adapter": "a4"}, headers=AUTH, timeout=120).status_code == 200
    before = replica_pids()
    assert len(before) == 2
    victim = next(iter(before.values()))
    stop = threading.Event()
    statuses: list[int] = []

    def traffic():
        while not stop.is_set():
            try:
                statuses.append(chat(url, random.choice(["base", "a1", "a4"])).status_code)
            except httpx.HTTPError:
                statuses.append(0)

    workers = [threading.Thread(target=traffic, daemon=True) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(2)
    os.kill(victim, signal.SIGKILL)
    killed, killed_at = time.monotonic(), len(statuses)
    while not (recovered := replaced_and_running(victim)) and time.monotonic() - killed < REPLACEMENT_WAIT_S:
        time.sleep(2)
    replaced_in = time.monotonic() - killed
    replaced = replica_pids()
    recovered_from = len(statuses)
    time.sleep(5)
    stop.set()
    for worker in workers:
        worker.join(timeout=120)
    assert len(replaced) == 2 and victim not in replaced.values(), "Serve did not replace the killed replica"
    assert recovered, f"the killed replica's replacement was not serving {REPLACEMENT_WAIT_S} s after the kill"
    print(f"replica kill: both replicas serving again {replaced_in:.0f} s after the kill")
    failed_during_kill = [s for s in statuses[killed_at:recovered_from] if s != 200]
    print(
        f"replica kill: {len(failed_during_kill)} of {recovered_from - killed_at} requests failed while it was replaced"
    )
    assert len(failed_during_kill) <= 4, failed_during_kill  # at most the requests in flight on the killed replica
    assert statuses[:killed_at] and set(statuses[:killed_at]) == {200}
    assert statuses[recovered_from:] and set(statuses[recovered_from:]) == {200}, statuses[recovered_from:]
    # both replicas, the new one included, serve a4 (loaded through the admin API, not the config)
    assert len(replicas_answering(url, "a4")) == 2


def replicas_answering(url: str, model: str, wait_s: float = 120) -> set[str]:
    """The replicas that answered `model`, asked 4 at a time until two answered or `wait_s` ran out.
    Serve's router sends a request to a replica whose queue length it has cached; a new replica
    enters that cache when a background probe answers within 0.1 s, which on 2 busy cores may take
    a few rounds (one CI run saw 30 requests in a row, sent one at a time, all go to the old one)."""
    answered: set[str] = set()
    deadline = time.monotonic() + wait_s
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        while len(answered) < 2 and time.monotonic() < deadline:
            for response in pool.map(lambda _: chat(url, model), range(4)):
                assert response.status_code == 200, response.text
                answered.add(response.headers["x-finch-replica"])
    return answered


def test_only_loopback_http_and_ray_ports_need_the_cluster_token(served):
    """The HTTP listeners finch opens (Serve's proxy, Ray's dashboard) bind 127.0.0.1. Ray 2.60's own
    gRPC services listen on every interface; token auth is on for the local cluster, so a client
    without the token is refused."""
    import ray
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    url, config, _ = served
    tree = [psutil.Process()] + psutil.Process().children(recursive=True)
    listening = {
        c.laddr.port: c.laddr.ip
        for c in psutil.net_connections("inet")
        if c.status == "LISTEN" and c.pid in {p.pid for p in tree}
    }
    http_ports = {config.server.port, int(ray._private.worker.get_dashboard_url().rpartition(":")[2])}
    # Serve's proxy runs in a Ray actor, which this process started (a child of it)
    assert {listening.get(port) for port in http_ports} == {"127.0.0.1"}, listening
    assert is_token_auth_enabled()
    gcs = ray.get_runtime_context().gcs_address
    intruder = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address={gcs!r}, logging_level='ERROR'); print('joined')"],
        env=os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token", "RAY_ADDRESS": ""},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert "joined" not in intruder.stdout and intruder.returncode != 0, intruder.stdout + intruder.stderr[-2000:]
