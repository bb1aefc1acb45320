"""Batch rows for the model: packed rows stack up to the fullest one, unpacked rows pad to the longest.

Rows come from train/rows.py (numpy arrays) or as Python lists (tests, benchmarks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from finch.data.tokenization import IGNORE_INDEX


class RowCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "position_ids" in rows[0]:
            # Packed: no attention mask, so transformers builds a block-diagonal mask from the
            # position_ids restarts (see finch.data.packing). A row's padding is its own block at
            # its end and carries no loss, so the padding past the batch's fullest row is cut:
            # nothing else attends to it, and a batch of rows that packed loosely costs less.
            length = max(row.get("num_tokens", len(row["input_ids"])) for row in rows)
            return {key: stacked([row[key][:length] for row in rows]) for key in ("input_ids", "labels", "position_ids")}
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
