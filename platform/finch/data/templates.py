"""Render normalized samples into text segments that say which parts carry loss.

Training (tokenization.py) and inference (chat, serving) both render through here, so a
model is always prompted exactly the way it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finch.data.readers import DatasetError

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
ALPACA_HEADERS = {"user": "### Instruction:\n", "tool": "### Input:\n"}
ALPACA_RESPONSE = "### Response:\n"


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool
    # Plain templates end each answer with the EOS *token* (not its text), so generation stops there.
    eos_after: bool = False


def resolve_template(template: str, tokenizer: Any) -> str:
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DatasetError("data.template is 'chat' but the tokenizer has no chat template; use 'alpaca'")
    return template


def render_sample(sample: dict[str, Any], template: str, tokenizer: Any) -> list[Segment]:
    if "text" in sample:
        return [Segment(sample["text"], trainable=True, eos_after=True)]
    if template == "chat":
        return _chat_segments(sample["messages"], tokenizer)
    return _alpaca_segments(sample["messages"])


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """messages, led by the system prompt an adapter was trained with unless they bring their own
    (training adds it the same way: formats.normalize)."""
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render_prompt(messages: list[dict[str, str]], template: str, tokenizer: Any) -> list[Segment]:
    """The segments a model continues from to produce the next assistant turn.

    Earlier turns render exactly as in training (EOS tokens included), so the prompt's
    token ids are a prefix of what the model saw during training.
    """
    if template == "chat":
        return [Segment(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False)]
    segments = _alpaca_segments(messages)
    if segments and not segments[-1].trainable:
        return segments[:-1] + [Segment(segments[-1].text + ALPACA_RESPONSE, trainable=False)]
    return segments + [Segment("\n\n" + ALPACA_RESPONSE, trainable=False)]


def _alpaca_segments(messages: list[dict[str, str]]) -> list[Segment]:
    segments: list[Segment] = []
    pending = ALPACA_PREAMBLE
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            pending = content.rstrip() + "\n\n"
        elif role == "assistant":
            segments.append(Segment(pending + ALPACA_RESPONSE, trainable=False))
            segments.append(Segment(content, trainable=True, eos_after=True))
            pending = "\n\n"
        else:
            pending += f"{ALPACA_HEADERS[role]}{content}\n\n"
    if pending.strip():
        segments.append(Segment(pending, trainable=False))
    return segments


def _chat_segments(messages: list[dict[str, str]], tokenizer: Any) -> list[Segment]:
    """Find each assistant turn's span by rendering the conversation up to it.

    The chat template renders the whole conversation; the text added between "prompt up to
    turn i" and "conversation through turn i" is that turn's answer (with its end-of-turn
    tokens), which is what carries loss.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    segments: list[Segment] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (through.startswith(prompt) and full.startswith(through) and len(prompt) >= cursor):
            raise DatasetError(
                "the chat template does not render conversations prefix by prefix (it rewrites earlier turns), "
                "so answer tokens cannot be located; use data.template=alpaca or a prefix-stable template"
            )
        segments.append(Segment(full[cursor : len(prompt)], trainable=False))
        segments.append(Segment(full[len(prompt) : len(through)], trainable=True))
        cursor = len(through)
    if cursor < len(full):
        segments.append(Segment(full[cursor:], trainable=False))
    return [segment for segment in segments if segment.text]
