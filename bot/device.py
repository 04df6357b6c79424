"""Where and how fast the model runs: the dtype `DTYPE=auto` means, the threads torch uses,
and the memory the weights leave."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

if TYPE_CHECKING:
    import torch

P = ParamSpec("P")
R = TypeVar("R")


def pick_dtype(dtype: str, device: str) -> str:
    """`DTYPE=auto` resolved: bf16 where the hardware computes in it, fp16 on GPUs without
    bf16 and on MPS, fp32 on other CPUs.

    On a CPU without AVX512-BF16 or AMX, torch runs bf16 matrix products on a slow path
    whose cost grows with every row: measured with Qwen2.5-0.5B's shape on a 2-core AVX2
    EPYC, a 200-token prompt takes 12 s to prefill in bf16 against 3 s in fp32, and a
    decode step for 16 conversations 1.07 s against 0.59 s. Only a lone decode step is
    faster in bf16 (0.09 s against 0.18 s: half the bytes to read), and that does not
    make up for the prefill. oneDNN says it supports bf16 from AVX512 up, converting each
    product where the CPU has no bf16 instructions (Skylake to Ice Lake Xeons): held to
    those kernels (`ONEDNN_MAX_CPU_ISA=AVX512_CORE`) on an AMX Xeon, the packed model
    prefilled 200 tokens in 3.8 s in bf16 against 0.9 s in fp32, and stepped 16 rows in
    0.40 s against 0.16 s.
    """
    if dtype != "auto":
        return dtype
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    if device == "mps":
        return "float16"
    return "bfloat16" if _computes_bf16_natively() else "float32"


def _computes_bf16_natively() -> bool:
    """Whether this CPU has bf16 instructions for oneDNN to use: as oneDNN says (an ARM
    CPU's own, say), but for x86 from AVX512 up, where it says so without them."""
    import torch

    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    if not cpu_has("avx512"):
        return True
    return cpu_has("avx512_bf16") or cpu_has("amx_tile")


def cpu_has(instructions: str) -> bool:
    """What torch.cpu says of these instructions (False where this torch cannot say)."""
    import torch

    return getattr(torch.cpu, f"_is_{instructions}_supported", lambda: False)()


def use_all_cores() -> int:
    """Let torch use every core this process may run on (containers often allow fewer
    than the machine has, and torch's default counts the machine's)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores or 1)
    return torch.get_num_threads()


def on_own_thread(work: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`work(...)` on a new thread that ends with it, so its OpenMP threads end too.

    torch's OpenMP threads belong to the thread that ran the parallel op, and live as long
    as it does. While a process has more of them than cores, libgomp makes every one of
    them sleep straight after each op instead of spinning a moment, and each of the few
    hundred ops of a decode step then waits for them to wake: on 2 cores with Qwen2.5-0.5B's
    shape, the engine thread's decode step took 103-110 ms with the loading thread's team
    still alive, 73-89 ms once it had ended. So whatever computes before the engine thread
    does (loading the model; the benchmark's other sides) runs here.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="torch-once") as thread:
        return thread.submit(work, *args, **kwargs).result()


LOADING = "threadbot-loading"  # the name of `loaded`'s threads


async def loaded(work: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`work(...)` (finding, downloading or loading a model) awaited on a new thread that
    ends with it, as `on_own_thread`'s does, but a daemon one: a stop meanwhile (Ctrl-C or
    SIGTERM in the middle of a download) returns at once, where asyncio waited for its
    executor's threads and a stalled hub held the process for minutes. The process then
    exits without waiting for it (`still_loading`)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not done.done():
            done.set_exception(error) if error is not None else done.set_result(result)

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (work(*args, **kwargs), None)
        except BaseException as error:
            outcome = (None, error)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits now
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name=LOADING, daemon=True).start()
    return await done


def still_loading() -> bool:
    """Whether a stop left `loaded` work running (it is abandoned at exit)."""
    return any(thread.name == LOADING and thread.is_alive() for thread in threading.enumerate())


def return_freed_memory() -> None:
    """Hand the memory of weights just replaced (packed, quantized) back to the system.
    glibc keeps freed heap memory for reuse, so the process would go on holding both
    copies' worth (measured: 2.18 GiB resident for Qwen2.5-0.5B in bfloat16 once packed,
    1.52 once returned), and the memory left for the batch (`MAX_BATCH_TOKENS`' default)
    would look that much smaller. Elsewhere (macOS, musl) there is no `malloc_trim`, and
    nothing to do here."""
    gc.collect()
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)


def free_memory(device: torch.device) -> int:
    """Bytes free now where the model lives: the GPU's, else what the machine can give
    (`available_memory`), within what this process's cgroup may still take (a
    container's or a service's limit)."""
    if device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return free
    room = cgroup_room()
    machine = available_memory()
    return machine if room is None else min(machine, room)


MEMINFO = Path("/proc/meminfo")


def available_memory(meminfo: Path = MEMINFO) -> int:
    """Bytes the machine can give new allocations without swapping: on Linux its own
    estimate (MemAvailable), the free pages and the page cache it would drop for them.
    Free pages alone miss that cache, which a machine up for a while, or one that just
    read the model's files, has filled (a 24 GiB machine minutes after it started: 18.2
    GiB free, 22.5 available). Elsewhere,
    the free pages (systems without that figure, like macOS, give all physical memory)."""
    try:
        for line in meminfo.read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "MemAvailable":
                return int(value.split()[0]) * 1024  # in kB
    except (OSError, ValueError, IndexError):
        pass
    pages = "SC_AVPHYS_PAGES" if "SC_AVPHYS_PAGES" in os.sysconf_names else "SC_PHYS_PAGES"
    return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")


CGROUP_ROOT = Path("/sys/fs/cgroup")
# The limit, the usage, and the page cache in it that is dropped first (in memory.stat).
CGROUP_V2_FILES = ("memory.max", "memory.current", "inactive_file")
CGROUP_V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a number near 2**63


def cgroup_room(root: Path = CGROUP_ROOT, own: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes the memory cgroup of this process may still take, where it has a limit
    (`docker run --memory`, systemd's `MemoryMax`): the limit less the usage, but for the
    inactive page cache in it, which the kernel drops first as the limit nears (so the
    kubelet counts a container's working set; the model's files just read are there).
    None where it has no limit, or Linux's cgroups are not there."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return None
    paths = {kind: path.lstrip("/") for _, kind, path in (line.split(":", 2) for line in lines)}
    v1 = root / "memory"
    places = [  # cgroup v2, then v1; each at its own path, then as mounted in a container
        (root / paths.get("", ""), *CGROUP_V2_FILES),
        (root, *CGROUP_V2_FILES),
        (v1 / paths.get("memory", ""), *CGROUP_V1_FILES),
        (v1, *CGROUP_V1_FILES),
    ]
    for folder, limit_file, usage_file, dropped_first in places:
        try:
            limit = (folder / limit_file).read_text().strip()
            usage = int((folder / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= UNLIMITED:
            return None
        return max(int(limit) - usage + _stat(folder / "memory.stat", dropped_first), 0)
    return None


def _stat(path: Path, name: str) -> int:
    """A figure of a cgroup's memory.stat ("name value" lines); 0 where it has none."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    values = dict(line.partition(" ")[::2] for line in lines)
    try:
        return int(values.get(name, 0))
    except ValueError:
        return 0
