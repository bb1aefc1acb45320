"""Answers from every evaluated model, generated in one Ray Data batch job per engine group.

Ray's own `ray.data.llm` processor needs the CUDA build of vLLM (`ray[llm]`) and loads adapters
from cloud storage only (see serve/app.py), so the stage is an actor pool of finch's engine setup:
one vLLM engine per actor (one actor on a CPU machine, one per GPU on a cluster), every adapter of
the group loaded in it, and each batch's requests, for all models at once, handed to vLLM
together, which schedules them in the same continuous batches. Prompts render with each model's
own template and training system prompt (data/templates.py), as in training and `finch serve`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from finch.config import EngineConfig, GenerationConfig
from finch.eval.examples import EvalExample
from finch.eval.targets import EngineGroup

# Rows handed to vLLM per call: enough for continuous batching to keep every slot busy, small
# enough that progress shows and a failure loses little.
BATCH_ROWS = 256


class Generator:
    """A Ray Data actor: one vLLM engine with every adapter of its group."""

    def __init__(self, group: EngineGroup, engine: EngineConfig, generation: GenerationConfig, dtype: str, gpus: int):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(engine.kv_cache_gib))
        # One process: vLLM's engine-core subprocess would not inherit the actor's CPU/GPU share.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # The engine's start-up log (about 40 lines) would bury the job's own output; errors still show.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        from finch.models.tokenizer import load_tokenizer, stop_token_ids
        from finch.runtime import cache_root
        from finch.serve.cpu_lora import use_grouped_lora_products
        from finch.serve.engine import engine_arguments, write_zero_adapter

        folder = group.model.here()
        engine = within_model_context(engine, folder)
        self.engine, self.generation = engine, generation
        self.tokenizer = load_tokenizer(folder)
        self.stop_ids = stop_token_ids(folder, self.tokenizer)
        if gpus == 0:
            use_grouped_lora_products()
        self.llm = LLM(**engine_arguments(engine, folder, dtype, gpus))
        # On CPU the base model answers through a zero adapter: vllm-cpu 0.32 computes no-adapter
        # requests in a batch with adapters through the last adapter's weights (serve/engine.py).
        zero = (
            LoRARequest("finch-base", 1, str(write_zero_adapter(folder, cache_root() / "zero-adapters")))
            if gpus == 0
            else None
        )
        self.requests = {
            t.name: LoRARequest(t.name, index + 2, t.adapter_path) if t.adapter_path else zero
            for index, t in enumerate(group.targets)
        }
        self.targets = {t.name: t for t in group.targets}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params, loras, rows = [], [], [], []
        out: dict[str, list] = {
            "example": [],
            "target": [],
            "answer": [],
            "answer_tokens": [],
            "finish_reason": [],
            "error": [],
        }
        for example, target, messages in zip(batch["example"], batch["target"], batch["messages"]):
            ids, problem = self._prompt(self.targets[target], json.loads(messages))
            if problem:
                self._append(out, example, target, "", 0, None, problem)
                continue
            room = self.engine.max_model_len - len(ids)
            generation = self.generation
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(
                SamplingParams(
                    max_tokens=min(generation.max_tokens, room),
                    temperature=generation.temperature,
                    top_p=generation.top_p,
                    seed=generation.seed,
                    stop_token_ids=self.stop_ids,
                )
            )
            loras.append(self.requests[target])
            rows.append((example, target))
        outputs = self.llm.generate(prompts, params, lora_request=loras, use_tqdm=False) if prompts else []
        for (example, target), output in zip(rows, outputs):
            answer = output.outputs[0]
            self._append(out, example, target, answer.text, len(answer.token_ids), answer.finish_reason, "")
        return out

    def _prompt(self, target: Any, messages: list[dict[str, str]]) -> tuple[list[int], str]:
        """The prompt's token ids, or why it cannot be answered."""
        from finch.data.templates import with_system_prompt
        from finch.data.tokenization import prompt_token_ids

        try:
            ids = prompt_token_ids(with_system_prompt(messages, target.system_prompt), self.tokenizer, target.template)
        except Exception as err:  # a conversation this template cannot render: that row's error, not the run's
            return [], f"cannot render the prompt: {err}"
        if len(ids) >= self.engine.max_model_len:
            return [], f"the prompt is {len(ids)} tokens; engine.max_model_len is {self.engine.max_model_len}"
        return ids, ""

    @staticmethod
    def _append(
        out: dict[str, list], example: int, target: str, answer: str, tokens: int, finish: str | None, error: str
    ) -> None:
        for column, value in zip(out, (int(example), str(target), answer, tokens, finish or "", error)):
            out[column].append(value)


def within_model_context(engine: EngineConfig, folder: str) -> EngineConfig:
    """engine.max_model_len, lowered to the model's context: vLLM refuses to start beyond it, and the
    default (2048) is more than small models have."""
    from transformers import AutoConfig

    context = getattr(AutoConfig.from_pretrained(folder).get_text_config(), "max_position_embeddings", None)
    return engine.model_copy(update={"max_model_len": min(engine.max_model_len, context or engine.max_model_len)})


def generate_answers(
    group: EngineGroup,
    examples: list[EvalExample],
    engine: EngineConfig,
    generation: GenerationConfig,
    dtype: str,
    engines: int,
    on_gpu: bool,
    progress: Any,
) -> list[dict[str, Any]]:
    """Every target's answer to every example: rows {example, target, answer, answer_tokens, finish_reason, error}."""
    import ray.data

    # Example-major: each batch holds every model's request for the same prompts.
    items = [
        {"example": e.index, "target": t.name, "messages": json.dumps(e.messages)}
        for e in examples
        for t in group.targets
    ]
    answers = ray.data.from_items(items).map_batches(
        Generator,
        fn_constructor_kwargs={
            "group": group,
            "engine": group.engine_settings(engine, on_gpu),
            "generation": generation,
            "dtype": dtype,
            "gpus": 1 if on_gpu else 0,
        },
        batch_size=BATCH_ROWS,
        concurrency=engines,
        num_cpus=1,
        num_gpus=1 if on_gpu else 0,
    )
    rows = []
    for row in answers.iter_rows():
        rows.append(row)
        progress()
    return rows
