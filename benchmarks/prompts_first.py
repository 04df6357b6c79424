"""Prompts first, on and off: the realistic traffic (`benchmarks.traffic`) served with each
`PREFILL_FIRST_STEPS` value in turn, round after round in one process, at one arrival rate.

Whether running answers should sit out while prompts are read is a trade between the
prompts' first tokens and the answers' own time, and which side wins depends on the
machine: near its capacity the answers pay more. Timings on a shared machine drift, so the
values alternate, and each round compares them side by side. Writes
`prompts_first.json` (machine included) and prints a table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import sys

from benchmarks.machine import describe, headline
from benchmarks.serving import load_engine, pack
from benchmarks.traffic import CAPACITY_SAMPLES, arrival_rate, capacity_samples, realistic_traffic
from benchmarks.workload import FULL, QUICK, Plan, bench_arguments
from bot.device import on_own_thread
from bot.engine import Engine

REPORTED = (
    "idle_ttft",
    "ttft_p50",
    "ttft_p95",
    "p95_over_idle",
    "latency_p50",
    "max_in_flight",
    "finished",
    "requests",
)


def compare(engine: Engine, plan: Plan, values: list[int], rounds: int) -> dict:
    """Each round serves the same traffic once per value, in an order that alternates."""
    capacity = capacity_samples(engine, plan, CAPACITY_SAMPLES)
    results = []
    for round_ in range(rounds):
        order = values if round_ % 2 == 0 else values[::-1]
        for value in order:
            variant = dataclasses.replace(plan, prefill_first_steps=value)
            traffic = realistic_traffic(engine, variant, capacity)
            row = {key: traffic[key] for key in REPORTED}
            results.append({"round": round_, "prefill_first_steps": value, **row})
    capacity_rps = statistics.median(capacity)
    return {"capacity_rps": capacity_rps, "rate_rps": arrival_rate(capacity_rps), "runs": results}


def table(report: dict) -> str:
    lines = [
        headline(report["machine"]),
        "",
        "| round | PREFILL_FIRST_STEPS | TTFT idle s | TTFT p50 / p95 s | p95 / idle "
        "| answers' latency p50 s | most in flight |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        lines.append(
            f"| {run['round'] + 1} | {run['prefill_first_steps']} | {run['idle_ttft']:.2f} "
            f"| {run['ttft_p50']:.2f} / {run['ttft_p95']:.2f} | {run['p95_over_idle']:.1f} "
            f"| {run['latency_p50']:.1f} | {run['max_in_flight']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_arguments(__doc__, quick="a small run (a smoke test)")
    parser.add_argument("--values", type=int, nargs="+", default=[0, 2], metavar="STEPS")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.rounds < 1 or min(args.values) < 0:
        parser.error("--rounds must be at least 1, and every value 0 or more")
    logging.basicConfig(level=logging.WARNING)
    plan = QUICK if args.quick else FULL
    # On a thread of its own, as the service computes (`on_own_thread`).
    engine = on_own_thread(load_engine, args.model, plan.new_tokens)
    on_own_thread(pack, engine)
    report = {"machine": describe(engine.model.dtype), "plan": dataclasses.asdict(plan)}
    report |= on_own_thread(compare, engine, plan, args.values, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prompts_first.json").write_text(json.dumps(report, indent=2))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
