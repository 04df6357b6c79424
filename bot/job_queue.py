"""JobQueue: a gateway's `Inference`, whose answers workers write (the protocol: `bot.jobs`).

`submit` returns a `Generation` at once, as the in-process queue does; a task sends the
job to its conversation's worker. One reader task follows every job's answer stream with
one blocking XREAD, from the last entry it read, so a Redis that drops and comes back loses
and repeats nothing. A job sent wakes the reader through this gateway's own wake stream,
so a new answer is followed at once, not at the next poll.

A job sent is recorded under its request's fingerprint until its deadline. A gateway that
resumes a turn another gateway had sent (that one died) finds it there and reads that
job's answer from its start, rather than making a worker write it a second time.

Busy is decided on what waits: the jobs no worker has taken, in every stream, counted
twice a second, plus those this gateway sent since; the live workers are listed with
them, for /readyz and the `threadbot_workers_alive` gauge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from typing import Any, Self

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot.health import READY
from bot.jobs import (
    TIMED_OUT,
    Chunk,
    Job,
    JobFailed,
    RedisClock,
    entry_age,
    job_counts,
    pick_worker,
    roll_call,
)
from bot.metrics import Metrics
from bot.queue import Generation, InferenceTimeout, QueueFull, QueuePlace
from bot.types import ChatMessage
from bot.waiting import set_within
from storage import keys

logger = logging.getLogger(__name__)

COUNT_EVERY_S = 0.5
READ_BLOCK_MS = 1_000  # a reader waiting this long with nothing new reads again
OUTAGE_PAUSE_S = 0.5
ANSWER_READ_KEPT_S = 30  # for another gateway that began following the job as it ended
WAKE_KEPT_S = 86400  # a crashed gateway's wake stream is gone a day after its last job
# The job into its worker's stream where that stream is there (a worker removed meanwhile
# has none: into the shared one then; a gateway never makes a worker's stream, which no
# worker would read), recorded as its request's (so a record never names a job that was
# not sent), with where it went, and the reader woken: one atomic step. Returns the stream
# and the job's entry id, also to a retry of a send whose reply was lost (the job's own
# record of where it went is there), which sends nothing again.
_SEND = """
local sent = redis.call('HMGET', KEYS[5], 's', 'e')
if sent[1] then return sent end
local stream = KEYS[1]
if redis.call('EXISTS', stream) == 0 then stream = KEYS[2] end
local entry = redis.call('XADD', stream, '*', 'job', ARGV[1])
redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3])
redis.call('HSET', KEYS[5], 's', stream, 'e', entry)
redis.call('EXPIRE', KEYS[5], ARGV[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '1', '*', 'job', ARGV[2])
redis.call('EXPIRE', KEYS[4], ARGV[4])
return {stream, entry}
"""


@dataclass(eq=False)
class _Watch:
    """One job this gateway waits on, and how far its answer has been read."""

    job: Job
    generation: Generation
    # When this gateway began to wait, on Redis's clock: pieces written before are a
    # replay (of a job that a gateway before it sent), not the hop's delay.
    since: float
    last_id: str = "0-0"
    attempt: int = 0  # the attempt being read; 0 until its worker took it
    entry: tuple[str, str] | None = None  # its stream and entry id, once this gateway sent it
    read: int = 0  # characters of this attempt's answer read


class JobQueue:
    """Jobs for workers behind Redis Streams, read back as they are written."""

    def __init__(
        self,
        *,
        redis: Redis,
        gateway: str,
        max_size: int,
        timeout: float,
        metrics: Metrics | None = None,
    ) -> None:
        self.redis = redis
        self.gateway = gateway  # this process's name: its wake stream's
        self.max_size = max_size
        self.timeout = timeout
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.expect_workers()
        self.died = asyncio.Event()  # never set: workers come and go, the queue stays
        self._watches: dict[str, _Watch] = {}  # by answer stream, in the order sent
        self._wake = keys.gateway_wake(gateway)
        self._wake_id = "0-0"
        self._send_script = redis.register_script(_SEND)
        self._waiting = 0  # jobs no worker has taken, as last counted, plus those sent since
        self._held = 0
        self._workers: list[str] | None = None  # alive, as last counted; None: not yet
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        self.clock = RedisClock()  # jobs' deadlines are on it, which workers share
        # Cancels Redis did not take (an outage), by job id, with when they are pointless
        # (monotonic): sent again at each count, or a worker writes the whole answer
        # unread, and a Regenerate of its request follows it, not a new job.
        self._cancels_owed: dict[str, float] = {}

    async def __aenter__(self) -> Self:
        with contextlib.suppress(RedisError):  # (meanwhile, this machine's clock)
            await self.clock.read(self.redis)
        self._spawn(self._read_answers())
        self._spawn(self._count_jobs())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop reading; the jobs still running are cancelled (their turns stay pending)."""
        self._closed.set()
        for watch in list(self._watches.values()):
            watch.generation.cancel()
        with contextlib.suppress(RedisError):
            await self._wake_reader(stop="1")
        if self._tasks:  # they end by the flag (see `Worker`: a cancel may be swallowed)
            await asyncio.wait(self._tasks, timeout=READ_BLOCK_MS / 1000 + 1)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1)
        with contextlib.suppress(RedisError):
            await self.redis.delete(self._wake)

    @property
    def depth(self) -> int:
        """Jobs waiting or running on the workers, every gateway's."""
        return self._held

    @property
    def room(self) -> int:
        """Jobs that may be sent before `max_size` wait for a worker (running ones are
        bounded by the workers' rows)."""
        return max(self.max_size - self._waiting, 0)

    def checks(self) -> dict[str, str]:
        if self._workers is None:
            return {"workers": "not listed yet"}
        return {"workers": READY if self._workers else "no worker alive"}

    def places(self, user: str) -> list[QueuePlace]:
        """This gateway's jobs for `user`: 0 once a worker took one, else its place among
        this gateway's waiting jobs."""
        waiting = [w for w in self._watches.values() if not w.attempt]
        return [
            QueuePlace(w.job.conversation, 0 if w.attempt else waiting.index(w) + 1)
            for w in self._watches.values()
            if w.job.user == user and not w.generation.cancelled
        ]

    def submit(
        self,
        messages: list[ChatMessage],
        *,
        user: str,
        conversation: str,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Generation:
        """Send a job for an answer; see `bot.queue.Inference`."""
        if self._waiting >= self.max_size or self._closed.is_set():
            raise QueueFull
        generation = Generation.submitted(
            messages,
            user=user,
            conversation=conversation,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            timeout=self.timeout,
        )
        job = Job(
            id=uuid.uuid4().hex,
            conversation=conversation,
            user=user,
            messages=messages,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            deadline=self.clock.now() + self.timeout,
        )
        watch = _Watch(job, generation, since=self.clock.now())
        generation.on_cancel = lambda: self._spawn(self._cancel(watch))
        self._watches[keys.job_chunks(job.id)] = watch
        self._waiting += 1
        self._held += 1
        self._spawn(self._send(watch))
        return generation

    async def _send(self, watch: _Watch) -> None:
        """Into the conversation's worker's stream (the shared one with none alive; see
        `_SEND`); or, where the same request was sent before and is still wanted, follow
        that job instead."""
        job = watch.job
        try:
            if await self._follow_earlier(watch):
                return
            worker = pick_worker(job.conversation, (await roll_call(self.redis)).alive)
            sent = await self._send_script(
                keys=[
                    keys.worker_jobs(worker) if worker else keys.JOBS, keys.JOBS,
                    keys.job_asked(job.fingerprint()), self._wake, keys.job_sent(job.id),
                ],
                args=[job.fields()["job"], job.id, self._asked_for_s, WAKE_KEPT_S],
            )  # fmt: skip
        except Exception as error:  # an outage leaves the turn pending; the service knows
            self._forget(watch)
            watch.generation.fail(error)
            return
        watch.entry = (sent[0], sent[1])
        if watch.generation.cancelled:  # while it was being sent: `_cancel` had no entry
            with contextlib.suppress(RedisError):  # a worker drops it, told by the cancel
                await self.redis.xdel(*watch.entry)
        logger.debug("job %s sent to %s", job.id, sent[0])

    @property
    def _cancel_kept_s(self) -> int:
        """How long a job's cancel (or its answered mark) is kept: past any worker's take."""
        return round(self.timeout) + 60

    @property
    def _asked_for_s(self) -> int:
        """How long a request's job is worth following: as long as an answer is waited for."""
        return max(round(self.timeout), 1)

    async def _follow_earlier(self, watch: _Watch) -> bool:
        """If another gateway's job of the same request is there and not cancelled, read
        that one's answer instead (True). Not one past half its time: it keeps the dead
        gateway's deadline, and a worker that takes it later drops it unanswered; it is
        cancelled, and this gateway sends its own."""
        asked = keys.job_asked(watch.job.fingerprint())
        async with self.redis.pipeline(transaction=False) as pipe:
            earlier, left_ms = await pipe.get(asked).pttl(asked).execute()
        if earlier is None or keys.job_chunks(earlier) in self._watches:
            return False  # none, or this gateway's own: asked twice at once
        if earlier in self._cancels_owed or await self.redis.exists(keys.job_cancel(earlier)):
            return False
        if left_ms < self._asked_for_s * 1000 / 2:
            await self._mark_cancelled(earlier)
            logger.info("not following job %s, sent long before: asking again", earlier)
            return False
        if self._watches.pop(keys.job_chunks(watch.job.id), None) is None:
            # Cancelled meanwhile (a Stop, a reset): the earlier job is not wanted either.
            await self._mark_cancelled(earlier)
            return True
        watch.job = replace(watch.job, id=earlier)
        self._watches[keys.job_chunks(earlier)] = watch
        await self._wake_reader(job=earlier)
        logger.info("following job %s, sent before for the same request", earlier)
        return True

    async def _wake_reader(self, **fields: str) -> None:
        """Wake the reader, whose XREAD blocks on this stream too."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self._wake, fields, maxlen=1)
            pipe.expire(self._wake, WAKE_KEPT_S)
            await pipe.execute()

    async def _cancel(self, watch: _Watch) -> None:
        """Tell the job's worker to stop (it checks as it writes, and before it starts: the
        job may not be sent yet), and read no more. One that no worker has started is
        taken out of its stream too: it waited there, counted against QUEUE_MAX, until a
        worker with a row free read it. (A worker that has just read it drops it, told by
        the cancel; one that claims it finds it deleted.)"""
        self._forget(watch)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(keys.job_cancel(watch.job.id), "1", ex=self._cancel_kept_s)
                if watch.entry is not None and not watch.attempt:
                    pipe.xdel(*watch.entry)
                await pipe.execute()
        except RedisError as error:
            logger.warning("could not cancel job %s yet: %s", watch.job.id, error)
            self._cancels_owed[watch.job.id] = time.monotonic() + self._cancel_kept_s

    async def _send_owed_cancels(self) -> None:
        """The cancels an outage kept from Redis (`_cancel`); the job's entry, if no worker
        took it, a worker that reads it drops."""
        now = time.monotonic()
        for job_id, pointless_at in list(self._cancels_owed.items()):
            if now < pointless_at:
                await self._mark_cancelled(job_id)
            del self._cancels_owed[job_id]

    async def _mark_cancelled(self, job_id: str) -> None:
        await self.redis.set(keys.job_cancel(job_id), "1", ex=self._cancel_kept_s)

    def _forget(self, watch: _Watch) -> None:
        if self._watches.pop(keys.job_chunks(watch.job.id), None) is not None:
            watch.generation.released()

    # --- the reader -----------------------------------------------------------------------

    async def _read_answers(self) -> None:
        outage = False
        while not self._closed.is_set():
            streams = {self._wake: self._wake_id}
            streams |= {key: watch.last_id for key, watch in self._watches.items()}
            try:
                replies = await self.redis.xread(streams, block=READ_BLOCK_MS)
            except RedisError as error:
                if not outage:
                    logger.warning("cannot read answers from Redis; retrying: %s", error)
                outage = True
                await asyncio.sleep(OUTAGE_PAUSE_S)
                continue
            if outage:
                logger.warning("reading answers from Redis again")
            outage = False
            for stream, entries in replies:
                for entry_id, fields in entries:
                    self._read(stream, entry_id, fields)

    def _read(self, stream: str, entry_id: str, fields: dict[str, str]) -> None:
        if stream == self._wake:
            self._wake_id = entry_id
            return
        if (watch := self._watches.get(stream)) is None:
            return  # over: cancelled, or ended earlier in this batch
        watch.last_id = entry_id
        now = self.clock.now()
        if (age := entry_age(entry_id, now)) <= now - watch.since:
            self.metrics.chunk_delay.observe(age)
        try:
            chunk = Chunk.parse(fields)
        except (KeyError, TypeError, ValueError):
            logger.warning("skipping a malformed entry %s in %s", entry_id, stream)
            return
        self._follow(watch, chunk)

    def _follow(self, watch: _Watch, chunk: Chunk) -> None:
        if chunk.attempt < watch.attempt:
            return  # a worker that was given up for dead writes on; its answer is void
        generation = watch.generation
        if chunk.attempt > watch.attempt:
            if watch.read:
                logger.info("job %s starts again on %s", watch.job.id, chunk.worker)
                generation.restart()
            else:
                generation.started()
                self._waiting = max(self._waiting - 1, 0)
            watch.attempt, watch.read = chunk.attempt, 0
        if chunk.kind == "text":
            if chunk.offset is not None and chunk.offset < watch.read:
                return  # written twice: a write retried after its reply was lost
            watch.read += len(chunk.text)
            generation.write(chunk.text, chunk.prompt_tokens, chunk.answer_tokens)
        elif chunk.kind == "restart" and watch.read:
            generation.restart()
            watch.read = 0
        elif chunk.kind in ("end", "error"):
            self._forget(watch)
            self._held = max(self._held - 1, 0)
            self._spawn(self._finish(watch.job, generation, chunk))

    async def _finish(self, job: Job, generation: Generation, last: Chunk) -> None:
        """An answer read to its end: its request's record goes, then the answer is given,
        then its stream is left to expire soon and the job is marked answered. So the same
        request asked again once it is answered is a new job; a gateway that found the
        record just before it went still reads the whole answer; a gateway dying between
        the steps leaves no record of nothing; and a worker that would run the job again
        (its end written, but a failure before it was acknowledged) drops it. (All expire
        by themselves too.)"""
        asked = keys.job_asked(job.fingerprint())
        with contextlib.suppress(RedisError):
            if await self.redis.get(asked) == job.id:
                await self.redis.delete(asked)
        if last.kind == "end":
            generation.end(last.text, last.prompt_tokens, last.answer_tokens)
        else:
            generation.fail(InferenceTimeout() if last.text == TIMED_OUT else JobFailed(last.text))
        with contextlib.suppress(RedisError):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.expire(keys.job_chunks(job.id), ANSWER_READ_KEPT_S)
                pipe.set(keys.job_answered(job.id), "1", ex=self._cancel_kept_s)
                await pipe.execute()

    async def _count_jobs(self) -> None:
        while not self._closed.is_set():
            try:
                await self.clock.read(self.redis)
                roll = await roll_call(self.redis)
                counts = await job_counts(self.redis, roll.streams)
            except RedisError:  # unknown: the counts from before would keep alerts quiet
                self.metrics.queue_waiting.set(math.nan)
                self.metrics.workers_alive.set(math.nan)
            else:
                self._waiting, self._held, self._workers = counts.waiting, counts.held, roll.alive
                # This gateway's own, so that a dashboard's sum over gateways is the backlog.
                self.metrics.queue_waiting.set(sum(not w.attempt for w in self._watches.values()))
                self.metrics.workers_alive.set(len(roll.alive))
            with contextlib.suppress(RedisError):  # kept for the next count
                await self._send_owed_cancels()
            await set_within(self._closed, COUNT_EVERY_S)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
