"""A conversation's prompt: its text cleaned, who said what, and trimmed to the budget.

Pure functions over `ChatMessage` lists; knows nothing of storage, platforms or models
(the token count comes in as a function).
"""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import Callable
from typing import NamedTuple

from bot.types import ChatMessage

TRIM_TO = 2 / 3
"""What a trim keeps, as a share of the limit it was over (tokens, or stored messages).

A trim changes the prompt's front, so the next turn prefills all that is kept; the turns
after it reuse their cache until the limit is reached again. Turns of t tokens against a
budget B trim every (1 - TRIM_TO) B / t turns and then prefill TRIM_TO B: t TRIM_TO /
(1 - TRIM_TO) tokens a turn over its own t. At two thirds that is 2t, where three quarters
cost 3t and one half t; two thirds keeps most of the history at two thirds of the cost."""

TokenCounter = Callable[[list[ChatMessage]], int]
"""Prompt length in tokens of a messages list (thread-safe: it runs off the event loop)."""


def sanitized(text: str) -> str:
    """A message as it is stored and shown to the model: lone surrogates (which no
    encoding takes) replaced, surrounding space removed, and empty if nothing but
    invisible characters (zero-width spaces and joiners, byte-order marks) is left."""
    text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace").strip()
    visible = any(not char.isspace() and unicodedata.category(char) != "Cf" for char in text)
    return text if visible else ""


def several_people(history: list[ChatMessage]) -> bool:
    """Whether the history's messages come from more than one named person."""
    return len({m.get("name") for m in history if m["role"] == "user"} - {None}) > 1


def named(history: list[ChatMessage], *, several: bool | None = None) -> list[ChatMessage]:
    """The history as the model sees it: with `several` people in a conversation (by
    default, as the history shows), each of their messages starts with its author's name
    ("alice: …"); no `name` field is left."""
    if several is None:
        several = several_people(history)
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
    only the newest messages that fit `TRIM_TO` of the budget (or, where the newest alone
    is longer than that, the budget itself: the history is not given up for it).

    Trimming below the budget is hysteresis: the caller drops the `cut` messages from the
    stored history, so the next turns start the same way, byte for byte (their KV cache is
    reused), until they have grown by a third of the budget; a cut at the budget itself
    would shift the front of every turn's prompt. Never drops the system prompt or the
    newest message, which the caller made sure fits with it (`tokens_over_budget`). The
    kept history starts at a user message, as chat templates expect (the store's own trim
    may have left an assistant message first).
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
    target = int(budget * TRIM_TO)
    if not await fits(newest, target):  # a long newest message: keep what fits at all
        target = budget
    low, high = start, newest  # the smallest drop that fits lies in [low, high]
    while low < high:  # binary search: O(log n) token counts, not O(n)
        middle = (low + high) // 2
        if await fits(middle, target):
            high = middle
        else:
            low = middle + 1
    drop = next_user(low)
    return Fitted(system + history[drop:], drop, drop - start)


async def tokens_over_budget(
    system: list[ChatMessage], message: ChatMessage, *, count_tokens: TokenCounter, budget: int
) -> int | None:
    """The prompt's tokens for `message` after the system prompt alone, where that is over
    `budget`: no trim of the history could make it fit. None where it fits."""
    tokens = await asyncio.to_thread(count_tokens, [*system, message])
    return tokens if tokens > budget else None
