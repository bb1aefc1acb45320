"""cluster.yaml: Ray's own cluster-launcher validation, plus the settings finch relies on."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from finch.config import RunConfig, ServeConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_ray_accepts_the_cluster_config(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))  # what `ray up` runs before launching
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["head"]["node_confg"] = {}  # the validator is not a no-op
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_cluster_is_gpu_autoscaling_token_authenticated_and_closed(cluster):
    workers = {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}
    assert workers and all(w["min_workers"] == 0 and w["max_workers"] >= 1 for w in workers.values())
    assert all(w["node_config"]["InstanceType"].startswith(("g5", "g6", "p4", "p5")) for w in workers.values())
    starts = " ".join(cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in starts
    assert [rule["FromPort"] for rule in cluster["provider"]["security_group"]["IpPermissions"]] == [22]
    setup = " ".join(cluster["setup_commands"])
    assert '.[gpu]' in setup and "/shared" in setup and "~/.ray/auth_token" in cluster["file_mounts"]


def test_gpu_job_and_serve_configs_keep_their_results_on_shared_storage():
    for path in sorted((ROOT / "jobs" / "gpu").glob("*.yaml")):
        config = load_config(path, schema=RunConfig)
        assert config.output_dir.startswith("/shared/") and config.registry_dir.startswith("/shared/"), path.name
    assert load_config(ROOT / "serve" / "gpu_production.yaml", schema=ServeConfig).registry_dir.startswith("/shared/")
