"""The labelled-positions loss (train/loss.py) equals transformers' own causal-LM loss, and so do
its gradients: packed and padded rows, full fine-tuning, LoRA and QLoRA, one chunk or many, a
Gemma-style model with a logit soft cap and tied embeddings, bf16 autocast, and a LoRA-wrapped
head (the module path)."""

from __future__ import annotations

import random

import pytest
import torch

from finch.config import validate_config
from finch.data.packing import pack_examples
from finch.data.tokenization import IGNORE_INDEX
from finch.models.loading import load_trainable_model
from finch.train.collate import RowCollator
from finch.train.loss import LabelledHead, next_token_loss
from tests.conftest import run_config_dict


def answer_only_examples(seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Examples whose first half is prompt (no labels), as in SFT."""
    rng = random.Random(seed)
    ids = [[rng.randrange(3, 2000) for _ in range(n)] for n in (17, 9, 30, 5, 12)]
    labels = [[IGNORE_INDEX] * (len(x) // 2) + x[len(x) // 2 :] for x in ids]
    return ids, labels


def packed_batch() -> dict[str, torch.Tensor]:
    ids, labels = answer_only_examples()
    rows = pack_examples(ids, labels, max_length=48, pad_id=0)
    return RowCollator(pad_id=0)([{k: rows[k][i] for k in rows} for i in range(len(rows["input_ids"]))])


def padded_batch() -> dict[str, torch.Tensor]:
    ids, labels = answer_only_examples(1)
    width = max(map(len, ids))
    pad = [width - len(x) for x in ids]
    return {
        "input_ids": torch.tensor([x + [0] * p for x, p in zip(ids, pad)]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * p for x, p in zip(ids, pad)]),
        "labels": torch.tensor([y + [IGNORE_INDEX] * p for y, p in zip(labels, pad)]),
    }


def trained_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def assert_same_loss_and_grads(model, batch, chunk: int | None = None, num_items=None, atol=1e-5, rtol=1e-3):
    head = LabelledHead(model)
    if chunk:
        head.chunk = chunk
    reference = model(**batch).loss if num_items is None else model(**batch, num_items_in_batch=num_items).loss
    reference.backward()
    expected = trained_grads(model)
    loss, outputs = next_token_loss(model, head, batch, num_items)
    loss.backward()
    got = trained_grads(model)
    assert outputs.logits.shape[1] == 0  # no full-vocabulary logits were made
    torch.testing.assert_close(loss, reference, atol=atol, rtol=rtol / 10)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=atol, rtol=rtol, msg=name)


def trainable(tmp_path, model_dir, method: str, target_modules="all-linear", **sections):
    config = validate_config(
        run_config_dict(
            tmp_path,
            model_dir,
            ["unused.jsonl"],
            model={"path": str(model_dir), "dtype": "float32"},
            lora={"dropout": 0.0, "target_modules": target_modules},
            train={"method": method},
            **sections,
        )
    )
    torch.manual_seed(0)
    model = load_trainable_model(config, str(model_dir))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B starts at zero, which would leave every lora_A gradient zero
                parameter.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("rows", ["packed", "padded"])
def test_loss_and_gradients_equal_transformers(tmp_path, tiny_model_dir, method, rows):
    model = trainable(tmp_path, tiny_model_dir, method)
    assert_same_loss_and_grads(model, packed_batch() if rows == "packed" else padded_batch())


def test_chunks_with_recomputation_and_token_counts_across_micro_batches(tmp_path, tiny_model_dir):
    model = trainable(tmp_path, tiny_model_dir, "lora")
    batch = packed_batch()
    # 4 positions per chunk: many chunks, each recomputed in backward; and the sum over a token count
    # that covers other micro-batches too (gradient accumulation)
    assert_same_loss_and_grads(model, batch, chunk=4, num_items=torch.tensor(97))


def test_qlora_loss_and_gradients_equal_transformers(tmp_path, tiny_model_dir):
    model = trainable(tmp_path, tiny_model_dir, "qlora", qlora={"compute_dtype": "float32"})
    assert_same_loss_and_grads(model, packed_batch(), chunk=5)


def tiny_gemma3():
    """Gemma 3 (the quickstart's family): logits soft-capped, LM head tied to the embeddings."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=5.0,
        tie_word_embeddings=True,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).float().train()
    model.config.use_cache = False
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_soft_capped_tied_head_equals_transformers():
    assert_same_loss_and_grads(tiny_gemma3(), padded_batch(), chunk=7)


def test_bf16_autocast_and_no_grad_evaluation():
    """Full fine-tuning's mixed precision (fp32 weights, bf16 matmuls): the head's matmuls run in
    bf16 as the model's would, within bf16 rounding of transformers' loss and gradients; under
    no_grad (evaluation) the same loss and no gradient."""
    model = tiny_gemma3()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_same_loss_and_grads(model, packed_batch(), chunk=6, atol=2e-3, rtol=3e-2)
        with torch.no_grad():
            reference = model(**packed_batch()).loss
            loss, _ = next_token_loss(model, LabelledHead(model), packed_batch())
    torch.testing.assert_close(loss, reference, atol=2e-3, rtol=1e-2)
    assert all(p.grad is None for p in model.parameters())


def test_lora_wrapped_head_goes_through_the_module(tmp_path, tiny_model_dir):
    """A head that is not a plain linear layer (here LoRA on lm_head) is called as a module, each
    chunk recomputed in backward."""
    model = trainable(tmp_path, tiny_model_dir, "lora", target_modules=["q_proj", "lm_head"])
    assert type(LabelledHead(model).module) is not torch.nn.Linear
    assert_same_loss_and_grads(model, packed_batch(), chunk=4)


def test_a_batch_without_labels_gives_zero_loss_and_zero_gradients(tmp_path, tiny_model_dir):
    model = trainable(tmp_path, tiny_model_dir, "lora")
    batch = packed_batch()
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    loss, _ = next_token_loss(model, LabelledHead(model), batch)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
