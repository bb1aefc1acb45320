"""Batch rows for the model: packed rows stack up to the fullest one, unpacked rows pad to the longest."""

from __future__ import annotations

from typing import Any

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
            return {key: torch.tensor([list(row[key])[:length] for row in rows]) for key in ("input_ids", "labels", "position_ids")}
        longest = max(len(row["input_ids"]) for row in rows)
        batch: dict[str, list] = {"input_ids": [], "labels": [], "attention_mask": []}
        for row in rows:
            pad = longest - len(row["input_ids"])
            batch["input_ids"].append(list(row["input_ids"]) + [self.pad_id] * pad)
            batch["labels"].append(list(row["labels"]) + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append([1] * len(row["input_ids"]) + [0] * pad)
        return {key: torch.tensor(value) for key, value in batch.items()}
