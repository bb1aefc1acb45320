"""Greedy reference answers from transformers that allow for near-ties.

vLLM (its CPU kernels) and transformers compute the same fp32 model with different kernels, and
the kernels differ between CPUs (AVX512 vs AVX2-only): their logits agree to about 1e-6, not
exactly. Where greedy decoding's best two logits are closer than that, either token is a correct
greedy choice, and the rest of the answer follows from that choice. The tiny random models the
serving tests use have such steps now and then: the base model's answer to "Name a colour." has
its 10th token ahead of the next by 4e-7 (" ue" over "ough"), and an AVX2-only CPU served the
other one.

So a served greedy answer is checked against every answer that takes, at each step, a token
within TIE_TOLERANCE of the best logit (a near-tie), computed with transformers. The bugs these
tests exist for (a request computed with the wrong adapter or none) change the logits by far more
than that, and the answers wholly.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Logits closer than this are a tie. Measured on the tiny serving model (fp32; base + 3 adapters x
# 5 prompts x 12 steps; vLLM's greedy path with logprobs=5, scored by transformers): the two
# disagree by at most 1.4e-6 in log-probability, on an AVX512 CPU and with ONEDNN_MAX_CPU_ISA=AVX2
# ATEN_CPU_CAPABILITY=avx2 alike. Greedy margins there: median 3.4e-2, 10th percentile 6.7e-3
# (logits' std 0.16); 1 step of 240 is under 1e-4 (the 4e-7 above). 1e-4 leaves 70x room for
# kernel noise and still branches almost nowhere.
TIE_TOLERANCE = 1e-4
# More near-tie answers than this, and the model is too flat to test against: the check would no
# longer tell a right answer from a wrong one.
MAX_ANSWERS = 8


def load_reference(model_dir: Path | str, adapter_dir: Path | str | None = None) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    eos_token_id: int | None = None,
    min_new_tokens: int = 0,
    tolerance: float = TIE_TOLERANCE,
) -> list[list[int]]:
    """Every greedy continuation of `prompt` (token ids) allowing for near-ties; the plain greedy
    answer (what `generate(do_sample=False)` returns) first. A continuation ends at
    `max_new_tokens` or after `eos_token_id`, which is not chosen before `min_new_tokens`."""
    answers: list[list[int]] = []
    pending: list[list[int]] = [[]]
    while pending:
        answer = pending.pop()
        while len(answer) < max_new_tokens and not (answer and answer[-1] == eos_token_id):
            logits = model(torch.tensor([prompt + answer])).logits[0, -1].float()
            if eos_token_id is not None and len(answer) < min_new_tokens:
                logits[eos_token_id] = -torch.inf
            best = int(logits.argmax())
            tied = [int(t) for t in torch.nonzero(logits >= logits[best] - tolerance).flatten() if int(t) != best]
            pending += [answer + [token] for token in tied]
            answer = answer + [best]
        answers.append(answer)
        if len(answers) + len(pending) > MAX_ANSWERS:
            raise AssertionError(
                f"over {MAX_ANSWERS} greedy answers within {tolerance} of a tie: the model's logits are too flat to test against"
            )
    return answers
