"""What every section of the benchmark shares: the plan, the requests, and serving them
through our queue with their times recorded."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bot.batching import Batcher
from bot.config import Settings
from bot.engine import Engine
from bot.kv_cache import PrefixCache
from bot.queue import Generation, Inference, InferenceQueue

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "in", "the", "thread"]
STEP_TOKENS = Settings.model_fields["max_step_tokens"].default


@dataclass
class Plan:
    concurrency: list[int]
    prompt_tokens: int
    new_tokens: int
    turns: int
    turn_tokens: int
    flood: int
    others: int
    traffic_requests: int  # Poisson arrivals, each a sweep-sized request
    trim_turns: int  # one conversation that outgrows `trim_budget`
    trim_turn_tokens: int
    trim_answer_tokens: int
    trim_budget: int  # the prompt's token budget (MAX_CONTEXT_TOKENS less the answer)
    profile_steps: int
    peer_rounds: int  # a lone stream, ours and llama.cpp's in turn (`serving.lone_rounds`)
    max_batch: int = Settings.model_fields["max_batch"].default  # the service's
    prefill_first_steps: int = Settings.model_fields["prefill_first_steps"].default


FULL = Plan([1, 4, 8, 16], prompt_tokens=200, new_tokens=64, turns=6, turn_tokens=60, flood=20,
            others=4, traffic_requests=100, trim_turns=30, trim_turn_tokens=60,
            trim_answer_tokens=32, trim_budget=2048, profile_steps=20, peer_rounds=3)  # fmt: skip
QUICK = Plan([1, 2], prompt_tokens=40, new_tokens=8, turns=2, turn_tokens=20, flood=4, others=2,
             traffic_requests=6, trim_turns=10, trim_turn_tokens=10, trim_answer_tokens=4,
             trim_budget=300, profile_steps=5, peer_rounds=2)  # fmt: skip


def bench_arguments(doc: str, *, quick: str) -> argparse.ArgumentParser:
    """A bench's command line, described by the first line of its module's `doc`, with
    the options every bench on our queue takes: --model, --quick (`quick` says what it
    runs) and --out."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--model", help="a model as MODEL takes it; unset: Qwen2.5-0.5B's shape")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return parser


def say(message: str) -> None:
    """A progress line for whoever waits on the run (stderr, so the table stays clean)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def service_kernels() -> Path | None:
    """Where the service builds its decode kernel (DATA_DIR/kernels), or None where
    DECODE_KERNEL=off: the bench packs weights as the service does."""
    return Settings(_env_file=None).kernel_folder


def user_message(tokens: int, seed: int) -> dict:
    """A user message of about `tokens` tokens, different for each seed."""
    words = [WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(tokens)]
    return {"role": "user", "content": f"Request {seed}: " + " ".join(words)}


def opening(plan: Plan, seed: int) -> list[dict]:
    """A conversation's first turn, a prompt of about `plan.prompt_tokens` tokens (the chat
    template adds about 20)."""
    return [user_message(plan.prompt_tokens - 20, seed)]


def sweep_requests(plan: Plan) -> list[list[dict]]:
    """The concurrency sweep's requests (its first N are the N-run)."""
    return [opening(plan, seed) for seed in range(max(plan.concurrency))]


def make_batcher(engine: Engine, plan: Plan, *, kv_cache_mb: int = 512) -> Batcher:
    return Batcher(
        engine=engine,
        max_batch=plan.max_batch,
        step_tokens=STEP_TOKENS,
        prefill_first_steps=plan.prefill_first_steps,
        prefix_cache=PrefixCache(kv_cache_mb * 2**20),
    )


# --- Times ---------------------------------------------------------------------------------


@dataclass
class Timing:
    """One request, in seconds from when it was sent."""

    first_token: float
    done: float


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def summary(timings: list[Timing], new_tokens: int) -> dict:
    makespan = max(timing.done for timing in timings)
    ttft = [timing.first_token for timing in timings]
    latency = [timing.done for timing in timings]
    return {
        "tok_s": len(timings) * new_tokens / makespan,
        "ttft_p50": percentile(ttft, 0.5),
        "ttft_p95": percentile(ttft, 0.95),
        "latency_p50": percentile(latency, 0.5),
        "latency_p95": percentile(latency, 0.95),
    }


# --- Serving through our queue ---------------------------------------------------------------


async def timed(generation: Generation, start: float) -> Timing:
    """Read `generation` to its end; its times from `start` (a `perf_counter` reading)."""
    first = None
    async for _chunk in generation:
        first = first or time.perf_counter() - start
    done = time.perf_counter() - start
    return Timing(first or done, done)


async def answered(
    batcher: Batcher, requests: list[tuple[str, str, list[dict]]]
) -> tuple[list[Timing], list[Generation]]:
    """All (user, conversation, messages) sent at once to our queue, each read to its end."""
    async with InferenceQueue(batcher=batcher, max_size=len(requests), timeout=3600) as queue:
        return await sent(queue, requests)


async def sent(
    queue: Inference, requests: list[tuple[str, str, list[dict]]]
) -> tuple[list[Timing], list[Generation]]:
    """All (user, conversation, messages) sent at once to `queue` (any `Inference`: ours,
    or a gateway's to its workers), each read to its end."""
    start = time.perf_counter()
    generations = [queue.submit(m, user=u, conversation=c) for u, c, m in requests]
    timings = await asyncio.gather(*(timed(g, start) for g in generations))
    return timings, generations


def queued(batcher: Batcher, requests: list[tuple[str, str, list[dict]]]) -> list[Timing]:
    """`answered`, run to its end from synchronous code: the times only."""
    return asyncio.run(answered(batcher, requests))[0]


def at_once(engine: Engine, plan: Plan, requests: list[list[dict]], name: str) -> list[Timing]:
    """`requests` sent together to a fresh batcher, each its own user's conversation
    (`name`-i): the sweep's N at once."""
    batch = [(f"user{i}", f"{name}-{i}", messages) for i, messages in enumerate(requests)]
    return queued(make_batcher(engine, plan), batch)
