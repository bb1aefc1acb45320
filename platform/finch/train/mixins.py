"""Trainer mixins that finch adds to the HF Trainer and to TRL's trainers (DPO, reward models):
each changes one behaviour where HF offers no setting for it; and one callback."""

from __future__ import annotations

import ctypes
import math
import re
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from finch.train.loss import LabelledHead, next_token_loss

# Transformer blocks are numbered in parameter names: model.layers.3.mlp... (Llama, Gemma, Qwen,
# Mistral), transformer.h.3... (GPT-2), encoder.layer.3... (BERT), blocks.3...
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


class FsdpOrRefuse:
    """Trainer mixin: refuse to go on when FSDP was asked for and accelerate did not enable it. It
    falls back to DDP without a word where it cannot shard (CPU/gloo), and would then place the
    model on the device, which fails confusingly on the ranks that hold no weights yet."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp and not self.is_fsdp_enabled:
            raise RuntimeError(
                "scale.strategy fsdp: accelerate did not enable FSDP on this backend "
                f"({self.accelerator.distributed_type}); FSDP needs GPUs (scale.use_gpu: true)"
            )


class DdpGradientsInBuckets:
    """Trainer mixin: DDP keeps the gradients in its communication buckets (gradient_as_bucket_view)
    instead of a second copy, one fp32 copy of every trained parameter less (a whole model's for
    full fine-tuning). Ray Train sets up torch.distributed even for one worker, so accelerate wraps
    every finch model in DDP. HF has no setting for it; `_build_accelerator_args` is where HF
    builds DDP's arguments."""

    def _build_accelerator_args(self, **kwargs) -> dict[str, Any]:
        from accelerate.utils import DistributedDataParallelKwargs

        args = super()._build_accelerator_args(**kwargs)
        for handler in args.get("kwargs_handlers", []):
            if isinstance(handler, DistributedDataParallelKwargs):
                handler.gradient_as_bucket_view = True
        return args


class LayerwiseLrDecay:
    """Trainer mixin: when train.layer_lr_decay is set, the head and final norm train at lr, the
    top block at lr * decay, each block below at decay times the one above, embeddings lowest.

    HF Trainer builds one group per weight-decay setting; this splits those groups per layer
    before the first step, so every other optimizer setting (class, betas, FSDP wrapping) stays HF's.
    """

    layer_lr_decay: float | None = None

    def create_optimizer(self, model=None):
        already_built = self.optimizer is not None  # HF returns the existing optimizer on later calls
        optimizer = super().create_optimizer(model)
        if not self.layer_lr_decay or already_built:
            return optimizer
        opt_model = self.model if model is None else model
        names = {id(p): n for n, p in opt_model.named_parameters()}
        num_layers = opt_model.config.get_text_config().num_hidden_layers
        groups = []
        for group in optimizer.param_groups:
            by_scale: dict[float, list] = {}
            for param in group["params"]:
                depth = layer_depth(names[id(param)], num_layers)
                by_scale.setdefault(self.layer_lr_decay ** (num_layers + 1 - depth), []).append(param)
            settings = {k: v for k, v in group.items() if k != "params"}
            groups += [{**settings, "params": ps, "lr": group["lr"] * scale} for scale, ps in by_scale.items()]
        # Highest lr first: HF logs the first group's learning rate.
        groups.sort(key=lambda group: -group["lr"])
        optimizer.param_groups = []
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer


def layer_depth(name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for block i, num_layers + 1 for everything on top (norm, head)."""
    match = LAYER_INDEX.search(name)
    if match:
        return int(match[1]) + 1
    return 0 if "embed" in name or ".wte." in name or ".wpe." in name else num_layers + 1


class PerplexityLogging:
    """Trainer mixin: every logged eval loss comes with its perplexity, exp(loss)."""

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "eval_loss" in logs:
            logs = {**logs, "eval_perplexity": math.exp(min(logs["eval_loss"], 50.0))}  # capped: no overflow
        super().log(logs, *args, **kwargs)


class PeakMemoryLogging:
    """Trainer mixin: the training summary (HF's last log, the one with train_runtime) carries this
    worker's peak resident memory, and on a GPU the most memory allocated there, so the registry
    manifest says what a run needed."""

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "train_runtime" in logs:
            logs = {**logs, **peak_memory_gib()}
        super().log(logs, *args, **kwargs)


def peak_memory_gib() -> dict[str, float]:
    # ru_maxrss: KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    peak = {"peak_rss_gib": rss / 2**30}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return peak


class LabelledPositionsLoss:
    """Trainer mixin: the SFT / pre-training loss from the LM head at labelled positions only, in
    chunks (train/loss.py), when `labelled_head` is set; the model's own loss otherwise."""

    labelled_head: LabelledHead | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.labelled_head is None or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # As HF does for models that take num_items_in_batch: the sum over the tokens of every
        # accumulated micro-batch (and device), so the step's gradient is the per-token mean.
        counted = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss, outputs = next_token_loss(model, self.labelled_head, inputs, counted)
        if counted is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


class PretokenizedRows:
    """TRL trainer mixin: rows arrive tokenized by finch's templates (data/examples.py), exactly like
    SFT data and inference prompts; TRL's own preparation would render them again from text."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


class Fp32AdaptersOn4Bit:
    """TRL trainer mixin: TRL casts QLoRA's trainable parameters to bf16; finch keeps them fp32, as in
    QLoRA SFT, since small preference-sized updates are lost to bf16 rounding."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self.model, "is_loaded_in_4bit", False):
            for param in self.model.parameters():
                if param.requires_grad:
                    param.data = param.data.float()


class ReferenceIsTheStartingAdapter:
    """TRL trainer mixin: the reference model (DPO; GRPO and RLOO with a KL term) is the adapter the
    run started from. TRL copies a PEFT model's adapter into a frozen "ref" adapter for it. A fresh
    adapter (B = 0) equals the disabled adapter, which TRL uses when there is no copy, so the copy
    is dropped; an adapter that starts trained (lora.init_adapter, an SFT adapter say) keeps it.

    HF Trainer, resuming from a checkpoint that holds several adapters, restores only the ones in
    subfolders ("ref") and leaves the trained one, saved at the top, at its start: that one is
    restored here too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "ref" in getattr(self.model, "peft_config", {}) and starts_fresh(self.model):
            self.model.delete_adapter("ref")
            self.model.set_adapter("default")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.model if model is None else model
        if "ref" in getattr(model, "peft_config", {}):
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            trained = load_file(Path(resume_from_checkpoint) / "adapter_model.safetensors")
            set_peft_model_state_dict(model, trained, adapter_name="default")
            model.set_adapter("default")


def starts_fresh(model: Any) -> bool:
    """Whether the "default" adapter changes nothing yet (every LoRA B is zero, PEFT's init)."""
    return all(not parameter.any() for name, parameter in model.named_parameters() if ".lora_B.default." in name)


class PretokenizedTrlTrainer(
    FsdpOrRefuse,
    DdpGradientsInBuckets,
    PeakMemoryLogging,
    LayerwiseLrDecay,
    PretokenizedRows,
    Fp32AdaptersOn4Bit,
    ReferenceIsTheStartingAdapter,
):
    """What finch changes in every TRL trainer it uses (DPO, reward models, GRPO): put it before the TRL class."""


class ReturnFreedMemory(TrainerCallback):
    """After each optimizer step, hands the free pages of the C heap back to the OS (glibc's
    malloc_trim). glibc keeps freed blocks under its mmap threshold (which grows to 32 MiB, the size
    of most per-layer tensors) in its arenas for reuse, fragmented: measured on Gemma 3 270M full
    fine-tuning, a worker held 7.3 GiB between steps for 4 GiB of live tensors. Trimming costs no
    measurable time; without glibc (macOS) it does nothing."""

    def __init__(self):
        self.trim = getattr(ctypes.CDLL(None), "malloc_trim", None)

    def on_step_end(self, args, state, control, **kwargs):
        if self.trim is not None:
            self.trim(0)
