"""Every Redis key threadbot writes, built in this one place.

Owns key names only; it must not talk to Redis. Change a layout here and nowhere else.
"""

from __future__ import annotations

PREFIX = "threadbot:"
CONVERSATION_PREFIX = f"{PREFIX}conversation:"
CLEARED_PREFIX = f"{PREFIX}cleared:"
SEEN_PREFIX = f"{PREFIX}seen:"
TURN_PREFIX = f"{PREFIX}turn:"
PENDING_TURNS = f"{PREFIX}pending-turns"
OWNER_PREFIX = f"{PREFIX}owner:"
ANSWER_PLACE_PREFIX = f"{PREFIX}answer-place:"


def conversation(conversation_id: str) -> str:
    """The list holding one conversation; the id is `str(ConversationKey)`."""
    return f"{CONVERSATION_PREFIX}{conversation_id}"


def cleared(conversation_id: str) -> str:
    """The marker that a conversation was reset: known to the bot, with no history."""
    return f"{CLEARED_PREFIX}{conversation_id}"


def seen(platform: str, message_id: str) -> str:
    """The marker that a platform message was already handled."""
    return f"{SEEN_PREFIX}{platform}:{message_id}"


def turn(turn_id: str) -> str:
    """The hash holding one accepted, not yet answered turn (its pending record)."""
    return f"{TURN_PREFIX}{turn_id}"


def owner(owner_id: str) -> str:
    """A running process's lease; its pending turns may be claimed once it expires."""
    return f"{OWNER_PREFIX}{owner_id}"


def answer_place(conversation_id: str) -> str:
    """Where a conversation's newest answer is shown (platform JSON), for its buttons."""
    return f"{ANSWER_PLACE_PREFIX}{conversation_id}"
