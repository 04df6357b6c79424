"""The one exception the storage layer raises for problems an operator must fix.

Owns `StorageError` (its messages name the setting to change: DATA_DIR, REDIS_URL) and
what counts as an outage that may pass by itself.
"""

from __future__ import annotations

import re

from redis import exceptions as redis_errors


class StorageError(RuntimeError):
    """Redis cannot be started or reached; the message says which setting to look at."""


OUTAGES = (
    redis_errors.ConnectionError,  # BusyLoadingError too: a restarted Redis reading its data
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # a failover under way: the old primary, now a replica
    redis_errors.OutOfMemoryError,  # maxmemory reached: writes come back as keys expire
)


# Refusals that pass by themselves, by their code: redis-py has no class for some, and
# wraps others' where a script (`Error running script …: -OOM …`, as Redis 6.2 reports
# it) or a pipeline (`Command # 1 (SET …) of pipeline caused error: MISCONF …`) met them.
_PASSING_REFUSAL = re.compile(
    r"(?:^|error: | -)"
    r"(MISCONF"  # its disk full, or its snapshot failing: writes come back once it saves
    r"|MASTERDOWN"  # a replica cut off from its primary
    r"|OOM"  # maxmemory reached
    r"|READONLY"  # a failover under way
    r"|LOADING) "  # a restarted Redis reading its data
)


def is_outage(error: BaseException) -> bool:
    """Whether an error means Redis cannot take our writes now (it may come back by itself):
    a turn under way waits for it, and a new message is told to try again in a minute."""
    if isinstance(error, OUTAGES):
        return True
    return isinstance(error, redis_errors.ResponseError) and bool(
        _PASSING_REFUSAL.search(str(error))
    )
