"""Tokenize rendered segments and build labels: only answer tokens carry loss."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from finch.data.readers import DatasetError
from finch.data.templates import Segment, render_prompt, render_sample, special_token_pattern, text_segment

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    full_length: int  # tokens before truncation to max_length

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer prepends BOS on plain encode (Gemma, Llama do; ChatML models don't)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def tokenize_segments(segments: list[Segment], tokenizer: Any, max_length: int) -> TokenizedExample:
    input_ids: list[int] = []
    labels: list[int] = []
    # Segments are encoded without special tokens, so BOS is added here where the tokenizer would
    # add it, unless the text already starts with it (chat templates that write BOS themselves).
    if adds_bos(tokenizer) and not (segments and _template_writes_bos(segments[0], tokenizer)):
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for segment in segments:
        ids = encode_segment(segment, tokenizer)
        if segment.eos_after:
            ids = ids + [tokenizer.eos_token_id]
        input_ids.extend(ids)
        labels.extend(ids if segment.trainable else [IGNORE_INDEX] * len(ids))
    return TokenizedExample(input_ids[:max_length], labels[:max_length], len(input_ids))


def _template_writes_bos(segment: Segment, tokenizer: Any) -> bool:
    """The text starts with BOS and the template wrote it (a user's "<bos>" is only text)."""
    user_bos = segment.user_special_spans[:1] == ((0, len(tokenizer.bos_token)),)
    return segment.text.startswith(tokenizer.bos_token) and not user_bos


def encode_segment(segment: Segment, tokenizer: Any) -> list[int]:
    """Token ids of a segment; special token strings that users wrote become plain text tokens."""
    if not segment.user_special_spans:
        return tokenizer(segment.text, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for start, end, as_text in _pieces(segment, tokenizer):
        # split_special_tokens=True encodes special token strings as text (slow tokenizers too).
        # Fast tokenizers switch it on shared state: a tokenizer must not be used from two threads.
        piece = segment.text[start:end]
        ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]
    return ids


def _pieces(segment: Segment, tokenizer: Any) -> list[tuple[int, int, bool]]:
    """(start, end, as_text) pieces covering the text: each stretch between two of the template's
    own special tokens that holds a user's special token string is a piece encoded as text.

    Tokenizers encode the text between special tokens independently of the rest, so all other
    pieces keep the ids they would have had, and the template's special tokens stay tokens.
    """
    user_spans = segment.user_special_spans
    controls = [
        match.span()
        for match in special_token_pattern(tokenizer).finditer(segment.text)
        if all(end <= match.start() or start >= match.end() for start, end in user_spans)
    ]
    stretch_starts = [0] + [end for _, end in controls]
    stretch_ends = [start for start, _ in controls] + [len(segment.text)]
    pieces, cursor = [], 0
    for start, end in zip(stretch_starts, stretch_ends):
        if any(start <= user_start < end for user_start, _ in user_spans):
            pieces += [(cursor, start, False), (start, end, True)]
            cursor = end
    pieces.append((cursor, len(segment.text), False))
    return [(start, end, as_text) for start, end, as_text in pieces if start < end]


def tokenize_sample(sample: dict[str, Any], template: str, tokenizer: Any, max_length: int) -> TokenizedExample:
    """A normalized sample -> training ids and labels (see templates.render_sample)."""
    return tokenize_segments(render_sample(sample, template, tokenizer), tokenizer, max_length)


def tokenize_text_chunks(text: str, tokenizer: Any, max_length: int) -> list[TokenizedExample]:
    """Continued pre-training: a whole document (BOS/EOS as the tokenizer adds them), every token
    a label, cut into max_length chunks so that nothing of a long document is thrown away.

    Chunks overlap by one token: a chunk's first token has no context in its row, so it is the
    previous chunk's last target and here only context (masked), and every token is predicted once.
    """
    ids = tokenize_segments([text_segment(text, tokenizer)], tokenizer, sys.maxsize).input_ids
    chunks = []
    for start in range(0, max(1, len(ids) - 1), max_length - 1):
        chunk = ids[start : start + max_length]
        labels = ([IGNORE_INDEX] + chunk[1:]) if start else list(chunk)
        chunks.append(TokenizedExample(chunk, labels, len(chunk)))
    return chunks


@dataclass
class PreferenceExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    full_length: int  # prompt + the longer answer, before the answers were cut to fit max_length

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def tokenize_preference(sample: dict[str, Any], template: str, tokenizer: Any, max_length: int) -> PreferenceExample:
    """A preference pair -> shared prompt ids and the two answers' ids, rendered like SFT data.

    Each answer is rendered as the final assistant turn of the conversation, so its tokens (and
    end-of-turn / EOS) are exactly what SFT would train and what inference prompts lead into.
    Answers are cut so that prompt + answer fits max_length; a prompt that fills it leaves
    empty answers, which the pipeline drops.
    """
    prompts, answers = [], []
    for answer in (sample["chosen"], sample["rejected"]):
        conversation = {"messages": [*sample["messages"], {"role": "assistant", "content": answer}]}
        example = tokenize_segments(render_sample(conversation, template, tokenizer), tokenizer, sys.maxsize)
        start, end = final_answer_span(example.labels)
        prompts.append(example.input_ids[:start])
        answers.append(example.input_ids[start:end])
    if prompts[0] != prompts[1]:
        raise DatasetError("the template renders the same prompt differently before the chosen and rejected answers")
    room = max(0, max_length - len(prompts[0]))
    full_length = len(prompts[0]) + max(len(ids) for ids in answers)
    return PreferenceExample(prompts[0], answers[0][:room], answers[1][:room], full_length)


def final_answer_span(labels: list[int]) -> tuple[int, int]:
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def prompt_token_ids(
    messages: list[dict[str, Any]], tokenizer: Any, template: str, tools: list[dict] | None = None
) -> list[int]:
    """Token ids of an inference prompt, built exactly like the start of a training row."""
    segments = render_prompt(messages, template, tokenizer, tools)
    return tokenize_segments(segments, tokenizer, max_length=sys.maxsize).input_ids
