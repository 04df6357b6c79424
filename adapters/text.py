"""Platform-neutral text helpers for adapters: splitting long answers into messages, and
a message's words with the messages it forwards."""

from __future__ import annotations

import re
from collections.abc import Iterable

# A line that starts, maybe indented (code under a list item), with a code fence; its
# language is the info string's first word, where that is short enough to be one.
FENCE = re.compile(r"^([ \t]{0,8})```([\w+#.-]{1,20}(?=\s|$))?[^\n]*", re.MULTILINE)
CLOSING_ROOM = len("\n" + " " * 8 + "```")
UNFINISHED_ESCAPE = re.compile(r"&[a-z]{0,3}$")  # the front of &amp; &lt; or &gt;
BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


def split_message(text: str, limit: int) -> list[str]:
    """Split `text` into parts of at most `limit` characters, at paragraph, line or word ends.

    A code block cut in two is closed at the end of one part and reopened, with its
    language, at the start of the next, so every part renders on its own.
    """
    parts: list[str] = []
    while len(text) > limit:
        cut = _break_point(text[: max(limit - CLOSING_ROOM, 1)])
        head, rest = text[:cut].rstrip(), text[cut:]
        fence = _open_fence(head)
        # Reopened only where that still shortens what is left: every turn makes progress.
        if fence is not None and len(fence) + 1 < cut:
            indent = fence[: fence.index("`")]
            head += f"\n{indent}```"
            rest = f"{fence}\n{rest.lstrip(chr(10))}"
        elif rest.startswith("\n"):  # cut at a line's end: the next line keeps its indent
            rest = BLANK_LINES.sub("", rest)
        else:
            rest = rest.lstrip()
        if head.strip():
            parts.append(head)
        text = rest
    if text.strip():
        parts.append(text)
    return parts


def _break_point(window: str) -> int:
    """Where to cut: the last paragraph, line or word break in the back half, else the end,
    but not inside an escape such as Slack's `&amp;` (its halves would show as text), nor
    inside a Markdown link's label (`[the docs](…)`: neither half would be a link)."""
    for separator in ("\n\n", "\n", " "):
        index = window.rfind(separator)
        if separator == " " and index != -1:  # a word break: not one inside a link's label
            label = window.rfind("[", window.rfind("\n") + 1, index)
            if label > len(window) // 2 and "]" not in window[label:index]:
                index = label
        if index > len(window) // 2:
            return index
    escape = UNFINISHED_ESCAPE.search(window)
    return escape.start() if escape and escape.start() > 0 else len(window)


def _open_fence(text: str) -> str | None:
    """The opening (indent, fence and language) of a code block `text` leaves open, if any.
    A line with an even number of fences (```like this```) opens and closes its block."""
    fence = None
    for match in FENCE.finditer(text):
        if match.group(0).count("```") % 2:
            fence = f"{match.group(1)}```{match.group(2) or ''}" if fence is None else None
    return fence


def with_forwarded(said: str, forwarded: Iterable[str]) -> str:
    """A message's own words, then the text of each message it forwards, marked so: the
    model reads what was shared, and whose words are whose."""
    return "\n\n".join([said, *(f"[forwarded]\n{text}" for text in forwarded if text)]).strip()
