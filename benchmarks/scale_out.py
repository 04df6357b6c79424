"""Scale-out benchmark: what the Redis hop between a gateway and a worker costs, and what a
second worker adds.

    make bench-scale                                  # Qwen2.5-0.5B's shape, random weights
    .venv/bin/python -m benchmarks.scale_out --quick  # a tiny model, a small run

The same requests for every side, as `make bench` sends them: ~200-token prompts, each
answer forced to 64 tokens by the model's generation config (`min_new_tokens`, saved with
the random weights into a folder that every side loads as MODEL); the answers' actual
token counts are reported, and throughput is counted from them.

1. **The hop**, at 1 and 8 at once, using every core each: `--role all`'s answering
   (`bot.runtime.open_answering`: the inference queue over the batcher, the model loaded
   in this process) against a gateway's `JobQueue` in this process sending through Redis
   to one `threadbot run --role worker` process. Both are loaded, and they take turns
   round by round, never running together: while one side answers, the other's model is
   idle, so a change in the machine's other load falls on both alike. What the worker
   side pays beyond the model, this process's reading and Redis's own work, on the same
   cores, is the hop's cost. That difference is within the machine's noise, so the hop's
   time is also measured each way: the worker's `threadbot_job_wait_seconds` (a job's
   sending to its taking) and the gateway's `threadbot_chunk_delay_seconds` (a piece of
   an answer's writing to its reading), from the stream entries' Redis times.
2. **Two workers**, at 16 at once: one worker pinned to one core (`taskset`; torch then
   runs one thread) against it and a second pinned to another core, with 16 conversations
   that rendezvous hashing (`bot.jobs.pick_worker`) splits 8/8 between their names. Each
   worker's generated tokens are read from its /metrics: a worker with free rows also
   takes what waits in the other's stream, so the actual split is reported.

Redis is an embedded server of the run's own unless REDIS_URL is set (then it must be a
Redis no live worker uses: they would take the jobs). Prints the machine and the tables,
and writes `scale_out.json` to `--out`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from redis.asyncio import Redis
from transformers import AutoTokenizer

from benchmarks import workload
from benchmarks.machine import describe, headline
from benchmarks.serving import force_length, qwen_tokenizer_files, random_qwen
from benchmarks.worker_process import WorkerProcess
from benchmarks.workload import Plan, bench_arguments, opening, say, sent, summary
from bot.config import Settings
from bot.device import on_own_thread, pick_dtype
from bot.job_queue import JobQueue
from bot.jobs import pick_worker
from bot.metrics import Metrics
from bot.queue import Generation, Inference
from bot.runtime import open_answering
from storage.embedded import EmbeddedRedis

TIMEOUT_S = 900  # for a request, and for a worker to start taking jobs
GENERATED = "threadbot_generated_tokens_total"
TO_WORKER = "threadbot_job_wait_seconds"  # on the worker's /metrics
TO_GATEWAY = "threadbot_chunk_delay_seconds"  # on the gateway's
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


@dataclass(frozen=True)
class ScalePlan:
    workload: Plan  # the prompts, the answers' length, MAX_BATCH
    hop_concurrency: list[int]
    spread: int  # requests at once for one worker against two
    rounds: int  # each measurement's median is reported
    shape: dict = field(default_factory=dict)  # changes to Qwen2.5-0.5B's config


FULL = ScalePlan(workload.FULL, hop_concurrency=[1, 8], spread=16, rounds=3)
QUICK = ScalePlan(workload.QUICK, hop_concurrency=[2], spread=4, rounds=1, shape=TINY)


# --- The model and the settings ----------------------------------------------------------


def save_model(folder: Path, plan: ScalePlan) -> str:
    """Random weights in Qwen2.5-0.5B's shape (or the plan's), with the real tokenizer,
    saved where worker processes load them as MODEL."""
    say(f"building Qwen2.5-0.5B's shape with random weights, into {folder} ...")
    network = random_qwen(**plan.shape)
    force_length(network, plan.workload.new_tokens)
    network.save_pretrained(folder)
    AutoTokenizer.from_pretrained(qwen_tokenizer_files()).save_pretrained(folder)
    return str(folder)


def environment(plan: ScalePlan, model: str, work: Path, redis: str) -> dict[str, str]:
    """The settings every side runs with, as a worker's environment."""
    return {
        "REDIS_URL": redis,
        "MODEL": model,
        "MAX_NEW_TOKENS": str(plan.workload.new_tokens),
        "MAX_BATCH": str(plan.workload.max_batch),
        "REQUEST_TIMEOUT": str(TIMEOUT_S),
        "DATA_DIR": str(work / "data"),
    }


@contextmanager
def redis_url(work: Path) -> Iterator[str]:
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    with EmbeddedRedis(data_dir=work / "redis") as server:
        yield server.url


# --- Measuring ---------------------------------------------------------------------------


def conversations(prefix: str, n: int, workers: list[str]) -> list[str]:
    """`n` conversation ids that rendezvous hashing spreads evenly over `workers` (`n` a
    multiple of their number), taking turns."""
    share = n // len(workers)
    by_worker: dict[str, list[str]] = {worker: [] for worker in workers}
    candidates = (f"{prefix}-{k}" for k in range(1000 * n))
    while any(len(ids) < share for ids in by_worker.values()):
        conversation = next(candidates)  # each worker gets 1 in len(workers): never runs out
        ids = by_worker[str(pick_worker(conversation, workers))]
        if len(ids) < share:
            ids.append(conversation)
    return [ids[k] for k in range(share) for ids in by_worker.values()]


def served(timings: list[workload.Timing], generations: list[Generation]) -> dict:
    """The round's numbers, its throughput counted from the answers' actual lengths."""
    tokens = [generation.answer_tokens for generation in generations]
    return summary(timings, sum(tokens) / len(tokens)) | {
        "tokens": sum(tokens),
        "shortest_answer": min(tokens),
        "makespan_s": max(timing.done for timing in timings),
    }


async def warm_up(queue: Inference, plan: ScalePlan, prefix: str, workers: list[str]) -> None:
    """A request for each worker first, so that none pays its first calls' costs here."""
    warm = conversations(f"{prefix}-warm-up", len(workers), workers)
    await sent(queue, [("warm-up", c, opening(plan.workload, 999)) for c in warm])


@dataclass(frozen=True)
class Side:
    """A queue to send to, the workers behind it, and (where asked) the CPU seconds spent
    so far beside the model: the event loops, and Redis."""

    queue: Inference
    workers: list[str]
    cpu: Callable[[], Awaitable[float]] | None = None


async def measure(
    sides: dict[str, Side], plan: ScalePlan, concurrency: list[int]
) -> dict[str, dict[int, dict]]:
    """Each N's rounds, the sides taking turns round by round, so that the machine's other
    load falls on each alike; new conversations each round, so no KV cache is reused. Each
    side's median by N, and each round."""
    rounds: dict[str, dict[int, list[dict]]] = {label: {} for label in sides}
    for n in concurrency:
        for index in range(plan.rounds):
            for label, side in sides.items():
                say(f"  {label}: {n} at once, round {index + 1} of {plan.rounds} ...")
                ids = conversations(f"{label}-{n}-{index}", n, side.workers)
                requests = [(f"user{i}", c, opening(plan.workload, i)) for i, c in enumerate(ids)]
                spent = await side.cpu() if side.cpu else 0.0
                result = served(*await sent(side.queue, requests))
                if side.cpu:
                    result["cpu_s"] = await side.cpu() - spent
                rounds[label].setdefault(n, []).append(result)
    return {
        label: {n: median(each) | {"rounds": each} for n, each in by_n.items()}
        for label, by_n in rounds.items()
    }


def median(rounds: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


@asynccontextmanager
async def gateway(
    redis: Redis, workers: list[WorkerProcess], plan: ScalePlan, label: str
) -> AsyncIterator[tuple[JobQueue, list[str]]]:
    """A gateway's queue here, once `workers` take jobs (and no other live worker does), each
    warmed up; and the workers' names."""
    names = [await worker.name(redis, TIMEOUT_S) for worker in workers]
    queue = JobQueue(redis=redis, gateway=label, max_size=4 * plan.spread, timeout=TIMEOUT_S)
    async with queue:
        await warm_up(queue, plan, label, names)
        yield queue, names


async def hop_sides(plan: ScalePlan, env: dict[str, str], worker: WorkerProcess) -> dict:
    """`--role all`'s answering here and the gateway to `worker`, taking turns; the model
    here and the worker idle while the other side runs."""
    settings = Settings(_env_file=None, **{name.lower(): value for name, value in env.items()})
    async with (
        open_answering(settings, Metrics()) as answering,
        Redis.from_url(env["REDIS_URL"], decode_responses=True) as redis,
        gateway(redis, [worker], plan, "gateway_worker") as (queue, names),
    ):
        await warm_up(answering.queue, plan, "all", ["here"])
        sides = {
            "all": Side(answering.queue, ["here"], loop_cpu),
            "gateway_worker": Side(queue, names, beside_the_worker(redis, worker)),
        }
        results = {}
        for n in plan.hop_concurrency:
            before = await hop_times(queue, worker)
            measured = await measure(sides, plan, [n])
            results[n] = {label: by_n[n] for label, by_n in measured.items()}
            after = await hop_times(queue, worker)
            results[n]["legs_ms"] = {
                leg: 1000 * (after[leg][0] - before[leg][0]) / (after[leg][1] - before[leg][1])
                for leg in after
            }  # the mean of each leg over these rounds
        return results


async def loop_cpu() -> float:
    """This process's event loop's CPU seconds: the side's queue (`--role all`'s, or the
    gateway's), and sending and reading the requests."""
    return time.thread_time()  # the loop's thread, which calls it


def beside_the_worker(redis: Redis, worker: WorkerProcess) -> Callable[[], Awaitable[float]]:
    """The gateway side's CPU seconds beside the model: this process's loop, the worker's
    loop, and Redis (as its INFO counts them)."""

    async def cpu() -> float:
        info = await redis.info("cpu")
        redis_cpu = info["used_cpu_user"] + info["used_cpu_sys"]
        return await loop_cpu() + await asyncio.to_thread(worker.loop_cpu) + redis_cpu

    return cpu


async def hop_times(queue: JobQueue, worker: WorkerProcess) -> dict[str, tuple[float, float]]:
    """Each way's hop timings so far, (seconds in all, how many), from both /metrics."""
    parts = ("sum", "count")
    registry = queue.metrics.registry
    back = [registry.get_sample_value(f"{TO_GATEWAY}_{part}") or 0.0 for part in parts]
    to = [await asyncio.to_thread(worker.metric, f"{TO_WORKER}_{part}") for part in parts]
    return {"to_worker": (to[0], to[1]), "to_gateway": (back[0], back[1])}


async def spread_side(
    plan: ScalePlan, url: str, workers: list[WorkerProcess], label: str, concurrency: list[int]
) -> dict:
    """The gateway's numbers with `workers`, and the tokens each one generated for them."""
    async with (
        Redis.from_url(url, decode_responses=True) as redis,
        gateway(redis, workers, plan, label) as (queue, names),
    ):
        before = [await asyncio.to_thread(worker.metric, GENERATED) for worker in workers]
        results = await measure({label: Side(queue, names)}, plan, concurrency)
        after = [await asyncio.to_thread(worker.metric, GENERATED) for worker in workers]
    return {
        "by_n": results[label],
        "tokens_by_worker": [a - b for a, b in zip(after, before, strict=True)],
    }


# --- Sections ----------------------------------------------------------------------------


def hop(plan: ScalePlan, env: dict[str, str], work: Path) -> list[dict]:
    say("the hop: the model loaded here, and one worker process ...")
    with WorkerProcess(env=env, log=work / "worker-hop.log") as worker:
        result = asyncio.run(hop_sides(plan, env, worker))
    cores = len(os.sched_getaffinity(0))
    rows = []
    for n in plan.hop_concurrency:
        mine, theirs, legs = result[n]["all"], result[n]["gateway_worker"], result[n]["legs_ms"]
        # On cores that the model keeps busy, the CPU spent beside it is taken from it.
        hop_cpu = theirs["cpu_s"] - mine["cpu_s"]
        rows.append({
            "n": n, "all": mine, "gateway_worker": theirs,
            "throughput_cost": 1 - theirs["tok_s"] / mine["tok_s"],
            "ttft_cost_s": theirs["ttft_p50"] - mine["ttft_p50"],
            "to_worker_ms": legs["to_worker"], "to_gateway_ms": legs["to_gateway"],
            "hop_cpu_s": hop_cpu, "hop_cpu_share": hop_cpu / (cores * theirs["makespan_s"]),
        })  # fmt: skip
    return rows


def spread(plan: ScalePlan, env: dict[str, str], work: Path) -> dict:
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        return {"left_out": f"needs 2 cores; this process may use {len(cores)}"}
    with ExitStack() as workers:
        say(f"two workers: one worker on core {cores[0]} ...")
        first = workers.enter_context(
            WorkerProcess(env=env, log=work / "worker-core-a.log", core=cores[0])
        )
        # Also at half the load: what each of two workers batches, and so their bound.
        half = plan.spread // 2
        one = asyncio.run(spread_side(plan, env["REDIS_URL"], [first], "one", [half, plan.spread]))
        say(f"two workers: and a second on core {cores[1]} ...")
        second = workers.enter_context(
            WorkerProcess(env=env, log=work / "worker-core-b.log", core=cores[1])
        )
        two = asyncio.run(
            spread_side(plan, env["REDIS_URL"], [first, second], "two", [plan.spread])
        )
    mine, theirs = one["by_n"][plan.spread], two["by_n"][plan.spread]
    return {
        "n": plan.spread, "half": half, "cores": cores, "one": one, "two": two,
        "ratio": theirs["tok_s"] / mine["tok_s"],
        "bound": 2 * one["by_n"][half]["tok_s"] / mine["tok_s"],
        "left_out": None,
    }  # fmt: skip


# --- The report --------------------------------------------------------------------------


def table(report: dict) -> str:
    plan = report["plan"]
    lines = [
        headline(report["machine"]) + f"; {report['load_average_end']:.1f} at the end",
        "",
        f"The Redis hop: --role all against a gateway + 1 worker (every core each); "
        f"~{plan['prompt_tokens']}-token prompts, {plan['new_tokens']}-token answers, "
        f"the median of {plan['rounds']} round(s)",
        "",
        "| N at once | all tok/s | gateway + worker tok/s | throughput cost (goal < 2% at 8) "
        "| the hop's CPU, share of the cores' time | TTFT p50 all s "
        "| TTFT p50 gateway + worker s | TTFT cost ms (goal < 20) "
        "| the hop each way, ms: to the worker + back | shortest answer, tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["hop"]:
        mine, theirs = row["all"], row["gateway_worker"]
        lines.append(
            f"| {row['n']} | {mine['tok_s']:.1f} | {theirs['tok_s']:.1f} "
            f"| {row['throughput_cost']:.1%} | {row['hop_cpu_share']:.1%} "
            f"| {mine['ttft_p50']:.3f} | {theirs['ttft_p50']:.3f} "
            f"| {row['ttft_cost_s'] * 1000:.0f} "
            f"| {row['to_worker_ms']:.1f} + {row['to_gateway_ms']:.1f} "
            f"| {min(mine['shortest_answer'], theirs['shortest_answer']):.0f} |"
        )
    lines += ["", _spread(report["spread"])]
    return "\n".join(lines)


def _spread(result: dict) -> str:
    if result["left_out"]:
        return f"Two workers left out: {result['left_out']}"
    lines = [
        f"Two workers, each pinned to a core of its own ({result['cores']}), {result['n']} at once",
        "",
        "| workers | tok/s | TTFT p50 s | latency p95 s | tokens by worker |",
        "|---|---|---|---|---|",
    ]
    n, half = result["n"], result["half"]
    sides = (
        ("1", result["one"], n),
        ("2", result["two"], n),
        (f"1, {half} at once", result["one"], half),
    )
    for label, side, at_once in sides:
        numbers = side["by_n"][at_once]
        tokens = " / ".join(f"{tokens:.0f}" for tokens in side["tokens_by_worker"])
        lines.append(
            f"| {label} | {numbers['tok_s']:.1f} | {numbers['ttft_p50']:.2f} "
            f"| {numbers['latency_p95']:.1f} | {tokens if at_once == n else ''} |"
        )
    lines.append(
        f"\n2 workers / 1: {result['ratio']:.2f}x (goal ≥ 1.8x). Each of two workers batches "
        f"{half}, so they can give at most 2 x (one worker at {half}) / (one at {n}) = "
        f"{result['bound']:.2f}x: what a smaller batch costs, not the hop."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_arguments(__doc__, quick="a tiny model, a small run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # A SIGTERM unwinds as an exception does, so the workers are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    plan = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="threadbot-scale-out-") as folder:
        work = Path(folder)
        model = args.model or on_own_thread(save_model, work / "model", plan)
        report = {
            "machine": describe(getattr(torch, pick_dtype("auto", "cpu"))),
            "plan": {
                "prompt_tokens": plan.workload.prompt_tokens,
                "new_tokens": plan.workload.new_tokens,
                "max_batch": plan.workload.max_batch,
                "rounds": plan.rounds,
                "model": args.model or f"Qwen2.5-0.5B's shape {plan.shape}, random weights",
            },
        }
        with redis_url(work) as url:
            env = environment(plan, model, work, url)
            report["hop"] = hop(plan, env, work)
            report["spread"] = spread(plan, env, work)
    report["load_average_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_out.json").write_text(json.dumps(report, indent=2))
    print(table(report))
    say(f"wrote {args.out / 'scale_out.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
