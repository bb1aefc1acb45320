"""GRPO's rollout engine (real vLLM, the CPU build here): each policy version published is served
at once, completions come back with the version that made them, and their log-probabilities are the
training model's (transformers, + PEFT for an adapter, with the same weights) to fp32 tolerance:
LoRA policies swapped in as adapters, fully fine-tuned ones loaded in place of the base weights."""

from __future__ import annotations

import pytest
import torch

from finch.config import EngineConfig
from finch.rl.rollouts import RolloutClient, RolloutEngine, Sampling, policy_files
from tests.conftest import make_adapter
from tests.greedy import load_reference

pytestmark = pytest.mark.integration
PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [44, 2, 19, 7, 300, 12], [5, 17, 99, 3, 250, 31, 8]]
TEMPERATURE = 0.7


@torch.no_grad()
def sampled_logprobs(model, prompt: list[int], completion: list[int]) -> list[float]:
    """log p(token) of each completion token after temperature, as GRPO's trainer computes it."""
    logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float() / TEMPERATURE
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0].tolist()


def test_versions_swap_in_and_logprobs_match_the_training_model(ray_local, tmp_path, tiny_serving_model_dir):
    """As GRPO runs it: a Ray actor (vLLM and its sockets live and die with the actor's process)."""
    import ray

    versions = {v: make_adapter(tiny_serving_model_dir, tmp_path / f"adapter-{v}", seed=v + 1) for v in (0, 1)}
    settings = EngineConfig(max_loras=1, max_lora_rank=8, max_model_len=128)
    engine = ray.remote(num_cpus=0)(RolloutEngine).remote(str(tiny_serving_model_dir), "float32", settings)
    sampling = Sampling(max_completion_length=10, temperature=TEMPERATURE, seed=7)
    try:
        with pytest.raises(RuntimeError, match="no policy published"):
            ray.get(engine.generate.remote(PROMPTS, sampling))
        for version, folder in versions.items():
            ray.get(engine.publish.remote(version, policy_files(folder, full_weights=False)))
            rollouts = ray.get(engine.generate.remote(PROMPTS, sampling))
            assert rollouts.version == version
            reference = load_reference(tiny_serving_model_dir, folder)
            for prompt, ids, logprobs in zip(PROMPTS, rollouts.completion_ids, rollouts.logprobs):
                assert len(ids) == len(logprobs) == 10
                torch.testing.assert_close(logprobs, sampled_logprobs(reference, prompt, ids), atol=1e-4, rtol=1e-4)
            # the same prompt twice in a batch (a GRPO group) samples two different completions
            assert rollouts.completion_ids[0] != rollouts.completion_ids[2]
        # the same seed and version repeat exactly
        assert ray.get(engine.generate.remote(PROMPTS, sampling)) == rollouts
        with pytest.raises(ValueError, match="lacks adapter_model.safetensors"):
            ray.get(engine.publish.remote(2, {"adapter_config.json": b"{}"}))
        # Two engines (grpo.rollout_engines): a version goes to both, the batch is shared out, and
        # each request keeps its seed, so the completions are those of one engine.
        second = ray.remote(num_cpus=0)(RolloutEngine).remote(str(tiny_serving_model_dir), "float32", settings)
        try:
            engines = RolloutClient((engine, second))
            engines.publish(1, policy_files(versions[1], full_weights=False))
            shared = engines.generate(PROMPTS, sampling)
        finally:
            ray.get(second.shutdown.remote())
            ray.kill(second)
        assert (shared.version, shared.completion_ids) == (1, rollouts.completion_ids)
        torch.testing.assert_close(shared.logprobs, rollouts.logprobs, atol=1e-4, rtol=1e-4)
    finally:
        ray.get(engine.shutdown.remote())
        ray.kill(engine)


def test_full_weights_replace_the_engine_base_weights_between_batches(ray_local, tmp_path, tiny_serving_model_dir):
    """A fully fine-tuned policy: each version's whole weights, saved as the trainer saves them, are
    what the engine samples with next, prefix cache included (the same prompts each version)."""
    import ray
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_serving_model_dir, dtype=torch.float32)
    settings = EngineConfig(max_loras=1, max_lora_rank=8, max_model_len=256)
    work_dir = tmp_path / "engine"
    engine = ray.remote(num_cpus=0)(RolloutEngine).remote(
        str(tiny_serving_model_dir), "float32", settings, str(work_dir), full_weights=True
    )
    sampling = Sampling(max_completion_length=10, temperature=TEMPERATURE, seed=7)
    # one prompt longer than a KV block (128 tokens on CPU): its first block is cached between versions
    prompts = [*PROMPTS, [5 + (7 * i) % 300 for i in range(200)]]
    torch.manual_seed(0)
    try:
        for version in range(3):
            if version:  # an optimizer step's worth of change, in every weight (the tied embeddings too)
                with torch.no_grad():
                    for parameter in policy.parameters():
                        parameter.add_(torch.randn_like(parameter) * 0.05)
            policy.save_pretrained(tmp_path / f"policy-{version}")
            files = policy_files(tmp_path / f"policy-{version}", full_weights=True)
            assert set(files) == {"model.safetensors"}
            ray.get(engine.publish.remote(version, files))
            rollouts = ray.get(engine.generate.remote(prompts, sampling))
            assert rollouts.version == version
            for prompt, ids, logprobs in zip(prompts, rollouts.completion_ids, rollouts.logprobs):
                torch.testing.assert_close(logprobs, sampled_logprobs(policy, prompt, ids), atol=1e-4, rtol=1e-4)
        # the last two versions stay on the engine's disk, not every one
        assert sorted(folder.name for folder in (work_dir / "policy").iterdir()) == ["v1", "v2"]
        for files in ({"config.json": b"{}"}, {"../model.safetensors": b""}):
            with pytest.raises(ValueError, match="full weights are safetensors files"):
                ray.get(engine.publish.remote(3, files))
    finally:
        ray.get(engine.shutdown.remote())
        ray.kill(engine)
