"""Ask a running finch server, through its HTTP API like any client, what every served model answers.

`finch serve CONFIG --ask PROMPT` uses this to prove the whole path (HTTP, Ray Serve, vLLM, each
adapter) end to end and then stop; the quickstart ends with it.
"""

from __future__ import annotations

import time

import httpx
from rich.console import Console
from rich.table import Table


def ask_every_model(url: str, prompts: list[str], api_key: str | None, max_tokens: int, console: Console) -> None:
    """Print one table per prompt: each served model's greedy answer, its token count and latency."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=300) as client:
        models = [m["id"] for m in checked(client.get("/v1/models"))["data"]]
        for prompt in prompts:
            table = Table(title=f"POST {url}/v1/chat/completions: {prompt!r}", show_lines=True)
            for column in ("model", "answer", "tokens", "seconds"):
                table.add_column(column, overflow="fold")
            for model in models:
                started = time.perf_counter()
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }
                reply = checked(client.post("/v1/chat/completions", json=body))
                seconds = time.perf_counter() - started
                answer = reply["choices"][0]["message"]["content"]
                table.add_row(model, answer, str(reply["usage"]["completion_tokens"]), f"{seconds:.1f}")
            console.print(table)


def checked(response: httpx.Response) -> dict:
    if response.status_code != 200:
        raise RuntimeError(
            f"{response.request.method} {response.request.url}: HTTP {response.status_code}: {response.text}"
        )
    return response.json()
