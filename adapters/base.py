"""The contract every platform adapter keeps, and the guard around its event handlers.

An adapter is the only code that knows a platform. It MUST turn each platform message
it should answer into a `Turn` and hand it to `ChatService.handle` with a `ReplySink`
for that platform, through `answer` below so one failure never stops the adapter. It
MUST drop what the bot must not answer (its own messages, other bots, edits). It SHOULD
stream: the sink's `append` shows text as it arrives. It MAY add commands (`reset`).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

from bot import replies
from bot.service import ChatService
from bot.types import ReplySink, Turn

logger = logging.getLogger(__name__)


class AdapterError(RuntimeError):
    """A platform refused us for a reason the operator must fix; the message says which."""


class Adapter(ABC):
    """A platform connection that feeds turns to the service until it is cancelled."""

    @abstractmethod
    async def run(self) -> None:
        """Connect and serve until cancelled or the platform closes; MUST NOT return early."""


async def answer(service: ChatService, turn: Turn, sink: ReplySink) -> None:
    """Handle one turn; an unexpected error is logged and answered, never raised."""
    try:
        await service.handle(turn, sink)
    except Exception:
        logger.exception("handling message %s in %s failed", turn.message_id, turn.conversation)
        try:
            await sink.fail(replies.failed())
        except Exception:
            logger.exception("could not tell the user about the failure")
