"""`auto` precision per device (finch/precision.py): one test per resolution rule, and the real
probe on this CPU, natively and with its bf16 instructions capped away."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from finch.config import validate_config
from finch.precision import Device, cpu_bf16_flags, inference_dtype, resolved, training_precision
from tests.conftest import run_config_dict

BF16_CPU = Device("cpu", "test CPU", True, "avx512_bf16", {"bfloat16": 4.8, "float16": 0.03})
AVX2_CPU = Device("cpu", "test CPU", False, "no bf16 instructions", {"bfloat16": 0.01, "float16": 0.02})
AMPERE = Device("cuda", "A100", True, "compute capability 8.0")
TURING = Device("cuda", "T4", False, "compute capability 7.5")
# The environment that makes a bf16-native x86 CPU take the emulated path (docs/training.md).
NO_NATIVE_BF16 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def config(tmp_path, model_dir, method="lora", dtype="auto", **sections):
    sections = {"train": {"method": method}, **sections}
    return validate_config(
        run_config_dict(
            tmp_path, model_dir, ["unused.jsonl"], model={"path": str(model_dir), "dtype": dtype}, **sections
        )
    )


def chosen(precision):
    return precision.weights, precision.mixed_precision, precision.qlora_compute


@pytest.mark.parametrize(
    ("device", "method", "expected"),
    [
        (BF16_CPU, "lora", ("bfloat16", "no", "bfloat16")),
        (BF16_CPU, "full", ("float32", "no", "bfloat16")),  # fp32 master weights; CPUs never autocast
        (AVX2_CPU, "lora", ("float32", "no", "float32")),
        (AVX2_CPU, "qlora", ("float32", "no", "float32")),
        (AVX2_CPU, "full", ("float32", "no", "float32")),
        (AMPERE, "lora", ("bfloat16", "no", "bfloat16")),
        (AMPERE, "full", ("float32", "bf16", "bfloat16")),  # bf16 autocast over fp32 master weights
        (TURING, "lora", ("float16", "fp16", "float16")),  # fp16 base, fp32 adapters, gradient scaler
        (TURING, "qlora", ("float16", "fp16", "float16")),
        (TURING, "full", ("float32", "fp16", "float16")),
    ],
)
def test_auto_training_precision_per_device(tmp_path, tiny_model_dir, device, method, expected):
    precision = training_precision(config(tmp_path, tiny_model_dir, method), device)
    assert chosen(precision) == expected
    assert precision.warnings == ()
    assert device.name in precision.describe() and device.evidence in precision.describe()


def test_explicit_settings_are_kept(tmp_path, tiny_model_dir):
    explicit = config(tmp_path, tiny_model_dir, "qlora", "bfloat16", qlora={"compute_dtype": "float32"})
    assert chosen(training_precision(explicit, AMPERE)) == ("bfloat16", "no", "float32")
    full = config(tmp_path, tiny_model_dir, "full", train={"method": "full", "mixed_precision": "no"})
    assert chosen(training_precision(full, AMPERE)) == ("float32", "no", "bfloat16")


def test_explicit_bf16_on_a_cpu_without_it_warns_with_the_measured_slowdown(tmp_path, tiny_model_dir):
    explicit = config(tmp_path, tiny_model_dir, dtype="bfloat16")
    precision = training_precision(explicit, AVX2_CPU)
    assert precision.weights == "bfloat16"
    assert len(precision.warnings) == 1 and "100x slower than float32" in precision.warnings[0]
    assert training_precision(explicit, BF16_CPU).warnings == ()


@pytest.mark.parametrize(
    ("device", "expected"), [(BF16_CPU, "bfloat16"), (AVX2_CPU, "float32"), (AMPERE, "bfloat16"), (TURING, "float16")]
)
def test_auto_inference_dtype_per_device(device, expected):
    assert inference_dtype("auto", device) == (expected, [])


def test_explicit_float16_for_inference_on_a_cpu_warns():
    dtype, warnings = inference_dtype("float16", BF16_CPU)
    assert dtype == "float16" and "33x slower" in warnings[0]


def test_workers_get_every_auto_resolved_and_the_run_keeps_auto(tmp_path, tiny_model_dir):
    run = config(tmp_path, tiny_model_dir, "qlora")
    workers = resolved(run, training_precision(run, AVX2_CPU))
    assert (workers.model.dtype, workers.train.mixed_precision, workers.qlora.compute_dtype) == (
        "float32",
        "no",
        "float32",
    )
    assert (run.model.dtype, run.train.mixed_precision, run.qlora.compute_dtype) == ("auto", "auto", "auto")
    manifest = training_precision(run, AVX2_CPU).manifest()
    assert manifest["weights"] == "float32" and manifest["device"]["native_bf16"] is False


def probe_in_subprocess(tmp_path, env: dict[str, str]) -> dict:
    """cpu_device() and the auto dtypes in a fresh process (ISA caps are read when torch loads)."""
    code = (
        "import json; from finch.precision import cpu_device, inference_dtype; d = cpu_device(); "
        "print(json.dumps({'native': d.native_bf16, 'evidence': d.evidence, 'auto': inference_dtype('auto', d)[0], "
        "'warning': inference_dtype('bfloat16', d)[1]}))"
    )
    clean = {k: v for k, v in os.environ.items() if k not in NO_NATIVE_BF16}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, "FINCH_CACHE_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_this_cpu_gets_bf16_exactly_when_it_has_bf16_instructions(tmp_path):
    probe = probe_in_subprocess(tmp_path, {})
    assert probe["native"] == bool(cpu_bf16_flags())
    assert probe["auto"] == ("bfloat16" if cpu_bf16_flags() else "float32")
    assert "measured" in probe["evidence"]


def test_capping_the_cpu_isa_takes_the_slow_bf16_path_and_auto_picks_fp32(tmp_path):
    """The documented way to reproduce a CPU without native bf16 on one that has it."""
    probe = probe_in_subprocess(tmp_path, NO_NATIVE_BF16)
    assert probe["native"] is False and probe["auto"] == "float32"
    assert probe["warning"] and "slower than float32" in probe["warning"][0]  # measured, not assumed


def test_the_probe_runs_once_per_machine(tmp_path, monkeypatch):
    from finch import precision

    monkeypatch.setenv("FINCH_CACHE_DIR", str(tmp_path))
    first = precision.cpu_device()
    monkeypatch.setattr(precision, "measure_matmul_speeds", lambda: pytest.fail("probed twice"))
    assert precision.cpu_device() == first
    assert len(list((tmp_path / "precision").glob("cpu-*.json"))) == 1
