"""Turn statistics on real Redis: the window, the trimming, percentiles on known data, and
numbers shared by every client that writes the same scope."""

from __future__ import annotations

import random
import time

import pytest
from redis.asyncio import Redis

from storage import keys
from storage.stats import Summary, TurnStats, nearest_rank

NOW = time.time()


def stats_for(redis: Redis, scope: str, **options) -> TurnStats:
    """Stats whose clock stands still at NOW, so windows are exact."""
    return TurnStats(redis=redis, scope=scope, clock=lambda: NOW, **options)


async def test_a_summary_counts_the_turns_and_tokens_of_the_window(redis_client, platform):
    stats = stats_for(redis_client, platform)
    await stats.record(1.5, 100, 20, at=NOW - 10)
    await stats.record(0.5, 40, 8)  # now
    await stats.record(2.5, 60, 12, at=NOW - 3000)
    assert await stats.summary() == Summary(
        turns=3, prompt_tokens=200, answer_tokens=40, p50_s=1.5, p95_s=2.5
    )


async def test_turns_older_than_the_window_are_not_counted(redis_client, platform):
    stats = stats_for(redis_client, platform)
    await stats.record(9.0, 1000, 100, at=NOW - 7200)  # beyond what is kept: trimmed on write
    await stats.record(3.0, 30, 3, at=NOW - 1800)
    await stats.record(1.0, 10, 1, at=NOW - 60)
    assert await redis_client.zcard(keys.turn_stats(platform)) == 2
    hour, quarter = await stats.summary(3600), await stats.summary(900)
    assert (hour.turns, hour.prompt_tokens, hour.answer_tokens) == (2, 40, 4)
    assert (quarter.turns, quarter.prompt_tokens, quarter.p95_s) == (1, 10, 1.0)


async def test_percentiles_are_the_nearest_rank_of_known_data(redis_client, platform):
    stats = stats_for(redis_client, platform)
    latencies = [float(seconds) for seconds in range(1, 101)]
    random.Random(7).shuffle(latencies)
    for index, latency in enumerate(latencies):
        await stats.record(latency, 1, 1, at=NOW - index)
    summary = await stats.summary()
    assert (summary.turns, summary.p50_s, summary.p95_s) == (100, 50.0, 95.0)


@pytest.mark.parametrize(
    "values, p50, p95",
    [([], None, None), ([0.2], 0.2, 0.2), ([1, 2, 3, 4], 2, 4), ([*range(1, 20), 99], 10, 19)],
)
def test_nearest_rank_on_small_samples(values, p50, p95):
    assert (nearest_rank(values, 50), nearest_rank(values, 95)) == (p50, p95)


async def test_two_clients_share_one_set_of_numbers(redis_url, redis_client, platform):
    """Every process writes the same key, so each one's summary covers them all."""
    other_client = Redis.from_url(redis_url, decode_responses=True)
    try:
        here, there = stats_for(redis_client, platform), stats_for(other_client, platform)
        await here.record(1.0, 10, 5)
        await there.record(1.0, 10, 5)  # the same numbers at the same time: still two turns
        assert (await here.summary()).turns == (await there.summary()).turns == 2
    finally:
        await other_client.aclose()


async def test_an_empty_window_has_no_percentiles(redis_client, platform):
    assert await stats_for(redis_client, platform).summary() == Summary(0, 0, 0, None, None)


async def test_the_set_is_bounded_and_expires(redis_client, platform):
    stats = stats_for(redis_client, platform, max_entries=3, keep_s=600)
    for index in range(5):
        await stats.record(float(index), 1, 1, at=NOW - 10 + index)
    summary = await stats.summary(600)
    assert (summary.turns, summary.p50_s) == (3, 3.0)  # the newest three: 2, 3, 4
    assert 0 < await redis_client.ttl(keys.turn_stats(platform)) <= 600


async def test_malformed_entries_are_skipped(redis_client, platform):
    stats = stats_for(redis_client, platform)
    await redis_client.zadd(keys.turn_stats(platform), {"not json": NOW, '{"a": 1}': NOW})
    await redis_client.zadd(keys.turn_stats(platform), {'["1", 2, 3, "x"]': NOW})
    await stats.record(2.0, 5, 6)
    assert await stats.summary() == Summary(1, 5, 6, 2.0, 2.0)


@pytest.mark.parametrize(
    "arguments, named",
    [
        ((-1.0, 1, 1), "latency_s"),
        ((float("nan"), 1, 1), "latency_s"),
        ((1.0, -1, 1), "token counts"),
        ((1.0, 1, 1, float("inf")), "Unix time"),
    ],
)
async def test_bad_records_are_refused_by_name(redis_client, platform, arguments, named):
    stats = stats_for(redis_client, platform)
    with pytest.raises(ValueError, match=named):
        await stats.record(*arguments)
    assert not await redis_client.exists(keys.turn_stats(platform))


@pytest.mark.parametrize("window_s", [0, -5, 3601])
async def test_a_window_beyond_what_is_kept_is_refused(redis_client, platform, window_s):
    with pytest.raises(ValueError, match="window_s"):
        await stats_for(redis_client, platform).summary(window_s)
