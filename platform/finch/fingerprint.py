"""Content fingerprints that tie an adapter to the exact base weights and data it came from."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1 << 20


def fingerprint_paths(paths: Iterable[str | Path], extra: str = "") -> str:
    """sha256 over file names (relative to their root) and contents; folders are walked in sorted order."""
    digest = hashlib.sha256(extra.encode())
    for root in sorted(Path(p) for p in paths):
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for file in files:
            name = file.relative_to(root) if root.is_dir() else Path(file.name)
            digest.update(str(name).encode() + b"\0")
            with file.open("rb") as handle:
                while block := handle.read(CHUNK):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()


def fingerprint_model_folder(folder: str | Path) -> str:
    """Weights and config only: tokenizer or README edits do not make a different base."""
    root = Path(folder)
    files = sorted(root.glob("*.safetensors")) + [root / "config.json"]
    return fingerprint_paths([f for f in files if f.exists()])
