"""`threadbot run --role worker` as a benchmark's own process: started with the settings
given (pinned to cores with `taskset` where asked), its log in a file, its metrics read
from its /metrics, and always stopped (SIGTERM, then SIGKILL if it lingers).
Every wait is bounded in time."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Self

from redis.asyncio import Redis

from bot.jobs import roll_call

ROOT = Path(__file__).resolve().parents[1]  # `python -m bot` runs this checkout's code
STOP_TIMEOUT_S = 15


class WorkerDied(Exception):
    """The worker process exited, or did not start taking jobs in time; says why."""


class WorkerProcess:
    """One worker process for the length of a `with` block."""

    def __init__(self, *, env: dict[str, str], log: Path, core: int | None = None) -> None:
        self.port = free_port()
        self.env = os.environ | env | {"HTTP_PORT": str(self.port)}
        self.log = log
        pin = ["taskset", "-c", str(core)] if core is not None else []  # exec's: the same pid
        self.argv = [*pin, sys.executable, "-m", "bot", "run", "--role", "worker"]
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    async def name(self, redis: Redis, timeout: float) -> str:
        """Its worker name, once its heartbeat is in Redis: it is taking jobs then. Worker
        names hold their process's id (`bot.runtime.process_id`)."""
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise WorkerDied(
                    f"the worker exited with {self.process.returncode}:\n{self.tail()}"
                )
            for name in (await roll_call(redis)).alive:
                if name.rsplit(":", 2)[-2] == str(self.process.pid):
                    return name
            await asyncio.sleep(0.2)
        raise WorkerDied(f"the worker took no jobs within {timeout:.0f} s:\n{self.tail()}")

    def metric(self, sample: str) -> float:
        """An unlabelled sample's value on its /metrics: `threadbot_generated_tokens_total`,
        say, or a histogram's `_sum`."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            lines = response.read().decode().splitlines()
        return float(next(line for line in lines if line.startswith(f"{sample} ")).split()[1])

    def loop_cpu(self) -> float:
        """CPU seconds of its main thread, which runs its event loop (the engine thread and
        its OpenMP threads are others): its Redis work, and its queue's."""
        assert self.process is not None
        pid = self.process.pid
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
