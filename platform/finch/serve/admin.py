"""The HTTP API's admin routes: list the adapters served, load (or reload) a registry adapter and
unload one, on every replica at once through `ReplicaAdapters`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from finch.config import NAME_PATTERN
from finch.registry.store import RegistryError
from finch.serve.engine import ZERO_ADAPTER, AdapterRefused
from finch.serve.protocol import ApiError
from finch.serve.state import ApiState


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str = Field(description="Registry reference: name (latest) or name@vN.")
    name: str | None = Field(
        None, pattern=NAME_PATTERN, description="Serve it under this name (default: its registry name)."
    )


def admin_routes(state: ApiState) -> APIRouter:
    """The admin routes, unguarded here: `api.build_api` puts them behind the API key."""
    router = APIRouter()

    @router.get("/admin/adapters")
    async def list_served() -> dict[str, Any]:
        adapters = [adapter_json(a) for n, a in state.engine.adapters.items() if n != ZERO_ADAPTER]
        on_demand = {"patterns": state.engine.on_demand, "cached": list(state.engine.cached)} | vars(state.engine.stats)
        return {
            "adapters": adapters,
            "on_demand": on_demand,
            "replica": state.replica_adapters.replica,
            "replica_versions": await state.replica_adapters.replica_versions(),
        }

    @router.post("/admin/adapters")
    async def load_adapter(body: LoadRequest) -> dict[str, Any]:
        try:
            adapter, behind = await state.replica_adapters.load(body.adapter, body.name)
            return adapter_json(adapter) | {"replicas_behind": behind}
        except AdapterRefused as err:
            raise ApiError(409, str(err), code="adapter_refused") from None
        except RegistryError as err:
            raise ApiError(404, str(err), code="adapter_not_found") from None

    @router.delete("/admin/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        try:
            adapter, behind = await state.replica_adapters.unload(name)
            return adapter_json(adapter) | {"replicas_behind": behind}
        except RegistryError as err:
            raise ApiError(404, str(err), code="adapter_not_found") from None

    return router


def adapter_json(adapter: Any) -> dict[str, Any]:
    return {"name": adapter.name, "ref": adapter.ref, "path": adapter.path, "running": adapter.running}
