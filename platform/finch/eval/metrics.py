"""Text metrics for `finch eval`: score one model answer against its row's reference.

`text_scorer(metric)` does the per-metric setup once (compile the regex, build the ROUGE scorer,
check the JSON schema, import the user's function), so a bad metric fails before any model runs,
and returns a function `(answer, reference, example) -> score` called once per row:

- a float score (1.0/0.0 for pass/fail metrics);
- None when the metric does not apply to the row: metrics that compare with a reference return
  None for prompt-only rows (reference None), which `summarize` counts apart from the mean;
- `MetricError` when the row's score could not be computed (the caller records it and goes on).

Metrics that need the model (answer_tokens, perplexity) or an HTTP judge (judge) are computed
elsewhere; `TEXT_METRICS` names the ones handled here.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import numbers
import re
import string
from collections.abc import Callable
from typing import Any

from finch.config import ConfigError, MetricConfig

Scorer = Callable[[str, str | None, dict], float | None]


class MetricError(Exception):
    """One row's metric could not be computed; the message says why (the run goes on)."""


# --- normalization and number extraction -----------------------------------------------------------------

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lowercase, drop punctuation, drop a/an/the, collapse whitespace."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


# A minus sign only when it is not a hyphen inside a word or range ("3-5" is 3 and 5, not 3 and -5);
# then an optional "$", an integer with or without proper thousands groups, an optional decimal part.
# A period not followed by a digit is punctuation, so "is 42." reads as 42.
_NUMBER = re.compile(r"(?:(?<![\w-])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_GSM8K_MARKER = "####"


def _to_float(token: str) -> float:
    return float(token.replace(",", "").replace("$", ""))


def extract_number(text: str) -> float | None:
    """The answer's final number: GSM8K's `#### N` if present, else the last number in the text.

    After the last `####` the first number counts (GSM8K writes "#### 72" and some copies add text
    after it); when `####` is followed by no number, the last number of the whole text is used.
    """
    if _GSM8K_MARKER in text:
        final = _NUMBER.search(text.rsplit(_GSM8K_MARKER, 1)[1])
        if final:
            return _to_float(final.group())
    numbers_found = _NUMBER.findall(text)
    return _to_float(numbers_found[-1]) if numbers_found else None


# --- JSON answers ---------------------------------------------------------------------------------------

# Chat models often wrap JSON in one markdown fence (```json ... ``` or ``` ... ```); the fence is not
# part of the answer's content, so it is accepted. Anything else around the JSON makes it invalid.
_FENCE = re.compile(r"```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```", re.DOTALL | re.IGNORECASE)
_NOT_JSON = object()


def _parse_json(text: str) -> Any:
    """The JSON value in `text` (stripped, optionally fenced), or _NOT_JSON (JSON null is a value)."""
    text = text.strip()
    fenced = _FENCE.fullmatch(text)
    try:
        return json.loads(fenced.group(1) if fenced else text)
    except (ValueError, RecursionError):
        return _NOT_JSON


# --- the scorers ----------------------------------------------------------------------------------------


def _needs_reference(score: Scorer) -> Scorer:
    """Prompt-only rows have no reference: the metric does not apply (None), it does not fail."""

    @functools.wraps(score)
    def scorer(answer: str, reference: str | None, example: dict) -> float | None:
        return None if reference is None else score(answer, reference, example)

    return scorer


def _exact_match(metric: MetricConfig) -> Scorer:
    @_needs_reference
    def score(answer: str, reference: str, example: dict) -> float:
        return float(normalize_answer(answer) == normalize_answer(reference))

    return score


def _numeric_match(metric: MetricConfig) -> Scorer:
    @_needs_reference
    def score(answer: str, reference: str, example: dict) -> float:
        got, want = extract_number(answer), extract_number(reference)
        return float(got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6))

    return score


def _regex(metric: MetricConfig) -> Scorer:
    pattern = re.compile(metric.pattern)

    def score(answer: str, reference: str | None, example: dict) -> float:
        return float(pattern.search(answer) is not None)

    return score


def _contains(metric: MetricConfig) -> Scorer:
    def score(answer: str, reference: str | None, example: dict) -> float | None:
        needle = metric.text if metric.text is not None else reference
        if needle is None:
            return None
        return float(normalize_answer(needle) in normalize_answer(answer))

    return score


def _rouge_l(metric: MetricConfig) -> Scorer:
    from rouge_score import rouge_scorer  # imported here: only runs that use rouge_l pay for it

    rouge = rouge_scorer.RougeScorer(["rougeL"])

    @_needs_reference
    def score(answer: str, reference: str, example: dict) -> float:
        return rouge.score(reference, answer)["rougeL"].fmeasure  # score(target, prediction)

    return score


def _json_valid(metric: MetricConfig) -> Scorer:
    def score(answer: str, reference: str | None, example: dict) -> float:
        return float(_parse_json(answer) is not _NOT_JSON)

    return score


def _json_schema(metric: MetricConfig) -> Scorer:
    import jsonschema
    import referencing.exceptions

    # Check the schema now: an invalid one would otherwise fail (or silently pass) on every row.
    validator_class = jsonschema.validators.validator_for(metric.schema_)
    try:
        validator_class.check_schema(metric.schema_)
    except jsonschema.SchemaError as err:
        raise ConfigError(f"metric {metric.key}: schema is not a valid JSON schema: {err.message}") from None
    validator = validator_class(metric.schema_)

    def score(answer: str, reference: str | None, example: dict) -> float:
        value = _parse_json(answer)
        if value is _NOT_JSON:
            return 0.0
        try:
            return float(validator.is_valid(value))
        except referencing.exceptions.Unresolvable as err:  # a $ref it cannot resolve (remote refs are not fetched)
            raise MetricError(f"schema $ref cannot be resolved: {err}") from err

    return score


def _json_field(metric: MetricConfig) -> Scorer:
    field = metric.field

    @_needs_reference
    def score(answer: str, reference: str, example: dict) -> float:
        expected = _parse_json(reference)
        # A reference without the field is a dataset problem, not a wrong answer: report it, do not score 0.
        if not isinstance(expected, dict) or field not in expected:
            raise MetricError(f"reference is not a JSON object with field {field!r}")
        got = _parse_json(answer)
        return float(isinstance(got, dict) and field in got and got[field] == expected[field])

    return score


def _import_function(metric: MetricConfig) -> Callable[..., Any]:
    path = metric.function
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    try:
        if not module_name or not attribute:
            raise ValueError("expected 'package.module:function'")
        function = functools.reduce(getattr, attribute.split("."), importlib.import_module(module_name))
    except Exception as err:  # any failure importing user code (ImportError, SyntaxError, AttributeError, ...)
        reason = f"{type(err).__name__}: {err}"
        raise ConfigError(f"metric {metric.key}: cannot import function {path!r}: {reason}") from None
    if not callable(function):
        raise ConfigError(f"metric {metric.key}: {path!r} is not callable ({type(function).__name__})")
    return function


def _python(metric: MetricConfig) -> Scorer:
    function, path = _import_function(metric), metric.function

    def score(answer: str, reference: str | None, example: dict) -> float:
        try:
            result = function(answer=answer, reference=reference, example=example)
        except Exception as err:  # the user's code: one row failing must not end the run
            raise MetricError(f"{path} raised {type(err).__name__}: {err}") from err
        if isinstance(result, bool):
            return float(result)
        # NaN is rejected too: one NaN would make the metric's mean NaN.
        if not isinstance(result, numbers.Real) or math.isnan(result):
            raise MetricError(f"{path} returned {result!r} ({type(result).__name__}), not a number or bool")
        return float(result)

    return score


_BUILDERS: dict[str, Callable[[MetricConfig], Scorer]] = {
    "exact_match": _exact_match,
    "numeric_match": _numeric_match,
    "regex": _regex,
    "contains": _contains,
    "rouge_l": _rouge_l,
    "json_valid": _json_valid,
    "json_schema": _json_schema,
    "json_field": _json_field,
    "python": _python,
}

TEXT_METRICS = frozenset(_BUILDERS)


def text_scorer(metric: MetricConfig) -> Scorer:
    """Build the row scorer for a metric in TEXT_METRICS; ConfigError if its settings cannot be used."""
    build = _BUILDERS.get(metric.name)
    if build is None:
        raise ValueError(
            f"metric {metric.key} ({metric.name}) is not computed from the answer text; "
            f"text metrics are {', '.join(sorted(TEXT_METRICS))}"
        )
    return build(metric)


def summarize(values: list[float | None], errors: int) -> dict:
    """One metric over a run: mean of the scored rows; not-applicable rows and errors counted apart."""
    scored = [value for value in values if value is not None]
    return {
        "mean": math.fsum(scored) / len(scored) if scored else None,
        "scored": len(scored),
        "not_applicable": len(values) - len(scored),
        "errors": errors,
    }
