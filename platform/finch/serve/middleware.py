"""What the HTTP API puts around its routes: OpenAI-style JSON for every refusal, the API-key check,
the request-body limit, the answering replica's name on each response, and the chat page's
Content-Security-Policy. `api.build_api` installs them; the route groups know none of it.

Errors are {"error": {"message", "type", "code"}} with a 4xx/5xx status, each logged.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from finch.serve.protocol import ApiError
from finch.serve.state import ApiState

# Ray Serve writes this logger to the replica's log file, tagged with the request id.
logger = logging.getLogger("ray.serve")
# The chat page loads nothing from elsewhere and may not be framed by other sites.
CHAT_PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "frame-ancestors 'none'"
)
CallNext = Callable[[Request], Awaitable[Any]]


def refuse(
    request: Request, status: int, message: str, kind: str, code: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An OpenAI-style error response, logged: a refused request leaves a trace an operator can find."""
    client = request.client.host if request.client else "?"
    logger.warning(
        "finch: refused %s %s from %s: %d %s: %s",
        request.method,
        request.url.path,
        client,
        status,
        code or kind,
        message,
    )
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "code": code}}, headers=headers
    )


def install_error_handlers(app: FastAPI) -> None:
    """Answer finch's own refusals, FastAPI's validation errors and Starlette's in OpenAI's error shape."""
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)


async def api_error(request: Request, err: ApiError) -> JSONResponse:
    return refuse(request, err.status, str(err), err.kind, err.code, err.headers)


async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in err.errors())
    return refuse(request, 422, problems or "invalid request", "invalid_request_error", "invalid_parameters")


async def http_error(request: Request, err: HTTPException) -> JSONResponse:
    # Starlette's own refusals (unknown route, wrong method, a body that is not UTF-8 JSON).
    return refuse(request, err.status_code, str(err.detail), "invalid_request_error", getattr(err, "code", None))


def require_api_key(api_key: str | None) -> params.Depends:
    """A route dependency: with `api_key` set, a request without it as its Bearer token gets a 401."""

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(
                401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error", "invalid_api_key"
            )

    return Depends(authorized)


def replica_header(state: ApiState) -> Callable[[Request, CallNext], Awaitable[Any]]:
    """An HTTP middleware naming the replica that answered (x-finch-replica), refusals included: with
    several replicas behind one address, what tells them apart in a client's logs."""

    async def name_replica(request: Request, call_next: CallNext) -> Any:
        response = await call_next(request)
        response.headers["x-finch-replica"] = state.replica_adapters.replica
        return response

    return name_replica


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
