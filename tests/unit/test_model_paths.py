import pytest

from finch.config import ConfigError
from finch.models.loading import resolve_model_path


def test_local_folder_resolves_to_its_absolute_path(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir.resolve())


@pytest.mark.parametrize("path", ["./missing", "/nope/model", "a/b/c", "pypi://other-model"])
def test_paths_that_are_neither_folders_nor_hub_ids_fail_clearly(path):
    with pytest.raises(ConfigError, match="model.path"):
        resolve_model_path(path)


def test_hub_ids_go_to_the_hub_and_a_miss_says_so(monkeypatch):
    """The hub code path is kept for real users; offline and uncached it fails as a config error."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="'finch-test/not-cached' is no local folder and could not be fetched from the hub"):
        resolve_model_path("finch-test/not-cached")
