"""The OpenAI routes of `finch serve`'s HTTP API, over a `ServingEngine`: /v1/models,
/v1/chat/completions and /v1/completions (plain and SSE streaming), and how they generate: which
model a request names, its sampling parameters, tool calls, and the answer or event stream.

Chat prompts are rendered with the template each adapter was trained with (its manifest), via
the same code that built its training rows, so served prompt ids equal training ids. Refusals are
`ApiError`s, answered as OpenAI-style JSON by middleware.py's handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from finch.data.templates import takes_tools, with_system_prompt
from finch.data.tokenization import prompt_token_ids
from finch.registry.store import RegistryEntry, RegistryError
from finch.serve import metrics
from finch.serve.engine import ZERO_ADAPTER, AdapterRefused, EngineFull, ServingEngine
from finch.serve.protocol import (
    MAX_CHOICES,
    Answers,
    ApiError,
    ChatRequest,
    CompletionRequest,
    SamplingRequest,
    delta_choice,
    final_choice,
    usage,
)
from finch.serve.state import ApiState

BASE_MODEL = "base"


def openai_routes(state: ApiState) -> APIRouter:
    """/v1/models, /v1/chat/completions and /v1/completions, unguarded here: `api.build_api` puts
    them behind the API key."""
    router = APIRouter()

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        pinned = [name for name in state.engine.adapters if name != ZERO_ADAPTER]
        on_demand = await asyncio.to_thread(state.engine.on_demand_names)  # reads the registry
        served = [BASE_MODEL, *pinned, *sorted(set(on_demand) - set(pinned))]
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": created, "owned_by": "finch"} for m in served],
        }

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        body.refuse_unsupported()
        target = await route(state, body.model)
        return await respond(state, body, target.adapter, [chat_prompt(state, body, target)], chat=True)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest):
        body.refuse_unsupported()
        adapter = (await route(state, body.model)).adapter
        prompts = [
            checked_token_ids(p, len(state.tokenizer)) if isinstance(p, list) else state.tokenizer(p)["input_ids"]
            for p in body.prompt_list()
        ]
        return await respond(state, body, adapter, prompts, chat=False)

    return router


@dataclass
class Route:
    adapter: str | None  # for ServingEngine.generate: None (base), a pinned served name, or an on-demand ref
    entry: RegistryEntry | None  # the registry entry: its template and training system prompt


async def route(state: ApiState, model: str) -> Route:
    """resolve_model, after catching up with the other replicas if this one does not serve `model` yet."""
    try:
        target = await resolve_model(state, model)
    except ApiError as err:
        if err.status != 404:
            raise
        await state.replica_adapters.sync()
        target = await resolve_model(state, model)
    metrics.routed(target.adapter)
    return target


async def resolve_model(state: ApiState, model: str) -> Route:
    """What a request's `model` names: the base model, a pinned adapter, or a registry adapter served on demand."""
    if model in (BASE_MODEL, state.config.model.path):
        return Route(None, None)
    name, _, version = model.partition("@")
    pinned = state.engine.adapters.get(name) if name != ZERO_ADAPTER else None
    if pinned is not None and (not version or version.lstrip("v") == str(pinned.entry.version)):
        return Route(name, pinned.entry)
    if state.engine.servable(name):
        try:
            entry = await asyncio.to_thread(state.engine.on_demand_entry, model)  # reads the registry
        except AdapterRefused as err:
            raise ApiError(409, str(err), code="adapter_refused") from None
        except RegistryError as err:
            raise ApiError(404, str(err), code="model_not_found") from None
        return Route(entry.ref, entry)
    if pinned is not None:
        raise ApiError(404, f"model {model!r}: this server has {pinned.ref} loaded as {name!r}", code="model_not_found")
    raise ApiError(404, f"model {model!r} is not served; GET /v1/models lists what is", code="model_not_found")


def chat_prompt(state: ApiState, body: ChatRequest, target: Route) -> list[int]:
    """The conversation's prompt ids, rendered in the template and with the system prompt the model was trained with."""
    template = target.entry.manifest["template"] if target.entry else state.base_template
    tools = tool_definitions(state, body, template)
    try:
        messages = [m.for_template() for m in body.messages]
        messages = with_system_prompt(
            messages, target.entry.system_prompt if target.entry else state.base_system_prompt
        )
        return prompt_token_ids(messages, state.tokenizer, template, tools)
    except Exception as err:  # a conversation the template cannot render
        raise ApiError(400, f"cannot render these messages: {err}") from None


def sampling_params(state: ApiState, body: SamplingRequest, prompt_length: int) -> Any:
    from vllm.exceptions import VLLMClientError

    limits = state.config
    room = limits.engine.max_model_len - prompt_length
    if room <= 0:
        raise ApiError(
            400,
            f"prompt is {prompt_length} tokens; this server takes at most {limits.engine.max_model_len - 1}",
            code="context_length_exceeded",
        )
    requested = body.max_completion_tokens or body.max_tokens
    if requested is not None and requested > limits.server.max_tokens_limit:
        raise ApiError(
            422,
            f"max_tokens {requested} is above this server's limit of {limits.server.max_tokens_limit}",
            code="invalid_parameters",
        )
    if requested is not None and requested > room:
        raise ApiError(
            400,
            f"prompt ({prompt_length}) + max_tokens ({requested}) exceed the context of {limits.engine.max_model_len} tokens",
            code="context_length_exceeded",
        )
    try:
        return vllm_sampling_params(state, body, requested or min(room, limits.server.max_tokens_limit))
    except VLLMClientError as err:  # a combination vLLM refuses
        raise ApiError(400, str(err), code="invalid_parameters") from None


def vllm_sampling_params(state: ApiState, body: SamplingRequest, max_tokens: int) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=max_tokens,
        stop=body.stop,
        seed=body.seed,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        logit_bias=body.checked_logit_bias(len(state.tokenizer)),
        stop_token_ids=state.stop_token_ids,
        n=body.n if body.temperature > 0 else 1,  # see protocol.Answers
        logprobs=body.alternatives(),
        structured_outputs=body.structured_outputs(),
        output_kind=RequestOutputKind.DELTA,
    )


def tool_definitions(state: ApiState, body: ChatRequest, template: str) -> list[dict[str, Any]] | None:
    """The request's tools as the chat template takes them; refused (400 naming the field) where the
    model's template has no place for them, or where tool_choice 'auto' has no parser for the answer."""
    if not body.tools:
        return None
    if not takes_tools(template, state.tokenizer):
        where = "the alpaca template" if template == "alpaca" else "a chat template that does not read `tools`"
        raise ApiError(
            400,
            f"tools: model {body.model!r} is prompted with {where}; it cannot be given tools",
            code="unsupported_parameter",
        )
    if body.calls_tools and body.forced_tool_schema() is None and state.tool_parser is None:
        raise ApiError(
            400,
            "tool_choice: 'auto' (the default with tools) needs server.tool_parser to read tool calls from "
            'answers; set it, or force a tool with tool_choice \'required\' or {"type": "function", ...}',
            code="unsupported_parameter",
        )
    return [tool.model_dump(exclude_none=True) for tool in body.tools]


def with_tool_calls(state: ApiState, body: ChatRequest, choice: dict[str, Any]) -> dict[str, Any]:
    """A chat choice whose answer is tool calls, in OpenAI's layout (message.tool_calls, finish_reason
    'tool_calls'). An answer cut by max_tokens, or with no call in it, stays text."""
    message = choice["message"]
    if body.forced_tool_schema() is not None:
        try:
            calls, content = body.forced_tool_calls(message["content"]), None
        except ValueError:  # cut JSON (finish_reason 'length')
            return choice
    else:
        found = state.tool_parser.extract_tool_calls(message["content"], vllm_chat_request(body))
        if not found.tools_called:
            return choice
        calls, content = [call.model_dump() for call in found.tool_calls], found.content
    return choice | {
        "message": {"role": "assistant", "content": content, "tool_calls": calls},
        "finish_reason": "tool_calls",
    }


def vllm_chat_request(body: ChatRequest) -> Any:
    """vLLM's request type, which its tool parsers read the tools from."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate(
        {"model": body.model, "messages": [], "tools": [tool.model_dump(exclude_none=True) for tool in body.tools]}
    )


def checked_token_ids(ids: list[int], vocab_size: int) -> list[int]:
    """A prompt sent as token ids, refused here (400) rather than by vLLM if an id is out of range."""
    if any(not 0 <= token < vocab_size for token in ids):
        raise ApiError(400, f"prompt: token ids must be in 0-{vocab_size - 1}", code="invalid_parameters")
    return ids


async def respond(state: ApiState, body: SamplingRequest, adapter: str | None, prompts: list[list[int]], chat: bool):
    """Generate `body.n` answers for each prompt; a JSON answer or, with `stream`, server-sent events."""
    from vllm.exceptions import VLLMClientError

    if any(not ids for ids in prompts):  # vLLM fails an empty prompt deep inside the engine
        raise ApiError(400, "the prompt is empty", code="empty_prompt")
    if len(prompts) * body.n > MAX_CHOICES:
        raise ApiError(
            400,
            f"n: {len(prompts)} prompts x n={body.n} answers is over {MAX_CHOICES} per request",
            code="invalid_parameters",
        )
    params = [sampling_params(state, body, len(ids)) for ids in prompts]
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    answers = Answers(len(prompts), body.n, params[0].n, body.alternatives())
    outputs = merged_outputs(state.engine, prompts, params, adapter, request_id)
    prompt_tokens = sum(len(ids) for ids in prompts)
    timeout = state.config.server.request_timeout_s
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        # A stream starts once the first output is in: what the engine refuses is still a 4xx.
        async with asyncio.timeout_at(deadline):
            first = await anext(outputs)
        metrics.first_output(prompt_tokens, answers)
        if body.stream and not tool_answers(body):
            events = stream_events(outputs, first, answers, body, request_id, chat, deadline, prompt_tokens)
            return StreamingResponse(events, media_type="text/event-stream")
        async with asyncio.timeout_at(deadline), contextlib.aclosing(outputs):
            answers.take(*first)
            async for item in outputs:
                answers.take(*item)
    except TimeoutError:
        await outputs.aclose()
        raise ApiError(504, f"generation took longer than {timeout} s", "timeout_error", "timeout") from None
    except EngineFull as err:
        raise ApiError(
            503, str(err), "server_error", "engine_full", {"Retry-After": str(state.config.server.retry_after_s)}
        ) from None
    except AdapterRefused as err:  # vLLM could not load an on-demand adapter
        raise ApiError(409, str(err), code="adapter_refused") from None
    except RegistryError as err:  # the adapter was unloaded between routing and generation
        raise ApiError(404, str(err), code="model_not_found") from None
    except VLLMClientError as err:  # what the engine refuses in this request
        raise ApiError(400, str(err), code="invalid_parameters") from None
    choices = [final_choice(choice, chat) for choice in answers.choices]
    if tool_answers(body):
        choices = [with_tool_calls(state, body, choice) for choice in choices]
    answer = {
        "id": request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": choices,
        "usage": usage(prompt_tokens, answers.completion_tokens),
    }
    if body.stream:  # answers that may be tool calls are read whole, then sent as one chunk per choice
        return StreamingResponse(replayed_events(answer, body), media_type="text/event-stream")
    return answer


def tool_answers(body: SamplingRequest) -> bool:
    return isinstance(body, ChatRequest) and body.calls_tools


async def replayed_events(answer: dict[str, Any], body: SamplingRequest):
    """A whole chat answer as server-sent chunks: each choice's message as one delta, then its finish."""

    def chunk(choice: dict[str, Any] | None, **extra: Any) -> str:
        event = {
            "id": answer["id"],
            "object": "chat.completion.chunk",
            "created": answer["created"],
            "model": answer["model"],
            "choices": [choice] if choice else [],
        }
        return f"data: {json.dumps(event | extra)}\n\n"

    for choice in answer["choices"]:
        message = choice["message"]
        delta = {"role": "assistant", "content": message["content"]}
        if message.get("tool_calls"):
            delta["tool_calls"] = [call | {"index": index} for index, call in enumerate(message["tool_calls"])]
        yield chunk({"index": choice["index"], "delta": delta, "finish_reason": None})
        yield chunk({"index": choice["index"], "delta": {}, "finish_reason": choice["finish_reason"]})
    if body.stream_options and body.stream_options.include_usage:
        yield chunk(None, usage=answer["usage"])
    yield "data: [DONE]\n\n"


async def merged_outputs(
    engine: ServingEngine, prompts: list[list[int]], params: list[Any], adapter: str | None, request_id: str
) -> AsyncIterator[tuple[int, Any]]:
    """(prompt index, vLLM output) from one engine request per prompt, as they come. Closing this
    generator cancels the requests still running (vLLM aborts them)."""
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for output in engine.generate(prompts[index], params[index], adapter, f"{request_id}-{index}"):
                await queue.put((index, output, None))
            await queue.put((index, None, None))
        except Exception as err:  # handed to the consumer, which raises it
            await queue.put((index, None, err))

    tasks = [asyncio.create_task(pump(index)) for index in range(len(prompts))]
    try:
        running = len(tasks)
        while running:
            index, output, error = await queue.get()
            if error is not None:
                raise error
            if output is None:
                running -= 1
            else:
                yield index, output
    finally:
        for task in tasks:
            task.cancel()


async def stream_events(
    outputs: AsyncIterator[tuple[int, Any]],
    first: tuple[int, Any],
    answers: Answers,
    body: SamplingRequest,
    request_id: str,
    chat: bool,
    deadline: float,
    prompt_tokens: int,
):
    """Server-sent events in OpenAI's chunk format, one choice per chunk, ending with `data: [DONE]`."""
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choice: dict[str, Any] | None, counts: dict[str, int] | None = None) -> str:
        chunk = {
            "id": request_id,
            "object": kind,
            "created": created,
            "model": body.model,
            "choices": [choice] if choice else [],
        }
        if counts is not None:
            chunk["usage"] = counts
        return f"data: {json.dumps(chunk)}\n\n"

    def events(item: tuple[int, Any]) -> list[str]:
        return [
            event(delta_choice(choice, text, entries, chat))
            for choice, text, entries in answers.take(*item)
            if text or entries or choice.finish_reason
        ]

    if chat:
        for choice in answers.choices:
            yield event({"index": choice.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    async with contextlib.aclosing(outputs) as stream:
        for chunk in events(first):
            yield chunk
        try:
            while True:
                # The deadline covers waiting for vLLM only. A timeout around the yields too would fire
                # while this generator is suspended in Starlette's send and cancel the response there,
                # cutting the stream without the error event and [DONE].
                async with asyncio.timeout_at(deadline):
                    item = await anext(stream, None)
                if item is None:
                    break
                for chunk in events(item):
                    yield chunk
        except TimeoutError:
            timeout = {
                "message": "generation took longer than the server's request_timeout_s",
                "type": "timeout_error",
                "code": "timeout",
            }
            yield f"data: {json.dumps({'error': timeout})}\n\n"
    if body.stream_options and body.stream_options.include_usage:
        yield event(None, usage(prompt_tokens, answers.completion_tokens))
    yield "data: [DONE]\n\n"
