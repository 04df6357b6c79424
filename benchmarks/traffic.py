"""Realistic traffic, the serving benchmark vLLM and TGI report: requests arrive one by one at
random (a Poisson process, seeded) at 70% of what our batcher sustains, rather than all at
once. Reports the time to first token under that load against the idle one (a request
alone), and whether every request was answered within REQUEST_TIMEOUT (none starved).

Beside it, what queueing alone costs (`queued_prompts`): each request's time to first
token from a machine that did nothing but read the prompts, one at a time in arrival
order, each as fast as when it is alone. Ours also writes the answers beside and between
the prompts, so it comes above that; a scheduler could come below it only by starving some
requests or by reading several prompts in one forward, which on 2 CPU cores saves little
(measured on an AMD EPYC, Qwen2.5-0.5B's shape in bfloat16: 256 tokens in one forward took
1.7x the time of 128, not 2x)."""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time

from benchmarks.workload import (
    Plan,
    Timing,
    at_once,
    make_batcher,
    opening,
    percentile,
    say,
    summary,
    sweep_requests,
    timed,
)
from bot.batching import Batcher
from bot.config import Settings
from bot.engine import Engine
from bot.queue import InferenceQueue, InferenceTimeout

LOAD = 0.7
"""Arrivals per second, as a share of the measured capacity."""
CAPACITY_SAMPLES = 3
"""Runs of the sweep's top N at once whose median is the capacity. A shared host's speed
drifts from minute to minute, and one run taken in a fast stretch once set a rate that
the host then could not serve (amx-bfloat16/bench-run6.json: p95 8.2x idle)."""
SEED = 12
IDLE_RUNS = 3
"""Requests sent alone before the traffic, and as many after it, for the idle time to
first token (the median of all): a shared host's speed drifts over the traffic's minutes,
and the idle time taken before it alone moved 0.92-1.27 s between runs on one host."""
REQUEST_TIMEOUT = Settings.model_fields["request_timeout"].default
"""A request not answered within the service's own timeout counts as starved."""

Request = tuple[str, str, list[dict]]  # user, conversation, messages


def arrival_rate(capacity_rps: float) -> float:
    """Requests a second that the traffic offers a machine serving `capacity_rps`."""
    return LOAD * capacity_rps


def capacity_samples(engine: Engine, plan: Plan, count: int) -> list[float]:
    """`count` runs of the sweep's top N requests at once, one after another: the requests
    a second each was served at."""
    requests = sweep_requests(plan)[: max(plan.concurrency)]
    return [
        summary(at_once(engine, plan, requests, f"capacity{run}"), plan.new_tokens)["tok_s"]
        / plan.new_tokens
        for run in range(count)
    ]


def realistic_traffic(engine: Engine, plan: Plan, capacity: list[float]) -> dict:
    """`plan.traffic_requests` sweep-sized requests at the `arrival_rate` of the median of
    the `capacity` samples (requests a second)."""
    capacity_rps = statistics.median(capacity)
    rate = arrival_rate(capacity_rps)
    gaps = random.Random(SEED).expovariate
    arrivals = list(itertools.accumulate(gaps(rate) for _ in range(plan.traffic_requests)))
    requests = _requests(plan, "traffic", plan.traffic_requests, seed=1000)
    batcher = make_batcher(engine, plan)
    before = _alone(batcher, plan, "before", seed=2000)
    say(
        f"realistic traffic: {len(requests)} requests arriving at {rate:.2f}/s "
        f"({LOAD:.0%} of {capacity_rps:.2f}/s), over about {arrivals[-1]:.0f} s ..."
    )
    results = asyncio.run(_arriving(batcher, requests, arrivals))
    alone = before + _alone(batcher, plan, "after", seed=2000 + IDLE_RUNS)
    idle = statistics.median(alone)
    finished = [timing for timing in results if timing is not None]
    if not finished:
        raise RuntimeError(f"no request was answered within {REQUEST_TIMEOUT} s")
    ttft = [timing.first_token for timing in finished]
    latency = [timing.done for timing in finished]
    p95 = percentile(ttft, 0.95)
    queued = percentile(queued_prompts(arrivals, idle), 0.95)
    ends = [
        at + (timing.done if timing else REQUEST_TIMEOUT)
        for at, timing in zip(arrivals, results, strict=True)
    ]
    in_flight = in_flight_at_arrivals(arrivals, ends)
    return {
        "requests": len(requests),
        "seed": SEED,
        "capacity_rps": capacity_rps,
        "capacity_samples_rps": capacity,
        "load": LOAD,
        "rate_rps": rate,
        "prompt_tokens": plan.prompt_tokens,
        "new_tokens": plan.new_tokens,
        "idle_ttft": idle,
        "idle_ttfts": alone,  # before the traffic, then after it
        "ttft_p50": percentile(ttft, 0.5),
        "ttft_p95": p95,
        "p95_over_idle": p95 / idle,
        "queued_p95": queued,
        "queued_over_idle": queued / idle,
        "p95_over_queued": p95 / queued,
        "latency_p50": percentile(latency, 0.5),
        "latency_p95": percentile(latency, 0.95),
        "latency_max": max(latency),
        "timeout_s": REQUEST_TIMEOUT,
        "finished": len(finished),
        "all_finished": len(finished) == len(requests),
        "max_batch": plan.max_batch,
        "max_in_flight": max(in_flight) + 1,  # the busiest arrival, itself included
        # These wait for a row to free before their prompt is read.
        "arrived_at_full_batch": sum(count >= plan.max_batch for count in in_flight),
    }


def queued_prompts(arrivals: list[float], service: float) -> list[float]:
    """Each arrival's time to first token when one server reads the prompts in arrival
    order, `service` seconds each and nothing else: its wait (Lindley's recursion, from
    the previous arrival's wait and the gap between them) plus its own reading."""
    waits = [0.0]
    for gap in (later - earlier for earlier, later in itertools.pairwise(arrivals)):
        waits.append(max(0.0, waits[-1] + service - gap))
    return [wait + service for wait in waits]


def in_flight_at_arrivals(arrivals: list[float], ends: list[float]) -> list[int]:
    """For each request, how many of those before it were still being answered when it
    arrived (request i runs from `arrivals[i]` to `ends[i]`; arrivals in order)."""
    return [sum(end > at for end in ends[:i]) for i, at in enumerate(arrivals)]


def _alone(batcher: Batcher, plan: Plan, name: str, *, seed: int) -> list[float]:
    """The times to first token of `IDLE_RUNS` requests, each sent alone."""
    say(f"realistic traffic: time to first token of {IDLE_RUNS} requests, each alone ({name}) ...")
    requests = _requests(plan, name, IDLE_RUNS, seed=seed)
    return [asyncio.run(_first_token(batcher, request)) for request in requests]


def _requests(plan: Plan, name: str, count: int, *, seed: int) -> list[Request]:
    """`count` sweep-sized requests, each from its own user in its own conversation."""
    return [(f"{name}{i}", f"{name}-{i}", opening(plan, seed + i)) for i in range(count)]


async def _first_token(batcher: Batcher, request: Request) -> float:
    """Seconds from sending `request` to an idle queue to its first text; then it is stopped."""
    user, conversation, messages = request
    async with InferenceQueue(batcher=batcher, max_size=1, timeout=REQUEST_TIMEOUT) as queue:
        sent = time.perf_counter()
        generation = queue.submit(messages, user=user, conversation=conversation)
        async for _chunk in generation:
            break
        first = time.perf_counter() - sent
        generation.cancel()
        return first


async def _arriving(
    batcher: Batcher, requests: list[Request], arrivals: list[float]
) -> list[Timing | None]:
    """Each request sent at its arrival (seconds from the start); its times from then on,
    or None if it timed out."""
    finished = 0
    async with InferenceQueue(
        batcher=batcher, max_size=len(requests), timeout=REQUEST_TIMEOUT
    ) as queue:
        start = time.perf_counter()

        async def send(request: Request, at: float) -> Timing | None:
            nonlocal finished
            await asyncio.sleep(max(start + at - time.perf_counter(), 0.0))
            user, conversation, messages = request
            sent = time.perf_counter()
            try:
                timing = await timed(
                    queue.submit(messages, user=user, conversation=conversation), sent
                )
            except InferenceTimeout:
                return None
            finished += 1
            if finished % 10 == 0 or finished == len(requests):
                elapsed = time.perf_counter() - start
                say(f"  traffic: {finished}/{len(requests)} answered at {elapsed:.0f} s")
            return timing

        sends = (send(request, at) for request, at in zip(requests, arrivals, strict=True))
        return await asyncio.gather(*sends)
