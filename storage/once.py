"""Writes that must happen once, though the Redis client may send them twice.

redis-py sends a command again when its connection breaks before the reply comes (see
`storage.connection`), after Redis may have run it. A marker set "if not there" would then
read as set by someone else, and a list trimmed by position would lose more. Each call
here carries a token of its own, so its second sending finds its own first.
"""

from __future__ import annotations

import uuid

from redis.asyncio import Redis

from storage import keys

# Set KEYS[1] to this call's token unless another call set it: 1 if this call did.
_FIRST = """
local value = redis.call('GET', KEYS[1])
if value == ARGV[1] then return 1 end
if value then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""
# LTRIM KEYS[1] to ARGV[1]..ARGV[2], unless this call (its token, KEYS[2]) did already.
_TRIM = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then
  redis.call('LTRIM', KEYS[1], ARGV[1], ARGV[2])
end
return 1
"""
TOKEN_KEPT_S = 300  # far longer than a client's retries of one call


class Once:
    def __init__(self, redis: Redis) -> None:
        self._first = redis.register_script(_FIRST)
        self._trim = redis.register_script(_TRIM)

    async def first(self, key: str, ttl_seconds: int) -> bool:
        """Mark `key` for `ttl_seconds`: True if this call marked it, False if it was marked."""
        return bool(await self._first(keys=[key], args=[uuid.uuid4().hex, ttl_seconds]))

    async def trim(self, key: str, start: int, stop: int) -> None:
        """LTRIM `key` to `start`..`stop`, once."""
        token = keys.once(uuid.uuid4().hex)
        await self._trim(keys=[key, token], args=[start, stop, TOKEN_KEPT_S])
