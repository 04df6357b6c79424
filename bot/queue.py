"""The shared inference queue: asyncio on the outside, one engine thread batching inside.

One queue per process, shared by every adapter. `submit` returns a `Generation` at once
(or raises `QueueFull`); iterating it yields text chunks as the batcher writes them.

The engine thread, the one thread the model (`bot.engine.Engine`) runs on, drives the
batcher in a loop: admit waiting requests into the batch while there is room
(round-robin between users, so one user's flood cannot starve the others; room is rows
under `max_batch` and KV memory, the batcher's `fits`, which the next in line waits for),
drop cancelled ones, run one batch step, and hand each request its new text. A request may
bring its own answer length and temperature; requests with different ones share the
batch. `depth`, `place` and `places` say how busy the queue is and where a request
stands in line.

Chunks cross to the event loop with `loop.call_soon_threadsafe`; the end and an error are
explicit markers, never exceptions thrown across threads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, NamedTuple, Protocol, Self

from bot.health import READY
from bot.metrics import Metrics
from bot.types import ChatMessage

if TYPE_CHECKING:  # only for types: importing the batcher would load torch
    from bot.batching import Update

logger = logging.getLogger(__name__)


class BatchRunner(Protocol):
    """What the queue needs of `bot.batching.Batcher`, the thing that runs batch steps
    (tests may hand in a fake)."""

    max_batch: int

    def join(
        self,
        key: object,
        messages: list[ChatMessage],
        *,
        conversation: str,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> None: ...

    def fits(
        self, key: object, messages: list[ChatMessage], *, max_new_tokens: int | None = None
    ) -> bool: ...

    def leave(self, key: object) -> None: ...

    def clear(self) -> None: ...

    def step(self) -> list[Update]: ...


class QueueFull(Exception):
    """Too many requests are waiting; the caller should ask the user to try again."""


class InferenceTimeout(Exception):
    """The request did not finish within the queue's timeout."""


class InferenceCancelled(Exception):
    """The request was cancelled before it finished."""


class UnusableOutput(Exception):
    """The model gave this request no output to pick a token from (NaN logits); the
    other requests in the batch go on."""


class EngineStopped(Exception):
    """The engine thread died: this process answers nothing more and should restart."""


class AnswerRestarted(Exception):
    """The answer is being written again from its start (another try, elsewhere): what
    was read so far is void. Iterating the same `Generation` again reads the new one."""


@dataclass(frozen=True)
class _Text:
    """More of the answer (maybe none), and the prompt's and the answer's lengths in
    tokens so far."""

    text: str
    prompt_tokens: int
    answer_tokens: int


@dataclass(frozen=True)
class _End(_Text):
    """Marker: the batcher finished this request with this answer (`text`: all of it)."""


class _Failed:
    """Marker: the batcher raised; carries the exception to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Restart:
    """Marker: the answer starts again."""


class Generation:
    """One request's answer: an async iterator of text chunks, cancellable at any time.

    `text` holds what has been read so far, and once iteration ends, the engine's final
    decoded answer (a generation stopped early keeps its partial text); `prompt_tokens`
    and `answer_tokens` the tokens read and written for what has been read so far,
    whichever way it ends (stopped, cut, failed); `queue_wait` the seconds it waited for
    a place in the batch (None until it has one).

    Whatever writes the answer (the engine thread, through the event loop, or a remote
    backend) calls `write`, `end`, `fail` and `restart` on the event loop. Iteration
    raises `AnswerRestarted` where the answer starts again; iterating again goes on.
    """

    def __init__(
        self,
        messages: list[ChatMessage],
        *,
        user: str,
        conversation: str,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> None:
        self.messages = messages
        self.user = user
        self.conversation = conversation
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.text = ""
        self.prompt_tokens = 0
        self.answer_tokens = 0
        self.first_text_at: float | None = None  # wall clock, when its first text was read
        self.on_cancel: Callable[[], object] | None = None  # its writer lets go of it
        self._chunks: asyncio.Queue[_Text | _Failed | _Restart] = asyncio.Queue()
        self._cancelled = threading.Event()  # read by the engine thread between steps
        self._over = False  # the consumer has seen the end or an error
        self._deadline: asyncio.TimerHandle | None = None
        self._queued_at = time.monotonic()
        self._started_at: float | None = None  # set when it leaves the line

    @classmethod
    def submitted(
        cls,
        messages: list[ChatMessage],
        *,
        user: str,
        conversation: str,
        max_new_tokens: int | None,
        temperature: float | None,
        timeout: float,
    ) -> Generation:
        """A request as `Inference.submit` takes one: its options checked (ValueError, saying
        why), cancelled with InferenceTimeout unless it ends within `timeout` seconds."""
        check_options(max_new_tokens, temperature)
        generation = cls(
            messages,
            user=user,
            conversation=conversation,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
        )
        generation.expire_after(timeout)
        return generation

    @property
    def queue_wait(self) -> float | None:
        return None if self._started_at is None else self._started_at - self._queued_at

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def started(self) -> None:
        """It has left the line: its answer is being written (any thread)."""
        self._started_at = time.monotonic()

    def expire_after(self, seconds: float) -> None:
        """Cancel it with InferenceTimeout unless it ends within `seconds`."""
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(seconds, self.cancel, InferenceTimeout)

    def cancel(self, reason: type[Exception] = InferenceCancelled) -> None:
        """Stop this request: it leaves the queue, or the batcher stops it at its next step."""
        if not self._over and not self._cancelled.is_set():
            self._cancelled.set()
            self._chunks.put_nowait(_Failed(reason()))
            if self.on_cancel is not None:
                self.on_cancel()

    def released(self) -> None:
        """Its writer is done with it: no deadline left to keep."""
        if self._deadline:
            self._deadline.cancel()

    # --- for the writer, on the event loop; after a cancel, nothing more is read -------

    def write(self, text: str, prompt_tokens: int, answer_tokens: int) -> None:
        """More text (maybe none), with the prompt's and the answer's tokens so far."""
        self._put(_Text(text, prompt_tokens, answer_tokens))

    def end(self, text: str, prompt_tokens: int, answer_tokens: int) -> None:
        self._put(_End(text, prompt_tokens, answer_tokens))

    def fail(self, error: BaseException) -> None:
        self._put(_Failed(error))

    def restart(self) -> None:
        self._put(_Restart())

    def _put(self, item: _Text | _Failed | _Restart) -> None:
        if not self.cancelled:
            self._chunks.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        while not self._over:
            item = await self._chunks.get()
            self._over = isinstance(item, (_End, _Failed))
            if isinstance(item, _Failed):
                raise item.error
            if isinstance(item, _Restart):
                self.text = ""
                raise AnswerRestarted
            self.prompt_tokens, self.answer_tokens = item.prompt_tokens, item.answer_tokens
            if isinstance(item, _End):
                self.text = item.text
            elif item.text:
                self.text += item.text
                self.first_text_at = self.first_text_at or time.time()
                yield item.text


class QueuePlace(NamedTuple):
    """Where one request stands: 0 while it runs, n while it is n-th in line."""

    conversation: str
    place: int


class FairOrder:
    """Requests waiting, taken user by user, and those taken and still running.

    Next is the waiting user with the fewest requests running; among equals, the one whose
    turn is due first (start-time fair queueing): a user is due one turn after their last
    one, and one who comes new is due at once, so a user whose request is running cannot
    go ahead of those who came while it ran. Each user's own requests go in arrival order.
    The service runs one turn at a time per conversation, so a user's waiting requests are
    for different conversations, and taking them in order is round-robin between those too.
    """

    def __init__(self) -> None:
        self._line = _Line()
        self._running: dict[Generation, None] = {}  # a set that keeps the order they ran in

    def __bool__(self) -> bool:
        """Whether any request is waiting."""
        return bool(self._line.by_user)

    @property
    def waiting(self) -> int:
        return sum(len(requests) for requests in self._line.by_user.values())

    def push(self, generation: Generation) -> None:
        self._line.push(generation)

    def peek(self) -> Generation:
        """The request `pop` would take now."""
        return self._line.by_user[self._line.next_user(self._running_by_user())][0]

    def pop(self) -> Generation:
        """The next request to run; it counts as running until `finished`."""
        generation = self._line.take(self._running_by_user())
        self._running[generation] = None
        return generation

    def finished(self, generation: Generation) -> None:
        self._running.pop(generation, None)

    def remove(self, generation: Generation) -> bool:
        """Take a waiting request out of the line at once (a writer that can, when it is
        cancelled, rather than dropping it when its turn comes); whether it was waiting."""
        return self._line.remove(generation)

    def line(self) -> list[Generation]:
        """The waiting requests in the order `pop` takes them, if none finishes meanwhile;
        cancelled ones are left out (they are dropped when their turn comes)."""
        line, running = self._line.copy(), self._running_by_user()
        order = [line.take(running) for _ in range(self.waiting)]
        return [generation for generation in order if not generation.cancelled]

    def place(self, generation: Generation) -> int | None:
        """0 if it runs, n if it is n-th in line, None if it is over (finished, cancelled)
        or was never here."""
        if generation.cancelled:
            return None
        if generation in self._running:
            return 0
        line = self.line()
        return line.index(generation) + 1 if generation in line else None

    def places(self, user: str) -> list[QueuePlace]:
        """Where each of a user's live requests stands, running ones first, then in line."""
        running = [
            QueuePlace(g.conversation, 0)
            for g in self._running
            if g.user == user and not g.cancelled
        ]
        waiting = [
            QueuePlace(g.conversation, place)
            for place, g in enumerate(self.line(), start=1)
            if g.user == user
        ]
        return running + waiting

    def _running_by_user(self) -> Counter[str]:
        return Counter(generation.user for generation in self._running)


@dataclass
class _Line:
    """The waiting requests by user, and the turn each user is due: `FairOrder`'s line,
    apart so that `FairOrder.line` can play its takes out on a copy."""

    by_user: OrderedDict[str, deque[Generation]] = field(default_factory=OrderedDict)
    due: dict[str, int] = field(default_factory=dict)  # kept while ahead of the clock
    clock: int = 0  # the turn the latest request taken was due

    def push(self, generation: Generation) -> None:
        user = generation.user
        if user not in self.by_user:
            self.due[user] = max(self.clock, self.due.get(user, 0))
        self.by_user.setdefault(user, deque()).append(generation)

    def next_user(self, running: Counter[str]) -> str:
        """The waiting user with the fewest requests running, the first due among equals,
        the first to come among those."""
        return min(self.by_user, key=lambda user: (running[user], self.due[user]))

    def take(self, running: Counter[str]) -> Generation:
        """Remove the next request, and count it in `running`: one user's turn."""
        user = self.next_user(running)
        waiting = self.by_user.pop(user)
        generation = waiting.popleft()
        if waiting:  # the user goes to the back of the line
            self.by_user[user] = waiting
        self.clock = max(self.clock, self.due[user])
        self.due[user] += 1
        # A user not waiting and not ahead of the clock would be due at once anyway.
        self.due = {u: due for u, due in self.due.items() if u in self.by_user or due > self.clock}
        running[user] += 1
        return generation

    def remove(self, generation: Generation) -> bool:
        """Take a waiting request out; whether it was waiting."""
        waiting = self.by_user.get(generation.user)
        if waiting is None or generation not in waiting:
            return False
        waiting.remove(generation)
        if not waiting:
            del self.by_user[generation.user]
        return True

    def copy(self) -> _Line:
        by_user = OrderedDict((user, deque(waiting)) for user, waiting in self.by_user.items())
        return _Line(by_user, dict(self.due), self.clock)


def check_options(max_new_tokens: int | None, temperature: float | None) -> None:
    """Raise ValueError, saying why, unless the options are ones the engine can follow."""
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be 1 or more, not {max_new_tokens}")
    if temperature is not None and not temperature >= 0:  # `not >=` rejects NaN too
        raise ValueError(f"temperature must be 0 (greedy) or more, not {temperature}")


class Inference(Protocol):
    """What the service asks of whatever writes its answers: this process's queue
    (`InferenceQueue`), workers behind a Redis Stream (`bot.job_queue.JobQueue`) or an
    OpenAI-compatible server (`bot.openai_backend.OpenAIBackend`). `submit` raises
    QueueFull when `max_size` requests are in flight; `died` is set once it can answer
    nothing more."""

    max_size: int
    died: asyncio.Event

    @property
    def depth(self) -> int:
        """Requests waiting and being answered."""
        ...

    @property
    def room(self) -> int:
        """How many more requests `submit` takes now (QueueFull past them)."""
        ...

    def checks(self) -> dict[str, str]:
        """Its part of /readyz: each check "ok", or why answers cannot be written now."""
        ...

    def places(self, user: str) -> list[QueuePlace]: ...

    def submit(
        self,
        messages: list[ChatMessage],
        *,
        user: str,
        conversation: str,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Generation: ...


class InferenceQueue:
    """Bounded queue of generation requests, served in batches by one engine thread.

    Keeps `metrics.queue_waiting` and `metrics.batch_rows` current."""

    def __init__(
        self,
        *,
        batcher: BatchRunner,
        max_size: int,
        timeout: float,
        metrics: Metrics | None = None,
    ) -> None:
        self.batcher = batcher
        self.max_size = max_size
        self.timeout = timeout
        self.metrics = metrics if metrics is not None else Metrics()
        self._order = FairOrder()
        self._wakeup = threading.Condition()  # guards `_order`, `_closing` and `_dead`
        self._closing = False
        self._dead = False  # the engine thread died: set there, where `died` follows later
        self._in_flight = 0  # waiting + running: what `max_size` bounds
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving: asyncio.Future[None] | None = None
        self.died = asyncio.Event()  # set when the engine thread stops by an error
        self._stepping_since: float | None = None  # monotonic(), while a step runs

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._serving = self._loop.run_in_executor(self._executor, self._serve)
        return self

    def checks(self) -> dict[str, str]:
        """The engine: dead, stuck in one step longer than a request may wait for its
        answer (a hung device; no step of a working one takes that long), or ready."""
        if self.died.is_set():
            return {"engine": "the engine thread died"}
        since = self._stepping_since
        if since is not None and (took := time.monotonic() - since) > self.timeout:
            return {"engine": f"stuck: one step has run for {took:.0f}s"}
        return {"engine": READY}

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop intake, cancel what is left, and let the engine thread finish its step."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        if self._serving:
            await self._serving
        self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        """Requests waiting and running: what `max_size` bounds."""
        return self._in_flight

    @property
    def room(self) -> int:
        return max(self.max_size - self._in_flight, 0)

    def place(self, generation: Generation) -> int | None:
        """0 while the request runs, n while it is n-th in line now, None once it is over.
        The line is fair order, so a user with fewer requests running who comes later
        may still go ahead."""
        with self._wakeup:
            return self._order.place(generation)

    def places(self, user: str) -> list[QueuePlace]:
        """Where each of a user's requests stands (see `place`), running ones first."""
        with self._wakeup:
            return self._order.places(user)

    def submit(
        self,
        messages: list[ChatMessage],
        *,
        user: str,
        conversation: str,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Generation:
        """Queue a conversation for an answer of at most `max_new_tokens` (None: the
        engine's), picked with `temperature` (None: the model's generation config; 0:
        greedy). Raises ValueError for options out of range, QueueFull when `max_size`
        are in flight, and EngineStopped once the engine thread has died."""
        if self._dead:
            raise EngineStopped
        if self._in_flight >= self.max_size or self._closing:
            raise QueueFull
        generation = Generation.submitted(
            messages,
            user=user,
            conversation=conversation,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            timeout=self.timeout,
        )
        generation.on_cancel = partial(self._withdraw, generation)
        self._in_flight += 1
        with self._wakeup:
            # The engine thread died since the checks above: no one serves the line now.
            if self._closing:
                self._release(generation)
                raise EngineStopped
            self._order.push(generation)
            self.metrics.queue_waiting.set(self._order.waiting)
            self._wakeup.notify()
        return generation

    def _withdraw(self, generation: Generation) -> None:
        """A request cancelled while it waits leaves the line at once, and counts no more
        against `max_size` (one running stops at the batcher's next step)."""
        with self._wakeup:
            withdrawn = self._order.remove(generation)
            self.metrics.queue_waiting.set(self._order.waiting)
        if withdrawn:
            self._release(generation)

    # --- On the engine thread -----------------------------------------------------------

    def _serve(self) -> None:
        running: list[Generation] = []
        try:
            self._serve_until_closed(running)
        except Exception:  # a bug in this loop: end every request rather than hang
            logger.critical("the engine thread died", exc_info=True)
            with self._wakeup:
                self._closing = self._dead = True
            self._call(self.died.set)
            self._close(running, EngineStopped())
        else:
            self._close(running)

    def _serve_until_closed(self, running: list[Generation]) -> None:
        while True:
            with self._wakeup:
                self._wakeup.wait_for(lambda: self._closing or running or self._order)
                if self._closing:
                    break
            # Stopped rows leave first: their rows and memory are free for the next in
            # line, and their KV cache is there for their conversation's next turn.
            self._drop_cancelled(running)
            while len(running) < self.batcher.max_batch and (generation := self._admit()):
                if self._start(generation):
                    running.append(generation)
            self.metrics.batch_rows.set(len(running))
            if running:
                self._stepping_since = time.monotonic()
                try:
                    self._step(running)
                finally:
                    self._stepping_since = None
                self.metrics.batch_rows.set(len(running))

    def _admit(self) -> Generation | None:
        """Take the next request in fair order if the batch has memory for it, else None:
        it waits for rows to leave, and none behind it goes first, so it cannot starve."""
        with self._wakeup:
            if not self._order:
                return None
            generation = self._order.peek()
        try:  # outside the lock: `fits` may tokenize, and `submit` must not wait for that
            fits = generation.cancelled or self.batcher.fits(
                generation, generation.messages, max_new_tokens=generation.max_new_tokens
            )
        except Exception:  # a prompt that cannot be tokenized: `join` fails it, saying why
            fits = True
        with self._wakeup:
            # Someone came first, or it was cancelled meanwhile (its place given up).
            if not fits or not self._order or self._order.peek() is not generation:
                return None
            self._order.pop()
            self.metrics.queue_waiting.set(self._order.waiting)
            return generation

    def _start(self, generation: Generation) -> bool:
        """Put a request into the batch; whether it is running."""
        if generation.cancelled:
            self._done(generation)
            return False
        generation.started()
        try:
            self.batcher.join(
                generation,
                generation.messages,
                conversation=generation.conversation,
                max_new_tokens=generation.max_new_tokens,
                temperature=generation.temperature,
            )
        except Exception as error:
            self._fail([generation], error)
            return False
        return True

    def _drop_cancelled(self, running: list[Generation]) -> None:
        for generation in [g for g in running if g.cancelled]:
            try:
                self.batcher.leave(generation)  # (it stores the row's KV cache: memory)
            except Exception as error:
                self._fail_batch(running, error)
                return
            running.remove(generation)
            self._done(generation)

    def _step(self, running: list[Generation]) -> None:
        """One batch step; hands each request its text, and ends the finished ones."""
        try:
            updates = self.batcher.step()
        except Exception as error:
            self._fail_batch(running, error)
            return
        for update in updates:
            generation = update.key
            assert isinstance(generation, Generation)
            if update.failed is not None:  # that request alone: the batch goes on
                running.remove(generation)
                self._fail([generation], UnusableOutput(update.failed))
                continue
            counts = update.prompt_tokens, update.answer_tokens
            self._call(generation.write, update.text, *counts)
            if update.answer is not None:
                running.remove(generation)
                self._done(generation)
                self._call(generation.end, update.answer, *counts)

    def _fail_batch(self, running: list[Generation], error: Exception) -> None:
        """The batch's state is unknown (out of memory, say): every request in it fails,
        and the engine goes on with those waiting."""
        self.batcher.clear()
        self._fail(running, error)
        running.clear()

    def _fail(self, generations: list[Generation], error: Exception) -> None:
        logger.error("generation failed: %s", error, exc_info=error)
        for generation in generations:
            self._done(generation)
            self._call(generation.fail, error)

    def _close(self, running: list[Generation], failure: Exception | None = None) -> None:
        """End what is running and waiting (cancelled, or failed); the queue is stopping."""
        with self._wakeup:
            waiting = []
            while self._order:
                waiting.append(self._order.pop())
        for generation in running + waiting:
            self._done(generation)
            if failure:
                self._call(generation.fail, failure)
            else:
                self._call(generation.cancel)
        self.batcher.clear()
        self.metrics.queue_waiting.set(0)
        self.metrics.batch_rows.set(0)

    def _done(self, generation: Generation) -> None:
        """The batcher is finished with a request: it no longer counts against `max_size`.
        Called before the request's end is posted, so whoever sees the end sees it gone."""
        with self._wakeup:
            self._order.finished(generation)
        self._call(self._release, generation)

    def _release(self, generation: Generation) -> None:
        generation.released()
        self._in_flight -= 1

    def _call(self, callback: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(callback, *args)
