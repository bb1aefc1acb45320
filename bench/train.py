"""Training throughput and memory: `finch train` against plain TRL `SFTTrainer`, same model, data and
hyperparameters, measured in one run.

Both sides train one epoch over the same examples: the first --examples rows of gsm8k (OpenAI
messages, ../shared/data), rendered and tokenized by finch (Alpaca template for the quickstart's
Gemma 3 270M; loss on the answers only). TRL receives finch's token ids and labels as a
pre-tokenized dataset, so both sides compute the same loss over the same tokens; its
`TrainingArguments` are built by finch's own mapping from the same run config (learning rate,
batch size, schedule, clipping, seed), with plain `AutoModelForCausalLM` + `peft_config` as a TRL
user writes it. Mid-run checkpoints are off on both sides.

Variants: LoRA (rank --rank on all linear layers) and full fine-tuning; finch as it runs by
default (Ray Data packing, Ray Train) with 1 and 2 workers (2 workers: half the per-worker batch,
the same global batch); TRL in one process without packing (each batch padded to its longest
example) and with packing (its best-fit-decreasing, padding-free packing). Every variant runs in
its own process.

- useful tokens/s = the epoch's non-pad tokens (the same number for every variant) / the training
  loop's time (HF Trainer's `train_runtime`, which both sides report);
- end to end = the same tokens / the whole command's wall time (model load, data, for finch Ray's
  start, worker start-up and registering the result too);
- peak memory = the largest sum of proportional set sizes (PSS: resident memory, pages shared
  between processes split among them) over the command's process tree, sampled every 0.5 s (for
  finch: the driver, Ray's own processes and the training workers);
- Ray start = `ray.init()` of a local cluster, timed apart in a process of its own.

On CPU read the ratios, not the seconds.

    .venv/bin/python bench/train.py [--quick] [--examples 32] [--max-length 512] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import psutil
import yaml
from machine import command_line, load_average, machine_description

from finch.config import validate_config
from finch.models.gemma_gguf import GEMMA3_270M_URI
from finch.models.source import resolve_model_path
from finch.registry.store import resolve_entry

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "sft" / "gsm8k_chat_train.jsonl"
FINCH = str(Path(sys.executable).with_name("finch"))
DEFAULTS = {"full": {"examples": 32, "max_length": 512}, "quick": {"examples": 12, "max_length": 256}}


@dataclass
class Result:
    variant: str
    method: str
    train_seconds: float
    wall_seconds: float
    memory: Memory
    train_loss: float
    steps: int


def run_config(args: argparse.Namespace, work: Path, method: str, workers: int) -> dict:
    """The finch run config of a variant; TRL's arguments come from the same dict."""
    config = {
        "name": f"{method}-{workers}w",
        "output_dir": str(work / "runs"),
        "registry_dir": str(work / "registry"),
        # full fine-tuning keeps fp32 master weights (finch refuses 16-bit ones) and autocasts to bf16
        "model": {"path": args.model, "dtype": "bfloat16" if method == "lora" else "float32"},
        "data": {
            "train_files": [str(work / "train.jsonl")],
            "template": "alpaca",
            "max_length": args.max_length,
            "packing": True,
        },
        "train": {
            "method": method,
            "lr": 1e-4 if method == "lora" else 1e-5,
            "epochs": 1,
            "batch_size": args.batch_size // workers,
            "scheduler": "constant",
            "save_steps": 10**6,
            "logging_steps": 1,
            "mixed_precision": "no" if method == "lora" else "bf16",
        },
        "scale": {"num_workers": workers},
    }
    if method == "lora":
        config["lora"] = {"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.0, "target_modules": "all-linear"}
    return config


# ---- measuring a command ------------------------------------------------------------------------


@dataclass
class Memory:
    """Peak PSS of a process tree: in all, of its largest process, and per process at the peak;
    and the peak RSS of its root process."""

    total: int = 0
    largest_process: int = 0
    at_peak: dict[str, int] | None = None
    root_rss: int = 0

    def sample(self, processes: list[psutil.Process]) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            self.root_rss = max(self.root_rss, processes[0].memory_info().rss)
        sizes = {}
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                sizes[f"{process.pid} {process.name()}"] = process.memory_full_info().pss
        if sizes:
            self.largest_process = max(self.largest_process, *sizes.values())
        if sum(sizes.values()) > self.total:
            self.total, self.at_peak = sum(sizes.values()), sizes

    def breakdown(self) -> str:
        largest = sorted((self.at_peak or {}).items(), key=lambda item: -item[1])[:6]
        return ", ".join(f"{name} {size / 2**30:.2f}" for name, size in largest)


def run_measured(command: list[str], log: Path) -> tuple[float, Memory]:
    """Run `command` to the end; its wall seconds and the peak memory of its process tree."""
    started = time.perf_counter()
    memory = Memory()
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        sampler = threading.Thread(target=sample_memory, args=(process, memory), daemon=True)
        sampler.start()
        code = process.wait()
        sampler.join()
    if code != 0:
        raise SystemExit(
            f"{' '.join(command[:3])} ... failed (exit {code}); its output: {log}\n{log.read_text()[-3000:]}"
        )
    return time.perf_counter() - started, memory


def sample_memory(process: subprocess.Popen, memory: Memory) -> None:
    root = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            memory.sample([root, *root.children(recursive=True)])
        except psutil.NoSuchProcess:
            return
        time.sleep(0.5)


# ---- the two sides ------------------------------------------------------------------------------


def finch_variant(args: argparse.Namespace, work: Path, method: str, workers: int) -> Result:
    config = run_config(args, work, method, workers)
    path = work / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    wall, memory = run_measured([FINCH, "train", str(path), "--overwrite"], work / f"{config['name']}.log")
    metrics = resolve_entry(config["registry_dir"], config["name"]).manifest["metrics"]
    return Result(
        f"finch, {method}, {workers} worker{'s' * (workers > 1)} (packed)",
        method,
        metrics["train_runtime"],
        wall,
        memory,
        metrics["train_loss"],
        int(metrics["step"]),
    )


def trl_variant(args: argparse.Namespace, work: Path, method: str, packing: bool) -> Result:
    spec = {
        "config": run_config(args, work, method, 1),
        "packing": packing,
        "examples": str(work / "tokenized.json"),
        "metrics": str(work / f"trl-{method}-{packing}.json"),
    }
    spec_path = work / f"trl-{method}-{packing}.spec.json"
    spec_path.write_text(json.dumps(spec))
    wall, memory = run_measured(
        [sys.executable, __file__, "--trl-worker", str(spec_path)], work / f"trl-{method}-{packing}.log"
    )
    metrics = json.loads(Path(spec["metrics"]).read_text())
    packed = "packed (bfd, padding-free)" if packing else "padded to longest"
    return Result(
        f"TRL SFTTrainer, {method}, {packed}",
        method,
        metrics["train_runtime"],
        wall,
        memory,
        metrics["train_loss"],
        metrics["steps"],
    )


def trl_worker(spec_path: str) -> None:
    """One TRL run (in a process of its own): plain transformers model + peft_config + SFTConfig."""
    import peft
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from finch.train.arguments import hf_arguments

    spec = json.loads(Path(spec_path).read_text())
    config = validate_config(spec["config"])
    folder = resolve_model_path(config.model.path)
    with tempfile.TemporaryDirectory() as output_dir:
        arguments = hf_arguments(config, output_dir) | {"save_strategy": "no"}
        # finch's arguments already say no autocast (bf16=False) and no gradient checkpointing,
        # where SFTConfig's own defaults differ
        sft_config = SFTConfig(**arguments, max_length=config.data.max_length, packing=spec["packing"])
        lora = config.lora
        peft_config = (
            None
            if config.train.method == "full"
            else peft.LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            )
        )
        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, config.model.dtype)),
            args=sft_config,
            train_dataset=Dataset.from_list(json.loads(Path(spec["examples"]).read_text())),
            processing_class=AutoTokenizer.from_pretrained(folder),
            peft_config=peft_config,
        )
        output = trainer.train()
    Path(spec["metrics"]).write_text(json.dumps({**output.metrics, "steps": output.global_step}))


def tokenized_examples(config: dict) -> list[dict]:
    """finch's token ids and labels of the training file, answerless examples dropped as finch does."""
    import pandas as pd

    from finch.data.examples import ExampleSpec, tokenize_batch
    from finch.data.readers import iter_records
    from finch.models.source import resolve_model_source

    run = validate_config(config)
    data = run.data
    rows = pd.DataFrame(
        [{"source": source, "record": json.dumps(record)} for source, record in iter_records(data.train_files[0])]
    )
    frame = tokenize_batch(rows, ExampleSpec(data, resolve_model_source(run.model), data.template))
    return [
        {"input_ids": list(ids), "labels": list(labels)}
        for ids, labels, trainable in zip(frame["input_ids"], frame["labels"], frame["trainable"])
        if trainable > 0
    ]


def ray_start_seconds() -> float:
    code = "import time; t = time.perf_counter(); from finch.runtime import init_ray; init_ray(); print(time.perf_counter() - t)"
    return float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]
    )


# ---- report -------------------------------------------------------------------------------------


def table(results: list[Result], tokens: int, baselines: dict[str, Result]) -> str:
    rows = [
        "| variant | steps | train loss | train loop s | useful tokens/s | vs TRL padded | vs TRL packed "
        "| end to end s | end-to-end tokens/s | peak memory GiB: all processes | largest process |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        speed = tokens / result.train_seconds
        ratios = [
            baselines[f"{result.method}-{packing}"].train_seconds / result.train_seconds for packing in (False, True)
        ]
        rows.append(
            f"| {result.variant} | {result.steps} | {result.train_loss:.3f} | {result.train_seconds:.1f} | {speed:.0f} | "
            f"{ratios[0]:.2f}x | {ratios[1]:.2f}x | {result.wall_seconds:.0f} | {tokens / result.wall_seconds:.0f} | "
            f"{result.memory.total / 2**30:.2f} | {result.memory.largest_process / 2**30:.2f} |"
        )
    return "\n".join(rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=GEMMA3_270M_URI, help=f"a HF folder, or {GEMMA3_270M_URI} (default)")
    parser.add_argument("--quick", action="store_true", help="smoke run: " + json.dumps(DEFAULTS["quick"]))
    parser.add_argument("--examples", type=int, help=f"gsm8k rows trained on (default {DEFAULTS['full']['examples']})")
    parser.add_argument(
        "--max-length", type=int, help=f"tokens per example and packed row (default {DEFAULTS['full']['max_length']})"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="global batch size, rows per step (default 4)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--methods", default="lora,full", help="lora, full or both (default lora,full)")
    parser.add_argument("--workers", default="1,2", help="finch worker counts (default 1,2)")
    args = parser.parse_args()
    for key, value in DEFAULTS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.methods = args.methods.split(",")
    args.workers = [int(n) for n in args.workers.split(",")]
    if args.batch_size % max(args.workers):
        parser.error("--batch-size must divide by every worker count (the global batch stays the same)")
    return args


def main() -> None:
    args = parse_args()
    if args.trl_worker:
        return trl_worker(args.trl_worker)
    if not GSM8K.exists():
        raise SystemExit(f"bench/train.py trains on {GSM8K} (../shared/data); it is missing")
    started = time.perf_counter()
    print(
        f"machine: {machine_description(('torch', 'ray', 'transformers', 'peft', 'trl'))}; load average {load_average()}"
    )
    print(f"command: {command_line()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="finch-bench-train-"))
    try:
        lines = GSM8K.read_text().splitlines()[: args.examples]
        (work / "train.jsonl").write_text("\n".join(lines) + "\n")
        examples = tokenized_examples(run_config(args, work, "lora", 1))
        (work / "tokenized.json").write_text(json.dumps(examples))
        tokens = sum(len(example["input_ids"]) for example in examples)
        print(
            f"\nDate: {date.today().isoformat()}. Model: {args.model}. Data: the first {args.examples} rows of "
            f"{GSM8K.name}, {len(examples)} examples, {tokens} tokens (one epoch), max_length {args.max_length}, global "
            f"batch {args.batch_size}, constant lr. LoRA: rank {args.rank} on all linear layers, bf16 weights, lr 1e-4. "
            f"Full: fp32 weights with bf16 autocast, lr 1e-5. Ray start (ray.init, local cluster) alone: "
            f"{ray_start_seconds():.1f}s.",
            flush=True,
        )
        for method in args.methods:  # a table per method, printed as soon as it is measured
            baselines, results = {}, []
            for packing in (False, True):
                baselines[f"{method}-{packing}"] = trl_variant(args, work, method, packing)
            failed = []
            for workers in args.workers:
                try:
                    results.append(finch_variant(args, work, method, workers))
                except SystemExit as err:  # e.g. out of memory: the other variants still count
                    failed.append(f"finch, {method}, {workers} workers failed: {str(err).splitlines()[0]}")
            print(f"\n{table(list(baselines.values()) + results, tokens, baselines)}\n")
            print("\n".join(failed))
            for result in (*baselines.values(), *results):
                print(f"memory at the peak of {result.variant} (GiB): {result.memory.breakdown()}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nTotal time: {time.perf_counter() - started:.0f}s; load average {load_average()} at the end")


if __name__ == "__main__":
    main()
