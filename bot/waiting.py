"""Waiting for an `asyncio.Event` with a deadline.

Loops that pause between rounds (renewing a lease, showing typing, sweeping jobs) wait
on the event that ends them for at most a round's length. The wait is a deadline, not a
cancel: a task that stops them sets the event, and nothing is cancelled halfway through a
Redis call (redis-py's own `wait_for` may swallow the cancel, or lose its connection).
"""

from __future__ import annotations

import asyncio
import contextlib


async def set_within(event: asyncio.Event, seconds: float) -> bool:
    """Whether `event` is set, waiting for it at most `seconds`."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()
