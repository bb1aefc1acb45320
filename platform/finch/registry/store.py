"""The registry: `{registry}/{name}/v{N}/` plus `finch_manifest.json`.

An entry is a LoRA adapter in PEFT layout (kind "adapter"), or for full fine-tuning a whole
model folder in Hugging Face layout with its tokenizer (kind "model"). Weights are safetensors only.

Folders are written complete into a temp dir and renamed into place, so a reader (chat,
serving) never sees a half-written adapter, and two writers never get the same version.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finch.config import NAME_BODY

MANIFEST = "finch_manifest.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
REQUIRED_FILES = {"adapter": ADAPTER_FILES, "model": ("config.json",)}
# Matched with fullmatch: a trailing newline or any path separator never gets through.
NAME_PATTERN = re.compile(NAME_BODY)
REF_PATTERN = re.compile(rf"(?P<name>{NAME_BODY})(?:@v?(?P<version>\d+))?")


class RegistryError(ValueError):
    """An adapter reference that does not resolve to a complete registry entry."""


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    version: int
    path: Path
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "adapter")

    @property
    def is_reward_model(self) -> bool:
        """Trained with train.objective reward: it scores answers and has no LM head."""
        return self.manifest.get("config", {}).get("train", {}).get("objective") == "reward"

    def check_generates(self, purpose: str) -> None:
        """Refuse a reward model (train.objective reward) where text would be generated: it scores
        answers and has no LM head. `purpose`: what was asked of it, for the message."""
        if self.is_reward_model:
            raise RegistryError(
                f"{self.ref} is a reward model: it scores answers and does not generate text, so it cannot {purpose}"
            )

    @property
    def system_prompt(self) -> str | None:
        """The data.system_prompt the entry was trained with."""
        return self.manifest.get("config", {}).get("data", {}).get("system_prompt")


def publish(
    registry_dir: str | Path, name: str, files: dict[str, Path], manifest: dict[str, Any], kind: str = "adapter"
) -> RegistryEntry:
    """Copy `files` (target name -> source path) plus the manifest into the next version folder."""
    if not NAME_PATTERN.fullmatch(name):
        raise RegistryError(f"adapter name {name!r} must match {NAME_PATTERN.pattern}")
    missing = [f for f in REQUIRED_FILES[kind] if f not in files]
    if kind == "model" and not any(f.endswith(".safetensors") for f in files):
        missing.append("*.safetensors weights")
    if missing:
        raise RegistryError(f"{kind} for {name!r} lacks {', '.join(missing)}")
    unsafe = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    if unsafe:
        raise RegistryError(f"{kind} for {name!r}: pickled files are never registered ({', '.join(unsafe)})")
    root = Path(registry_dir).resolve() / name
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        for target, source in files.items():
            shutil.copyfile(source, staging / target)
        version = _next_version(root)
        while True:
            manifest = {**manifest, "name": name, "version": version, "kind": kind}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            _fsync_folder(staging)
            try:
                os.rename(staging, root / f"v{version}")  # atomic; fails if a writer took this version
                break
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                version += 1
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RegistryEntry(name, version, root / f"v{version}", manifest)


def resolve_entry(registry_dir: str | Path, ref: str) -> RegistryEntry:
    """`name` (latest version), `name@v3` or `name@3` -> the registry entry."""
    match = REF_PATTERN.fullmatch(ref)
    if not match:
        raise RegistryError(f"adapter reference {ref!r} must look like name or name@vN")
    root = Path(registry_dir).resolve() / match["name"]
    versions = _versions(root)
    if not versions:
        raise RegistryError(f"no adapter named {match['name']!r} in registry {Path(registry_dir).resolve()}")
    version = int(match["version"]) if match["version"] else versions[-1]
    if version not in versions:
        raise RegistryError(f"adapter {match['name']!r} has no version {version}; it has {versions}")
    path = root / f"v{version}"
    return RegistryEntry(match["name"], version, path, json.loads((path / MANIFEST).read_text()))


def record_scores(entry: RegistryEntry, dataset_fingerprint: str, record: dict[str, Any]) -> dict[str, Any]:
    """Merge an evaluation's scores into the entry's manifest under evals[dataset_fingerprint]
    (metrics evaluated again are replaced, others kept: in scores, counts and baseline); returns
    the updated manifest.

    The manifest is rewritten whole (temp file + rename) under a lock: a reader never sees half a
    file, and two evaluations of one entry at once lose neither's scores.
    """
    import fcntl

    manifest_path = entry.path / MANIFEST
    with (entry.path / ".finch_manifest.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = json.loads(manifest_path.read_text())
        evals = manifest.setdefault("evals", {})
        previous = evals.get(dataset_fingerprint, {})
        merged = {
            key: {**previous.get(key, {}), **record[key]} for key in ("scores", "counts", "baseline") if key in record
        }
        evals[dataset_fingerprint] = {**previous, **record, **merged}
        staging = manifest_path.with_name(f".{MANIFEST}.{os.getpid()}")
        staging.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        with staging.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, manifest_path)
    return manifest


def adapter_names(registry_dir: str | Path) -> list[str]:
    root = Path(registry_dir)
    return (
        sorted(p.name for p in root.iterdir() if p.is_dir() and NAME_PATTERN.fullmatch(p.name)) if root.exists() else []
    )


def list_adapters(registry_dir: str | Path) -> list[RegistryEntry]:
    root = Path(registry_dir)
    return [resolve_entry(root, f"{name}@v{v}") for name in adapter_names(root) for v in _versions(root / name)]


def _versions(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    found = (re.fullmatch(r"v(\d+)", p.name) for p in root.iterdir())
    return sorted(int(m[1]) for m in found if m and (root / m[0] / MANIFEST).exists())


def _next_version(root: Path) -> int:
    existing = [int(m[1]) for p in root.iterdir() if (m := re.fullmatch(r"v(\d+)", p.name))]
    return max(existing, default=0) + 1


def _fsync_folder(folder: Path) -> None:
    for file in folder.iterdir():
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
