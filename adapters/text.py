"""Platform-neutral text helpers for adapters: splitting long answers into messages."""

from __future__ import annotations

import re

FENCE = re.compile(r"^```[^\n`]*", re.MULTILINE)
CLOSE_FENCE = "\n```"


def split_message(text: str, limit: int) -> list[str]:
    """Split `text` into parts of at most `limit` characters, at paragraph, line or word ends.

    A code block cut in two is closed at the end of one part and reopened, with its
    language, at the start of the next, so every part renders on its own.
    """
    parts: list[str] = []
    while len(text) > limit:
        cut = _break_point(text[: limit - len(CLOSE_FENCE)])
        head, rest = text[:cut].rstrip(), text[cut:]
        if fence := _open_fence(head):
            head += CLOSE_FENCE
            rest = f"{fence}\n{rest.lstrip(chr(10))}"
        else:
            rest = rest.lstrip()
        parts.append(head)
        text = rest
    if text.strip():
        parts.append(text)
    return parts


def _break_point(window: str) -> int:
    """Where to cut: the last paragraph, line or word break in the back half, else the end."""
    for separator in ("\n\n", "\n", " "):
        index = window.rfind(separator)
        if index > len(window) // 2:
            return index
    return len(window)


def _open_fence(text: str) -> str | None:
    """The opening line of a code block that `text` leaves open, if any."""
    fence = None
    for match in FENCE.finditer(text):
        fence = match.group(0) if fence is None else None
    return fence
