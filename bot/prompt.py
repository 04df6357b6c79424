"""A conversation's prompt: its text cleaned, who said what, trimmed to the budget, and
its roles taking turns as the strictest chat templates demand.

Pure functions over `ChatMessage` lists; knows nothing of storage, platforms or models
(the token count comes in as a function).
"""

from __future__ import annotations

import asyncio
import logging
import unicodedata
from collections.abc import Callable, Sequence
from typing import NamedTuple

from bot.types import ChatMessage

logger = logging.getLogger(__name__)

TRIM_TO = 0.75
"""What a trim keeps, as a share of the limit it was over (tokens, or stored messages)."""

TokenCounter = Callable[[list[ChatMessage]], int]
"""Prompt length in tokens of a messages list (thread-safe: it runs off the event loop)."""


def sanitized(text: str) -> str:
    """A message as it is stored and shown to the model: lone surrogates (which no
    encoding takes) replaced, surrounding space removed, and empty if nothing but
    invisible characters (zero-width spaces and joiners, byte-order marks) is left."""
    text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace").strip()
    visible = any(not char.isspace() and unicodedata.category(char) != "Cf" for char in text)
    return text if visible else ""


def alternating(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """`messages` as the strictest chat templates (Mistral, Gemma, Llama 2) accept them.

    Those raise unless user and assistant take turns, starting with the user after an
    optional system message; a conversation can hold two messages of one role in a row
    (an answer that failed, a thread read as context), and raising would leave it
    unanswerable for good. So consecutive messages of one role become one, joined by a
    blank line, and an empty user message goes before an assistant message that would
    come first. A well-formed conversation comes back as it was, so its prompt (and the
    KV cache kept for its next turn) does not change.
    """
    merged: list[ChatMessage] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            content = f"{merged[-1]['content']}\n\n{message['content']}"
            merged[-1] = {"role": message["role"], "content": content}
        else:
            merged.append(message)
    first = 1 if merged and merged[0]["role"] == "system" else 0
    if first < len(merged) and merged[first]["role"] == "assistant":
        merged.insert(first, {"role": "user", "content": ""})
    return merged


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


class Fitted(NamedTuple):
    """A prompt that fits, and what it leaves out of the history."""

    messages: list[ChatMessage]  # the system prompt, then the kept history
    cut: int  # how many of the oldest history messages the prompt leaves out
    # Of those, how many were left out to fit (what the user is told); the others are
    # assistant messages that the store's own trim left first.
    dropped: int


async def fit(
    system: list[ChatMessage],
    history: list[ChatMessage],
    *,
    count_tokens: TokenCounter,
    budget: int,
) -> Fitted:
    """The prompt for `history`: all of it while it fits `budget` tokens; once it does not,
    only the newest messages that fit `TRIM_TO` of the budget.

    Trimming below the budget is hysteresis: the caller drops the `cut` messages from the
    stored history, so the next turns start the same way, byte for byte (their KV cache is
    reused), until they have grown by a quarter of the budget; a cut at the budget itself
    would shift the front of every turn's prompt. Never drops the system prompt or the
    newest message. The kept history starts at a user message, as chat templates expect
    (the store's own trim may have left an assistant message first).
    """
    newest = len(history) - 1

    def next_user(index: int) -> int:
        while index < newest and history[index]["role"] != "user":
            index += 1
        return index

    async def fits(drop: int, tokens: int) -> bool:
        return await asyncio.to_thread(count_tokens, system + history[drop:]) <= tokens

    start = next_user(0)
    if await fits(start, budget):
        return Fitted(system + history[start:], start, 0)
    low_watermark = int(budget * TRIM_TO)
    low, high = start, newest  # the smallest drop that fits lies in [low, high]
    while low < high:  # binary search: O(log n) token counts, not O(n)
        middle = (low + high) // 2
        if await fits(middle, low_watermark):
            high = middle
        else:
            low = middle + 1
    drop = next_user(low)
    if drop == newest and not await fits(drop, budget):
        logger.warning("the newest message alone exceeds the prompt budget of %d tokens", budget)
    return Fitted(system + history[drop:], drop, drop - start)
