import json
from pathlib import Path

import pytest

from finch.config import ConfigError, MetricConfig
from finch.eval.metrics import TEXT_METRICS, MetricError, extract_number, normalize_answer, summarize, text_scorer

GSM8K = Path(__file__).parents[1] / "data" / "sft" / "gsm8k_chat_train.jsonl"


def score(spec: dict | str, answer: str, reference: str | None = None, example: dict | None = None) -> float | None:
    return text_scorer(MetricConfig.model_validate(spec))(answer, reference, example or {})


# User metric functions, referenced by path as a config would.
def length_ratio(answer, reference, example):
    return len(answer) / len(reference)


def starts_with_expected(answer, reference, example):
    return answer.startswith(example["expected_start"])


def explodes(answer, reference, example):
    raise KeyError("no such key")


def returns_text(answer, reference, example):
    return "high"


NOT_A_FUNCTION = 3
THIS_MODULE = "tests.unit.test_eval_metrics"


def test_normalize_answer_is_squad_style():
    assert normalize_answer("  The Eiffel-Tower, in PARIS!  ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theory of another") == "theory of another"  # articles only as whole words


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She has 5 apples, then 7.", 7.0),
        ("The total is $1,234.50", 1234.5),
        ("It drops to -3 degrees", -3.0),
        ("The answer is 42.", 42.0),
        ("From 3-5 pages", 5.0),
        ("Cost: -$12", -12.0),
        ("Steps: 1000 then 2.\n#### 18", 18.0),
        ("#### 1 then #### 2 more text 99", 2.0),
        ("#### none here, so the last: 7", 7.0),
        ("no digits at all", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def gsm8k_answers() -> list[str]:
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:5]]
    return [row["messages"][-1]["content"] for row in rows]


def test_gsm8k_final_answer_on_real_rows():
    answers = gsm8k_answers()
    # The numbers after '####' in the first 5 rows, read by hand; earlier numbers (48/2=24, $<<0.2*50=10>>...)
    # and the '!!!' this copy appends must not change the result.
    assert [extract_number(answer) for answer in answers] == [72.0, 10.0, 5.0, 42.0, 624.0]
    numeric_match = text_scorer(MetricConfig(name="numeric_match"))
    for answer in answers:
        assert numeric_match(answer, answer, {}) == 1.0
        wrong = answer.rsplit("####", 1)[0] + "#### 1"
        assert numeric_match(wrong, answer, {}) == 0.0


@pytest.mark.parametrize(
    "answer, reference, expected",
    [
        ("The answer is 1,000.", "#### 1000", 1.0),
        ("0.1 + 0.2 = 0.30000000000000004", "0.3", 1.0),
        ("about 12", "#### 13", 0.0),
        ("I do not know", "#### 13", 0.0),
        ("13", "no number in the reference", 0.0),
    ],
)
def test_numeric_match(answer, reference, expected):
    assert score("numeric_match", answer, reference) == expected


def test_exact_match():
    assert score("exact_match", "The Paris.", "paris") == 1.0
    assert score("exact_match", "Paris, France", "paris") == 0.0


def test_regex_searches_the_answer():
    spec = {"name": "regex", "pattern": r"\bSELECT\b.+\bFROM\b"}
    assert score(spec, "Query: SELECT name FROM users;") == 1.0
    assert score(spec, "select name from users") == 0.0


def test_contains_uses_text_else_reference():
    assert score({"name": "contains", "text": "The Capital"}, "Paris is the capital of France.") == 1.0
    assert score({"name": "contains", "text": "capital"}, "Paris is in France.") == 0.0
    assert score({"name": "contains", "text": "capital"}, "the capital", reference=None) == 1.0
    assert score("contains", "I think it's Paris!", "paris") == 1.0
    assert score("contains", "I think it's Lyon!", "paris") == 0.0


def test_rouge_l_f_measure():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5 words: P = 5/5, R = 5/6, F = 2PR/(P+R) = 10/11.
    assert score("rouge_l", "the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert score("rouge_l", "The cat sat on the mat.", "the cat sat on the mat") == pytest.approx(1.0)
    assert score("rouge_l", "dogs bark", "the cat sat on the mat") == 0.0


@pytest.mark.parametrize("name", ["exact_match", "numeric_match", "contains", "rouge_l", "json_field"])
def test_reference_metrics_do_not_apply_to_prompt_only_rows(name):
    spec = {"name": name, "field": "x"} if name == "json_field" else name
    assert score(spec, '{"x": 1} 42', None) is None


@pytest.mark.parametrize(
    "answer, expected",
    [
        ('{"name": "Ada", "age": 36}', 1.0),
        ("  [1, 2, 3]\n", 1.0),
        ('```json\n{"name": "Ada"}\n```', 1.0),
        ('```\n{"name": "Ada"}\n```', 1.0),
        ('Sure! Here it is: {"name": "Ada"}', 0.0),
        ("{'name': 'Ada'}", 0.0),
        ('```json\n{"name": \n```', 0.0),
    ],
)
def test_json_valid(answer, expected):
    assert score("json_valid", answer) == expected


SCHEMA = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}


def test_json_schema_validates_the_parsed_answer():
    spec = {"name": "json_schema", "schema": SCHEMA}
    assert score(spec, '{"age": 36}') == 1.0
    assert score(spec, '```json\n{"age": 36, "name": "Ada"}\n```') == 1.0
    assert score(spec, '{"age": "36"}') == 0.0
    assert score(spec, '{"name": "Ada"}') == 0.0
    assert score(spec, "age: 36") == 0.0


def test_invalid_schema_fails_when_the_scorer_is_built():
    metric = MetricConfig.model_validate({"name": "json_schema", "label": "person_shape", "schema": {"type": "integr"}})
    with pytest.raises(ConfigError, match="metric person_shape: schema is not a valid JSON schema"):
        text_scorer(metric)


def test_json_field_compares_one_key():
    spec = {"name": "json_field", "field": "intent"}
    reference = '{"intent": "refund", "amount": 20}'
    assert score(spec, '{"intent": "refund", "amount": 99}', reference) == 1.0
    assert score(spec, '```json\n{"intent": "refund"}\n```', reference) == 1.0
    assert score(spec, '{"intent": "cancel", "amount": 20}', reference) == 0.0
    assert score(spec, '{"amount": 20}', reference) == 0.0
    assert score(spec, '["intent", "refund"]', reference) == 0.0
    assert score(spec, "intent: refund", reference) == 0.0


def test_json_field_reports_a_reference_without_the_field():
    with pytest.raises(MetricError, match="reference is not a JSON object with field 'intent'"):
        score({"name": "json_field", "field": "intent"}, '{"intent": "refund"}', "refund")


def test_python_metric_is_called_with_keywords():
    spec = {"name": "python", "function": "tests.unit.test_eval_metrics:length_ratio"}
    assert score(spec, "abc", "abcdef") == 0.5
    dotted = {"name": "python", "function": "tests.unit.test_eval_metrics.starts_with_expected"}
    assert score(dotted, "Dear Ada,", None, {"expected_start": "Dear"}) == 1.0
    assert score(dotted, "Hi Ada,", None, {"expected_start": "Dear"}) == 0.0


@pytest.mark.parametrize(
    "function, message",
    [
        ("tests.unit.no_such_module:length_ratio", "cannot import function 'tests.unit.no_such_module:length_ratio'"),
        (f"{THIS_MODULE}:nothing", f"cannot import function '{THIS_MODULE}:nothing'"),
        ("length_ratio", "cannot import function 'length_ratio'"),
        (f"{THIS_MODULE}:NOT_A_FUNCTION", rf"'{THIS_MODULE}:NOT_A_FUNCTION' is not callable \(int\)"),
    ],
)
def test_python_metric_that_cannot_be_imported_fails_at_build(function, message):
    metric = MetricConfig(name="python", label="mine", function=function)
    with pytest.raises(ConfigError, match=f"metric mine: {message}"):
        text_scorer(metric)


@pytest.mark.parametrize(
    "function, message",
    [
        ("explodes", r"tests.unit.test_eval_metrics:explodes raised KeyError: 'no such key'"),
        ("returns_text", r"tests.unit.test_eval_metrics:returns_text returned 'high' \(str\), not a number or bool"),
    ],
)
def test_python_metric_row_failures_are_metric_errors(function, message):
    scorer = text_scorer(MetricConfig(name="python", function=f"tests.unit.test_eval_metrics:{function}"))
    with pytest.raises(MetricError, match=message):
        scorer("answer", "reference", {})


@pytest.mark.parametrize("name", ["answer_tokens", "perplexity"])
def test_model_side_metrics_are_not_text_metrics(name):
    assert name not in TEXT_METRICS
    with pytest.raises(ValueError, match=f"metric {name} .* not computed from the answer text"):
        text_scorer(MetricConfig(name=name))


def test_judge_is_not_a_text_metric():
    judge = {"url": "http://127.0.0.1:1/v1", "model": "m", "rubric": "{answer}"}
    assert "judge" not in TEXT_METRICS
    with pytest.raises(ValueError, match="not computed from the answer text"):
        text_scorer(MetricConfig(name="judge", judge=judge))


def test_summarize_counts_not_applicable_and_errors_apart():
    assert summarize([1.0, 0.0, None, 0.5], errors=2) == {"mean": 0.5, "scored": 3, "not_applicable": 1, "errors": 2}
    assert summarize([None, None], errors=0) == {"mean": None, "scored": 0, "not_applicable": 2, "errors": 0}
