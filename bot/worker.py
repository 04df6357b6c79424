"""Worker: takes jobs from Redis Streams (`bot.jobs`) and writes their answers with this
process's `Inference`: the local model's queue, or an OpenAI-compatible server.

It reads only as many jobs as it has free rows, from its own stream (its conversations)
and the shared one, so load spreads by itself; with rows free it also takes what has
waited a while in other workers' streams (a full worker's, or a dead one's). Every third of
`JOB_CLAIM_IDLE_S` it keeps its running jobs from looking abandoned and stops those whose
gateway cancelled them, and, while it takes jobs, sweeps: renews its heartbeat and claims
other workers' abandoned jobs (after a Redis outage, not before their workers could keep
the running ones). A worker stalled past that idle time finds its jobs
claimed by another: it drops them, so each answer is written by one worker at a time.
Whatever it does to a job (acknowledge, hand back, keep) it does only while it holds it.

A job whose answer fails here is handed back at once (made claimable, not acknowledged),
so another try runs; the delivery count in Redis counts the tries. For a claim idle time
after a failure, a worker leaves abandoned jobs to the live workers that had none: it may
be what fails them, and, failing fast, it would have rows free to take them first. A job
INFERENCE_URL refuses (a 400) is given up at once: so would every try be. A
stopping worker takes no more jobs, keeps its running ones through the grace period, and
hands back what it could not finish in it: passed on, a try that does not count as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from bot.jobs import (
    CHUNKS_MAXLEN,
    DEAD_MAXLEN,
    TIMED_OUT,
    Chunk,
    ChunkKind,
    Job,
    RedisClock,
    Roll,
    entry_age,
    roll_call,
)
from bot.metrics import Metrics
from bot.openai_backend import InferenceUnavailable
from bot.queue import (
    AnswerRestarted,
    Generation,
    Inference,
    InferenceCancelled,
    InferenceTimeout,
    UnusableOutput,
)
from bot.waiting import set_within
from storage import keys
from storage.errors import is_outage

logger = logging.getLogger(__name__)

GROUP = keys.WORKERS_GROUP
READ_BLOCK_MS = 500
TAKE_FROM_OTHERS_EVERY_S = 0.5
TAKE_FROM_OTHERS_AFTER_S = 1.0
"""A job waiting in another worker's stream is taken here only once it has waited this long.
That worker holds its conversation's KV cache, and one busy on its core reads its stream a
little late: taken at once, two workers' conversations split 31/17 in `make bench-scale`
(AMX Xeon), where rendezvous hashing had spread them 8/8 a round. Longer than this, that
worker is full (or dead)."""
OUTAGE_PAUSE_S = 0.5
CLAIM_SCANS = 100  # XAUTOCLAIM calls a sweep makes on a stream, at most
ANSWER_KEPT_S = 300  # an answer stream outlives its job's deadline by this, for a slow reader
LOST_AFTER_MS = 2_000
"""A job this worker holds but does not run, idle this long, was delivered to it and never
read: the reply to its XREADGROUP or XAUTOCLAIM was lost, and the client's retry got
nothing more. (A job being taken is idle for milliseconds.)"""
DEAD_MARK_S = 24 * 3600
"""How long a job given up is remembered as such: far past any redelivery of it."""
TEXT_EVERY_S = 0.1
"""After its first piece, which goes at once, an answer's text goes to Redis at most this
often, the pieces written meanwhile together: a platform shows an answer's progress a few
times a second, where a model on a GPU writes a token every few milliseconds, and each
write costs a round trip here, work in Redis and a read on the gateway."""
# Deleting a consumer discards the jobs it holds: check that it holds none in the same step.
_DROP_IDLE_CONSUMER = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""
# A dead worker's stream and its name go only while no job is in it: a gateway's job sent
# meanwhile waits there for the others to take it, or (see `bot.job_queue._SEND`) goes
# to the shared stream once this stream is gone.
_FORGET_IF_EMPTY = """
if redis.call('XLEN', KEYS[1]) > 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""
# A job is touched only while this worker still holds it (another may have claimed it
# from a stalled or stopping worker): each script returns 1 if it did, 0 if not.
_IF_MINE = """
local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)[1]
if not entry or entry[2] ~= ARGV[2] then return 0 end
"""
# A job given up goes to the dead letters once: a retry of this script (its reply lost),
# or a second try at giving it up (its acknowledgement failed), finds its mark and adds
# nothing. The mark follows the entry: a script's writes before an error stay written.
# ARGV: the mark's lifetime, the stream's length, then the entry's fields.
_DEAD_LETTER_ONCE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
return 1
"""
# Its idle time reset: it is running.
_KEEP_IF_MINE = (
    _IF_MINE
    + """
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""
)
# Made to look abandoned for ARGV[4] ms, so the next sweep of any worker claims it.
_MAKE_ABANDONED = """
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[4], 'JUSTID')
return 1
"""
_HAND_BACK_IF_MINE = _IF_MINE + _MAKE_ABANDONED
# As a stopping worker does: the try counted as passed on, not failed: its delivery count
# (XPENDING's) in the set KEYS[2], kept ARGV[5] seconds, so a retry of the script after
# its reply was lost counts it once.
_PASS_ON_IF_MINE = (
    _IF_MINE
    + """
redis.call('SADD', KEYS[2], entry[4])
redis.call('EXPIRE', KEYS[2], ARGV[5])
"""
    + _MAKE_ABANDONED
)
# Over: out of the group's pending list and out of the stream.
_ACKNOWLEDGE_IF_MINE = (
    _IF_MINE
    + """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""
)


Entry = tuple[str, str]
"""A job's stream and its entry id there: ids repeat across streams (a gateway's jobs for two
workers, added in one millisecond, get the same one)."""


@dataclass(eq=False)
class _Taken:
    """A job this worker is answering, and where it came from."""

    stream: str
    entry_id: str
    job: Job
    attempt: int  # its delivery count: 1, then one more for each worker that took it
    generation: Generation | None = None
    written: int = 0  # characters of its answer written to its stream
    cancelled: bool = False  # its gateway no longer wants it
    lost: bool = False  # another worker claimed it (this one stalled): that one answers
    handed_back: bool = False  # made claimable by any worker: kept here no more

    @property
    def entry(self) -> Entry:
        return self.stream, self.entry_id


class Worker:
    """Answers jobs from the streams until stopped."""

    def __init__(
        self,
        *,
        redis: Redis,
        inference: Inference,
        name: str,
        rows: int,
        claim_idle_s: float,
        max_deliveries: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.redis = redis
        self.inference = inference
        self.name = name
        self.rows = rows
        self.claim_idle_ms = round(claim_idle_s * 1000)
        self.max_deliveries = max_deliveries
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.expect_jobs()
        self.own = keys.worker_jobs(name)
        self.streams = (self.own, keys.JOBS)  # where its new jobs come from, its own first
        self._running: dict[Entry, _Taken] = {}
        # One take of jobs (read, claim) at a time, from counting the rows free to the
        # jobs running: the reader and the sweep, taking at once, would each take them all.
        self._taking = asyncio.Lock()
        # A keep of the running jobs and a hand-back, one at a time: a keep that read a job
        # as running and reached Redis after its hand-back reset its idle time to 0, and the
        # job stayed this worker's (which then took it back as never read).
        self._keeping_or_handing_back = asyncio.Lock()
        # Jobs this worker failed and could not hand back (Redis out of reach), and when:
        # taken back as never read (`_take_lost`), their try still counts as failed.
        self._failed_unhanded: dict[Entry, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._drop_consumer = redis.register_script(_DROP_IDLE_CONSUMER)
        self._keep_if_mine = redis.register_script(_KEEP_IF_MINE)
        self._hand_back_if_mine = redis.register_script(_HAND_BACK_IF_MINE)
        self._pass_on_if_mine = redis.register_script(_PASS_ON_IF_MINE)
        self._acknowledge_if_mine = redis.register_script(_ACKNOWLEDGE_IF_MINE)
        self._forget_if_empty = redis.register_script(_FORGET_IF_EMPTY)
        self._dead_letter_once = redis.register_script(_DEAD_LETTER_ONCE)
        # Flags, not cancellation, stop the loops: on Python 3.11 a cancel that lands in
        # redis-py's own `wait_for` can be swallowed.
        self._stop = asyncio.Event()
        self._finished = asyncio.Event()  # no running job is left to keep
        self._keeping: asyncio.Task[None] | None = None
        self.clock = RedisClock()  # jobs' deadlines are on it, set by other machines
        self._beaten: float | None = None  # when the last heartbeat was written
        self._in_touch_since = -math.inf  # since the last gap in the heartbeats

    async def run(self) -> None:
        """Take jobs until `stop`, sweeping meanwhile; then, with the heartbeat gone (so
        gateways send elsewhere and others take what waits in this worker's stream),
        return while the running answers go on (see `finish`)."""
        await self._first_beat()
        logger.info("worker %s taking jobs (%d rows)", self.name, self.rows)
        # Running jobs are kept until `finish`: a stopped worker's answers go on through
        # the grace period, where the sweep ends with the taking of jobs.
        self._keeping = asyncio.create_task(
            self._every_sweep(self._keep_running_jobs, "keeping the running jobs", self._finished)
        )
        sweeping = asyncio.create_task(self._every_sweep(self._sweep, "worker sweep", self._stop))
        try:
            await self._keep_reading()
        finally:
            self.stop()
            await sweeping
            with contextlib.suppress(RedisError):
                await self.redis.delete(keys.worker(self.name))

    def stop(self) -> None:
        """Take no more jobs."""
        self._stop.set()
        self._room.set()

    @property
    def stopping(self) -> bool:
        """Told to stop: its running answers may still be going on."""
        return self._stop.is_set()

    async def finish(self, grace: float) -> int:
        """Give running answers `grace` seconds, their jobs kept from looking abandoned
        meanwhile, then hand back the rest for another worker. Returns how many were
        handed back."""
        try:
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=grace)
            left = list(self._running.values())
            for taken in left:
                if taken.generation is not None:
                    taken.generation.cancel()  # `_answer` hands it back
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=10)
        finally:
            self._finished.set()
            if self._keeping is not None:
                await self._keeping
        return len(left)

    # --- taking jobs --------------------------------------------------------------------

    async def _keep_reading(self) -> None:
        """Take jobs while rows are free; Redis failing is waited out (a job read but not
        started meanwhile stays pending, and is claimed once idle)."""
        taken_from_others = 0.0
        outage = False
        while not self._stop.is_set():
            if self._free_rows <= 0:
                self._room.clear()
                await set_within(self._room, READ_BLOCK_MS / 1000)
                continue
            try:
                await self._take_new()
                if time.monotonic() - taken_from_others >= TAKE_FROM_OTHERS_EVERY_S:
                    taken_from_others = time.monotonic()
                    await self._take_from_others()
            except RedisError as error:
                if not outage:
                    logger.warning("cannot take jobs from Redis; retrying: %s", error)
                outage = True
                await set_within(self._stop, OUTAGE_PAUSE_S)
                continue
            if outage:
                logger.warning("taking jobs from Redis again")
            outage = False

    async def _take_new(self) -> None:
        """New jobs, no more than the rows free: from this worker's own stream first (its
        conversations' caches are here), then from the shared one; with none in either,
        wait for one."""
        taken = 0
        for stream in self.streams:
            taken += await self._read(stream)
        if not taken:
            await self._wait_for_new_jobs()

    async def _wait_for_new_jobs(self) -> None:
        """Until a job comes that no worker has taken (READ_BLOCK_MS at most), taking
        nothing: XREAD from where each stream's group has delivered to. (XREADGROUP's
        BLOCK over both streams would take up to COUNT jobs from each: more than the rows
        free.)"""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xinfo_groups(stream)
            replies = await pipe.execute(raise_on_error=False)
        delivered = {}
        for stream, groups in zip(self.streams, replies, strict=True):
            groups = [] if isinstance(groups, ResponseError) else groups  # no such stream
            ours = [group for group in groups if group["name"] == GROUP]
            if not ours:  # a sweep took our stream for dead: make it again
                await self._ensure_groups()
                return
            delivered[stream] = ours[0]["last-delivered-id"]
        await self.redis.xread(delivered, count=1, block=READ_BLOCK_MS)

    async def _take_from_others(self) -> None:
        """Jobs that have waited in other workers' streams for TAKE_FROM_OTHERS_AFTER_S:
        those workers are full, or dead (one with rows free takes its own sooner)."""
        for stream in (await roll_call(self.redis)).streams:
            if stream not in self.streams and (waited := await self._waited_long(stream)):
                await self._read(stream, at_most=waited)

    async def _waited_long(self, stream: str) -> int:
        """How many jobs no worker has taken from `stream` have waited there for
        TAKE_FROM_OTHERS_AFTER_S (no more than the rows free). Its owner may take some of
        them before the read that follows: the read then takes as many younger ones, a
        Redis round trip's race that costs only those jobs' caches."""
        if self._free_rows <= 0:
            return 0
        try:
            groups = await self.redis.xinfo_groups(stream)
        except ResponseError:  # no such stream (any more)
            return 0
        ours = [group for group in groups if group["name"] == GROUP]
        if not ours:
            return 0
        added_by = math.floor((self.clock.now() - TAKE_FROM_OTHERS_AFTER_S) * 1000)
        after = f"({ours[0]['last-delivered-id']}"  # the first not delivered
        return len(await self.redis.xrange(stream, after, added_by, count=self._free_rows))

    async def _read(self, stream: str, at_most: int | None = None) -> int:
        """Take as many new jobs from `stream` as there are rows free (and `at_most`);
        how many."""
        async with self._taking:
            count = min(self._free_rows, at_most or self._free_rows)
            if count <= 0:  # (a COUNT of 0 would take them all)
                return 0
            try:
                replies = await self.redis.xreadgroup(GROUP, self.name, {stream: ">"}, count)
            except ResponseError as error:
                if "NOGROUP" not in str(error):
                    raise
                replies = []  # another worker's stream, gone: nothing to take there
                if stream == self.own:  # a sweep took our stream for dead: make it again
                    await self._ensure_groups()
            entries = [entry for _, entries in replies for entry in entries]
            now = self.clock.now()  # when they were read: taking each awaits Redis
            for entry_id, fields in entries:
                self.metrics.job_wait.observe(entry_age(entry_id, now))
                await self._check_and_run(stream, entry_id, fields, attempt=1)
            return len(entries)

    @property
    def _free_rows(self) -> int:
        """Rows free in the batch, and room in the inference queue for them (QUEUE_MAX
        may be lower, and a stopped row leaves the queue only after its step); a job run
        whose task has not yet reached the queue holds its place there already. Exact
        only while `_taking` is held: a take in progress holds rows it has not yet filled."""
        unsubmitted = sum(taken.generation is None for taken in self._running.values())
        return min(self.rows - len(self._running), self.inference.room - unsubmitted)

    async def _check_and_run(
        self, stream: str, entry_id: str, fields: dict[str, str], attempt: int
    ) -> None:
        try:
            job = Job.parse(fields)
        except (KeyError, TypeError, ValueError):
            logger.error("dropping malformed job %s in %s", entry_id, stream)
            await self._acknowledge(stream, entry_id)
            return
        over = keys.job_cancel(job.id), keys.job_answered(job.id)
        if await self.redis.exists(*over):
            await self._acknowledge(stream, entry_id)  # nobody waits for this answer now
            return
        if job.deadline < self.clock.now():  # a gateway that took it over may wait longer
            logger.warning("job %s taken past its deadline; dropped", job.id)
            await self._say_timed_out(job, attempt)
            await self._acknowledge(stream, entry_id)
            return
        if attempt > self.max_deliveries:
            tries = await self._failed_tries(job, attempt)
            if tries >= self.max_deliveries:
                await self._dead_letter(stream, entry_id, job, attempt, tries)
                return
        logger.info("job %s taken (try %d)", job.id, attempt)
        taken = _Taken(stream, entry_id, job, attempt)
        self._running[taken.entry] = taken
        self._spawn(self._answer(taken))

    async def _failed_tries(self, job: Job, attempt: int) -> int:
        """The tries before this one that failed: not those stopping workers passed on (a
        rolling restart)."""
        return attempt - 1 - await self.redis.scard(keys.job_passed_on(job.id))

    async def _dead_letter(
        self, stream: str, entry_id: str, job: Job, attempt: int, tries: int
    ) -> None:
        """Given up after `tries` failed tries: kept for an operator, and the gateway hears
        it (the user apologised to)."""
        logger.error("job %s failed %d times: to %s", job.id, tries, keys.DEAD_JOBS)
        fields = {**job.fields(), "conversation": job.conversation, "tries": str(tries)}
        await self._dead_letter_once(
            keys=[keys.DEAD_JOBS, keys.job_dead(job.id)],
            args=[DEAD_MARK_S, DEAD_MAXLEN, *itertools.chain(*fields.items())],
        )
        await self._write(job, Chunk(attempt, self.name, "error", f"given up after {tries} tries"))
        await self._acknowledge(stream, entry_id)

    # --- answering ----------------------------------------------------------------------

    async def _answer(self, taken: _Taken) -> None:
        job = taken.job
        try:
            generation = taken.generation = self.inference.submit(
                job.messages,
                user=job.user,
                conversation=job.conversation,
                max_new_tokens=job.max_new_tokens,
                temperature=job.temperature,
            )
            await self._say(taken, "started")  # raises if cancelled since it was checked
            await self._stream(taken, generation)
            await self._say(taken, "end", generation.text)
            logger.info(
                "job %s answered: %d prompt tokens, %d new", job.id,
                generation.prompt_tokens, generation.answer_tokens,
            )  # fmt: skip
            await self._let_go(taken)  # answered: not a failed try, however this goes
        except InferenceCancelled:
            if taken.cancelled:
                await self._let_go(taken)
            elif taken.lost:
                logger.warning("job %s was claimed by another worker; dropped here", job.id)
            else:  # this worker is stopping
                await self._hand_back(taken, failed=False)
        except InferenceTimeout:  # REQUEST_TIMEOUT here: its gateway's came first, or soon will
            logger.warning(
                "job %s ran out of time on %s (try %d)", job.id, self.name, taken.attempt
            )
            await self._say_timed_out(job, taken.attempt)
            await self._let_go(taken)
        except Exception as error:
            logger.exception("job %s failed on %s (try %d)", job.id, self.name, taken.attempt)
            if isinstance(error, UnusableOutput) or (
                isinstance(error, InferenceUnavailable) and not error.may_pass
            ):  # the model overflows on this prompt, or INFERENCE_URL refused it: so would
                await self._give_up(taken)  # every try, on any worker
            else:
                await self._failed_here(taken)
        finally:
            if taken.generation is not None:  # ended, or given up on here: stop its row
                taken.generation.cancel()
            del self._running[taken.entry]
            self._room.set()

    async def _say_timed_out(self, job: Job, attempt: int) -> None:
        """For a gateway that waits longer than the job's deadline (it took another's over)."""
        with contextlib.suppress(RedisError):
            await self._write(job, Chunk(attempt, self.name, "error", TIMED_OUT))

    async def _failed_here(self, taken: _Taken) -> None:
        """Hand the job back for another try, and mark this worker as failing for a while."""
        with contextlib.suppress(RedisError):  # (then its jobs are anyone's at once)
            await self.redis.set(keys.worker_failing(self.name), "1", px=self.claim_idle_ms)
        await self._hand_back(taken)

    async def _give_up(self, taken: _Taken) -> None:
        """Dead-letter the job now; where Redis fails, hand it back (its next try does)."""
        job, attempt = taken.job, taken.attempt
        try:
            tries = await self._failed_tries(job, attempt) + 1  # this one too
            await self._dead_letter(taken.stream, taken.entry_id, job, attempt, tries)
        except RedisError as error:
            logger.warning("could not give up job %s: %s", taken.job.id, error)
            await self._hand_back(taken)

    async def _stream(self, taken: _Taken, generation: Generation) -> None:
        """The answer's text into its stream as it comes: its first piece at once, then
        at most every TEXT_EVERY_S. Where the answer starts again in this try (an
        OpenAI-compatible server's connection dropped, and the request was retried), the
        stream says so, and the gateway drops what it had of it."""
        while True:
            unsent, next_write = "", 0.0
            try:
                async for text in generation:
                    unsent += text
                    if (now := time.monotonic()) < next_write:
                        continue
                    next_write = now + TEXT_EVERY_S
                    await self._say(taken, "text", unsent)
                    unsent = ""
            except AnswerRestarted:
                taken.written = 0
                await self._say(taken, "restart")
                continue
            if unsent:
                await self._say(taken, "text", unsent)
            return

    async def _say(self, taken: _Taken, kind: ChunkKind, text: str = "") -> None:
        """Write one entry of the answer, with the tokens read and written so far (so a
        stopped answer has them too); InferenceCancelled where the gateway has cancelled
        the job, so that nothing more is written (text the answer has ready is not). Redis
        out of reach is waited for (the answer's text waits with it): a failover is not a
        failed try. Unless the answer stops meanwhile (InferenceCancelled), or the job's
        deadline passes (InferenceTimeout), as they would without the outage."""
        generation = taken.generation
        assert generation is not None, "an answer is written once its request is submitted"
        counts = generation.prompt_tokens, generation.answer_tokens
        offset = taken.written if kind == "text" else None
        chunk = Chunk(taken.attempt, self.name, kind, text, *counts, offset=offset)
        while True:
            try:
                cancelled = await self._write(taken.job, chunk)
                break
            except RedisError as error:
                if generation.cancelled:  # the worker stopping, or the job over: as ever
                    raise InferenceCancelled from error
                if self.clock.now() >= taken.job.deadline:
                    raise InferenceTimeout from error
                logger.warning("job %s: cannot write its answer; retrying: %s", taken.job.id, error)
                await asyncio.sleep(OUTAGE_PAUSE_S)
        if offset is not None:
            taken.written += len(text)
        if cancelled:
            taken.cancelled = True
            raise InferenceCancelled

    async def _write(self, job: Job, chunk: Chunk) -> bool:
        stream = keys.job_chunks(job.id)
        kept = self._kept_s(job)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(stream, chunk.fields(), maxlen=CHUNKS_MAXLEN)
            pipe.expire(stream, kept)
            pipe.exists(keys.job_cancel(job.id))
            *_, cancelled = await pipe.execute()
        return bool(cancelled)

    async def _acknowledge(self, stream: str, entry_id: str) -> None:
        """The job is over: out of the group's pending list and out of the stream, unless
        another worker took it meanwhile (it answers it now)."""
        await self._acknowledge_if_mine(keys=[stream], args=[GROUP, self.name, entry_id])

    async def _let_go(self, taken: _Taken) -> None:
        """Acknowledge a job that is over (answered, cancelled, out of time); where Redis
        fails, a sweep takes it back as lost, and drops it then (its gateway has marked it
        answered or cancelled, or it is past its deadline)."""
        try:
            await self._acknowledge(taken.stream, taken.entry_id)
        except RedisError as error:
            logger.warning("job %s: could not acknowledge it: %s", taken.job.id, error)

    async def _hand_back(self, taken: _Taken, *, failed: bool = True) -> None:
        """Leave the job pending but make it look abandoned now, so the next sweep of any
        worker claims it (and the delivery count counts this try; as passed on, not
        failed, unless it `failed`); unless another worker took it meanwhile."""
        args = [GROUP, self.name, taken.entry_id, self.claim_idle_ms]
        taken.handed_back = True
        try:
            async with self._keeping_or_handing_back:
                if failed:
                    await self._hand_back_if_mine(keys=[taken.stream], args=args)
                else:
                    passed_on = keys.job_passed_on(taken.job.id)
                    kept = self._kept_s(taken.job)
                    args = [*args, kept]
                    await self._pass_on_if_mine(keys=[taken.stream, passed_on], args=args)
        except RedisError as error:  # it is claimed once idle long enough anyway
            logger.warning("could not hand back job %s: %s", taken.job.id, error)
            if failed:
                self._failed_unhanded[taken.entry] = time.monotonic()

    def _kept_s(self, job: Job) -> int:
        """How long what it writes of a job is kept: past its deadline, for a slow reader."""
        return round(max(job.deadline - self.clock.now(), 0)) + ANSWER_KEPT_S

    # --- the sweep ----------------------------------------------------------------------

    async def _every_sweep(
        self, work: Callable[[], Awaitable[None]], what: str, until: asyncio.Event
    ) -> None:
        """`work` every third of the claim idle time until `until` is set; a Redis error
        is tried again next time."""
        while not await set_within(until, self._sweep_every_s):
            try:
                await work()
            except RedisError as error:
                logger.warning("%s failed; next time: %s", what, error)

    @property
    def _sweep_every_s(self) -> float:
        """A third of the claim idle time: a running job is kept twice before it could be
        taken for abandoned."""
        return self.claim_idle_ms / 3000

    async def _sweep(self) -> None:
        await self._beat()
        roll = await roll_call(self.redis)
        for stream in roll.streams:
            await self._take_lost(stream)
        if time.monotonic() - self._in_touch_since < self.claim_idle_ms / 1000:
            return  # not yet: see `_beat`
        if not await self._leaves_to_others(roll):
            for stream in roll.streams:
                await self._claim_abandoned(stream)
        await self._tidy_dead_workers(roll)

    async def _leaves_to_others(self, roll: Roll) -> bool:
        """Whether abandoned jobs are left to the other live workers: an answer failed
        here within the claim idle time, and not on all of them (or none would take them
        while the failures go on, and they would wait for their timeouts)."""
        workers = [self.name, *(name for name in roll.alive if name != self.name)]
        failing = await self.redis.mget([keys.worker_failing(name) for name in workers])
        return failing[0] is not None and None in failing[1:]

    async def _first_beat(self) -> None:
        """The stream groups and the first heartbeat, as if one had been written just
        before. A start that cannot reach Redis is a gap in the heartbeats, as an outage
        once running is (see `_beat`), however soon Redis answers after it (it may have
        been out for long before), so it takes no running job of a live worker's until
        Redis has answered for the claim idle time. An outage now (or a Redis at its
        maxmemory) is ridden out as it is once running."""
        self._beaten = time.monotonic()
        try:
            await self._ensure_groups()
            await self._beat()
        except RedisError as error:
            if not is_outage(error):
                raise
            self._beaten = -math.inf  # the next beat ends a gap
            logger.warning("Redis refuses the worker's writes for now: %s", error)

    async def _beat(self) -> None:
        """The heartbeat, with a reading of Redis's clock. After a gap in it (Redis out of
        reach, or this worker stalled), other workers' jobs are left alone until Redis has
        answered for the claim idle time: after an outage longer than that, every running
        job looks abandoned until its worker keeps it, within a third of that time and its
        client's retries."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.worker(self.name), str(self.rows), px=self.claim_idle_ms)
            pipe.sadd(keys.WORKERS, self.name)
            pipe.time()
            *_, redis_time = await pipe.execute()
        self.clock.heard(redis_time)
        now = time.monotonic()
        if self._beaten is not None and now - self._beaten > 2 * self._sweep_every_s:
            self._in_touch_since = now
        self._beaten = now

    async def _keep_running_jobs(self) -> None:
        """Reset the idle time of the jobs running here, and stop those cancelled, answered
        already (by a try this one's stall made another worker run), or claimed by
        another worker."""
        async with self._keeping_or_handing_back:
            running = [taken for taken in self._running.values() if not taken.handed_back]
            async with self.redis.pipeline(transaction=False) as pipe:
                for taken in running:
                    args = [GROUP, self.name, taken.entry_id]
                    await self._keep_if_mine(keys=[taken.stream], args=args, client=pipe)
                    pipe.exists(keys.job_cancel(taken.job.id), keys.job_answered(taken.job.id))
                replies = await pipe.execute(raise_on_error=False)
        for taken, kept, cancelled in zip(running, replies[::2], replies[1::2], strict=True):
            taken.lost = taken.lost or kept == 0  # (an error reply keeps the job)
            over = isinstance(cancelled, int) and cancelled > 0  # (an error reply: not)
            taken.cancelled = taken.cancelled or over
            if (taken.lost or taken.cancelled) and taken.generation is not None:
                taken.generation.cancel()

    async def _claim_abandoned(self, stream: str) -> None:
        """Take abandoned jobs while rows are free. XAUTOCLAIM looks at ten times COUNT
        pending entries a call: an abandoned job behind running ones takes more calls."""
        cursor = "0-0"
        for _ in range(CLAIM_SCANS):
            async with self._taking:
                free = self._free_rows
                if free <= 0:
                    return
                try:
                    cursor, claimed, *_ = await self.redis.xautoclaim(
                        stream, GROUP, self.name, self.claim_idle_ms, cursor, count=free
                    )
                except ResponseError:  # no such stream or group (yet, or any more)
                    return
                await self._take_claimed(stream, claimed)
            if cursor == "0-0":  # the whole pending list seen
                return

    async def _take_lost(self, stream: str) -> None:
        """Take the jobs delivered to this worker that it never read (`LOST_AFTER_MS`) now,
        rather than after `JOB_CLAIM_IDLE_S`: claimed again, a new delivery, the one lost
        no failed try (`_never_ran`). Not those it handed back (idle that long already):
        they are any worker's to claim."""
        async with self._taking:
            free = self._free_rows
            if free <= 0:
                return
            known = {entry_id for of, entry_id in self._running if of == stream}
            try:
                held = await self.redis.xpending_range(
                    stream, GROUP, "-", "+", len(known) + free, consumername=self.name,
                    idle=LOST_AFTER_MS,
                )  # fmt: skip
            except ResponseError:  # no such stream or group (any more)
                return
            lost = [
                entry["message_id"]
                for entry in held
                if entry["message_id"] not in known
                and entry["time_since_delivered"] < self.claim_idle_ms
            ][:free]
            if not lost:
                return
            logger.warning(
                "%d jobs delivered to %s were never read; taking them", len(lost), self.name
            )
            claimed = await self.redis.xclaim(stream, GROUP, self.name, LOST_AFTER_MS, lost)
            delivered = {entry["message_id"]: entry["times_delivered"] for entry in held}
            await self._never_ran(stream, claimed, delivered)
            await self._take_claimed(stream, claimed)

    async def _never_ran(
        self, stream: str, claimed: list[tuple[str, dict[str, str]]], delivered: dict[str, int]
    ) -> None:
        """The deliveries these claims follow ran nothing (their replies were lost): each
        counted as passed on, as a stopping worker's try is, not failed (`_failed_tries`);
        but for the jobs this worker failed and could not hand back."""
        forgotten = time.monotonic() - self.claim_idle_ms / 1000  # anyone's to claim since
        self._failed_unhanded = {
            entry: at for entry, at in self._failed_unhanded.items() if at > forgotten
        }
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id, fields in claimed:
                if self._failed_unhanded.pop((stream, entry_id), None) is not None:
                    continue
                with contextlib.suppress(KeyError, TypeError, ValueError):  # dropped unrun
                    job = Job.parse(fields)
                    pipe.sadd(keys.job_passed_on(job.id), delivered[entry_id])
                    pipe.expire(keys.job_passed_on(job.id), self._kept_s(job))
            await pipe.execute()

    async def _take_claimed(self, stream: str, claimed: list[tuple[str, dict[str, str]]]) -> None:
        """Claimed jobs, each checked and run, but those this worker runs already (claimed
        as their keep-alive came late). Called under `_taking`."""
        for entry_id, fields in claimed:
            if (stream, entry_id) in self._running:
                continue
            if not fields:  # deleted while pending: nothing to answer
                await self._acknowledge(stream, entry_id)
                continue
            pending = await self.redis.xpending_range(stream, GROUP, entry_id, entry_id, 1)
            if pending:  # else acknowledged meanwhile
                attempt = pending[0]["times_delivered"]
                await self._check_and_run(stream, entry_id, fields, attempt)

    async def _tidy_dead_workers(self, roll: Roll) -> None:
        """Forget a dead worker whose stream holds no job any more, and drop dead workers
        from the groups of the streams they read once they hold no job there (their jobs
        are claimed first), so that restarts do not pile up consumers."""
        live = {*roll.alive, self.name}
        for name in roll.registered:
            stream = keys.worker_jobs(name)
            if name not in live and await self._forget_if_empty(
                keys=[stream, keys.WORKERS], args=[name]
            ):
                logger.info("worker %s is gone; its stream is removed", name)
        for stream in roll.streams:
            with contextlib.suppress(ResponseError):  # no such stream or group (or removed)
                for consumer in await self.redis.xinfo_consumers(stream, GROUP):
                    if consumer["name"] not in live and not consumer["pending"]:
                        await self._drop_consumer(keys=[stream], args=[GROUP, consumer["name"]])

    async def _ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as error:  # BUSYGROUP: it exists; else Redis refused it
                if "BUSYGROUP" not in str(error):
                    raise

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
