"""The scale-out benchmark runs end to end (a quick run: a tiny model, real worker
processes, an embedded Redis) and reports both sections; its numbers are for the README,
not asserted here."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter

import pytest

from benchmarks import scale_out
from benchmarks.worker_process import WorkerProcess
from bot.jobs import pick_worker


def test_the_conversations_split_evenly_between_the_workers():
    ids = scale_out.conversations("two-16-0", 16, ["host:1:a", "host:2:b"])
    assert len(set(ids)) == 16
    owners = [pick_worker(c, ["host:1:a", "host:2:b"]) for c in ids]
    assert Counter(owners) == {"host:1:a": 8, "host:2:b": 8}
    assert owners[:2] == ["host:1:a", "host:2:b"]  # taking turns
    assert scale_out.conversations("all", 3, ["here"]) == ["all-0", "all-1", "all-2"]


def test_a_workers_loop_cpu_is_its_main_threads_alone(tmp_path):
    """Read from /proc: the CPU that the process's main thread spent, not its others'."""
    busy = "import threading, time\n" + "\n".join([
        "def spin(seconds):",
        "    end = time.thread_time() + seconds",
        "    while time.thread_time() < end: pass",
        "threading.Thread(target=spin, args=(1.0,)).start()",  # another thread's CPU
        "spin(0.5)",
        "time.sleep(30)",
    ])  # fmt: skip
    worker = WorkerProcess(env={}, log=tmp_path / "log")
    worker.argv = [sys.executable, "-c", busy]
    with worker:
        deadline = time.monotonic() + 20
        while worker.loop_cpu() < 0.5 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the other thread's second ends meanwhile
        assert 0.5 <= worker.loop_cpu() < 0.8


@pytest.mark.slow
def test_a_quick_run_writes_the_table_and_json(all_cores, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("REDIS_URL", raising=False)  # a Redis of the run's own
    assert scale_out.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "scale_out.json").read_text())
    plan = scale_out.QUICK
    answers = plan.workload.new_tokens

    assert report["machine"]["cores"] >= 1 and report["load_average_end"] >= 0
    assert [row["n"] for row in report["hop"]] == plan.hop_concurrency
    for row in report["hop"]:
        for side in (row["all"], row["gateway_worker"]):
            assert side["tok_s"] > 0 and 0 < side["ttft_p50"] <= side["latency_p95"]
            # min_new_tokens, saved with the model, holds in this process and in the worker
            assert side["shortest_answer"] == answers
            assert side["tokens"] == row["n"] * answers
        assert row["throughput_cost"] == pytest.approx(
            1 - row["gateway_worker"]["tok_s"] / row["all"]["tok_s"]
        )
        # Each way, a mean over the rounds' jobs and chunks: on one machine, milliseconds.
        assert 0 <= row["to_worker_ms"] < 1000 and 0 <= row["to_gateway_ms"] < 1000
        # The CPU beside the model: the gateway side's loops and Redis, and `--role all`'s loop.
        assert row["gateway_worker"]["cpu_s"] > 0 and row["all"]["cpu_s"] > 0
        assert row["hop_cpu_s"] == pytest.approx(
            row["gateway_worker"]["cpu_s"] - row["all"]["cpu_s"]
        )

    spread = report["spread"]
    if spread["left_out"] is None:  # a machine of 2 cores or more
        half = plan.spread // 2  # one worker is measured at half the load too
        assert spread["one"]["tokens_by_worker"] == [(plan.spread + half) * answers]
        assert len(spread["two"]["tokens_by_worker"]) == 2
        assert sum(spread["two"]["tokens_by_worker"]) == plan.spread * answers
        one, two = (spread[side]["by_n"][str(plan.spread)] for side in ("one", "two"))
        assert spread["ratio"] == pytest.approx(two["tok_s"] / one["tok_s"])
        one_at_half = spread["one"]["by_n"][str(half)]
        assert spread["bound"] == pytest.approx(2 * one_at_half["tok_s"] / one["tok_s"])
    out = capsys.readouterr().out
    assert out.startswith("Machine: ")
    assert "| N at once | all tok/s | gateway + worker tok/s |" in out
    assert "Two workers" in out
