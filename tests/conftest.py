"""Shared fixtures. Redis: REDIS_URL if set (tests never flush it), else one embedded server."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from storage.embedded import EmbeddedRedis
from storage.store import ConversationStore


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    with EmbeddedRedis(data_dir=tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def store(redis_client: Redis) -> ConversationStore:
    return ConversationStore(redis=redis_client, max_messages=6, ttl_seconds=3600)
