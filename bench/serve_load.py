"""`finch serve` under load, past capacity and with a replica killed: real Ray Serve + vLLM over HTTP
on 127.0.0.1, numbers for docs/reliability.md.

One application (2 replicas by default, an API key) on the base model with random rank-16 LoRA
adapters a1-a4 (and a spare, a5), in four phases:

1. Baseline: requests one at a time over base + a1..a4: latency of an unloaded server.
2. Load: N requests (500) at concurrency C (16) over base + a1..a4, while during the middle third an
   admin thread loads and unloads a5 and reloads a1 (a new registry version under the same name).
   Success rate (goal: 100%, no 5xx), p50/p95/p99 latency, throughput; ratios against phase 1.
3. Past capacity: a burst of 8x (max_ongoing + max_queued) x replicas requests at once. Every answer
   must be a 200 or a 503 with Retry-After, none may hang or be another 5xx.
4. Replica kill: traffic at concurrency 4 while one replica's process is SIGKILLed; how many requests
   failed, and how long until Serve runs two replicas again and both serve a1..a4.

Tables print as markdown with the machine and the command. On CPU read the ratios and counts; seconds
mean something only from a GPU run.

    .venv/bin/python bench/serve_load.py [--model FOLDER] [--requests 500] [--concurrency 16] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import secrets
import signal
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from machine import command_line, load_average, machine_description
from serve_multilora import build_adapters, publish_adapters

from finch.config import ServeConfig, validate_config
from finch.models.gemma_gguf import GEMMA3_270M_URI
from finch.models.source import resolve_model_path
from finch.precision import detect_device, inference_dtype

ADAPTERS = ["a1", "a2", "a3", "a4"]
SPARE = "a5"
MODELS = ["base", *ADAPTERS]
QUESTIONS = [
    "What's the wifi password?",
    "When is breakfast served?",
    "Can I check out late?",
    "Is there parking?",
    "My card was charged twice, please refund one.",
]


@dataclass
class Outcome:
    status: int  # 0: no HTTP answer (connection error or client timeout)
    seconds: float
    retry_after: str | None = None
    error: str = ""  # the error message of a refusal


class Client:
    def __init__(self, url: str, key: str, max_tokens: int):
        self.url, self.max_tokens = url, max_tokens
        self.headers = {"Authorization": f"Bearer {key}"}
        self.http = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=256))

    def chat(self, model: str) -> Outcome:
        body = {
            "model": model,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": random.choice(QUESTIONS)}],
        }
        started = time.monotonic()
        try:
            response = self.http.post(f"{self.url}/v1/chat/completions", json=body, headers=self.headers)
        except httpx.HTTPError:
            return Outcome(0, time.monotonic() - started)
        error = "" if response.is_success else response.text[:160]
        return Outcome(response.status_code, time.monotonic() - started, response.headers.get("retry-after"), error)

    def admin(self, method: str, tail: str = "", body: dict | None = None) -> Outcome:
        started = time.monotonic()
        response = self.http.request(method, f"{self.url}/admin/adapters{tail}", json=body, headers=self.headers)
        return Outcome(response.status_code, time.monotonic() - started)


def run_traffic(client: Client, models: list[str], concurrency: int) -> tuple[list[Outcome], float]:
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(client.chat, models))
    return outcomes, time.monotonic() - started


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def summary(outcomes: list[Outcome], seconds: float) -> dict[str, float]:
    ok = [o.seconds for o in outcomes if o.status == 200]
    return {
        "requests": len(outcomes),
        "success": len(ok) / len(outcomes),
        "p50": percentile(ok, 0.5),
        "p95": percentile(ok, 0.95),
        "p99": percentile(ok, 0.99),
        "rps": len(outcomes) / seconds,
    }


def churn(client: Client, stop: threading.Event, results: list[Outcome]) -> None:
    """Load and unload the spare adapter and swap a1 for a new version until told to stop."""
    while not stop.is_set():
        results.append(client.admin("POST", body={"adapter": SPARE}))
        results.append(client.admin("DELETE", f"/{SPARE}"))
        results.append(client.admin("POST", body={"adapter": "a1"}))


def load_phase(client: Client, args: argparse.Namespace) -> tuple[list[Outcome], float, list[Outcome]]:
    models = [random.choice(MODELS) for _ in range(args.requests)]
    third = args.requests // 3
    stop, admin_results = threading.Event(), []
    churner = threading.Thread(target=churn, args=(client, stop, admin_results), daemon=True)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        futures = [pool.submit(client.chat, model) for model in models]
        for index, future in enumerate(futures):  # churn while the middle third is answered
            if index == third:
                churner.start()
            if index == 2 * third:
                stop.set()
            future.result()
    seconds = time.monotonic() - started
    churner.join()
    return [f.result() for f in futures], seconds, admin_results


def replica_pids(app: str) -> list[int]:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", f"ServeReplica:{app}:finch"), ("state", "=", "ALIVE")],
    )
    return [actor["pid"] for actor in actors]


def running_replicas(app: str) -> int:
    from ray import serve

    return serve.status().applications[app].deployments["finch"].replica_states.get("RUNNING", 0)


def kill_phase(client: Client, app: str, replicas: int) -> dict[str, float]:
    victim = replica_pids(app)[0]
    stop, outcomes = threading.Event(), []

    def traffic():
        while not stop.is_set():
            outcomes.append(client.chat(random.choice(MODELS)))

    threads = [threading.Thread(target=traffic, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    before = len(outcomes)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    while not (len(pids := replica_pids(app)) == replicas and victim not in pids and running_replicas(app) == replicas):
        time.sleep(0.5)
    recovered_s = time.monotonic() - killed_at
    during = len(outcomes)
    time.sleep(5)
    stop.set()
    for thread in threads:
        thread.join()
    failed = [o for o in outcomes[before:during] if o.status != 200]
    after = outcomes[during:]
    return {
        "requests_during": during - before,
        "failed_during": len(failed),
        "recovered_s": recovered_s,
        "failed_statuses": dict(Counter(o.status for o in failed)),
        "after_success": sum(o.status == 200 for o in after) / max(1, len(after)),
        "after_requests": len(after),
    }


def prompt_template(model_path: str) -> str:
    """What finch trains with on this base: its chat template, or the plain alpaca one (the quickstart's Gemma)."""
    from finch.data.templates import resolve_template
    from finch.models.tokenizer import load_tokenizer

    return resolve_template("auto", load_tokenizer(model_path))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_config(args: argparse.Namespace, model_path: str, registry: Path, port: int) -> ServeConfig:
    return validate_config(
        {
            "name": "load",
            "model": {"path": model_path, "dtype": args.dtype},
            "registry_dir": str(registry),
            "adapters": ADAPTERS,
            "engine": {"max_model_len": 512, "max_loras": 6, "max_lora_rank": 16},
            "server": {
                "port": port,
                "num_replicas": args.replicas,
                "cpus_per_replica": 0.5,
                "max_ongoing_requests": args.max_ongoing,
                "max_queued_requests": args.max_queued,
                "max_tokens_limit": args.max_tokens,
                "request_timeout_s": 120,
            },
        },
        schema=ServeConfig,
    )


def print_report(args, baseline, load, admin, burst, kill) -> None:
    base_stats = summary(*baseline)
    load_stats = summary(load[0], load[1])
    statuses = Counter(o.status for o in load[0])
    print(
        f"\n## Load: {args.requests} requests at concurrency {args.concurrency} over base + {len(ADAPTERS)} "
        "adapters, adapter churn in the middle third\n"
    )
    print("| phase | requests | success | p50 s | p95 s | p99 s | requests/s |")
    print("|---|---|---|---|---|---|---|")
    for name, stats in (("one at a time (baseline)", base_stats), (f"concurrency {args.concurrency}", load_stats)):
        print(
            f"| {name} | {stats['requests']} | {stats['success']:.1%} | {stats['p50']:.2f} | {stats['p95']:.2f} "
            f"| {stats['p99']:.2f} | {stats['rps']:.2f} |"
        )
    print(
        f"\nstatuses under load: {dict(statuses)}; throughput {load_stats['rps'] / base_stats['rps']:.2f}x the baseline, "
        f"p50 latency {load_stats['p50'] / base_stats['p50']:.2f}x"
    )
    errors = Counter(o.error for o in [*baseline[0], *load[0], *burst[0]] if o.error and o.status != 503)
    if errors:
        print(f"errors other than 503: {dict(errors.most_common(5))}")
    admin_statuses = Counter(o.status for o in admin)
    print(
        f"admin calls during the load: {len(admin)} ({dict(admin_statuses)}), "
        f"p50 {statistics.median(o.seconds for o in admin):.2f} s"
        if admin
        else "admin calls during the load: none (the middle third finished first)"
    )
    burst_statuses = Counter(o.status for o in burst[0])
    rejected = [o for o in burst[0] if o.status == 503]
    print(
        f"\n## Past capacity: {len(burst[0])} requests at once "
        f"(capacity {args.replicas} x ({args.max_ongoing} + {args.max_queued}))\n"
    )
    print(
        f"statuses: {dict(burst_statuses)}; every 503 with Retry-After: {all(o.retry_after for o in rejected)} "
        f"({Counter(o.retry_after for o in rejected)}); "
        f"503s answered in p50 {percentile([o.seconds for o in rejected], 0.5):.2f} s; "
        f"slowest answer {max(o.seconds for o in burst[0]):.1f} s"
    )
    print("\n## Replica killed (SIGKILL) under traffic at concurrency 4\n")
    print(
        f"{kill['failed_during']} of {kill['requests_during']} requests failed {kill['failed_statuses']} "
        f"(0: connection closed) until Serve ran {args.replicas} replicas again "
        f"({kill['recovered_s']:.0f} s); afterwards {kill['after_success']:.0%} of {kill['after_requests']} succeeded"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default=GEMMA3_270M_URI, help=f"base model: a HF folder, or {GEMMA3_270M_URI} (default)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="'auto': bfloat16 where the device runs it natively, else float32 (float16 on older GPUs)",
    )
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--baseline-requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default 16)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-ongoing", type=int, default=8, help="server.max_ongoing_requests (default 8)")
    parser.add_argument("--max-queued", type=int, default=8, help="server.max_queued_requests (default 8)")
    return parser.parse_args()


def main() -> None:
    from finch.serve.app import run, stop

    args = parse_args()
    random.seed(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    key = os.environ.setdefault("FINCH_API_KEY", secrets.token_urlsafe(16))
    model_path = resolve_model_path(args.model)
    args.dtype, _ = inference_dtype(args.dtype, detect_device(torch.cuda.is_available()))
    print(f"machine: {machine_description(('torch', 'vllm', 'ray', 'transformers'))}; load average {load_average()}")
    print(f"command: {command_line()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="finch-bench-load-") as tmp:
        registry = Path(tmp) / "registry"
        adapters = build_adapters(
            model_path, Path(tmp) / "adapters", ADAPTERS + [SPARE], 16, getattr(torch, args.dtype)
        )
        publish_adapters(registry, adapters, model_path, args.model, prompt_template(model_path))
        config = serve_config(args, model_path, registry, free_port())
        started = time.monotonic()
        url = run(config, blocking=False)
        print(f"serving after {time.monotonic() - started:.0f} s", flush=True)
        client = Client(url, key, args.max_tokens)
        try:
            baseline = run_traffic(client, [MODELS[i % len(MODELS)] for i in range(args.baseline_requests)], 1)
            print("baseline done", flush=True)
            *load, admin = load_phase(client, args)
            print("load done", flush=True)
            capacity = args.replicas * (args.max_ongoing + args.max_queued)
            burst = run_traffic(client, [random.choice(MODELS) for _ in range(8 * capacity)], 8 * capacity)
            print("burst done", flush=True)
            kill = kill_phase(client, config.name, args.replicas)
        finally:
            stop(config)
    print_report(args, baseline, load, admin, burst, kill)
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
