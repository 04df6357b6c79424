"""The contract every platform adapter keeps, and the guard around its event handlers.

An adapter is the only code that knows a platform. It MUST turn each platform message
it should answer into a `Turn` and hand it to `ChatService.accept` with a `ReplySink`
for that platform, through `answer` below so one failure never stops the adapter. It
MUST drop what the bot must not answer (its own messages, other bots, edits), and MUST
ask `ChatService.admit` (the team's access rules, on platform ids) before a turn is
handed over, so a denied message is neither stored nor generated for. It SHOULD
stream: the sink's `append` shows text as it arrives. It MUST make, from a sink's
`reply_target()`, a sink that resumes that answer (`ChatService.serve_platform`), and
SHOULD acknowledge the platform only once `answer` has returned. Commands (`reset`,
`forget`, `help`, …) are parsed here (`command`) and carried out by the service. It
MUST say whether it is `connected` now (readiness and metrics ask), and serves any HTTP
endpoint (Slack's Events API) on the shared ops server through `HttpRoutes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from typing import TYPE_CHECKING, ClassVar, Protocol, cast, get_args

from redis.exceptions import RedisError

from bot import replies
from bot.service import ChatService
from bot.types import Command, ConversationKey, NowhereToAnswer, ReplySink, Turn
from bot.waiting import set_within
from storage.errors import is_outage

if TYPE_CHECKING:
    from aiohttp import web

logger = logging.getLogger(__name__)

HttpHandler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]
JOINING_MARK_MS = 30_000  # a joining said to other processes lapses by then (a crash)
JOINED_ELSEWHERE_POLL_S = 0.05  # how often a message waiting for another's joining looks


class AdapterError(RuntimeError):
    """A platform refused us for a reason the operator must fix; the message says which.
    `setting`: one no restart fixes (a token refused, an intent not enabled), which
    `threadbot run` exits 2 for, as for a bad setting, so a supervisor stops restarting."""

    def __init__(self, message: str, *, setting: bool = False) -> None:
        super().__init__(message)
        self.setting = setting


class HttpRoutes(Protocol):
    """Paths an adapter serves on the ops server (HTTP_PORT), for as long as it runs."""

    def mount(self, path: str, handler: HttpHandler) -> None: ...

    def unmount(self, path: str) -> None: ...


class Adapter(ABC):
    """A platform connection that feeds turns to the service until it is cancelled."""

    platform: ClassVar[str]  # its name in conversation keys, metrics and readiness

    @abstractmethod
    async def run(self) -> None:
        """Connect and serve until cancelled or the platform closes; MUST NOT return early."""

    @abstractmethod
    async def connected(self) -> bool:
        """Whether the platform reaches the bot now (connected, or its events served)."""


COMMANDS: frozenset[str] = frozenset(get_args(Command))


def command(text: str) -> Command | None:
    """The command a message gives, if it is one word such as `reset` (or `/reset`)."""
    word = text.strip().lower().removeprefix("/")
    return cast(Command, word) if word in COMMANDS else None


async def answer(service: ChatService, turn: Turn, sink: ReplySink, *, wait: bool = False) -> bool:
    """Hand one turn to the service; returns once it is accepted (the answer goes on in
    the service), or with `wait` once it is answered: whether the service took it to
    answer (not a re-delivery, nor answered at once). An unexpected error is logged and
    answered, never raised."""
    try:
        task = await service.accept(turn, sink)
        if wait and task is not None:
            await task
        return task is not None
    except NowhereToAnswer as gone:  # nor anywhere to say so
        logger.warning("message %s is not answered: %s", turn.message_id, gone)
        return False
    except Exception as error:
        try:
            await sink.fail(failure_text(error, f"message {turn.message_id}"))
        except Exception:
            logger.exception("could not tell the user about the failure")
        return False


def failure_text(error: Exception, what: str) -> str:
    """Log that handling `what` raised `error` (one line for a storage outage, the whole
    traceback for anything else), and say what to tell the user."""
    if is_outage(error):
        logger.warning("storage unavailable: %s was refused (%s)", what, error)
        return replies.storage_unavailable()
    logger.error("%s failed", what, exc_info=error)
    return replies.failed()


class InOrder:
    """Each conversation's messages accepted in the order they came, where one that came
    second but was read sooner (the first's file still downloading) was asked, answered
    and stored first. A message takes its place in line as it comes, is read as it would
    be (its files, its asker, the thread; beside those ahead of it, each in its own time),
    and waits only to be accepted, until every message ahead of it is, or was let go."""

    def __init__(self) -> None:
        self._line: dict[Hashable, list[asyncio.Event]] = {}  # each set once it is over

    @contextlib.contextmanager
    def place(self, key: Hashable) -> Iterator[Callable[[], Awaitable[None]]]:
        """A place in the line of `key` (a conversation; on Discord, also a channel) for
        the block; what it yields waits until the messages ahead are over."""
        line = self._line.setdefault(key, [])
        ahead, over = list(line), asyncio.Event()
        line.append(over)

        async def after_those_ahead() -> None:
            for message in ahead:
                await message.wait()

        try:
            yield after_those_ahead
        finally:
            over.set()
            line.remove(over)
            if not line:
                del self._line[key]


class Joining:
    """The conversations an adapter is joining now: a message that asks the bot into a
    thread it is not in is being taken (the thread read, its files fetched) and is not
    accepted yet. A message after it in that thread, sent unasked, waits for it before
    asking whether the bot is in the thread, or it would be taken for chatter and lost.
    Other processes (several gateways, among which the platform spreads its events) hear
    of it through storage, and wait for it too."""

    def __init__(self, service: ChatService) -> None:
        self.service = service
        self._now: dict[ConversationKey, asyncio.Event] = {}

    async def knows(self, key: ConversationKey, *, by: float) -> bool:
        """Whether the bot is in the conversation, once the joining of it here or in
        another process (if any) is over, or the event loop's clock says `by`."""
        loop = asyncio.get_running_loop()
        if (joined := self._now.get(key)) is not None:
            await set_within(joined, by - loop.time())
        elif await self.service.knows(key):
            return True
        elif not await self._joined_elsewhere(key):
            return False  # chatter in a thread no process is taking the bot into
        else:
            while (left := by - loop.time()) > 0:
                await asyncio.sleep(min(JOINED_ELSEWHERE_POLL_S, left))
                if not await self._joined_elsewhere(key):
                    break
        return await self.service.knows(key)

    @contextlib.asynccontextmanager
    async def joining(self, key: ConversationKey) -> AsyncIterator[None]:
        """For the block, the conversation is being joined (unless it is already)."""
        if key in self._now:
            yield
            return
        joined = self._now[key] = asyncio.Event()
        store = self.service.store
        with contextlib.suppress(RedisError):  # then only this process waits for it
            await store.mark_joining(str(key), for_ms=JOINING_MARK_MS)
        try:
            yield
        finally:
            del self._now[key]
            joined.set()
            with contextlib.suppress(RedisError):  # it lapses by itself
                await store.unmark_joining(str(key))

    async def _joined_elsewhere(self, key: ConversationKey) -> bool:
        try:
            return await self.service.store.being_joined(str(key))
        except RedisError:
            return False
