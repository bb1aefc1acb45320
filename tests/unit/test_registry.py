import json
import threading
from pathlib import Path

import pytest

from finch.registry.store import MANIFEST, RegistryError, list_adapters, publish, resolve_adapter


@pytest.fixture
def adapter_files(tmp_path) -> dict[str, Path]:
    files = {"adapter_config.json": tmp_path / "cfg.json", "adapter_model.safetensors": tmp_path / "w.safetensors"}
    files["adapter_config.json"].write_text(json.dumps({"r": 8}))
    files["adapter_model.safetensors"].write_bytes(b"weights")
    return files


def test_versions_increase_and_refs_resolve(tmp_path, adapter_files):
    registry = tmp_path / "registry"
    first = publish(registry, "concierge", adapter_files, {"metrics": {"loss": 1.0}})
    second = publish(registry, "concierge", adapter_files, {"metrics": {"loss": 0.5}})
    assert (first.version, second.version) == (1, 2)
    assert sorted(p.name for p in second.path.iterdir()) == sorted(["adapter_config.json", "adapter_model.safetensors", MANIFEST])
    assert resolve_adapter(registry, "concierge").version == 2
    assert resolve_adapter(registry, "concierge@v1").manifest["metrics"] == {"loss": 1.0}
    assert resolve_adapter(registry, "concierge@2").ref == "concierge@v2"
    assert [a.ref for a in list_adapters(registry)] == ["concierge@v1", "concierge@v2"]


@pytest.mark.parametrize("ref", ["../etc", "a/../../b", "/abs", "name@latest", ""])
def test_bad_refs_are_refused_without_touching_the_filesystem(tmp_path, ref):
    with pytest.raises(RegistryError):
        resolve_adapter(tmp_path, ref)


def test_unknown_adapter_and_version(tmp_path, adapter_files):
    publish(tmp_path, "a", adapter_files, {})
    with pytest.raises(RegistryError, match="no adapter named 'b'"):
        resolve_adapter(tmp_path, "b")
    with pytest.raises(RegistryError, match="has no version 7"):
        resolve_adapter(tmp_path, "a@v7")


def test_failed_write_leaves_no_entry(tmp_path, adapter_files):
    adapter_files["adapter_model.safetensors"].unlink()  # copying it fails half way through the entry
    with pytest.raises(FileNotFoundError):
        publish(tmp_path, "broken", adapter_files, {})
    assert list((tmp_path / "broken").iterdir()) == []
    assert list_adapters(tmp_path) == []


def test_half_written_folder_is_invisible(tmp_path, adapter_files):
    """A crashed writer leaves a folder without manifest (or a staging dir): readers skip it."""
    (tmp_path / "a" / "v1").mkdir(parents=True)
    (tmp_path / "a" / ".staging-x").mkdir()
    with pytest.raises(RegistryError):
        resolve_adapter(tmp_path, "a")
    assert publish(tmp_path, "a", adapter_files, {}).version == 2


def test_concurrent_publishers_get_distinct_versions(tmp_path, adapter_files):
    results = []
    threads = [threading.Thread(target=lambda: results.append(publish(tmp_path, "c", adapter_files, {}))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.version for r in results) == list(range(1, 9))
    assert all(json.loads((r.path / MANIFEST).read_text())["version"] == r.version for r in results)


def test_missing_adapter_file_and_bad_name_are_refused(tmp_path, adapter_files):
    with pytest.raises(RegistryError, match="lacks adapter_model.safetensors"):
        publish(tmp_path, "a", {"adapter_config.json": adapter_files["adapter_config.json"]}, {})
    with pytest.raises(RegistryError, match="must match"):
        publish(tmp_path, "../evil", adapter_files, {})
