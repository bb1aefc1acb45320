"""How much memory a run needs on each device, estimated before it starts.

Arithmetic from the model's architecture and the run's settings, not a measurement: finch prints
it on a run's first lines and refuses a GPU run whose estimate exceeds the GPU, instead of
failing with an out-of-memory error after the model is loaded and the data prepared.
bench/gpu_check.py compares it with measured peaks on a GPU; docs/training.md lists what it leaves
out. The parts, per training worker:

- weights: the base model as loaded (fp32 master weights for full fine-tuning, 4-bit NF4 linear
  layers for QLoRA, whose other weights PEFT upcasts to fp32), sharded by FSDP;
- training state: the trained parameters' gradients, AdamW's two moments and its step's
  temporaries, all fp32 (and LoRA's fp32 adapter weights);
- activations: what backward keeps per token and layer (all of it, or one checkpoint per layer
  plus one recomputed layer with activation checkpointing);
- loss: the logits alive at once: one chunk of labelled positions for finch's loss
  (train/loss.py), every position's logits where it cannot run (FSDP);
- runtime: the CUDA context and allocator slack (on CPU: the Python process, torch and Ray).

Serving, per GPU of a replica: the weights (split by tensor parallelism), vLLM's LoRA slots at
the largest rank, its activations and CUDA graphs; the rest of its memory share is KV cache, which
must hold at least one request of engine.max_model_len tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finch.config import PAIRWISE_OBJECTIVES, RunConfig, ServeConfig

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# bitsandbytes NF4: half a byte per weight plus one scale per 64-weight block (fp32, or 8-bit
# with double quantization).
NF4_BYTES = {False: 0.5 + 4 / 64, True: 0.5 + 1 / 64}
# Per trained parameter: its fp32 gradient, AdamW's two fp32 moments, and the one fp32 temporary
# of torch's multi-tensor (foreach) AdamW step, its default on GPUs.
ADAM_BYTES = 4 + 4 + 4 + 4
RUNTIME_GIB = 1.0  # the CUDA context and allocator slack (finch prints no estimate on CPU)
# vLLM's activations, sampler and CUDA graphs beside weights, LoRA slots and KV cache (a typical
# figure from its start-up log for 7-8B models; it profiles the real one at start).
VLLM_OVERHEAD_GIB = 2.0


@dataclass(frozen=True)
class Architecture:
    """What the estimate needs to know about a decoder-only model."""

    parameters: int
    linear_parameters: int  # in the blocks' nn.Linear layers (what QLoRA quantizes)
    linear_in_out: int  # their inputs plus outputs, summed: a rank-r LoRA on all of them has r x this
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # key/value heads x head dim
    vocab: int

    @classmethod
    def of(cls, model: Any) -> Architecture:
        """From a (meta-device) transformers model."""
        import torch

        text = model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        head = model.get_output_embeddings()
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
        return cls(
            parameters=sum(p.numel() for p in model.parameters()),
            linear_parameters=sum(m.weight.numel() for m in linears),
            linear_in_out=sum(m.in_features + m.out_features for m in linears),
            layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            intermediate=text.intermediate_size,
            kv_dim=getattr(text, "num_key_value_heads", text.num_attention_heads) * head_dim,
            vocab=text.vocab_size,
        )


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, float]  # GiB per part, in the order they are printed
    per: str  # what one estimate covers: "GPU worker", "replica GPU", ...

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        shown = " + ".join(f"{name} {gib:.1f}" for name, gib in self.parts.items() if gib >= 0.05)
        return f"{shown} = {self.total:.1f} GiB per {self.per}"


def training_memory(config: RunConfig, model_folder: str) -> MemoryEstimate:
    """Per training worker, for `config` with its types resolved for the workers' device."""
    from finch.models.loading import meta_base_model, trainable_parameter_count

    arch = Architecture.of(meta_base_model(config.model, model_folder, config.train.objective == "reward"))
    return estimate_training(config, arch, trainable_parameter_count(config, model_folder))


def estimate_training(config: RunConfig, arch: Architecture, trained: int) -> MemoryEstimate:
    train, scale = config.train, config.scale
    shards = scale.num_workers if scale.strategy == "fsdp" else 1
    # Trained weights are fp32: full fine-tuning's are the model's weights, adapters' come on top.
    state_bytes = ADAM_BYTES + (0 if train.method == "full" else 4)
    tokens = train.batch_size * config.data.max_length * (2 if train.objective in PAIRWISE_OBJECTIVES else 1)
    return MemoryEstimate(
        {
            "weights": weights_bytes(config, arch) / shards / GIB,
            "training state": trained * state_bytes / shards / GIB,
            "activations": activation_bytes(arch, tokens, BYTES[compute_type(config)], train.gradient_checkpointing)
            / GIB,
            "loss": loss_bytes(config, arch, tokens) / GIB,
            "runtime": RUNTIME_GIB,
        },
        per="GPU worker" if scale.use_gpu else "worker",
    )


def compute_type(config: RunConfig) -> str:
    """The type activations are kept in: the autocast type, else the weights' (QLoRA: its compute type)."""
    if config.train.method == "qlora":
        return config.qlora.compute_dtype
    return {"bf16": "bfloat16", "fp16": "float16"}.get(config.train.mixed_precision, config.model.dtype)


def weights_bytes(config: RunConfig, arch: Architecture) -> float:
    if config.train.method == "qlora":
        # The rest (embeddings, norms, head) is upcast to fp32 by PEFT's prepare_model_for_kbit_training.
        quantized = arch.linear_parameters * NF4_BYTES[config.qlora.double_quant]
        return quantized + (arch.parameters - arch.linear_parameters) * 4
    return arch.parameters * BYTES[config.model.dtype]


def activation_bytes(arch: Architecture, tokens: int, compute_bytes: int, checkpointing: bool) -> float:
    """What backward keeps. Per token and block: the attention and MLP inputs, q/k/v and attention
    output, residuals and norms (~8 x hidden + 2 x kv), and the MLP's gate, up and product
    (~3 x intermediate), in the compute type."""
    block = (8 * arch.hidden + 2 * arch.kv_dim + 3 * arch.intermediate) * compute_bytes * tokens
    if checkpointing:
        return arch.layers * arch.hidden * compute_bytes * tokens + block
    return arch.layers * block


def loss_bytes(config: RunConfig, arch: Architecture, tokens: int) -> float:
    """Logits alive at once, fp32, with their gradient (x 2)."""
    from finch.train.loss import CHUNK_ELEMENTS

    if config.train.objective == "reward":
        return 0.0  # one output per sequence
    if config.scale.strategy == "fsdp":
        # The model's own loss over every position: its bf16 logits, their fp32 copy and gradient.
        return tokens * arch.vocab * (2 + 4 + 4)
    return min(tokens * arch.vocab, CHUNK_ELEMENTS) * 4 * 2


def serving_memory(config: ServeConfig, model_folder: str, gpu_gib: float) -> tuple[MemoryEstimate, int]:
    """Per GPU of a replica: the estimate, and the KV cache left in tokens (vLLM's memory share of
    `gpu_gib` minus the rest)."""
    from finch.models.loading import meta_base_model

    return estimate_serving(config, Architecture.of(meta_base_model(config.model, model_folder)), gpu_gib)


def estimate_serving(config: ServeConfig, arch: Architecture, gpu_gib: float) -> tuple[MemoryEstimate, int]:
    engine, split = config.engine, config.tensor_parallel_size
    dtype = BYTES.get(config.model.dtype, 2)
    slot = engine.max_lora_rank * arch.linear_in_out * dtype  # the largest rank on every linear layer
    parts = {
        "weights": arch.parameters * dtype / split / GIB,
        "LoRA slots": engine.max_loras * slot / split / GIB,
        "activations and CUDA graphs": VLLM_OVERHEAD_GIB,
    }
    kv_gib = gpu_gib * engine.gpu_memory_utilization - sum(parts.values())
    parts["KV cache"] = max(kv_gib, 0.0)
    kv_per_token = 2 * arch.layers * arch.kv_dim * dtype / split
    return MemoryEstimate(parts, per="replica GPU"), int(max(kv_gib, 0) * GIB / kv_per_token)
