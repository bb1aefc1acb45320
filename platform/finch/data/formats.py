"""Normalize the common dataset row formats into one shape.

A normalized sample is one of
- {"messages": [{"role", "content"}, ...]}: instruction data, trained on the assistant turns;
- {"text": str}: raw text, trained on every token;
- {"messages": [...prompt turns], "chosen": str, "rejected": str}: a preference pair (DPO).
"""

from __future__ import annotations

from typing import Any

from finch.data.readers import DatasetError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}


PREFERENCE_FORMATS = ("openai_dpo", "sharegpt_preference", "prompt_chosen_rejected")


def detect_format(record: dict[str, Any]) -> str:
    if "preferred_output" in record:
        return "openai_dpo"
    if "chosen" in record and "conversations" in record:
        return "sharegpt_preference"
    if "chosen" in record and "rejected" in record:
        return "prompt_chosen_rejected"
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    raise DatasetError(
        f"cannot tell the row format from its keys {sorted(record)}; expected one of: "
        "messages (OpenAI), conversations (ShareGPT), instruction/input/output (Alpaca), "
        "prompt/completion, text; preference pairs: input/preferred_output/non_preferred_output (OpenAI DPO), "
        "conversations/chosen/rejected (ShareGPT), prompt/chosen/rejected"
    )


def normalize(
    record: dict[str, Any], fmt: str, source: str, system_prompt: str | None = None, needs_answer: bool = True
) -> dict[str, Any]:
    """Return the normalized sample of one row; errors name `source` (file:line) and the field.
    `needs_answer` False lets a conversation end with its prompt (evaluation rows judged without a reference)."""
    try:
        fmt = detect_format(record) if fmt == "auto" else fmt
        if fmt == "text":
            return {"text": _string(record, "text", allow_empty=False)}
        if fmt in PREFERENCE_FORMATS:
            messages, chosen, rejected = _PREFERENCE_NORMALIZERS[fmt](record)
            sample = {"messages": messages, "chosen": chosen, "rejected": rejected}
        else:
            messages = _NORMALIZERS[fmt](record)
            sample = {"messages": messages}
    except DatasetError as err:
        raise DatasetError(f"{source}: {err}") from None
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    _check_turn_order(messages, source)
    if "chosen" in sample:
        if messages[-1]["role"] == "assistant":
            raise DatasetError(f"{source}: the prompt of a preference pair ends with an assistant turn")
    elif needs_answer:
        _check_has_answer(messages, source)
    return sample


def kind_of(sample: dict[str, Any]) -> str:
    """'text', 'conversation' or 'preference': what a normalized sample can train."""
    if "text" in sample:
        return "text"
    return "preference" if "chosen" in sample else "conversation"


def _alpaca(record: dict[str, Any]) -> list[dict[str, str]]:
    instruction = _string(record, "instruction", allow_empty=False)
    extra = _string(record, "input") if record.get("input") is not None else ""
    messages = [{"role": "system", "content": _string(record, "system")}] if record.get("system") else []
    messages.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction})
    messages.append({"role": "assistant", "content": _string(record, "output", allow_empty=False)})
    return messages


def _openai_messages(record: dict[str, Any], field: str = "messages") -> list[dict[str, str]]:
    turns = _turn_list(record, field)
    messages = []
    for index, turn in enumerate(turns):
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise DatasetError(f"field {field}[{index}].role: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DatasetError(f"field {field}[{index}].content: expected a string, got {type(content).__name__}")
        _check_answer(role, content, f"{field}[{index}].content")
        messages.append({"role": role, "content": content})
    return messages


def _sharegpt(record: dict[str, Any]) -> list[dict[str, str]]:
    turns = _turn_list(record, "conversations")
    messages = [{"role": "system", "content": _string(record, "system")}] if record.get("system") else []
    for index, turn in enumerate(turns):
        speaker, value = turn.get("from"), turn.get("value")
        if speaker not in SHAREGPT_ROLES:
            raise DatasetError(
                f"field conversations[{index}].from: {speaker!r} is not one of {', '.join(SHAREGPT_ROLES)}"
            )
        if not isinstance(value, str):
            raise DatasetError(f"field conversations[{index}].value: expected a string, got {type(value).__name__}")
        _check_answer(SHAREGPT_ROLES[speaker], value, f"conversations[{index}].value")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return messages


def _prompt_completion(record: dict[str, Any]) -> list[dict[str, str]]:
    prompt, completion = record.get("prompt"), record.get("completion")
    # TRL's conversational variant: prompt and completion are lists of messages.
    if isinstance(prompt, list) and isinstance(completion, list):
        return _openai_messages(record, "prompt") + _openai_messages(record, "completion")
    return [
        {"role": "user", "content": _string(record, "prompt", allow_empty=False)},
        {"role": "assistant", "content": _string(record, "completion", allow_empty=False)},
    ]


def _openai_dpo(record: dict[str, Any]) -> tuple[list[dict[str, str]], str, str]:
    """OpenAI's DPO fine-tuning format: input.messages + preferred_output / non_preferred_output."""
    source = record.get("input")
    if not isinstance(source, dict):
        raise DatasetError("field input: expected an object holding messages")
    prompt = _openai_messages(source)
    return prompt, _single_answer(record, "preferred_output"), _single_answer(record, "non_preferred_output")


def _sharegpt_preference(record: dict[str, Any]) -> tuple[list[dict[str, str]], str, str]:
    """LLaMA-Factory's ShareGPT preference format: conversations + chosen / rejected turns."""
    prompt = _sharegpt(record)
    answers = []
    for field in ("chosen", "rejected"):
        turn = record.get(field)
        if not isinstance(turn, dict) or SHAREGPT_ROLES.get(turn.get("from")) != "assistant":
            raise DatasetError(f"field {field}: expected an assistant turn like {{'from': 'gpt', 'value': ...}}")
        answers.append(_string(turn, "value", allow_empty=False, name=f"{field}.value"))
    return prompt, answers[0], answers[1]


def _prompt_chosen_rejected(record: dict[str, Any]) -> tuple[list[dict[str, str]], str, str]:
    """TRL's preference format: prompt + chosen / rejected, as strings or as message lists."""
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        messages = _openai_messages(record, "prompt")
    else:
        messages = [{"role": "user", "content": _string(record, "prompt", allow_empty=False)}]
    return messages, _single_answer(record, "chosen"), _single_answer(record, "rejected")


def _single_answer(record: dict[str, Any], field: str) -> str:
    """An answer given as a string, or as a list holding one assistant message."""
    value = record.get(field)
    if isinstance(value, list):
        turns = _openai_messages(record, field)
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise DatasetError(f"field {field}: expected one assistant message")
        return turns[0]["content"]
    return _string(record, field, allow_empty=False)


def _turn_list(record: dict[str, Any], field: str) -> list[dict[str, Any]]:
    turns = record.get(field)
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"field {field}: expected a non-empty list of turns")
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DatasetError(f"field {field}[{index}]: expected an object, got {type(turn).__name__}")
    return turns


def _string(record: dict[str, Any], field: str, allow_empty: bool = True, name: str | None = None) -> str:
    """record[field] as a string; errors call it `name` (its path in the row), default `field`."""
    name = name or field
    value = record.get(field)
    if value is None:
        raise DatasetError(f"missing field {name!r}")
    if not isinstance(value, str):
        raise DatasetError(f"field {name}: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DatasetError(f"field {name} is empty")
    return value


def _check_answer(role: str, content: str, name: str) -> None:
    # An empty answer would teach the model to stop at once; checked where the field name is known.
    if role == "assistant" and not content.strip():
        raise DatasetError(f"field {name} is empty")


def _check_has_answer(messages: list[dict[str, str]], source: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{source}: conversation has no assistant turn, so nothing to train on")


def _check_turn_order(messages: list[dict[str, str]], source: str) -> None:
    if any(m["role"] == "system" for m in messages[1:]):
        raise DatasetError(f"{source}: a system message may only come first in a conversation")
    if messages[0]["role"] == "assistant":
        raise DatasetError(f"{source}: conversation starts with an assistant turn; it needs a prompt first")
    if len(messages) == 1 and messages[0]["role"] == "system":
        raise DatasetError(f"{source}: conversation holds only a system message")


_NORMALIZERS = {
    "alpaca": _alpaca,
    "messages": _openai_messages,
    "sharegpt": _sharegpt,
    "prompt_completion": _prompt_completion,
}
_PREFERENCE_NORMALIZERS = {
    "openai_dpo": _openai_dpo,
    "sharegpt_preference": _sharegpt_preference,
    "prompt_chosen_rejected": _prompt_chosen_rejected,
}
