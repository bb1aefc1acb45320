"""GRPO and RLOO on finch's rollouts, no Ray: the advantages and the loss TRL trains on, and their
gradients, equal the objectives computed directly from the completions, the rewards and the
engine's log-probabilities that the rollout engine returned.

The engine here is a fixed list of completions per prompt, with log-probabilities that differ from
the trainer's by a known amount per completion (as a bf16 engine's would), so that GRPO's
importance-sampling correction has work to do: one completion passes the cap and must count for
nothing. The real engine's log-probabilities are checked against transformers' in
tests/integration/test_rollouts.py.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import safetensors.torch
import torch

from finch.config import validate_config
from finch.models.loading import load_trainable_model
from finch.registry.store import ADAPTER_FILES
from finch.rl.rollouts import Rollouts, Sampling
from finch.train.trainers import build_trainer
from tests.conftest import make_tokenizer, run_config_dict

TEMPERATURE = 0.7
BETA = 0.04
MAX_COMPLETION = 6
PROMPTS = [[5, 17, 99, 3], [44, 2, 19, 7, 300]]  # the one step's batch
# Two completions per prompt (GRPO's group), of different lengths: the length penalty tells them apart.
# STOP is appended to the ones that end; the last of each pair is cut at MAX_COMPLETION tokens.
COMPLETIONS = {0: ([70, 71, 72], [73, 74, 75, 76, 77, 78]), 1: ([80], [81, 82, 83, 84, 85, 86])}
# log p_trainer - log p_engine, summed over each completion: TRL's sequence-level ratio is e^offset,
# and over its cap (3: offset 1.0986) the completion is masked out.
OFFSETS = {(0, 0): 0.1, (0, 1): -0.3, (1, 0): 0.4, (1, 1): 1.5}
IS_CAP = 3.0


class FixedEngine:
    """A RolloutSource whose completions are COMPLETIONS and whose log-probabilities are the
    trainer's minus OFFSETS, spread over the completion's tokens."""

    def __init__(self, model, stop: int):
        self.model, self.stop = model, stop
        self.published: list[int] = []
        self.files: list[dict[str, bytes]] = []
        self.positions: list[tuple[int, int | None]] = []  # (start, total) of each call
        self.batches: list[list[tuple[int, int, list[int]]]] = []  # (prompt index, sample, completion ids)

    def publish(self, version: int, files: dict[str, bytes]) -> None:
        self.published.append(version)
        self.files.append(files)

    def generate(
        self, prompts: list[list[int]], sampling: Sampling, start: int = 0, total: int | None = None
    ) -> Rollouts:
        self.positions.append((start, total))
        seen: dict[int, int] = {}
        batch, logprobs = [], []
        for prompt in prompts:
            index = PROMPTS.index(prompt)
            sample = seen.setdefault(index, 0)
            seen[index] += 1
            ids = COMPLETIONS[index][sample]
            ids = ids + [self.stop] if len(ids) < MAX_COMPLETION else ids
            batch.append((index, sample, ids))
            true = token_logprobs(self.model, prompt, ids).detach()
            logprobs.append((true - OFFSETS[index, sample] / len(ids)).tolist())
        self.batches.append(batch)
        return Rollouts([ids for _, _, ids in batch], logprobs, version=len(self.published) - 1)


def token_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(token) of each completion token after temperature, from one plain forward pass."""
    logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float() / TEMPERATURE
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def length_reward(ids: list[int]) -> float:
    """The length_penalty reward configured below (max_tokens 6, soft_tokens 4), by DAPO's formula."""
    return 0.0 if len(ids) <= 2 else max(-1.0, (2 - len(ids)) / 4)


def rl_trainer(tmp_path, model_dir, objective: str, method: str = "lora", **grpo):
    config = validate_config(
        run_config_dict(
            tmp_path,
            model_dir,
            ["unused.jsonl"],
            train={
                "objective": objective,
                "method": method,
                "max_steps": 1,
                "batch_size": 4,  # two prompts, two completions each
                "lr": 1e-3,
                "max_grad_norm": 1e9,  # the gradients compared are the loss's own, not clipped
                "scheduler": "constant",
            },
            grpo={
                "num_generations": 2,
                "max_completion_length": MAX_COMPLETION,
                "temperature": TEMPERATURE,
                "beta": BETA,
                "rewards": [{"name": "length_penalty", "max_tokens": 6, "soft_tokens": 4}],
                **grpo,
            },
            qlora={"compute_dtype": "float32"},
        )
    )
    torch.manual_seed(0)
    model = load_trainable_model(config, str(model_dir))
    tokenizer = make_tokenizer()
    engine = FixedEngine(model, stop=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    rows = [
        {"prompt": p, "reference": None, "messages": [], "source": f"p.jsonl:{i + 1}"} for i, p in enumerate(PROMPTS)
    ]
    trainer = build_trainer(config, model, tokenizer, rows, None, str(tmp_path / "hf"), rollouts=engine)
    # As after some training: the policy is no longer its reference (the base: the adapter disabled,
    # or for full fine-tuning TRL's copy of the model as loaded).
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
        elif method == "full":
            parameter.data.add_(torch.randn_like(parameter) * 0.02)
    return trainer, engine


class StepRecorder:
    """What TRL computed in the one training step: its loss inputs and result, and the gradients."""

    def __init__(self, trainer):
        self.inputs, self.losses, self.gradients = None, [], {}
        compute_loss = trainer.compute_loss

        def recording_compute_loss(model, inputs, *args, **kwargs):
            self.inputs = inputs
            loss = compute_loss(model, inputs, *args, **kwargs)
            self.losses.append(loss.detach())
            return loss

        trainer.compute_loss = recording_compute_loss
        trainer.add_callback(self)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def __getattr__(self, event):  # the callback events it does not use
        if event.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(event)


def sequence_logprobs(model, batch) -> list[torch.Tensor]:
    return [token_logprobs(model, PROMPTS[index], ids) for index, _, ids in batch]


def reference_logprobs(model, reference, batch) -> list[torch.Tensor]:
    """Under the reference: a fully fine-tuned policy's own (TRL's copy), a LoRA policy's adapter disabled."""
    with torch.no_grad(), contextlib.nullcontext() if reference else model.disable_adapter():
        return sequence_logprobs(reference or model, batch)


def grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    groups = rewards.view(-1, 2)
    return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)


def direct_grpo_loss(model, reference, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """DAPO-averaged GRPO (TRL's default loss_type) on one on-policy step: each token's loss is
    -min(ratio A, clip(ratio) A) (the ratio is 1 in value, its gradient the policy gradient),
    weighted by the completion's importance weight, plus beta times the k3 KL estimate (times the
    ratio: its gradient corrects the estimate's bias); summed over the batch's tokens and divided by
    their count."""
    rewards = torch.tensor([length_reward(ids) for _, _, ids in batch])
    advantages = grpo_advantages(rewards)
    logprobs, references = sequence_logprobs(model, batch), reference_logprobs(model, reference, batch)
    total, tokens = 0.0, 0
    for (index, sample, ids), advantage, logp, ref in zip(batch, advantages, logprobs, references, strict=True):
        weight = math.exp(OFFSETS[index, sample])
        weight = 0.0 if weight > IS_CAP else weight
        ratio = torch.exp(logp - logp.detach())
        policy = -torch.minimum(ratio * advantage, torch.clamp(ratio, 0.8, 1.2) * advantage) * weight
        kl = (torch.exp(ref - logp) - (ref - logp) - 1) * ratio  # ratio: TRL's use_bias_correction_kl
        total = total + (policy + BETA * kl).sum()
        tokens += len(ids)
    return total / tokens, advantages


def direct_rloo_loss(model, reference, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (TRL's RLOOTrainer): the reward less beta times the completion's summed log-ratio to
    the reference, its advantage that less the mean of the other completions of its prompt, and the
    clipped ratio of the whole sequence's probability (1 in value) times the advantage, averaged
    over completions."""
    logprobs, references = sequence_logprobs(model, batch), reference_logprobs(model, reference, batch)
    rewards = torch.tensor(
        [
            length_reward(ids) - BETA * (lp.detach() - ref).sum().item()
            for (_, _, ids), lp, ref in zip(batch, logprobs, references)
        ]
    )
    groups = rewards.view(-1, 2)
    advantages = (groups - groups.flip(1)).view(-1)  # with two completions, the other one is the baseline
    losses = []
    for logp, advantage in zip(logprobs, advantages, strict=True):
        ratio = torch.exp(logp.sum() - logp.sum().detach())
        losses.append(-torch.minimum(ratio * advantage, torch.clamp(ratio, 0.8, 1.2) * advantage))
    return torch.stack(losses).mean(), advantages


@pytest.mark.parametrize(
    ("objective", "method", "direct_loss"),
    [
        ("grpo", "lora", direct_grpo_loss),
        ("grpo", "qlora", direct_grpo_loss),
        ("grpo", "full", direct_grpo_loss),
        ("rloo", "lora", direct_rloo_loss),
    ],
)
def test_advantages_loss_and_gradients_equal_the_direct_computation(
    tmp_path, tiny_model_dir, objective, method, direct_loss
):
    trainer, engine = rl_trainer(tmp_path, tiny_model_dir, objective, method)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    recorder = StepRecorder(trainer)
    trainer.train()
    [batch] = engine.batches
    assert engine.published == [0]  # the policy before the step, which sampled the batch
    [files] = engine.files
    if method == "full":  # the whole model as it was, which the engine loads in place of its own
        published = safetensors.torch.load(files["model.safetensors"])
        assert published.keys() == before.keys()
        for name, tensor in published.items():
            torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)
    else:
        assert files.keys() == set(ADAPTER_FILES)
    assert sorted((index, sample) for index, sample, _ in batch) == sorted(OFFSETS)

    # Directly, from the same weights as the step started with.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in before:
                parameter.copy_(before[name])
    model.zero_grad()
    loss, advantages = direct_loss(model, trainer.ref_model, batch)
    # TRL shuffles a generation batch before it is trained on: compare row by row.
    trained_order = [
        [ids for _, _, ids in batch].index(row[mask.bool()].tolist())
        for row, mask in zip(recorder.inputs["completion_ids"], recorder.inputs["completion_mask"], strict=True)
    ]
    advantages = advantages[trained_order]
    loss.backward()
    torch.testing.assert_close(recorder.inputs["advantages"], advantages, rtol=1e-4, atol=1e-5)
    [trainer_loss] = recorder.losses
    torch.testing.assert_close(trainer_loss, loss.detach(), rtol=1e-4, atol=1e-6)
    assert recorder.gradients.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, gradient in recorder.gradients.items():  # fp32, batched and padded there, one by one here
        direct = model.get_parameter(name).grad
        assert (gradient - direct).norm() <= 1e-4 * direct.norm(), name
    assert any(gradient.abs().max() > 0 for gradient in recorder.gradients.values())


def test_each_worker_tells_the_engine_where_its_prompts_sit_in_the_whole_step(tmp_path, tiny_model_dir, monkeypatch):
    """With several training workers TRL may split a GRPO group between them. With grpo.seed each
    request's seed is its place in the step's whole batch: a worker's prompts numbered from 0 would
    give the second worker's half of a group the first half's seeds, and so the same completions."""
    trainer, engine = rl_trainer(tmp_path, tiny_model_dir, "grpo")
    accelerator = type(trainer.accelerator)
    monkeypatch.setattr(accelerator, "process_index", property(lambda self: 1))  # the second of two workers
    monkeypatch.setattr(accelerator, "num_processes", property(lambda self: 2))
    trainer.sample([PROMPTS[0], PROMPTS[0]])
    assert engine.positions == [(2, 4)]
