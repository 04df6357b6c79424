"""One turn at a time per conversation across processes: each process's ConversationLocks
stands for one process, on a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from processes import RedisServer
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from storage import keys
from storage.locks import ConversationLocks


async def until_true(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_turn_held_past_the_lease_term_keeps_others_out(redis_client: Redis):
    """The holder renews its lease while its turn runs (an answer takes longer than one
    term): another process's turn starts only once it is done."""
    conversation, order = uuid.uuid4().hex, []
    one, two = (ConversationLocks(redis=redis_client, lease_s=1.0) for _ in range(2))

    async def turn(locks: ConversationLocks, name: str, seconds: float) -> None:
        async with locks.hold(conversation):
            order.append(f"{name} starts")
            await asyncio.sleep(seconds)
            order.append(f"{name} ends")

    first = asyncio.create_task(turn(one, "first", 3.5))  # three terms and a half
    await until_true(lambda: "first starts" in order)
    assert await two.busy(conversation)
    await asyncio.gather(first, turn(two, "second", 0))
    assert order == ["first starts", "first ends", "second starts", "second ends"]
    assert not await one.busy(conversation)


async def test_the_lease_of_a_process_that_died_holding_it_runs_out(redis_client: Redis):
    conversation = uuid.uuid4().hex
    await redis_client.set(keys.turn_lock(conversation), "a dead process's token", px=300)
    locks = ConversationLocks(redis=redis_client)
    async with asyncio.timeout(5):
        async with locks.hold(conversation):
            assert await redis_client.pttl(keys.turn_lock(conversation)) > 1000  # ours now


async def test_idle_waits_for_a_turn_ending_elsewhere_but_not_past_its_bound(
    redis_client: Redis,
):
    conversation = uuid.uuid4().hex
    here, elsewhere = (ConversationLocks(redis=redis_client) for _ in range(2))

    holding = asyncio.Event()

    async def turn(seconds: float) -> None:
        async with elsewhere.hold(conversation):
            holding.set()
            await asyncio.sleep(seconds)

    ending = asyncio.create_task(turn(0.3))
    await asyncio.wait_for(holding.wait(), 5)
    assert await here.idle(conversation, within=10)
    assert ending.done()
    holding.clear()
    running = asyncio.create_task(turn(10))
    await asyncio.wait_for(holding.wait(), 5)
    assert not await here.idle(conversation, within=0.3)
    assert not running.done()
    running.cancel()  # the turn elsewhere is stopped: its lease goes with it
    with contextlib.suppress(asyncio.CancelledError):
        await running
    assert not await here.busy(conversation)


async def test_a_lease_whose_reply_was_lost_is_held_at_once(
    redis_client: Redis, redis_url: str, tmp_path
):
    """Its SET NX ran, the reply was lost and the client sent it again: the lease is this
    turn's, which goes on rather than waiting out its own lease (30 s)."""
    from lossy_proxy import lossy_redis

    conversation = uuid.uuid4().hex
    lose = [keys.turn_lock(conversation).encode()]
    async with lossy_redis(redis_url, tmp_path, lose) as (redis, proxy):
        locks = ConversationLocks(redis=redis, lease_s=30)

        async def turn() -> bool:
            async with locks.hold(conversation):
                return await redis.exists(keys.turn_lock(conversation)) == 1

        assert await asyncio.wait_for(turn(), 10)
        assert proxy.lost == lose
    assert not await redis_client.exists(keys.turn_lock(conversation))  # let go after


async def test_a_lease_taken_as_redis_failed_is_taken_up_by_the_next_turn(
    redis_client: Redis, redis_url: str, tmp_path
):
    """Its SET NX ran, but the reply was lost past the client's retries: the turn failed,
    and the lease it left kept the conversation's next turns out until it lapsed (30 s)."""
    from lossy_proxy import lossy_redis

    from storage.connection import Resilience

    conversation = uuid.uuid4().hex
    lose = [keys.turn_lock(conversation).encode()]
    async with lossy_redis(redis_url, tmp_path, lose, Resilience(0, health_check_s=0)) as (
        redis,
        proxy,
    ):
        locks = ConversationLocks(redis=redis, lease_s=30)
        with pytest.raises(RedisError):
            async with locks.hold(conversation):
                pass
        assert proxy.lost == lose and await redis_client.exists(keys.turn_lock(conversation))
        async with asyncio.timeout(2), locks.hold(conversation):
            pass
    assert not await redis_client.exists(keys.turn_lock(conversation))


async def test_a_lease_left_in_an_outage_is_taken_up_after_a_turn_that_redis_failed_too(
    tmp_path: Path,
):
    """The next turn came while Redis was still out: its failure forgot the lease left,
    and once Redis was back the conversation waited for that lease to lapse (30 s)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    conversation = uuid.uuid4().hex
    try:
        async with Redis.from_url(server.url, retry=Retry(NoBackoff(), 1)) as redis:
            locks = ConversationLocks(redis=redis, lease_s=30)
            async with locks.hold(conversation):
                server.kill()  # its release fails
            with pytest.raises(RedisError):
                async with locks.hold(conversation):
                    pass
            server.start()
            async with asyncio.timeout(2), locks.hold(conversation):
                pass
            assert not await redis.exists(keys.turn_lock(conversation))
    finally:
        server.kill()


@pytest.mark.parametrize("then", ["hold", "busy"])
async def test_a_lease_whose_release_failed_in_an_outage_is_let_go_of_once_redis_answers(
    tmp_path: Path, then: str
):
    """Redis was out (killed) as a turn ended, so its lease stayed in Redis: every later
    turn of the conversation, and Regenerate (`busy`), waited for it to lapse, where this
    process, which holds it, can let it go as soon as Redis answers again."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    conversation = uuid.uuid4().hex
    lease = keys.turn_lock(conversation)
    try:
        async with Redis.from_url(server.url, retry=Retry(NoBackoff(), 1)) as redis:
            locks = ConversationLocks(redis=redis, lease_s=30)
            async with locks.hold(conversation):
                server.kill()  # its release fails
            server.start()  # the same port and data: the lease is there still
            assert await redis.exists(lease)
            await redis.pexpire(lease, 4000)  # its term nearly out
            async with asyncio.timeout(2):  # not what is left of its term
                if then == "hold":
                    async with locks.hold(conversation):
                        # Taken up for a whole term, or another process could take it.
                        assert await redis.pttl(lease) > 20_000
                    assert not await redis.exists(lease)
                else:
                    assert not await locks.busy(conversation)
    finally:
        server.kill()


async def test_a_turn_starting_as_busy_lets_go_of_a_left_lease_holds_one_of_its_own(
    redis_client: Redis,
):
    """Regenerate's `busy` was letting go of a lease a failed release left, when a turn of
    the conversation began: the turn took that lease up (its token), and the release then
    deleted it, so the turn ran with no lease and another process's could run beside it."""
    locks = ConversationLocks(redis=redis_client, lease_s=10)
    conversation, left = uuid.uuid4().hex, "a-token-left-by-a-failed-release"
    lease = keys.turn_lock(conversation)
    await redis_client.set(lease, left, px=10_000)
    locks._unreleased[conversation] = (left, asyncio.get_running_loop().time() + 10)
    release, releasing, go = locks._release, asyncio.Event(), asyncio.Event()

    async def held_up(conversation: str, lock: object) -> None:
        releasing.set()
        await go.wait()
        await release(conversation, lock)

    locks._release = held_up  # type: ignore[method-assign]
    asking = asyncio.create_task(locks.busy(conversation))
    await releasing.wait()
    locks._release = release  # type: ignore[method-assign]
    inside, done = asyncio.Event(), asyncio.Event()

    async def turn() -> None:
        async with locks.hold(conversation):
            inside.set()
            await done.wait()

    running = asyncio.create_task(turn())
    await asyncio.sleep(0.3)  # it takes the left lease up here, if it may
    go.set()
    await asyncio.wait_for(asking, 5)
    await asyncio.wait_for(inside.wait(), 5)
    assert await redis_client.get(lease) not in (None, left)  # the turn's own lease
    done.set()
    await running
