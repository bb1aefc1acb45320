"""Many adapters on demand: Zipf traffic over 100 registry adapters against base-only traffic, one engine.

finch's `ServingEngine` (vLLM AsyncLLM) serves `--adapters` random LoRA adapters (rank 16 on all seven
linear projections, like the quickstart's) published to a temporary registry, none loaded at start:
`on_demand` loads each on its first request and keeps at most `--cpu-loras` loaded (the zero adapter
that serves the base on CPU included), evicting the least recently used idle one; vLLM batches up to
`--batch-loras` adapters at a time. Two kinds of traffic on the same engine, in the same run:

- "base only": every request on the base model;
- "zipf": request i names adapter k with probability proportional to 1 / k^s (`--zipf`), over all
  adapters: a few popular adapters stay cached, the long tail loads on demand and evicts.

Both send the same prompts (fresh per round: a repeated prompt would come from vLLM's prefix cache)
with `--concurrency` requests in flight (a new one starts when one ends), each generating the same
number of greedy tokens, so both do the same work. Rounds alternate the order of the two; the cache
starts cold in round 1 and carries over. Reported: requests that succeeded, throughput ratio (median
over rounds of zipf / base-only tokens/s), request latency p50/p95, the cold loads requests waited
for (finch's compatibility check, eviction and vLLM's `add_lora`) p50/p95, hit rate (requests that
found their adapter loaded), loads and evictions. On CPU read the ratios, not the seconds.

    .venv/bin/python bench/serve_many.py [--quick] [--model FOLDER] [--adapters 100] [--requests 160]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import torch
from machine import load_average
from serve_multilora import (
    LORA_TARGETS,
    PROMPT_LENGTHS,
    build_adapters,
    count_generated,
    greedy_params,
    make_prompts,
    publish_adapters,
    start_engine_benchmark,
    text_vocab_size,
)

from finch.config import EngineConfig
from finch.models.gemma_gguf import GEMMA3_270M_URI
from finch.serve.engine import ServingEngine

# Full: meant to stay under ~15 minutes for Gemma 3 270M on 2 CPU cores. Quick: a smoke test of every path.
# cpu_loras: engine.max_cpu_loras, adapters kept loaded; batch_loras: engine.max_loras, adapters in one batch.
# In flight (concurrency) stays below cpu_loras - 1: a request never finds every slot busy.
DEFAULTS = {
    "full": {
        "adapters": 100,
        "requests": 160,
        "new_tokens": 16,
        "rounds": 2,
        "concurrency": 16,
        "cpu_loras": 32,
        "batch_loras": 8,
    },
    "quick": {
        "adapters": 12,
        "requests": 24,
        "new_tokens": 4,
        "rounds": 1,
        "concurrency": 4,
        "cpu_loras": 6,
        "batch_loras": 4,
    },
}
BASE_ONLY, ZIPF = "base only", "zipf"


@dataclass
class Traffic:
    """One variant's run: what finished, how long it took."""

    tokens: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def zipf_targets(count: int, adapters: list[str], exponent: float, seed: int) -> list[str]:
    """Adapter names drawn with probability proportional to 1 / rank^exponent (the first is rank 1)."""
    weights = 1.0 / np.arange(1, len(adapters) + 1) ** exponent
    generator = np.random.default_rng(seed)
    return [adapters[i] for i in generator.choice(len(adapters), size=count, p=weights / weights.sum())]


async def run_traffic(
    engine: ServingEngine, prompts: list[list[int]], targets: list[str | None], args: argparse.Namespace, tag: str
) -> Traffic:
    """Every request, `args.concurrency` in flight at a time; a failed request is recorded, not raised."""
    params, slots, traffic = greedy_params(args.new_tokens), asyncio.Semaphore(args.concurrency), Traffic()

    async def one(index: int) -> None:
        async with slots:
            start = time.perf_counter()
            try:
                tokens = await count_generated(engine, prompts[index], targets[index], params, f"{tag}-{index}")
            except Exception as err:  # counted: the benchmark reports success, it does not stop at the first failure
                traffic.failures.append(f"{targets[index]}: {err!r}")
                return
            traffic.tokens += tokens
            traffic.latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(one(index) for index in range(len(prompts))))
    traffic.seconds = time.perf_counter() - start
    return traffic


def timed_loads(engine: ServingEngine) -> list[float]:
    """Milliseconds of every on-demand load from now on (wraps the engine's loader; a benchmark probe)."""
    samples: list[float] = []
    load = engine._load_on_demand

    async def timed(ref: str) -> None:
        start = time.perf_counter()
        await load(ref)
        samples.append((time.perf_counter() - start) * 1000)

    engine._load_on_demand = timed
    return samples


async def serving_benchmark(
    model_path: str, registry: Path, work: Path, adapters: list[str], vocab_size: int, args: argparse.Namespace
) -> tuple[dict[str, list[Traffic]], list[float], dict[str, int]]:
    settings = EngineConfig(
        max_model_len=max(PROMPT_LENGTHS) + args.new_tokens,
        max_loras=args.batch_loras,
        max_lora_rank=args.rank,
        max_cpu_loras=args.cpu_loras,
    )
    # Started inside the running loop: AsyncLLM's output handler runs as a task of the loop that drives it.
    engine = ServingEngine.start(
        settings, model_path, registry, work / "zero-adapter", args.dtype, on_demand=["many-*"]
    )
    try:
        await engine.warm_up()
        # Untimed: first-use costs of the engine (kernels for new batch shapes) land here.
        await run_traffic(
            engine, make_prompts(args.concurrency, vocab_size, seed=1), [None] * args.concurrency, args, "warm-up"
        )
        loads = timed_loads(engine)
        results: dict[str, list[Traffic]] = {BASE_ONLY: [], ZIPF: []}
        for round_index in range(args.rounds):
            variants = [BASE_ONLY, ZIPF] if round_index % 2 == 0 else [ZIPF, BASE_ONLY]
            prompts = make_prompts(args.requests, vocab_size, seed=1000 + round_index)
            for variant in variants:
                targets = (
                    [None] * args.requests
                    if variant == BASE_ONLY
                    else [f"{name}@v1" for name in zipf_targets(args.requests, adapters, args.zipf, seed=round_index)]
                )
                traffic = await run_traffic(engine, prompts, targets, args, f"r{round_index}-{variant}")
                results[variant].append(traffic)
                print(
                    f"  round {round_index + 1}/{args.rounds}, {variant}: {traffic.tokens_per_second:.1f} tokens/s, "
                    f"{len(traffic.failures)} failed",
                    flush=True,
                )
        return results, loads, vars(engine.stats)
    finally:
        engine.shutdown()


def percentiles(values: list[float], scale: float = 1.0) -> str:
    if not values:
        return "- | -"
    return f"{np.percentile(values, 50) * scale:.0f} | {np.percentile(values, 95) * scale:.0f}"


def report(
    args: argparse.Namespace, device: str, results: dict[str, list[Traffic]], loads: list[float], stats: dict[str, int]
) -> str:
    ratios = [z.tokens_per_second / b.tokens_per_second for z, b in zip(results[ZIPF], results[BASE_ONLY])]
    rows = [
        "| traffic | requests ok | tokens/s (median round) | vs base-only (median; each round, cold cache first) | "
        "latency p50 ms | latency p95 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        ok = sum(len(run.latencies) for run in runs)
        speed = statistics.median(run.tokens_per_second for run in runs)
        shown = (
            "1.00x"
            if name == BASE_ONLY
            else f"{statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}x' for r in ratios)})"
        )
        rows.append(
            f"| {name} | {ok}/{args.requests * args.rounds} | {speed:.1f} | {shown} | "
            f"{percentiles([s for run in runs for s in run.latencies], 1000)} |"
        )
    lookups = stats["hits"] + stats["misses"]
    rows += [
        "",
        "| on-demand adapters | value |",
        "|---|---|",
        f"| cold loads waited for | {len(loads)} (p50 / p95 ms: {percentiles(loads).replace(' | ', ' / ')}) |",
        f"| hit rate (request found its adapter loaded) | {stats['hits'] / max(lookups, 1):.1%} of {lookups} |",
        f"| evictions | {stats['evictions']} |",
    ]
    header = (
        f"Date: {date.today().isoformat()}. Model: {args.model} ({args.dtype}, {device}); {args.adapters} adapters, rank "
        f"{args.rank} on {', '.join(LORA_TARGETS)}; Zipf s={args.zipf}; engine.max_cpu_loras {args.cpu_loras}, "
        f"engine.max_loras {args.batch_loras}; {args.concurrency} requests in flight; each request a "
        f"{'/'.join(map(str, PROMPT_LENGTHS))}-token prompt (cycled), {args.new_tokens} greedy tokens; "
        f"{args.rounds} round(s)."
    )
    return header + "\n\n" + "\n".join(rows)


def parse_args() -> argparse.Namespace:
    full, quick = DEFAULTS["full"], DEFAULTS["quick"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=GEMMA3_270M_URI, help=f"base model: a HF folder, or {GEMMA3_270M_URI} (default)"
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: " + ", ".join(f"{k} {v}" for k, v in quick.items())
    )
    parser.add_argument("--rank", type=int, default=16, choices=[8, 16, 32, 64], help="LoRA rank (default 16)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s of adapter popularity (default 1.0)")
    for key, value in full.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"default {value}")
    args = parser.parse_args()
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(getattr(args, key) for key in full) < 1 or args.cpu_loras < args.batch_loras:
        parser.error("counts must be at least 1, and --cpu-loras at least --batch-loras")
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    model_path, device = start_engine_benchmark(args)
    with tempfile.TemporaryDirectory(prefix="finch-bench-serve-many-") as tmp:
        work = Path(tmp)
        names = [f"many-{i:03d}" for i in range(args.adapters)]
        print(f"building {args.adapters} adapters ...", flush=True)
        folders = build_adapters(model_path, work / "adapters", names, args.rank, getattr(torch, args.dtype))
        publish_adapters(work / "registry", folders, model_path, args.model)
        print("vLLM: starting the engine ...", flush=True)
        results, loads, stats = asyncio.run(
            serving_benchmark(model_path, work / "registry", work, names, text_vocab_size(model_path), args)
        )
    print("\n" + report(args, device, results, loads, stats))
    for traffic in results[ZIPF] + results[BASE_ONLY]:
        for failure in traffic.failures[:5]:
            print(f"failed: {failure}")
    print(f"\nTotal time: {time.perf_counter() - started:.0f}s; load average {load_average()} at the end")


if __name__ == "__main__":
    main()
