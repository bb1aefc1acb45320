"""What the HTTP API's route groups and middleware share: one replica's engine, its adapters across
replicas, the tokenizer and prompt settings, and the API key.

A module of its own so that every route group imports it without importing another, or the app
that assembles them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finch.config import ServeConfig
from finch.serve.directory import ReplicaAdapters
from finch.serve.engine import ServingEngine


@dataclass
class ApiState:
    config: ServeConfig
    engine: ServingEngine
    replica_adapters: ReplicaAdapters  # admin changes go through here to reach every replica
    tokenizer: Any
    base_template: str
    stop_token_ids: list[int]
    api_key: str | None
    tool_parser: Any = None  # vLLM's ToolParser for server.tool_parser: reads tool calls from free answers
    base_system_prompt: str | None = None  # a served registry fine-tune's training system prompt (app.FinchServer)
