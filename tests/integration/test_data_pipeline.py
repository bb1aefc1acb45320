"""The Ray Data pipeline on a local cluster, over real third-party datasets."""

from __future__ import annotations

import json

import pytest

from finch.config import DataConfig
from finch.data.pipeline import prepare_datasets
from finch.data.readers import DatasetError, iter_records
from tests.conftest import data_file, model_source, write_jsonl

pytestmark = pytest.mark.integration

SFT_FILES = [
    "sft/identity.json",
    "sft/gsm8k_chat_train.jsonl",
    "sft/glaive_toolcall_en_demo.json",
    "sft/guanaco-llama2-1k.train.parquet",
    "pretrain/c4_demo.jsonl",
    "pretrain/tinyshakespeare.txt",
]


def test_every_format_packs_densely(ray_local, tiny_model_dir):
    files = [str(data_file(name)) for name in SFT_FILES]
    prepared = prepare_datasets(DataConfig(train_files=files, max_length=256), model_source(tiny_model_dir))
    stats = prepared.stats
    assert prepared.template == "chat"
    rows_in_files = sum(1 for path in files for _ in iter_records(path))
    assert rows_in_files == 1810  # the slices in tests/data (README there)
    assert stats["examples"] == rows_in_files  # every row became one example (some dropped, counted)
    assert stats["length_max"] <= 256 and stats["truncated"] > 0
    assert stats["packing_efficiency"] > 0.97
    row = prepared.train.take(1)[0]
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == 256
    # the same rows in the same order every time: a resumed run skips the batches it already trained on
    again = prepare_datasets(DataConfig(train_files=files, max_length=256), model_source(tiny_model_dir))
    assert rows_of(again.train) == rows_of(prepared.train)


def rows_of(dataset) -> list[list[int]]:
    return [list(row["input_ids"]) for row in dataset.iter_rows()]


def test_eval_fraction_holds_out_examples(ray_local, tiny_model_dir):
    files = [str(data_file("sft/gsm8k_chat_train.jsonl"))]
    prepared = prepare_datasets(
        DataConfig(train_files=files, eval_fraction=0.2, max_length=512), model_source(tiny_model_dir)
    )
    assert prepared.stats["eval_examples"] == 90
    assert prepared.stats["examples"] == 449


def test_bad_row_inside_ray_surfaces_as_dataset_error(ray_local, tiny_model_dir, tmp_path):
    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + json.dumps({"messages": "oops"}) + "\n")
    with pytest.raises(DatasetError, match=rf"^{path}:3: field messages: expected a non-empty list of turns$"):
        prepare_datasets(DataConfig(train_files=[str(path)]), model_source(tiny_model_dir))


def test_empty_and_missing_files_fail_clearly(ray_local, tiny_model_dir, tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DatasetError, match="no examples in .*empty.jsonl"):
        prepare_datasets(DataConfig(train_files=[str(empty)]), model_source(tiny_model_dir))
    with pytest.raises(DatasetError, match="dataset file not found"):
        prepare_datasets(DataConfig(train_files=[str(tmp_path / "missing.jsonl")]), model_source(tiny_model_dir))
    with pytest.raises(DatasetError, match="unsupported file type '.xml'"):
        (tmp_path / "d.xml").write_text("<a/>")
        prepare_datasets(DataConfig(train_files=[str(tmp_path / "d.xml")]), model_source(tiny_model_dir))


def test_answers_truncated_away_are_dropped_and_counted(ray_local, tiny_plain_model_dir, tmp_path):
    long_prompt = {"instruction": "word " * 200, "output": "answer"}
    short = {"instruction": "hi", "output": "hello"}
    path = write_jsonl(tmp_path / "d.jsonl", [long_prompt, short])
    prepared = prepare_datasets(DataConfig(train_files=[str(path)], max_length=64), model_source(tiny_plain_model_dir))
    assert prepared.stats["dropped_no_answer"] == 1
    assert prepared.stats["truncated"] == 1


def test_inspect_reports_stats_and_writes_a_histogram(ray_local, tiny_model_dir, tmp_path):
    from finch.config import validate_config
    from finch.data.inspect import inspect_data
    from tests.conftest import run_config_dict

    config = validate_config(
        run_config_dict(tmp_path, tiny_model_dir, [str(data_file("sft/identity.json"))], name="inspect")
    )
    stats = inspect_data(config)
    histogram = config.run_dir / "token_lengths.png"
    assert histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and histogram.stat().st_size > 5000
    assert stats["examples"] == 91 and stats["rows"] < 91 and 0 < stats["packing_efficiency"] <= 1
