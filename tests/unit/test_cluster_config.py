"""cluster.yaml: Ray's own cluster-launcher validation, plus the settings finch relies on."""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from finch.config import RunConfig, ServeConfig, load_config

ROOT = Path(__file__).resolve().parents[2]

# What the pinned GPU stack needs from the host. torch 2.13.0's Linux x86_64 wheel on PyPI depends on
# cuda-toolkit 13.0.x (nvidia-cuda-runtime 13.0, nvidia-nccl-cu13), and vllm 0.32.0 pins torch==2.13.0
# with its default PyPI wheel built for CUDA 13.0 (vLLM switched its unsuffixed wheel to 13.0 in
# vllm-project/vllm#39878). NVIDIA's CUDA 13.0 release notes ask for Linux driver >= 580.65.06 for 13.0
# GA, and >= 580 for any 13.x under minor-version compatibility: so the 580 branch at least.
CUDA13_MIN_DRIVER_MAJOR = 580
# Both wheels are tagged manylinux_2_28, i.e. glibc >= 2.28 (Ubuntu 18.04, Ray's `latest_dlami`, has 2.27).
MIN_GLIBC = "2.28"
AMI_ID = re.compile(r"ami-(?:[0-9a-f]{8}|[0-9a-f]{17})")
SSM_REFRESH = (
    "aws ssm get-parameter --region us-west-2 --name "
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id "
    "--query Parameter.Value --output text"
)


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
    assert ".[gpu]" in setup and "/shared" in setup and "~/.ray/auth_token" in cluster["file_mounts"]


def test_gpu_job_and_serve_configs_keep_their_results_on_shared_storage():
    for path in sorted((ROOT / "jobs" / "gpu").glob("*.yaml")):
        config = load_config(path, schema=RunConfig)
        assert config.output_dir.startswith("/shared/") and config.registry_dir.startswith("/shared/"), path.name
    assert load_config(ROOT / "serve" / "gpu_production.yaml", schema=ServeConfig).registry_dir.startswith("/shared/")


def _setup_command(cluster: dict, marker: str) -> str:
    matches = [command for command in cluster["setup_commands"] if marker in command]
    assert len(matches) == 1, marker
    return matches[0]


def _run(command: str, bin_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30)


def _fake(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text("#!/bin/sh\n" + body)
    (bin_dir / name).chmod(0o755)


def test_every_node_boots_a_pinned_image_and_the_config_says_how_to_refresh_it(cluster):
    text = (ROOT / "cluster.yaml").read_text()
    for name, node in cluster["available_node_types"].items():
        image = node["node_config"]["ImageId"]
        assert image != "latest_dlami", name  # Ray 2.60 maps it to an Ubuntu 18.04 / CUDA 11.2 image
        assert AMI_ID.fullmatch(image), (name, image)
    assert cluster["provider"]["region"] == "us-west-2"  # AMI ids are per region
    assert SSM_REFRESH in text and "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04)" in text


def test_driver_floor_is_stated_once_and_covers_the_cuda_build(cluster):
    text = (ROOT / "cluster.yaml").read_text()
    floors = re.findall(r"FINCH_MIN_NVIDIA_DRIVER=(\d+)", text)
    assert len(floors) == 1 and int(floors[0]) >= CUDA13_MIN_DRIVER_MAJOR


def test_host_checks_run_on_every_node_before_anything_is_mounted_or_installed(cluster):
    setup = cluster["setup_commands"]
    glibc = setup.index(_setup_command(cluster, "GNU_LIBC_VERSION"))
    driver = setup.index(_setup_command(cluster, "FINCH_MIN_NVIDIA_DRIVER="))
    first_work = min(i for i, command in enumerate(setup) if "/shared" in command or "uv " in command)
    assert max(glibc, driver) < first_work
    assert MIN_GLIBC in setup[glibc] and "--query-gpu=driver_version" in setup[driver]
    assert not cluster["head_setup_commands"] and not cluster["worker_setup_commands"]  # none skip them


@pytest.mark.parametrize(
    ("nvidia_smi", "ok"),
    [
        ("echo 535.104.05\n", False),  # the R535 driver: CUDA 12.2 at most
        ("echo 575.57.08\n", False),  # CUDA 12.9 driver: too old for CUDA 13.0 builds
        ("echo 580.65.06\n", True),  # CUDA 13.0 GA driver
        ("echo 595.71.05\necho 595.71.05\n", True),  # two GPUs, one line each
        ('echo "not a version"\n', False),
    ],
)
def test_driver_check_refuses_an_old_driver_and_accepts_a_new_one(cluster, tmp_path, nvidia_smi, ok):
    # Only the query the check makes gets an answer, so the test also pins the nvidia-smi arguments.
    body = '[ "$1" = --query-gpu=driver_version ] && [ "$2" = --format=csv,noheader ] || exit 2\n'
    _fake(tmp_path / "bin", "nvidia-smi", body + nvidia_smi)
    result = _run(_setup_command(cluster, "FINCH_MIN_NVIDIA_DRIVER="), tmp_path / "bin")
    assert (result.returncode == 0) is ok, result.stderr
    if not ok:
        reported = nvidia_smi.split("\n")[0].removeprefix("echo ").strip('"')
        assert reported in result.stderr and str(CUDA13_MIN_DRIVER_MAJOR) in result.stderr


def test_driver_check_lets_a_node_without_an_nvidia_device_through(cluster, tmp_path):
    # The CPU head boots the same GPU image: nvidia-smi is there but finds no driver (it exits 9).
    if any(p.read_text().strip() == "0x10de" for p in Path("/sys/bus/pci/devices").glob("*/vendor")):
        pytest.skip("this machine has an NVIDIA PCI device")
    _fake(tmp_path / "bin", "nvidia-smi", "echo NVIDIA-SMI has failed; exit 9\n")
    assert _run(_setup_command(cluster, "FINCH_MIN_NVIDIA_DRIVER="), tmp_path / "bin").returncode == 0
    assert _run(_setup_command(cluster, "FINCH_MIN_NVIDIA_DRIVER="), tmp_path / "empty").returncode == 0


@pytest.mark.parametrize(("glibc", "ok"), [("2.27", False), ("2.28", True), ("2.39", True), ("", False)])
def test_glibc_check_refuses_an_old_glibc(cluster, tmp_path, glibc, ok):
    _fake(tmp_path / "bin", "getconf", f'[ "$1" = GNU_LIBC_VERSION ] || exit 2\necho "glibc {glibc}"\n')
    result = _run(_setup_command(cluster, "GNU_LIBC_VERSION"), tmp_path / "bin")
    assert (result.returncode == 0) is ok, result.stderr
    if not ok:
        assert f"'{glibc}'" in result.stderr and MIN_GLIBC in result.stderr
