"""Shared fixtures: a tiny random Llama with a real byte-level BPE tokenizer, and data files."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Slices of third-party datasets and tokenizers, with their sources and licenses (tests/data/README.md).
TEST_DATA = REPO / "tests" / "data"
# ChatML, with Hermes-style tools (as Qwen's templates): without tools it renders plain ChatML.
CHATML_TEMPLATE = (
    '{% if tools %}<|im_start|>system\nCall a tool as <tool_call>{"name": ..., "arguments": ...}</tool_call>.\n<tools>'
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{% for call in message.tool_calls or [] %}<tool_call>{{ call.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (all held at once while choosing, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def free_port() -> int:
    return free_ports(1)[0]


def data_file(relative: str) -> Path:
    """A file under tests/data; a missing one fails the test (the suite never skips for want of data)."""
    path = TEST_DATA / relative
    if not path.is_file():
        pytest.fail(f"test data {path} is missing: it is part of the repository (tests/data/README.md)")
    return path


def make_tokenizer(chat_template: bool = True):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(data_file("tokenizers/torchtune_tiny_bpe_tokenizer.json")),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_tiny_model_dir(path: Path, chat_template: bool = True, seed: int = 0, head_dim: int | None = None) -> Path:
    """A 2-layer random Llama (about 0.3M parameters) saved as a normal HF folder."""
    tokenizer = make_tokenizer(chat_template)
    config = tiny_llama_config(
        tokenizer, pad_token_id=tokenizer.pad_token_id, bos_token_id=None, head_dim=head_dim or 16
    )
    return save_tiny_llama(path, config, tokenizer, seed)


def tiny_llama_config(tokenizer, **settings):
    """The tiny Llama's shape over `tokenizer`'s vocabulary; `settings` override or add."""
    from transformers import LlamaConfig

    shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**shape | {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id} | settings)


def save_tiny_llama(path: Path, config, tokenizer, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_adapter(model_dir: Path, folder: Path, seed: int, r: int = 8, b_std: float = 0.5, **lora) -> Path:
    """A random LoRA adapter on every linear projection, saved in PEFT layout (B nonzero, so it changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            **lora,
        ),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, b_std)  # a fresh adapter is a no-op; these change the outputs
    model.save_pretrained(folder)
    return folder


def register_adapter(registry: Path, model_dir: Path, name: str, seed: int = 1, r: int = 8, objective: str = "sft"):
    """A random adapter (make_adapter) published in `registry` as trained on `model_dir` with `objective`."""
    from finch.fingerprint import fingerprint_model_folder
    from finch.registry.store import ADAPTER_FILES, publish

    folder = make_adapter(model_dir, registry.parent / f"{name}-{seed}-adapter", seed, r=r)
    manifest = {
        "base_model": {"id": str(model_dir), "fingerprint": fingerprint_model_folder(model_dir)},
        "config": {"train": {"objective": objective}},
    }
    return publish(registry, name, {file: folder / file for file in ADAPTER_FILES}, manifest)


def register_reward_model(registry: Path, model_dir: Path, name: str, template: str = "chat"):
    """A random LoRA reward model (score head and adapter B nonzero) published in `registry` as
    trained on `model_dir` with `template`; returns the model as saved, in eval mode."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from finch.fingerprint import fingerprint_model_folder
    from finch.registry.store import ADAPTER_FILES, publish

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1),
        LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"]),
    ).eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(0, 0.5)
    folder = registry.parent / f"{name}-reward-model"
    model.save_pretrained(folder)
    base = {"id": str(model_dir), "fingerprint": fingerprint_model_folder(model_dir)}
    manifest = {"base_model": base, "config": {"train": {"objective": "reward"}}, "template": template}
    publish(registry, name, {file: folder / file for file in ADAPTER_FILES}, manifest)
    return model


def model_source(folder: Path):
    """The base model as finch's driver hands it to Ray processes (finch.models.source)."""
    from finch.config import ModelConfig
    from finch.models.source import resolve_model_source

    return resolve_model_source(ModelConfig(path=str(folder)))


def place_in_hub_cache(folder: Path, cache: Path, repo_id: str, commit: str = "0" * 39 + "1") -> str:
    """Lay a model folder out as `huggingface_hub` caches a download of `repo_id` at `commit` (its
    refs/main and snapshots/<commit>), so offline code resolves the hub id from `cache`."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture(scope="session")
def tiny_spm_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with Mistral's SentencePiece tokenizer (32k vocab), the kind of
    tokenizer llama.cpp's GGUF converter knows without a hub lookup."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-llama-spm")
    shutil.copy(data_file("tokenizers/mistral_v3_tokenizer.model"), path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
            }
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    return save_tiny_llama(path, tiny_llama_config(tokenizer, bos_token_id=tokenizer.bos_token_id), tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_plain_model_dir(tmp_path_factory) -> Path:
    """Same model, no chat template: finch must fall back to the plain alpaca template."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-plain"), chat_template=False)


@pytest.fixture(scope="session")
def tiny_serving_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama with 32-wide attention heads: vLLM's CPU attention has no kernel for 16."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-serving"), head_dim=32)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the in-process integration tests (stopped by shutdown, not `ray stop`)."""
    import ray

    from finch.runtime import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray()
    yield
    ray.shutdown()


def run_config_dict(tmp_path: Path, model_dir: Path, train_files: list[str], **sections) -> dict:
    """A small run config on the tiny model; keyword sections are merged over the defaults."""
    config = {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "registry_dir": str(tmp_path / "registry"),
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"train_files": train_files, "max_length": 128},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"lr": 3e-3, "max_steps": 6, "batch_size": 4, "save_steps": 3, "scheduler": "constant"},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    return config
