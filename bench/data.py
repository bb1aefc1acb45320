"""Data pipeline: Ray Data tokenize+pack throughput against `datasets.map`, and packing efficiency.

Measured in one run on the SFT sets in ../shared/data (Alpaca JSON, OpenAI-messages JSONL,
ShareGPT tool calls, raw-text Parquet) with the tokenizer of the model the benchmark names
(default: the quickstart's Gemma 3 270M, Alpaca template):

1. Throughput. The four sets, each repeated --repeat times (copies in a temporary folder), through
   - finch: `prepare_datasets`, what `finch train` runs (Ray Data on a local cluster: read,
     normalize, template, tokenize with loss masks, drop answerless examples, pack, materialize);
   - the baseline: the same reader, the same per-row work (finch's normalize/template/tokenize
     function) and the same packing, run by Hugging Face `datasets` in this one process:
     `Dataset.from_list(records).map(batched=True)`, then `.filter`, then a batched `.map` packing
     groups of the same size.
   tokens/s counts example tokens (after truncation). finch runs twice: the first run also starts
   Ray Data's worker processes and loads the tokenizer in each; Ray's own start (`ray.init`) is
   timed apart. Both sides must keep the same tokens (their rows may differ a little: Ray Data
   groups examples for packing by blocks).
2. Packing efficiency: real tokens / row slots of each set (not repeated) at max_length
   512/1024/2048: finch's packing (best-fit decreasing, `prepare_datasets`), against padding each
   batch to its longest example (what `packing: false` does; batches of --batch-size examples in
   shuffled order) and padding every example to max_length; "bound" is the best any packing can
   do, the set's tokens in as few rows as could hold them. Goal: >= 0.97 with packing.

    .venv/bin/python bench/data.py [--model FOLDER|pypi://...] [--repeat 10] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pandas as pd
import ray
from machine import command_line, load_average, machine_description

from finch.config import DataConfig, ModelConfig
from finch.data.examples import ExampleSpec, tokenize_batch
from finch.data.packing import pack_examples
from finch.data.pipeline import prepare_datasets
from finch.data.readers import iter_records
from finch.data.templates import resolve_template
from finch.models.gemma_gguf import GEMMA3_270M_URI
from finch.models.source import ModelSource, resolve_model_source
from finch.models.tokenizer import load_tokenizer
from finch.runtime import init_ray

SHARED_SFT = Path(__file__).resolve().parents[2] / "shared" / "data" / "sft"
SETS = ("identity.json", "gsm8k_chat_train.jsonl", "glaive_toolcall_en_demo.json", "guanaco-llama2-1k.train.parquet")
MAX_LENGTHS = (512, 1024, 2048)
PACK_GROUP_EXAMPLES = 2048  # as finch's pipeline packs


@dataclass
class Run:
    seconds: float
    tokens: int
    rows: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def sft_files() -> list[Path]:
    files = [SHARED_SFT / name for name in SETS]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise SystemExit(f"bench/data.py reads the SFT sets in ../shared/data/sft; missing: {', '.join(missing)}")
    return files


def repeated_copies(files: list[Path], repeat: int, folder: Path) -> list[str]:
    """Each set as one JSONL file holding its rows `repeat` times (one reader path for all formats)."""
    copies = []
    for path in files:
        rows = [json.dumps(record, default=str) for _, record in iter_records(str(path))]
        copy = folder / f"{path.stem}-x{repeat}.jsonl"
        copy.write_text("\n".join(rows * repeat) + "\n")
        copies.append(str(copy))
    return copies


def finch_run(files: list[str], max_length: int, model: ModelSource) -> tuple[Run, float]:
    """The run and its packing efficiency."""
    started = time.perf_counter()
    stats = prepare_datasets(DataConfig(train_files=files, max_length=max_length), model).stats
    seconds = time.perf_counter() - started
    tokens = round(stats["packing_efficiency"] * stats["rows"] * max_length)  # the tokens of the kept examples
    return Run(seconds, tokens, stats["rows"]), stats["packing_efficiency"]


def datasets_run(files: list[str], max_length: int, model: ModelSource) -> tuple[Run, list[int]]:
    """The same work as finch_run's, executed by `datasets` in this process; the run and the
    lengths of the examples kept."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    data = DataConfig(train_files=files, max_length=max_length)
    started = time.perf_counter()
    tokenizer = load_tokenizer(model.folder)
    template = resolve_template(data.template, tokenizer)
    records = [
        {"source": source, "record": json.dumps(record, default=str)}
        for path in files
        for source, record in iter_records(path)
    ]

    def tokenize(batch: dict) -> dict:
        rows = pd.DataFrame({"source": batch["source"], "record": batch["record"]})
        frame = tokenize_batch(rows, ExampleSpec(data, model, template))
        return frame.to_dict("list")

    def pack(batch: dict) -> dict:
        return pack_examples(batch["input_ids"], batch["labels"], max_length, tokenizer.pad_token_id)

    examples = Dataset.from_list(records).map(tokenize, batched=True, remove_columns=["source", "record"])
    examples = examples.filter(lambda trainable: trainable > 0, input_columns="trainable")
    lengths = examples["length"]
    rows = examples.map(pack, batched=True, batch_size=PACK_GROUP_EXAMPLES, remove_columns=examples.column_names)
    return Run(time.perf_counter() - started, sum(lengths), len(rows)), lengths


def check_same_tokens(finch: Run, baseline_tokens: int) -> None:
    if finch.tokens != baseline_tokens:
        raise SystemExit(
            f"finch kept {finch.tokens} tokens, the datasets baseline {baseline_tokens}: not the same work"
        )


def padded_efficiency(lengths: list[int], batch_size: int, seed: int = 0) -> float:
    """Real tokens / slots when each batch (shuffled order) is padded to its longest example."""
    order = lengths[:]
    random.Random(seed).shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(order) / sum(max(batch) * len(batch) for batch in batches)


def throughput_table(finch_cold: Run, finch_warm: Run, baseline: Run, ray_start: float) -> str:
    rows = ["| pipeline | seconds | example tokens | rows | tokens/s | vs datasets.map |", "|---|---|---|---|---|---|"]
    for name, run in (
        ("datasets.map(batched=True), 1 process", baseline),
        ("finch (Ray Data), first run: starts workers, loads tokenizers", finch_cold),
        ("finch (Ray Data), second run", finch_warm),
    ):
        rows.append(
            f"| {name} | {run.seconds:.2f} | {run.tokens} | {run.rows} | {run.tokens_per_second:,.0f} | "
            f"{run.tokens_per_second / baseline.tokens_per_second:.2f}x |"
        )
    rows.append(f"| Ray start (`ray.init`, local cluster), not in the rows above | {ray_start:.2f} | | | | |")
    return "\n".join(rows)


def packing_table(files: list[Path], model: ModelSource, batch_size: int) -> str:
    rows = [
        f"| set | examples | max_length | finch packing | bound | pad to longest (batch {batch_size}) | pad to max_length |",
        "|---|---|---|---|---|---|---|",
    ]
    totals: dict[int, list[float]] = {
        length: [0, 0, 0, 0] for length in MAX_LENGTHS
    }  # tokens, packed/longest/max slots
    for path in files:
        for max_length in MAX_LENGTHS:
            finch, packed = finch_run([str(path)], max_length, model)
            _, lengths = datasets_run([str(path)], max_length, model)
            check_same_tokens(finch, sum(lengths))
            longest = padded_efficiency(lengths, batch_size)
            to_max = sum(lengths) / (len(lengths) * max_length)
            bound = sum(lengths) / (math.ceil(sum(lengths) / max_length) * max_length)
            rows.append(
                f"| {path.name} | {len(lengths)} | {max_length} | {packed:.3f} | {bound:.3f} | {longest:.3f} | {to_max:.3f} |"
            )
            total = totals[max_length]
            total[0] += sum(lengths)
            for i, efficiency in enumerate((packed, longest, to_max), start=1):
                total[i] += sum(lengths) / efficiency
    for max_length, (tokens, *slots) in totals.items():
        packed, longest, to_max = (f"{tokens / s:.3f}" for s in slots)
        rows.append(f"| all four sets (token-weighted) | | {max_length} | {packed} | | {longest} | {to_max} |")
    return "\n".join(rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=GEMMA3_270M_URI, help=f"whose tokenizer: a HF folder, or {GEMMA3_270M_URI} (default)"
    )
    parser.add_argument("--repeat", type=int, default=10, help="copies of each set in the throughput run (default 10)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="batch size of the pad-to-longest comparison (default 8)"
    )
    parser.add_argument(
        "--throughput-length", type=int, default=1024, help="max_length of the throughput run (default 1024)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    files = sft_files()
    model = resolve_model_source(ModelConfig(path=args.model))
    print(
        f"machine: {machine_description(('ray', 'datasets', 'transformers', 'tokenizers'))}; load average {load_average()}"
    )
    print(f"command: {command_line()}", flush=True)
    started = time.perf_counter()
    init_ray()
    ray_start = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="finch-bench-data-") as folder:
        copies = repeated_copies(files, args.repeat, Path(folder))
        baseline, _ = datasets_run(copies, args.throughput_length, model)
        finch_cold, _ = finch_run(copies, args.throughput_length, model)
        finch_warm, _ = finch_run(copies, args.throughput_length, model)
    for run in (finch_cold, finch_warm):
        check_same_tokens(run, baseline.tokens)
    packing = packing_table(files, model, args.batch_size)
    ray.shutdown()
    print(
        f"\nDate: {date.today().isoformat()}. Tokenizer: {args.model}. Throughput: the four sets x {args.repeat}, "
        f"max_length {args.throughput_length}, packed.\n"
    )
    print(throughput_table(finch_cold, finch_warm, baseline, ray_start))
    print()
    print(packing)
    print(f"\nTotal time: {time.perf_counter() - started:.0f}s; load average {load_average()} at the end")


if __name__ == "__main__":
    main()
