"""The inference queue: chunks stream out of the engine thread; bounds, timeouts, cancellation."""

from __future__ import annotations

import asyncio
import threading

import pytest
from conftest import SpyEngine

from bot.queue import InferenceCancelled, InferenceQueue, InferenceTimeout, QueueFull

HELLO = [{"role": "user", "content": "hello"}]


class GatedEngine:
    """Wraps a real engine; each call waits until the test opens the gate."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.gate = threading.Event()
        self.calls = 0

    def generate(self, conversations, **options):
        self.calls += 1
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        return self.engine.generate(conversations, **options)


async def collect(generation) -> list[str]:
    return [chunk async for chunk in generation]


async def test_chunks_stream_and_add_up_to_the_final_text(make_engine):
    engine = make_engine(max_new_tokens=12)
    async with InferenceQueue(engine=engine, max_size=4, timeout=60) as queue:
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        chunks = await collect(generation)
    assert len(chunks) > 1
    assert "".join(chunks) == generation.text == engine.generate([HELLO])[0]


async def test_requests_are_answered_in_arrival_order(make_engine):
    engine = make_engine(max_new_tokens=4)
    finished: list[str] = []

    async def ask(name: str, generation) -> None:
        await collect(generation)
        finished.append(name)

    async with InferenceQueue(engine=engine, max_size=4, timeout=60) as queue:
        requests = [queue.submit(HELLO, user=f"u{i}", conversation=f"c{i}") for i in range(3)]
        await asyncio.gather(*(ask(f"c{i}", g) for i, g in enumerate(requests)))
    assert finished == ["c0", "c1", "c2"]


async def test_a_full_queue_refuses_at_once_and_recovers(make_engine):
    gated = GatedEngine(make_engine(max_new_tokens=4))
    async with InferenceQueue(engine=gated, max_size=2, timeout=60) as queue:
        first = queue.submit(HELLO, user="u1", conversation="c1")
        second = queue.submit(HELLO, user="u2", conversation="c2")
        with pytest.raises(QueueFull):
            queue.submit(HELLO, user="u3", conversation="c3")
        gated.gate.set()
        await collect(first)
        await collect(second)
        third = queue.submit(HELLO, user="u3", conversation="c3")  # room again
        assert await collect(third)


async def test_timeout_stops_a_long_generation(make_engine):
    engine = make_engine(max_new_tokens=3000)  # far longer than the timeout allows
    spy = SpyEngine(engine)

    async with InferenceQueue(engine=spy, max_size=2, timeout=0.5) as queue:
        with pytest.raises(InferenceTimeout):
            await collect(queue.submit(HELLO, user="u1", conversation="c1"))
        engine.max_new_tokens = 4
        after = queue.submit(HELLO, user="u1", conversation="c1")  # the queue goes on serving
        assert await asyncio.wait_for(collect(after), timeout=60)
    stopped_early = len(engine.tokenizer(spy.answers[0]).input_ids)
    assert 0 < stopped_early < 1000


async def test_cancelling_while_waiting_skips_the_engine(make_engine):
    gated = GatedEngine(make_engine(max_new_tokens=4))
    async with InferenceQueue(engine=gated, max_size=4, timeout=60) as queue:
        running = queue.submit(HELLO, user="u1", conversation="c1")
        waiting = queue.submit(HELLO, user="u2", conversation="c2")
        waiting.cancel()
        gated.gate.set()
        await collect(running)
        with pytest.raises(InferenceCancelled):
            await collect(waiting)
        probe = queue.submit(HELLO, user="u3", conversation="c3")
        await collect(probe)
    assert gated.calls == 2  # the running one and the probe, never the cancelled one


async def test_engine_errors_reach_the_consumer(make_engine):
    class Broken:
        def generate(self, conversations, **options):
            raise RuntimeError("out of memory")

    async with InferenceQueue(engine=Broken(), max_size=2, timeout=60) as queue:
        with pytest.raises(RuntimeError, match="out of memory"):
            await collect(queue.submit(HELLO, user="u1", conversation="c1"))


async def test_closing_the_queue_stops_the_running_generation(make_engine):
    engine = make_engine(max_new_tokens=3000)  # would run for many seconds
    spy = SpyEngine(engine)

    async with InferenceQueue(engine=spy, max_size=2, timeout=60) as queue:
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        await anext(aiter(generation))  # it is running
    assert 0 < len(engine.tokenizer(spy.answers[0]).input_ids) < 1000
