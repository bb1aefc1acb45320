"""A worker's rows on disk (train/rows.py): what goes in comes out, row by row, and a node's
workers share one copy per run. Also the driver-side length statistics, which are summed from
per-block histograms instead of a pulled column (data/pipeline.py). No Ray."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pyarrow as pa
import pytest

from finch.data.packing import pack_examples
from finch.data.pipeline import histogram_quantile
from finch.train.collate import RowCollator
from finch.train.rows import COLUMNS_FILE, RowStore, iterate, node_rows, write_rows
from finch.train.trainers import build_trainer


def packed_table(seed: int, count: int = 40, max_length: int = 64) -> pa.Table:
    rng = random.Random(seed)
    examples = [[rng.randrange(100_000) for _ in range(rng.randint(2, 40))] for _ in range(count)]
    labels = [[-100] * (len(e) // 2) + e[len(e) // 2 :] for e in examples]
    return pa.Table.from_pydict(pack_examples(examples, labels, max_length, pad_id=0))


def preference_table(seed: int, count: int = 30) -> pa.Table:
    rng = random.Random(seed)
    ids = lambda: [rng.randrange(100_000) for _ in range(rng.randint(0, 25))]  # noqa: E731
    return pa.Table.from_pylist(
        [{"prompt_ids": ids(), "chosen_ids": ids(), "rejected_ids": ids()} for _ in range(count)]
    )


class Shard:
    """Batches of rows as a Ray Data shard yields them, counting how often they are written out."""

    def __init__(self, tables: list[pa.Table]):
        self.tables, self.writes = tables, 0

    def iter_batches(self, batch_size: int):
        for table in self.tables:
            yield from (table.slice(start, batch_size) for start in range(0, len(table), batch_size))

    def write(self, folder, key):
        self.writes += 1
        write_rows(self.iter_batches(16), folder, key)


@pytest.mark.parametrize("make_table", [packed_table, preference_table])
def test_rows_read_back_equal_to_what_was_written(tmp_path, make_table):
    tables = [make_table(seed) for seed in range(3)]  # several batches, sliced (non-zero offsets)
    expected = pa.concat_tables(tables).to_pylist()
    rows = write_rows(Shard(tables).iter_batches(7), tmp_path / "rows", key="k")
    assert len(rows) == len(expected)
    assert list(iterate(rows)) == expected
    column = next(iter(expected[-1]))
    assert rows[-1][column].tolist() == expected[-1][column]
    with pytest.raises(IndexError):
        rows[len(rows)]
    copy = pickle.loads(pickle.dumps(rows))  # e.g. a DataLoader worker: opens its own files
    assert list(iterate(copy)) == expected


def test_token_ids_beyond_int32_are_refused_not_wrapped(tmp_path):
    table = pa.Table.from_pydict({"input_ids": [[1, 2**31]]})
    with pytest.raises(pa.ArrowInvalid):
        write_rows([table], tmp_path / "rows", key="k")


def test_a_nodes_workers_share_one_copy_and_a_new_run_rewrites_it(tmp_path):
    folder = tmp_path / "run" / "train"
    first, second, later = Shard([packed_table(0)]), Shard([packed_table(0)]), Shard([packed_table(1)])
    assert len(node_rows(folder, "fit-1", first.write)) == len(packed_table(0)) and first.writes == 1
    assert len(node_rows(folder, "fit-1", second.write)) == len(packed_table(0)) and second.writes == 0  # reused
    node_rows(folder, "fit-2", later.write)
    assert later.writes == 1 and list(iterate(RowStore(folder))) == packed_table(1).to_pylist()


def test_a_folder_whose_writer_died_is_written_again(tmp_path):
    folder = tmp_path / "run" / "train"
    node_rows(folder, "fit-1", Shard([packed_table(0)]).write)
    (folder / COLUMNS_FILE).unlink()  # the writer died before its last file
    again = Shard([packed_table(0)])
    assert list(iterate(node_rows(folder, "fit-1", again.write))) == packed_table(0).to_pylist() and again.writes == 1


def test_collated_batches_from_stored_rows_equal_those_from_lists(tmp_path):
    table = packed_table(0)
    rows = write_rows([table], tmp_path / "rows", key="k")
    collate = RowCollator(pad_id=0)
    stored, listed = collate([rows[0], rows[1]]), collate(table.to_pylist()[:2])
    assert stored.keys() == listed.keys() and all((stored[k] == listed[k]).all() for k in stored)
    unpacked = [
        {"input_ids": np.array([1, 2, 3], np.int32), "labels": np.array([-100, 2, 3], np.int32)},
        {"input_ids": np.array([4], np.int32), "labels": np.array([4], np.int32)},
    ]
    assert collate(unpacked)["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]


def test_the_trainers_batches_drop_padding_that_no_row_needs(tmp_path, tiny_model_dir):
    """HF's column filter must leave num_tokens to the collator: a batch of short packed rows is cut
    to its fullest row, not max_length."""
    from finch.config import validate_config
    from finch.models.loading import load_trainable_model
    from tests.conftest import make_tokenizer, run_config_dict

    table = packed_table(0, count=6, max_length=512)  # about 130 tokens in one row of 512
    rows = write_rows([table], tmp_path / "rows", key="k")
    config = validate_config(run_config_dict(tmp_path, tiny_model_dir, ["unused.jsonl"], train={"max_steps": 1}))
    trainer = build_trainer(
        config, load_trainable_model(config, str(tiny_model_dir)), make_tokenizer(), rows, None, str(tmp_path / "hf")
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] == max(table["num_tokens"].to_pylist()) < 512


def test_length_quantiles_from_a_histogram_equal_numpys():
    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 1000):
        lengths = rng.integers(1, 300, size)
        histogram = np.bincount(lengths)
        for q in (0.0, 0.5, 0.95, 1.0):
            assert histogram_quantile(histogram, q) == pytest.approx(np.quantile(lengths, q))
