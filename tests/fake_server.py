"""What the tests' fake platforms share: serving on 127.0.0.1, and bounded waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from aiohttp import web

T = TypeVar("T")


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    """Start `app` on 127.0.0.1 (never another address); returns its runner and port."""
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


async def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Poll predicate until it returns something truthy; TimeoutError after timeout.

    Bounded in count as well as time, so no test loop can spin forever.
    """
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        if result := predicate():
            return result
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s")
