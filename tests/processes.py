"""Real processes for fault tests: a redis-server the test can kill and bring back on the
same port, and `threadbot run` the test can SIGKILL, SIGTERM and start again.

Both bind 127.0.0.1 only; every wait is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fake_server import wait_for

from storage.embedded import bundled_redis_server

PROXY_NAMES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
               "ALL_PROXY", "no_proxy", "NO_PROXY")  # fmt: skip
"""Every variable that sends an HTTP client through a proxy, or past one."""


@contextlib.contextmanager
def silent_proxy() -> Iterator[str]:
    """The URL of a proxy on 127.0.0.1 that takes every connection and never answers (a
    stalled hub or company proxy); its connections close at the end of the block."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def hold() -> None:
        with contextlib.suppress(OSError):  # closed at the end
            while True:
                held.append(listener.accept()[0])

    threading.Thread(target=hold, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for connection in held:  # a request still waiting ends
            connection.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """A private redis-server whose AOF is fsynced on every write, so a SIGKILL loses
    nothing that was acknowledged; `kill` and `start` keep its port and data."""

    def __init__(self, data_dir: Path, *, password: str | None = None) -> None:
        self.data_dir = data_dir
        self.password = password
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(bundled_redis_server()),
            "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self._process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not self._answers():
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    async def refuse_writes(self) -> None:
        """Make it a replica of nothing: it answers PING and reads, and refuses every write
        (READONLY), as a failover's old primary, or a replica named by mistake, does."""
        from redis.asyncio import Redis

        async with Redis.from_url(self.url) as client:
            await client.execute_command("REPLICAOF", "127.0.0.1", "1")

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, as in a crash or a lost host."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False


class BotProcess:
    """`python -m bot run --role ROLE` (or `python -c CODE`, for an injected fault) with its
    log in a file that the test can read while it runs."""

    def __init__(
        self,
        *,
        cwd: Path,
        env: dict[str, str],
        log: Path,
        code: str | None = None,
        role: str = "all",
    ):
        self.cwd, self.env, self.log = cwd, env, log
        self.argv = ["-c", code] if code else ["-m", "bot", "run", "--role", role]
        self.process: asyncio.subprocess.Process | None = None
        self._log_start = 0

    async def start(self) -> None:
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, *self.argv,
                cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def text(self, *, this_run: bool = True) -> str:
        """The log of this run (or of every run so far)."""
        data = self.log.read_bytes()
        return data[self._log_start if this_run else 0 :].decode(errors="replace")

    async def wait_log(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        return await wait_for(lambda: re.search(pattern, self.text()), timeout, interval=0.05)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as in an OOM kill or a pulled plug."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)

    def reload(self) -> None:
        """SIGHUP, as `systemctl reload` or `kill -HUP` send: read the team's file again."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    async def wait(self, timeout: float = 60) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as `docker stop` and systemd send; the exit status."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def close(self) -> None:
        """Whatever state it is in, make sure it is gone (test teardown)."""
        if self.alive:
            self.kill()
            await self.wait(30)
