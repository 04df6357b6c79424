"""Redis: reachable where the bot would find it, its version, AOF, and memory.

Where the bot would find it: REDIS_URL; else the embedded redis-server of a threadbot
running on DATA_DIR; else a new embedded server in DATA_DIR, started for the check.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot.config import Settings
from bot.doctor.findings import Finding, fail, ok, warn
from storage.connection import Resilience, open_redis, redact_url
from storage.embedded import running_url
from storage.errors import StorageError

CHECK = "redis"
# One try: an unreachable Redis is reported at once, not after the bot's retries.
ONE_TRY = Resilience(retries=0, health_check_s=0)


async def check_redis(settings: Settings) -> AsyncIterator[Finding]:
    where, connection = _connection(settings)
    try:
        async with connection as client:
            info = await client.info()
    except StorageError as error:
        yield fail(CHECK, str(error))
        return
    except RedisError as error:  # PING passed; an ACL may still refuse INFO
        yield warn(
            CHECK, f"{where} answers, but INFO was refused ({error}): AOF and memory unknown"
        )
        return
    yield _judge(where, info)


def _connection(settings: Settings) -> tuple[str, AbstractAsyncContextManager[Redis]]:
    """Where the bot's Redis is, in words, and a client for it."""
    if settings.redis_url:
        where = f"REDIS_URL={redact_url(settings.redis_url)}"
        url: str | None = settings.redis_url
    elif url := running_url(settings.data_dir):
        where = (
            f"the embedded redis-server of the threadbot running on DATA_DIR={settings.data_dir}"
        )
    else:
        where = f"an embedded redis-server in DATA_DIR={settings.data_dir} (started for this check)"
    return where, open_redis(redis_url=url, data_dir=settings.data_dir, resilience=ONE_TRY)


def _judge(where: str, info: dict[str, Any]) -> Finding:
    memory = f"{info['used_memory_human']} used"
    if limit := int(info.get("maxmemory", 0)):
        memory += f" of {info['maxmemory_human']} ({info['maxmemory_policy']})"
    aof = "AOF on" if int(info.get("aof_enabled", 0)) else "AOF off"
    facts = f"{where}: Redis {info['redis_version']}, {aof}, {memory}"
    noeviction = info.get("maxmemory_policy") == "noeviction"
    if limit and noeviction and int(info["used_memory"]) >= limit:
        return fail(
            CHECK,
            f"{facts}: Redis is full, and refuses new messages until it has room; raise "
            "maxmemory (CONFIG SET maxmemory, and in redis.conf)",
        )
    if aof == "AOF off":
        return warn(
            CHECK,
            f"{facts}: conversations since the last snapshot are lost if Redis stops; "
            "turn on appendonly (CONFIG SET appendonly yes, and in redis.conf)",
        )
    if limit and not noeviction:
        return warn(
            CHECK,
            f"{facts}: at the limit Redis evicts keys, conversations and pending turns among "
            "them; set maxmemory-policy noeviction (or raise maxmemory)",
        )
    return ok(CHECK, facts)
