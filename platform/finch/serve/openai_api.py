"""The OpenAI-compatible HTTP API over a `ServingEngine`: /v1/models, /v1/chat/completions,
/v1/completions (plain and SSE streaming), admin routes to load/reload/unload adapters, /health.

Chat prompts are rendered with the template each adapter was trained with (its manifest), via
the same code that built its training rows, so served prompt ids equal training ids. Errors are
OpenAI-style JSON: {"error": {"message", "type", "code"}} with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from importlib import resources
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from finch.config import NAME_PATTERN, ServeConfig
from finch.data.templates import with_system_prompt
from finch.data.tokenization import prompt_token_ids
from finch.registry.store import RegistryError
from finch.serve.directory import ReplicaAdapters
from finch.serve.engine import ZERO_ADAPTER, AdapterRefused, ServingEngine

BASE_MODEL = "base"
# Ray Serve writes this logger to the replica's log file, tagged with the request id.
logger = logging.getLogger("ray.serve")
# The chat page loads nothing from elsewhere and may not be framed by other sites.
CHAT_PAGE_POLICY = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'"


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code


class TextPart(BaseModel):
    type: Literal["text"] = Field(description="Only text parts: this server serves text models.")
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        """The content as one string; text parts joined by newlines, as vLLM's server joins them."""
        return self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI fields that change the answer and that this server does not carry out yet, with the value
# that means "not used": a request that sets one otherwise is refused naming it, never answered as
# if it had not been sent.
NOT_YET_HONOURED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}


class SamplingRequest(BaseModel):
    # Fields that do not change the answer (user, metadata, store, ...) are accepted and ignored;
    # those that do and are not carried out yet are refused by name (refuse_unsupported).
    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: Literal[1] = Field(1, description="One answer per request (n above 1 is not served yet).")
    # OpenAI's ranges; vLLM would take wider ones.
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = Field(None, description="Token id -> bias in [-100, 100] added to its logit.")

    def checked_logit_bias(self, vocab_size: int) -> dict[int, float] | None:
        """logit_bias, refused here (400 naming the token) rather than by vLLM once a stream has begun."""
        for token, bias in (self.logit_bias or {}).items():
            if not 0 <= token < vocab_size:
                raise ApiError(400, f"logit_bias: token id {token} is not in the vocabulary (0-{vocab_size - 1})", code="invalid_parameters")
            if not -100 <= bias <= 100:
                raise ApiError(400, f"logit_bias: bias {bias} for token {token} is outside [-100, 100]", code="invalid_parameters")
        return self.logit_bias or None

    def refuse_unsupported(self) -> None:
        sent = self.model_extra or {}
        for field, unused in NOT_YET_HONOURED.items():
            if field in sent and sent[field] not in unused:
                raise ApiError(400, f"{field}: this server does not support it yet; leave it out", code="unsupported_parameter")


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(SamplingRequest):
    prompt: str = Field(description="One prompt (lists of prompts are not served yet).")


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str = Field(description="Registry reference: name (latest) or name@vN.")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="Serve it under this name (default: its registry name).")


@dataclass
class ApiState:
    config: ServeConfig
    engine: ServingEngine
    shared: ReplicaAdapters  # admin changes go through here to reach every replica
    tokenizer: Any
    base_template: str
    stop_token_ids: list[int]
    api_key: str | None


def build_api(state: ApiState, on_startup: Callable[[], Awaitable[None]] | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if on_startup is not None:
            await on_startup()
        yield

    # The schema is served below, behind the API key like every route but the chat page.
    app = FastAPI(title="finch", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return refuse(request, err.status, str(err), err.kind, err.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in err.errors())
        return refuse(request, 422, problems or "invalid request", "invalid_request_error", "invalid_parameters")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        # Starlette's own refusals (unknown route, wrong method, a body that is not UTF-8 JSON).
        return refuse(request, err.status_code, str(err.detail), "invalid_request_error", getattr(err, "code", None))

    def authorized(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), state.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error", "invalid_api_key")

    guarded = [Depends(authorized)]

    # Added before the middleware below, so it runs inside it: its 413 reaches the handler above as is.
    app.add_middleware(BodyLimit, max_bytes=state.config.server.max_request_bytes)

    @app.middleware("http")
    async def name_replica(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        response = await call_next(request)
        response.headers["x-finch-replica"] = state.shared.replica
        return response

    chat_page = resources.files("finch.serve").joinpath("static/chat.html").read_text()

    @app.get("/", include_in_schema=False)
    async def chat() -> HTMLResponse:
        # The page itself is public; its API calls carry the key typed into it.
        return HTMLResponse(chat_page, headers={"Content-Security-Policy": CHAT_PAGE_POLICY})

    @app.get("/health", dependencies=guarded)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/openapi.json", dependencies=guarded, include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        created = int(time.time())
        served = [BASE_MODEL] + [name for name in state.engine.adapters if name != ZERO_ADAPTER]
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "finch"} for m in served]}

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatRequest):
        body.refuse_unsupported()
        adapter = await route(state, body.model)
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        messages = with_system_prompt(messages, state.engine.adapters[adapter].entry.system_prompt if adapter else None)
        try:
            ids = prompt_token_ids(messages, state.tokenizer, template_of(state, adapter))
        except Exception as err:  # a conversation the template cannot render
            raise ApiError(400, f"cannot render these messages: {err}") from None
        return await respond(state, body, adapter, ids, chat=True)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest):
        body.refuse_unsupported()
        adapter = await route(state, body.model)
        ids = state.tokenizer(body.prompt)["input_ids"]
        return await respond(state, body, adapter, ids, chat=False)

    @app.get("/admin/adapters", dependencies=guarded)
    async def list_served() -> dict[str, Any]:
        adapters = [describe(a) for n, a in state.engine.adapters.items() if n != ZERO_ADAPTER]
        return {"adapters": adapters, "replica": state.shared.replica, "replica_versions": await state.shared.replica_versions()}

    @app.post("/admin/adapters", dependencies=guarded)
    async def load_adapter(body: LoadRequest) -> dict[str, Any]:
        try:
            adapter, behind = await state.shared.load(body.adapter, body.name)
            return describe(adapter) | {"replicas_behind": behind}
        except AdapterRefused as err:
            raise ApiError(409, str(err), code="adapter_refused") from None
        except RegistryError as err:
            raise ApiError(404, str(err), code="adapter_not_found") from None

    @app.delete("/admin/adapters/{name}", dependencies=guarded)
    async def unload_adapter(name: str) -> dict[str, Any]:
        try:
            adapter, behind = await state.shared.unload(name)
            return describe(adapter) | {"replicas_behind": behind}
        except RegistryError as err:
            raise ApiError(404, str(err), code="adapter_not_found") from None

    return app


def error_response(status: int, message: str, kind: str, code: str | None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": code}})


def refuse(request: Request, status: int, message: str, kind: str, code: str | None) -> JSONResponse:
    """An error response, logged: a refused request leaves a trace an operator can find."""
    client = request.client.host if request.client else "?"
    logger.warning("finch: refused %s %s from %s: %d %s: %s", request.method, request.url.path, client, status, code or kind, message)
    return error_response(status, message, kind, code)


def describe(adapter: Any) -> dict[str, Any]:
    return {"name": adapter.name, "ref": adapter.ref, "path": adapter.path, "running": adapter.running}


async def route(state: ApiState, model: str) -> str | None:
    """resolve_model, after catching up with the other replicas if this one does not serve `model` yet."""
    try:
        return resolve_model(state, model)
    except ApiError:
        await state.shared.sync()
        return resolve_model(state, model)


def resolve_model(state: ApiState, model: str) -> str | None:
    """The served adapter name a request's `model` names (None: the base model)."""
    if model in (BASE_MODEL, state.config.model.path):
        return None
    name, _, version = model.partition("@")
    adapter = state.engine.adapters.get(name) if name != ZERO_ADAPTER else None
    if adapter is None:
        raise ApiError(404, f"model {model!r} is not served; GET /v1/models lists what is", code="model_not_found")
    if version and version.lstrip("v") != str(adapter.entry.version):
        raise ApiError(404, f"model {model!r}: this server has {adapter.ref} loaded as {name!r}", code="model_not_found")
    return name


def template_of(state: ApiState, adapter: str | None) -> str:
    return state.engine.adapters[adapter].entry.manifest["template"] if adapter else state.base_template


def sampling_params(state: ApiState, body: SamplingRequest, prompt_length: int) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    limits = state.config
    room = limits.engine.max_model_len - prompt_length
    if room <= 0:
        raise ApiError(400, f"prompt is {prompt_length} tokens; this server takes at most {limits.engine.max_model_len - 1}", code="context_length_exceeded")
    requested = body.max_completion_tokens or body.max_tokens
    if requested is not None and requested > limits.server.max_tokens_limit:
        raise ApiError(422, f"max_tokens {requested} is above this server's limit of {limits.server.max_tokens_limit}", code="invalid_parameters")
    if requested is not None and requested > room:
        raise ApiError(400, f"prompt ({prompt_length}) + max_tokens ({requested}) exceed the context of {limits.engine.max_model_len} tokens", code="context_length_exceeded")
    return SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=requested or min(room, limits.server.max_tokens_limit),
        stop=body.stop,
        seed=body.seed,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        logit_bias=body.checked_logit_bias(len(state.tokenizer)),
        stop_token_ids=state.stop_token_ids,
        output_kind=RequestOutputKind.DELTA,
    )


async def respond(state: ApiState, body: SamplingRequest, adapter: str | None, ids: list[int], chat: bool):
    if not ids:  # vLLM fails an empty prompt deep inside the engine
        raise ApiError(400, "the prompt is empty", code="empty_prompt")
    params = sampling_params(state, body, len(ids))
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    outputs = state.engine.generate(ids, params, adapter, request_id)
    timeout = state.config.server.request_timeout_s
    if body.stream:
        return StreamingResponse(stream_events(outputs, body, request_id, chat, timeout), media_type="text/event-stream")
    text, finish, completion_tokens = [], None, 0
    try:
        async with asyncio.timeout(timeout):
            async for output in outputs:
                piece = output.outputs[0]
                text.append(piece.text)
                completion_tokens += len(piece.token_ids)
                finish = piece.finish_reason or finish
    except TimeoutError:
        raise ApiError(504, f"generation took longer than {timeout} s", "timeout_error", "timeout") from None
    except RegistryError as err:  # the adapter was unloaded between routing and generation
        raise ApiError(404, str(err), code="model_not_found") from None
    usage = {"prompt_tokens": len(ids), "completion_tokens": completion_tokens, "total_tokens": len(ids) + completion_tokens}
    answer = "".join(text)
    choice = {"index": 0, "finish_reason": finish}
    choice |= {"message": {"role": "assistant", "content": answer}} if chat else {"text": answer}
    return {
        "id": request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [choice],
        "usage": usage,
    }


async def stream_events(outputs: AsyncIterator[Any], body: SamplingRequest, request_id: str, chat: bool, timeout: float):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> str:
        chunk = {"id": request_id, "object": kind, "created": created, "model": body.model, "choices": [choice] if choice else []}
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    if chat:
        yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    prompt_tokens = completion_tokens = 0
    deadline = asyncio.get_running_loop().time() + timeout
    stream = aiter(outputs)
    try:
        while True:
            # The deadline covers waiting for vLLM only. A timeout around the yields too would fire
            # while this generator is suspended in Starlette's send and cancel the response there,
            # cutting the stream without the error event and [DONE].
            async with asyncio.timeout_at(deadline):
                output = await anext(stream, None)
            if output is None:
                break
            piece = output.outputs[0]
            prompt_tokens = len(output.prompt_token_ids or [])
            completion_tokens += len(piece.token_ids)
            content = {"delta": {"content": piece.text}} if chat else {"text": piece.text}
            if piece.text or piece.finish_reason:
                yield event({"index": 0, **content, "finish_reason": piece.finish_reason})
    except TimeoutError:
        yield f"data: {json.dumps({'error': {'message': f'generation took longer than {timeout} s', 'type': 'timeout_error', 'code': 'timeout'}})}\n\n"
    if body.stream_options and body.stream_options.include_usage:
        yield event(None, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
    yield "data: [DONE]\n\n"


class BodyTooLarge(HTTPException):
    code = "request_too_large"

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body over {max_bytes} bytes")


class BodyLimit:
    """Refuse a request body over `max_bytes` with a 413, declared or streamed, without reading it all.

    An ASGI middleware rather than an HTTP one: a chunked body has no Content-Length, so its bytes
    are counted as they arrive (the app's handler for HTTPException answers).
    """

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            err = BodyTooLarge(self.max_bytes)
            response = refuse(Request(scope), err.status_code, err.detail, "invalid_request_error", err.code)
            return await response(scope, receive, send)
        seen = 0

        async def counted_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted_receive, send)
