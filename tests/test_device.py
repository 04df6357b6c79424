"""DTYPE=auto: the dtype this machine computes fastest in; torch uses every core we may use."""

from __future__ import annotations

import os

import pytest
import torch

from bot.device import pick_dtype, use_all_cores


def test_an_explicit_dtype_is_kept():
    assert pick_dtype("bfloat16", "cpu") == "bfloat16"


def test_auto_on_a_cpu_follows_its_native_bf16_support():
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert pick_dtype("auto", "cpu") == ("bfloat16" if native else "float32")


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bfloat16"), (False, "float16")])
def test_auto_on_a_gpu_is_bf16_where_it_computes_it_else_fp16(
    monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: str
) -> None:
    """As the README's DTYPE row says: only what torch reports of the GPU decides."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert pick_dtype("auto", "cuda") == expected
    assert pick_dtype("auto", "auto") == expected


def test_auto_on_mps_is_fp16():
    assert pick_dtype("auto", "mps") == "float16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_a_gpu_is_half_precision():
    assert pick_dtype("auto", "cuda") in ("bfloat16", "float16")


def test_torch_uses_every_core_we_may_run_on():
    assert use_all_cores() == len(os.sched_getaffinity(0))
