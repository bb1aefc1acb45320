"""What finch asks of GPUs and GPU clusters, checked without one: Ray's placement of training
workers and serving replicas, vLLM's engine arguments, and the attention kernel packed rows get."""

from __future__ import annotations

import pytest

from finch.config import ConfigError, ServeConfig, validate_config
from finch.models.loading import load_trainable_model
from finch.serve.app import replica_resources
from finch.serve.engine import ServedAdapter, ServingEngine, engine_arguments
from finch.train.run import scaling_config
from finch.train.trainers import build_trainer
from tests.conftest import make_tokenizer, run_config_dict
from tests.unit.test_grad_accumulation import packed_rows


def run_config(tmp_path, model_dir, **sections):
    return validate_config(run_config_dict(tmp_path, model_dir, ["unused.jsonl"], **sections))


def serve_config(**sections) -> ServeConfig:
    return validate_config({"model": {"path": "org/model"}, **sections}, schema=ServeConfig)


def test_training_workers_ask_ray_for_the_configured_gpu_type(tmp_path, tiny_model_dir):
    config = run_config(tmp_path, tiny_model_dir, scale={"use_gpu": True, "num_workers": 4, "accelerator_type": "A100"})
    scaling = scaling_config(config)
    assert (scaling.num_workers, scaling.use_gpu, scaling.accelerator_type) == (4, True, "A100")
    with pytest.raises(ConfigError, match="scale.accelerator_type picks a GPU type"):
        run_config(tmp_path, tiny_model_dir, scale={"accelerator_type": "A100"})


def test_flash_attention_is_refused_on_cpu(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="flash_attention_2 runs on GPUs only"):
        run_config(
            tmp_path, tiny_model_dir, model={"path": str(tiny_model_dir), "attn_implementation": "flash_attention_2"}
        )


@pytest.mark.parametrize(
    "attention, flattened", [("sdpa", False), ("flash_attention_2", True), ("flash_attention_3", True)]
)
def test_packed_batches_are_flattened_for_flash_attention_only(tmp_path, tiny_model_dir, attention, flattened):
    config = run_config(tmp_path, tiny_model_dir, train={"save_steps": 1000})
    model = load_trainable_model(config, str(tiny_model_dir))
    model.config._attn_implementation = attention  # what a GPU worker's model reports; only the collator reads it here
    trainer = build_trainer(config, model, make_tokenizer(), packed_rows(), None, str(tmp_path / "hf"))
    batch = trainer.data_collator([packed_rows()[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == (1 if flattened else 3)


def test_cpu_engine_has_no_tensor_parallelism_and_serves_the_base_through_the_zero_adapter():
    config = serve_config()
    arguments = engine_arguments(config.engine, "/m", "float32", gpus=0)
    assert "tensor_parallel_size" not in arguments and arguments["enable_lora"]
    assert replica_resources(config)["ray_actor_options"]["num_gpus"] == 0
    with pytest.raises(ConfigError, match="max_loras must be at least 2 on CPU"):
        serve_config(engine={"max_loras": 1})


def test_a_multi_gpu_replica_splits_the_model_over_gpus_of_one_node():
    config = serve_config(server={"gpus_per_replica": 4, "cpus_per_replica": 8}, engine={"max_loras": 1})
    arguments = engine_arguments(config.engine, "/m", "bfloat16", gpus=config.server.gpus_per_replica)
    assert arguments["tensor_parallel_size"] == 4 and arguments["distributed_executor_backend"] == "ray"
    resources = replica_resources(config)
    # the replica itself holds no GPU: each of vLLM's 4 workers gets one bundle's GPU, all on one node
    assert resources["ray_actor_options"]["num_gpus"] == 0
    assert resources["placement_group_bundles"] == [{"CPU": 8, "GPU": 1}, {"GPU": 1}, {"GPU": 1}, {"GPU": 1}]
    assert resources["placement_group_strategy"] == "STRICT_PACK"
    one_gpu = serve_config(server={"gpus_per_replica": 1})
    assert replica_resources(one_gpu)["ray_actor_options"]["num_gpus"] == 1
    assert "tensor_parallel_size" not in engine_arguments(one_gpu.engine, "/m", "bfloat16", gpus=1)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"server": {"gpus_per_replica": 2.5}}, "tensor-parallel size, a whole number"),
        (
            {"engine": {"max_loras": 8, "max_cpu_loras": 4}},
            r"max_cpu_loras \(4\) must be at least engine.max_loras \(8\)",
        ),
    ],
)
def test_engine_settings_vllm_would_refuse_are_refused_by_name(settings, message):
    with pytest.raises(ConfigError, match=message):
        serve_config(**settings)


def test_gpu_base_requests_carry_no_adapter():
    """vLLM's GPU kernels serve base and adapter requests in one batch correctly: no zero adapter
    there, so base traffic takes no LoRA slot and no LoRA compute."""
    assert ServingEngine._request(ServedAdapter("finch-base", None, 1, "")) is None
    assert ServingEngine._request(ServedAdapter("a1", None, 2, "/registry/a1/v1")).lora_int_id == 2
