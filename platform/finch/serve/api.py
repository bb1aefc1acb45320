"""`finch serve`'s HTTP API, assembled: the FastAPI app with its error handlers and middleware
(middleware.py), the OpenAI routes (openai_api.py), the admin routes (admin.py), and the routes
about the app itself: the chat page, /health and the OpenAPI schema.

Every route but the chat page is behind the API key, set here for each group as it is included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Request, params
from fastapi.responses import HTMLResponse
from starlette.middleware.base import BaseHTTPMiddleware

from finch.serve import metrics
from finch.serve.admin import admin_routes
from finch.serve.middleware import (
    CHAT_PAGE_POLICY,
    BodyLimit,
    install_error_handlers,
    replica_header,
    require_api_key,
)
from finch.serve.openai_api import openai_routes
from finch.serve.state import ApiState


def build_api(state: ApiState, on_startup: Callable[[], Awaitable[None]] | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if on_startup is not None:
            await on_startup()
        yield

    # The schema is served by app_routes, behind the API key like every route but the chat page.
    app = FastAPI(title="finch", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    install_error_handlers(app)
    # Added before the replica's middleware, so it runs inside it: a 413 raised while a body streams in
    # reaches the HTTPException handler as is.
    app.add_middleware(BodyLimit, max_bytes=state.config.server.max_request_bytes)
    app.add_middleware(BaseHTTPMiddleware, dispatch=replica_header(state))
    app.add_middleware(metrics.Metering)  # added last: outermost, it sees every refusal and a stream's end
    guard = require_api_key(state.api_key)
    app.include_router(app_routes(guard))
    app.include_router(openai_routes(state), dependencies=[guard])
    app.include_router(admin_routes(state), dependencies=[guard])
    return app


def app_routes(guard: params.Depends) -> APIRouter:
    """The chat page, public; /health and /openapi.json, behind `guard`."""
    router = APIRouter()
    chat_page = resources.files("finch.serve").joinpath("static/chat.html").read_text()

    @router.get("/", include_in_schema=False)
    async def chat() -> HTMLResponse:
        # The page itself is public; its API calls carry the key typed into it.
        return HTMLResponse(chat_page, headers={"Content-Security-Policy": CHAT_PAGE_POLICY})

    @router.get("/health", dependencies=[guard])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/openapi.json", dependencies=[guard], include_in_schema=False)
    async def openapi(request: Request) -> dict[str, Any]:
        return request.app.openapi()

    return router
