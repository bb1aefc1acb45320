"""Batch rows for the model: packed rows stack up to the fullest one (or flatten into one row for
flash attention), unpacked rows pad to the longest.

Rows come from train/rows.py (numpy arrays) or as Python lists (tests, benchmarks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from finch.data.tokenization import IGNORE_INDEX

PACKED_COLUMNS = ("input_ids", "labels", "position_ids")


class RowCollator:
    """`flatten`: packed rows go out as one row of all their tokens, no padding at all. Flash
    attention needs that: transformers hands it the example boundaries (from the position restarts)
    only for a batch of one row; with more rows it would let packed examples attend to each other."""

    def __init__(self, pad_id: int, flatten: bool = False):
        self.pad_id = pad_id
        self.flatten = flatten

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "position_ids" in rows[0] and self.flatten:
            used = [row.get("num_tokens", len(row["input_ids"])) for row in rows]
            return {
                key: stacked([np.concatenate([row[key][:n] for row, n in zip(rows, used)])]) for key in PACKED_COLUMNS
            }
        if "position_ids" in rows[0]:
            # Packed: no attention mask, so transformers builds a block-diagonal mask from the
            # position_ids restarts (see finch.data.packing). A row's padding is its own block at
            # its end and carries no loss, so the padding past the batch's fullest row is cut:
            # nothing else attends to it, and a batch of rows that packed loosely costs less.
            length = max(row.get("num_tokens", len(row["input_ids"])) for row in rows)
            return {key: stacked([row[key][:length] for row in rows]) for key in PACKED_COLUMNS}
        longest = max(len(row["input_ids"]) for row in rows)
        batch = {
            "input_ids": np.full((len(rows), longest), self.pad_id, dtype=np.int64),
            "labels": np.full((len(rows), longest), IGNORE_INDEX, dtype=np.int64),
            "attention_mask": np.zeros((len(rows), longest), dtype=np.int64),
        }
        for index, row in enumerate(rows):
            size = len(row["input_ids"])
            batch["input_ids"][index, :size] = row["input_ids"]
            batch["labels"][index, :size] = row["labels"]
            batch["attention_mask"][index, :size] = 1
        return {key: torch.from_numpy(value) for key, value in batch.items()}


def stacked(sequences: list[Any]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(sequences, dtype=np.int64))
