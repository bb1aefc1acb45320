"""GRPO through `finch train` (CLI, local Ray cluster, real vLLM rollout engine in a Ray actor):
each step's completions come from the policy published after the previous step, rewards are scored
and logged, and the result is a registered adapter that finch serves."""

from __future__ import annotations

import json

import pytest

from finch.fingerprint import fingerprint_model_folder
from finch.registry.store import resolve_entry
from finch.serve.engine import check_servable
from tests.conftest import data_file, register_adapter, register_reward_model
from tests.integration.test_objectives import mlflow_history, run

pytestmark = pytest.mark.integration


def test_grpo_trains_on_rollouts_of_the_current_policy_and_registers_a_servable_adapter(
    tmp_path, tiny_serving_model_dir
):
    questions = str(data_file("sft/gsm8k_chat_train.jsonl"))
    registry, stdout = run(
        tmp_path,
        tiny_serving_model_dir,
        "rl",
        [questions],
        data={"max_length": 96, "overlong": "skip"},
        train={"objective": "grpo", "max_steps": 3, "batch_size": 4, "save_steps": 2, "lr": 1e-3},
        grpo={
            "num_generations": 4,
            "max_completion_length": 8,
            "beta": 0.04,
            "seed": 0,
            "rewards": ["numeric_match", {"name": "regex", "pattern": "[0-9]", "weight": 0.5}],
        },
    )
    assert "finch: data" in stdout and "prompts" in stdout
    entry = resolve_entry(registry, "rl")
    check_servable(entry, fingerprint_model_folder(tiny_serving_model_dir), max_lora_rank=8)
    history = json.loads((tmp_path / "runs" / "rl" / "final" / "log_history.json").read_text())
    steps = [e for e in history if "rollouts/policy_version" in e]
    # on-policy: the completions of step s (logged at s) came from the policy published after step s - 1
    assert [(e["step"], e["rollouts/policy_version"]) for e in steps] == [(1, 0), (2, 1), (3, 2)]
    for e in steps:
        assert 0.0 <= e["rewards/regex/mean"] <= 1.0 and "rewards/numeric_match/mean" in e and "kl" in e
    assert [step for step, _ in mlflow_history(tmp_path, "reward")] == [1, 2, 3]


def test_rloo_trains_on_from_a_registered_sft_adapter_which_is_its_reference(tmp_path, tiny_serving_model_dir):
    """base -> SFT -> RLOO: the policy starts as the SFT adapter, which is also the KL reference (the
    KL is 0 on the first step, before any update), and the new entry names it. One reward is a
    reward model from the registry; two rollout engines share the sampling. The SFT adapter is a
    registered random one: what `finch train` registers is tests/integration/test_train_e2e.py's."""
    questions = str(data_file("sft/gsm8k_chat_train.jsonl"))
    register_adapter(tmp_path / "registry", tiny_serving_model_dir, "sft")
    register_reward_model(tmp_path / "registry", tiny_serving_model_dir, "judge")
    registry, _ = run(
        tmp_path,
        tiny_serving_model_dir,
        "rl",
        [questions],
        data={"max_length": 96, "overlong": "skip"},  # prompts
        lora={"init_adapter": "sft"},
        train={"objective": "rloo", "max_steps": 2, "batch_size": 4, "save_steps": 2, "lr": 1e-3},
        grpo={
            "num_generations": 4,
            "max_completion_length": 8,
            "beta": 0.04,
            "seed": 0,
            "rollout_engines": 2,  # each step's prompts shared out between two engines
            "rewards": [{"name": "regex", "pattern": "[0-9]"}, {"name": "reward_model", "model": "judge"}],
        },
    )
    entry = resolve_entry(registry, "rl")
    assert entry.manifest["config"]["grpo"]["rewards"][1]["model"] == "judge@v1"  # pinned
    assert entry.manifest["lineage"] == {"init_adapter": "sft@v1"}
    check_servable(entry, fingerprint_model_folder(tiny_serving_model_dir), max_lora_rank=8)
    history = json.loads((tmp_path / "runs" / "rl" / "final" / "log_history.json").read_text())
    steps = [e for e in history if "rollouts/policy_version" in e]
    assert [(e["step"], e["rollouts/policy_version"]) for e in steps] == [(1, 0), (2, 1)]
    assert abs(steps[0]["kl"]) < 1e-6 < abs(steps[1]["kl"])
    assert all(e["rewards/reward_model/std"] > 0 for e in steps)  # the reward model tells completions apart


def test_grpo_fully_fine_tunes_a_policy_whose_weights_reach_the_engine_each_step(tmp_path, tiny_serving_model_dir):
    """train.method full: the engine samples each step with the whole policy published after the last
    step (tests/integration/test_rollouts.py checks the engine's log-probabilities then equal the
    trainer's); the reference is the model as loaded, so the KL is 0 until the first update."""
    questions = str(data_file("sft/gsm8k_chat_train.jsonl"))
    register_reward_model(tmp_path / "registry", tiny_serving_model_dir, "judge")  # rewards that always differ
    registry, _ = run(
        tmp_path,
        tiny_serving_model_dir,
        "rl-full",
        [questions],
        data={"max_length": 96, "overlong": "skip"},
        train={"objective": "grpo", "method": "full", "max_steps": 2, "batch_size": 4, "save_steps": 2, "lr": 1e-4},
        grpo={
            "num_generations": 4,
            "max_completion_length": 8,
            "beta": 0.04,
            "seed": 0,
            "rewards": ["numeric_match", {"name": "reward_model", "model": "judge"}],
        },
    )
    entry = resolve_entry(registry, "rl-full")
    assert entry.kind == "model" and entry.manifest["config"]["train"]["method"] == "full"
    history = json.loads((tmp_path / "runs" / "rl-full" / "final" / "log_history.json").read_text())
    steps = [e for e in history if "rollouts/policy_version" in e]
    assert [(e["step"], e["rollouts/policy_version"]) for e in steps] == [(1, 0), (2, 1)]
    assert abs(steps[0]["kl"]) < 1e-6 < abs(steps[1]["kl"])
