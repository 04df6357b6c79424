"""The serving benchmark runs end to end (a quick run on the bundled model) and reports
every section; its numbers are for the README, not asserted here."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_a_quick_run_writes_the_table_json_and_plot(
    bundled_engine, bundled_cache, tmp_path, monkeypatch, capsys
):
    from benchmarks import serving

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "models").symlink_to(bundled_cache)  # converted once already
    monkeypatch.chdir(tmp_path)
    assert serving.main(["--model", "bundled", "--quick", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [row["n"] for row in report["sweep"]] == serving.QUICK.concurrency
    assert all(row["ours"]["tok_s"] > 0 and row["seed"]["tok_s"] > 0 for row in report["sweep"])
    turns = report["multi_turn"]["ours"]["prompt_tokens_by_turn"]
    assert len(turns) == serving.QUICK.turns and turns[1] > turns[0]
    assert len(report["fairness"]["others_first_token"]) == serving.QUICK.others
    assert report["roofline"]["ours_fraction"] > 0
    assert (tmp_path / "out" / "bench.png").stat().st_size > 10_000
    assert "| N | seed tok/s | ours tok/s |" in capsys.readouterr().out
