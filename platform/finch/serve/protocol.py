"""OpenAI's request and response shapes, and how they map to vLLM: the requests finch accepts
(chat and text completions), their sampling parameters, and the choices, logprobs and stream
chunks it answers with.

Every field that changes the answer is carried out or refused by name (a 400 naming it); fields
that do not (user, metadata, store, ...) are accepted and ignored.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

# Choices one request may ask for (prompts x n): each is a sequence in vLLM's batch.
MAX_CHOICES = 128


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.kind, self.code, self.headers = status, kind, code, headers


class TextPart(BaseModel):
    type: Literal["text"] = Field(description="Only text parts: this server serves text models.")
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON string.")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @model_validator(mode="after")
    def _has_content(self) -> Message:
        if self.content is None and not self.tool_calls:
            raise ValueError("content is required (only an assistant message with tool_calls may leave it out)")
        return self

    @property
    def text(self) -> str:
        """The content as one string; text parts joined by newlines, as vLLM's server joins them."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (HF's layout: tool call arguments as objects)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": parse_arguments(call.function.arguments)},
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


def parse_arguments(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        raise ValueError(f"tool call arguments are not JSON: {arguments[:80]!r}") from None


class StreamOptions(BaseModel):
    include_usage: bool = False


def check_schema(schema: dict[str, Any]) -> dict[str, Any]:
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        raise ValueError(f"not a valid JSON schema: {err.message}") from None
    return schema


# A request field holding a JSON schema, checked as one when the request is parsed.
JsonSchema = Annotated[dict[str, Any], AfterValidator(check_schema)]


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: JsonSchema = Field(alias="schema", description="The JSON schema every answer must match.")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and only then")
        return self

    def structured_outputs(self) -> Any:
        """vLLM's constraint for this format (None: free text)."""
        from vllm.sampling_params import StructuredOutputsParams

        if self.type == "json_schema":
            return StructuredOutputsParams(json=self.json_schema.schema_)
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        return None


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: JsonSchema = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


# OpenAI fields that change the answer and that this server does not carry out, with the values
# that mean "not used": a request that sets one otherwise is refused naming it, never answered as
# if it had not been sent.
NOT_HONOURED = {
    "functions": (None, []),
    "function_call": (None, "none"),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Answers per prompt.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    # OpenAI's ranges; vLLM would take wider ones.
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = Field(None, description="Token id -> bias in [-100, 100] added to its logit.")
    response_format: ResponseFormat | None = None

    def alternatives(self) -> int | None:
        """How many alternatives to report with each answer token's log-probability (None: no logprobs)."""
        raise NotImplementedError

    def structured_outputs(self) -> Any:
        """vLLM's constraint on the answer (None: free text)."""
        return self.response_format.structured_outputs() if self.response_format else None

    def checked_logit_bias(self, vocab_size: int) -> dict[int, float] | None:
        """logit_bias, refused here (400 naming the token) rather than by vLLM once a stream has begun."""
        for token, bias in (self.logit_bias or {}).items():
            if not 0 <= token < vocab_size:
                raise ApiError(
                    400,
                    f"logit_bias: token id {token} is not in the vocabulary (0-{vocab_size - 1})",
                    code="invalid_parameters",
                )
            if not -100 <= bias <= 100:
                raise ApiError(
                    400, f"logit_bias: bias {bias} for token {token} is outside [-100, 100]", code="invalid_parameters"
                )
        return self.logit_bias or None

    def refuse_unsupported(self) -> None:
        sent = self.model_extra or {}
        for name, unused in NOT_HONOURED.items():
            if name in sent and sent[name] not in unused:
                raise ApiError(
                    400, f"{name}: this server does not support it; leave it out", code="unsupported_parameter"
                )


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatRequest:
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in self.tool_names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    @property
    def tool_names(self) -> list[str]:
        return [tool.function.name for tool in self.tools or []]

    @property
    def calls_tools(self) -> bool:
        """Whether the answer may be tool calls (tools given and tool_choice not 'none')."""
        return bool(self.tools) and self.tool_choice != "none"

    def forced_tool_schema(self) -> dict[str, Any] | None:
        """The JSON an answer must be when tool_choice forces tool calls: a named tool's arguments, or
        with 'required' a list of {"name", "arguments"} calls (one, unless parallel_tool_calls)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return next(t.function.parameters for t in self.tools if t.function.name == self.tool_choice.function.name)
        if self.tool_choice != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in self.tools
        ]
        schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        return schema if self.parallel_tool_calls else schema | {"maxItems": 1}

    def structured_outputs(self) -> Any:
        from vllm.sampling_params import StructuredOutputsParams

        schema = self.forced_tool_schema() if self.tools else None
        if schema is None:
            return super().structured_outputs()
        if self.response_format and self.response_format.type != "text":
            raise ApiError(
                400, "response_format: not with a tool_choice that forces tool calls", code="invalid_parameters"
            )
        return StructuredOutputsParams(json=schema)

    def forced_tool_calls(self, text: str) -> list[dict[str, Any]]:
        """The tool calls of an answer generated under forced_tool_schema (ValueError: the answer was
        cut by max_tokens, so it is no complete JSON and no call)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            json.loads(text)
            return [tool_call(self.tool_choice.function.name, text)]
        return [tool_call(call["name"], json.dumps(call["arguments"])) for call in json.loads(text)]

    def alternatives(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs set to true", code="invalid_parameters")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A prompt, a list of prompts, or prompts as token ids; each gets n answers."
    )
    logprobs: int | None = Field(None, ge=0, le=5)

    def alternatives(self) -> int | None:
        return self.logprobs

    def prompt_list(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)


@dataclass
class Choice:
    """One answer as it comes out of vLLM, delta by delta."""

    index: int
    alternatives: int | None
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)

    def add(self, piece: Any) -> tuple[str, list[dict[str, Any]]]:
        """Take a vLLM CompletionOutput delta; returns its text and logprob entries."""
        entries = logprob_entries(piece, self.alternatives) if self.alternatives is not None else []
        self.text.append(piece.text)
        self.tokens += len(piece.token_ids)
        self.finish_reason = piece.finish_reason or self.finish_reason
        self.logprobs.extend(entries)
        return piece.text, entries


class Answers:
    """The choices of one request, filled from the vLLM outputs of its prompts.

    OpenAI numbers choices prompt by prompt: prompt i's answer j is choice i * n + j. A greedy
    request computes one answer per prompt and copies it n times: vLLM refuses n above 1 when
    greedy, and n greedy answers are the same answer.
    """

    def __init__(self, prompts: int, n: int, samples: int, alternatives: int | None):
        self.n, self.copies = n, n // samples
        self.choices = [Choice(index, alternatives) for index in range(prompts * n)]

    def take(self, prompt_index: int, output: Any) -> list[tuple[Choice, str, list[dict[str, Any]]]]:
        """Add one vLLM output's deltas; returns each choice it changed, with the new text and logprobs."""
        changed = []
        for piece in output.outputs:
            first = prompt_index * self.n + piece.index * self.copies
            for choice in self.choices[first : first + self.copies]:
                changed.append((choice, *choice.add(piece)))
        return changed

    @property
    def completion_tokens(self) -> int:
        return sum(choice.tokens for choice in self.choices)


def logprob_entries(piece: Any, alternatives: int) -> list[dict[str, Any]]:
    """OpenAI's chat logprobs, one entry per answer token: the token, its log-probability and the
    `alternatives` most likely tokens at that step. vLLM returns the top tokens plus the sampled one,
    keyed by id, with their rank."""
    entries = []
    for token_id, candidates in zip(piece.token_ids, piece.logprobs or []):
        chosen = candidates[token_id]
        top = sorted((c for c in candidates.values() if c.rank <= alternatives), key=lambda c: c.rank)
        entries.append(token_entry(chosen) | {"top_logprobs": [token_entry(c) for c in top]})
    return entries


def token_entry(candidate: Any) -> dict[str, Any]:
    token = candidate.decoded_token or ""
    return {"token": token, "logprob": max(candidate.logprob, -9999.0), "bytes": list(token.encode())}


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"content": entries}


def completion_logprobs(entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """The legacy completions layout: parallel lists, text offsets counted from `offset`."""
    offsets, position = [], offset
    for entry in entries:
        offsets.append(position)
        position += len(entry["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


def final_choice(choice: Choice, chat: bool) -> dict[str, Any]:
    answer = "".join(choice.text)
    body: dict[str, Any] = {"index": choice.index, "finish_reason": choice.finish_reason}
    body |= {"message": {"role": "assistant", "content": answer}} if chat else {"text": answer}
    if choice.alternatives is not None:
        body["logprobs"] = chat_logprobs(choice.logprobs) if chat else completion_logprobs(choice.logprobs)
    else:
        body["logprobs"] = None
    return body


def delta_choice(choice: Choice, text: str, entries: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"index": choice.index, "finish_reason": choice.finish_reason}
    body |= {"delta": {"content": text}} if chat else {"text": text}
    if choice.alternatives is not None:
        done = len(choice.logprobs) - len(entries)
        body["logprobs"] = (
            chat_logprobs(entries)
            if chat
            else completion_logprobs(entries, sum(len(e["token"]) for e in choice.logprobs[:done]))
        )
    return body


def tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
