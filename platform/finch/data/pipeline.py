"""The Ray Data pipeline: read -> normalize -> template -> tokenize+mask -> split -> pack.

`prepare_datasets` runs it and returns materialized datasets: training on a 2-core machine
deadlocks if Ray Data streams into train workers that hold every CPU (DESIGN.md), and
materialized blocks also let every epoch reuse the work.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.data
from ray.data.expressions import col

from finch.config import DataConfig
from finch.data.formats import kind_of, normalize
from finch.data.packing import pack_examples
from finch.data.readers import DatasetError, check_readable, iter_records
from finch.data.templates import resolve_template
from finch.data.tokenization import (
    IGNORE_INDEX,
    PreferenceExample,
    TokenizedExample,
    tokenize_preference,
    tokenize_sample,
    tokenize_text_chunks,
)
from finch.models.source import ModelSource
from finch.models.tokenizer import load_tokenizer

logger = logging.getLogger("finch.data")

PACK_GROUP_EXAMPLES = 2048  # examples packed together; larger groups fill rows better
# Rows per tokenization task: a file is read as one block, and one block is one task; smaller
# blocks let every CPU tokenize (bench/data.py).
TOKENIZE_BLOCK_ROWS = 1024
# The sample kinds (formats.kind_of) each training objective can use.
OBJECTIVE_KINDS = {"sft": ("conversation", "text"), "pretrain": ("text",), "dpo": ("preference",)}
# skipped: "" for a kept example, else a SKIP_LABELS key; skip_reason: "file:line: problem".
STAT_COLUMNS = ["length", "truncated", "trainable", "source", "skipped", "skip_reason"]
# Rows dropped because data.bad_rows / data.overlong say 'skip', keyed by that setting's name.
SKIP_LABELS = {"bad_rows": "bad rows", "overlong": "over-long examples"}
SKIP_REASONS_LOGGED = 5
ROW_COLUMNS = {
    "sft": ["input_ids", "labels"],
    "pretrain": ["input_ids", "labels"],
    "dpo": ["prompt_ids", "chosen_ids", "rejected_ids"],
}


class OverlongExample(DatasetError):
    """An example longer than data.max_length while data.overlong is 'skip' or 'error'."""


@dataclass
class PreparedData:
    train: ray.data.Dataset
    eval: ray.data.Dataset | None
    template: str
    stats: dict[str, Any]


def prepare_datasets(data: DataConfig, model: ModelSource, objective: str = "sft") -> PreparedData:
    """`model` brings the tokenizer: Ray Data's tasks find it on their own nodes."""
    template = resolve_template(data.template, load_tokenizer(model.folder))
    tokenize = functools.partial(tokenize_files, data=data, model=model, template=template, objective=objective)
    examples, skipped = tokenize(data.train_files)
    stats = example_stats(examples, data.max_length) | skipped
    examples = _with_answers(examples, data.train_files)
    eval_examples = None
    if data.eval_files:
        eval_examples = _with_answers(tokenize(data.eval_files)[0], data.eval_files)
    elif data.eval_fraction:
        examples, eval_examples = hold_out(examples, data, by_document=objective == "pretrain")
    pad_id = load_tokenizer(model.folder).pad_token_id
    train = to_rows(examples, data, pad_id, objective)
    stats.update(row_stats(train, data.max_length))
    if eval_examples is not None:
        stats["eval_examples"] = eval_examples.count()
        eval_examples = to_rows(eval_examples, data, pad_id, objective)
    return PreparedData(train=train, eval=eval_examples, template=template, stats=stats)


def tokenize_files(
    files: list[str], data: DataConfig, model: ModelSource, template: str, objective: str = "sft"
) -> tuple[ray.data.Dataset, dict[str, int]]:
    """The files' examples, and the counts of rows skipped (stats keys skipped_bad_rows, skipped_overlong)."""
    for path in files:
        check_readable(path)
    records = ray.data.from_items([{"path": path} for path in files]).flat_map(read_file_rows)
    records = records.repartition(target_num_rows_per_block=TOKENIZE_BLOCK_ROWS)
    examples = records.map_batches(
        tokenize_batch,
        batch_format="pandas",
        fn_kwargs={"data": data, "model": model, "template": template, "objective": objective},
    )
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


def describe_skipped(stats: dict[str, Any]) -> str:
    """'2 bad rows, 1 over-long examples' from the skipped_* counts; '' when nothing was skipped."""
    return ", ".join(
        f"{stats[f'skipped_{kind}']} {label}" for kind, label in SKIP_LABELS.items() if stats.get(f"skipped_{kind}")
    )


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


def to_rows(examples: ray.data.Dataset, data: DataConfig, pad_id: int, objective: str = "sft") -> ray.data.Dataset:
    """Training rows: packed to max_length, or one example (or preference pair) per row, padded later per batch."""
    if objective == "dpo" or not data.packing:
        return examples.select_columns(ROW_COLUMNS[objective]).materialize()
    return examples.map_batches(
        _pack_batch,
        batch_size=PACK_GROUP_EXAMPLES,
        batch_format="pandas",
        fn_kwargs={"max_length": data.max_length, "pad_id": pad_id},
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


def read_file_rows(item: dict[str, Any]) -> list[dict[str, str]]:
    """One file's rows as the pipeline carries them: {"source": "file:line", "record": JSON text}."""
    # JSON text, because rows from different formats have different nested shapes, which one
    # Arrow schema cannot hold. A row the reader cannot parse travels as its error message (a
    # JSON string, where records are objects), so that tokenize_batch applies data.bad_rows to
    # it like to any other bad row, in file order.
    return [
        {
            "source": source,
            "record": json.dumps(str(record) if isinstance(record, DatasetError) else record, default=str),
        }
        for source, record in iter_records(item["path"], mark_bad_rows=True)
    ]


def tokenize_batch(
    batch: pd.DataFrame, data: DataConfig, model: ModelSource, template: str, objective: str
) -> pd.DataFrame:
    tokenizer = load_tokenizer(model.here())
    out: dict[str, list] = {column: [] for column in ROW_COLUMNS[objective] + STAT_COLUMNS}
    for source, record in zip(batch["source"], batch["record"]):
        try:
            examples = _row_examples(source, json.loads(record), data, template, tokenizer, objective)
        except DatasetError as err:
            kind = "overlong" if isinstance(err, OverlongExample) else "bad_rows"
            if getattr(data, kind) == "error":
                raise
            examples = [_skipped_example(kind, str(err), objective)]
        for example in examples:
            for column, value in {"skipped": "", "skip_reason": "", **example, "source": source}.items():
                out[column].append(value)
    return pd.DataFrame(out)


def _row_examples(
    source: str, record: dict[str, Any] | str, data: DataConfig, template: str, tokenizer: Any, objective: str
) -> list[dict]:
    """One row's examples; a DatasetError names the row (source) and its problem."""
    if isinstance(record, str):  # the reader's error for a row it could not parse (see read_file_rows)
        raise DatasetError(record)
    sample = normalize(record, data.format, source, data.system_prompt)
    if kind_of(sample) not in OBJECTIVE_KINDS[objective]:
        raise DatasetError(
            f"{source}: train.objective {objective} trains on {' or '.join(OBJECTIVE_KINDS[objective])} rows; "
            f"this row is a {kind_of(sample)}"
        )
    try:
        return _examples(sample, template, tokenizer, data, objective)
    except DatasetError as err:
        raise type(err)(f"{source}: {err}") from None  # type(err): an OverlongExample stays one


def _skipped_example(kind: str, reason: str, objective: str) -> dict[str, Any]:
    """A stand-in for a skipped row: it carries the reason to the stats, then is dropped."""
    no_ids = {column: [] for column in ROW_COLUMNS[objective]}
    return {**no_ids, "length": 0, "truncated": False, "trainable": 0, "skipped": kind, "skip_reason": reason}


def _examples(sample: dict[str, Any], template: str, tokenizer: Any, data: DataConfig, objective: str) -> list[dict]:
    """One sample's training examples with their stats columns (a long pretraining text gives several)."""
    if objective == "dpo":
        pair = tokenize_preference(sample, template, tokenizer, data.max_length)
        _check_fits(pair, data)
        answer_length = max(len(pair.chosen_ids), len(pair.rejected_ids))
        return [
            {
                "prompt_ids": pair.prompt_ids,
                "chosen_ids": pair.chosen_ids,
                "rejected_ids": pair.rejected_ids,
                "length": len(pair.prompt_ids) + answer_length,
                "truncated": pair.truncated,
                "trainable": min(len(pair.chosen_ids), len(pair.rejected_ids)),
            }
        ]
    if objective == "pretrain":
        tokenized = tokenize_text_chunks(sample["text"], tokenizer, data.max_length)  # split, never truncated
    else:
        tokenized = [tokenize_sample(sample, template, tokenizer, data.max_length)]
        _check_fits(tokenized[0], data)
    return [
        {
            "input_ids": example.input_ids,
            "labels": example.labels,
            "length": len(example.input_ids),
            "truncated": example.truncated,
            "trainable": sum(label != IGNORE_INDEX for label in example.labels),
        }
        for example in tokenized
    ]


def _check_fits(example: TokenizedExample | PreferenceExample, data: DataConfig) -> None:
    """Refuse an example that truncation cut, unless data.overlong allows that."""
    if example.truncated and data.overlong != "truncate":
        raise OverlongExample(f"example is {example.full_length} tokens, longer than data.max_length {data.max_length}")


def _pack_batch(batch: pd.DataFrame, max_length: int, pad_id: int) -> pd.DataFrame:
    rows = pack_examples([list(x) for x in batch["input_ids"]], [list(x) for x in batch["labels"]], max_length, pad_id)
    return pd.DataFrame(rows)
