"""The benchmark's report: its JSON shape, the tables it prints, and its plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.machine import headline

PEER = "llamacpp"  # the sweep rows' key for the peer's numbers
PROFILE_LABELS = {
    "matmul": "matrix products (mm, addmm, linear, bmm)",
    "attention": "attention (each conversation against its own keys, `bot.ragged`)",
    "sampling": "sampling (bot.sampling)",
    "cache": "cache work (cat, index, copy, pad)",
    "other ops": "other ops (norms, rotary, activations, …)",
    "python": "Python and other (outside any op)",
}


@dataclass
class Report:
    machine: dict
    sweep: list[dict] = field(default_factory=list)
    peer: dict = field(default_factory=dict)  # {"name", "left_out"}; empty when not asked for
    traffic: dict = field(default_factory=dict)
    trim_reuse: dict = field(default_factory=dict)
    profile: dict = field(default_factory=dict)
    multi_turn: dict = field(default_factory=dict)
    fairness: dict = field(default_factory=dict)
    roofline: dict = field(default_factory=dict)
    packed_layers: int = 0  # linear layers packed for oneDNN after the seed's run
    padded_rows: dict = field(default_factory=dict)  # as packing chose (`bot.row_padding`)
    kernel_products: int = 0  # packed products decode steps compute with our kernel
    kernel_small_ops: bool = False  # our kernel runs the layers' norms, rotary and gates


def table(report: Report) -> str:
    return "\n\n".join([
        headline(report.machine),
        sweep_table(report.sweep, report.peer),
        _traffic(report.traffic),
        _trim_reuse(report.trim_reuse),
        _profile(report.profile),
        _multi_turn(report.multi_turn),
        _fairness_and_roofline(report),
    ])  # fmt: skip


def sweep_table(rows: list[dict], peer_run: dict) -> str:
    """The concurrency sweep, with the peer's columns where it ran (`peer_run` says why not)."""
    peer = all(PEER in row for row in rows)
    columns = ["N", "seed tok/s", "ours tok/s", "ratio", "ceiling tok/s", "ours / ceiling"]
    if peer:
        columns += ["llama.cpp tok/s", "ours / llama.cpp"]
    columns += ["TTFT p50 / p95 s (seed)", "TTFT p50 / p95 s (ours)"]
    if peer:
        columns += ["TTFT p50 / p95 s (llama.cpp)"]
    columns += ["latency p95 s (seed / ours)", "peak RSS GiB (ours)"]
    lines = [_row(columns), "|" + "---|" * len(columns)]
    for row in rows:
        seed, ours, ceiling = row["seed"], row["ours"], row["ceiling"]
        cells = [
            f"{row['n']}", f"{seed['tok_s']:.1f}", f"{ours['tok_s']:.1f}", f"{row['ratio']:.1f}x",
            f"{ceiling['tok_s']:.1f}", f"{row['ours_vs_ceiling']:.2f}",
        ]  # fmt: skip
        if peer:
            cells += [f"{row[PEER]['tok_s']:.1f}", f"{row['ours_vs_llamacpp']:.2f}"]
        cells += [_pair(seed, "ttft_p50", "ttft_p95"), _pair(ours, "ttft_p50", "ttft_p95")]
        if peer:
            cells += [_pair(row[PEER], "ttft_p50", "ttft_p95")]
        cells += [
            f"{seed['latency_p95']:.1f} / {ours['latency_p95']:.1f}",
            f"{row['ours_peak_rss'] / 2**30:.2f}",
        ]
        lines.append(_row(cells))
    if lone := peer_run.get("lone"):
        lines.append("\n" + _lone_rounds(lone))
    if peer_run.get("left_out"):
        lines.append(f"\nllama.cpp left out: {peer_run['left_out']}")
    return "\n".join(lines)


def _lone_rounds(lone: dict) -> str:
    rounds = lone["rounds"]

    def spread(key: str, digits: int) -> str:
        values = sorted(r[key] for r in rounds)
        return f"{values[0]:.{digits}f}-{values[-1]:.{digits}f}"

    return (
        f"A lone stream, ours and llama.cpp's in turn ({len(rounds)} rounds): ours / llama.cpp "
        f"{lone['ratio_median']:.2f} (median; {spread('ratio', 2)}), ours {spread('ours', 1)} "
        f"tok/s, llama.cpp {spread(PEER, 1)}."
    )


def _traffic(traffic: dict) -> str:
    return "\n".join([
        f"Realistic traffic: {traffic['requests']} requests of ~{traffic['prompt_tokens']} "
        f"tokens with {traffic['new_tokens']}-token answers, Poisson arrivals at "
        f"{traffic['rate_rps']:.2f}/s ({traffic['load']:.0%} of the "
        f"{traffic['capacity_rps']:.2f}/s, the median of {len(traffic['capacity_samples_rps'])} "
        f"runs of the sweep's top N at once), seed {traffic['seed']}",
        "",
        "| TTFT idle s | TTFT p50 / p95 s | p95 / idle (goal ≤ 3) "
        "| prompts alone, queued: p95 / idle | p95 / queued alone | latency p50 / p95 / max s "
        f"| answered within {traffic['timeout_s']:.0f} s |",
        "|---|---|---|---|---|---|---|",
        f"| {traffic['idle_ttft']:.2f} | {_pair(traffic, 'ttft_p50', 'ttft_p95', 2)} "
        f"| {traffic['p95_over_idle']:.1f} | {traffic['queued_over_idle']:.1f} "
        f"| {traffic['p95_over_queued']:.2f} "
        f"| {traffic['latency_p50']:.1f} / {traffic['latency_p95']:.1f} / "
        f"{traffic['latency_max']:.1f} | {traffic['finished']}/{traffic['requests']} |",
        "",
        f"At most {traffic['max_in_flight']} requests were answered at once "
        f"(MAX_BATCH {traffic['max_batch']}); {traffic['arrived_at_full_batch']} arrived while "
        "the batch was full and waited for a row.",
    ])  # fmt: skip


def _trim_reuse(trim: dict) -> str:
    since = trim["since_first_trim"]
    return (
        f"Trim reuse: one conversation of {trim['turns']} turns ({trim['turn_tokens']}-token "
        f"messages, {trim['answer_tokens']}-token answers) within a {trim['budget']}-token "
        f"prompt budget: {trim['reusing']} of {trim['turns']} turns ({trim['share']:.0%}) took "
        f"≥ 80% of their prompt from the cache (goal ≥ 80%), {since['reusing']} of the "
        f"{since['turns']} from the first trim on; trims: {trim['trims']}, each told once. "
        f"Answered by {trim['model']}."
    )


def _profile(profile: dict) -> str:
    lines = [
        f"| a decode step of {profile['rows']} rows ({profile['steps']} profiled) | ms | share |",
        "|---|---|---|",
    ]
    for name, label in PROFILE_LABELS.items():
        lines.append(f"| {label} | {profile['ms'][name]:.1f} | {profile['share'][name]:.0%} |")
    lines.append(
        f"| the whole step (without the profiler: {profile['step_ms']:.1f} ms) "
        f"| {profile['profiled_step_ms']:.1f} | 100% |"
    )
    return "\n".join(lines)


def _multi_turn(turns: dict) -> str:
    lines = [
        "| turn | prompt tokens | TTFT s (KV reuse) | TTFT s (full prefill) |",
        "|---|---|---|---|",
    ]
    for index, ours in enumerate(turns["ours"]["ttft_by_turn"]):
        lines.append(
            f"| {index + 1} | {turns['ours']['prompt_tokens_by_turn'][index]:.0f} | {ours:.2f} "
            f"| {turns['full_prefill']['ttft_by_turn'][index]:.2f} |"
        )
    return "\n".join(lines)


def _fairness_and_roofline(report: Report) -> str:
    fair, roof = report.fairness, report.roofline
    others = ", ".join(f"{seconds:.1f}" for seconds in fair["others_first_token"])
    return (
        f"Fairness: others' first tokens at {others} s; "
        f"the flooder's 3rd message starts at {fair['flooder_third_starts']:.1f} s.\n"
        f"Roofline: {roof['weight_bytes'] / 1e9:.2f} GB of weights a token at "
        f"{roof['bandwidth_gb_s']:.1f} GB/s = at most {roof['ceiling_tok_s']:.1f} tok/s alone; "
        f"ours decodes {roof['ours_tok_s']:.1f} tok/s ({roof['ours_fraction']:.0%}), "
        f"plain generate {roof['seed_generate_tok_s']:.1f} tok/s."
    )


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _pair(numbers: dict, first: str, second: str, digits: int = 1) -> str:
    return f"{numbers[first]:.{digits}f} / {numbers[second]:.{digits}f}"


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ((left, right), (turns, fair)) = plt.subplots(2, 2, figsize=(11, 8))
    n = [row["n"] for row in report.sweep]
    sides = [("seed", "o--"), ("ours", "o-"), ("ceiling", "s:")]
    if all(PEER in row for row in report.sweep):
        sides.append((PEER, "^-."))
    for side, style in sides:
        left.plot(n, [row[side]["tok_s"] for row in report.sweep], style, label=side)
        if side != "ceiling":  # one `generate` call: no first token of its own to time
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
