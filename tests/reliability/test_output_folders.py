"""A run whose output cannot be written fails before any training, with a message that says why."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from finch.config import validate_config
from finch.models.loading import load_trainable_model, trainable_parameter_count
from finch.runtime import OutputFolderError
from finch.train import run
from finch.train.run import train
from tests.conftest import run_config_dict, write_jsonl

ROWS = [{"instruction": "Say hi.", "output": "Hi!"}] * 4


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the run gets as far as starting Ray."""
    monkeypatch.setattr(run, "init_ray", lambda: pytest.fail("the run started Ray before refusing"))


def tiny_config(tmp_path, model_dir, **sections):
    data = str(write_jsonl(tmp_path / "rows.jsonl", ROWS))
    return validate_config(run_config_dict(tmp_path, model_dir, [data], **sections))


@pytest.mark.parametrize("folder", ["output_dir", "registry_dir"])
def test_an_unwritable_folder_is_refused_before_training(tmp_path, tiny_model_dir, folder, no_ray):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = tiny_config(tmp_path, tiny_model_dir, **{folder: str(blocker / "inside")})
    with pytest.raises(OutputFolderError, match=f"cannot write to {blocker / 'inside'}"):
        train(config)


def test_a_disk_without_room_for_the_checkpoints_is_refused_before_training(
    tmp_path, tiny_model_dir, monkeypatch, no_ray
):
    config = tiny_config(tmp_path, tiny_model_dir, train={"method": "full"})
    parameters = trainable_parameter_count(config, str(tiny_model_dir))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - parameters * 12, parameters * 12))
    with pytest.raises(
        OutputFolderError, match=rf"{config.run_dir} has \d+ MiB free; .*{parameters:,} trained parameters"
    ):
        train(config)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_space_estimate_counts_what_the_worker_trains(tmp_path, tiny_model_dir, method):
    config = tiny_config(
        tmp_path, tiny_model_dir, train={"method": method}, model={"path": str(tiny_model_dir), "dtype": "float32"}
    )
    model = load_trainable_model(config, str(tiny_model_dir))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable_parameter_count(config, str(tiny_model_dir)) == trained
