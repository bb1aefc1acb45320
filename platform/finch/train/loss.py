"""Next-token loss from the LM head applied only where a label is, in chunks.

A causal LM's own loss projects every position through the LM head: [tokens x vocabulary] logits,
which for Gemma's 262k vocabulary are most of the model's FLOPs and memory (2,048 tokens: 2 GiB of
fp32 logits, and as much again for their gradient). In SFT most positions carry no label (the
prompt), and none needs its logits held all at once. So the model runs with `logits_to_keep` set to
no position, its final hidden states are caught on the way out of the backbone, and the head runs
here on the labelled positions only, a chunk at a time.

A plain linear head (every causal LM finch has met) goes through HeadCrossEntropy, which computes
each chunk's loss and gradients together in the forward pass and keeps only the gradients: one
chunk of logits alive, the head's weight gradient summed in one buffer, no recomputation. Any other
head (a LoRA-wrapped lm_head) is called as a module, each chunk recomputed in backward (activation
checkpointing), which also keeps one chunk alive but holds a weight gradient per chunk.

TRL's SFTTrainer has a fused LM head of its own, but it is tied to TRL's trainer and, off Triton
devices, scores every position; finch trains with the HF Trainer on rows it already tokenized.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from finch.data.tokenization import IGNORE_INDEX

# Logit elements per chunk (2^24 fp32 = 64 MiB): 64 positions at a 262k vocabulary, 512 at 32k.
CHUNK_ELEMENTS = 2**24
NO_POSITIONS = torch.empty(0, dtype=torch.long)


def causal_lm(model: Any) -> Any:
    """The Hugging Face causal LM inside a PEFT model (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class LabelledHead:
    """The LM head of a causal LM, with what the model does to its logits after it (Gemma's soft
    cap, Cohere's and Granite's scales), applied to hidden states of labelled positions."""

    def __init__(self, model: Any):
        causal = causal_lm(model)
        text_config = causal.config.get_text_config()
        self.module = causal.get_output_embeddings()
        self.backbone = causal.get_decoder()
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        scale = getattr(text_config, "logit_scale", None)
        if scale is None and getattr(text_config, "logits_scaling", None):
            scale = 1 / text_config.logits_scaling
        self.scale = scale or 1.0
        self.chunk = max(1, CHUNK_ELEMENTS // self.module.out_features)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.module(hidden).float() * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def summed_nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(hidden), targets, reduction="sum")


def supports_labelled_head(model: Any) -> bool:
    """Models whose logits the head alone decides: not mixture-of-experts (their router loss comes
    with the model's own loss), and with a linear output layer and a decoder to hook."""
    causal = causal_lm(model)
    config = causal.config.get_text_config()
    if getattr(config, "output_router_logits", False):
        return False
    try:
        head, decoder = causal.get_output_embeddings(), causal.get_decoder()
    except (AttributeError, NotImplementedError):
        return False
    return head is not None and decoder is not None and hasattr(head, "out_features")


@contextlib.contextmanager
def final_hidden_states(backbone: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Catch the backbone's last_hidden_state (after its final norm) during a forward of the whole
    model: the forward still goes through DDP's and PEFT's wrappers, which calling the backbone
    directly would bypass."""
    caught: dict[str, torch.Tensor] = {}

    def keep(module, args, output):
        caught["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = backbone.register_forward_hook(keep)
    try:
        yield caught
    finally:
        handle.remove()


class HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of a linear head's (scaled, soft-capped) logits, its gradients computed
    chunk by chunk in forward; backward only scales them. Like Liger's fused linear cross-entropy,
    without a Triton kernel: plain torch, so the same on CPU and GPU.

    The matmuls run in the autocast dtype when autocast is on (as nn.Linear would), the softmax in
    fp32; the weight gradient is summed over chunks in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale: float, softcap: float | None, chunk: int):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        with torch.autocast(device, enabled=False):
            x, w = hidden.to(dtype), weight.to(dtype)
            grad_hidden = torch.empty_like(x) if want_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            rows_per_slice = max(1, CHUNK_ELEMENTS // w.shape[1])
            for start in range(0, len(targets), chunk):
                piece = slice(start, start + chunk)
                picked = torch.arange(len(targets[piece]), device=hidden.device), targets[piece]
                logits = (x[piece] @ w.T).float().mul_(scale)
                tanh = logits.div_(softcap).tanh_() if softcap else None
                logits = tanh * softcap if softcap else logits
                log_norm = torch.logsumexp(logits, dim=-1)
                total += (log_norm - logits[picked]).sum()
                if not (want_hidden or want_weight):
                    continue
                grad = logits.sub_(log_norm.unsqueeze(1)).exp_()  # softmax, in place
                grad[picked] -= 1
                if softcap:  # d(softcap * tanh(z / softcap))/dz = 1 - tanh^2
                    grad.mul_(tanh.square_().neg_().add_(1))
                grad = grad.mul_(scale).to(dtype)
                if want_hidden:
                    grad_hidden[piece] = grad @ w
                if want_weight:  # by rows of the vocabulary: no [vocabulary x hidden] temporary
                    for row in range(0, len(w), rows_per_slice):
                        grad_weight[row : row + rows_per_slice] += grad[:, row : row + rows_per_slice].T @ x[piece]
        # Held on ctx, not saved: autograd can hand the weight gradient on as .grad without a copy.
        ctx.grads = grad_hidden, grad_weight
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden, grad_weight), ctx.grads = ctx.grads, None
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_total).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def labelled_nll_sum(head: LabelledHead, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token negative log-likelihoods over positions whose next token has a label, and
    how many there are. hidden: [batch, seq, hidden]; labels: [batch, seq] (unshifted, -100 = none)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    chosen, targets = hidden[:, :-1][mask], targets[mask]
    count = targets.numel()
    if count == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph: a micro-batch without labels adds zero gradient
    if type(head.module) is torch.nn.Linear and head.module.bias is None:
        total = HeadCrossEntropy.apply(chosen, head.module.weight, targets, head.scale, head.softcap, head.chunk)
        return total, count
    if count <= head.chunk:
        return head.summed_nll(chosen, targets), count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, head.chunk):
        piece = slice(start, start + head.chunk)
        total = total + checkpoint(head.summed_nll, chosen[piece], targets[piece], use_reentrant=False)
    return total, count


def next_token_loss(
    model: Any, head: LabelledHead, inputs: dict[str, Any], num_items_in_batch: Any = None
) -> tuple[torch.Tensor, Any]:
    """(loss, model outputs without logits) for a batch with `labels`: the mean over labelled tokens,
    or the sum over `num_items_in_batch` when the trainer counts tokens across accumulated micro-batches."""
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with final_hidden_states(head.backbone) as caught:
        outputs = model(**model_inputs, logits_to_keep=NO_POSITIONS.to(inputs["labels"].device))
    total, count = labelled_nll_sum(head, caught["hidden"], inputs["labels"])
    if num_items_in_batch is not None:
        return total / num_items_in_batch, outputs
    return total / max(count, 1), outputs
