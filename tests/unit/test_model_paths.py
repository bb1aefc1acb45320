import pytest

from finch.config import ConfigError, ModelConfig
from finch.models.source import resolve_model_path, resolve_model_source
from tests.conftest import place_in_hub_cache


def test_local_folder_resolves_to_its_absolute_path(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir.resolve())


@pytest.mark.parametrize("path", ["./missing", "/nope/model", "a/b/c", "pypi://other-model"])
def test_paths_that_are_neither_folders_nor_hub_ids_fail_clearly(path):
    with pytest.raises(ConfigError, match="model.path"):
        resolve_model_path(path)


def test_hub_ids_go_to_the_hub_and_a_miss_says_so(monkeypatch):
    """The hub code path is kept for real users; offline and uncached it fails as a config error."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ConfigError, match="'finch-test/not-cached' is no local folder and could not be fetched from the hub"
    ):
        resolve_model_path("finch-test/not-cached")


def test_a_local_folder_travels_as_its_path_and_a_node_without_it_says_to_share_it(tiny_model_dir, tmp_path):
    import dataclasses

    source = resolve_model_source(ModelConfig(path=str(tiny_model_dir)))
    assert source.here() == str(tiny_model_dir.resolve()) and source.revision is None
    elsewhere = dataclasses.replace(source, path="/driver/only", folder="/driver/only")  # not mounted here
    with pytest.raises(ConfigError, match="/driver/only is not on node .*: put it on storage every node mounts"):
        elsewhere.here()


def test_a_hub_model_is_pinned_to_the_driver_commit_and_each_node_finds_it_in_its_own_cache(
    tiny_model_dir, tmp_path, monkeypatch
):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    driver_cache, node_cache = tmp_path / "driver-hf", tmp_path / "node-hf"
    commit = place_in_hub_cache(tiny_model_dir, driver_cache, "finch-test/tiny")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(driver_cache))
    source = resolve_model_source(ModelConfig(path="finch-test/tiny"))
    assert source.revision == commit and source.folder.startswith(str(driver_cache))

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(node_cache))  # another node: its own cache
    with pytest.raises(
        ConfigError, match=f"'finch-test/tiny' at commit {commit} is not in the Hugging Face cache of node"
    ):
        source.here()  # offline and not in that cache: the error names the commit
    place_in_hub_cache(tiny_model_dir, node_cache, "finch-test/tiny", commit=commit)
    place_in_hub_cache(tiny_model_dir, node_cache, "finch-test/tiny", commit="f" * 40)  # main has moved on since
    assert source.here() == str(node_cache / "models--finch-test--tiny" / "snapshots" / commit)


def test_a_pinned_revision_is_used_and_recorded(tiny_model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    old = place_in_hub_cache(tiny_model_dir, tmp_path, "finch-test/tiny", commit="a" * 40)
    place_in_hub_cache(tiny_model_dir, tmp_path, "finch-test/tiny", commit="b" * 40)  # main
    source = resolve_model_source(ModelConfig(path="finch-test/tiny", revision=old))
    assert source.revision == old and source.here().endswith(old)
