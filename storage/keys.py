"""Every Redis key threadbot writes, built in this one place.

Owns key names only; it must not talk to Redis. Change a layout here and nowhere else.
"""

from __future__ import annotations

PREFIX = "threadbot:"
CONVERSATION_PREFIX = f"{PREFIX}conversation:"
SEEN_PREFIX = f"{PREFIX}seen:"


def conversation(conversation_id: str) -> str:
    """The list holding one conversation; the id is `str(ConversationKey)`."""
    return f"{CONVERSATION_PREFIX}{conversation_id}"


def seen(platform: str, message_id: str) -> str:
    """The marker that a platform message was already handled."""
    return f"{SEEN_PREFIX}{platform}:{message_id}"
