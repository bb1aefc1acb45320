"""QLoRA on CPU trains the same LoRA gradients as an fp32 model holding the dequantized weights,
also after an evaluation forward (bitsandbytes repacks 4-bit CPU weights for inference there, which
silently broke LoRA gradients)."""

from __future__ import annotations

import torch

from finch.config import validate_config
from finch.models.loading import apply_lora, load_trainable_model
from tests.conftest import run_config_dict


def test_qlora_gradients_match_dequantized_fp32_reference(tmp_path, tiny_model_dir):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    config = validate_config(
        run_config_dict(
            tmp_path,
            tiny_model_dir,
            ["unused.jsonl"],
            lora={"dropout": 0.0, "target_modules": "all-linear"},
            train={"method": "qlora"},
            qlora={"compute_dtype": "float32"},
        )
    )
    quantized = load_trainable_model(config, str(tiny_model_dir))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    four_bit = {n: m for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(four_bit) == 14  # 7 linear layers x 2 blocks; lm_head stays dense
    for name, module in four_bit.items():
        target = reference.get_submodule(name.removeprefix("base_model.model.").removesuffix(".base_layer"))
        target.weight.data = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    reference = apply_lora(reference, config.lora)

    torch.manual_seed(1)
    for name, parameter in quantized.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave every lora_A gradient zero
            parameter.data.normal_(0, 0.05)
    lora_state = {n: p for n, p in quantized.state_dict().items() if "lora_" in n}
    assert reference.load_state_dict(lora_state, strict=False).unexpected_keys == []

    ids = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    quantized.eval()
    with torch.no_grad():
        quantized(input_ids=ids)  # an evaluation step, as HF Trainer runs before/during training
    quantized.train()
    reference.train()
    quantized(input_ids=ids, labels=ids).loss.backward()
    reference(input_ids=ids, labels=ids).loss.backward()

    reference_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    quantized_grads = {n: p.grad for n, p in quantized.named_parameters() if p.requires_grad}
    assert sorted(quantized_grads) == sorted(reference_grads) and len(quantized_grads) == 28
    for name, grad in quantized_grads.items():
        assert grad is not None, f"{name} got no gradient"
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-5, rtol=1e-3, msg=name)
