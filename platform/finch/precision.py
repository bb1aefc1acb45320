"""Which floating-point types a run computes in, chosen for the device it runs on.

bfloat16 halves memory and, where the hardware has bf16 instructions (x86 AVX512-BF16 or AMX,
ARM BF16, CUDA compute capability 8.0+), runs faster than float32. Where it has none, PyTorch
emulates it: on an AVX2-only CPU a bf16 matmul ran about 95x slower than fp32 (0.4 vs 37.8
GFLOP/s), and a LoRA step that takes 15 s in fp32 did not finish in 5 minutes. So `auto` is
decided per device, from two facts:

- the CPU flags (or the GPU's compute capability): what the hardware claims;
- on CPUs, a measured probe (a bf16, fp16 and fp32 matmul, about a tenth of a second, cached per
  machine): what PyTorch actually delivers. Flags alone miss ISA caps (ONEDNN_MAX_CPU_ISA) and
  hypervisors that hide instructions; the probe also gives the slowdown a warning quotes.

The rules (`training_precision`, `inference_dtype`):

| device                     | LoRA/QLoRA weights | full weights | autocast | QLoRA compute | inference |
|----------------------------|--------------------|--------------|----------|---------------|-----------|
| bf16-native CPU            | bfloat16           | float32      | no       | bfloat16      | bfloat16  |
| other CPU                  | float32            | float32      | no       | float32       | float32   |
| CUDA capability >= 8.0     | bfloat16           | float32      | bf16 for fp32 weights | bfloat16 | bfloat16 |
| older CUDA GPUs            | float16            | float32      | fp16 (grad scaler) | float16 | float16 |

Full fine-tuning keeps fp32 master weights everywhere (AdamW updates vanish in 16-bit weights).
LoRA on older GPUs keeps its adapters in fp32 (PEFT's default) under fp16 autocast, the usual
T4/V100 recipe. CPUs never autocast: the weights already carry the fast type.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Environment variables that cap the instructions oneDNN and ATen use (and so what a probe measures).
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
# CPU flags (Linux /proc/cpuinfo names) of bf16 arithmetic in hardware.
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ARM_BF16_FLAGS = ("bf16",)
# A 16-bit type counts as native when its matmuls run at least this fraction of fp32's speed. The
# probe measured native bf16 at 4.8x fp32 and capped-to-AVX2 bf16 at 0.054x (bench/cpu_dtype.py);
# 16-bit only pays where it is clearly native.
NATIVE_SPEED_RATIO = 1.0
PROBE_SIZE = 256  # 256^3 matmuls: 34 MFLOP, under 0.1 s even at emulated-bf16 speed
PROBE_VERSION = 1


@dataclass(frozen=True)
class Device:
    """What decides precision on one device: its kind, name, bf16 support and why."""

    kind: str  # "cpu" or "cuda"
    name: str
    native_bf16: bool
    evidence: str  # flags, capability and measured speeds, for the log line
    speed_vs_fp32: dict[str, float] | None = None  # CPU probe: bfloat16/float16 matmul speed over float32's
    memory_gib: float | None = None  # a GPU's memory

    def slowdown(self, dtype: str) -> float | None:
        """How many times slower than fp32 a matmul in `dtype` ran here (CPU probe), if it was slower."""
        ratio = (self.speed_vs_fp32 or {}).get(dtype)
        return 1 / ratio if ratio and ratio < 1 else None


@dataclass(frozen=True)
class Precision:
    """The types a training run uses, and why (printed on the run's first lines, kept in the manifest)."""

    weights: str
    mixed_precision: str  # "no", "bf16" or "fp16" (HF Trainer autocast)
    qlora_compute: str
    device: Device
    warnings: tuple[str, ...] = ()

    def describe(self) -> str:
        autocast = "" if self.mixed_precision == "no" else f", {self.mixed_precision} autocast"
        return f"{self.weights} weights{autocast} on {self.device.name}: {self.device.evidence}"

    def manifest(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "mixed_precision": self.mixed_precision,
            "qlora_compute_dtype": self.qlora_compute,
            "device": asdict(self.device),
        }


def sixteen_bit_type(device: Device) -> str:
    """The 16-bit type this device runs fast: bf16 where native, fp16 on older GPUs, else fp32."""
    if device.native_bf16:
        return "bfloat16"
    return "float16" if device.kind == "cuda" else "float32"


def training_precision(config: Any, device: Device) -> Precision:
    """Resolve model.dtype, train.mixed_precision and qlora.compute_dtype (a RunConfig) for `device`."""
    method, fast = config.train.method, sixteen_bit_type(device)
    weights = config.model.dtype
    if weights == "auto":
        weights = "float32" if method == "full" else fast
    mixed = config.train.mixed_precision
    if mixed == "auto":
        if device.kind != "cuda" or weights == "bfloat16":
            mixed = "no"  # bf16 weights compute in bf16 already; CPUs get the fast type as weights
        elif weights == "float32":
            mixed = "bf16" if device.native_bf16 else "fp16"
        else:
            mixed = "fp16"  # fp16 weights: autocast with HF's gradient scaler keeps small gradients
    compute = config.qlora.compute_dtype
    if compute == "auto":
        compute = fast
    in_use = {weights, {"bf16": "bfloat16", "fp16": "float16"}.get(mixed, weights)} | (
        {compute} if method == "qlora" else set()
    )
    return Precision(weights, mixed, compute, device, tuple(slow_type_warnings(device, in_use)))


def resolved(config: Any, precision: Precision) -> Any:
    """The RunConfig with every 'auto' type replaced by `precision`'s choice: what workers train with."""
    return config.model_copy(
        update={
            "model": config.model.model_copy(update={"dtype": precision.weights}),
            "train": config.train.model_copy(update={"mixed_precision": precision.mixed_precision}),
            "qlora": config.qlora.model_copy(update={"compute_dtype": precision.qlora_compute}),
        }
    )


def resolved_here(config: Any) -> Any:
    """`config` resolved for this process's device (a no-op when the driver already resolved it)."""
    if "auto" not in (config.model.dtype, config.train.mixed_precision, config.qlora.compute_dtype):
        return config
    return resolved(config, training_precision(config, detect_device(config.scale.use_gpu)))


def inference_dtype(requested: str, device: Device) -> tuple[str, list[str]]:
    """The weights dtype for generation (finch chat, finch serve) on `device`, and warnings."""
    dtype = sixteen_bit_type(device) if requested == "auto" else requested
    return dtype, slow_type_warnings(device, {dtype})


def slow_type_warnings(device: Device, dtypes: set[str]) -> list[str]:
    warnings = []
    for dtype in sorted(dtypes):
        slowdown = device.slowdown(dtype)
        if slowdown and slowdown > 1.5:
            warnings.append(
                f"{dtype} runs without hardware support on {device.name}: its matmuls measured {slowdown:.0f}x "
                f"slower than float32 here. Use dtype auto (or float32) unless you need {dtype}'s numerics."
            )
    return warnings


def detect_device(use_gpu: bool) -> Device:
    """This process's device: the current CUDA GPU when use_gpu, else the CPU (probe cached per machine)."""
    if use_gpu:
        return cuda_device()
    return cpu_device()


def cuda_device() -> Device:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("scale.use_gpu / gpus_per_replica is set but this process sees no CUDA GPU")
    major, minor = torch.cuda.get_device_capability()
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    return Device(
        kind="cuda",
        name=torch.cuda.get_device_name(),
        native_bf16=native,
        evidence=f"compute capability {major}.{minor} ({'bf16 native' if native else 'no native bf16: below 8.0'})",
        memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
    )


def cpu_device() -> Device:
    """The CPU's flags and measured 16-bit speeds; the probe runs once per machine and ISA cap."""
    flags = cpu_bf16_flags()
    caps = {name: os.environ[name] for name in ISA_CAPS if os.environ.get(name)}
    cache = cpu_probe_cache(flags, caps)
    try:
        speeds = json.loads(cache.read_text())
    except (OSError, ValueError):
        speeds = measure_matmul_speeds()
        with contextlib.suppress(OSError):  # a read-only cache only costs the probe again next time
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(speeds))
            tmp.replace(cache)
    ratio = speeds["bfloat16"]
    native = bool(flags) and ratio >= NATIVE_SPEED_RATIO
    said_flags = "+".join(flags) if flags else "no bf16 instructions (" + cpu_capability() + ")"
    evidence = f"{said_flags}; bf16 matmul {ratio:.2g}x fp32 speed (measured)"
    if flags and not native:
        evidence += ", so bf16 is not used" + (f" ({', '.join(f'{k}={v}' for k, v in caps.items())})" if caps else "")
    return Device("cpu", cpu_name(), native, evidence, speeds)


def cpu_bf16_flags() -> list[str]:
    """The bf16 instruction sets the CPU reports (Linux /proc/cpuinfo, macOS sysctl)."""
    machine = platform.machine().lower()
    wanted = ARM_BF16_FLAGS if machine in ("arm64", "aarch64") else X86_BF16_FLAGS
    if platform.system() == "Darwin":
        import subprocess

        result = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
        return ["bf16"] if result.stdout.strip() == "1" else []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    present = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            present.update(value.split())
    return [flag for flag in wanted if flag in present]


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip() + " CPU"
    except OSError:
        pass
    return (platform.processor() or platform.machine()) + " CPU"


def cpu_probe_cache(flags: list[str], caps: dict[str, str]) -> Path:
    import torch

    from finch.runtime import cache_root

    key = json.dumps([PROBE_VERSION, cpu_name(), flags, caps, torch.__version__, cpu_capability()])
    return cache_root() / "precision" / f"cpu-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def measure_matmul_speeds() -> dict[str, float]:
    """bf16 and fp16 matmul throughput over fp32's, on one thread (best of three)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        a, b = (torch.randn(PROBE_SIZE, PROBE_SIZE, generator=generator) for _ in range(2))
        seconds = {}
        for dtype in ("float32", "bfloat16", "float16"):
            x, y = a.to(getattr(torch, dtype)), b.to(getattr(torch, dtype))
            x @ y  # first call: kernel selection and allocation
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                x @ y
                runs.append(time.perf_counter() - start)
            seconds[dtype] = min(runs)
    finally:
        torch.set_num_threads(threads)
    return {dtype: seconds["float32"] / seconds[dtype] for dtype in ("bfloat16", "float16")}


def device_of_workers(use_gpu: bool, accelerator_type: str | None = None) -> Device:
    """The device training workers or serving replicas get: a GPU (of `accelerator_type` when
    given) is probed where Ray places a GPU task (on a cluster, a GPU node rather than the CPU head
    the driver runs on); the CPU is this machine's."""
    if not use_gpu:
        return cpu_device()
    import ray

    probe = ray.remote(num_gpus=1, num_cpus=0, accelerator_type=accelerator_type)(cuda_device)
    return ray.get(probe.remote())
