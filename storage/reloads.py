"""The `reload` commands run, counted in Redis: an admin's `reload` reaches one process (a
gateway among several), and every other process of the deployment sees the count move and
reads the team's file too.

Owns the layout of the count's key under `storage.keys`; knows nothing of the file.
"""

from __future__ import annotations

from redis.asyncio import Redis

from storage import keys


class TeamReloads:
    def __init__(self, *, redis: Redis, scope: str = "all") -> None:
        self._redis = redis
        self._key = keys.team_reloads(scope)

    async def count(self) -> int:
        """How many reloads have been run, by any process."""
        return int(await self._redis.get(self._key) or 0)

    async def add(self) -> int:
        """Count one more; the count now."""
        return await self._redis.incr(self._key)
