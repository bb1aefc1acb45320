import json

import pytest

from finch.data.formats import detect_format, normalize
from finch.data.readers import DatasetError, iter_records
from tests.conftest import data_file


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"instruction": "Add", "input": "2+2", "output": "4"}, [("user", "Add\n\n2+2"), ("assistant", "4")]),
        ({"instruction": "Hi", "input": "", "output": "Hello"}, [("user", "Hi"), ("assistant", "Hello")]),
        (
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                ]
            },
            [("system", "S"), ("user", "Q"), ("assistant", "A")],
        ),
        (
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "system": "S"},
            [("system", "S"), ("user", "Q"), ("assistant", "A")],
        ),
        ({"prompt": "Q", "completion": "A"}, [("user", "Q"), ("assistant", "A")]),
        (
            {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]},
            [("user", "Q"), ("assistant", "A")],
        ),
    ],
)
def test_instruction_formats_normalize_to_messages(record, expected):
    sample = normalize(record, "auto", "f.jsonl:1")
    assert [(m["role"], m["content"]) for m in sample["messages"]] == expected


PAIR = {
    "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
    "chosen": "good",
    "rejected": "bad",
}


@pytest.mark.parametrize(
    "record",
    [
        {
            "input": {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]},
            "preferred_output": [{"role": "assistant", "content": "good"}],
            "non_preferred_output": [{"role": "assistant", "content": "bad"}],
        },
        {
            "system": "S",
            "conversations": [{"from": "human", "value": "Q"}],
            "chosen": {"from": "gpt", "value": "good"},
            "rejected": {"from": "gpt", "value": "bad"},
        },
        {
            "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
            "chosen": "good",
            "rejected": "bad",
        },
        {
            "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
    ],
)
def test_preference_formats_normalize_to_one_pair(record):
    assert normalize(record, "auto", "f:1") == PAIR
    assert normalize({"prompt": "Q", "chosen": "good", "rejected": "bad"}, "prompt_chosen_rejected", "f:1")[
        "messages"
    ] == [{"role": "user", "content": "Q"}]


def test_raw_text_and_system_prompt():
    assert normalize({"text": "once upon"}, "auto", "f:1") == {"text": "once upon"}
    sample = normalize({"prompt": "Q", "completion": "A"}, "auto", "f:1", system_prompt="Be brief.")
    assert sample["messages"][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize(
    "record, fmt, field",
    [
        ({"instruction": "Q"}, "auto", "missing field 'output'"),
        ({"instruction": "Q", "output": 3}, "auto", "field output: expected a string, got int"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "auto", "messages[0].role"),
        ({"messages": [{"role": "user", "content": "Q"}]}, "auto", "no assistant turn"),
        (
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}]},
            "auto",
            "field messages[1].content is empty",
        ),
        ({"conversations": [{"from": "human", "value": None}]}, "auto", "conversations[0].value"),
        ({"foo": 1}, "auto", "cannot tell the row format"),
        ({"text": "x"}, "alpaca", "missing field 'instruction'"),
        (
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "system", "content": "S"},
                    {"role": "assistant", "content": "A"},
                ]
            },
            "auto",
            "a system message may only come first",
        ),
        (
            {"input": {"messages": [{"role": "user", "content": "Q"}]}, "preferred_output": "A"},
            "auto",
            "non_preferred_output",
        ),
        (
            {"prompt": "Q", "chosen": "A", "rejected": [{"role": "user", "content": "B"}]},
            "auto",
            "one assistant message",
        ),
        (
            {
                "conversations": [{"from": "human", "value": "Q"}],
                "chosen": {"from": "human", "value": "A"},
                "rejected": {},
            },
            "auto",
            "field chosen",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                "chosen": "B",
                "rejected": "C",
            },
            "auto",
            "ends with an assistant turn",
        ),
    ],
)
def test_bad_rows_name_source_and_field(record, fmt, field):
    with pytest.raises(DatasetError) as err:
        normalize(record, fmt, "data/train.jsonl:7")
    assert str(err.value).startswith("data/train.jsonl:7: ")
    assert field in str(err.value)


def test_detect_format_of_each_dataset_in_tests_data():
    expected = {
        "sft/identity.json": "alpaca",
        "sft/gsm8k_chat_train.jsonl": "messages",
        "sft/glaive_toolcall_en_demo.json": "sharegpt",
        "sft/guanaco-llama2-1k.train.parquet": "text",
        "pretrain/c4_demo.jsonl": "text",
        "pretrain/tinyshakespeare.txt": "text",
        "preference/orca_dpo_pairs_openai_format.jsonl": "openai_dpo",
        "preference/dpo_en_demo.json": "sharegpt_preference",
    }
    for relative, fmt in expected.items():
        source, record = next(iter_records(str(data_file(relative))))
        assert detect_format(record) == fmt, relative
        normalize(record, "auto", source)


def test_readers_report_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n\n" + json.dumps({"text": "b"}) + "\n{broken\n")
    records = iter_records(str(path))
    assert next(records)[0] == f"{path}:1"
    assert next(records)[0] == f"{path}:3"
    with pytest.raises(DatasetError, match=rf"{path}:4: invalid JSON"):
        next(records)


def test_csv_parquet_json_txt_and_saved_dataset(tmp_path):
    import datasets

    rows = [{"prompt": "Q1", "completion": "A1"}, {"prompt": "Q2", "completion": "A2"}]
    (tmp_path / "d.csv").write_text('prompt,completion\nQ1,A1\n"Q2",A2\n')
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.csv", "d.parquet", "d.json", "saved"):
        got = [record for _, record in iter_records(str(tmp_path / name))]
        assert got == rows, name
    assert [s for s, _ in iter_records(str(tmp_path / "d.csv"))] == [
        f"{tmp_path / 'd.csv'}:2",
        f"{tmp_path / 'd.csv'}:3",
    ]
    (tmp_path / "t.txt").write_text("para one\nline two\n\n\npara two\n")
    assert list(iter_records(str(tmp_path / "t.txt"))) == [
        (f"{tmp_path / 't.txt'}:1", {"text": "para one\nline two"}),
        (f"{tmp_path / 't.txt'}:5", {"text": "para two"}),
    ]


def test_json_array_rows_are_numbered(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"text": "a"}, "oops"]))
    with pytest.raises(DatasetError, match=r"x.json:row 1: expected a JSON object, got str"):
        list(iter_records(str(path)))
