"""GRPO's prompts: each row of the training files, in any finch format, becomes the prompt that
completions are sampled for, and the reference that rewards compare them with. A row is read as
`finch eval` reads it (eval/examples.py: the final assistant answer is the reference; a row that
ends with a user turn is a prompt without one), and its prompt is rendered by the same template
code as training rows and inference prompts (data/tokenization.prompt_token_ids)."""

from __future__ import annotations

from typing import Any

from finch.config import EvalDataConfig, RunConfig
from finch.data.pipeline import PreparedData
from finch.data.readers import DatasetError
from finch.data.templates import resolve_template, with_system_prompt
from finch.data.tokenization import prompt_token_ids
from finch.eval.examples import read_examples
from finch.models.source import ModelSource
from finch.models.tokenizer import load_tokenizer

# The dataset's columns besides `prompt` (the token ids) reach the reward functions (rl/rewards.py).
COLUMNS = ("prompt", "reference", "messages", "source")


def prompt_rows(config: RunConfig, tokenizer: Any, template: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The prompts as rows of COLUMNS, and counts for the run's stats. The driver reads them (a bad
    row stops the run with its file:line before any worker starts) and hands them to the workers:
    prompt sets are small next to SFT corpora (GSM8K's 7,473 questions: about 2 MB of token ids).

    A prompt longer than data.max_length stops the run with its file:line when data.overlong is
    'error', and is skipped (counted) otherwise: cutting a prompt would change the question.
    """
    data = config.data
    kept, overlong = [], 0
    for example in read_examples(EvalDataConfig(files=data.train_files, format=data.format)):
        messages = with_system_prompt(example.messages, data.system_prompt)
        ids = prompt_token_ids(messages, tokenizer, template)
        if len(ids) > data.max_length:
            if data.overlong == "error":
                raise DatasetError(
                    f"{example.source}: the prompt is {len(ids)} tokens; data.max_length is {data.max_length}"
                )
            overlong += 1
            continue
        kept.append({"prompt": ids, "reference": example.reference, "messages": messages, "source": example.source})
    if not kept:
        raise DatasetError(f"no prompts in {', '.join(data.train_files)}: every one is over data.max_length")
    stats = {"prompts": len(kept), "skipped_overlong": overlong, "tokens": sum(len(row["prompt"]) for row in kept)}
    return kept, stats


def prepare_prompts(config: RunConfig, model: ModelSource) -> PreparedData:
    tokenizer = load_tokenizer(model.folder, config.model.trust_remote_code)
    template = resolve_template(config.data.template, tokenizer)
    rows, stats = prompt_rows(config, tokenizer, template)
    return PreparedData(train=None, eval=None, template=template, stats=stats, prompts=rows)
