"""Base model resolution and loading, and the LoRA wrapping applied on top."""

from __future__ import annotations

from typing import Any

import torch

from finch.config import ConfigError, LoraConfig, ModelConfig, QLoraConfig, RunConfig

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


def torch_dtype(name: str, use_gpu: bool) -> torch.dtype:
    """A dtype name; 'auto' is the fast 16-bit type of this process's device (finch/precision.py)."""
    if name == "auto":
        from finch.precision import detect_device, sixteen_bit_type

        name = sixteen_bit_type(detect_device(use_gpu))
    return getattr(torch, name)


def load_base_model(
    model_config: ModelConfig,
    folder: str,
    use_gpu: bool = False,
    quantization: QLoraConfig | None = None,
    weightless: bool = False,
    device_map: str | None = None,
    reward_head: bool = False,
) -> Any:
    """The base model from `folder`. `weightless`: built from its config, nothing read from the
    checkpoint and nothing written to its parameters (FSDP ranks after the first, see load_trainable_model).
    `device_map` 'cpu' keeps a 4-bit model off a GPU (bitsandbytes loads onto the GPU when one is visible).
    `reward_head`: a sequence classifier with one output, the reward, read at the last token (a new
    head in place of the LM head)."""
    from transformers import BitsAndBytesConfig

    extra: dict[str, Any] = {
        "dtype": torch_dtype(model_config.dtype, use_gpu),
        "trust_remote_code": model_config.trust_remote_code,
    }
    attention = attention_implementation(model_config, use_gpu)
    if attention:
        extra["attn_implementation"] = attention
    if quantization is not None:
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(quantization.compute_dtype, use_gpu),
        )
    config = model_settings(folder, model_config, reward_head)
    if weightless:
        from accelerate import init_empty_weights

        # Buffers stay real: the ones a checkpoint does not hold (rotary frequencies) are never broadcast.
        with init_empty_weights(include_buffers=False):
            model = model_class(reward_head).from_config(config, **extra)
        allocate_unwritten(model)
    else:
        model = model_class(reward_head).from_pretrained(
            folder, config=config, use_safetensors=True, device_map=device_map, **extra
        )
    # A KV cache during training would also disable the packed-sequence attention mask.
    model.config.use_cache = False
    return model


def allocate_unwritten(model: Any) -> None:
    """Give meta-device parameters CPU storage that nothing writes to (tied ones stay tied).

    The OS backs large allocations with memory only where they are written, so this costs almost no
    RAM. It is what accelerate expects of ranks without weights: it tells a model's parameters apart
    by storage address to point the optimizer at their shards, and meta tensors have none.
    """
    allocated: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.device.type == "meta":
                if id(param) not in allocated:
                    storage = torch.empty_like(param, device="cpu")
                    allocated[id(param)] = torch.nn.Parameter(storage, requires_grad=param.requires_grad)
                module._parameters[name] = allocated[id(param)]


def attention_implementation(model_config: ModelConfig, use_gpu: bool) -> str | None:
    """The transformers attention kernel for training and `finch chat` (None: transformers' default,
    sdpa). 'auto' takes flash attention 2 on a GPU that runs it when the flash-attn package is
    installed: packed rows then go to its variable-length kernel (train/collate.py flattens them),
    where sdpa needs a dense block-diagonal mask that rules out its flash backend."""
    if model_config.attn_implementation != "auto":
        return model_config.attn_implementation
    if use_gpu and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return None


def frozen_reference(config: RunConfig, policy: Any) -> Any | None:
    """The reference model of DPO and KTO: for full fine-tuning a frozen copy of the base; None for
    LoRA/QLoRA, where TRL disables the adapter (or uses its frozen copy of a starting adapter)."""
    if config.train.method != "full":
        return None
    reference = load_base_model(config.model, policy.name_or_path, config.scale.use_gpu)
    return reference.eval().requires_grad_(False)


def model_class(reward_head: bool) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if reward_head else AutoModelForCausalLM


def model_settings(folder: str, model_config: ModelConfig, reward_head: bool = False) -> Any:
    """The model's transformers config with finch's changes: `model.dropout`, and one output (the
    reward) for a reward head. transformers takes num_labels on the config only, not as an argument."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=model_config.trust_remote_code)
    if model_config.dropout is not None:
        set_dropout(config, model_config.dropout)
    if reward_head:
        config.num_labels = 1
    return config


def set_dropout(config: Any, dropout: float) -> None:
    """Every dropout rate the config has, set to `dropout`."""
    # Multimodal configs (Gemma 3) keep the language model's settings in a sub-config.
    targets = {id(c): c for c in (config, config.get_text_config())}.values()
    found = [(c, name) for c in targets for name in DROPOUT_ATTRIBUTES if hasattr(c, name)]
    if not found:
        raise ConfigError(f"model.dropout: {type(config).__name__} has no dropout setting to override")
    for target, name in found:
        setattr(target, name, dropout)


def load_trainable_model(config: RunConfig, folder: str, rank: int = 0) -> Any:
    """The model a training worker fits, in train mode: the whole base (full), or the base
    (4-bit for QLoRA) with LoRA adapters attached.

    Under FSDP only rank 0 reads the checkpoint; the other ranks build the model without weights
    and accelerate broadcasts rank 0's tensors into every rank's shards (fsdp_config
    cpu_ram_efficient_loading, train/trainers.py), so a node holds one copy of the model in host
    RAM, not one per GPU. transformers' own switch for this reads the checkpoint on every rank.
    """
    from finch.precision import resolved_here

    config = resolved_here(config)
    reward_head = config.train.objective == "reward"
    if config.train.method == "full":
        weightless = config.scale.strategy == "fsdp" and rank > 0
        model = load_base_model(
            config.model, folder, config.scale.use_gpu, weightless=weightless, reward_head=reward_head
        )
        model.train()
        return model
    quantization = config.qlora if config.train.method == "qlora" else None
    model = load_base_model(config.model, folder, config.scale.use_gpu, quantization, reward_head=reward_head)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.train.gradient_checkpointing)
        keep_cpu_4bit_weights_trainable(model)
    # A reward model's new head trains whole, beside the adapters (PEFT's SEQ_CLS task saves it too).
    model = apply_lora(model, config.lora, task_type="SEQ_CLS" if reward_head else "CAUSAL_LM")
    model.train()
    return model


def meta_base_model(model_config: ModelConfig, folder: str, reward_head: bool = False) -> Any:
    """The base model's architecture without weights (meta device): for counting, nothing is read."""
    config = model_settings(folder, model_config, reward_head)
    with torch.device("meta"):
        return model_class(reward_head).from_config(config, trust_remote_code=model_config.trust_remote_code)


def trainable_parameter_count(config: RunConfig, folder: str) -> int:
    """What a training worker will train, counted on a weightless (meta-device) copy of the model."""
    reward_head = config.train.objective == "reward"
    model = meta_base_model(config.model, folder, reward_head)
    if config.train.method != "full":
        with torch.device("meta"):
            model = apply_lora(model, config.lora, task_type="SEQ_CLS" if reward_head else "CAUSAL_LM")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def keep_cpu_4bit_weights_trainable(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, the first eval-mode no-grad forward of a Linear4bit (an HF Trainer
    evaluation, say) repacks its weight into an inference layout for good; backward passes
    after that give wrong or missing LoRA gradients (seen: 8 of 12 LoRA parameters without a
    gradient; tested in test_qlora.py).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def apply_lora(model: Any, lora: LoraConfig, task_type: str = "CAUSAL_LM") -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        task_type=task_type,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        bias="none",
    )
    return get_peft_model(model, peft_config)
