"""Secure defaults that need no server: model code shipped with a checkpoint never runs unless the
config says so, the server binds loopback unless told otherwise, and exposing it needs an API key.
(The served API key, binding and Ray token auth are checked live in test_serving.py.)"""

from __future__ import annotations

import json
import shutil

import pytest

from finch.config import ConfigError, ServeConfig, validate_config
from finch.models.loading import load_trainable_model, trainable_parameter_count
from finch.models.tokenizer import load_tokenizer
from finch.serve.engine import write_zero_adapter
from tests.conftest import model_source, run_config_dict, write_jsonl

# Importing this module (what trust_remote_code=True would do) leaves a file behind.
REMOTE_CODE = """
from pathlib import Path
Path(__file__).with_name("REMOTE-CODE-RAN").touch()
from transformers import LlamaConfig, LlamaForCausalLM
class RemoteConfig(LlamaConfig):
    model_type = "remote-llama"
class RemoteModel(LlamaForCausalLM):
    config_class = RemoteConfig
"""


@pytest.fixture
def remote_code_model(tmp_path, tiny_model_dir):
    """The tiny Llama, except that its config asks for model code from its own folder."""
    folder = tmp_path / "remote-code-model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {
        "model_type": "remote-llama",
        "auto_map": {"AutoConfig": "remote.RemoteConfig", "AutoModelForCausalLM": "remote.RemoteModel"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "remote.py").write_text(REMOTE_CODE)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["remote.RemoteTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def test_model_code_in_a_checkpoint_never_runs_by_default(tmp_path, remote_code_model):
    rows = str(write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "Hi", "output": "Hello"}]))
    config = validate_config(run_config_dict(tmp_path, remote_code_model, [rows]))
    assert config.model.trust_remote_code is False
    loaders = {
        "training model": lambda: load_trainable_model(config, str(remote_code_model)),
        "space estimate": lambda: trainable_parameter_count(config, str(remote_code_model)),
        "serving zero adapter": lambda: write_zero_adapter(str(remote_code_model), tmp_path / "zero"),
    }
    for what, load in loaders.items():
        with pytest.raises(ValueError, match="trust_remote_code"):
            load()
        assert not (remote_code_model / "REMOTE-CODE-RAN").exists(), f"{what} ran the checkpoint's code"
    load_tokenizer(str(remote_code_model))  # the tokenizer's auto_map is ignored: the fast tokenizer loads
    assert not (remote_code_model / "REMOTE-CODE-RAN").exists(), "the tokenizer loader ran the checkpoint's code"


def test_the_server_binds_loopback_and_exposing_it_needs_an_api_key(monkeypatch, tiny_model_dir):
    from finch.serve.app import build_application

    base = {"model": {"path": str(tiny_model_dir)}}
    assert validate_config(base, schema=ServeConfig).server.host == "127.0.0.1"
    exposed = validate_config(base | {"server": {"host": "0.0.0.0"}}, schema=ServeConfig)
    monkeypatch.delenv("FINCH_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="FINCH_API_KEY"):
        build_application(exposed, model_source(tiny_model_dir))
