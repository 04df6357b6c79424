"""DTYPE=auto: the dtype this machine computes fastest in; torch uses every core we may use;
the memory free counts a cgroup's limit."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from bot.device import (
    available_memory,
    cgroup_room,
    on_own_thread,
    pick_dtype,
    use_all_cores,
)

TASKS = Path("/proc/self/task")  # one entry per thread of this process (Linux)


def test_an_explicit_dtype_is_kept():
    assert pick_dtype("bfloat16", "cpu") == "bfloat16"


def test_auto_on_a_cpu_follows_its_native_bf16_support():
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert pick_dtype("auto", "cpu") == ("bfloat16" if native else "float32")


@pytest.mark.parametrize(
    ("cpu", "expected"),
    [
        ("AVX512 without bf16", "float32"),
        ("AVX512-BF16", "bfloat16"),
        ("ARM with bf16", "bfloat16"),
    ],
)
def test_auto_on_a_cpu_oneDNN_computes_bf16_on_is_bf16_where_it_has_the_instructions(
    monkeypatch, cpu: str, expected: str
):
    """oneDNN supports bf16 on AVX512 without them, converting every product: 4x slower
    prompts. An ARM CPU's bf16 (Graviton 3) it reports as its own."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: cpu.startswith("AVX512"))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu == "AVX512-BF16")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert pick_dtype("auto", "cpu") == expected


@pytest.mark.parametrize(
    ("bf16", "expected"),
    [("in hardware", "bfloat16"), ("emulated (T4, V100)", "float16"), ("no", "float16")],
)
def test_auto_on_a_gpu_is_bf16_where_it_computes_it_else_fp16(
    monkeypatch: pytest.MonkeyPatch, bf16: str, expected: str
) -> None:
    """As the README's DTYPE row says: what torch reports of the GPU decides, not
    counting emulation (torch's default), which works but is slow."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return bf16 == "in hardware" or (bf16.startswith("emulated") and including_emulation)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert pick_dtype("auto", "cuda") == expected
    assert pick_dtype("auto", "auto") == expected


def test_auto_on_mps_is_fp16():
    assert pick_dtype("auto", "mps") == "float16"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_a_gpu_is_half_precision():
    assert pick_dtype("auto", "cuda") in ("bfloat16", "float16")


def test_torch_uses_every_core_we_may_run_on():
    assert use_all_cores() == len(os.sched_getaffinity(0))


def threads_now() -> int:
    return len(list(TASKS.iterdir()))


def threads_settle_at(count: int) -> bool:
    """Whether the process is down to `count` threads within 5 s (exiting ones take a moment)."""
    deadline = time.monotonic() + 5
    while threads_now() != count and time.monotonic() < deadline:
        time.sleep(0.05)
    return threads_now() == count


def parallel_op() -> float:
    return torch.ones(2**22).add_(1).sum().item()  # big enough for torch to split it


@pytest.mark.skipif(not TASKS.is_dir(), reason="counts threads in /proc (Linux only)")
def test_work_on_its_own_thread_leaves_no_openmp_threads_behind():
    """The engine thread's OpenMP team must be the only one (`on_own_thread` says why), so
    loading runs on a thread whose team ends with it; a thread that lives on keeps its own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        before = threads_now()
        assert on_own_thread(parallel_op) == 2 * 2**22
        assert threads_settle_at(before)
        with ThreadPoolExecutor(1) as pool:
            pool.submit(parallel_op).result()
            assert threads_now() >= before + 2  # the pool's thread and its OpenMP worker
        assert threads_settle_at(before)
    finally:
        torch.set_num_threads(threads)


def cgroups(tmp_path, own: str, files: dict[str, str]):
    """A fake /sys/fs/cgroup (`files` by path below it) and /proc/self/cgroup (`own`)."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "self-cgroup").write_text(own)
    return tmp_path, tmp_path / "self-cgroup"


GIB = 2**30


@pytest.mark.parametrize(
    ("own", "files", "room"),
    [
        pytest.param(  # a container: its cgroup mounted as the root
            "0::/\n",
            {"memory.max": f"{4 * GIB}\n", "memory.current": f"{GIB}\n"},
            3 * GIB,
            id="v2 container",
        ),
        pytest.param(  # systemd's MemoryMax: the service's own cgroup
            "0::/system.slice/threadbot.service\n",
            {
                "system.slice/threadbot.service/memory.max": f"{2 * GIB}",
                "system.slice/threadbot.service/memory.current": f"{GIB}",
            },
            GIB,
            id="v2 service",
        ),
        pytest.param(  # the model's files just read: page cache, dropped first
            "0::/\n",
            {
                "memory.max": f"{4 * GIB}\n",
                "memory.current": f"{3 * GIB}\n",
                "memory.stat": f"anon {GIB}\nfile {2 * GIB}\ninactive_file {GIB + 5}\n",
            },
            2 * GIB + 5,
            id="v2 inactive page cache",
        ),
        pytest.param(
            "0::/\n", {"memory.max": "max\n", "memory.current": "5"}, None, id="v2 no limit"
        ),
        pytest.param(
            "4:memory:/docker/abc\n",
            {
                "memory/memory.limit_in_bytes": f"{2 * GIB}",
                "memory/memory.usage_in_bytes": f"{GIB // 2}",
            },
            3 * GIB // 2,
            id="v1 container",
        ),
        pytest.param(
            "4:memory:/docker/abc\n",
            {
                "memory/memory.limit_in_bytes": f"{2 * GIB}",
                "memory/memory.usage_in_bytes": f"{GIB}",
                # v1 sums its children's in total_*: those are the figures read
                "memory/memory.stat": f"inactive_file 7\ntotal_inactive_file {GIB // 2}",
            },
            3 * GIB // 2,
            id="v1 inactive page cache",
        ),
        pytest.param(
            "4:memory:/\n",
            {
                "memory/memory.limit_in_bytes": "9223372036854771712",
                "memory/memory.usage_in_bytes": "1",
            },
            None,
            id="v1 no limit",
        ),
        pytest.param("0::/\n", {}, None, id="no cgroup files"),
    ],
)
def test_the_memory_a_cgroup_leaves_bounds_the_batch(tmp_path, own, files, room):
    """`docker run --memory` or systemd's MemoryMax: the batch's default budget comes from
    what the limit leaves, not from the host's free memory (or the kernel kills it)."""
    root, self_cgroup = cgroups(tmp_path, own, files)
    assert cgroup_room(root, self_cgroup) == room


@pytest.mark.parametrize(
    ("meminfo", "expected"),
    [
        ("MemTotal:       24683772 kB\nMemFree:  19119080 kB\nMemAvailable:   23546736 kB\n",
         23546736 * 1024),
        ("MemTotal:       24683772 kB\nMemFree:  19119080 kB\n", None),  # before Linux 3.14
    ],
)  # fmt: skip
def test_the_memory_available_counts_the_page_cache_linux_would_drop(tmp_path, meminfo, expected):
    """Free pages alone leave out the page cache (the model's files just read, say):
    Linux's MemAvailable counts it; without that line, the free pages."""
    (tmp_path / "meminfo").write_text(meminfo)
    available = available_memory(tmp_path / "meminfo")
    if expected is not None:
        assert available == expected
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        assert abs(available - free) < free / 10
