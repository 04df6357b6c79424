"""Products of a row or two computed as a few rows, where oneDNN's kernels are faster so.

oneDNN picks a product's kernel by its input's row count, and on some CPUs the kernels for
one and two rows stream the weights slower than the one for a few more. Measured on 2 cores
of an AMD EPYC with AVX512-BF16, the packed products of Qwen2.5-0.5B's 24 layers and
output layer in bfloat16 (25 rounds, the row counts shuffled in each) took 40.9, 43.8,
35.4, 33.7 and 32.5 ms at 1, 2, 3, 4 and 5 rows (medians), and whole decode steps of 1 and
2 rows with their products computed at 4 rows took 0.94 and 0.82x the time (12 rounds,
alternating). Held to AVX2's kernels, in float32, the same machine took 1.13x longer at 4
rows than at 1. So it is measured at load, on the model's own weights: each row count up
to `MOST_ROWS` is computed at the count at or above it whose products took the least time,
where that is at least `MARGIN` less than its own.

The added rows are zeros and their outputs are dropped. The real rows get what the same
product gives them beside other rows, as in any batch (the kernel for one row may sum a
wide input in another order: a lone row's last bits become those a batch's rows get).
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from bot.packing import PackedLinear

logger = logging.getLogger(__name__)

MOST_ROWS = 4
MARGIN = 0.10
"""The gain a padded row count must show: the real ones measured were 18-23% (above), while
on an Intel Xeon with AMX, where 1 to 4 rows took 46.9, 45.7, 45.5 and 45.4 ms, a
measurement at load once chose 1 as 2, and lone steps with 1 computed as 4 took 1.02x the
time (alternating in one process): the pad and the slice cost more than they saved."""
ROUNDS = 5
MEASURED_BYTES = 256 * 2**20
"""The weights read per measurement: past a CPU's last-level cache, so they stream from
memory as a decode step's do. A model with fewer is left as it is (its weights stay in
the cache, where the kernels' speeds are another matter)."""


def pad_small_products(products: Sequence[PackedLinear]) -> dict[int, int]:
    """Measure the first of `products` (a model's, in its layers' order) that add up to
    `MEASURED_BYTES` at 1 to `MOST_ROWS` rows, and have every one compute the row counts
    that `fastest_rows` picks at those; that choice, by row count."""
    measured = _first_streamed(products)
    if measured is None:
        return {}
    rows_for = fastest_rows(_pass_times(measured))
    for product in products:
        product.computed_rows = rows_for
    if rows_for:
        chosen = ", ".join(f"{rows} as {computed}" for rows, computed in rows_for.items())
        logger.info("Products of a few rows computed as more, faster on this CPU: %s", chosen)
    return rows_for


def fastest_rows(times: dict[int, float]) -> dict[int, int]:
    """For each row count in `times` (a pass's time at it), the count at or above it that
    took the least time, where it took at least `MARGIN` less; only the counts that change."""
    rows_for = {}
    for rows, took in times.items():
        best = min((more for more in times if more >= rows), key=times.__getitem__)
        if times[best] < (1 - MARGIN) * took:
            rows_for[rows] = best
    return rows_for


def _first_streamed(products: Sequence[PackedLinear]) -> list[PackedLinear] | None:
    """The first products whose weights add up to `MEASURED_BYTES`; None if all do not."""
    total = 0
    for count, product in enumerate(products, 1):
        total += product.weight_bytes
        if total >= MEASURED_BYTES:
            return list(products[:count])
    return None


def _pass_times(products: list[PackedLinear]) -> dict[int, float]:
    """The median time of a pass over `products` at each row count, the counts shuffled
    in each round so that a host's drift falls on all of them alike."""
    dtype = products[0].dtype
    counts = list(range(1, MOST_ROWS + 1))
    inputs = {
        rows: {p.in_features: torch.zeros(rows, p.in_features, dtype=dtype) for p in products}
        for rows in counts
    }
    times: dict[int, list[float]] = {rows: [] for rows in counts}
    order = random.Random(0)  # the process's own random numbers are left as they were
    for _ in range(ROUNDS):
        order.shuffle(counts)
        for rows in counts:
            start = time.perf_counter()
            for product in products:
                product.compute(inputs[rows][product.in_features])
            times[rows].append(time.perf_counter() - start)
    return {rows: statistics.median(taken) for rows, taken in sorted(times.items())}
