"""The few types every layer shares: a chat message, a turn, and the reply sink.

The core (service, queue, engine) sees only these; platform details stay in `adapters/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, TypedDict

Role = Literal["system", "user", "assistant"]


class ChatMessage(TypedDict):
    """One OpenAI-style message, as chat templates and Redis both hold it."""

    role: Role
    content: str


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


class ReplySink(Protocol):
    """How the service answers on a platform; each adapter provides one per turn.

    The service calls `start` once, `append` for each streamed chunk, then exactly one
    of `finish` (the whole answer) or `fail` (a short user-facing error text).
    `notice` may come first, for one-line warnings such as dropped history.
    """

    async def start(self) -> None: ...

    async def append(self, chunk: str) -> None: ...

    async def notice(self, text: str) -> None: ...

    async def finish(self, text: str) -> None: ...

    async def fail(self, text: str) -> None: ...
