"""Answer statistics over the last hour (or any shorter window), shared through Redis.

Each answered turn is one member of a sorted set scored by when it was answered; a write
adds it and trims what is older than `keep_s` (and beyond `max_entries`) in one MULTI, so
the set stays small however long the bot runs, and every process that writes the same
scope adds to the same numbers. A summary reads the window and works out the percentiles
here: Redis has no percentile of its own, and a window holds at most `max_entries`.

Owns the layout of the stats key under `storage.keys`; knows nothing of platforms or models.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis

from storage import keys

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Summary:
    """Turns answered in a window, their tokens, and their latency's median and 95th
    percentile in seconds (None with no turns)."""

    turns: int
    prompt_tokens: int
    answer_tokens: int
    p50_s: float | None
    p95_s: float | None


@dataclass(frozen=True, slots=True)
class _Entry:
    latency_s: float
    prompt_tokens: int
    answer_tokens: int


class TurnStats:
    """Records answered turns and sums up a recent window of them."""

    def __init__(
        self,
        *,
        redis: Redis,
        scope: str = "all",
        keep_s: float = 3600,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not keep_s > 0 or max_entries < 1:
            raise ValueError("keep_s and max_entries must be positive")
        self._redis = redis
        self._key = keys.turn_stats(scope)
        self.keep_s = keep_s
        self._max_entries = max_entries
        self._clock = clock

    async def record(
        self, latency_s: float, prompt_tokens: int, answer_tokens: int, at: float | None = None
    ) -> None:
        """Add one answered turn, answered at `at` (a Unix time; None: now), that took
        `latency_s` from its message to its answer."""
        if not (math.isfinite(latency_s) and latency_s >= 0):
            raise ValueError(f"latency_s must be a finite number of seconds, not {latency_s}")
        if at is not None and not math.isfinite(at):
            raise ValueError(f"at must be a Unix time, not {at}")
        if prompt_tokens < 0 or answer_tokens < 0:
            raise ValueError(
                f"token counts cannot be negative: {prompt_tokens} prompt, {answer_tokens} answer"
            )
        now = self._clock()
        # A random id keeps two turns with the same numbers two members of the set.
        member = json.dumps([latency_s, prompt_tokens, answer_tokens, uuid.uuid4().hex])
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zadd(self._key, {member: now if at is None else at})
            pipe.zremrangebyscore(self._key, "-inf", f"({now - self.keep_s}")
            pipe.zremrangebyrank(self._key, 0, -self._max_entries - 1)
            pipe.expire(self._key, math.ceil(self.keep_s))
            await pipe.execute()

    async def summary(self, window_s: float = 3600) -> Summary:
        """The turns answered in the last `window_s` seconds (at most `keep_s`)."""
        if not 0 < window_s <= self.keep_s:
            raise ValueError(f"window_s must be more than 0 and at most {self.keep_s}")
        members = await self._redis.zrangebyscore(self._key, self._clock() - window_s, "+inf")
        entries = [entry for member in members if (entry := _decode(member)) is not None]
        if skipped := len(members) - len(entries):
            logger.warning("skipped %d malformed entries in %s", skipped, self._key)
        latencies = sorted(entry.latency_s for entry in entries)
        return Summary(
            turns=len(entries),
            prompt_tokens=sum(entry.prompt_tokens for entry in entries),
            answer_tokens=sum(entry.answer_tokens for entry in entries),
            p50_s=nearest_rank(latencies, 50),
            p95_s=nearest_rank(latencies, 95),
        )


def nearest_rank(ordered: list[float], percent: int) -> float | None:
    """The smallest value that at least `percent`% of `ordered` (sorted) are at or below;
    None for no values. Always a value that was measured, never an interpolation."""
    if not ordered:
        return None
    rank = max((percent * len(ordered) + 99) // 100, 1)  # ceil, in integers
    return ordered[rank - 1]


def _decode(member: str | bytes) -> _Entry | None:
    try:
        latency_s, prompt_tokens, answer_tokens, _id = json.loads(member)
    except (ValueError, TypeError):  # not JSON (or not text), or not four values
        return None
    numbers = (latency_s, prompt_tokens, answer_tokens)
    if not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers):
        return None
    return _Entry(float(latency_s), int(prompt_tokens), int(answer_tokens))
