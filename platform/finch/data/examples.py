"""From a dataset file's rows to training examples: pure functions, no Ray.

A row is read (readers.py), normalized to a sample (formats.py), rendered through its template and
tokenized with the loss masked to the answers (tokenization.py); what comes out is one or more
examples with the columns training needs plus the stats columns the pipeline sums. A bad or
over-long row either raises a DatasetError naming its file and line, or, where data.bad_rows /
data.overlong say 'skip', becomes a stand-in row that carries the reason to the stats.
data/pipeline.py runs this on Ray Data, one batch of rows per task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from finch.config import PAIRWISE_OBJECTIVES, DataConfig
from finch.data.formats import kind_of, normalize
from finch.data.readers import DatasetError, iter_records
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

# The sample kinds (formats.kind_of) each training objective can use.
OBJECTIVE_KINDS = {
    "sft": ("conversation", "text"),
    "pretrain": ("text",),
    **{objective: ("preference",) for objective in PAIRWISE_OBJECTIVES},
}
ROW_COLUMNS = {
    "sft": ["input_ids", "labels"],
    "pretrain": ["input_ids", "labels"],
    **{objective: ["prompt_ids", "chosen_ids", "rejected_ids"] for objective in PAIRWISE_OBJECTIVES},
}
# skipped: "" for a kept example, else a SKIP_LABELS key; skip_reason: "file:line: problem".
STAT_COLUMNS = ["length", "truncated", "trainable", "source", "skipped", "skip_reason"]
# Rows dropped because data.bad_rows / data.overlong say 'skip', keyed by that setting's name.
SKIP_LABELS = {"bad_rows": "bad rows", "overlong": "over-long examples"}


class OverlongExample(DatasetError):
    """An example longer than data.max_length while data.overlong is 'skip' or 'error'."""


@dataclass(frozen=True)
class ExampleSpec:
    """Everything that decides how a row becomes examples. `model` brings the tokenizer, loaded on
    whichever node a Ray task runs (model.here())."""

    data: DataConfig
    model: ModelSource
    template: str
    objective: str = "sft"

    @property
    def columns(self) -> list[str]:
        return ROW_COLUMNS[self.objective]


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


def tokenize_batch(batch: pd.DataFrame, spec: ExampleSpec) -> pd.DataFrame:
    """A batch of read rows (read_file_rows) -> their examples, skipped rows as stand-ins."""
    tokenizer = load_tokenizer(spec.model.here())
    out: dict[str, list] = {column: [] for column in spec.columns + STAT_COLUMNS}
    for source, record in zip(batch["source"], batch["record"]):
        for example in examples_or_skip(source, json.loads(record), spec, tokenizer):
            for column, value in {"skipped": "", "skip_reason": "", **example, "source": source}.items():
                out[column].append(value)
    return pd.DataFrame(out)


def examples_or_skip(source: str, record: dict[str, Any] | str, spec: ExampleSpec, tokenizer: Any) -> list[dict]:
    """row_examples, or a skipped stand-in where data.bad_rows / data.overlong say 'skip'."""
    try:
        return row_examples(source, record, spec, tokenizer)
    except DatasetError as err:
        kind = "overlong" if isinstance(err, OverlongExample) else "bad_rows"
        if getattr(spec.data, kind) == "error":
            raise
        return [skipped_example(kind, str(err), spec.objective)]


def row_examples(source: str, record: dict[str, Any] | str, spec: ExampleSpec, tokenizer: Any) -> list[dict]:
    """One row's examples; a DatasetError names the row (source) and its problem."""
    if isinstance(record, str):  # the reader's error for a row it could not parse (see read_file_rows)
        raise DatasetError(record)
    sample = normalize(record, spec.data.format, source, spec.data.system_prompt)
    kinds = OBJECTIVE_KINDS[spec.objective]
    if kind_of(sample) not in kinds:
        raise DatasetError(
            f"{source}: train.objective {spec.objective} trains on {' or '.join(kinds)} rows; "
            f"this row is a {kind_of(sample)}"
        )
    try:
        return sample_examples(sample, spec, tokenizer)
    except DatasetError as err:
        raise type(err)(f"{source}: {err}") from None  # type(err): an OverlongExample stays one


def skipped_example(kind: str, reason: str, objective: str) -> dict[str, Any]:
    """A stand-in for a skipped row: it carries the reason to the stats, then is dropped."""
    no_ids = {column: [] for column in ROW_COLUMNS[objective]}
    return {**no_ids, "length": 0, "truncated": False, "trainable": 0, "skipped": kind, "skip_reason": reason}


def sample_examples(sample: dict[str, Any], spec: ExampleSpec, tokenizer: Any) -> list[dict]:
    """One sample's training examples with their stats columns (a long pretraining text gives several)."""
    max_length = spec.data.max_length
    if spec.objective in PAIRWISE_OBJECTIVES:
        pair = tokenize_preference(sample, spec.template, tokenizer, max_length)
        check_fits(pair, spec.data)
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
    if spec.objective == "pretrain":
        tokenized = tokenize_text_chunks(sample["text"], tokenizer, max_length)  # split, never truncated
    else:
        tokenized = [tokenize_sample(sample, spec.template, tokenizer, max_length)]
        check_fits(tokenized[0], spec.data)
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


def check_fits(example: TokenizedExample | PreferenceExample, data: DataConfig) -> None:
    """Refuse an example that truncation cut, unless data.overlong allows that."""
    if example.truncated and data.overlong != "truncate":
        raise OverlongExample(f"example is {example.full_length} tokens, longer than data.max_length {data.max_length}")


def describe_skipped(stats: dict[str, Any]) -> str:
    """'2 bad rows, 1 over-long examples' from the skipped_* counts; '' when nothing was skipped."""
    return ", ".join(
        f"{stats[f'skipped_{kind}']} {label}" for kind, label in SKIP_LABELS.items() if stats.get(f"skipped_{kind}")
    )
