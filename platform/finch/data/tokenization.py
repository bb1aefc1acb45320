"""Tokenize rendered segments and build labels: only answer tokens carry loss."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from finch.data.templates import Segment, render_prompt, render_sample

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer prepends BOS on plain encode (Gemma, Llama do; ChatML models don't)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def tokenize_segments(segments: list[Segment], tokenizer: Any, max_length: int) -> TokenizedExample:
    input_ids: list[int] = []
    labels: list[int] = []
    # Segments are encoded without special tokens, so BOS is added here where the tokenizer would
    # add it, unless the text already starts with it (chat templates that write BOS themselves).
    if adds_bos(tokenizer) and not (segments and segments[0].text.startswith(tokenizer.bos_token)):
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for segment in segments:
        ids = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
        if segment.eos_after:
            ids = ids + [tokenizer.eos_token_id]
        input_ids.extend(ids)
        labels.extend(ids if segment.trainable else [IGNORE_INDEX] * len(ids))
    truncated = len(input_ids) > max_length
    return TokenizedExample(input_ids[:max_length], labels[:max_length], truncated)


def tokenize_sample(sample: dict[str, Any], template: str, tokenizer: Any, max_length: int) -> TokenizedExample:
    """A normalized sample -> training ids and labels (see templates.render_sample)."""
    return tokenize_segments(render_sample(sample, template, tokenizer), tokenizer, max_length)


def prompt_token_ids(messages: list[dict[str, str]], tokenizer: Any, template: str) -> list[int]:
    """Token ids of an inference prompt, built exactly like the start of a training row."""
    segments = render_prompt(messages, template, tokenizer)
    return tokenize_segments(segments, tokenizer, max_length=sys.maxsize).input_ids
