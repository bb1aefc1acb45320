"""finch serve's per-model metrics (finch/serve/metrics.py) without Ray: labels, and what the ASGI
middleware records for answered, refused and failed requests. The scrape through Ray's metrics agent
is tested in tests/integration/test_serve_http.py."""

from __future__ import annotations

import asyncio
from dataclasses import fields
from types import SimpleNamespace

import pytest

from finch.serve import metrics


class Recorder:
    """Stands for a Ray Counter, Histogram or Gauge: keeps (value, tags) of every call."""

    def __init__(self):
        self.calls = []

    def inc(self, value, tags=None):
        self.calls.append((value, tags))

    observe = set = inc


@pytest.fixture
def recorded(monkeypatch):
    fake = metrics.Instruments(**{f.name: Recorder() for f in fields(metrics.Instruments)})
    monkeypatch.setattr(metrics, "instruments", lambda: fake)
    return fake


def test_model_labels_are_served_names_without_versions():
    assert metrics.model_label(None) == "base"
    assert metrics.model_label("concierge") == "concierge"
    assert metrics.model_label("od-1@v12") == "od-1"  # one series per on-demand adapter, not per version


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        ("/v1/chat/completions", "chat"),
        ("/v1/completions", "completions"),
        ("/tight/v1/chat/completions", "chat"),
        ("/v1/models", None),
        ("/", None),
    ],
)
def test_only_chat_and_completion_requests_are_metered(path, endpoint):
    assert metrics.endpoint_of({"type": "http", "path": path}) == endpoint
    assert metrics.endpoint_of({"type": "lifespan"}) is None


def serve_one(app, path: str = "/v1/chat/completions") -> None:
    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        pass

    asyncio.run(metrics.Metering(app)({"type": "http", "path": path}, receive, send))


def answering(status: int, generated: tuple[str | None, int, int] | None = None):
    """An app that answers `status`, having routed and generated (adapter, prompt tokens, completion tokens) if given."""

    async def app(scope, receive, send):
        if generated is not None:
            adapter, prompt_tokens, completion_tokens = generated
            metrics.routed(adapter)
            metrics.first_output(prompt_tokens, SimpleNamespace(completion_tokens=completion_tokens))
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def test_an_answered_request_counts_its_model_tokens_and_times(recorded):
    serve_one(answering(200, ("od-1@v3", 7, 5)))
    model = {"model": "od-1"}
    assert recorded.requests.calls == [(1, model | {"endpoint": "chat", "status": "200"})]
    assert recorded.prompt_tokens.calls == [(7, model)] and recorded.completion_tokens.calls == [(5, model)]
    assert [tags for _, tags in recorded.latency.calls] == [model] and [
        tags for _, tags in recorded.first_token.calls
    ] == [model]
    assert recorded.running.calls == [(1, model), (0, model)]  # running while it was answered, then not


def test_a_refused_request_counts_under_its_status_and_unknown_model(recorded):
    serve_one(answering(404), path="/v1/completions")
    assert recorded.requests.calls == [(1, {"model": "unknown", "endpoint": "completions", "status": "404"})]
    assert not (recorded.latency.calls or recorded.prompt_tokens.calls or recorded.running.calls)


def test_a_request_whose_answer_fails_counts_as_a_500(recorded):
    async def failing(scope, receive, send):
        metrics.routed(None)
        raise RuntimeError("engine died")

    with pytest.raises(RuntimeError):
        serve_one(failing)
    assert recorded.requests.calls == [(1, {"model": "base", "endpoint": "chat", "status": "500"})]
    assert recorded.running.calls[-1] == (0, {"model": "base"})
