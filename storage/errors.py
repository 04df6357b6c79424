"""The one exception the storage layer raises for problems an operator must fix.

Owns `StorageError` (its messages name the setting to change: DATA_DIR, REDIS_URL) and
what counts as an outage that may pass by itself.
"""

from __future__ import annotations

from redis import exceptions as redis_errors


class StorageError(RuntimeError):
    """Redis cannot be started or reached; the message says which setting to look at."""


def is_outage(error: BaseException) -> bool:
    """Whether an error means Redis cannot be reached now (it may come back by itself)."""
    return isinstance(error, (redis_errors.ConnectionError, redis_errors.TimeoutError))
