"""The few types every layer shares: a chat message, a turn, and the reply sink.

The core (service, queue, engine) sees only these; platform details stay in `adapters/`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, Protocol, TypedDict

Role = Literal["system", "user", "assistant"]
Command = Literal["help", "reset", "forget", "status", "prompt", "reload", "stats"]
ADMIN_COMMANDS: frozenset[Command] = frozenset({"reload", "stats"})
JOURNALED_COMMANDS: frozenset[Command] = frozenset({"reset", "forget"})
"""Commands that change what is stored: taken as turns are (`storage.turns`), so that a
crash or a stop never loses one, nor carries it out twice."""
THREAD_ONLY: frozenset[Command] = frozenset({"reset", "forget"})
"""Commands that act on one conversation: as slash commands, only where the place they
are run in is one (a DM, a thread), not in a channel, where each thread is one."""


class ChatMessage(TypedDict):
    """One OpenAI-style message, as chat templates and Redis both hold it.

    `name` is who wrote a user message (a display name), where the platform says."""

    role: Role
    content: str
    name: NotRequired[str]


@dataclass(frozen=True, slots=True)
class ConversationKey:
    """Where a conversation lives: `platform:workspace:channel:thread`.

    `workspace` is the Slack team or Discord guild ("-" where there is none, e.g. DMs);
    `thread` is the thread id, or the channel id again where the platform has no threads.
    """

    platform: str
    workspace: str
    channel: str
    thread: str

    def __str__(self) -> str:
        return f"{self.platform}:{self.workspace}:{self.channel}:{self.thread}"

    @classmethod
    def parse(cls, text: str) -> ConversationKey:
        """The key that `str` gave as `text`."""
        return cls(*text.split(":"))


@dataclass(frozen=True, slots=True)
class Turn:
    """One user message, normalised by an adapter."""

    conversation: ConversationKey
    author: str  # platform user id; fairness and logs use it
    text: str
    message_id: str  # platform message id, used to drop re-deliveries
    # Earlier messages of the thread, stored first when the bot joins a thread it has
    # no history for (e.g. mentioned halfway through a discussion).
    context: tuple[ChatMessage, ...] = ()
    command: Command | None = None  # parsed by the adapter, carried out by the service
    author_name: str = ""  # display name, so the model can tell people in a thread apart
    channel_name: str = ""  # for the persona's {channel_name}
    bot_name: str = ""  # the bot's name on this platform, for the persona's {bot_name}
    # Sent while the bot was away, read back at its return (Discord): its sender could not
    # wait for answers then, so it is not refused for those pending (MAX_PENDING_PER_USER).
    read_back: bool = False

    @property
    def id(self) -> str:
        """One per message, however often the platform delivers it."""
        return f"{self.conversation.platform}:{self.message_id}"


class NowhereToAnswer(Exception):
    """Raised by a sink whose turn's place is gone for good (its question was deleted):
    the turn ends unanswered and is not tried again, and nothing is said of it there."""


class ReplySink(Protocol):
    """How the service answers on a platform; each adapter provides one per turn.

    The service calls `start` once, `append` for each streamed chunk (after `restart`,
    the answer streams again from its start: another try writes it), then exactly one
    of `finish` (the whole answer), `fail` (a short user-facing error text) or `pause`
    (a short text saying the answer will come later; once the answer or a failure is
    shown, `fail` and `pause` change nothing). `notice` may come first, for one-line warnings such
    as dropped history.

    `reply_target()` is where the answer goes and what is posted so far, as JSON; the adapter
    rebuilds a sink from it to resume the answer in another process, editing what was
    posted rather than posting again. The service sets `on_post`, and the sink awaits it
    after each platform message it posts or deletes, so the saved target is always current.
    """

    on_post: Callable[[], Awaitable[None]] | None

    def reply_target(self) -> dict[str, Any]: ...

    async def start(self) -> None: ...

    async def append(self, chunk: str) -> None: ...

    async def restart(self) -> None: ...

    async def notice(self, text: str) -> None: ...

    async def finish(self, text: str) -> None: ...

    async def fail(self, text: str) -> None: ...

    async def pause(self, text: str) -> None: ...
