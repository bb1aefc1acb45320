"""A dataset with bad rows and an over-long example, through the whole Ray Data pipeline:
data.bad_rows and data.overlong decide between a clear error and a counted skip."""

from __future__ import annotations

import json
import logging

import pytest

from finch.config import DataConfig
from finch.data.pipeline import prepare_datasets
from finch.data.readers import DatasetError
from finch.train.run import print_data_stats
from tests.conftest import model_source

pytestmark = pytest.mark.integration

MAX_LENGTH = 64


def answer(text: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": text}]})


LINES = [
    answer("one"),
    answer("two"),
    '{"messages": [{"role": "user", "content": "Q"}',  # 3: broken JSON
    answer("four"),
    json.dumps({"instruction": "Q", "output": 5}),  # 5: wrong type
    answer("   "),  # 6: empty answer
    answer("word " * 100),  # 7: over-long
    answer("eight"),
]
GOOD_ROWS = 4


@pytest.fixture
def mixed_file(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(line + "\n" for line in LINES))
    return path


def prepare(path, tiny_model_dir, **data):
    return prepare_datasets(
        DataConfig(train_files=[str(path)], max_length=MAX_LENGTH, **data), model_source(tiny_model_dir)
    )


def test_error_mode_stops_at_the_first_bad_row(ray_local, tiny_model_dir, mixed_file):
    with pytest.raises(DatasetError, match=rf"^{mixed_file}:3: invalid JSON \(Expecting ',' delimiter at column 47\)$"):
        prepare(mixed_file, tiny_model_dir)


def test_skip_mode_counts_and_reports_what_it_dropped(ray_local, tiny_model_dir, mixed_file, caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="finch.data"):
        prepared = prepare(mixed_file, tiny_model_dir, bad_rows="skip", overlong="skip")
    stats = prepared.stats
    assert (stats["skipped_bad_rows"], stats["skipped_overlong"], stats["examples"]) == (3, 1, GOOD_ROWS)
    assert stats["truncated"] == 0 and stats["length_max"] <= MAX_LENGTH
    warning = caplog.text
    assert "skipped 3 bad rows, 1 over-long examples" in warning
    for line, problem in [
        (3, "invalid JSON"),
        (5, "field output: expected a string"),
        (6, "field messages[1].content is empty"),
        (7, "example is"),
    ]:
        assert f"{mixed_file}:{line}: {problem}" in warning
    print_data_stats(prepared)
    printed = " ".join(capsys.readouterr().out.split())
    assert f"data {GOOD_ROWS} examples" in printed and "skipped 3 bad rows and 1 over-long" in printed


def test_overlong_error_names_the_row_and_its_length(ray_local, tiny_model_dir, mixed_file):
    with pytest.raises(
        DatasetError, match=rf"^{mixed_file}:7: example is \d+ tokens, longer than data.max_length {MAX_LENGTH}$"
    ):
        prepare(mixed_file, tiny_model_dir, bad_rows="skip", overlong="error")


def test_nothing_left_after_skipping_is_still_an_error(ray_local, tiny_model_dir, tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_text("".join(line + "\n" for line in LINES[2:3] + LINES[4:7]))
    with pytest.raises(
        DatasetError,
        match=r"no examples in .*all_bad.jsonl: every row was skipped \(3 bad rows, 1 over-long examples\)",
    ):
        prepare(path, tiny_model_dir, bad_rows="skip", overlong="skip")


def test_preference_pairs_skip_bad_and_overlong_rows(ray_local, tiny_model_dir, tmp_path):
    pair = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    rows = [pair, {**pair, "chosen": ""}, {**pair, "rejected": "word " * 100}, pair]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = DataConfig(train_files=[str(path)], max_length=MAX_LENGTH, bad_rows="skip", overlong="skip")
    prepared = prepare_datasets(data, model_source(tiny_model_dir), objective="dpo")
    assert (prepared.stats["skipped_bad_rows"], prepared.stats["skipped_overlong"], prepared.stats["examples"]) == (
        1,
        1,
        2,
    )
    assert prepared.train.count() == 2
