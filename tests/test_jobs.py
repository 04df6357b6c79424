"""Gateway and workers on Redis Streams, in one process: the gateway's JobQueue and real
Workers over the tiny model's batcher, on real Redis. (tests/test_scale_out.py runs them
as separate processes, killed and restarted.)"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from conftest import GatedBatcher, SpyBatcher, answer_alone
from fake_openai import FakeOpenAI, Status
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

import bot.job_queue
import bot.worker
from bot.health import READY, Vitals
from bot.job_queue import ANSWER_READ_KEPT_S, WAKE_KEPT_S, JobQueue
from bot.jobs import Chunk, Job, JobFailed, RedisClock, entry_age, pick_worker
from bot.metrics import Metrics
from bot.openai_backend import OpenAIBackend
from bot.queue import AnswerRestarted, InferenceQueue, InferenceTimeout, QueueFull
from bot.worker import GROUP, LOST_AFTER_MS, Worker
from storage import keys
from storage.store import ConversationStore

HELLO = [{"role": "user", "content": "hello"}]
CLAIM_IDLE_S = 0.3


@asynccontextmanager
async def gateway(
    redis: Redis,
    *,
    max_size: int = 8,
    timeout: float = 60,
    metrics: Metrics | None = None,
    name: str = "gw-test",
) -> AsyncIterator[JobQueue]:
    async with JobQueue(
        redis=redis, gateway=name, max_size=max_size, timeout=timeout, metrics=metrics
    ) as queue:
        yield queue


@asynccontextmanager
async def worker(
    redis: Redis, batcher: Any, name: str, *, queue_max: int = 8, **options: Any
) -> AsyncIterator[Worker]:
    """A worker answering with `batcher` (`options` as `working_on` takes them), running
    for the block, then stopped."""
    async with (
        InferenceQueue(batcher=batcher, max_size=queue_max, timeout=60) as queue,
        working_on(redis, queue, name, rows=batcher.max_batch, **options) as working,
    ):
        yield working


@asynccontextmanager
async def working_on(
    redis: Redis,
    inference: Any,
    name: str,
    *,
    rows: int,
    max_deliveries: int = 3,
    metrics: Metrics | None = None,
    claim_idle_s: float = CLAIM_IDLE_S,
) -> AsyncIterator[Worker]:
    """A worker answering with `inference`, running for the block, then stopped."""
    working = Worker(
        redis=redis, inference=inference, name=name, rows=rows,
        claim_idle_s=claim_idle_s, max_deliveries=max_deliveries, metrics=metrics,
    )  # fmt: skip
    working.running = asyncio.create_task(working.run())  # type: ignore[attr-defined]
    await wait_until(lambda: redis.exists(keys.worker(name)))
    try:
        yield working
    finally:
        working.stop()
        await asyncio.gather(working.running, return_exceptions=True)
        await working.finish(0)


async def kill(working: Worker) -> None:
    """As a SIGKILL would: every task of the worker stops where it is, nothing acknowledged
    or handed back; its heartbeat goes (as it would lapse)."""
    await stop_all([working.running, *working._tasks])


async def crash(queue: JobQueue) -> None:
    """As a SIGKILL of a gateway would: its tasks stop where they are, nothing cancelled."""
    await stop_all(list(queue._tasks))


async def stop_all(tasks: list[asyncio.Task]) -> None:
    for _ in range(100):  # again where a cancel was swallowed (see `Worker`)
        for task in tasks:
            task.cancel()
        if (await asyncio.wait(tasks, timeout=0.05))[1] == set():
            return
    raise AssertionError("the tasks would not stop")


async def wait_until(condition, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.02)


async def read(generation) -> list[str]:
    return [chunk async for chunk in generation]


def test_each_conversation_keeps_its_worker_and_only_a_dead_ones_move():
    conversations = [f"slack:T:C:{n}" for n in range(200)]
    three = {c: pick_worker(c, ["w1", "w2", "w3"]) for c in conversations}
    two = {c: pick_worker(c, ["w1", "w3"]) for c in conversations}
    assert set(three.values()) == {"w1", "w2", "w3"}
    assert all(two[c] == three[c] for c in conversations if three[c] != "w2")
    assert pick_worker("slack:T:C:1", []) is None


async def test_a_worker_streams_the_answer_to_the_gateway(streams, make_batcher):
    batcher = make_batcher(max_new_tokens=12)
    async with gateway(streams) as queue, worker(streams, batcher, "w1"):
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        chunks = await read(generation)
        wake_kept = await streams.ttl(keys.gateway_wake("gw-test"))
    assert 0 < wake_kept <= WAKE_KEPT_S  # a crashed gateway's key goes too
    assert len(chunks) > 1
    assert "".join(chunks) == generation.text == answer_alone(batcher, HELLO)
    assert generation.answer_tokens > 0 and generation.queue_wait is not None
    [answer_stream] = [key async for key in streams.scan_iter(match=keys.job_chunks("*"))]
    assert 0 < await streams.ttl(answer_stream) <= ANSWER_READ_KEPT_S  # read, then let go
    assert await streams.xlen(keys.worker_jobs("w1")) == 0  # acknowledged and deleted


async def test_jobs_go_to_their_conversations_worker(streams, make_batcher):
    """Each worker answers exactly the conversations that hash to it."""
    one, two = (
        SpyBatcher(make_batcher(max_new_tokens=4)),
        SpyBatcher(make_batcher(max_new_tokens=4)),
    )
    conversations = [f"c{n}" for n in range(8)]
    async with gateway(streams) as queue, worker(streams, one, "w1"), worker(streams, two, "w2"):
        for conversation in conversations:
            question = [{"role": "user", "content": f"question of {conversation}"}]
            await read(queue.submit(question, user="u1", conversation=conversation))
    answered_by = {p[0]["content"].removeprefix("question of "): "w1" for p in one.prompts}
    answered_by |= {p[0]["content"].removeprefix("question of "): "w2" for p in two.prompts}
    assert answered_by == {c: pick_worker(c, ["w1", "w2"]) for c in conversations}
    assert one.prompts and two.prompts


class StallsAfterFirstStep(SpyBatcher):
    """Writes the first piece of an answer, then hangs: a worker dying mid-answer."""

    def __init__(self, batcher: Any) -> None:
        super().__init__(batcher)
        self.release = threading.Event()
        self.steps = 0

    def step(self) -> list:
        self.steps += 1
        if self.steps > 1:
            self.release.wait(timeout=30)
        return super().step()


async def test_a_dead_workers_job_is_answered_again_by_another(streams, make_batcher):
    stalled = StallsAfterFirstStep(make_batcher(max_new_tokens=12))
    healthy = make_batcher(max_new_tokens=12)
    async with gateway(streams) as queue, worker(streams, stalled, "dying") as dying:
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        first = await anext(aiter(generation))
        await kill(dying)
        async with worker(streams, healthy, "w2"):
            with pytest.raises(AnswerRestarted):
                await read(generation)
            again = await read(generation)
        stalled.release.set()
    assert first
    assert "".join(again) == generation.text == answer_alone(healthy, HELLO)


def jobs_for(conversations: int) -> list[Job]:
    return [
        Job(id=f"job{n}", conversation=f"c{n}", user="u1", messages=HELLO,
            max_new_tokens=None, temperature=None, deadline=time.time() + 60)
        for n in range(conversations)
    ]  # fmt: skip


async def tries(redis: Redis, job_id: str) -> set[int]:
    """The attempts that wrote to a job's answer: {1} for an answer written once."""
    return {
        Chunk.parse(fields).attempt for _, fields in await redis.xrange(keys.job_chunks(job_id))
    }


async def test_a_worker_is_starting_until_open_and_not_ready_once_stopping(streams, make_batcher):
    """Once a stop has begun (SIGTERM), through its grace period, its /readyz says so, as
    a gateway's does: it said ready until the process went. Starting, until then."""
    metrics = Metrics()
    vitals = Vitals(metrics=metrics, platforms=[])
    assert metrics.registry.get_sample_value("threadbot_loading") == 1
    async with worker(streams, make_batcher(), "w1") as working:
        vitals.working(working)
        assert metrics.registry.get_sample_value("threadbot_loading") == 0
        before = await vitals.readiness()
        working.stop()
        after = await vitals.readiness()
    assert set(before.values()) == {READY}
    assert after["service"] == "draining"


async def test_a_worker_takes_no_more_jobs_than_it_has_rows_free(streams, make_batcher):
    """Jobs wait in its own stream and in the shared one: with one row, it takes one, and
    the other once that one is answered."""
    jobs = jobs_for(2)
    for stream, job in zip((keys.worker_jobs("w1"), keys.JOBS), jobs, strict=True):
        await streams.xadd(stream, job.fields())
    stalled = StallsAfterFirstStep(make_batcher(max_batch=1))
    async with worker(streams, stalled, "w1") as working:
        await wait_until(lambda: asyncio.sleep(0, working._running))
        await asyncio.sleep(0.2)  # time to take a second job, if it would
        running = len(working._running)
        stalled.release.set()
        for job in jobs:  # both answered in the end
            await wait_until(lambda job=job: ended(streams, job.id))
    assert running == 1


async def test_jobs_with_one_entry_id_in_two_streams_are_each_answered_once(streams, make_batcher):
    """Entry ids are unique within a stream only: a gateway's jobs for two workers, added
    in one millisecond, share one. A worker that takes both keeps both running, each
    answered in one try, though their answers outlast the claim idle time."""
    entry_id = f"{int(time.time() * 1000)}-0"
    jobs = jobs_for(2)
    for stream, job in zip((keys.worker_jobs("w1"), keys.JOBS), jobs, strict=True):
        await streams.xadd(stream, job.fields(), id=entry_id)
    spy = SlowSteps(make_batcher(max_new_tokens=40))
    async with worker(streams, spy, "w1"):
        for job in jobs:
            await wait_until(lambda job=job: ended(streams, job.id))
    assert [await tries(streams, job.id) for job in jobs] == [{1}, {1}]
    assert len(spy.prompts) == 2


async def test_a_worker_whose_sweep_claims_its_own_running_job_runs_it_once(streams, make_batcher):
    """Its keep-alive came late (Redis slow, its loop busy), so its own running job looks
    abandoned to its own sweep, which claims it: the answer goes on, in one try."""
    spy = SlowSteps(make_batcher(max_new_tokens=40))
    async with gateway(streams) as queue, worker(streams, spy, "w1", claim_idle_s=60) as working:
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        first = await anext(aiter(generation))
        [taken] = working._running.values()
        await streams.xclaim(taken.stream, GROUP, "w1", 0, [taken.entry_id], idle=120_000)
        await working._claim_abandoned(taken.stream)
        rest = await asyncio.wait_for(read(generation), 20)  # not restarted
    assert first + "".join(rest) == generation.text == spy.answers[0]
    assert len(spy.prompts) == 1


async def test_jobs_read_together_are_not_taken_for_lost_while_the_first_is_checked(
    streams, make_batcher, monkeypatch
):
    """A worker reads two jobs at once and checks them one by one; while Redis is slow to
    answer the first check, a sweep looks for jobs delivered to it and never read: the
    second is being taken, not lost."""
    monkeypatch.setattr(bot.worker, "LOST_AFTER_MS", 50)
    sweeps = []
    jobs = jobs_for(2)
    for job in jobs:
        await streams.xadd(keys.JOBS, job.fields())
    spy = SlowSteps(make_batcher(max_new_tokens=20))
    async with InferenceQueue(batcher=spy, max_size=8, timeout=60) as queue:
        working = Worker(
            redis=streams, inference=queue, name="w1", rows=4,
            claim_idle_s=60, max_deliveries=3,
        )  # fmt: skip
        check_and_run = working._check_and_run

        async def slow_first_check(*args: Any, **kwargs: Any) -> None:
            if not working._running:
                await asyncio.sleep(0.1)  # the second is idle past LOST_AFTER_MS
                sweeps.append(asyncio.create_task(working._take_lost(keys.JOBS)))  # meanwhile
                await asyncio.sleep(0.05)
            await check_and_run(*args, **kwargs)

        monkeypatch.setattr(working, "_check_and_run", slow_first_check)
        await working._ensure_groups()
        assert await working._read(keys.JOBS) == 2
        await asyncio.gather(*sweeps)
        for job in jobs:
            await wait_until(lambda job=job: ended(streams, job.id))
        await working.finish(0)
    assert [await tries(streams, job.id) for job in jobs] == [{1}, {1}]
    assert len(spy.prompts) == 2


async def ended(redis: Redis, job_id: str) -> bool:
    chunks = await redis.xrange(keys.job_chunks(job_id))
    return any(Chunk.parse(fields).kind == "end" for _, fields in chunks)


async def test_a_gone_workers_consumers_are_dropped_from_the_groups(streams, make_batcher):
    """Workers restarted under new names would otherwise pile up as consumers."""
    async with gateway(streams) as queue:
        waiting = queue.submit(HELLO, user="u1", conversation="c1")  # no worker: shared stream
        await wait_until(lambda: streams.xlen(keys.JOBS))
        async with worker(streams, make_batcher(), "old"):
            await read(waiting)
            assert "old" in await consumers(streams, keys.JOBS)
        async with worker(streams, make_batcher(), "new"):
            await wait_until(lambda: gone_from(streams, keys.JOBS, "old"))
    assert await streams.smembers(keys.WORKERS) == {"new"}


async def consumers(redis: Redis, stream: str) -> set[str]:
    return {
        consumer["name"] for consumer in await redis.xinfo_consumers(stream, keys.WORKERS_GROUP)
    }


async def gone_from(redis: Redis, stream: str, name: str) -> bool:
    return name not in await consumers(redis, stream)


class SlowSteps(SpyBatcher):
    """The real batcher, 20 ms a step: an answer of 400 tokens takes 8 s, so one the test
    stops cannot end first, however fast the machine (a tiny model's ran to its end)."""

    def step(self) -> list:
        time.sleep(0.02)
        return super().step()


async def test_a_gateway_resuming_a_request_reads_the_job_sent_before(streams, make_batcher):
    """The gateway that sent it died mid-answer: the next one reads that job's answer
    from its start, and no worker writes it twice."""
    batcher = make_batcher(max_new_tokens=40)
    spy = SlowSteps(batcher)  # so that the first gateway dies mid-answer
    async with worker(streams, spy, "w1"):
        first = JobQueue(redis=streams, gateway="gw-dead", max_size=8, timeout=60)
        await first.__aenter__()
        await anext(aiter(first.submit(HELLO, user="u1", conversation="c1")))
        await crash(first)
        async with gateway(streams) as second:
            again = second.submit(HELLO, user="u1", conversation="c1")
            chunks = await read(again)
    assert "".join(chunks) == again.text == answer_alone(batcher, HELLO)
    assert len(spy.prompts) == 1


async def test_a_request_stopped_as_it_finds_the_job_sent_before_stops_that_job(
    streams, make_batcher, monkeypatch
):
    """Stopped while the resuming gateway looked at the dead one's job: that job ran on
    to its end on its worker, a row spent on an answer nobody would read."""
    spy = SlowSteps(make_batcher(max_new_tokens=400))
    async with worker(streams, spy, "w1") as working:
        first = JobQueue(redis=streams, gateway="gw-dead", max_size=8, timeout=60)
        await first.__aenter__()
        await anext(aiter(first.submit(HELLO, user="u1", conversation="c1")))
        await crash(first)
        async with gateway(streams) as second:
            exists, looked_at = streams.exists, []

            async def stopped_meanwhile(*names: str) -> int:
                if names[0].endswith(":cancel") and not looked_at:
                    looked_at.append(names[0])
                    again.cancel()
                return await exists(*names)

            monkeypatch.setattr(streams, "exists", stopped_meanwhile)
            again = second.submit(HELLO, user="u1", conversation="c1")
            await wait_until(lambda: asyncio.sleep(0, looked_at))
            monkeypatch.setattr(streams, "exists", exists)
            await wait_until(lambda: asyncio.sleep(0, not working._running))
    assert await streams.exists(*looked_at)  # the earlier job's cancel
    assert len(spy.prompts) == 1 and not spy.answers  # it never finished its 400 tokens


async def test_a_request_asked_again_after_a_cancel_or_its_end_is_answered_again(
    streams, make_batcher
):
    spy = SlowSteps(make_batcher(max_new_tokens=40))
    async with worker(streams, spy, "w1"):
        async with gateway(streams) as first:  # stopping cancels what it waits on
            await anext(aiter(first.submit(HELLO, user="u1", conversation="c1")))
        async with gateway(streams) as second:
            for _ in range(2):
                await read(second.submit(HELLO, user="u1", conversation="c1"))
    assert len(spy.prompts) == 3


async def test_a_request_whose_job_could_not_be_sent_is_sent_when_asked_again(
    streams, make_batcher, monkeypatch
):
    """Redis failed as the job was about to be sent: the request is not recorded as sent,
    so its next try (the turn resumed) sends it, rather than following nothing."""
    batcher = make_batcher()
    spy = SpyBatcher(batcher)
    calls = 0

    def fails_once(conversation: str, alive: list[str]) -> str | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RedisConnectionError("Redis is gone")
        return pick_worker(conversation, alive)

    monkeypatch.setattr(bot.job_queue, "pick_worker", fails_once)
    async with worker(streams, spy, "w1"), gateway(streams, timeout=5) as queue:
        with pytest.raises(RedisConnectionError):
            await read(queue.submit(HELLO, user="u1", conversation="c1"))
        again = queue.submit(HELLO, user="u1", conversation="c1")
        assert "".join(await read(again)) == again.text == answer_alone(batcher, HELLO)


async def test_a_request_asked_again_as_its_answer_is_tidied_away_is_a_new_job(
    streams, make_batcher, monkeypatch
):
    """The gateway deletes an answered job's record and stream after the answer; the same
    request asked again meanwhile must not follow that job (whose stream is going)."""
    spy = SpyBatcher(make_batcher())
    delete = streams.delete

    async def slow_delete(*names: str) -> int:
        await asyncio.sleep(0.3)
        return await delete(*names)

    monkeypatch.setattr(streams, "delete", slow_delete)
    async with worker(streams, spy, "w1"), gateway(streams, timeout=10) as queue:
        answers = [await read(queue.submit(HELLO, user="u1", conversation="c1")) for _ in "ab"]
    assert answers[0] and answers[1] == answers[0]
    assert len(spy.prompts) == 2


async def test_a_gateway_that_follows_a_job_as_it_ends_reads_its_whole_answer(
    streams, make_batcher, monkeypatch
):
    """Gateway B finds gateway A's job of the same request just as A reads its end (B
    then checks that it was not cancelled): the answer is still there for B to read."""
    spy = SlowSteps(make_batcher(max_new_tokens=12))
    exists, a_is_done = streams.exists, asyncio.Event()

    async def exists_once_a_is_done(*names: str) -> int:
        await a_is_done.wait()
        return await exists(*names)

    async with (
        worker(streams, spy, "w1"),
        gateway(streams, name="gw-a") as a,
        gateway(streams, name="gw-b", timeout=5) as b,
    ):
        asked_of_a = a.submit(HELLO, user="u1", conversation="c1")
        await anext(aiter(asked_of_a))  # the worker has checked for a cancel: started
        monkeypatch.setattr(streams, "exists", exists_once_a_is_done)
        asked_of_b = b.submit(HELLO, user="u1", conversation="c1")
        await read(asked_of_a)
        await wait_until(lambda: asyncio.sleep(0, len(a._tasks) == 2))  # A has tidied up
        a_is_done.set()
        await read(asked_of_b)
    assert asked_of_b.text == asked_of_a.text
    assert len(spy.prompts) == 1


async def sent_by_a_dead_gateway(streams: Redis, *, timeout: float) -> None:
    """A job of HELLO's, sent with `timeout` by gateway A, which then died (no worker alive
    yet, it waits in its stream)."""
    first = JobQueue(redis=streams, gateway="gw-a", max_size=8, timeout=timeout)
    await first.__aenter__()
    asked_of_a = first.submit(HELLO, user="u1", conversation="c1")
    await wait_until(lambda: streams.xlen(keys.JOBS))
    await crash(first)
    asked_of_a.on_cancel = None  # as a kill -9: its own timer never cancels anything


async def test_a_job_sent_long_before_is_asked_again_not_followed(streams, make_batcher):
    """Gateway A sent the job, the workers were busy, and A died: B, taking the request
    over, finds the job past half its time. Followed, it kept A's deadline, a worker taking
    it after that dropped it unanswered, and B waited out its own timeout; B now cancels
    it and sends its own, which is answered."""
    await sent_by_a_dead_gateway(streams, timeout=2)
    [(_, fields)] = await streams.xrange(keys.JOBS)
    earlier = Job.parse(fields).id
    await asyncio.sleep(1.2)  # past half of A's 2 s
    spy = SpyBatcher(make_batcher())
    async with gateway(streams, timeout=30) as second:
        asked_of_b = second.submit(HELLO, user="u1", conversation="c1")
        await wait_until(lambda: streams.exists(keys.job_cancel(earlier)))
        async with worker(streams, spy, "w1"):  # it takes both: the earlier is dropped
            assert await read(asked_of_b)
    assert len(spy.prompts) == 1


async def test_a_followed_job_taken_past_its_deadline_times_out_at_once(streams, make_batcher):
    """Gateway B took over dead A's request and followed its job, with more than half of
    B's time left, so on A's deadline; a worker took it only after that and dropped it
    unsaid, and B waited out its own, later timeout before saying the answer timed out."""
    await sent_by_a_dead_gateway(streams, timeout=4)
    spy = SpyBatcher(make_batcher())
    async with gateway(streams, timeout=7) as second:
        asked_of_b = second.submit(HELLO, user="u1", conversation="c1")  # follows A's
        await asyncio.sleep(4.2)  # past A's deadline, well before B's
        async with worker(streams, spy, "w1"):
            with pytest.raises(InferenceTimeout):
                async with asyncio.timeout(2):  # B's own would come later
                    await read(asked_of_b)
    assert spy.prompts == []


class AlwaysFails(SpyBatcher):
    def step(self) -> list:
        raise RuntimeError("the model fell over")


class FailsAtTheGate(GatedBatcher):
    def step(self) -> list:
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        raise RuntimeError("the model fell over")


async def test_a_job_that_keeps_failing_is_dead_lettered_and_the_gateway_told(
    streams, make_batcher
):
    failing = AlwaysFails(make_batcher())
    async with gateway(streams) as queue, worker(streams, failing, "w1", max_deliveries=2):
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        with pytest.raises(JobFailed, match="2 tries"):
            await read(generation)
    [(_, dead)] = await streams.xrange(keys.DEAD_JOBS)
    assert dead["tries"] == "2" and '"c1"' in dead["job"]
    assert len(failing.prompts) == 2


async def test_a_job_the_model_overflows_on_is_given_up_at_once(streams, qwen_tokenizer):
    """NaN logits for this prompt: a single process says so at once; a worker handed the
    job back as its own failure, so it was tried on every worker up to JOB_MAX_DELIVERIES,
    a whole prompt read each time, each worker marked failing, before the apology."""
    from conftest import overflowing_qwen2

    from bot.batching import Batcher
    from bot.engine import Engine
    from bot.kv_cache import PrefixCache

    model = overflowing_qwen2(qwen_tokenizer, " zebra")
    engine = Engine(model=model, tokenizer=qwen_tokenizer, max_new_tokens=8)
    spy = SpyBatcher(
        Batcher(engine=engine, max_batch=2, step_tokens=64, prefix_cache=PrefixCache(0))
    )
    async with gateway(streams) as queue, worker(streams, spy, "w1", max_deliveries=3):
        generation = queue.submit(
            [{"role": "user", "content": "a zebra"}], user="u1", conversation="c1"
        )
        with pytest.raises(JobFailed, match="1 tr"):
            await read(generation)
    assert len(spy.prompts) == 1


async def test_a_job_that_failed_on_one_worker_is_tried_again_on_another(
    streams, make_batcher, monkeypatch
):
    """Handed back, it stayed with the worker that failed it, idle past LOST_AFTER_MS, so
    that worker's next sweep took it for lost, and, failing fast, it had rows free to
    claim it first: it failed every try there, and was dead-lettered, with a healthy
    worker idle beside it."""
    monkeypatch.setattr(bot.worker, "LOST_AFTER_MS", round(CLAIM_IDLE_S * 1000 / 3))  # 2 s of 30
    failing, healthy = AlwaysFails(make_batcher()), SpyBatcher(make_batcher(max_new_tokens=4))
    conversation = next(c for c in map(str, range(99)) if pick_worker(c, ["w1", "w2"]) == "w1")
    async with (
        gateway(streams) as queue,
        worker(streams, failing, "w1", max_deliveries=2),
        worker(streams, healthy, "w2", max_deliveries=2),
    ):
        generation = queue.submit(HELLO, user="u1", conversation=conversation)
        pieces = await asyncio.wait_for(read(generation), 10)
    assert "".join(pieces) == generation.text and healthy.answers == [generation.text]
    assert len(failing.prompts) == 1


async def test_a_job_failing_on_every_worker_is_dead_lettered_within_the_claim_idle_time(
    streams, make_batcher
):
    """Each worker that failed a job left the handed-back ones to the others for the claim
    idle time: with every worker failing (a bad deploy), none took them while the failures
    went on, and their users heard nothing until their timeouts."""
    claim_idle_s = 9.0  # each worker sweeps every 3 s
    failing = [AlwaysFails(make_batcher()), AlwaysFails(make_batcher())]
    async with (
        gateway(streams) as queue,
        worker(streams, failing[0], "w1", max_deliveries=2, claim_idle_s=claim_idle_s),
        worker(streams, failing[1], "w2", max_deliveries=2, claim_idle_s=claim_idle_s),
    ):
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        with pytest.raises(JobFailed, match="2 tries"):
            await asyncio.wait_for(read(generation), claim_idle_s)
    assert sorted(len(batcher.prompts) for batcher in failing) == [1, 1]


async def test_a_job_its_inference_server_refuses_is_given_up_at_once(streams):
    """A worker forwarding to INFERENCE_URL, which answered 400 (a prompt past its window,
    say): as in one process, no try is made again, where the job was handed back and each
    try asked the server again, and the worker was marked as failing."""
    async with FakeOpenAI() as server:
        server.script.append(Status(400, "maximum context length is 32768 tokens"))
        inference = OpenAIBackend(url=server.url, max_size=4, max_concurrent=2, timeout=30,
                                  max_new_tokens=64, retries=2, backoff=0.01)  # fmt: skip
        async with (
            inference,
            gateway(streams) as queue,
            working_on(streams, inference, "w1", rows=2, max_deliveries=3),
        ):
            generation = queue.submit(HELLO, user="u1", conversation="c1")
            with pytest.raises(JobFailed, match="after 1 tries"):
                await asyncio.wait_for(read(generation), 10)
    assert len(server.requests) == 1
    [(_, dead)] = await streams.xrange(keys.DEAD_JOBS)
    assert dead["tries"] == "1"
    assert not await streams.exists(keys.worker_failing("w1"))


async def test_a_worker_started_at_a_redis_at_its_maxmemory_takes_jobs_once_it_has_room(
    redis_server, make_batcher
):
    """Its groups' creation was refused (OOM, taken for "it exists"), then its heartbeat:
    the worker's start raised, where a running worker rides maxmemory out."""
    async with (
        Redis.from_url(redis_server.url, decode_responses=True) as redis,
        InferenceQueue(batcher=make_batcher(max_new_tokens=4), max_size=4, timeout=60) as local,
    ):
        await redis.config_set("maxmemory", 1)  # noeviction: every write is refused
        working = Worker(redis=redis, inference=local, name="w1", rows=4,
                         claim_idle_s=CLAIM_IDLE_S, max_deliveries=3)  # fmt: skip
        running = asyncio.create_task(working.run())
        try:
            await asyncio.sleep(0.5)
            assert not running.done()
            await redis.config_set("maxmemory", 0)
            await wait_until(lambda: redis.exists(keys.worker("w1")))
            async with gateway(redis) as queue:
                generation = queue.submit(HELLO, user="u1", conversation="c1")
                pieces = await asyncio.wait_for(read(generation), 10)
        finally:
            working.stop()
            await asyncio.gather(running, return_exceptions=True)
            await working.finish(0)
    assert "".join(pieces) == generation.text


async def test_forget_deletes_the_conversations_dead_letters_and_no_others(streams, make_batcher):
    """A dead letter holds the conversation's messages: `forget` must find it."""
    failing = AlwaysFails(make_batcher())
    async with gateway(streams) as queue, worker(streams, failing, "w1", max_deliveries=1):
        for conversation in ("c1", "c2"):
            with pytest.raises(JobFailed):
                await read(queue.submit(HELLO, user="u1", conversation=conversation))
    store = ConversationStore(redis=streams, max_messages=6, ttl_seconds=60)
    async with streams.pipeline(transaction=True) as pipe:
        store.queue_forget(pipe, "c1", at=time.time())
        await pipe.execute()
    [(_, dead)] = await streams.xrange(keys.DEAD_JOBS)
    assert dead["conversation"] == "c2" and Job.parse(dead).conversation == "c2"


async def test_a_job_given_up_is_dead_lettered_once_though_the_reply_was_lost(
    tmp_path, redis_url, streams, make_batcher
):
    """Redis kept the dead letter, but its reply was lost and the client sent it again;
    then the job came back (as when its acknowledgement fails) and was given up again."""
    from lossy_proxy import lossy_redis

    from storage.connection import Resilience

    failing = AlwaysFails(make_batcher())
    lose = [keys.DEAD_JOBS.encode()]
    async with (
        lossy_redis(redis_url, tmp_path, lose, Resilience(health_check_s=0)) as (redis, proxy),
        gateway(redis) as queue,
        worker(redis, failing, "w1", max_deliveries=1) as working,
    ):
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        [watch] = queue._watches.values()
        with pytest.raises(JobFailed, match="1 tries"):
            await read(generation)
        await working._dead_letter(keys.worker_jobs("w1"), "0-1", watch.job, attempt=2, tries=1)
    assert proxy.lost == lose
    [(_, dead)] = await streams.xrange(keys.DEAD_JOBS)
    assert dead["tries"] == "1" and '"c1"' in dead["job"]


async def test_a_dead_letter_that_failed_is_written_when_given_up_again(streams, make_batcher):
    """Redis keeps what a script wrote before it failed: the job's mark must not be that."""
    job = Job("given-up", "c1", "u1", HELLO, None, None, deadline=time.time() + 60)
    async with worker(streams, make_batcher(), "w1") as working:
        await streams.set(keys.DEAD_JOBS, "not a stream")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await working._dead_letter(keys.worker_jobs("w1"), "0-1", job, attempt=4, tries=3)
        await streams.delete(keys.DEAD_JOBS)
        await working._dead_letter(keys.worker_jobs("w1"), "0-1", job, attempt=4, tries=3)
    [(_, dead)] = await streams.xrange(keys.DEAD_JOBS)
    assert dead["tries"] == "3" and '"given-up"' in dead["job"]


async def test_an_answer_its_backend_starts_again_is_read_again_in_the_same_try(streams):
    """A worker forwarding to an OpenAI-compatible server whose connection dropped
    midway: the backend asks again, and the gateway drops what it had and reads the
    answer again, in the same try (no failed one: with one delivery allowed, it stands)."""
    from fake_openai import Drop, FakeOpenAI, Stream
    from test_openai_backend import backend

    async with FakeOpenAI() as server, backend(server.url) as inference:
        server.script += [Drop(["Bon"]), Stream(["Bon", "jour"])]
        async with (
            gateway(streams) as queue,
            working_on(streams, inference, "w1", rows=2, max_deliveries=1),
        ):
            generation = queue.submit(HELLO, user="u1", conversation="c1")
            [watch] = queue._watches.values()
            with pytest.raises(AnswerRestarted):
                await read(generation)
            assert "".join(await read(generation)) == generation.text == "Bonjour"
    assert await tries(streams, watch.job.id) == {1}


async def test_a_worker_takes_no_more_jobs_than_its_queue_has_room_for(streams, make_batcher):
    """QUEUE_MAX below MAX_BATCH (a .env shared with the gateways): the jobs past it wait
    in the stream for a free place, and are neither refused nor given up."""
    spy = SlowSteps(make_batcher(max_batch=4, max_new_tokens=8))
    jobs = jobs_for(4)
    for job in jobs:
        await streams.xadd(keys.JOBS, job.fields())
    async with worker(streams, spy, "w1", queue_max=2, max_deliveries=1):
        await wait_until(lambda: _stream_is_empty(streams, keys.JOBS), timeout=30)
    assert len(spy.answers) == 4 and not await streams.exists(keys.DEAD_JOBS)
    assert all([await tries(streams, job.id) == {1} for job in jobs])


async def test_jobs_taken_from_two_streams_at_once_fit_the_queue(streams, make_batcher):
    """Its own stream's jobs are taken, and then the shared one's before the first two
    reach the queue: the rows free count them already, where the third was taken too,
    refused by the full queue, and counted as a failed try (dead-lettered at once here)."""
    spy = SlowSteps(make_batcher(max_batch=4, max_new_tokens=8))
    jobs = jobs_for(3)
    for stream, job in zip((keys.worker_jobs("w1"),) * 2 + (keys.JOBS,), jobs, strict=True):
        await streams.xadd(stream, job.fields())
    async with worker(streams, spy, "w1", queue_max=2, max_deliveries=1):
        await wait_until(lambda: asyncio.sleep(0, len(spy.answers) == 3), timeout=30)
    assert not await streams.exists(keys.DEAD_JOBS)
    assert all([await tries(streams, job.id) == {1} for job in jobs])


async def test_a_cancelled_job_stops_on_its_worker(streams, make_batcher):
    spy = SlowSteps(make_batcher(max_new_tokens=400))
    async with gateway(streams) as queue, worker(streams, spy, "w1") as working:
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        await anext(aiter(generation))
        generation.cancel()
        await wait_until(lambda: asyncio.sleep(0, not working._running))
    assert not spy.answers  # it never finished its 400 tokens
    # What the worker had read and written when it sent the text read, not 0.
    assert generation.prompt_tokens == spy.batcher.engine.count_tokens(HELLO)
    assert 0 < generation.answer_tokens < 400
    assert await streams.xlen(keys.worker_jobs("w1")) == 0


async def test_a_cancel_redis_missed_reaches_the_worker_once_redis_is_back(
    tmp_path, redis_url, streams, make_batcher, caplog
):
    """A Stop in a Redis outage: its cancel was tried once and dropped, so the worker wrote
    the whole answer unread, a row spent on it, and the same request asked again (a
    Regenerate) followed that job, not a new one."""
    from lossy_proxy import lossy_redis

    from storage.connection import Resilience

    spy = SlowSteps(make_batcher(max_new_tokens=400))
    async with (
        lossy_redis(redis_url, tmp_path, [], Resilience(0, health_check_s=0)) as (far, proxy),
        gateway(far) as queue,
        worker(streams, spy, "w1") as working,
    ):
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        await anext(aiter(generation))
        proxy.cut()
        generation.cancel()
        await wait_until(lambda: asyncio.sleep(0, "could not cancel job" in caplog.text))
        proxy.back()
        again = queue.submit(HELLO, user="u1", conversation="c1")  # Regenerate, say
        await anext(aiter(again))
        await wait_until(lambda: asyncio.sleep(0, len(working._running) == 1))
        again.cancel()
        await wait_until(lambda: asyncio.sleep(0, not working._running))
    assert not spy.answers and len(spy.prompts) == 2  # neither wrote its 400 tokens


async def test_an_answered_job_whose_acknowledgement_failed_is_not_dead_lettered(
    streams, make_batcher, monkeypatch
):
    """The answer's end was written and read, then the acknowledgement failed (a Redis
    hiccup past its retries): the job comes back, and is dropped as answered, where it
    was dead-lettered as failed (a false entry for the operator, on its last delivery)."""
    async with (
        gateway(streams) as queue,
        worker(streams, make_batcher(), "w1", max_deliveries=1) as working,
    ):
        acknowledge, calls = working._acknowledge, []

        async def fails_first(stream: str, entry_id: str) -> None:
            calls.append(entry_id)
            if len(calls) == 1:
                raise RedisConnectionError("reply lost, retries spent")
            await acknowledge(stream, entry_id)

        monkeypatch.setattr(working, "_acknowledge", fails_first)
        assert "".join(await read(queue.submit(HELLO, user="u1", conversation="c1")))
        await wait_until(lambda: asyncio.sleep(0, len(calls) == 2))  # back, and dropped
    assert not await streams.exists(keys.DEAD_JOBS)


@pytest.mark.parametrize("during", ["xautoclaim", "xpending_range"])
async def test_jobs_claimed_hold_their_rows_from_the_reader(
    streams, make_batcher, monkeypatch, during
):
    """A dead worker's two jobs claimed at once by a worker with two rows: while the claim
    waits for Redis (XAUTOCLAIM), and while the first is checked (XPENDING), the reader
    takes no new job into their rows. It did: the batch overfilled, and a job failed with
    QueueFull, a try counted."""
    await streams.xgroup_create(keys.JOBS, GROUP, id="0", mkstream=True)
    first, second, new = jobs_for(3)
    ids = [await streams.xadd(keys.JOBS, job.fields()) for job in (first, second)]
    await streams.xreadgroup(GROUP, "dead", {keys.JOBS: ">"})
    await streams.xclaim(keys.JOBS, GROUP, "dead", 0, ids, idle=60_000, justid=True)
    await streams.xadd(keys.JOBS, new.fields())
    batcher = make_batcher(max_batch=2, max_new_tokens=4)
    async with InferenceQueue(batcher=batcher, max_size=2, timeout=60) as inference:
        working = Worker(
            redis=streams, inference=inference, name="w1", rows=2, claim_idle_s=60,
            max_deliveries=3,
        )  # fmt: skip
        call, reads = getattr(streams, during), []

        async def the_reader_reads_meanwhile(*args: Any, **kwargs: Any) -> Any:
            if not reads:
                reads.append(asyncio.create_task(working._read(keys.JOBS)))
                await asyncio.sleep(0.05)
            return await call(*args, **kwargs)

        monkeypatch.setattr(streams, during, the_reader_reads_meanwhile)
        await working._claim_abandoned(keys.JOBS)
        read_meanwhile = await asyncio.gather(*reads)
        claimed = {taken.job.id for taken in working._running.values()}
        await working.finish(5)
    assert read_meanwhile == [0] and claimed == {first.id, second.id}


async def test_a_sweep_while_the_reader_asks_for_new_jobs_claims_the_abandoned_one(
    streams, make_batcher, monkeypatch
):
    """The reader asks Redis for new jobs (its XREADGROUP) just as the sweep looks for
    abandoned ones: the sweep claims them once the read is done. It gave up, for the read
    held every row: a reader and a sweep waking in step (both every 0.5 s, with
    JOB_CLAIM_IDLE_S=1.5) left a dead worker's job unclaimed for minutes."""
    await streams.xgroup_create(keys.JOBS, GROUP, id="0", mkstream=True)
    [abandoned] = jobs_for(1)
    entry_id = await streams.xadd(keys.JOBS, abandoned.fields())
    await streams.xreadgroup(GROUP, "dead", {keys.JOBS: ">"})
    await streams.xclaim(keys.JOBS, GROUP, "dead", 0, [entry_id], idle=60_000, justid=True)
    async with InferenceQueue(batcher=make_batcher(max_new_tokens=4), max_size=8, timeout=60) as q:
        working = Worker(
            redis=streams, inference=q, name="w1", rows=4, claim_idle_s=60, max_deliveries=3
        )
        xreadgroup, sweeps = streams.xreadgroup, []

        async def the_sweep_comes_meanwhile(*args: Any, **kwargs: Any) -> Any:
            sweeps.append(asyncio.create_task(working._claim_abandoned(keys.JOBS)))
            await asyncio.sleep(0.05)
            return await xreadgroup(*args, **kwargs)

        monkeypatch.setattr(streams, "xreadgroup", the_sweep_comes_meanwhile)
        assert await working._read(keys.JOBS) == 0  # nothing new
        await asyncio.gather(*sweeps)
        claimed = [taken.job.id for taken in working._running.values()]
        await working.finish(5)
    assert claimed == [abandoned.id]


async def test_a_job_cancelled_as_it_starts_writes_none_of_its_answer(
    streams, make_batcher, monkeypatch
):
    """Cancelled between its worker's check and the `started` entry, which reports it: no
    text is written, even where the answer's first pieces came while `started` was written
    (they were written before the worker looked again, or before the cancel reached them)."""
    [job] = jobs_for(1)
    spy = SlowSteps(make_batcher(max_new_tokens=400))
    async with worker(streams, spy, "w1") as working:
        write = working._write

        async def answered_a_little() -> bool:
            return spy.batcher.stats.decoded >= 4

        async def cancelled_first(job: Job, chunk: Chunk) -> bool:
            if chunk.kind == "started":
                await wait_until(answered_a_little)  # its text waits, unread
                await asyncio.sleep(0.05)  # and has reached the event loop
                await streams.set(keys.job_cancel(job.id), "1", ex=60)
            return await write(job, chunk)

        monkeypatch.setattr(working, "_write", cancelled_first)
        await streams.xadd(keys.JOBS, job.fields())
        await wait_until(lambda: _stream_is_empty(streams, keys.JOBS))  # acknowledged
    kinds = [Chunk.parse(f).kind for _, f in await streams.xrange(keys.job_chunks(job.id))]
    assert kinds == ["started"]
    assert not spy.answers


async def test_a_job_answered_by_another_try_stops_on_the_worker(streams, make_batcher):
    """Another worker answered the job while this one stalled: this try stops, for nobody
    waits for it, and the job is acknowledged."""
    [job] = jobs_for(1)
    await streams.xadd(keys.JOBS, job.fields())
    spy = SlowSteps(make_batcher(max_new_tokens=400))
    async with worker(streams, spy, "w1") as working:
        await wait_until(lambda: asyncio.sleep(0, bool(working._running)))
        await streams.set(keys.job_answered(job.id), "1", ex=60)
        await wait_until(lambda: asyncio.sleep(0, not working._running))
        await wait_until(lambda: _stream_is_empty(streams, keys.JOBS))
    assert not spy.answers  # it never finished its 400 tokens


async def test_an_answer_given_up_on_for_a_redis_error_stops_on_the_worker(
    streams, make_batcher, monkeypatch
):
    """Its text could not be written (Redis lost past the job's deadline): the job goes
    back for another try, and its row stops, not running on unread."""
    batcher = make_batcher(max_new_tokens=400)
    async with gateway(streams, timeout=1) as queue, worker(streams, batcher, "w1") as working:
        submitted: list = []
        submit, write = working.inference.submit, working._write

        def recorded(*args, **kwargs):
            submitted.append(submit(*args, **kwargs))
            return submitted[-1]

        async def fails_for_text(job, chunk):
            if chunk.kind == "text":
                raise RedisConnectionError("Redis is gone")
            return await write(job, chunk)

        monkeypatch.setattr(working.inference, "submit", recorded)
        monkeypatch.setattr(working, "_write", fails_for_text)
        queue.submit(HELLO, user="u1", conversation="c1")
        await wait_until(lambda: asyncio.sleep(0, bool(submitted)))
        await wait_until(lambda: asyncio.sleep(0, submitted[0].cancelled), timeout=5)


async def test_a_job_claimed_from_a_stalled_worker_is_dropped_there(streams, make_batcher):
    """Another worker's sweep claims the job of a worker stalled past the claim idle time:
    the stalled one stops answering it, and leaves it to the claimer."""
    spy = SlowSteps(make_batcher(max_new_tokens=400))
    async with gateway(streams) as queue, worker(streams, spy, "w1") as working:
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        await anext(aiter(generation))
        [taken] = working._running.values()
        await streams.xclaim(taken.stream, keys.WORKERS_GROUP, "w2", 0, [taken.entry_id])
        await wait_until(lambda: asyncio.sleep(0, not working._running))
        [pending] = await streams.xpending_range(
            taken.stream, keys.WORKERS_GROUP, taken.entry_id, taken.entry_id, 1
        )
    assert not spy.answers  # it never finished its 400 tokens
    assert pending["consumer"] == "w2"  # neither acknowledged nor handed back


async def test_a_stopping_workers_answers_finish_there_in_its_grace_period(streams, make_batcher):
    """The stopped worker takes no more jobs but keeps its running ones through a grace
    period of many claim idle times: no other worker takes them for abandoned."""
    slow, other = SlowSteps(make_batcher(max_new_tokens=60)), SpyBatcher(make_batcher())
    async with gateway(streams) as queue, worker(streams, slow, "stopping") as stopping:
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        first = await anext(aiter(generation))
        async with worker(streams, other, "w2"):
            stopping.stop()
            await stopping.running
            rest, handed_back = await asyncio.gather(
                read(generation), stopping.finish(grace=20 * CLAIM_IDLE_S)
            )
    assert first + "".join(rest) == generation.text == slow.answers[0]
    assert handed_back == 0 and not other.prompts


async def test_tries_that_stopping_workers_pass_on_are_not_counted_as_failed(streams, make_batcher):
    """A rolling restart: each worker, stopped mid-answer, hands its job on. That is no
    failure: the job is answered, though delivered more than JOB_MAX_DELIVERIES times."""
    [job] = jobs_for(1)
    await streams.xadd(keys.JOBS, job.fields())
    for name in ("w1", "w2"):
        slow = SlowSteps(make_batcher(max_new_tokens=400))
        async with worker(streams, slow, name, max_deliveries=1) as stopping:
            await wait_until(lambda: asyncio.sleep(0, bool(stopping._running)))
    spy = SpyBatcher(make_batcher())
    async with worker(streams, spy, "w3", max_deliveries=1):
        await wait_until(lambda: _stream_is_empty(streams, keys.JOBS))
    assert await tries(streams, job.id) == {1, 2, 3}
    assert len(spy.answers) == 1 and not await streams.exists(keys.DEAD_JOBS)


async def test_a_try_passed_on_whose_reply_was_lost_counts_once(
    tmp_path, redis_url, streams, make_batcher
):
    """A stopping worker hands its running job on, and Redis's reply is lost: the client
    runs the script again, and the try counts as passed on once, where it counted twice
    and a failing job got one more try than JOB_MAX_DELIVERIES for each such loss."""
    from lossy_proxy import lossy_redis

    [job] = jobs_for(1)
    await streams.xadd(keys.JOBS, job.fields())
    async with lossy_redis(redis_url, tmp_path, [b"passed-on"]) as (far, proxy):
        slow = SlowSteps(make_batcher(max_new_tokens=400))
        async with worker(far, slow, "w1") as stopping:
            await wait_until(lambda: asyncio.sleep(0, bool(stopping._running)))
        assert proxy.lost == [b"passed-on"]
        assert await stopping._failed_tries(job, 3) == 1  # the 2nd failed, the 1st passed on


async def test_a_job_another_worker_holds_is_neither_acknowledged_nor_handed_back(
    streams, make_batcher
):
    """A worker whose answer ends (or fails) just as another claims its job, before its
    sweep sees the claim, leaves the job to the claimer."""
    batcher = make_batcher(max_new_tokens=400)  # still running when it is claimed
    async with gateway(streams) as queue, worker(streams, batcher, "w1") as working:
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        await anext(aiter(generation))
        [taken] = working._running.values()
        await streams.xclaim(taken.stream, keys.WORKERS_GROUP, "w2", 0, [taken.entry_id])
        await working._hand_back(taken)
        await working._acknowledge(taken.stream, taken.entry_id)
        [pending] = await streams.xpending_range(
            taken.stream, keys.WORKERS_GROUP, taken.entry_id, taken.entry_id, 1
        )
        assert pending["consumer"] == "w2" and pending["time_since_delivered"] < 1000
        assert await streams.xrange(taken.stream, taken.entry_id, taken.entry_id)


async def test_an_abandoned_job_behind_many_running_ones_is_claimed(streams, make_batcher):
    """XAUTOCLAIM looks at ten entries per free row a call: with one row free, a job
    abandoned behind 16 others' running jobs is claimed by following its cursor."""
    group, stream = keys.WORKERS_GROUP, keys.JOBS
    await streams.xgroup_create(stream, group, id="0", mkstream=True)
    job = Job("abandoned", "c1", "u1", HELLO, None, None, deadline=time.time() + 60)
    running = [await streams.xadd(stream, {"job": "another's"}) for _ in range(16)]
    abandoned = await streams.xadd(stream, job.fields())
    await streams.xreadgroup(group, "dead", {stream: ">"})
    await streams.xclaim(stream, group, "dead", 0, [abandoned], idle=60_000, justid=True)
    await streams.xclaim(stream, group, "alive", 0, running, justid=True)  # just now
    async with InferenceQueue(batcher=make_batcher(), max_size=1, timeout=60) as queue:
        working = Worker(
            redis=streams, inference=queue, name="w1", rows=1,
            claim_idle_s=CLAIM_IDLE_S, max_deliveries=3,
        )  # fmt: skip
        await working._claim_abandoned(stream)
        assert [taken.job.id for taken in working._running.values()] == ["abandoned"]
        await working.finish(0)


async def test_a_job_in_a_live_workers_stream_is_left_to_it_for_a_while(
    streams, make_batcher, monkeypatch
):
    """A job waits in the stream of a live worker that has not read it yet (busy on its
    core): another worker with rows free leaves it there, with its conversation's cache,
    for TAKE_FROM_OTHERS_AFTER_S, where it took it at once; after that, it takes that
    worker for full, and answers the job."""
    monkeypatch.setattr(bot.worker, "TAKE_FROM_OTHERS_AFTER_S", 3.0)  # 2 s past the look below
    busy = keys.worker_jobs("busy")
    await streams.sadd(keys.WORKERS, "busy")
    await streams.set(keys.worker("busy"), "4", px=60_000)  # alive, as the roll call reads it
    await streams.xgroup_create(busy, GROUP, id="0", mkstream=True)
    [job] = jobs_for(1)
    async with worker(streams, make_batcher(), "w1"):
        await streams.xadd(busy, job.fields())
        await asyncio.sleep(1.0)  # two of w1's looks at the others' streams
        [group] = await streams.xinfo_groups(busy)
        assert group["last-delivered-id"] == "0-0"  # still the busy worker's to take
        await wait_until(lambda: _stream_is_empty(streams, busy))  # taken and answered
    kinds = [Chunk.parse(f).kind for _, f in await streams.xrange(keys.job_chunks(job.id))]
    assert kinds[0] == "started" and kinds[-1] == "end"


async def test_a_job_for_a_worker_whose_stream_was_removed_goes_to_the_shared_one(
    streams, make_batcher
):
    """The roll call still had the worker alive, but the others had removed its stream:
    the gateway does not make the stream again (no worker would read it)."""
    await streams.sadd(keys.WORKERS, "removed")
    await streams.set(keys.worker("removed"), "4", px=5_000)
    batcher = make_batcher()
    async with gateway(streams) as queue:
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        await wait_until(lambda: streams.xlen(keys.JOBS))
        assert not await streams.exists(keys.worker_jobs("removed"))
        async with worker(streams, batcher, "w1"):
            assert "".join(await read(generation)) == answer_alone(batcher, HELLO)


async def test_a_job_nobody_takes_times_out_and_is_never_run(streams, make_batcher):
    spy = SpyBatcher(make_batcher())
    async with gateway(streams, timeout=0.3) as queue:
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        with pytest.raises(InferenceTimeout):
            await read(generation)
        async with worker(streams, spy, "late"):
            await wait_until(lambda: asyncio.sleep(0, True))
            await asyncio.sleep(0.3)
    assert not spy.prompts


async def test_a_job_out_of_time_on_its_worker_ends_there_and_is_not_a_failed_try(
    streams, make_batcher, caplog
):
    """The worker's REQUEST_TIMEOUT (here shorter than the gateway's): the gateway's
    request times out at once, where it was taken for a failure (a traceback, the worker
    marked failing and the job handed to another worker to run again) and the gateway
    waited on."""
    gated = GatedBatcher(make_batcher())
    async with (
        gateway(streams) as queue,
        InferenceQueue(batcher=gated, max_size=8, timeout=0.5) as inference,
        working_on(streams, inference, "w1", rows=gated.max_batch),
    ):
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        with pytest.raises(InferenceTimeout):
            await read(generation)
        gated.gate.set()
        assert not await streams.exists(keys.worker_failing("w1"))
        assert await streams.xlen(keys.worker_jobs("w1")) == 0  # acknowledged
    assert "failed on w1" not in caplog.text and "ran out of time on w1" in caplog.text


async def test_the_gateway_says_busy_when_queue_max_jobs_wait(streams):
    """No worker is running: jobs wait in the shared stream."""
    async with gateway(streams, max_size=2) as queue:
        waiting = [queue.submit(HELLO, user=f"u{n}", conversation=f"c{n}") for n in range(2)]
        with pytest.raises(QueueFull):
            queue.submit(HELLO, user="u3", conversation="c3")
        await wait_until(lambda: streams.xlen(keys.JOBS))
        assert [p.place for p in queue.places("u1")] == [2]
        for generation in waiting:
            generation.cancel()


async def test_a_job_cancelled_before_any_worker_took_it_leaves_room(streams, caplog):
    """Stopped (or timed out) while it waits for a worker: it leaves the stream, where it
    counted against QUEUE_MAX, and the next message was told the bot is busy, until a
    worker with a row free read it."""
    metrics = Metrics()
    async with gateway(streams, max_size=1, metrics=metrics) as queue:
        waiting = queue.submit(HELLO, user="u1", conversation="c1")
        await wait_until(lambda: reads(metrics, queue_waiting=1))
        waiting.cancel()
        await wait_until(lambda: reads(metrics, queue_waiting=0))
        with caplog.at_level(logging.DEBUG, logger="bot.job_queue"):
            queue.submit(HELLO, user="u2", conversation="c2").cancel()  # not QueueFull
            await wait_until(lambda: asyncio.sleep(0, "sent to" in caplog.text))
        assert await streams.xlen(keys.JOBS) == 0  # cancelled as it was sent


async def test_a_job_whose_sending_reply_was_lost_leaves_its_stream_when_cancelled(
    tmp_path, redis_url, streams, caplog
):
    """Redis ran the send, its reply was lost, and the retry found the job sent already:
    a cancel before any worker took it then left it in its stream, counted against
    QUEUE_MAX (the next message told the bot is busy), until a worker read it."""
    from lossy_proxy import lossy_redis

    async with (
        lossy_redis(redis_url, tmp_path, [b"EVALSHA"]) as (far, proxy),
        gateway(far, max_size=1) as queue,
    ):
        with caplog.at_level(logging.DEBUG, logger="bot.job_queue"):
            waiting = queue.submit(HELLO, user="u1", conversation="c1")  # no worker
            await wait_until(lambda: asyncio.sleep(0, "sent to" in caplog.text))
        assert proxy.lost == [b"EVALSHA"] and await streams.xlen(keys.JOBS) == 1
        waiting.cancel()

        async def taken_out() -> bool:
            return await streams.xlen(keys.JOBS) == 0

        await wait_until(taken_out, timeout=5)


async def test_the_gateway_counts_waiting_jobs_and_live_workers(streams, make_batcher):
    """Its /metrics: the jobs it sent that no worker has taken (`threadbot_queue_waiting`:
    every gateway's, each counted the whole backlog, which a dashboard's sum over them
    multiplied) and the workers alive; only a gateway has the latter (elsewhere a 0 would
    read as an outage)."""
    assert b"threadbot_workers_alive" not in Metrics().render()
    metrics, others = Metrics(), Metrics()
    async with gateway(streams, metrics=metrics) as queue:
        async with gateway(streams, metrics=others, name="gw-other") as other:
            waiting = queue.submit(HELLO, user="u1", conversation="c1")  # no worker yet
            elsewhere = other.submit(HELLO, user="u2", conversation="c2")
            await wait_until(lambda: reads(metrics, queue_waiting=1, workers_alive=0))
            await wait_until(lambda: reads(others, queue_waiting=1, workers_alive=0))
            async with worker(streams, make_batcher(), "w1"):
                await read(waiting)
                await read(elsewhere)
                await wait_until(lambda: reads(metrics, queue_waiting=0, workers_alive=1))
        await wait_until(lambda: reads(metrics, queue_waiting=0, workers_alive=0))


async def test_the_gateways_counts_are_unknown_while_redis_is_out_of_reach(
    tmp_path, redis_url, streams
):
    """Not the counts from before the outage, which kept ThreadbotNoWorker and
    ThreadbotWorkerLost quiet (and the dashboard showing workers) whatever happened."""
    from lossy_proxy import lossy_redis

    from storage.connection import Resilience

    metrics, gauges = Metrics(), ("queue_waiting", "workers_alive")

    async def unknown() -> bool:
        values = [metrics.registry.get_sample_value(f"threadbot_{name}") for name in gauges]
        return all(value is not None and math.isnan(value) for value in values)

    async with (
        lossy_redis(redis_url, tmp_path, [], Resilience(0, health_check_s=0)) as (far, proxy),
        gateway(far, metrics=metrics),
    ):
        await wait_until(lambda: reads(metrics, queue_waiting=0, workers_alive=0))
        proxy.cut()
        await wait_until(unknown)
        proxy.back()
        await wait_until(lambda: reads(metrics, queue_waiting=0, workers_alive=0))


async def test_the_hop_is_timed_each_way_on_the_side_that_reads(streams, make_batcher):
    """A worker times each job from its sending to its taking, a gateway each piece of an
    answer from its writing to its reading, both from the stream entries' Redis times; each
    process serves only its own side's."""
    gateway_metrics, worker_metrics = Metrics(), Metrics()
    async with gateway(streams, metrics=gateway_metrics) as queue:
        generation = queue.submit(HELLO, user="u1", conversation="c1")  # no worker yet
        await wait_until(lambda: streams.xlen(keys.JOBS))
        await asyncio.sleep(1)
        async with worker(streams, make_batcher(), "w1", metrics=worker_metrics):
            pieces = await read(generation)
    jobs = sample(worker_metrics, "job_wait_seconds")
    assert jobs["count"] == 1 and 1 <= jobs["sum"] < 10  # it waited for a worker to start
    chunks = sample(gateway_metrics, "chunk_delay_seconds")
    assert pieces and chunks["count"] >= len(pieces) + 2  # started, the text, the end
    assert chunks["sum"] < chunks["count"] * 0.5  # on one machine: milliseconds each
    assert b"chunk_delay" not in worker_metrics.render()
    assert b"job_wait" not in gateway_metrics.render()
    assert b"pending_turns" in gateway_metrics.render()  # turns are journaled by gateways
    assert b"pending_turns" not in worker_metrics.render()


async def test_a_resumed_answers_earlier_pieces_are_not_timed_as_the_hop(streams, make_batcher):
    """A gateway that takes over a dead one's request reads its answer from the start:
    pieces written before it waited are a replay, not the hop's delay."""
    spy = SpyBatcher(make_batcher(max_new_tokens=8))
    async with worker(streams, spy, "w1"):
        first = JobQueue(redis=streams, gateway="gw-dead", max_size=8, timeout=60)
        await first.__aenter__()
        await anext(aiter(first.submit(HELLO, user="u1", conversation="c1")))
        await crash(first)
        await wait_until(lambda: asyncio.sleep(0, bool(spy.answers)))
        await asyncio.sleep(1)  # the whole answer is written, a second ago and more
        metrics = Metrics()
        async with gateway(streams, metrics=metrics) as second:
            assert await read(second.submit(HELLO, user="u1", conversation="c1"))
    chunks = sample(metrics, "chunk_delay_seconds")
    assert chunks["sum"] < 0.5 * max(chunks["count"], 1)  # none read a second late


@pytest.mark.parametrize(
    ("entry_id", "now", "age"),
    [("1000-0", 3.5, 2.5), ("1700000000123-7", 1700000000.5, 0.377), ("5000-0", 3.0, 0.0)],
)
def test_an_entrys_age_is_read_from_its_id_and_never_negative(entry_id, now, age):
    """Redis ids start with the Unix milliseconds of the XADD; a clock behind Redis's
    reads as no wait rather than a negative one."""
    assert entry_age(entry_id, now) == pytest.approx(age)


async def test_an_answers_text_travels_in_few_pieces_and_none_is_lost(
    streams, make_batcher, monkeypatch
):
    """Its first piece goes at once; the rest waits out `TEXT_EVERY_S` (here longer than the
    answer) and goes together, before the end: two writes, not one a token."""
    monkeypatch.setattr("bot.worker.TEXT_EVERY_S", 60)
    async with gateway(streams) as queue, worker(streams, make_batcher(), "w1"):
        generation = queue.submit(HELLO, user="u1", conversation="c1", max_new_tokens=24)
        pieces = await read(generation)
    assert generation.answer_tokens > 2  # more tokens than writes
    assert len(pieces) == 2 and "".join(pieces) == generation.text


def sample(metrics: Metrics, histogram: str) -> dict[str, float]:
    registry = metrics.registry
    return {
        part: registry.get_sample_value(f"threadbot_{histogram}_{part}") or 0
        for part in ("count", "sum")
    }


async def reads(metrics: Metrics, **gauges: float) -> bool:
    """Whether each `threadbot_` gauge named has this value."""
    registry = metrics.registry
    return all(registry.get_sample_value(f"threadbot_{name}") == v for name, v in gauges.items())


async def submitted_alone(queue: JobQueue, streams: Redis) -> tuple[Any, str]:
    """A request sent with no worker alive, and the stream its answer is to come in."""
    generation = queue.submit(HELLO, user="u1", conversation="c1")
    await wait_until(lambda: streams.xlen(keys.JOBS))
    [(_, fields)] = await streams.xrange(keys.JOBS)
    return generation, keys.job_chunks(Job.parse(fields).id)


async def test_chunks_of_an_older_try_are_ignored(streams):
    """A worker given up for dead may still write: its text must not reach the thread."""
    async with gateway(streams) as queue:
        generation, answer = await submitted_alone(queue, streams)
        for chunk in (
            Chunk(2, "new", "started"), Chunk(2, "new", "text", "Hi"),
            Chunk(1, "old", "text", "stale"), Chunk(2, "new", "end", "Hi", 3, 1),
        ):  # fmt: skip
            await streams.xadd(answer, chunk.fields())
        assert await read(generation) == ["Hi"]
        assert (generation.prompt_tokens, generation.answer_tokens) == (3, 1)


async def test_a_malformed_chunk_is_skipped_and_the_answer_read_on(streams):
    """An entry of another version, or of a bug, must not stop the gateway's reader."""
    async with gateway(streams) as queue:
        generation, answer = await submitted_alone(queue, streams)
        await streams.xadd(answer, Chunk(1, "w1", "started").fields())
        await streams.xadd(answer, {"chunk": '{"attempt": 1, "worker": "w1", "kind": "text", '
                                             '"text": null}'})  # fmt: skip
        for chunk in (Chunk(1, "w1", "text", "Hi"), Chunk(1, "w1", "end", "Hi", 3, 1)):
            await streams.xadd(answer, chunk.fields())
        assert await asyncio.wait_for(read(generation), 10) == ["Hi"]


async def test_a_malformed_job_is_dropped_and_the_worker_goes_on(streams, make_batcher):
    [bad, good] = jobs_for(2)
    fields = json.loads(bad.fields()["job"]) | {"deadline": "soon"}
    await streams.xadd(keys.JOBS, {"job": json.dumps(fields)})
    await streams.xadd(keys.JOBS, good.fields())
    async with worker(streams, make_batcher(), "w1"):
        await wait_until(lambda: ended(streams, good.id))
        await wait_until(lambda: _stream_is_empty(streams, keys.JOBS))
    assert not await streams.exists(keys.job_chunks(bad.id))


@pytest.mark.parametrize(
    "fields",
    [
        {"attempt": "2", "worker": "w1", "kind": "text", "text": "Hi"},
        {"attempt": 2, "worker": "w1", "kind": "text", "text": None},
        {"attempt": 2, "worker": "w1", "kind": "shout"},
        {"attempt": True, "worker": "w1", "kind": "end"},
        ["not", "an", "object"],
    ],
)
def test_a_chunk_of_the_wrong_types_is_refused_where_it_is_read(fields):
    with pytest.raises(ValueError):
        Chunk.parse({"chunk": json.dumps(fields)})


def test_a_chunk_from_an_older_worker_without_token_counts_reads_as_zero():
    """Workers before the counts came with every chunk sent them with the end only."""
    old_text = {"chunk": '{"attempt": 1, "worker": "w1", "kind": "text", "text": "Hi"}'}
    assert Chunk.parse(old_text) == Chunk(1, "w1", "text", "Hi", 0, 0)


async def test_writes_whose_replies_were_lost_land_once(tmp_path, redis_url, streams, make_batcher):
    """Redis ran the job's send and the answer's first text write, but both replies were
    lost, so the clients sent each again: the job runs once and its text reads once."""
    from lossy_proxy import lossy_redis

    from storage.connection import Resilience

    batcher, metrics = make_batcher(max_new_tokens=24), Metrics()
    lose = [b'"conversation": ', b'"kind": "text"']  # in a job sent; in a chunk written
    async with (
        lossy_redis(redis_url, tmp_path, lose, Resilience(health_check_s=0)) as (redis, proxy),
        gateway(redis) as queue,
        worker(redis, batcher, "w1", metrics=metrics),
    ):
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        pieces = await read(generation)
        await asyncio.sleep(0.5)  # time for a second copy of the job to be taken
    assert proxy.lost == lose
    assert sample(metrics, "job_wait_seconds")["count"] == 1
    assert "".join(pieces) == generation.text == answer_alone(batcher, HELLO)


async def test_a_job_answered_and_read_is_not_run_again(streams, make_batcher, caplog):
    """Its end was written and read, but it is delivered again (the worker failed before
    acknowledging it): the worker drops it rather than write the answer a second time."""
    async with gateway(streams) as queue, worker(streams, make_batcher(), "w1"):
        with caplog.at_level(logging.INFO, logger="bot.worker"):
            generation = queue.submit(HELLO, user="u1", conversation="c1")
            [watch] = queue._watches.values()
            await read(generation)
            await streams.xadd(keys.worker_jobs("w1"), watch.job.fields())
            await wait_until(lambda: _stream_is_empty(streams, keys.worker_jobs("w1")))
    taken = [
        r for r in caplog.records if r.getMessage().startswith("job ") and "taken" in r.getMessage()
    ]
    assert len(taken) == 1


async def _stream_is_empty(redis: Redis, stream: str) -> bool:
    return await redis.xlen(stream) == 0


async def test_a_job_delivered_but_never_read_is_taken_at_the_next_sweep(streams, make_batcher):
    """The reply to a worker's XREADGROUP was lost (here another client reads the job in
    its name), and the retry got nothing: the job is the worker's, unread. Its next sweep
    takes it, long before any worker would claim it as abandoned (a minute here), and the
    lost delivery is no failed try: with one try allowed, the job was given up unrun."""
    async with gateway(streams) as queue:
        generation = queue.submit(HELLO, user="u1", conversation="c1")  # no worker: shared
        await wait_until(lambda: streams.xlen(keys.JOBS))
        await streams.xgroup_create(keys.JOBS, GROUP, id="0")
        assert await streams.xreadgroup(GROUP, "w1", {keys.JOBS: ">"}, 1)
        async with worker(
            streams, make_batcher(), "w1", claim_idle_s=60, max_deliveries=1
        ) as working:
            await asyncio.sleep(LOST_AFTER_MS / 1000)
            await working._sweep()
            pieces = await asyncio.wait_for(read(generation), 10)
    assert pieces and "".join(pieces) == generation.text


async def test_a_failed_try_that_could_not_be_handed_back_still_counts_as_failed(
    tmp_path, redis_url, streams, make_batcher, caplog
):
    """A job fails while Redis is out of reach, so its hand-back fails too: the worker's
    next sweep takes it back as never read, and that try counts as failed all the same
    (with one try allowed: given up, not run again), not as a delivery lost unrun."""
    from lossy_proxy import lossy_redis

    from storage.connection import Resilience

    failing = FailsAtTheGate(make_batcher())
    async with (
        lossy_redis(redis_url, tmp_path, [], Resilience(0, health_check_s=0)) as (far, proxy),
        gateway(streams) as queue,
        worker(far, failing, "w1", claim_idle_s=60, max_deliveries=1) as working,
    ):
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        await wait_until(lambda: asyncio.sleep(0, bool(failing.prompts)))
        with caplog.at_level(logging.WARNING, logger="bot.worker"):
            proxy.cut()
            failing.gate.set()
            await wait_until(lambda: asyncio.sleep(0, not working._running))
            proxy.back()
        assert "could not hand back" in caplog.text
        await asyncio.sleep(LOST_AFTER_MS / 1000)
        await working._sweep()
        with pytest.raises(JobFailed, match="1 tries"):
            await asyncio.wait_for(read(generation), 10)
    assert len(failing.prompts) == 1


async def test_redis_lost_mid_answer_and_back_loses_and_repeats_nothing(tmp_path, make_batcher):
    """A redis-server SIGKILLed while an answer streams, and started again two seconds
    later, past the clients' own retries (REDIS_RETRIES): the worker's writes and the
    gateway's reads ride it out, and the answer arrives whole, once, with no second try."""
    from processes import RedisServer

    from storage.connection import Resilience, open_redis

    server = RedisServer(tmp_path / "redis")
    server.start()
    batcher = make_batcher(max_new_tokens=40)
    riding_out = Resilience(health_check_s=0)
    try:
        async with (
            open_redis(redis_url=server.url, data_dir=tmp_path, resilience=riding_out) as redis,
            gateway(redis) as queue,
            worker(redis, batcher, "w1"),
        ):
            generation = queue.submit(HELLO, user="u1", conversation="c1")
            chunks = [await anext(aiter(generation))]
            server.kill()
            await asyncio.sleep(2)
            server.start()
            chunks += await read(generation)  # AnswerRestarted would fail the test here
    finally:
        server.kill()
    assert "".join(chunks) == generation.text == answer_alone(batcher, HELLO)


async def test_an_answer_whose_acknowledgement_fails_is_no_failed_try(
    tmp_path, redis_url, streams, make_batcher, caplog
):
    """The answer's end is written, and the acknowledgement's reply is lost (Redis ran
    it): the job is over all the same. It was logged as failed, and the worker marked as
    failing, which left abandoned jobs to other workers for the claim idle time."""
    from lossy_proxy import lossy_redis

    from storage.connection import Resilience

    batcher = make_batcher(max_new_tokens=12)
    no_retries = Resilience(0, health_check_s=0)
    async with (
        # The first script the worker runs is the acknowledgement (no sweep comes before).
        lossy_redis(redis_url, tmp_path, [b"EVALSHA"], no_retries) as (far, _),
        gateway(streams) as queue,
        worker(far, batcher, "w1", claim_idle_s=60),
    ):
        with caplog.at_level(logging.INFO, logger="bot.worker"):
            answer = await read(queue.submit(HELLO, user="u1", conversation="c1"))
            await wait_until(lambda: asyncio.sleep(0, "could not acknowledge" in caplog.text))
        failing = await streams.exists(keys.worker_failing("w1"))
    assert "".join(answer) == answer_alone(batcher, HELLO)
    assert "answered" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert not failing


@pytest.mark.parametrize("ends_by", ["stopping", "deadline"])
async def test_an_answer_ended_while_redis_is_out_is_no_failed_try(
    tmp_path, redis_url, streams, make_batcher, caplog, ends_by
):
    """A worker waits out Redis to write its answer; meanwhile it is stopped (a redeploy),
    or the job's deadline passes: handed on as a stopping worker's, or dropped as out of
    time, as without the outage. It was logged as failed, and handed back as a failed try."""
    from lossy_proxy import lossy_redis

    from storage.connection import Resilience

    running = SlowSteps(make_batcher(max_new_tokens=60))
    async with (
        lossy_redis(redis_url, tmp_path, [], Resilience(0, health_check_s=0)) as (far, proxy),
        gateway(streams, timeout=3 if ends_by == "deadline" else 60) as queue,
        worker(far, running, "w1", claim_idle_s=60) as working,
    ):
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        await anext(aiter(generation))
        with caplog.at_level(logging.INFO, logger="bot.worker"):
            proxy.cut()
            await wait_until(lambda: asyncio.sleep(0, "cannot write" in caplog.text))
            if ends_by == "stopping":
                assert await working.finish(0) == 1
            await wait_until(lambda: asyncio.sleep(0, not working._running))
        proxy.back()
    said = {"stopping": "could not hand back", "deadline": "ran out of time"}[ends_by]
    assert said in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_a_redis_outage_past_the_claim_idle_time_moves_no_running_answer(
    tmp_path, redis_url, streams, make_batcher
):
    """Both workers lose Redis for longer than the claim idle time, so the job running on
    one looks abandoned when Redis is back. The other's first sweep then leaves it to its
    worker, which keeps it: the answer ends where it began, once, never restarted."""
    from lossy_proxy import lossy_redis

    from storage.connection import Resilience

    running, idle = SlowSteps(make_batcher(max_new_tokens=60)), SpyBatcher(make_batcher())
    async with (
        # No retries: a worker's client backing off through the outage would keep the
        # job late, beyond this test's short claim idle time.
        lossy_redis(redis_url, tmp_path, [], Resilience(0, health_check_s=0)) as (far, proxy),
        gateway(streams) as queue,
        worker(far, running, "w1"),
    ):
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        first = await anext(aiter(generation))
        async with worker(far, idle, "w2") as other:
            proxy.cut()
            await asyncio.sleep(CLAIM_IDLE_S * 4)
            proxy.back()
            await other._sweep()  # before w1's keep-alive, due within a third of the idle time
            rest = await read(generation)  # AnswerRestarted would fail the test here
    assert not idle.answers
    assert first + "".join(rest) == generation.text == answer_alone(running.batcher, HELLO)


@pytest.mark.parametrize("starts", ["early", "late"])
async def test_a_worker_started_in_an_outage_moves_no_running_answer_once_redis_is_back(
    tmp_path, redis_url, streams, make_batcher, starts
):
    """A worker (a pod restarted then) starts while Redis is out of reach for longer than
    the claim idle time: when Redis is back, its first sweep leaves the job running on
    another worker to it, as a worker that lost Redis once running does, where it took
    the job (it looked abandoned) and the answer started again. Started late in the
    outage, Redis back within seconds: its start counted as a heartbeat, and the gap as
    too short to be one."""
    from lossy_proxy import lossy_redis

    from storage.connection import Resilience

    running, idle = SlowSteps(make_batcher(max_new_tokens=60)), SpyBatcher(make_batcher())
    async with (
        lossy_redis(redis_url, tmp_path, [], Resilience(0, health_check_s=0)) as (far, proxy),
        gateway(streams) as queue,
        worker(far, running, "w1"),
        InferenceQueue(batcher=idle, max_size=8, timeout=60) as inference,
    ):
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        first = await anext(aiter(generation))
        proxy.cut()
        late = Worker(
            redis=far, inference=inference, name="w2", rows=idle.max_batch,
            claim_idle_s=CLAIM_IDLE_S, max_deliveries=3,
        )  # fmt: skip
        before, after = (0, CLAIM_IDLE_S * 4) if starts == "early" else (CLAIM_IDLE_S * 4, 0.1)
        await asyncio.sleep(before)
        await late._first_beat()  # as its `run` begins: Redis does not answer
        await asyncio.sleep(after)
        proxy.back()
        await late._sweep()  # before w1's keep-alive, due within a third of the idle time
        rest = await read(generation)  # AnswerRestarted would fail the test here
        await late.finish(0)
    assert not idle.answers
    assert first + "".join(rest) == generation.text == answer_alone(running.batcher, HELLO)


class SkewedTime:
    """The `time` module of a machine whose clock is `by` seconds off; its monotonic clock
    (which no other machine reads) as it is."""

    def __init__(self, by: float) -> None:
        self.by = by

    def time(self) -> float:
        return time.time() + self.by

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.mark.parametrize(
    "module, by", [(bot.job_queue, -600), (bot.worker, 600)], ids=["gateway-behind", "worker-ahead"]
)
async def test_a_gateway_and_a_worker_ten_minutes_apart_answer_on_redis_s_clock(
    streams, make_batcher, monkeypatch, module, by
):
    """One machine without NTP: a job's deadline is set and checked on Redis's clock, so
    the worker does not take a fresh job for one long past its deadline, and drop it."""
    monkeypatch.setattr(module, "time", SkewedTime(by), raising=False)
    batcher = make_batcher(max_new_tokens=8)
    async with gateway(streams, timeout=5) as queue, worker(streams, batcher, "w1"):
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        pieces = await read(generation)
    assert "".join(pieces) == generation.text == answer_alone(batcher, HELLO)


def test_redis_s_clock_runs_on_from_its_reading_whatever_this_machine_s_says():
    clock = RedisClock()
    assert abs(clock.now() - time.time()) < 1  # no reading yet: this machine's
    clock.heard((1_000, 500_000))  # TIME's seconds and microseconds
    assert 1_000.5 <= clock.now() < 1_001.5
