"""Render normalized samples into text segments that say which parts carry loss.

Training (tokenization.py) and inference (chat, serving) both render through here, so a
model is always prompted exactly the way it was trained.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, replace
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
    # Where a user (message content, a document) wrote a special token's string, such as "<|im_end|>":
    # these spans of text are tokenized as plain text, so user text can never close a turn or end a row.
    user_special_spans: tuple[tuple[int, int], ...] = ()


def resolve_template(template: str, tokenizer: Any) -> str:
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DatasetError("data.template is 'chat' but the tokenizer has no chat template; use 'alpaca'")
    return template


def render_sample(sample: dict[str, Any], template: str, tokenizer: Any) -> list[Segment]:
    if "text" in sample:
        return [text_segment(sample["text"], tokenizer)]
    messages, stashed = _stash_special_strings(sample["messages"], tokenizer)
    segments = _chat_segments(messages, tokenizer) if template == "chat" else _alpaca_segments(messages)
    return _unstash(segments, stashed)


def text_segment(text: str, tokenizer: Any) -> Segment:
    """A raw document, trained on in full; special token strings in it are its own text."""
    spans = tuple(match.span() for match in special_token_pattern(tokenizer).finditer(text))
    return Segment(text, trainable=True, eos_after=True, user_special_spans=spans)


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """messages, led by the system prompt an adapter was trained with unless they bring their own
    (training adds it the same way: formats.normalize)."""
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render_prompt(
    messages: list[dict[str, Any]], template: str, tokenizer: Any, tools: list[dict] | None = None
) -> list[Segment]:
    """The segments a model continues from to produce the next assistant turn.

    Earlier turns render exactly as in training (EOS tokens included), so the prompt's
    token ids are a prefix of what the model saw during training. `tools` (OpenAI function
    definitions) go to chat templates that take them (takes_tools).
    """
    messages, stashed = _stash_special_strings(messages, tokenizer)
    return _unstash(_prompt_segments(messages, template, tokenizer, tools), stashed)


def takes_tools(template: str, tokenizer: Any) -> bool:
    """Whether prompts in `template` can carry tool definitions: a chat template that reads `tools`."""
    return template == "chat" and "tools" in (tokenizer.chat_template or "")


def _prompt_segments(
    messages: list[dict[str, Any]], template: str, tokenizer: Any, tools: list[dict] | None
) -> list[Segment]:
    if template == "chat":
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        return [Segment(text, False)]
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


# Special token strings in message content are swapped for STASH_MARK-delimited indices while the
# template renders, so that afterwards exactly the user's occurrences are known (the template's
# own "<|im_end|>" looks the same). STASH_MARK is a private-use character; one a user wrote is
# stashed too, so that every marker in the rendered text is ours.
STASH_MARK = "\ue000"
_STASHED = re.compile(f"{STASH_MARK}(\\d+){STASH_MARK}")


def _stash_special_strings(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[dict[str, str]], list[str]]:
    special = special_token_pattern(tokenizer)
    if not any(special.search(message["content"]) or STASH_MARK in message["content"] for message in messages):
        return messages, []  # the common case: nothing to stash
    stashable = re.compile(f"{special.pattern}|{STASH_MARK}")
    stashed: list[str] = []

    def stash(match: re.Match[str]) -> str:
        stashed.append(match.group())
        return f"{STASH_MARK}{len(stashed) - 1}{STASH_MARK}"

    return [{**message, "content": stashable.sub(stash, message["content"])} for message in messages], stashed


def _unstash(segments: list[Segment], stashed: list[str]) -> list[Segment]:
    """Put the user's strings back, recording where the special token strings among them lie."""
    if not stashed:
        return segments
    return [_unstash_segment(segment, stashed) for segment in segments]


def _unstash_segment(segment: Segment, stashed: list[str]) -> Segment:
    text, spans, cursor = "", [], 0
    for match in _STASHED.finditer(segment.text):
        original = stashed[int(match.group(1))]
        text += segment.text[cursor : match.start()]
        if original != STASH_MARK:
            spans.append((len(text), len(text) + len(original)))
        text += original
        cursor = match.end()
    return replace(segment, text=text + segment.text[cursor:], user_special_spans=tuple(spans))


# Built once per tokenizer: tokenizing a row must not rebuild it (Gemma has about 6,000 special
# tokens). A tokenizer is not expected to gain special tokens after its first use.
_SPECIAL_TOKEN_PATTERNS: weakref.WeakKeyDictionary[Any, re.Pattern[str]] = weakref.WeakKeyDictionary()


def special_token_pattern(tokenizer: Any) -> re.Pattern[str]:
    """A regex matching the tokenizer's special tokens' strings, longest first as the tokenizer
    matches them (its added tokens that are not special, such as "<think>", stay what they are)."""
    pattern = _SPECIAL_TOKEN_PATTERNS.get(tokenizer)
    if pattern is None:
        strings = {
            token.content for token in tokenizer.added_tokens_decoder.values() if token.special and token.content
        }
        pattern = re.compile(_trie_regex(strings) if strings else "(?!)")  # (?!) never matches
        _SPECIAL_TOKEN_PATTERNS[tokenizer] = pattern
    return pattern


def _trie_regex(strings: set[str]) -> str:
    """One alternative per shared prefix: a flat alternation of thousands of tokens would be tried
    token by token at every "<" of the text."""
    trie: dict[str, dict] = {}
    for string in strings:
        node = trie
        for char in string:
            node = node.setdefault(char, {})
        node[""] = {}  # a token ends here
    return _trie_node_regex(trie)


def _trie_node_regex(node: dict[str, dict]) -> str:
    branches = [re.escape(char) + _trie_node_regex(child) for char, child in node.items() if char]
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    return f"(?:{body})?" if "" in node else body  # greedy: the longest token wins
