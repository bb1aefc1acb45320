"""Two Ray nodes (`ray.cluster_utils.Cluster`): a GRPO run whose training workers and rollout
engines are on different nodes, the workers writing checkpoints to shared storage and publishing
each policy version to both engines, then two serving replicas, one per node. The base model is a hub
id and each node has its own Hugging Face cache, as on a real cluster: nothing may rely on the
driver's local copy of the model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, place_in_hub_cache, run_config_dict, write_jsonl
from tests.integration.test_train_e2e import FACTS

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
HUB_ID = "finch-test/tiny-serving"
HEAD_CACHE, NODE_CACHE = "hf-cache-head", "hf-cache-node"  # each node's HF_HUB_CACHE, under tmp_path


def test_two_nodes_train_one_adapter_with_rollouts_on_both_and_serve_it_from_both(tmp_path, tiny_serving_model_dir):
    data = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    for cache in HEAD_CACHE, NODE_CACHE:
        place_in_hub_cache(tiny_serving_model_dir, tmp_path / cache, HUB_ID)
    run = run_config_dict(
        tmp_path,
        tiny_serving_model_dir,
        [str(data)],
        name="facts-2n",
        model={"path": HUB_ID},
        data={"max_length": 64},
        # 2 completions per worker and step, groups of 4: TRL splits each group between the workers
        train={"objective": "grpo", "max_steps": 2, "save_steps": 2, "batch_size": 2, "lr": 5e-3},
        grpo={
            "num_generations": 4,
            "max_completion_length": 6,
            "seed": 0,
            "rollout_engines": 2,
            "rewards": [{"name": "regex", "pattern": "lantern"}],
        },
        lora={"target_modules": ["q_proj", "v_proj"]},
        scale={"num_workers": 2, "cpus_per_worker": 1},
    )
    run["tracking"] = {"mlflow": False}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    serve = {
        "name": "twonode",
        "model": {"path": HUB_ID, "dtype": "float32"},
        "template": "chat",
        "registry_dir": str(tmp_path / "registry"),
        "engine": {"max_model_len": 128, "max_loras": 2, "max_lora_rank": 8},
        "server": {"port": free_port(), "num_replicas": 2, "cpus_per_replica": 1},
    }
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve))

    for _ in range(2):
        result = run_two_node_cluster(tmp_path)
        # Ray gives a node 30 s (fixed, in ray/_private/node.py) to register with its GCS; on a
        # loaded 2-core CI machine the second node sometimes takes longer. That is Ray starting
        # up, not finch: start the cluster again (its process's children died with it).
        if "node timed out during startup" not in result.stderr:
            break
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["nodes"] == 2 and seen["registered"] == "facts-2n@v1"
    assert len(set(seen["train_worker_nodes"])) == 2  # one training worker per node
    assert len(set(seen["rollout_engine_nodes"])) == 2  # and one rollout engine per node
    history = json.loads((tmp_path / "runs" / "facts-2n" / "final" / "log_history.json").read_text())
    versions = [(e["step"], e["rollouts/policy_version"]) for e in history if "rollouts/policy_version" in e]
    assert versions == [(1, 0), (2, 1)]  # every step sampled by the policy of the step before
    # both ranks wrote their part of each checkpoint into the one shared storage folder
    checkpoint = sorted((tmp_path / "runs" / "facts-2n").glob("checkpoint-*"))[-1]
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert len(set(seen["replica_nodes"])) == 2  # one serving replica per node...
    assert seen["statuses"] == [200] * 16 and len(seen["replicas_answering"]) == 2  # ...both serving the adapter
    assert len(set(seen["answers"])) == 1  # greedy: the same answer from either node
    # The second node's training worker and replica found the model in that node's own cache.
    node_cache = str(tmp_path / NODE_CACHE)
    for actor in "RayTrainWorker", "RolloutEngine", "ServeReplica":
        assert any(actor in line and node_cache in line for line in result.stdout.splitlines()), actor


def run_two_node_cluster(tmp_path: Path) -> subprocess.CompletedProcess:
    # Ray's temp folder of its own (short: socket paths live under it), so the address record
    # the Cluster writes there never points later `ray.init()` calls at a cluster that is gone.
    ray_tmp = tempfile.mkdtemp(prefix="finch-ray-", dir="/tmp")
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "PYTHONPATH": str(REPO),
        "RAY_TMPDIR": ray_tmp,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / HEAD_CACHE),
        "FINCH_TEST_NODE_HF_CACHE": str(tmp_path / NODE_CACHE),
    }
    try:
        return subprocess.run(
            [sys.executable, "-m", "tests.integration.two_node_cluster", "run.yaml", "serve.yaml", "seen.json"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
