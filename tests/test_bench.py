"""The serving benchmark runs end to end (a quick run on the bundled model) and reports
every section; its numbers are for the README, not asserted here. The peer (llama.cpp's
server) is an outside program: its columns are checked with a stand-in for it."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
import torch
from conftest import data_dir_with

from bot import decode_kernel
from bot.device import cpu_has


@pytest.fixture
def bench_dir(bundled_cache, tmp_path, monkeypatch):
    """A folder to run the bench in, where the bundled model loads converted already."""
    data_dir_with(bundled_cache, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_a_quick_run_writes_the_table_json_and_plot(bundled_engine, bench_dir, capsys, monkeypatch):
    from benchmarks import serving

    _stand_in_peer(monkeypatch, lambda module, *args, **kwargs: _StandInPeer([], tok_s=40.0))
    out = bench_dir / "out"
    argv = ["--model", "bundled", "--quick", "--peer", "llamacpp", "--out", str(out)]
    assert serving.main(argv) == 0
    report = json.loads((out / "bench.json").read_text())
    plan = serving.QUICK

    assert set(report["machine"]["flags"]) == {"avx2", "avx512_bf16", "amx_bf16"}
    assert report["machine"]["dtype"] in {"float32", "bfloat16"}
    assert report["machine"]["cores"] >= 1 and report["machine"]["load_average"] >= 0
    assert [row["n"] for row in report["sweep"]] == plan.concurrency
    for row in report["sweep"]:
        assert row["ours"]["tok_s"] > 0 and row["seed"]["tok_s"] > 0
        assert row["ceiling"]["tok_s"] > 0
        assert row["ours_vs_ceiling"] == pytest.approx(
            row["ours"]["tok_s"] / row["ceiling"]["tok_s"]
        )
        assert row["ours_vs_llamacpp"] == pytest.approx(row["ours"]["tok_s"] / (40.0 * row["n"]))
    peer = report["peer"]
    assert (peer["name"], peer["left_out"], len(peer["lone"]["rounds"])) == (
        "llama.cpp", None, plan.peer_rounds
    )  # fmt: skip

    traffic = report["traffic"]
    assert (
        traffic["all_finished"]
        and traffic["finished"] == traffic["requests"] == plan.traffic_requests
    )
    assert 0 < traffic["rate_rps"] < traffic["capacity_rps"]
    samples = traffic["capacity_samples_rps"]  # the sweep's own, then fresh runs
    swept = report["sweep"][-1]["ours"]["tok_s"] / plan.new_tokens
    assert len(samples) == 3 and samples[0] == swept
    assert traffic["capacity_rps"] == statistics.median(samples)
    assert traffic["idle_ttft"] > 0 and traffic["ttft_p50"] <= traffic["ttft_p95"]
    idle = traffic["idle_ttfts"]  # as many taken after the traffic as before it
    assert len(idle) == 6 and traffic["idle_ttft"] == statistics.median(idle)
    assert traffic["ttft_p95"] <= traffic["latency_max"]
    assert traffic["queued_p95"] >= traffic["idle_ttft"]  # queueing adds to a prompt's own time
    assert traffic["p95_over_queued"] == pytest.approx(traffic["ttft_p95"] / traffic["queued_p95"])
    assert 1 <= traffic["max_in_flight"] <= traffic["requests"]
    assert 0 <= traffic["arrived_at_full_batch"] < traffic["requests"]

    trim = report["trim_reuse"]
    assert trim["model"] == "bundled"  # --model's, as every section's
    turns = trim["by_turn"]
    assert len(turns) == plan.trim_turns and trim["trims"] >= 1  # the conversation overflowed
    assert turns[0]["reused"] == 0 and any(turn["reused"] > 0 for turn in turns[1:])
    assert trim["reusing"] == sum(turn["reused"] >= 0.8 * turn["prompt_tokens"] for turn in turns)
    assert trim["reusing"] >= 1 and 1 <= trim["since_first_trim"]["turns"] < len(turns)

    profile = report["profile"]
    assert profile["rows"] == profile["rows_decoded"] == max(plan.concurrency)
    assert sum(profile["share"].values()) == pytest.approx(1)
    assert all(0 <= share <= 1 for share in profile["share"].values())
    for category in ("matmul", "attention", "sampling", "python"):
        assert profile["ms"][category] > 0, category

    turns = report["multi_turn"]["ours"]["prompt_tokens_by_turn"]
    assert len(turns) == plan.turns and turns[1] > turns[0]
    assert len(report["fairness"]["others_first_token"]) == plan.others
    assert report["roofline"]["ours_fraction"] > 0
    # Rows computed at more rows, where measured faster (`bot.row_padding`): up to 4.
    assert all(int(rows) < more <= 4 for rows, more in report["padded_rows"].items())
    # Our decode kernel, where it serves and builds (a C compiler), as the service has it:
    # its products but where AMX multiplies bfloat16, and a layer's small ops in bfloat16.
    dtype = getattr(torch, report["machine"]["dtype"])
    kernel = decode_kernel.wanted(dtype) and shutil.which("cc") is not None
    amx = dtype == torch.bfloat16 and cpu_has("amx_tile")
    assert (report["kernel_products"] > 0) == (kernel and not amx)
    assert report["kernel_small_ops"] == (kernel and dtype == torch.bfloat16)
    assert (out / "bench.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert out.startswith("Machine: ")
    assert "| N | seed tok/s | ours tok/s | ratio | ceiling tok/s | ours / ceiling |" in out
    assert "| llama.cpp tok/s | ours / llama.cpp |" in out
    assert "A lone stream, ours and llama.cpp's in turn (2 rounds): " in out
    for section in ("Realistic traffic:", "Trim reuse:", "| a decode step of 2 rows"):
        assert section in out


@pytest.mark.slow
def test_prompts_first_alternates_its_values_round_by_round(bundled_engine, bench_dir, capsys):
    """`python -m benchmarks.prompts_first`: the same traffic with each PREFILL_FIRST_STEPS
    value, in turn, the order reversed every other round; each value reaches the batcher."""
    from dataclasses import replace

    from benchmarks import prompts_first
    from benchmarks.workload import QUICK, make_batcher

    off = make_batcher(bundled_engine, replace(QUICK, prefill_first_steps=0))
    assert off.prefill_first_steps == 0
    out = bench_dir / "out"
    argv = ["--model", "bundled", "--quick", "--rounds", "2", "--out", str(out)]
    assert prompts_first.main(argv) == 0
    report = json.loads((out / "prompts_first.json").read_text())

    assert report["machine"]["cores"] >= 1 and report["plan"]["traffic_requests"] == 6
    assert 0 < report["rate_rps"] < report["capacity_rps"]
    runs = report["runs"]
    assert [(run["round"], run["prefill_first_steps"]) for run in runs] == [
        (0, 0), (0, 2), (1, 2), (1, 0)
    ]  # fmt: skip
    for run in runs:
        assert run["finished"] == run["requests"] == QUICK.traffic_requests
        assert run["idle_ttft"] > 0 and run["ttft_p50"] <= run["ttft_p95"]
    printed = capsys.readouterr().out
    assert printed.startswith("Machine: ") and "| 2 | 0 |" in printed  # round 2, value 0
    with pytest.raises(SystemExit):
        prompts_first.main(["--rounds", "0"])  # refused before any model is loaded


@pytest.mark.parametrize(
    ("arrivals", "expected"),
    [
        ([0, 5, 10], [1, 1, 1]),  # each prompt read before the next arrives: no wait
        ([0, 0, 0], [1, 2, 3]),  # together: each waits for those before it
        ([0, 0.5, 4], [1, 1.5, 1]),  # the second waits out the first's rest; the queue empties
    ],
)
def test_queued_prompts_wait_for_the_ones_before_them(arrivals, expected):
    from benchmarks.traffic import queued_prompts

    assert queued_prompts(arrivals, service=1.0) == pytest.approx(expected)


def test_in_flight_counts_the_earlier_requests_still_running_at_each_arrival():
    from benchmarks.traffic import in_flight_at_arrivals

    # The second arrives during the first; the third after the first ended, during the second.
    assert in_flight_at_arrivals([0, 1, 3], ends=[2, 5, 4]) == [0, 1, 1]
    assert in_flight_at_arrivals([0, 0, 0], ends=[1, 1, 1]) == [0, 1, 2]


def _sweep_rows(concurrency: list[int]) -> list[dict]:
    timing = {
        "tok_s": 10.0,
        "ttft_p50": 1.0,
        "ttft_p95": 2.0,
        "latency_p50": 3.0,
        "latency_p95": 4.0,
    }
    return [
        {"n": n, "seed": timing, "ours": timing | {"tok_s": 20.0 * n}, "ratio": 2.0 * n,
         "ceiling": {"tok_s": 25.0 * n, "wall_s": 1.0}, "ours_vs_ceiling": 0.8,
         "seed_peak_rss": 2**30, "ours_peak_rss": 2**30}
        for n in concurrency
    ]  # fmt: skip


class _Engine:
    """What the peer's wiring reads of an engine: its model, tokenizer and prompt ids."""

    model, tokenizer = object(), object()

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return [len(message["content"]) for message in messages]


class _StandInPeer:
    """What `benchmarks.llamacpp.prepare_peer` makes, without llama.cpp (whose build and runs
    take minutes: tests/test_llamacpp.py runs them): each request answered at `tok_s`."""

    def __init__(self, calls: list, tok_s: float) -> None:
        self.calls, self.tok_s = calls, tok_s

    def run(self, prompts: list[list[int]], new_tokens: int) -> list:
        from benchmarks.llamacpp import Timing

        self.calls.append(("run", prompts))
        return [Timing(0.5, new_tokens / self.tok_s, new_tokens) for _ in prompts]


def _stand_in_peer(monkeypatch, prepare_peer) -> None:
    """The real `benchmarks.llamacpp`, with `prepare_peer` replaced by the given one."""
    from benchmarks import llamacpp

    monkeypatch.setattr(
        llamacpp, "prepare_peer", lambda *args, **kwargs: prepare_peer(llamacpp, *args, **kwargs)
    )


def test_trim_reuse_has_random_weights_answered_by_the_bundled_model_instead(
    bundled_engine, bench_dir
):
    """Random weights' answers do not survive being stored as text; a real model's do."""
    from benchmarks import serving

    conversing, name = serving.conversing(bundled_engine, None, serving.QUICK)
    assert "SmolLM2" in name and conversing is not bundled_engine
    assert type(conversing.model) is type(bundled_engine.model)  # SmolLM2's, loaded anew
    assert serving.conversing(bundled_engine, "a/model", serving.QUICK) == (
        bundled_engine,
        "a/model",
    )


def test_the_peer_runs_the_sweep_s_prompts_and_gets_its_columns(monkeypatch, tmp_path):
    from benchmarks import output, serving, workload

    calls = []

    def prepare_peer(module, model, tokenizer, **options):
        calls.append(("prepare", model, options["work_dir"]))
        return _StandInPeer(calls, tok_s=40.0)

    _stand_in_peer(monkeypatch, prepare_peer)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # not held to AVX2
    engine, plan = _Engine(), workload.QUICK
    rows = _sweep_rows(plan.concurrency)
    requests = [[{"role": "user", "content": "x" * length}] for length in (3, 5)]
    peer_run = serving.peer(engine, plan, requests, tmp_path)
    run = serving.add_peer(rows, peer_run)

    assert calls == [("prepare", engine.model, tmp_path), ("run", [[3]]), ("run", [[3], [5]])]
    assert run == {"name": "llama.cpp", "left_out": None, "built_for": "this machine"}
    assert [row["ours_vs_llamacpp"] for row in rows] == [0.5, 0.5]
    lines = output.sweep_table(rows, run).splitlines()
    assert "| llama.cpp tok/s | ours / llama.cpp |" in lines[0]
    assert "| 80.0 | 0.50 |" in lines[3] and "| 0.5 / 0.5 |" in lines[3]
    assert len({line.count("|") for line in lines}) == 1  # every row has every column


@pytest.mark.slow
def test_a_lone_stream_is_served_by_each_side_in_turn(bundled_engine, monkeypatch):
    """Ours and the peer take turns, the other side first every other round, on the
    sweep's first request; the ratio of each round, and their median, are reported."""
    from benchmarks import output, serving, workload

    plan, calls = workload.QUICK, []
    at_once = serving.at_once

    def ours(engine, plan, requests, name):
        calls.append(("ours", requests))
        return at_once(engine, plan, requests, name)

    monkeypatch.setattr(serving, "at_once", ours)
    request = serving.sweep_requests(plan)[0]
    lone = serving.lone_rounds(bundled_engine, plan, request, _StandInPeer(calls, tok_s=40.0))

    prompt = bundled_engine.prompt_ids(request)
    ours, peer = ("ours", [request]), ("run", [prompt])
    assert calls == [ours, peer, peer, ours]  # the other side first in the second round
    rounds = lone["rounds"]
    assert len(rounds) == plan.peer_rounds
    assert [r["first"] for r in rounds] == ["ours", output.PEER]
    for r in rounds:
        assert r[output.PEER] == pytest.approx(40.0) and r["ours"] > 0
        assert r["ratio"] == pytest.approx(r["ours"] / 40.0)
    assert lone["ratio_median"] == pytest.approx(sum(r["ratio"] for r in rounds) / 2)
    shown = output.sweep_table(_sweep_rows(plan.concurrency), {"lone": lone})
    assert "A lone stream, ours and llama.cpp's in turn (2 rounds): ours / llama.cpp " in shown
    assert f"{lone['ratio_median']:.2f} (median; " in shown


def test_a_peer_that_cannot_run_here_is_left_out_with_its_reason(monkeypatch, tmp_path):
    from benchmarks import output, serving, workload

    def prepare_peer(module, *args, **kwargs):
        raise module.PeerUnavailable("llama-cpp-python[server] could not be built")

    _stand_in_peer(monkeypatch, prepare_peer)
    rows = _sweep_rows(workload.QUICK.concurrency)
    peer_run = serving.peer(_Engine(), workload.QUICK, [[]], tmp_path)
    run = serving.add_peer(rows, peer_run)

    assert peer_run["served"] is None  # no lone rounds either

    assert run["left_out"] == "llama-cpp-python[server] could not be built"
    assert all(output.PEER not in row and "ours_vs_llamacpp" not in row for row in rows)
    table = output.sweep_table(rows, run)
    assert "llama.cpp tok/s" not in table
    assert table.endswith("llama.cpp left out: llama-cpp-python[server] could not be built")
