"""`finch export --format gguf`: llama.cpp's converter (installed apart from finch's `gguf`) turns
the merged model into GGUF files whose vocabulary, special tokens and greedy output match the
merged transformers model."""

from __future__ import annotations

import pytest
import torch

from finch.export.gguf import export_gguf
from finch.export.merged import export_merged
from tests.unit.test_export import register

pytestmark = pytest.mark.integration
PROMPT = "The wifi password at the hotel is"


def greedy(model, ids: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)[0].tolist()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def gguf_field(reader, key: str):
    return reader.fields[key].contents()


def test_gguf_exports_carry_the_tokenizer_and_reproduce_greedy_output(tmp_path, tiny_spm_model_dir, monkeypatch):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("FINCH_CACHE_DIR", str(tmp_path / "cache"))  # the converter is installed here
    register(tmp_path, tiny_spm_model_dir, "facts")
    merged = AutoModelForCausalLM.from_pretrained(
        export_merged(tmp_path / "registry", "facts", tmp_path / "merged", dtype="float16"), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([tokenizer(PROMPT).input_ids])
    expected, reference = greedy(merged, ids), logits(merged, ids)
    adapter_effect = (reference - logits(AutoModelForCausalLM.from_pretrained(tiny_spm_model_dir), ids)).abs().max()

    sizes = {}
    for gguf_type in ("f16", "q8_0"):
        path = export_gguf(tmp_path / "registry", "facts", tmp_path / "out" / f"facts-{gguf_type}.gguf", gguf_type)
        sizes[gguf_type] = path.stat().st_size
        reader = GGUFReader(path)
        assert gguf_field(reader, "tokenizer.ggml.model") == "llama"  # SentencePiece, as trained
        assert gguf_field(reader, "tokenizer.ggml.tokens") == tokenizer.convert_ids_to_tokens(
            list(range(len(tokenizer)))
        )
        assert gguf_field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
        assert gguf_field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
        assert gguf_field(reader, "tokenizer.ggml.add_bos_token") is True and ids[0, 0] == tokenizer.bos_token_id
        from_gguf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        error = (logits(from_gguf, ids) - reference).abs().max()
        if gguf_type == "f16":  # the same weights: the same greedy tokens
            assert error < 0.01 * adapter_effect and greedy(from_gguf, ids) == expected
        else:  # 8-bit weights: a little noise (a random model's near-ties may flip a later token)
            assert error < 0.1 * adapter_effect
            assert greedy(from_gguf, ids)[: ids.shape[1] + 4] == expected[: ids.shape[1] + 4]
    assert sizes["q8_0"] < 0.6 * sizes["f16"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["facts-f16.gguf", "facts-q8_0.gguf"]  # no leftovers
