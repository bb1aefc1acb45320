"""The Ray Data pipeline: read -> normalize -> template -> tokenize+mask -> split -> pack.

Ray orchestration only: what one row becomes is data/examples.py. `prepare_datasets` runs the
pipeline and returns materialized datasets: training on a 2-core machine deadlocks if Ray Data
streams into train workers that hold every CPU (Ray Data's tasks then wait for a CPU that no
worker gives back), and materialized blocks also let every epoch reuse the work.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.data
from ray.data.expressions import col

from finch.config import PAIRWISE_OBJECTIVES, DataConfig
from finch.data.examples import SKIP_LABELS, ExampleSpec, describe_skipped, read_file_rows, tokenize_batch
from finch.data.packing import pack_examples
from finch.data.readers import DatasetError, check_readable
from finch.data.templates import resolve_template
from finch.models.source import ModelSource
from finch.models.tokenizer import load_tokenizer

logger = logging.getLogger("finch.data")

PACK_GROUP_EXAMPLES = 2048  # examples packed together; larger groups fill rows better
# Rows per tokenization task: a file is read as one block, and one block is one task; smaller
# blocks let every CPU tokenize (bench/data.py).
TOKENIZE_BLOCK_ROWS = 1024
SKIP_REASONS_LOGGED = 5  # the first reasons quoted in the warning about skipped rows


@dataclass
class PreparedData:
    train: ray.data.Dataset | None  # None for GRPO, which trains on `prompts`
    eval: ray.data.Dataset | None
    template: str
    stats: dict[str, Any]
    prompts: list[dict[str, Any]] | None = None  # GRPO's prompt rows (rl/prompts.py)


def prepare_datasets(data: DataConfig, model: ModelSource, objective: str = "sft") -> PreparedData:
    """`model` brings the tokenizer: Ray Data's tasks find it on their own nodes."""
    tokenizer = load_tokenizer(model.folder)
    spec = ExampleSpec(data, model, resolve_template(data.template, tokenizer), objective)
    examples, skipped = tokenize_files(data.train_files, spec)
    stats = example_stats(examples, data.max_length) | skipped
    examples = _with_answers(examples, data.train_files)
    eval_examples = None
    if data.eval_files:
        eval_examples = _with_answers(tokenize_files(data.eval_files, spec)[0], data.eval_files)
    elif data.eval_fraction:
        examples, eval_examples = hold_out(examples, data, by_document=objective == "pretrain")
    train = to_rows(examples, spec, tokenizer.pad_token_id)
    stats.update(row_stats(train, data.max_length))
    if eval_examples is not None:
        stats["eval_examples"] = eval_examples.count()
        eval_examples = to_rows(eval_examples, spec, tokenizer.pad_token_id)
    return PreparedData(train=train, eval=eval_examples, template=spec.template, stats=stats)


def tokenize_files(files: list[str], spec: ExampleSpec) -> tuple[ray.data.Dataset, dict[str, int]]:
    """The files' examples, and the counts of rows skipped (stats keys skipped_bad_rows, skipped_overlong)."""
    for path in files:
        check_readable(path)
    records = ray.data.from_items([{"path": path} for path in files]).flat_map(read_file_rows)
    records = records.repartition(target_num_rows_per_block=TOKENIZE_BLOCK_ROWS)
    examples = records.map_batches(tokenize_batch, batch_format="pandas", fn_kwargs={"spec": spec})
    examples = raise_dataset_errors(examples.materialize)
    skipped = count_skipped(examples, files)
    examples = examples.filter(expr=col("skipped") == "").materialize()
    if examples.count() == 0:
        why = "the files hold no rows"
        if any(skipped.values()):
            why = f"every row was skipped ({describe_skipped(skipped)})"
        raise DatasetError(f"no examples in {', '.join(files)}: {why}")
    return examples, skipped


def count_skipped(examples: ray.data.Dataset, files: list[str]) -> dict[str, int]:
    """Rows skipped per kind; a warning quotes the first reasons, so the user can find those rows."""
    skipped = examples.filter(expr=col("skipped") != "").select_columns(["skipped", "skip_reason"]).materialize()
    counts = {f"skipped_{kind}": 0 for kind in SKIP_LABELS}
    if skipped.count() == 0:  # (Ray's groupby of no rows has no columns)
        return counts
    for group in skipped.groupby("skipped").count().iter_rows():
        counts[f"skipped_{group['skipped']}"] = group["count()"]
    logger.warning(
        "finch: skipped %s in %s (data.bad_rows / data.overlong: skip); the first: %s",
        describe_skipped(counts),
        ", ".join(files),
        "; ".join(row["skip_reason"] for row in skipped.take(SKIP_REASONS_LOGGED)),
    )
    return counts


def hold_out(
    examples: ray.data.Dataset, data: DataConfig, by_document: bool
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Split off data.eval_fraction for eval. Pre-training chunks of one document stay on one
    side (by_document), or eval would score text the model trained on."""
    if not by_document:
        return examples.train_test_split(test_size=data.eval_fraction, shuffle=True, seed=data.seed)
    documents = sorted(examples.unique("source"))
    if len(documents) < 2:
        raise DatasetError("data.eval_fraction needs at least 2 documents to hold some out; set data.eval_files")
    count = min(len(documents) - 1, max(1, round(len(documents) * data.eval_fraction)))
    held_out = random.Random(data.seed).sample(documents, count)
    eval_examples = examples.filter(expr=col("source").is_in(held_out)).materialize()
    return examples.filter(expr=col("source").not_in(held_out)).materialize(), eval_examples


def _with_answers(examples: ray.data.Dataset, files: list[str]) -> ray.data.Dataset:
    """Drop examples whose answer was truncated away entirely: they carry no loss."""
    kept = examples.filter(expr=col("trainable") > 0).materialize()
    if kept.count() == 0:
        raise DatasetError(f"no example in {', '.join(files)} keeps an answer token within data.max_length")
    return kept


def to_rows(examples: ray.data.Dataset, spec: ExampleSpec, pad_id: int) -> ray.data.Dataset:
    """Training rows: packed to max_length, or one example (or preference pair) per row, padded later per batch."""
    if spec.objective in PAIRWISE_OBJECTIVES or not spec.data.packing:
        return examples.select_columns(spec.columns).materialize()
    return examples.map_batches(
        _pack_batch,
        batch_size=PACK_GROUP_EXAMPLES,
        batch_format="pandas",
        fn_kwargs={"max_length": spec.data.max_length, "pad_id": pad_id},
    ).materialize()


def example_stats(examples: ray.data.Dataset, max_length: int) -> dict[str, Any]:
    """Counts and the length distribution, summed from one summary per block as they stream to
    the driver, which never holds a column of the dataset."""
    summaries = examples.select_columns(["length", "truncated", "trainable"]).map_batches(
        _block_summary, batch_format="numpy", batch_size=None
    )
    histogram = np.zeros(max_length + 1, dtype=np.int64)
    totals = {"trainable_tokens": 0, "truncated": 0, "dropped_no_answer": 0}
    for summary in summaries.iter_rows():
        counts = np.asarray(summary["histogram"], dtype=np.int64)
        if len(counts) > len(histogram):
            histogram = np.pad(histogram, (0, len(counts) - len(histogram)))
        histogram[: len(counts)] += counts
        totals = {key: total + int(summary[key]) for key, total in totals.items()}
    lengths = np.flatnonzero(histogram)
    examples_count = int(histogram.sum())
    tokens = int(histogram @ np.arange(len(histogram)))
    return {
        "examples": examples_count,
        "tokens": tokens,
        **totals,
        "length_min": int(lengths.min()),
        "length_mean": tokens / examples_count,
        "length_p50": histogram_quantile(histogram, 0.5),
        "length_p95": histogram_quantile(histogram, 0.95),
        "length_max": int(lengths.max()),
        "max_length": max_length,
        "length_histogram": histogram[: lengths.max() + 1].tolist(),
    }


def _block_summary(batch: dict[str, np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "histogram": [np.bincount(batch["length"].astype(np.int64)).tolist()],
            "trainable_tokens": [int(batch["trainable"].sum())],
            "truncated": [int(batch["truncated"].sum())],
            "dropped_no_answer": [int((batch["trainable"] == 0).sum())],
        }
    )


def histogram_quantile(histogram: np.ndarray, q: float) -> float:
    """The q-quantile of the values a histogram counts (histogram[v] = how often v occurs), with
    linear interpolation between neighbours as pandas and numpy compute it."""
    cumulative = np.cumsum(histogram)
    position = q * (cumulative[-1] - 1)
    below = int(np.floor(position))

    def nth(index: int) -> int:  # the index-th smallest value
        return int(np.searchsorted(cumulative, index, side="right"))

    fraction = position - below
    return float(nth(below) + fraction * (nth(below + 1) - nth(below))) if fraction else float(nth(below))


def row_stats(rows: ray.data.Dataset, max_length: int) -> dict[str, Any]:
    """Rows and the share of their slots holding real tokens (packing efficiency)."""
    count = rows.count()
    if "num_tokens" not in rows.columns():
        return {"rows": count, "packing_efficiency": None}
    return {"rows": count, "packing_efficiency": rows.sum("num_tokens") / (count * max_length)}


def raise_dataset_errors(action):
    """Run a Ray Data action; a DatasetError from inside a task is re-raised without Ray's
    wrapping, so users read 'file:line: field ...' rather than a remote stack trace."""
    try:
        return action()
    except DatasetError as err:
        # Ray appends retry advice on further lines; finch's messages are one line.
        raise DatasetError(str(getattr(err, "cause", err)).splitlines()[0]) from None


def _pack_batch(batch: pd.DataFrame, max_length: int, pad_id: int) -> pd.DataFrame:
    rows = pack_examples([list(x) for x in batch["input_ids"]], [list(x) for x in batch["labels"]], max_length, pad_id)
    return pd.DataFrame(rows)
