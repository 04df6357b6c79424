"""ConversationStore against a real Redis (embedded, or REDIS_URL); ids are unique per test."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from uuid import uuid4

import pytest
from lossy_proxy import lossy_redis
from redis.asyncio import Redis

from bot.types import ChatMessage, ConversationKey
from storage import keys
from storage.store import CUT_KEPT_S, ConversationStore


@pytest.fixture
async def conversation_id(redis_client: Redis) -> AsyncIterator[str]:
    conversation_id = str(ConversationKey("test", uuid4().hex, "C1", "T1"))
    yield conversation_id
    await redis_client.delete(keys.conversation(conversation_id))


def user(content: str) -> ChatMessage:
    return {"role": "user", "content": content}


def assistant(content: str) -> ChatMessage:
    return {"role": "assistant", "content": content}


def test_key_layout() -> None:
    assert keys.conversation("slack:T1:C1:17.5") == "threadbot:conversation:slack:T1:C1:17.5"
    assert keys.seen("discord", "42") == "threadbot:seen:discord:42"


async def test_round_trip_newest_last_keeps_unicode(
    store: ConversationStore, redis_client: Redis, conversation_id: str
) -> None:
    first = [{"role": "system", "content": "be brief"}, user("héllo 👋 日本語")]
    await store.append(conversation_id, *first)
    await store.append(conversation_id, assistant("こんにちは"))

    assert await store.load(conversation_id) == [*first, assistant("こんにちは")]
    raw = await redis_client.lrange(keys.conversation(conversation_id), 0, -1)
    assert "日本語" in raw[1]  # stored as UTF-8, not \u escapes


async def test_load_of_unknown_conversation_is_empty(
    store: ConversationStore, conversation_id: str
) -> None:
    assert await store.load(conversation_id) == []


async def test_append_nothing_creates_nothing(
    store: ConversationStore, redis_client: Redis, conversation_id: str
) -> None:
    await store.append(conversation_id)
    assert await redis_client.exists(keys.conversation(conversation_id)) == 0


async def test_the_cap_trims_to_two_thirds_and_the_front_then_stays(
    store: ConversationStore, conversation_id: str
) -> None:
    await store.append(conversation_id, *(user(f"m{i}") for i in range(6)))
    assert len(await store.load(conversation_id)) == 6  # at the cap of 6: nothing trimmed
    await store.append(conversation_id, user("m6"))
    assert await store.load(conversation_id) == [user(f"m{i}") for i in range(3, 7)]
    await store.append(conversation_id, user("m7"))
    await store.append(conversation_id, user("m8"))
    assert await store.load(conversation_id) == [user(f"m{i}") for i in range(3, 9)]


async def test_drop_oldest_keeps_the_newest_in_order(
    store: ConversationStore, conversation_id: str
) -> None:
    await store.append(conversation_id, user("a"), assistant("b"), user("c"), assistant("d"))
    await store.drop_oldest(conversation_id, 2)
    assert await store.load(conversation_id) == [user("c"), assistant("d")]


async def test_one_append_trims_and_expires(redis_client: Redis, conversation_id: str) -> None:
    store = ConversationStore(redis=redis_client, max_messages=2, ttl_seconds=60)
    await store.append(conversation_id, user("a"), assistant("b"), user("c"))
    assert await store.load(conversation_id) == [user("c")]  # two thirds of 2, at least 1
    assert 0 < await redis_client.ttl(keys.conversation(conversation_id)) <= 60


async def test_append_is_one_multi_exec(
    store: ConversationStore, redis_client: Redis, conversation_id: str
) -> None:
    names = ("multi", "exec", "rpush", "eval", "expire")

    async def calls() -> dict[str, int]:
        stats = await redis_client.info("commandstats")
        return {n: stats.get(f"cmdstat_{n}", {}).get("calls", 0) for n in names}

    before = await calls()
    await store.append(conversation_id, user("x"))
    after = await calls()
    # ">=" because REDIS_URL may be a server others use too.
    assert all(after[n] >= before[n] + 1 for n in names), (before, after)


async def test_ttl_is_refreshed_on_each_append(
    store: ConversationStore, redis_client: Redis, conversation_id: str
) -> None:
    key = keys.conversation(conversation_id)
    await store.append(conversation_id, user("a"))
    assert 3500 < await redis_client.ttl(key) <= 3600
    await redis_client.expire(key, 10)
    await store.append(conversation_id, assistant("b"))
    assert 3500 < await redis_client.ttl(key) <= 3600


async def test_malformed_entries_are_skipped_with_a_warning(
    store: ConversationStore,
    redis_client: Redis,
    conversation_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await store.append(conversation_id, user("ok 1"))
    bad = ["not json", "[1, 2]", '{"role": "robot", "content": "x"}', '{"role": "user"}']
    await redis_client.rpush(keys.conversation(conversation_id), *bad)
    await store.append(conversation_id, assistant("ok 2"))

    with caplog.at_level(logging.WARNING, logger="storage.store"):
        assert await store.load(conversation_id) == [user("ok 1"), assistant("ok 2")]
    warnings = [r for r in caplog.records if r.name == "storage.store"]
    assert len(warnings) == len(bad)


async def test_clear_empties_the_history_and_the_conversation_stays_known(
    store: ConversationStore, redis_client: Redis, conversation_id: str
) -> None:
    await store.append(conversation_id, user("a"))
    async with redis_client.pipeline(transaction=True) as pipe:
        store.queue_clear(pipe, conversation_id, at=2.5, message="T1:C1:1700000000.000200")
        await pipe.execute()
    assert await store.load(conversation_id) == []
    assert await redis_client.exists(keys.conversation(conversation_id)) == 0
    assert await store.exists(conversation_id)  # a reset thread is not read again
    assert 0 < await redis_client.ttl(keys.cleared(conversation_id)) <= 3600
    # Read back once the history expires, the thread leaves out what came before the reset.
    assert await store.cut(conversation_id) == (2.5, "T1:C1:1700000000.000200")
    assert await redis_client.ttl(keys.cut(conversation_id)) > CUT_KEPT_S - 5


async def test_forget_deletes_everything(
    store: ConversationStore, redis_client: Redis, conversation_id: str
) -> None:
    await store.append(conversation_id, user("a"))
    async with redis_client.pipeline(transaction=True) as pipe:
        store.queue_clear(pipe, conversation_id, at=1.0)
        await pipe.execute()
    await store.append(conversation_id, user("b"))
    async with redis_client.pipeline(transaction=True) as pipe:
        store.queue_forget(pipe, conversation_id, at=1.5, message="T1:C1:1700000000.000100")
        await pipe.execute()
    assert not await store.exists(conversation_id)
    assert (
        await redis_client.exists(keys.conversation(conversation_id), keys.cleared(conversation_id))
        == 0
    )
    cut = await store.cut(conversation_id)  # when, by which message: no more
    assert cut == (1.5, "T1:C1:1700000000.000100")


async def test_a_forgets_cut_outlives_the_conversation_after_it(
    store: ConversationStore, redis_client: Redis, conversation_id: str
) -> None:
    """Once the history expires the thread is read back whole, up to the cut: the cut is
    kept far longer than the history (a year at least), counted from its last message."""
    marker = keys.cut(conversation_id)
    async with redis_client.pipeline(transaction=True) as pipe:
        store.queue_forget(pipe, conversation_id, at=1.5)
        await pipe.execute()
    assert CUT_KEPT_S - 5 <= await redis_client.ttl(marker) <= CUT_KEPT_S
    assert store.ttl_seconds * 10 < CUT_KEPT_S
    await redis_client.expire(marker, 60)  # as if forgotten long ago
    await store.append(conversation_id, user("after the forget"))
    assert await redis_client.ttl(marker) > store.ttl_seconds  # still past the history
    assert await store.cut(conversation_id) == (1.5, "")


async def test_first_seen_once_per_platform_and_expires(
    store: ConversationStore, redis_client: Redis
) -> None:
    message_id = uuid4().hex
    assert await store.first_seen("slack", message_id, ttl_seconds=120)
    assert not await store.first_seen("slack", message_id, ttl_seconds=120)
    assert await store.first_seen("discord", message_id, ttl_seconds=120)
    assert 0 < await redis_client.ttl(keys.seen("slack", message_id)) <= 120
    await redis_client.delete(keys.seen("slack", message_id), keys.seen("discord", message_id))


async def test_rejects_non_positive_limits(redis_client: Redis) -> None:
    with pytest.raises(ValueError):
        ConversationStore(redis=redis_client, max_messages=0, ttl_seconds=60)


# --- writes whose reply was lost, sent again by the client's retry ---------------------


@asynccontextmanager
async def lossy_store(
    redis_url: str, tmp_path, lose: list[bytes]
) -> AsyncIterator[ConversationStore]:
    """A store whose Redis connection loses the reply to the first request holding each of
    `lose`, after Redis ran it (`lossy_redis`)."""
    async with lossy_redis(redis_url, tmp_path, lose) as (redis, proxy):
        yield ConversationStore(redis=redis, max_messages=50, ttl_seconds=3600)
    assert proxy.lost == lose


async def test_a_drop_whose_reply_was_lost_drops_only_what_was_asked(
    redis_client, redis_url, tmp_path, conversation_id
):
    store = ConversationStore(redis=redis_client, max_messages=50, ttl_seconds=3600)
    history = [user(str(n)) for n in range(10)]
    await store.append(conversation_id, *history)
    async with lossy_store(redis_url, tmp_path, [b"threadbot:conversation:"]) as lossy:
        await lossy.drop_oldest(conversation_id, 3)
    assert await store.load(conversation_id) == history[3:]


async def test_markers_whose_reply_was_lost_are_still_first(redis_url, tmp_path):
    """Set, but the reply lost and the call sent again: the caller is still the first
    (a message is not taken for a re-delivery, a press for a second one)."""
    message, place = uuid4().hex, {"answer": uuid4().hex}
    lose = [b"threadbot:seen:", b"threadbot:regenerated:"]
    async with lossy_store(redis_url, tmp_path, lose) as lossy:
        assert await lossy.first_seen("test", message)
        assert await lossy.first_regeneration("c", place)
        assert not await lossy.first_seen("test", message)  # and only the first
        assert not await lossy.first_regeneration("c", place)
