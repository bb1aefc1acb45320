"""GRPO and RLOO with TRL's `GRPOTrainer` and `RLOOTrainer`, their completions sampled by finch's
rollout engine (rl/rollouts.py).

TRL brings the objective: group-relative advantages, the clipped probability ratio, the KL term,
its loss variants, reward weighting and logging. finch changes where completions come from: TRL
would generate with transformers in the training process, or start vLLM in it (colocate) or talk
to a `trl vllm-serve` server that receives full weights through NCCL. Here vLLM engines run in
Ray actors beside the workers, and after each optimizer step the first worker publishes the policy
to them as a new version: a LoRA adapter (megabytes, the base weights never move) or, fully
fine-tuned, the whole model's weights. The engine's log-probabilities go to TRL's
importance-sampling correction as its own vLLM backend's would.

Prompts arrive as finch-rendered token ids (rl/prompts.py), the same template as training rows and
inference; TRL's own chat templating is bypassed.
"""

from __future__ import annotations

import tempfile
from typing import Any

from peft import PeftModel
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from finch.config import RunConfig
from finch.models.tokenizer import stop_token_ids
from finch.registry.models import load_reward_model, reward_model_entry
from finch.rl.rewards import reward_functions
from finch.rl.rollouts import RolloutSource, Sampling, policy_files
from finch.train.arguments import hf_arguments
from finch.train.loss import causal_lm
from finch.train.mixins import PretokenizedTrlTrainer


class RolloutsFromFinchEngine:
    """GRPOTrainer/RLOOTrainer mixin: completions from the rollout engine, each batch from the policy
    as it is after the last optimizer step (its version is logged as rollouts/policy_version)."""

    def __init__(self, *args, rollouts: RolloutSource, sampling: Sampling, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollouts, self.sampling = rollouts, sampling
        self.eos_token_ids = list(sampling.stop_token_ids)  # what ends a completion (TRL's truncation mask)
        self.published_step: int | None = None

    def _tokenize_prompts(self, prompts: list[list[int]]):
        return prompts, None, {}

    def sample(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
        """A completion per prompt and the engine's log-probability of each of its tokens."""
        if self.published_step != self.state.global_step:
            self.publish_policy()
        # Every worker samples as many prompts; TRL may split a GRPO group between workers.
        rank, workers = self.accelerator.process_index, self.accelerator.num_processes
        rollouts = self.rollouts.generate(prompt_ids, self.sampling, rank * len(prompt_ids), workers * len(prompt_ids))
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["rollouts/policy_version"].append(rollouts.version)
        return rollouts.completion_ids, rollouts.logprobs

    def publish_policy(self) -> None:
        """The policy as it is now (the adapter, or the whole model when fully fine-tuned), to the
        engine as version global_step; every rank waits for it."""
        policy = self.accelerator.unwrap_model(self.model)
        full_weights = not isinstance(policy, PeftModel)
        # Under FSDP every rank holds a shard: gathering the whole state dict takes them all.
        state_dict = self.accelerator.get_state_dict(self.model) if full_weights else None
        if self.accelerator.is_main_process:
            with tempfile.TemporaryDirectory(prefix="finch-policy-") as folder:
                policy.save_pretrained(folder, state_dict=state_dict)
                files = policy_files(folder, full_weights)
            self.rollouts.publish(self.state.global_step, files)
        self.accelerator.wait_for_everyone()
        self.published_step = self.state.global_step


class FinchGRPOTrainer(RolloutsFromFinchEngine, PretokenizedTrlTrainer, GRPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # finch's engine plays the part of TRL's vLLM backend: TRL applies its importance-sampling
        # correction (the engine's log-probabilities against the trainer's) only when use_vllm is set.
        self.use_vllm = True

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return self.sample(prompt_ids)


class FinchRLOOTrainer(RolloutsFromFinchEngine, PretokenizedTrlTrainer, RLOOTrainer):
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
        return self.sample(prompt_ids)[0]  # RLOO recomputes the sampling policy's log-probabilities itself


def online_rl_arguments(config: RunConfig, output_dir: str) -> GRPOConfig | RLOOConfig:
    """TRL's arguments for train.objective grpo or rloo (the settings only one of them has are
    refused for the other in RunConfig)."""
    grpo = config.grpo
    shared = {
        **hf_arguments(config, output_dir),
        "num_generations": grpo.num_generations,
        "max_completion_length": grpo.max_completion_length,
        "temperature": grpo.temperature,
        "top_p": grpo.top_p,
        "beta": grpo.beta,
        "epsilon": grpo.epsilon,
        "epsilon_high": grpo.epsilon_high,
        "num_iterations": grpo.num_iterations,
        "mask_truncated_completions": grpo.mask_truncated_completions,
        "reward_weights": [reward.weight for reward in grpo.rewards],
    }
    if config.train.objective == "rloo":
        return RLOOConfig(**shared, normalize_advantages=grpo.normalize_advantages)
    return GRPOConfig(
        **shared,
        loss_type=grpo.loss_type,
        scale_rewards=grpo.scale_rewards,
        vllm_importance_sampling_correction=grpo.vllm_importance_sampling_correction,
    )


def build_online_rl_trainer(
    config: RunConfig,
    model: Any,
    tokenizer: Any,
    args: GRPOConfig | RLOOConfig,
    prompts: list[dict],
    rollouts: RolloutSource,
) -> FinchGRPOTrainer | FinchRLOOTrainer:
    from datasets import Dataset

    policy = causal_lm(model)

    def reward_model_of(reward):
        entry = reward_model_entry(config.registry_dir, reward)
        return load_reward_model(entry, policy.name_or_path, config.model.dtype, policy.device)

    functions, _ = reward_functions(config.grpo.rewards, reward_model_of)  # the weights are in args
    grpo = config.grpo
    stop_ids = tuple(stop_token_ids(policy.name_or_path, tokenizer))
    sampling = Sampling(grpo.max_completion_length, grpo.temperature, grpo.top_p, stop_ids, grpo.seed)
    trainer_class = FinchRLOOTrainer if config.train.objective == "rloo" else FinchGRPOTrainer
    return trainer_class(
        model=model,
        reward_funcs=functions,
        args=args,
        train_dataset=Dataset.from_list(prompts),
        processing_class=tokenizer,
        rollouts=rollouts,
        sampling=sampling,
    )
