"""The two ways of serving we measure ours against, both plain `generate`: the seed's loop
(one request at a time, in order) and the static-batch ceiling (all requests in one call)."""

from __future__ import annotations

import time

import torch
from transformers.generation.streamers import BaseStreamer

from benchmarks.workload import Timing, say
from bot.engine import Engine


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


def static_batch(engine: Engine, requests: list[list[dict]], new_tokens: int) -> dict:
    """What the machine does at best with these requests: one `generate` over all of them,
    left-padded, greedy, every answer forced to `new_tokens` (`min_new_tokens`); no request
    joins or leaves, so nothing is spent on scheduling."""
    start = time.perf_counter()
    engine.generate(requests)
    wall = time.perf_counter() - start
    return {"tok_s": len(requests) * new_tokens / wall, "wall_s": wall}
