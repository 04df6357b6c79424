"""The protocol between gateways and inference workers, on Redis Streams.

```
gateway ──XADD Job──▶ threadbot:jobs:worker:W   (the conversation's worker, by hashing)
                      threadbot:jobs            (no worker alive: any worker's)
worker  ──XREADGROUP (group "workers", as many as it has free rows)──▶ runs the job
worker  ──XADD Chunk──▶ threadbot:job:ID:chunks ──XREAD──▶ gateway ──▶ the thread
worker  ──XACK + XDEL the job, once its last chunk is written
```

A job left unacknowledged (its worker died) is claimed by another worker with XAUTOCLAIM
once idle `JOB_CLAIM_IDLE_S`; live workers keep their running jobs' idle time at zero. Each
chunk carries its attempt (the job's delivery count): a higher one means the answer starts
again, a lower one is a dead worker's late write, ignored. A job delivered more than
`JOB_MAX_DELIVERIES` times goes to `threadbot:jobs:dead`, and its chunks end in an error.
A cancel is a key the worker checks as it writes. Only this module knows field names.

Redis clients retry a command whose reply was lost, so any write may land twice: a text
chunk carries where its text begins in the answer, and a gateway reads each piece once;
a job is sent under its request's record, and a retry finds the record and sends nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
import types
import typing
from dataclasses import asdict, dataclass
from typing import Any, Literal

from redis.asyncio import Redis

from bot.types import ChatMessage
from storage import keys

ChunkKind = Literal["started", "text", "restart", "end", "error"]
CHUNKS_MAXLEN = 10_000  # far above an answer's chunks: a reader that falls behind loses none
DEAD_MAXLEN = 1_000


@dataclass(frozen=True)
class Job:
    """One answer to write: the prompt's messages, trimmed by the gateway, and its options."""

    id: str
    conversation: str
    user: str
    messages: list[ChatMessage]
    max_new_tokens: int | None
    temperature: float | None
    deadline: float  # Unix time, on Redis's clock, after which nobody waits for the answer

    def fields(self) -> dict[str, str]:
        return {"job": json.dumps(asdict(self))}

    def fingerprint(self) -> str:
        """What the job asks, without its id or deadline: the same for the same request
        sent again (a turn resumed by another gateway)."""
        asked = [self.conversation, self.messages, self.max_new_tokens, self.temperature]
        return hashlib.blake2b(json.dumps(asked).encode(), digest_size=16).hexdigest()

    @classmethod
    def parse(cls, fields: dict[str, str]) -> Job:
        """A job from its stream entry; ValueError (or KeyError, TypeError) if malformed."""
        return cls(**_typed(cls, json.loads(fields["job"])))


@dataclass(frozen=True)
class Chunk:
    """One entry of a job's answer stream: the worker took it (`started`), a piece of
    text, the answer starting again in this attempt (`restart`: its backend retried),
    the end (the whole text), or an error the user should hear. Each carries the
    prompt's and the answer's tokens read and written so far, so an answer stopped before
    its end has them too (older workers put them on the end only: 0 before, the default).
    A piece of text carries its `offset` in this attempt's answer, so a write that lands
    twice reads once (None from older workers)."""

    attempt: int
    worker: str
    kind: ChunkKind
    text: str = ""
    prompt_tokens: int = 0
    answer_tokens: int = 0
    offset: int | None = None

    def fields(self) -> dict[str, str]:
        return {"chunk": json.dumps(asdict(self))}

    @classmethod
    def parse(cls, fields: dict[str, str]) -> Chunk:
        """A chunk from its stream entry; ValueError (or KeyError, TypeError) if malformed."""
        return cls(**_typed(cls, json.loads(fields["chunk"])))


def _typed(cls: type, data: object) -> dict[str, Any]:
    """`data`, if its fields have the JSON types that `cls` declares: an entry of another
    version, or of a bug, is refused where it is read, not where it would stop a loop."""
    if not isinstance(data, dict):
        raise ValueError(f"not an object: {data!r}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if name in hints and not _is(value, hints[name]):
            raise ValueError(f"{cls.__name__}.{name} cannot be {value!r}")
    return data


def _is(value: object, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, arm) for arm in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if isinstance(value, bool):  # a JSON true is no number
        return hint is bool
    if hint is float:
        return isinstance(value, int | float)
    return isinstance(value, origin or hint)


class RedisClock:
    """Redis's clock, which a deployment's gateways and workers share where their own clocks
    may not agree: jobs' deadlines are set and checked on it, and the stream entries' ids
    carry its time. Read now and then; in between, and while Redis is out of reach, this
    process's monotonic clock carries it on (before the first read, its own clock)."""

    def __init__(self) -> None:
        self._read: tuple[float, float] | None = None  # Redis's time, the monotonic clock's

    def now(self) -> float:
        if self._read is None:
            return time.time()
        redis_time, read_at = self._read
        return redis_time + time.monotonic() - read_at

    def heard(self, reply: tuple[int, int]) -> None:
        """TIME's reply (seconds, microseconds), as read in a pipeline."""
        seconds, microseconds = reply
        self._read = seconds + microseconds / 1e6, time.monotonic()

    async def read(self, redis: Redis) -> None:
        self.heard(await redis.time())


def entry_age(entry_id: str, now: float) -> float:
    """Seconds since a stream entry was added, from the Unix milliseconds that Redis puts at
    the front of its id; `now` on Redis's clock (`RedisClock`)."""
    return max(now - int(entry_id.split("-", 1)[0]) / 1000, 0.0)


def pick_worker(conversation: str, workers: list[str]) -> str | None:
    """The worker for a conversation: rendezvous hashing, so each conversation keeps its
    worker while that one lives, and only the dead worker's conversations move."""
    return max(workers, key=lambda worker: _weight(conversation, worker), default=None)


def _weight(conversation: str, worker: str) -> int:
    digest = hashlib.blake2b(f"{conversation}\0{worker}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True)
class Roll:
    """The workers that have registered, and those of them whose heartbeat has not lapsed,
    each in name order."""

    registered: list[str]
    alive: list[str]

    @property
    def streams(self) -> list[str]:
        """Every stream jobs may wait in: the shared one and each registered worker's."""
        return [keys.JOBS, *(keys.worker_jobs(name) for name in self.registered)]


async def roll_call(redis: Redis) -> Roll:
    """The workers as Redis has them now."""
    names = sorted(await redis.smembers(keys.WORKERS))
    beats = await redis.mget([keys.worker(name) for name in names]) if names else []
    return Roll(names, [name for name, beat in zip(names, beats, strict=True) if beat is not None])


class JobFailed(Exception):
    """The workers gave up on a job: the user hears the usual apology."""


TIMED_OUT = "timed out"
"""An error chunk's text where the worker's REQUEST_TIMEOUT ran out: the gateway's
request times out with it (a gateway that waits longer, or that followed the job late)."""


@dataclass(frozen=True)
class JobCounts:
    """Jobs in the streams now: `waiting` for a worker, and `held` (waiting or running; a
    job is deleted once acknowledged)."""

    waiting: int
    held: int


async def job_counts(redis: Redis, streams: list[str]) -> JobCounts:
    """Count the jobs in `streams` (every stream they may be in: `Roll.streams`)."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
        replies = await pipe.execute(raise_on_error=False)  # a stream not made yet: no group
    waiting = held = 0
    for length, groups in zip(replies[::2], replies[1::2], strict=True):
        running = sum(g["pending"] for g in groups) if isinstance(groups, list) else 0
        held += length
        waiting += max(length - running, 0)
    return JobCounts(waiting, held)
