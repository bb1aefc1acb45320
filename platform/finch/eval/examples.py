"""Evaluation examples: each row's prompt turns and its reference answer.

Rows come in any finch format (formats.normalize). The reference is the final assistant answer
(a preference pair's chosen one); a row whose conversation ends with a user turn is a prompt
without a reference, which only reference-free metrics (JSON validity, regex, judge) score.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from finch.config import EvalDataConfig
from finch.data.formats import kind_of, normalize
from finch.data.readers import DatasetError, check_readable, iter_records
from finch.fingerprint import fingerprint_paths


@dataclass(frozen=True)
class EvalExample:
    index: int
    source: str  # file:line
    messages: list[dict[str, str]]  # the prompt: every turn before the reference answer
    reference: str | None

    @property
    def prompt(self) -> str:
        """The last user turn, for tables and judges."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


def read_examples(data: EvalDataConfig) -> list[EvalExample]:
    """The first data.limit rows of data.files as examples; a bad row stops with file:line."""
    for path in data.files:
        check_readable(path)
    records = itertools.chain.from_iterable(iter_records(path) for path in data.files)
    examples = []
    for index, (source, record) in enumerate(itertools.islice(records, data.limit)):
        sample = normalize(record, data.format, source, data.system_prompt, needs_answer=False)
        examples.append(example_of(index, source, sample))
    if not examples:
        raise DatasetError(f"no rows to evaluate in {', '.join(data.files)}")
    return examples


def example_of(index: int, source: str, sample: dict) -> EvalExample:
    kind = kind_of(sample)
    if kind == "text":
        raise DatasetError(
            f"{source}: a raw text row has no prompt to answer; evaluation needs conversations or prompts"
        )
    messages = sample["messages"]
    if kind == "preference":
        return EvalExample(index, source, messages, sample["chosen"])
    if messages[-1]["role"] == "assistant":
        return EvalExample(index, source, messages[:-1], messages[-1]["content"])
    return EvalExample(index, source, messages, None)


def dataset_fingerprint(data: EvalDataConfig) -> str:
    """What scores are keyed by in the registry: the files' contents plus the rows taken and how."""
    return fingerprint_paths(data.files, extra=f"format={data.format};limit={data.limit};system={data.system_prompt}")
