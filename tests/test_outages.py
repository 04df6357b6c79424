"""What counts as an outage that passes by itself (`is_outage`), on a real redis-server's
own refusals: such an error holds a turn for later and tells a new message to try again,
where any other fails the turn ("your message is saved", though it was not)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from storage.connection import open_redis
from storage.errors import is_outage
from storage.once import Once


async def refusal(client: Redis, once: Once) -> list[RedisError]:
    """What a plain write, a script's and a transaction's are refused with now."""

    async def in_a_transaction() -> None:
        async with client.pipeline(transaction=True) as pipe:
            pipe.set("threadbot:test", "1")
            await pipe.execute()

    refused = []
    writes = (client.set("threadbot:test", "1"), once.first("threadbot:test-once", 60),
              in_a_transaction())  # fmt: skip
    for write in writes:
        with pytest.raises(RedisError) as info:
            await write
        refused.append(info.value)
    return refused


async def test_a_full_disk_and_maxmemory_are_outages_in_commands_and_scripts(
    redis_server, tmp_path: Path
):
    async with Redis.from_url(redis_server.url, decode_responses=True) as client:
        once = Once(client)
        # A snapshot that cannot be written (as on a full disk): writes are refused, MISCONF.
        await client.config_set("save", "3600 1")
        await client.config_set("dir", "/proc")
        await client.bgsave()
        deadline = time.monotonic() + 10
        while (await client.info("persistence"))["rdb_last_bgsave_status"] != "err":
            assert time.monotonic() < deadline, "the snapshot did not fail"
            await asyncio.sleep(0.05)
        assert all(is_outage(error) for error in await refusal(client, once))
        # A start then goes on, as a running bot rides it out, not told it is a replica.
        async with open_redis(redis_url=redis_server.url, data_dir=tmp_path):
            pass
        await client.config_set("save", "")
        await client.config_set("maxmemory", "1")  # OOM
        assert all(is_outage(error) for error in await refusal(client, once))
        await client.config_set("maxmemory", "0")
        with pytest.raises(RedisError) as mistake:  # a mistake of ours is no outage
            await client.execute_command("HSET", "threadbot:test")
        assert not is_outage(mistake.value)
