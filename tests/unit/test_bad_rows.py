"""data.bad_rows and data.overlong, row by row and without Ray: the pipeline's own reader and
tokenize_batch (data/examples.py), so each bad row is seen exactly as prepare_datasets sees it."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from finch.config import DataConfig
from finch.data.examples import ExampleSpec, read_file_rows, tokenize_batch
from finch.data.readers import DatasetError, iter_records
from finch.data.tokenization import tokenize_preference, tokenize_sample
from tests.conftest import make_tokenizer, model_source

GOOD = '{"instruction": "Q", "output": "A"}'
GOOD_PAIR = '{"prompt": "Q", "chosen": "A", "rejected": "B"}'

# (a JSONL line, what the error says about it)
BAD_ROWS = [
    ('{"instruction": "Q", "output": ', "invalid JSON (Expecting value at column 32)"),
    ('["instruction", "output"]', "expected a JSON object, got list"),
    ('{"instruction": "Q", "output": 5}', "field output: expected a string, got int"),
    ('{"messages": "hi"}', "field messages: expected a non-empty list of turns"),
    ('{"instruction": "Q"}', "missing field 'output'"),
    ('{"instruction": "Q", "output": " "}', "field output is empty"),
    (
        '{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]}',
        "field messages[1].content is empty",
    ),
    (
        '{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "\\n"}]}',
        "field conversations[1].value is empty",
    ),
    ('{"prompt": "Q", "completion": ""}', "field completion is empty"),
    (
        '{"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": " "}]}',
        "field completion[0].content is empty",
    ),
    ('{"text": "  "}', "field text is empty"),
    (GOOD_PAIR, "train.objective sft trains on conversation or text rows; this row is a preference"),
]
BAD_PAIRS = [
    ('{"prompt": "Q", "chosen": "", "rejected": "B"}', "field chosen is empty"),
    (
        '{"prompt": "Q", "chosen": "A", "rejected": [{"role": "assistant", "content": " "}]}',
        "field rejected[0].content is empty",
    ),
    (
        '{"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": ""}, '
        '"rejected": {"from": "gpt", "value": "B"}}',
        "field chosen.value is empty",
    ),
    ('{"prompt": "Q", "chosen": 1, "rejected": "B"}', "field chosen: expected a string, got int"),
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer().save_pretrained(path)
    return str(path)


def tokenize_lines(
    tmp_path, lines: list[str], tokenizer_dir: str, objective: str = "sft", **data
) -> tuple[str, pd.DataFrame]:
    """Write the lines as a JSONL file and run them through the pipeline's row steps."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    config = DataConfig(train_files=[str(path)], **data)
    rows = pd.DataFrame(read_file_rows({"path": str(path)}))
    return str(path), tokenize_batch(rows, ExampleSpec(config, model_source(tokenizer_dir), "chat", objective))


@pytest.mark.parametrize("line, problem", BAD_ROWS)
def test_error_mode_names_file_line_and_field(tmp_path, tokenizer_dir, line, problem):
    with pytest.raises(DatasetError) as err:
        tokenize_lines(tmp_path, [GOOD, line, GOOD], tokenizer_dir)
    assert str(err.value) == f"{tmp_path / 'train.jsonl'}:2: {problem}"


@pytest.mark.parametrize("line, problem", BAD_ROWS)
def test_skip_mode_flags_the_row_with_its_reason(tmp_path, tokenizer_dir, line, problem):
    path, frame = tokenize_lines(tmp_path, [GOOD, line, GOOD], tokenizer_dir, bad_rows="skip")
    assert frame["skipped"].tolist() == ["", "bad_rows", ""]
    assert frame["skip_reason"].tolist() == ["", f"{path}:2: {problem}", ""]
    assert [len(ids) for ids in frame["input_ids"]][1] == 0 and frame["trainable"][1] == 0
    assert frame["source"].tolist() == [f"{path}:1", f"{path}:2", f"{path}:3"]


@pytest.mark.parametrize("line, problem", BAD_PAIRS)
def test_preference_pairs_in_both_modes(tmp_path, tokenizer_dir, line, problem):
    with pytest.raises(DatasetError, match=rf"^.*train\.jsonl:2: {problem}$".replace("[", r"\[")):
        tokenize_lines(tmp_path, [GOOD_PAIR, line], tokenizer_dir, "dpo")
    path, frame = tokenize_lines(tmp_path, [GOOD_PAIR, line], tokenizer_dir, "dpo", bad_rows="skip")
    assert frame["skipped"].tolist() == ["", "bad_rows"]
    assert frame["skip_reason"][1] == f"{path}:2: {problem}"
    assert len(frame["chosen_ids"][0]) > 0 and len(frame["chosen_ids"][1]) == 0


LONG = json.dumps({"instruction": "Q", "output": "word " * 40})
LONG_PAIR = json.dumps({"prompt": "Q", "chosen": "word " * 40, "rejected": "B"})


def full_length(line: str, objective: str) -> int:
    """Tokens of the row's example before any truncation."""
    record = json.loads(line)
    if objective == "dpo":
        sample = {
            "messages": [{"role": "user", "content": "Q"}],
            "chosen": record["chosen"],
            "rejected": record["rejected"],
        }
        return tokenize_preference(sample, "chat", make_tokenizer(), 10**6).full_length
    sample = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": record["output"]}]}
    return len(tokenize_sample(sample, "chat", make_tokenizer(), 10**6).input_ids)


@pytest.mark.parametrize("objective, good, long", [("sft", GOOD, LONG), ("dpo", GOOD_PAIR, LONG_PAIR)])
def test_overlong_examples_truncate_skip_or_stop(tmp_path, tokenizer_dir, objective, good, long):
    length = full_length(long, objective)
    assert length > 32
    _, frame = tokenize_lines(tmp_path, [good, long], tokenizer_dir, objective, max_length=32)
    assert frame["truncated"].tolist() == [False, True] and frame["skipped"].tolist() == ["", ""]

    path, frame = tokenize_lines(tmp_path, [good, long], tokenizer_dir, objective, max_length=32, overlong="skip")
    assert frame["skipped"].tolist() == ["", "overlong"]
    assert frame["skip_reason"][1] == f"{path}:2: example is {length} tokens, longer than data.max_length 32"

    with pytest.raises(DatasetError) as err:
        tokenize_lines(tmp_path, [good, long], tokenizer_dir, objective, max_length=32, overlong="error")
    assert str(err.value) == f"{path}:2: example is {length} tokens, longer than data.max_length 32"


def test_overlong_and_bad_rows_are_told_apart(tmp_path, tokenizer_dir):
    """overlong: error stops on a long row even when bad rows are skipped, and the other way round."""
    lines = [GOOD, BAD_ROWS[0][0], LONG]
    with pytest.raises(DatasetError, match=r"train\.jsonl:3: example is"):
        tokenize_lines(tmp_path, lines, tokenizer_dir, max_length=32, bad_rows="skip", overlong="error")
    with pytest.raises(DatasetError, match=r"train\.jsonl:2: invalid JSON"):
        tokenize_lines(tmp_path, lines, tokenizer_dir, max_length=32, bad_rows="error", overlong="skip")


def test_pretrain_documents_are_split_not_overlong(tmp_path, tokenizer_dir):
    _, frame = tokenize_lines(
        tmp_path, [json.dumps({"text": "word " * 200})], tokenizer_dir, "pretrain", max_length=32, overlong="error"
    )
    assert len(frame) > 1 and set(frame["skipped"]) == {""}


def test_reader_marks_unparseable_rows_only_when_asked(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{broken\n[1]\n{"text": "b"}\n')
    with pytest.raises(DatasetError, match=rf"^{path}:2: invalid JSON"):
        list(iter_records(str(path)))
    rows = list(iter_records(str(path), mark_bad_rows=True))
    assert [source for source, _ in rows] == [f"{path}:{n}" for n in (1, 2, 3, 4)]
    assert rows[0][1] == {"text": "a"} and rows[3][1] == {"text": "b"}
    assert isinstance(rows[1][1], DatasetError) and str(rows[1][1]).startswith(f"{path}:2: invalid JSON")
    assert str(rows[2][1]) == f"{path}:3: expected a JSON object, got list"
    array = tmp_path / "d.json"
    array.write_text(json.dumps([{"text": "a"}, 7]))
    assert (
        str(list(iter_records(str(array), mark_bad_rows=True))[1][1])
        == f"{array}:row 1: expected a JSON object, got int"
    )
