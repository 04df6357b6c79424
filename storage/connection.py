"""Where the Redis client comes from: REDIS_URL if set, else a private embedded server.

Owns the client's lifetime (and the embedded server's); it must not know key layouts
or store anything — that is `storage.store`.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from redis.asyncio import Redis
from redis.asyncio.connection import ConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import AbstractBackoff, ExponentialBackoff
from redis.exceptions import ReadOnlyError, RedisError, ResponseError

from storage import keys
from storage.embedded import EmbeddedRedis
from storage.errors import StorageError, is_outage

logger = logging.getLogger(__name__)

T = TypeVar("T")
OLDEST_REDIS = (6, 2)  # for ZMSCORE (the journal) and XAUTOCLAIM (the workers)

WRITE_PROBE_MS = 1000  # the probe key goes by itself
NOT_A_URL = "not a valid URL: percent-encode any / ? # @ or : in its password (%2F %3F %23 %40 %3A)"
BAD_PORT = "its port is not a number from 1 to 65535"
BAD_DB = "its database is not a number from 0 up (e.g. redis://localhost:6379/0)"
NO_SCHEME = "a Redis URL starts with redis://, rediss:// or unix:// (e.g. redis://localhost:6379/0)"


@dataclass(frozen=True)
class Resilience:
    """How a client rides out a Redis that goes away: each call is retried `retries` times,
    backing off exponentially up to a second; an idle connection is checked before use
    after `health_check_s` (0: never). `on_failure` hears of every failed try, with its
    error (a metric)."""

    retries: int = 3
    health_check_s: float = 10
    on_failure: Callable[[Exception], object] = lambda error: None


class _CountedRetry(Retry):
    """redis-py's retry, which every command and connect goes through: the one place that
    sees each failed try, so it tells `on_failure` of each."""

    def __init__(
        self, backoff: AbstractBackoff, retries: int, *, on_failure: Callable[[Exception], object]
    ) -> None:
        super().__init__(backoff, retries)
        self._on_failure = on_failure

    async def call_with_retry(
        self, do: Callable[[], Awaitable[T]], fail: Callable[..., Awaitable[object]], **options
    ) -> T:
        async def failed(error: Exception, *count: object) -> None:
            self._on_failure(error)
            await fail(error, *count)

        return await super().call_with_retry(do, failed, **options)

    def __deepcopy__(self, memo: dict[int, object]) -> _CountedRetry:
        # redis-py copies the retry into its pool; the copy must report to the same place.
        backoff = copy.deepcopy(self._backoff, memo)
        return _CountedRetry(backoff, self._retries, on_failure=self._on_failure)


@asynccontextmanager
async def open_redis(
    *, redis_url: str | None, data_dir: Path, resilience: Resilience = Resilience()
) -> AsyncIterator[Redis]:
    """Yield a PINGed client (decode_responses=True); close it, and any embedded server, on exit.

    An empty `redis_url` counts as unset, as an empty REDIS_URL= line in a .env file means.
    """
    connect = partial(_connect, resilience=resilience)
    if redis_url:
        shown = redact_url(redis_url)
        client = await connect(redis_url, failure=f"cannot reach Redis at REDIS_URL={shown}")
        await _check_version(client, f"REDIS_URL={shown}")
        await _check_writable(client, f"REDIS_URL={shown}")
        logger.info("using Redis at %s", shown)
        try:
            yield client
        finally:
            await client.aclose()
        return

    server = EmbeddedRedis(data_dir=data_dir)
    # start/stop block for up to seconds; keep the event loop free meanwhile.
    await asyncio.to_thread(server.start)
    try:
        client = await connect(server.url, failure="cannot reach the embedded redis-server")
        logger.info("using the embedded redis-server at %s", redact_url(server.url))
        try:
            yield client
        finally:
            await client.aclose()
    finally:
        await asyncio.to_thread(server.stop)


async def take_a_write(client: Redis) -> None:
    """Raise unless Redis takes a write now: one that answers PING may refuse them all (at
    its maxmemory, or a replica after a failover)."""
    await client.set(keys.WRITE_PROBE, "1", px=WRITE_PROBE_MS)


async def up_for(client: Redis) -> float:
    """How long the server has run, in seconds: infinite where INFO does not say (refused
    by an ACL, or by a proxy that does not pass it on)."""
    try:
        return float((await client.info("server"))["uptime_in_seconds"])
    except (RedisError, KeyError, TypeError, ValueError):
        return math.inf


async def _check_version(client: Redis, where: str) -> None:
    """An older Redis refuses commands the bot needs only when it first uses them (a
    message's pending count, a forget), or, for a worker's takeover of a dead worker's
    jobs, never says so: said now, in one line."""
    try:  # (redis-py reads "7.2", as AWS's servers name theirs, as a float)
        version = str((await client.info("server"))["redis_version"])
    except (ResponseError, KeyError):  # INFO refused (an ACL), or a server naming none
        return
    parts = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if parts and parts < OLDEST_REDIS:
        await client.aclose()
        oldest = ".".join(map(str, OLDEST_REDIS))
        raise StorageError(f"{where} is Redis {version}: threadbot needs Redis {oldest} or newer")


async def _check_writable(client: Redis, where: str) -> None:
    """A Redis that answers PING may still refuse every write (a read-only replica, an ACL
    user without writes): said now, in one line, not as the first message's traceback. A
    Redis at its maxmemory, or its disk full, is an outage that passes (`storage.errors`):
    the start goes on, as a running bot rides it out, where exiting would spend a
    service's restarts."""
    try:
        await take_a_write(client)
    except ResponseError as exc:  # READONLY, NOPERM; OOM, MISCONF pass by themselves
        if is_outage(exc) and not isinstance(exc, ReadOnlyError):
            logger.warning(
                "%s refuses writes for now (%s): new messages are refused until it takes "
                "them again (at its maxmemory, once it has room)", where, exc
            )  # fmt: skip
            return
        await client.aclose()
        raise StorageError(
            f"{where} refuses writes, as a read-only replica or a user without them does "
            f"({exc}): point REDIS_URL at the primary, as a user that may write"
        ) from exc


def redact_url(url: str) -> str:
    """The URL without its password, query string or fragment (either may carry one).
    Read by hand, never failing: a password that is not percent-encoded may hold `/`,
    `?` or `#`, which a URL parser takes for the path, and would leave it whole."""
    url = re.sub(r"([?&])password=[^&#]*", r"\1", url)  # an @ in it is no user's
    scheme, separator, rest = url.partition("://") if "://" in url else ("", "", url)
    userinfo, at, address = rest.rpartition("@")
    address = re.split(r"[?#]", address, maxsplit=1)[0]
    if at:
        user, colon, _ = userinfo.partition(":")
        address = f"{user}{':***' if colon else ''}@{address}"
    return f"{scheme}{separator}{address}"


def url_problem(url: str) -> str | None:
    """What is wrong with `url` as a Redis URL, in words that echo none of it (it may hold
    a password); None for a URL that redis-py reads."""
    if not re.match(r"(redis|rediss|unix)://", url):  # redis-py's word: percent-encode
        return NO_SCHEME
    rest = url.partition("://")[2]
    address = re.split(r"[?#]", rest, maxsplit=1)[0]
    userinfo, at, host = address.rpartition("@")
    # A password not percent-encoded cuts the URL short before its host: a `/` in it ends
    # the address there (a base64 password's, say), a `?` or `#` starts the query (where
    # only a `password=` may hold an @). Parsed, it names another host, or a piece of the
    # password as one.
    if ("/" in userinfo) if at else ("@" in rest and "password=" not in rest):
        return NOT_A_URL
    port = re.fullmatch(r".*:(\d+)", host.split("/")[0])  # host:port, [IPv6]:port
    if port and not 0 < int(port[1]) < 65536:
        return BAD_PORT
    # redis-py takes a database that is no number (`/db1`, `/-1`) for none: db 0.
    if not url.startswith("unix:") and not re.fullmatch(r"[^/]*(/\d*/?)?\s*", host):
        return BAD_DB
    try:
        parse_url(url)  # what `Redis.from_url` reads it with
    except ValueError as error:  # its message may echo part of a password, but an option's
        option = re.match(r"Invalid value for '(\w+)'", str(error))  # name is no secret
        return f"its {option[1]} after the ? is not a number" if option else NOT_A_URL
    try:  # its query's options, as a connection takes them (nothing is connected)
        ConnectionPool.from_url(url).make_connection()
    except TypeError as error:  # an option no connection takes: named, never its value
        unknown = re.search(r"argument '(\w+)'", str(error))
        option = f" ({unknown[1]})" if unknown else ""
        return f"has an option after its ? that redis-py does not take{option}"
    return None


READ_TIMEOUT_S = 10.0  # one reply's wait
FIRST_ANSWER_S = 30.0
"""How long a start waits for Redis's first answer, retries and all, at least; more where
REDIS_RETRIES asks (a read's wait for each try): a server that takes connections and never
answers (a proxy to a dead one) held it for minutes, in silence, its tries retried within
each other's."""


async def _connect(url: str, *, failure: str, resilience: Resilience) -> Redis:
    if problem := url_problem(url):
        raise StorageError(f"{failure}: {problem}")
    tried: list[str] = []  # the last failed try's error, named if the wait runs out

    def failed(error: Exception) -> None:
        tried[:] = [str(error)]
        resilience.on_failure(error)

    try:
        # Bounded connects and reads, so a black-holed host fails instead of hanging.
        client = Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=5,
            socket_timeout=READ_TIMEOUT_S,
            retry=_CountedRetry(
                ExponentialBackoff(cap=1.0, base=0.05),
                resilience.retries,
                on_failure=failed,
            ),
            health_check_interval=resilience.health_check_s,
        )
    except ValueError:  # an option it cannot take; redis-py's message may echo a password
        raise StorageError(f"{failure}: {NOT_A_URL}") from None
    waited = max(FIRST_ANSWER_S, (resilience.retries + 1) * READ_TIMEOUT_S)
    try:
        async with asyncio.timeout(waited):
            await client.ping()
    except Exception as exc:
        # It answered, refusing writes for now (a full disk refuses PING too): the start
        # goes on (`_check_writable`).
        if isinstance(exc, ResponseError) and is_outage(exc):
            return client
        with suppress(Exception):
            await client.aclose()
        raise StorageError(f"{failure}: {_unanswered(exc, waited, tried)}") from exc
    return client


def _unanswered(error: Exception, waited: float, tried: list[str]) -> str:
    """Why a first PING got no answer (`tried`: its last failed try, if any)."""
    if isinstance(error, TimeoutError):  # ours: a read of redis-py's raises its own
        last = f" (the last try: {tried[-1]})" if tried else ""
        return f"no answer within {waited:g} s{last}"
    if isinstance(error, RedisError | OSError):  # out of reach, or refused (a password)
        return str(error)
    return "it does not answer as Redis does"  # its handshake tripped on another's reply
