"""Rewards for GRPO training (online RL with verifiable rewards): score each sampled completion.

`reward_functions(rewards)` turns the run's `RewardConfig`s into the functions TRL's GRPOTrainer calls on
every batch of completions, and their weights. The text rewards are `finch eval`'s metrics, built by the
same `text_scorer` and called the same way, so training optimizes the score evaluation reports; a `python`
reward calls the user's `function(answer, reference, example)` exactly like eval's python metric, so one
function serves both evaluation and training. length_penalty is DAPO's soft overlong punishment; a
reward_model reward is a registry reward model's score of the prompt and completion.

TRL calls each function as `func(prompts=..., completions=..., completion_ids=..., **columns)`: the columns
are the dataset's other columns, one value per completion (ours: reference, messages, source), plus
trainer_state, log_extra and log_metric. It returns one float per completion, or None where the reward
does not apply (no reference, or a MetricError for that completion); TRL turns None into NaN and leaves
it out of its nan-aware weighted sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from finch.config import RewardConfig
from finch.eval.metrics import MetricError, text_scorer

RewardFunction = Callable[..., list[float | None]]


def reward_functions(
    rewards: list[RewardConfig], load_reward_model: Callable[[RewardConfig], Any] | None = None
) -> tuple[list[RewardFunction], list[float]]:
    """TRL reward functions and their weights (GRPOConfig.reward_weights), in the order of `rewards`.
    `load_reward_model`: a reward_model reward's model, ready to score (registry/models.py).

    A bad regex, schema or import path fails here (ConfigError), before any generation.
    """
    return [_reward_function(reward, load_reward_model) for reward in rewards], [reward.weight for reward in rewards]


def _reward_function(reward: RewardConfig, load_reward_model: Callable[[RewardConfig], Any] | None) -> RewardFunction:
    if reward.name == "reward_model":
        if load_reward_model is None:
            raise ValueError(f"reward {reward.key}: no way to load reward models was given")
        function = _reward_model(load_reward_model(reward))
    elif reward.name == "length_penalty":
        function = _length_penalty(reward)
    else:
        function = _text_reward(reward)
    # TRL names the reward's logged metrics after the function: rewards/<key>/mean.
    function.__name__ = function.__qualname__ = reward.key
    return function


def _text_reward(reward: RewardConfig) -> RewardFunction:
    scorer, key = text_scorer(reward), reward.key

    def score(
        completions: Sequence[str],
        reference: Sequence[str | None],
        messages: Sequence[list[dict[str, str]]],
        source: Sequence[str],
        log_metric: Callable[[str, float], None] | None = None,
        **_: Any,
    ) -> list[float | None]:
        scores: list[float | None] = []
        errors = 0
        for answer, ref, prompt, where in zip(completions, reference, messages, source, strict=True):
            example = {"messages": prompt, "source": where}  # what eval passes (eval/run.py text_scores)
            try:
                scores.append(scorer(answer, ref, example))
            except MetricError:  # one completion that cannot be scored does not apply; the batch goes on
                scores.append(None)
                errors += 1
        if log_metric is not None:
            # Logged on every batch, zeros too: TRL averages the values over each logging step.
            log_metric(f"rewards/{key}/errors", errors)
        return scores

    return score


def overlong_penalty(length: int, max_tokens: int, soft_tokens: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_tokens - soft_tokens, linear to -1 at max_tokens, -1 beyond."""
    start = max_tokens - soft_tokens
    if length <= start:
        return 0.0
    if length <= max_tokens:  # only reached when soft_tokens > 0
        return (start - length) / soft_tokens
    return -1.0


def _length_penalty(reward: RewardConfig) -> RewardFunction:
    max_tokens, soft_tokens = reward.max_tokens, reward.soft_tokens
    assert max_tokens is not None  # RewardConfig requires it for length_penalty

    def score(completion_ids: Sequence[Sequence[int]], **_: Any) -> list[float | None]:
        return [overlong_penalty(len(ids), max_tokens, soft_tokens) for ids in completion_ids]

    return score


# Sequences a reward model scores at once: its activations, not its weights, grow with it.
REWARD_MODEL_BATCH = 8


def _reward_model(model: Any) -> RewardFunction:
    """A reward model's score of each prompt + completion, read from the tokens as sampled (the
    policy's template and tokenizer, which the reward model was trained on: registry/models.py
    check_reward_models)."""
    import torch

    pad_id = model.config.pad_token_id
    batch_size = REWARD_MODEL_BATCH if pad_id is not None else 1  # without a pad id, no padding

    @torch.no_grad()
    def score(
        prompts: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], **_: Any
    ) -> list[float | None]:
        sequences = [
            list(prompt) + list(completion) for prompt, completion in zip(prompts, completion_ids, strict=True)
        ]
        scores: list[float | None] = []
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            longest = max(map(len, batch))
            # Right padding: the model reads its score at the last token that is not padding.
            ids = torch.tensor([seq + [pad_id] * (longest - len(seq)) for seq in batch], device=model.device)
            mask = torch.tensor([[1] * len(seq) + [0] * (longest - len(seq)) for seq in batch], device=model.device)
            scores += model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
        return scores

    return score
