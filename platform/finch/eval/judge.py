"""LLM-as-judge for `finch eval`: an OpenAI-compatible endpoint scores each answer.

The rubric is sent as one user message with {prompt}, {answer} and {reference} filled in, and the
first number of the judge's reply is the row's score. Every row gets (score, error): a reply
without a number, a timeout, an HTTP error or an unreachable endpoint is an error for that row,
never an exception, so one bad row (or a judge that is down) does not end an eval run.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

from finch.config import JudgeConfig

# The first number of the reply, int or decimal; a minus sign only when it is not a hyphen ("1-10").
_SCORE = re.compile(r"(?:(?<![\w-])-)?\d+(?:\.\d+)?")
# One pass over the rubric, literally: not str.format (rubrics often hold JSON braces), and not a chain of
# str.replace (an answer that contains "{reference}" would get the reference pasted into it).
_PLACEHOLDER = re.compile(r"\{(prompt|answer|reference)\}")
_NO_REFERENCE = "(none)"


def _fill_rubric(rubric: str, prompt: str, answer: str, reference: str | None) -> str:
    values = {"prompt": prompt, "answer": answer, "reference": _NO_REFERENCE if reference is None else reference}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], rubric)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def judge_scores(judge: JudgeConfig, items: list[dict]) -> list[tuple[float | None, str | None]]:
    """(score, error) per item, in item order; items hold prompt, answer and reference (None: no reference)."""
    import openai  # imported here: only runs with a judge metric need it

    api_key = "none"  # local servers (finch serve, vLLM) accept any key, but the client insists on one
    if judge.api_key_env:
        api_key = os.environ.get(judge.api_key_env)
        if api_key is None:
            return [(None, f"judge: environment variable {judge.api_key_env} (api_key_env) is not set")] * len(items)
    # One retry at most: a judge that is down should cost seconds per row, not minutes of back-off.
    client = openai.OpenAI(base_url=judge.url, api_key=api_key, timeout=judge.timeout_s, max_retries=1)

    def score(item: dict) -> tuple[float | None, str | None]:
        content = _fill_rubric(judge.rubric, item["prompt"], item["answer"], item["reference"])
        try:
            response = client.chat.completions.create(
                model=judge.model,
                messages=[{"role": "user", "content": content}],
                temperature=0,
                max_tokens=judge.max_tokens,
            )
            reply = response.choices[0].message.content or ""
        except Exception as err:  # connection refused, timeout, HTTP error, malformed response: this row only
            return None, f"{type(err).__name__}: {_short(str(err))}"
        found = _SCORE.search(reply)
        if found is None:
            return None, f"judge reply has no score: {_short(reply, 80)}"
        return float(found.group()), None

    with client, ThreadPoolExecutor(max_workers=judge.concurrency) as pool:
        return list(pool.map(score, items))
