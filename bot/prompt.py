"""A conversation's prompt: its text cleaned, who said what, and trimmed to the budget.

Pure functions over `ChatMessage` lists; knows nothing of storage, platforms or models
(the token count comes in as a function).
"""

from __future__ import annotations

import asyncio
import logging
import unicodedata
from collections.abc import Callable

from bot.types import ChatMessage

logger = logging.getLogger(__name__)

TokenCounter = Callable[[list[ChatMessage]], int]
"""Prompt length in tokens of a messages list (thread-safe: it runs off the event loop)."""


def sanitized(text: str) -> str:
    """A message as it is stored and shown to the model: lone surrogates (which no
    encoding takes) replaced, surrounding space removed, and empty if nothing but
    invisible characters (zero-width spaces and joiners, byte-order marks) is left."""
    text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace").strip()
    visible = any(not char.isspace() and unicodedata.category(char) != "Cf" for char in text)
    return text if visible else ""


def named(history: list[ChatMessage]) -> list[ChatMessage]:
    """The history as the model sees it: with several people in a conversation, each of
    their messages starts with its author's name ("alice: …"); no `name` field is left."""
    several = len({m.get("name") for m in history if m["role"] == "user"} - {None}) > 1
    return [
        {
            "role": m["role"],
            "content": f"{m['name']}: {m['content']}" if several and "name" in m else m["content"],
        }
        for m in history
    ]


async def fit(
    system: list[ChatMessage],
    history: list[ChatMessage],
    *,
    count_tokens: TokenCounter,
    budget: int,
) -> tuple[list[ChatMessage], int]:
    """The prompt that fits `budget` tokens, and how many old messages were dropped to fit.

    Drops the oldest history first; never the system prompt or the newest message.
    The kept history starts at a user message, as chat templates expect (the store's
    own trim may have left an assistant message first).
    """
    newest = len(history) - 1

    def next_user(index: int) -> int:
        while index < newest and history[index]["role"] != "user":
            index += 1
        return index

    async def fits(drop: int) -> bool:
        return await asyncio.to_thread(count_tokens, system + history[drop:]) <= budget

    start = next_user(0)
    low, high = start, newest  # the smallest drop that fits lies in [low, high]
    while low < high:  # binary search: O(log n) token counts, not O(n)
        middle = (low + high) // 2
        if await fits(middle):
            high = middle
        else:
            low = middle + 1
    drop = next_user(low)
    if drop == newest and not await fits(drop):
        logger.warning("the newest message alone exceeds the prompt budget of %d tokens", budget)
    return system + history[drop:], drop - start
