"""The machine a run measured: what decides its numbers (CPU, its bf16 support, cores, dtype)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import torch
import transformers

FLAGS = ("avx2", "avx512_bf16", "amx_bf16")
"""The CPU features that decide the dtype and the speed of its matrix products."""


def lscpu() -> dict[str, str]:
    """`lscpu`'s fields ("Model name", "Flags", …); none where it is missing (not Linux)."""
    if shutil.which("lscpu") is None:
        return {}
    output = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = (line.split(":", 1) for line in output.splitlines() if ":" in line)
    return {name.strip(): value.strip() for name, value in fields}


def cpu_flags() -> set[str]:
    """This CPU's feature flags (`lscpu`'s "Flags")."""
    return set(lscpu().get("Flags", "").split())


def describe(dtype: torch.dtype) -> dict:
    fields = lscpu()
    flags = cpu_flags()
    return {
        "cpu": fields.get("Model name") or platform.processor() or platform.machine(),
        "flags": {flag: flag in flags for flag in FLAGS},
        "cores": os.cpu_count(),
        # Others' work skews every number (and spinning OpenMP threads suffer most from it).
        "load_average": os.getloadavg()[0],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def headline(machine: dict) -> str:
    flags = ", ".join(f"{flag} {'yes' if has else 'no'}" for flag, has in machine["flags"].items())
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['threads']} torch "
        f"threads), {flags}; {machine['dtype']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, Python {machine['python']}; "
        f"load average {machine['load_average']:.1f} at the start"
    )
