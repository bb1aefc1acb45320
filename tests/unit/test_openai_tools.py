"""Tool calls read from answers: vLLM's Hermes parser under tool_choice 'auto', and answers generated
under a forced tool_choice (named or 'required'), turned into OpenAI's message.tool_calls."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from finch.serve.openai_api import with_tool_calls
from finch.serve.protocol import ChatRequest
from tests.conftest import make_tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
LOOKUP = {"type": "function", "function": {"name": "lookup"}}


def request(**fields) -> ChatRequest:
    return ChatRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, LOOKUP]} | fields
    )


def answer(text: str, finish_reason: str = "stop") -> dict:
    return {"index": 0, "finish_reason": finish_reason, "message": {"role": "assistant", "content": text}}


@pytest.fixture(scope="module")
def hermes():
    from vllm.tool_parsers import ToolParserManager

    return SimpleNamespace(tool_parser=ToolParserManager.get_tool_parser("hermes")(make_tokenizer()))


def test_auto_reads_hermes_tool_calls_and_leaves_plain_answers_as_text(hermes):
    text = 'Let me check. <tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'
    choice = with_tool_calls(hermes, request(), answer(text))
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me check. "
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "weather" and json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    assert call["id"] and call["type"] == "function"
    assert with_tool_calls(hermes, request(), answer("It is sunny.")) == answer("It is sunny.")


def test_forced_tool_choice_answers_become_calls_and_cut_json_stays_text(hermes):
    named = request(tool_choice={"type": "function", "function": {"name": "weather"}})
    assert named.forced_tool_schema() == WEATHER["function"]["parameters"]
    choice = with_tool_calls(hermes, named, answer('{"city":"Paris"}'))
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["weather"] and choice["message"][
        "content"
    ] is None
    required = request(tool_choice="required", parallel_tool_calls=False)
    assert required.forced_tool_schema()["maxItems"] == 1
    calls = with_tool_calls(hermes, required, answer('[{"name":"lookup","arguments":{}}]'))["message"]["tool_calls"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("lookup", "{}")]
    cut = answer('{"city":"Par', finish_reason="length")
    assert with_tool_calls(hermes, named, cut) == cut


def test_tool_requests_that_cannot_work_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="tool_choice names 'nope'"):
        request(tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="not a valid JSON schema"):
        request(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}])
    with pytest.raises(ValueError, match="content is required"):
        ChatRequest.model_validate({"model": "m", "messages": [{"role": "user"}]})
