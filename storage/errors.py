"""The one exception the storage layer raises for problems an operator must fix.

Owns `StorageError` only; the messages name the setting to change (DATA_DIR, REDIS_URL).
"""

from __future__ import annotations


class StorageError(RuntimeError):
    """Redis cannot be started or reached; the message says which setting to look at."""
