"""Keeping every replica of a `finch serve` application on the same set of adapters.

Ray Serve routes an admin request to one replica, like any other request. That replica loads or
unloads the adapter itself (so a refusal comes back to the caller as a 4xx), then records the
change in `AdapterDirectory`, one small named Ray actor per application: served name -> registry
ref (`name@vN`, never "latest", so every replica loads the same version) plus a version counter.
Each replica polls the counter and converges (`ReplicaAdapters.sync_forever`); the admin call
returns once every live replica reports the new version. A replica that Serve starts later
(a restart, a scale-up) loads the directory's set, not the config's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import ray

from finch.registry.store import RegistryError
from finch.serve.engine import ZERO_ADAPTER, ServedAdapter, ServingEngine

NAMESPACE = "finch"
logger = logging.getLogger("finch.serve")


def directory_name(app_name: str) -> str:
    return f"finch-adapters-{app_name}"


@ray.remote(num_cpus=0)
class AdapterDirectory:
    def __init__(self, initial: dict[str, str]):
        self.served = dict(initial)  # served name -> registry ref (name@vN)
        self.version = 0
        self.replicas: dict[str, tuple[int, float]] = {}  # replica id -> (version applied, last seen)

    def record(self, name: str, ref: str) -> int:
        self.served[name] = ref
        self.version += 1
        return self.version

    def remove(self, name: str) -> int:
        self.served.pop(name, None)
        self.version += 1
        return self.version

    def report(self, replica: str, applied: int) -> tuple[int, dict[str, str]]:
        """A replica's heartbeat: what it has applied in, the current set out."""
        self.replicas[replica] = (applied, time.monotonic())
        return self.version, dict(self.served)

    def behind(self, version: int, alive_s: float) -> list[str]:
        """Live replicas that have not applied `version` yet (silent ones count as gone)."""
        now = time.monotonic()
        return [r for r, (applied, seen) in self.replicas.items() if applied < version and now - seen < alive_s]

    def replica_versions(self) -> dict[str, int]:
        return {replica: applied for replica, (applied, _) in self.replicas.items()}


def open_directory(app_name: str, initial: dict[str, str]) -> Any:
    """The application's directory; the first replica to ask creates it, seeded with the config's adapters."""
    # Detached: the adapter set outlives any one replica and the process that deployed the app.
    return AdapterDirectory.options(
        name=directory_name(app_name), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(initial)


def remove_directory(app_name: str) -> None:
    """Forget a previous deployment's adapter set: a new `finch serve` starts from its config."""
    with contextlib.suppress(ValueError):  # none exists
        ray.kill(ray.get_actor(directory_name(app_name), namespace=NAMESPACE))


class ReplicaAdapters:
    """One replica's side: admin changes go through here, and a loop applies other replicas' changes."""

    def __init__(self, engine: ServingEngine, directory: Any, replica: str, interval_s: float = 1.0):
        self.engine, self.directory, self.replica, self.interval_s = engine, directory, replica, interval_s
        self.applied = -1
        self._lock = asyncio.Lock()  # one change at a time, so a stale snapshot never undoes a newer load

    async def sync(self) -> None:
        async with self._lock:
            await self._apply_directory()

    async def sync_forever(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception:  # keep syncing: one bad round must not leave this replica behind for good
                logger.exception("finch: replica %s could not sync its adapters", self.replica)
            await asyncio.sleep(self.interval_s)

    async def load(self, ref: str, name: str | None = None) -> tuple[ServedAdapter, list[str]]:
        """Load here, record for every replica; returns the adapter and the replicas still behind."""
        async with self._lock:
            await self._apply_directory()
            adapter = await self.engine.load(ref, name)
            version = await self.directory.record.remote(adapter.name, adapter.ref)
        return adapter, await self.wait_for_replicas(version)

    async def unload(self, name: str) -> tuple[ServedAdapter, list[str]]:
        async with self._lock:
            await self._apply_directory()
            adapter = await self.engine.unload(name)
            version = await self.directory.remove.remote(name)
        return adapter, await self.wait_for_replicas(version)

    async def wait_for_replicas(self, version: int, timeout_s: float = 60.0) -> list[str]:
        await self.sync()  # this replica reports the version it has just applied
        deadline = time.monotonic() + timeout_s
        while True:
            behind = await self.directory.behind.remote(version, alive_s=3 * self.interval_s + 5)
            if not behind or time.monotonic() > deadline:
                return behind
            await asyncio.sleep(self.interval_s / 4)

    async def replica_versions(self) -> dict[str, int]:
        return await self.directory.replica_versions.remote()

    async def _apply_directory(self) -> None:
        version, served = await self.directory.report.remote(self.replica, self.applied)
        if version == self.applied:
            return
        for name, ref in served.items():
            current = self.engine.adapters.get(name)
            if current is None or current.ref != ref:
                try:
                    await self.engine.load(ref, name)
                except RegistryError as err:  # e.g. deleted from the registry since: serve the rest
                    logger.error("finch: replica %s cannot load %s as %r: %s", self.replica, ref, name, err)
        for name in [n for n in self.engine.adapters if n != ZERO_ADAPTER and n not in served]:
            await self.engine.unload(name)
        self.applied = version
        await self.directory.report.remote(self.replica, self.applied)
