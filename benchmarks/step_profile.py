"""Where a decode step's time goes: torch.profiler (CPU) over a few steps of our batcher with
the sweep's top N rows all decoding, after a warm-up.

It must hold whatever the batcher does inside, so it drives only `join` and `step`, and
sorts the profiler's events by what they are rather than by who called them. Each op's
time (its children's included) goes to the outermost op it runs in: matrix products,
attention, or cache work (joining, cutting and copying tensors); other ops apart. Sampling
is everything that runs inside `bot.sampling`, whose functions are wrapped in a profiler
range while the profile runs; attention, everything inside `StepLayout.attention`, wrapped
the same way; and our decode kernel's products (`DecodeKernel.product`, no op of torch's)
count as matrix products, its layer's small ops (`add_norm`, `rotate`, `silu_mul`) as
other ops. The step's time outside any op is Python (and whatever the
profiler does not see as an op, such as a compiled graph's own kernels).
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from types import ModuleType

from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

import bot.sampling
from benchmarks.workload import Plan, make_batcher, say, sweep_requests
from bot.batching import Batcher
from bot.decode_kernel import DecodeKernel
from bot.engine import Engine
from bot.ragged import StepLayout

CATEGORIES = ("matmul", "attention", "sampling", "cache", "other ops", "python")
WARM_STEPS = 3
ANSWER_TOKENS = 256
"""Every row's answer: long enough to decode through its joining, the warm-up and both
runs at the full plan's 16 rows (a row leaving would change what is measured)."""
STEP = "threadbot.step"  # the range around each profiled step
SAMPLING = "threadbot.sampling"
ATTENTION = "threadbot.attention"
KERNEL = "threadbot.decode_kernel"
LAYER_OPS = "threadbot.layer_ops"  # the kernel's norms, rotary embeddings and gates
RANGES = {SAMPLING: "sampling", ATTENTION: "attention", KERNEL: "matmul", LAYER_OPS: "other ops"}
KERNEL_METHODS = {"product": KERNEL, "add_norm": LAYER_OPS, "rotate": LAYER_OPS,
                  "silu_mul": LAYER_OPS}  # fmt: skip
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}
CACHE_WORK = {
    "aten::cat", "aten::stack", "aten::index", "aten::index_select", "aten::index_put_",
    "aten::index_copy_", "aten::copy_", "aten::clone", "aten::pad", "aten::constant_pad_nd",
    "aten::slice_scatter",
}  # fmt: skip


def step_profile(engine: Engine, plan: Plan) -> dict:
    """The step's time by category, at the sweep's top N, as ms per step and shares."""
    rows, steps = max(plan.concurrency), plan.profile_steps
    say(f"per-step profile: {rows} rows decoding, {steps} steps timed, {steps} profiled ...")
    with _answers_at_least(engine, ANSWER_TOKENS):
        batcher = make_batcher(engine, plan)
        for row, messages in enumerate(sweep_requests(plan)[:rows]):
            conversation = f"profile-{row}"
            batcher.join(row, messages, conversation=conversation, max_new_tokens=ANSWER_TOKENS)
        _until_all_decode(batcher, rows)
        for _ in range(WARM_STEPS):
            batcher.step()
        start = time.perf_counter()
        for _ in range(steps):
            batcher.step()
        step_ms = (time.perf_counter() - start) / steps * 1000
        with ExitStack() as ranges:
            ranges.enter_context(_in_range(bot.sampling, SAMPLING))
            ranges.enter_context(_method_in_range(StepLayout, "attention", ATTENTION))
            for method, label in KERNEL_METHODS.items():
                ranges.enter_context(_method_in_range(DecodeKernel, method, label))
            run = ranges.enter_context(profile(activities=[ProfilerActivity.CPU]))
            decoded = [_profiled_step(batcher) for _ in range(steps)]
        batcher.clear()
    totals = _breakdown(run.events())
    profiled_ms = sum(totals.values()) / steps / 1000
    return {
        "rows": rows,
        "rows_decoded": min(decoded),  # every row in every profiled step: `rows`
        "steps": steps,
        "step_ms": step_ms,  # without the profiler
        "profiled_step_ms": profiled_ms,
        "ms": {name: total / steps / 1000 for name, total in totals.items()},
        "share": {name: total / steps / 1000 / profiled_ms for name, total in totals.items()},
    }


@contextmanager
def _answers_at_least(engine: Engine, tokens: int) -> Iterator[None]:
    """No answer may end (its end token is held back) before `tokens`, for batchers made
    inside the block."""
    config = engine.model.generation_config
    before, config.min_new_tokens = config.min_new_tokens, tokens
    try:
        yield
    finally:
        config.min_new_tokens = before


def _until_all_decode(batcher: Batcher, rows: int) -> None:
    """Step until each of the `rows` requests has had its first token: all are decoding."""
    started: set[object] = set()
    while len(started) < rows:
        started |= {update.key for update in batcher.step()}


def _profiled_step(batcher: Batcher) -> int:
    """One step inside the STEP range; how many rows it advanced."""
    with record_function(STEP):
        return len(batcher.step())


def _breakdown(events: list[FunctionEvent]) -> dict[str, float]:
    """Microseconds by category over every STEP range."""
    totals = dict.fromkeys(CATEGORIES, 0.0)

    def visit(event: FunctionEvent, category: str | None) -> None:
        if category is None and event.name in RANGES:
            category = RANGES[event.name]
        elif category is None and "::" in event.name:  # an op (aten::, mkldnn::, …)
            category = _op_category(event.name)
        totals[category or "python"] += event.self_cpu_time_total
        for child in event.cpu_children:
            visit(child, category)

    for event in events:
        if event.name == STEP:
            visit(event, None)
    return totals


def _op_category(name: str) -> str:
    if "scaled_dot_product" in name or "attention" in name:
        return "attention"
    if name in MATMULS or "linear" in name:  # mkldnn's and oneDNN's packed linears too
        return "matmul"
    return "cache" if name in CACHE_WORK else "other ops"


@contextmanager
def _in_range(module: ModuleType, label: str) -> Iterator[None]:
    """While the block runs, every function `module` defines, its classes' methods
    included, runs inside a profiler range named `label`, wherever it is called from (the
    project's modules that imported one by name see the wrapped one too)."""
    patched: list[tuple[object, str, Callable]] = []
    own = {id(value) for value in vars(module).values() if _defined_in(value, module)}
    classes = [value for value in vars(module).values()
               if isinstance(value, type) and value.__module__ == module.__name__]  # fmt: skip
    package = module.__name__.partition(".")[0] + "."
    importers = [other for name, other in list(sys.modules.items()) if name.startswith(package)]
    for owner in [*importers, *classes]:
        for name, value in list(vars(owner).items()):
            method = owner in classes and _defined_in(value, module) and _wrappable(name)
            if id(value) in own or method:
                patched.append((owner, name, value))
                setattr(owner, name, _ranged(value, label))
    try:
        yield
    finally:
        for owner, name, value in patched:
            setattr(owner, name, value)


@contextmanager
def _method_in_range(owner: type, name: str, label: str) -> Iterator[None]:
    """While the block runs, `owner.name` runs inside a profiler range named `label`."""
    method = vars(owner)[name]
    setattr(owner, name, _ranged(method, label))
    try:
        yield
    finally:
        setattr(owner, name, method)


def _defined_in(value: object, module: ModuleType) -> bool:
    return inspect.isfunction(value) and value.__module__ == module.__name__


def _wrappable(name: str) -> bool:
    return not name.startswith("__") or name == "__call__"


def _ranged(function: Callable, label: str) -> Callable:
    @functools.wraps(function)
    def ranged(*args: object, **kwargs: object) -> object:
        with record_function(label):
            return function(*args, **kwargs)

    return ranged
