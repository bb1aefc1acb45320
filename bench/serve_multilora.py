"""Multi-LoRA serving: throughput with N adapters in mixed traffic, against base-only and a naive baseline.

Measured in one run, on one base model, with random LoRA adapters (rank 16 by default) on all seven
linear projections, like the quickstart adapters, published to a temporary registry:

1. Throughput of finch's `ServingEngine` (vLLM AsyncLLM, continuous batching). Each variant submits
   the same number of requests at once, each request generating the same number of tokens (greedy,
   `ignore_eos`), so every variant does the same work:
   - "base only": every request on the base model;
   - "base + N adapters", N = 1, 2, 4, 8: requests round-robin over the base and N adapters, so one
     batch holds N + 1 different LoRAs (finch serves the base through a zero adapter).
   All variants run on one engine, with one LoRA slot per adapter of the largest mix plus the zero
   adapter. Variants run in rounds, every other round in reverse order, each batch with fresh prompts
   of the same lengths (a repeated prompt would be prefilled from vLLM's prefix cache). A ratio is the
   median over rounds of (variant tokens/s) / (base-only tokens/s in the same round).
2. The naive baseline: transformers + PEFT, all adapters loaded in one PeftModel, one request at a
   time, `set_adapter` to the request's adapter (adapters disabled for the base), greedy `generate`
   of the same number of tokens. Its cost per request does not depend on how many adapters are in
   the mix, so it runs once, round-robin over the base and the adapters of the largest mix.
3. Adapter load latency on the idle engine: `engine.load(ref)` of adapters not loaded before (finch's
   compatibility check + vLLM `add_lora`, which reads the weights), `unload`, and unload + load again
   of the same adapter; p50/p95 in milliseconds.

How to read it: "vs base-only" near 1.00x means serving N adapters at once costs little over serving
the base alone; "vs naive" is how much more throughput multi-LoRA batching gives than switching a PEFT
adapter per request. On CPU read the ratios, not the seconds: absolute numbers mean something only from
a GPU run. The load average printed at the start and end tells whether other work shared the machine.
Tables print as markdown, with the machine and the command, ready for docs/benchmarks.md.

    .venv/bin/python bench/serve_multilora.py [--quick] [--model FOLDER] [--requests 32] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from functools import partial
from pathlib import Path

import numpy as np
import torch
from machine import command_line, load_average, machine_description

from finch.config import EngineConfig
from finch.fingerprint import fingerprint_model_folder
from finch.models.gemma_gguf import GEMMA3_270M_URI
from finch.models.source import resolve_model_path
from finch.precision import detect_device, inference_dtype
from finch.registry.store import publish
from finch.serve.engine import ServingEngine

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Request i gets a prompt of PROMPT_LENGTHS[i % 4] tokens in every variant: the same prefill work everywhere.
PROMPT_LENGTHS = (16, 24, 32, 48)
# Full: meant to stay under ~10 minutes for Gemma 3 270M on 2 CPU cores. Quick: a smoke test of every path.
DEFAULTS = {
    "full": {"requests": 32, "new_tokens": 32, "rounds": 2, "naive_requests": 9, "load_adapters": 20},
    "quick": {"requests": 9, "new_tokens": 8, "rounds": 1, "naive_requests": 3, "load_adapters": 4},
}
BASE_ONLY = "base only"


@dataclass
class Measurement:
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Setup:
    """What the benchmark runs on: the base model and the adapters published for it."""

    model_path: str
    vocab_size: int
    work: Path  # temporary: adapters/, registry/, zero-adapter/
    served: list[str]  # the adapters of the mixed-traffic variants, mix-0 ... mix-(N-1)
    load_refs: list[str]  # adapters only the load-latency test loads

    @property
    def registry(self) -> Path:
        return self.work / "registry"


# ---- workload -----------------------------------------------------------------------------------------


def make_prompts(count: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids; ids below 100 are left out, where tokenizers keep their special tokens."""
    generator = np.random.default_rng(seed)
    return [generator.integers(100, vocab_size, PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)]).tolist() for i in range(count)]


def round_robin(targets: list[str | None], count: int) -> list[str | None]:
    """Request i goes to targets[i % len(targets)]; None is the base model."""
    return [targets[i % len(targets)] for i in range(count)]


def text_vocab_size(model_path: str) -> int:
    from transformers import AutoConfig

    # Multimodal configs (Gemma 3) keep the language model's settings in a sub-config.
    return AutoConfig.from_pretrained(model_path).get_text_config().vocab_size


# ---- adapters and registry ----------------------------------------------------------------------------


def build_adapters(model_path: str, folder: Path, names: list[str], rank: int, dtype: torch.dtype) -> dict[str, Path]:
    """One adapter in PEFT layout per name, with random A and B seeded per adapter, so they all differ."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype), config)
    lora_weights = [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    for seed, name in enumerate(names):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for weight in lora_weights:  # PEFT starts B at 0: every fresh adapter would be the same no-op
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
        model.save_pretrained(folder / name)
    return {name: folder / name for name in names}


def publish_adapters(
    registry: Path, adapters: dict[str, Path], model_path: str, model_id: str, template: str = "chat"
) -> None:
    """Registry entries whose manifest names the base model, which finch's engine checks before loading,
    and the prompt template chat requests are rendered with."""
    base = {"fingerprint": fingerprint_model_folder(model_path), "id": model_id}
    for name, folder in adapters.items():
        files = {f: folder / f for f in ("adapter_config.json", "adapter_model.safetensors")}
        publish(registry, name, files, {"base_model": base, "template": template})


# ---- naive baseline: transformers + PEFT, one request at a time ----------------------------------------


def naive_throughput(
    model_path: str,
    adapters: dict[str, Path],
    prompts: list[list[int]],
    new_tokens: int,
    dtype: torch.dtype,
    device: str,
) -> Measurement:
    model = load_peft_model(model_path, adapters, dtype, device)
    naive_generate(model, prompts[0], next(iter(adapters)), 2, device)  # warm-up: first-call costs are not timed
    targets = round_robin([None, *adapters], len(prompts))
    start = time.perf_counter()
    tokens = sum(naive_generate(model, prompt, target, new_tokens, device) for prompt, target in zip(prompts, targets))
    measurement = Measurement(tokens, time.perf_counter() - start)
    del model
    release_memory()  # the vLLM engine started next wants this memory (on GPU: a fixed share of all of it)
    return measurement


def load_peft_model(model_path: str, adapters: dict[str, Path], dtype: torch.dtype, device: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    (first, first_folder), *others = adapters.items()
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model = PeftModel.from_pretrained(base, first_folder, adapter_name=first)
    for name, folder in others:
        model.load_adapter(folder, adapter_name=name)
    return model.to(device).eval()


def naive_generate(model, prompt: list[int], adapter: str | None, new_tokens: int, device: str) -> int:
    ids = torch.tensor([prompt], device=device)
    settings = {
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": 0,
    }
    with torch.inference_mode():
        if adapter is None:
            with model.disable_adapter():
                out = model.generate(input_ids=ids, **settings)
        else:
            model.set_adapter(adapter)
            out = model.generate(input_ids=ids, **settings)
    return out.shape[1] - ids.shape[1]


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- finch's ServingEngine (vLLM) ----------------------------------------------------------------------


def import_vllm_engine() -> None:
    """Import vLLM's engine modules before any engine exists.

    vllm/multimodal/media/audio.py (0.32) keeps the ImportError of its optional torchcodec import and,
    through its traceback, every frame of the import chain. Imported first inside ServingEngine.start,
    that chain keeps the engine alive until interpreter exit, where AsyncLLM.__del__ shuts it down a
    second time, with vLLM's modules half torn down, and prints a TypeError.
    """
    import vllm.engine.arg_utils  # noqa: F401


def engine_settings(args: argparse.Namespace) -> EngineConfig:
    most = max(args.adapter_counts)
    return EngineConfig(
        max_model_len=max(PROMPT_LENGTHS) + args.new_tokens,
        max_loras=most + 1,  # the largest mix and the zero adapter that serves the base, in one batch
        max_lora_rank=args.rank,
        max_cpu_loras=most + 2,  # + the adapter under the load test, so no served adapter is ever evicted
    )


def greedy_params(new_tokens: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    # detokenize=False: the naive baseline returns token ids too, and detokenizing costs the same
    # for every adapter mix, so it would only blur the ratios.
    return SamplingParams(
        max_tokens=new_tokens,
        min_tokens=new_tokens,
        temperature=0.0,
        ignore_eos=True,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )


async def count_generated(
    engine: ServingEngine, prompt: list[int], adapter: str | None, params, request_id: str
) -> int:
    tokens = 0
    async for output in engine.generate(prompt, params, adapter, request_id):
        tokens += len(output.outputs[0].token_ids)  # DELTA outputs carry only the new tokens
    return tokens


async def timed_batch(
    engine: ServingEngine, prompts: list[list[int]], targets: list[str | None], new_tokens: int, tag: str
) -> Measurement:
    """All requests submitted at once; wall time from submission to the last token of the last request."""
    params = greedy_params(new_tokens)
    requests = (count_generated(engine, p, t, params, f"{tag}-{i}") for i, (p, t) in enumerate(zip(prompts, targets)))
    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*requests))
    seconds = time.perf_counter() - start
    if tokens != len(prompts) * new_tokens:  # every variant must have done the same work
        raise RuntimeError(f"{tag}: {tokens} tokens generated, expected {len(prompts) * new_tokens}")
    return Measurement(tokens, seconds)


def traffic_variants(served: list[str], adapter_counts: list[int]) -> dict[str, list[str | None]]:
    """Variant name -> the targets its requests go to, round-robin; None is the base model."""
    mixes = {f"base + {n} adapter{'s' if n > 1 else ''}": [None, *served[:n]] for n in adapter_counts}
    return {BASE_ONLY: [None], **mixes}


async def throughput_rounds(
    engine: ServingEngine, setup: Setup, args: argparse.Namespace
) -> dict[str, list[Measurement]]:
    variants = list(enumerate(traffic_variants(setup.served, args.adapter_counts).items()))
    results: dict[str, list[Measurement]] = {name: [] for _, (name, _) in variants}
    for round_index in range(args.rounds):
        # Every other round in reverse: a machine that speeds up or slows down during the run favours no variant.
        ordered = variants if round_index % 2 == 0 else variants[::-1]
        for variant_index, (name, targets) in ordered:
            prompts = make_prompts(args.requests, setup.vocab_size, seed=1000 + 100 * round_index + variant_index)
            batch = await timed_batch(
                engine,
                prompts,
                round_robin(targets, args.requests),
                args.new_tokens,
                f"r{round_index}-v{variant_index}",
            )
            results[name].append(batch)
            print(
                f"  round {round_index + 1}/{args.rounds}, {name}: {batch.tokens_per_second:.1f} tokens/s", flush=True
            )
    return results


async def load_latencies(engine: ServingEngine, refs: list[str]) -> dict[str, list[float]]:
    """Milliseconds per operation, one sample per adapter. Each adapter ends unloaded, so the engine's
    adapter cache never fills up and evicts one, which would add to a later load."""
    samples: dict[str, list[float]] = {"load (not loaded before)": [], "unload + load again": [], "unload": []}

    async def timed(label: str, *operations) -> None:
        start = time.perf_counter()
        for operation in operations:
            await operation()
        samples[label].append((time.perf_counter() - start) * 1000)

    for ref in refs:
        load, unload = partial(engine.load, ref), partial(engine.unload, ref)
        await timed("load (not loaded before)", load)
        await timed("unload + load again", unload, load)
        await timed("unload", unload)
    return samples


async def serving_benchmark(
    setup: Setup, args: argparse.Namespace
) -> tuple[dict[str, list[Measurement]], dict[str, list[float]], float]:
    """Throughput rounds, then load latencies, on one engine; also returns its start-up seconds."""
    start = time.perf_counter()
    # Started inside the running loop: AsyncLLM's output handler runs as a task of the loop that drives it.
    engine = ServingEngine.start(
        engine_settings(args), setup.model_path, setup.registry, setup.work / "zero-adapter", args.dtype
    )
    try:
        await engine.warm_up()
        for name in setup.served:
            await engine.load(name)
        startup = time.perf_counter() - start
        # An untimed batch of the measured size over the base and every adapter: first-use costs
        # (LoRA slots, kernels for new batch shapes) land here, not in the first variant measured.
        everyone = [None, *setup.served]
        warm_up_prompts = make_prompts(args.requests, setup.vocab_size, seed=1)
        await timed_batch(engine, warm_up_prompts, round_robin(everyone, args.requests), args.new_tokens, "warm-up")
        throughput = await throughput_rounds(engine, setup, args)
        latencies = await load_latencies(engine, setup.load_refs)
    finally:
        engine.shutdown()
    return throughput, latencies, startup


# ---- report -------------------------------------------------------------------------------------------


def median_batch(runs: list[Measurement]) -> Measurement:
    """A variant's batch with the median wall time over rounds (every batch has the same tokens)."""
    return Measurement(runs[0].tokens, statistics.median(run.seconds for run in runs))


def ratio_to_base(runs: list[Measurement], base_runs: list[Measurement]) -> float:
    """Median over rounds of the ratio within a round: both sides saw the same machine state."""
    return statistics.median(run.tokens_per_second / base.tokens_per_second for run, base in zip(runs, base_runs))


def throughput_table(results: dict[str, list[Measurement]], naive: Measurement, args: argparse.Namespace) -> str:
    rows = [
        "| traffic | requests | tokens | seconds | tokens/s | vs base-only | vs naive |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        batch = median_batch(runs)
        rows.append(
            f"| vLLM, {name} | {args.requests} | {batch.tokens} | {batch.seconds:.2f} | "
            f"{batch.tokens_per_second:.1f} | {ratio_to_base(runs, results[BASE_ONLY]):.2f}x | "
            f"{batch.tokens_per_second / naive.tokens_per_second:.2f}x |"
        )
    naive_vs_base = naive.tokens_per_second / median_batch(results[BASE_ONLY]).tokens_per_second
    rows.append(
        f"| naive: transformers+PEFT, set_adapter per request, base + {max(args.adapter_counts)} adapters | "
        f"{args.naive_requests} | {naive.tokens} | {naive.seconds:.2f} | {naive.tokens_per_second:.1f} | "
        f"{naive_vs_base:.2f}x | 1.00x |"
    )
    return "\n".join(rows)


def latency_table(samples: dict[str, list[float]]) -> str:
    rows = ["| adapter operation (idle engine) | count | p50 ms | p95 ms |", "|---|---|---|---|"]
    for label, values in samples.items():
        rows.append(f"| {label} | {len(values)} | {np.percentile(values, 50):.1f} | {np.percentile(values, 95):.1f} |")
    return "\n".join(rows)


def print_report(
    args: argparse.Namespace,
    device: str,
    throughput: dict[str, list[Measurement]],
    naive: Measurement,
    latencies: dict[str, list[float]],
    startup: float,
) -> None:
    print(
        f"\nDate: {date.today().isoformat()}. Model: {args.model} ({args.dtype}, {device}); adapters: rank {args.rank} "
        f"on {', '.join(LORA_TARGETS)}. Each request: a {'/'.join(map(str, PROMPT_LENGTHS))}-token prompt (cycled), "
        f"{args.new_tokens} greedy tokens; vLLM: {args.rounds} round(s), median seconds shown; engine start-up {startup:.0f}s.\n"
    )
    print(throughput_table(throughput, naive, args))
    print()
    print(latency_table(latencies))


# ---- main ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    full, quick = DEFAULTS["full"], DEFAULTS["quick"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=GEMMA3_270M_URI, help=f"base model: a HF folder, or {GEMMA3_270M_URI} (default)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="'auto': bfloat16 where the device runs it natively, else float32 (float16 on older GPUs)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: " + ", ".join(f"{k} {v}" for k, v in quick.items())
    )
    parser.add_argument(
        "--adapter-counts",
        default="1,2,4,8",
        type=lambda s: sorted({int(n) for n in s.split(",")}),
        help="N of the mixed-traffic variants (default 1,2,4,8)",
    )
    parser.add_argument("--rank", type=int, default=16, choices=[8, 16, 32, 64], help="LoRA rank (default 16)")
    parser.add_argument(
        "--requests", type=int, help=f"requests per variant, submitted at once (default {full['requests']})"
    )
    parser.add_argument("--new-tokens", type=int, help=f"tokens generated per request (default {full['new_tokens']})")
    parser.add_argument(
        "--rounds", type=int, help=f"runs of every vLLM variant; medians are shown (default {full['rounds']})"
    )
    parser.add_argument(
        "--naive-requests", type=int, help=f"requests of the naive baseline (default {full['naive_requests']})"
    )
    parser.add_argument(
        "--load-adapters", type=int, help=f"adapters the load test loads (default {full['load_adapters']})"
    )
    args = parser.parse_args()
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    counts = [*args.adapter_counts, *(getattr(args, key) for key in full)]
    if min(counts) < 1:
        parser.error("adapter counts, requests, tokens, rounds and adapters must be at least 1")
    return args


def prepare(args: argparse.Namespace, model_path: str, work: Path, dtype: torch.dtype) -> tuple[Setup, dict[str, Path]]:
    served = [f"mix-{i}" for i in range(max(args.adapter_counts))]
    load_refs = [f"load-{i:02d}" for i in range(args.load_adapters)]
    setup = Setup(model_path, text_vocab_size(model_path), work, served, load_refs)
    adapters = build_adapters(model_path, work / "adapters", served + load_refs, args.rank, dtype)
    publish_adapters(setup.registry, adapters, model_path, args.model)
    return setup, adapters


def start_engine_benchmark(args: argparse.Namespace) -> tuple[str, str]:
    """The base model's folder and the device; args.dtype resolved for it; the machine and command printed."""
    model_path = resolve_model_path(args.model)
    # The model is a local folder from here on: never wait on the hub. vLLM's INFO logs would bury the tables.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as finch serve runs its replicas
    import_vllm_engine()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype, _ = inference_dtype(args.dtype, detect_device(device == "cuda"))
    print(
        f"machine: {machine_description(('torch', 'vllm', 'transformers', 'peft'), device)}; "
        f"load average {load_average()} at start"
    )
    print(f"command: {command_line()}", flush=True)
    return model_path, device


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    model_path, device = start_engine_benchmark(args)
    dtype = getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory(prefix="finch-bench-serve-") as tmp:
        setup, adapters = prepare(args, model_path, Path(tmp), dtype)
        print(f"naive baseline: {args.naive_requests} requests, one at a time ...", flush=True)
        naive_prompts = make_prompts(args.naive_requests, setup.vocab_size, seed=0)
        naive_adapters = {name: adapters[name] for name in setup.served}
        naive = naive_throughput(model_path, naive_adapters, naive_prompts, args.new_tokens, dtype, device)
        print("vLLM: starting the engine ...", flush=True)
        throughput, latencies, startup = asyncio.run(serving_benchmark(setup, args))

    print_report(args, device, throughput, naive, latencies, startup)
    print(f"\nTotal time: {time.perf_counter() - started:.0f}s; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
