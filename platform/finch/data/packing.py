"""Pack tokenized examples into fixed-length rows without cross-example attention.

Each row restarts `position_ids` at 0 for every example; with no attention mask,
transformers turns those restarts into a block-diagonal causal mask, so an example
attends only to itself (tests check a packed forward equals the separate forwards).
"""

from __future__ import annotations

import bisect
from typing import Any

from finch.data.tokenization import IGNORE_INDEX


def best_fit_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: indices of examples per row, rows nearly full."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    # (remaining space, bin index), kept sorted so the tightest fitting bin is a bisect away.
    free: list[tuple[int, int]] = []
    for index in order:
        size = lengths[index]
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            remaining, bin_index = free.pop(slot)
        else:
            remaining, bin_index = capacity, len(bins)
            bins.append([])
        bins[bin_index].append(index)
        if remaining - size > 0:
            bisect.insort(free, (remaining - size, bin_index))
    return bins


def pack_examples(input_ids: list[list[int]], labels: list[list[int]], max_length: int, pad_id: int) -> dict[str, Any]:
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "num_tokens": []}
    for members in best_fit_bins([len(ids) for ids in input_ids], max_length):
        row_ids, row_labels, row_positions = [], [], []
        for index in members:
            row_ids += input_ids[index]
            # The model predicts labels[t + 1] from token t: an example's first label would be
            # predicted from the previous example's last token. Nothing precedes it unpacked either.
            row_labels += [IGNORE_INDEX] + labels[index][1:]
            row_positions += range(len(input_ids[index]))
        # Padding forms its own block (positions restart) and carries no loss.
        pad = max_length - len(row_ids)
        rows["input_ids"].append(row_ids + [pad_id] * pad)
        rows["labels"].append(row_labels + [IGNORE_INDEX] * pad)
        rows["position_ids"].append(row_positions + list(range(pad)))
        rows["num_tokens"].append(len(row_ids))
    return rows
