"""The shared inference queue: asyncio on the outside, the engine on one executor thread.

One queue per process, shared by every adapter. `submit` returns a `Generation` at once
(or raises `QueueFull`); iterating it yields text chunks as the engine writes them. Chunks
cross from the engine thread with `loop.call_soon_threadsafe`; the end and an error are
explicit markers, never exceptions thrown across threads. Requests run one at a time,
in arrival order, for now: fair order and batching can change the worker alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol, Self

from bot.types import ChatMessage

if TYPE_CHECKING:  # only type aliases: importing the engine would load torch
    from bot.engine import StopCheck, TextCallback

logger = logging.getLogger(__name__)


class GenerationEngine(Protocol):
    """What the queue needs of `bot.engine.Engine` (tests may hand in a fake)."""

    def generate(
        self,
        conversations: Sequence[list[ChatMessage]],
        *,
        on_text: TextCallback | None = None,
        stopped: StopCheck | None = None,
    ) -> list[str]: ...


class QueueFull(Exception):
    """Too many requests are waiting; the caller should ask the user to try again."""


class InferenceTimeout(Exception):
    """The request did not finish within the queue's timeout."""


class InferenceCancelled(Exception):
    """The request was cancelled before it finished."""


class _End:
    """Marker: the engine finished this request (the final text is in `Generation.text`)."""


class _Failed:
    """Marker: the engine raised; carries the exception to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Generation:
    """One request's answer: an async iterator of text chunks, cancellable at any time.

    After iteration ends, `text` holds the engine's final decoded answer.
    """

    def __init__(self, messages: list[ChatMessage], *, user: str, conversation: str) -> None:
        self.messages = messages
        self.user = user
        self.conversation = conversation
        self.text = ""
        self._chunks: asyncio.Queue[str | _End | _Failed] = asyncio.Queue()
        self._cancelled = threading.Event()  # read by the engine thread between steps
        self._over = False  # the consumer has seen the end or an error
        self._deadline: asyncio.TimerHandle | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self, reason: type[Exception] = InferenceCancelled) -> None:
        """Stop this request: it leaves the queue, or the engine stops it at its next step."""
        if not self._over and not self._cancelled.is_set():
            self._cancelled.set()
            self._chunks.put_nowait(_Failed(reason()))

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        while not self._over:
            item = await self._chunks.get()
            self._over = isinstance(item, (_End, _Failed))
            if isinstance(item, _Failed):
                raise item.error
            if isinstance(item, str):
                yield item


class InferenceQueue:
    """Bounded queue of generation requests, served by one engine thread."""

    def __init__(self, *, engine: GenerationEngine, max_size: int, timeout: float) -> None:
        self.engine = engine
        self.max_size = max_size
        self.timeout = timeout
        self._waiting: asyncio.Queue[Generation] = asyncio.Queue()
        self._in_flight = 0  # waiting + running: what `max_size` bounds
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._worker: asyncio.Task[None] | None = None
        self._running: Generation | None = None  # on the engine thread now

    async def __aenter__(self) -> Self:
        self._worker = asyncio.create_task(self._serve(), name="inference-queue")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop intake, cancel what is left, and let the engine thread finish its step."""
        if self._running:
            self._running.cancel()  # the engine stops it at its next step
        if self._worker:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        while not self._waiting.empty():
            self._waiting.get_nowait().cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, messages: list[ChatMessage], *, user: str, conversation: str) -> Generation:
        """Queue a conversation for an answer; raises QueueFull when `max_size` are in flight."""
        if self._in_flight >= self.max_size:
            raise QueueFull
        generation = Generation(messages, user=user, conversation=conversation)
        loop = asyncio.get_running_loop()
        generation._deadline = loop.call_later(self.timeout, generation.cancel, InferenceTimeout)
        self._in_flight += 1
        self._waiting.put_nowait(generation)
        return generation

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            generation = await self._waiting.get()
            self._running = generation
            try:
                if not generation.cancelled:
                    await loop.run_in_executor(self._executor, self._run, generation, loop)
            finally:
                self._running = None
                if generation._deadline:
                    generation._deadline.cancel()
                self._in_flight -= 1

    def _run(self, generation: Generation, loop: asyncio.AbstractEventLoop) -> None:
        """On the engine thread: generate, posting each chunk and the end back to the loop."""

        def post(item: str | _End | _Failed) -> None:
            if not generation.cancelled:
                loop.call_soon_threadsafe(generation._chunks.put_nowait, item)

        try:
            [generation.text] = self.engine.generate(
                [generation.messages],
                on_text=lambda _row, chunk: post(chunk),
                stopped=lambda: [generation.cancelled],
            )
        except Exception as error:  # handed to the consumer, which answers the user
            logger.exception("generation failed for %s", generation.conversation)
            post(_Failed(error))
        else:
            post(_End())
