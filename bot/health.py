"""What /readyz and /metrics ask of the running process: its readiness, check by check,
and the gauges that are read when scraped.

`threadbot run` fills it in as it starts: until the service (or, for `--role worker`, the
worker) is open, the model is loading and nothing else is checked; then Redis must answer
a PING, what writes the answers must be able to (the engine thread alive; for a gateway,
a worker alive), and every configured platform's adapter must say it is connected.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

from redis.exceptions import ResponseError

from bot.metrics import Metrics
from storage.connection import take_a_write

if TYPE_CHECKING:
    from adapters.base import Adapter
    from bot.queue import Inference
    from bot.service import ChatService
    from bot.worker import Worker

logger = logging.getLogger(__name__)

READY = "ok"
REDIS_TIMEOUT_S = 2.0  # a PING slower than this counts as Redis not answering


class Vitals:
    """Readiness and scrape-time gauges of one `threadbot run`."""

    def __init__(self, *, metrics: Metrics, platforms: Sequence[str]) -> None:
        self.metrics = metrics
        self.platforms = tuple(platforms)
        self._ping: Callable[[], Awaitable[object]] | None = None  # None: still loading
        self._inference: Inference | None = None
        self._count_pending: Callable[[], Awaitable[int]] | None = None
        self._draining: Callable[[], bool] = lambda: False  # a stop has begun
        self._adapters: dict[str, Adapter] = {}
        metrics.loading.set(1)
        metrics.pending_turns.set(math.nan)  # unknown until counted: a 0 would say none wait
        for platform in self.platforms:
            metrics.expect_platform(platform)

    def started(self, service: ChatService, adapters: Sequence[Adapter]) -> None:
        """The service is open (Redis reached, the model loaded) and its adapters built."""
        self._ping, self._inference = service.store.ping, service.queue
        self._draining = lambda: service.draining
        self._count_pending = partial(service.journal.count, self.platforms)
        self._adapters = {adapter.platform: adapter for adapter in adapters}
        self.metrics.loading.set(0)

    def working(self, worker: Worker) -> None:
        """The worker is open (Redis reached, the model loaded); it has no platforms."""
        self._ping, self._inference = partial(take_a_write, worker.redis), worker.inference
        self._draining = lambda: worker.stopping
        self.metrics.loading.set(0)

    async def readiness(self) -> dict[str, str]:
        """Each check, "ok" or what is not ready: redis, model, what writes the answers
        (the engine, or a gateway's workers), each platform."""
        if self._ping is None or self._inference is None:
            checks = {"model": "loading"}
        else:
            checks = {"redis": await self._redis(self._ping), "model": READY}
            checks |= self._inference.checks()
            if self._draining():  # stopping: new turns go elsewhere (a load balancer's)
                checks["service"] = "draining"
        for platform in self.platforms:
            checks[platform] = READY if await self._connected(platform) else "not connected"
        return checks

    async def refresh(self) -> None:
        """Set the gauges that are read, not counted: connections and pending turns."""
        for platform in self.platforms:
            self.metrics.platform_connected.labels(platform).set(await self._connected(platform))
        if self._count_pending is None:
            return
        try:
            pending = await asyncio.wait_for(self._count_pending(), REDIS_TIMEOUT_S)
        except Exception as error:  # the Redis client counts it
            logger.debug("pending turns not counted: %s", error)
            # Unknown: the count from before the outage would keep ThreadbotStuck's "no
            # token generated while turns wait" true, and say the engine was wedged.
            self.metrics.pending_turns.set(math.nan)
        else:
            self.metrics.pending_turns.set(pending)

    async def _redis(self, ping: Callable[[], Awaitable[object]]) -> str:
        try:
            await asyncio.wait_for(ping(), REDIS_TIMEOUT_S)
        except TimeoutError:
            return f"not answering within {REDIS_TIMEOUT_S:g}s"
        except ResponseError as error:  # answering: at its maxmemory, or a replica now
            return f"refuses writes: {error}"
        except Exception as error:
            return f"not answering: {error}"
        return READY

    async def _connected(self, platform: str) -> bool:
        adapter = self._adapters.get(platform)
        return adapter is not None and await adapter.connected()
