"""Personas: the system prompt and generation settings in effect in one conversation.

The team's file lists personas for a platform, a workspace (Slack team, Discord server) or a
channel; for each value, the most specific persona that sets it wins, over SYSTEM_PROMPT
and the engine's MAX_NEW_TOKENS. The prompt's placeholders are filled from the turn
that starts the conversation and the service keeps that text for the conversation's life,
so every later prompt begins with the same bytes (the KV cache of the last turn stays
usable) until the persona's configuration changes or the conversation is reset.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from bot.config import Persona, Settings
from bot.types import ConversationKey, Turn

PLACEHOLDER = re.compile(r"\{(date|time|user_name|channel_name|bot_name)\}")
"""Only these are filled: any other brace in a prompt (JSON, code) is left as written."""

DEFAULT_BOT_NAME = "threadbot"


@dataclass(frozen=True, slots=True)
class Voice:
    """What a persona settles for a conversation."""

    system_prompt: str | None  # with placeholders unfilled
    max_new_tokens: int | None  # None: MAX_NEW_TOKENS, as the engine was started with
    temperature: float | None  # None: the model's own generation config


def voice_for(settings: Settings, conversation: ConversationKey) -> Voice:
    """The personas that match `conversation`, least specific first, each overriding what
    it sets."""
    values: dict[str, object] = {
        "system_prompt": settings.system_prompt,
        "max_new_tokens": None,
        "temperature": None,
    }
    for persona in sorted(
        (p for p in settings.personas if _matches(p, conversation)), key=_specificity
    ):
        values |= {name: getattr(persona, name) for name in values if getattr(persona, name)
                   is not None}  # fmt: skip
    return Voice(**values)  # type: ignore[arg-type]


def fill(template: str, values: Mapping[str, str]) -> str:
    return PLACEHOLDER.sub(lambda match: values[match[1]], template)


def placeholder_values(turn: Turn, now: datetime | None = None) -> dict[str, str]:
    now = now or datetime.now(UTC)
    return {
        "date": now.strftime("%A %d %B %Y"),
        "time": now.strftime("%H:%M UTC"),
        "user_name": turn.author_name or turn.author,
        "channel_name": turn.channel_name or turn.conversation.channel,
        "bot_name": turn.bot_name or DEFAULT_BOT_NAME,
    }


def _matches(persona: Persona, conversation: ConversationKey) -> bool:
    return all(
        wanted is None or wanted == actual
        for wanted, actual in (
            (persona.platform, conversation.platform),
            (persona.workspace, conversation.workspace),
            (persona.channel, conversation.channel),
        )
    )


def _specificity(persona: Persona) -> tuple[bool, bool, bool]:
    return persona.channel is not None, persona.workspace is not None, persona.platform is not None
