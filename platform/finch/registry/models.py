"""Registry entries as models: the base model adapters were trained on (checked by fingerprint),
and a fully fine-tuned entry served as `finch serve`'s model (`model.path: registry:NAME[@vN]`)."""

from __future__ import annotations

from pathlib import Path

from finch.config import ConfigError, ModelConfig, validate_config
from finch.fingerprint import fingerprint_model_folder
from finch.models.source import ModelSource, resolve_model_source
from finch.registry.store import RegistryEntry, RegistryError, resolve_entry


def trained_base_folder(entries: list[RegistryEntry]) -> str:
    """The local folder of the base model registry entries were trained on."""
    return trained_base_source(entries).folder


def trained_base_source(entries: list[RegistryEntry]) -> ModelSource:
    """The base model registry entries were trained on (at the commit they were trained on, for hub
    models), checked by fingerprint."""
    bases = {entry.manifest["base_model"]["fingerprint"] for entry in entries}
    if len(bases) != 1:
        raise RegistryError(f"adapters {', '.join(e.ref for e in entries)} were trained on different base models")
    model = validate_config(entries[0].manifest["config"]).model
    source = resolve_model_source(
        model.model_copy(update={"revision": entries[0].manifest["base_model"].get("revision")})
    )
    if fingerprint_model_folder(source.folder) not in bases:
        raise RegistryError(
            f"base model at {source.folder} is not the one {entries[0].ref} was trained on (fingerprint differs)"
        )
    return source


def resolve_served_model(model: ModelConfig, registry_dir: str | Path) -> tuple[ModelSource, RegistryEntry | None]:
    """`finch serve`'s base model: `model.path` as resolve_model_source takes it, or the fully
    fine-tuned entry of `registry_dir` that 'registry:NAME[@vN]' names (the latest version without
    @vN, pinned here for every replica), returned too: its prompt template and system prompt go with it."""
    if model.registry_ref is None:
        return resolve_model_source(model), None
    try:
        entry = resolve_entry(registry_dir, model.registry_ref)
    except RegistryError as err:
        raise ConfigError(
            f"model.path {model.path!r}: {err} (`finch registry list --registry {registry_dir}` lists its entries)"
        ) from None
    try:
        entry.check_generates("be served")
    except RegistryError as err:
        raise ConfigError(f"model.path {model.path!r}: {err}") from None
    if entry.kind != "model":
        raise ConfigError(
            f"model.path {model.path!r}: {entry.ref} is a LoRA adapter, not a fully fine-tuned model: serve its base model "
            f"({entry.manifest.get('base_model', {}).get('id', 'the one it was trained on')}) as model.path and put "
            f"{entry.ref} in adapters"
        )
    return registry_model_source(entry), entry


def registry_model_source(entry: RegistryEntry) -> ModelSource:
    """A fully fine-tuned registry entry as a model: its own folder, which every node reads from the
    registry (shared storage, as for adapters)."""
    # vLLM reads *.safetensors whenever a folder has any, and publish never registers pickled weights.
    if not any(entry.path.glob("*.safetensors")):
        raise RegistryError(f"{entry.ref} has no *.safetensors weights at {entry.path} (finch loads safetensors only)")
    folder = str(entry.path)
    return ModelSource(folder, folder)
