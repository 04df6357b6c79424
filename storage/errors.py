"""The one exception the storage layer raises for problems an operator must fix.

Owns `StorageError` (its messages name the setting to change: DATA_DIR, REDIS_URL) and
what counts as an outage that may pass by itself.
"""

from __future__ import annotations

from redis import exceptions as redis_errors


class StorageError(RuntimeError):
    """Redis cannot be started or reached; the message says which setting to look at."""


OUTAGES = (
    redis_errors.ConnectionError,  # BusyLoadingError too: a restarted Redis reading its data
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # a failover under way: the old primary, now a replica
    redis_errors.OutOfMemoryError,  # maxmemory reached: writes come back as keys expire
)


PASSING_REFUSALS = (
    "MISCONF",  # its disk full, or its snapshot failing: writes come back once it saves
    "MASTERDOWN",  # a replica cut off from its primary
    "OOM",  # maxmemory reached, inside a script (Redis 6.2 reports it so)
)


def is_outage(error: BaseException) -> bool:
    """Whether an error means Redis cannot take our writes now (it may come back by itself):
    a turn under way waits for it, and a new message is told to try again in a minute.
    Refusals that redis-py has no class for are told by their code, which a script's
    error carries inside its own (`Error running script …: -OOM …`)."""
    if isinstance(error, OUTAGES):
        return True
    if not isinstance(error, redis_errors.ResponseError):
        return False
    said = str(error)
    return any(said.startswith(f"{code} ") or f" -{code} " in said for code in PASSING_REFUSALS)
