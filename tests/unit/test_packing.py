import random

import pytest
import torch

from finch.data.packing import best_fit_bins, pack_examples
from finch.data.tokenization import IGNORE_INDEX
from finch.train.collate import RowCollator


def test_best_fit_uses_every_example_once_and_respects_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = best_fit_bins(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert sum(lengths) / (len(bins) * 128) > 0.95


def test_packed_rows_restart_positions_and_pad_without_loss():
    rows = pack_examples(
        [[1, 2, 3], [4, 5], [6, 7, 8, 9]], [[-100, 2, 3], [-100, 5], [6, 7, 8, 9]], max_length=8, pad_id=0
    )
    assert rows["num_tokens"] == [7, 2]
    assert rows["input_ids"][0] == [6, 7, 8, 9, 1, 2, 3, 0]
    assert rows["position_ids"][0] == [0, 1, 2, 3, 0, 1, 2, 0]
    # each example's first label is masked: it would be predicted across the example boundary
    assert rows["labels"][0] == [IGNORE_INDEX, 7, 8, 9, IGNORE_INDEX, 2, 3, IGNORE_INDEX]
    assert rows["input_ids"][1] == [4, 5, 0, 0, 0, 0, 0, 0]
    assert rows["labels"][1] == [-100, 5] + [IGNORE_INDEX] * 6


@pytest.mark.parametrize("flatten", [False, True], ids=["rows", "flattened"])
@pytest.mark.parametrize("attention", ["eager", "sdpa", "flex_attention"])
def test_packed_forward_equals_separate_forwards(tiny_model_dir, attention, flatten):
    """No example attends to another in a packed batch, with every attention kernel that runs on a
    CPU: as rows (transformers builds a block-diagonal mask from the position restarts) and
    flattened into one row, the layout flash attention gets (its varlen path takes the sequence
    boundaries from those restarts; run on a GPU by bench/gpu_check.py)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attention)
    model.eval().config.use_cache = False
    rng = random.Random(1)
    examples = [[rng.randrange(2000) for _ in range(n)] for n in (17, 9, 30, 5)]
    rows = pack_examples(examples, examples, max_length=40, pad_id=0)  # two rows
    batch = RowCollator(pad_id=0, flatten=flatten)(
        [{k: rows[k][i] for k in rows} for i in range(len(rows["input_ids"]))]
    )
    assert batch["input_ids"].shape[0] == (1 if flatten else 2)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        for example in examples:
            alone = model(input_ids=torch.tensor([example])).logits[0]
            row, start = _locate(batch["input_ids"].tolist(), example)
            torch.testing.assert_close(packed[row, start : start + len(example)], alone, atol=1e-5, rtol=1e-4)


def test_packed_loss_equals_mean_of_token_losses(tiny_model_dir):
    """Through finch's own loader, which must switch the KV cache off: with a cache, transformers
    silently ignores the position_ids restarts and examples attend across the boundary."""
    from finch.config import ModelConfig
    from finch.models.loading import load_base_model

    model = load_base_model(ModelConfig(path=str(tiny_model_dir), dtype="float32"), str(tiny_model_dir)).eval()
    examples = [[5, 6, 7, 8, 9], [10, 11, 12]]
    rows = pack_examples(examples, examples, max_length=10, pad_id=0)
    batch = RowCollator(pad_id=0)([{k: rows[k][0] for k in rows}])
    with torch.no_grad():
        packed_loss = model(**batch).loss
        sums, count = 0.0, 0
        for example in examples:
            n = len(example) - 1
            sums += model(input_ids=torch.tensor([example]), labels=torch.tensor([example])).loss * n
            count += n
    torch.testing.assert_close(packed_loss, sums / count, atol=1e-5, rtol=1e-4)


def test_packed_batches_drop_the_padding_no_row_needs():
    rows = pack_examples([[1, 2, 3], [4, 5], [6]], [[-100, 2, 3], [-100, 5], [6]], max_length=8, pad_id=0)
    batch = RowCollator(pad_id=0)([{k: rows[k][i] for k in rows} for i in range(len(rows["input_ids"]))])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]  # one row of 6 tokens: 2 padding slots cut
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    rows = pack_examples([[1, 2, 3, 4, 5], [6, 7, 8, 9]], [[1, 2, 3, 4, 5], [6, 7, 8, 9]], max_length=8, pad_id=0)
    batch = RowCollator(pad_id=0)([{k: rows[k][i] for k in rows} for i in range(2)])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]  # cut to the fuller row
    assert batch["labels"][1, -1] == IGNORE_INDEX
    flat = RowCollator(pad_id=0, flatten=True)([{k: rows[k][i] for k in rows} for i in range(2)])
    assert flat["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]  # no padding at all
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert flat["labels"].tolist() == [[IGNORE_INDEX, 2, 3, 4, 5, IGNORE_INDEX, 7, 8, 9]]


def test_unpacked_rows_pad_to_longest_with_attention_mask():
    batch = RowCollator(pad_id=0)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]


def _locate(rows: list[list[int]], example: list[int]) -> tuple[int, int]:
    for index, row in enumerate(rows):
        for start in range(len(row) - len(example) + 1):
            if row[start : start + len(example)] == example:
                return index, start
    raise AssertionError("example not found in any packed row")
