"""Platform-neutral text helpers for adapters: splitting long answers into messages, and
a message's words with the messages it forwards."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

# A line that starts, maybe indented (code under a list item), with a code fence; its
# language is the info string's first word, where that is short enough to be one.
FENCE = re.compile(r"^([ \t]{0,8})```([\w+#.-]{1,20}(?=\s|$))?[^\n]*", re.MULTILINE)
CLOSING_ROOM = len("\n" + " " * 8 + "```")
UNFINISHED_ESCAPE = re.compile(r"&[a-z]{0,3}$")  # the front of &amp; &lt; or &gt;
BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")
ZWJ = "\u200d"  # joins emoji into one (a family, a profession)


def split_message(text: str, limit: int) -> list[str]:
    """Split `text` into parts of at most `limit` characters, at paragraph, line or word ends.

    A code block cut in two is closed at the end of one part and reopened, with its
    language, at the start of the next, so every part renders on its own.
    """
    parts: list[str] = []
    while len(text) > limit:
        cut = _break_point(text, max(limit - CLOSING_ROOM, 1))
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


def _break_point(text: str, size: int) -> int:
    """Where to cut `text` within its first `size` characters: the last paragraph, line or
    word break in the back half, else the end, but not inside an escape such as Slack's
    `&amp;` (its halves would show as text), nor inside a Markdown link's label (`[the
    docs](…)`: neither half would be a link), nor inside a character as a reader sees one."""
    window = text[:size]
    for separator in ("\n\n", "\n", " "):
        index = window.rfind(separator)
        if separator == " " and index != -1:  # a word break: not one inside a link's label
            label = window.rfind("[", window.rfind("\n") + 1, index)
            if label > len(window) // 2 and "]" not in window[label:index]:
                index = label
        if index > len(window) // 2:
            return index
    escape = UNFINISHED_ESCAPE.search(window)
    return escape.start() if escape and escape.start() > 0 else _character_start(text, size)


def _character_start(text: str, index: int) -> int:
    """`index`, or where the character a reader sees there starts, if a cut at `index`
    would split it: an accent, a variation selector or a skin tone after it, emoji joined
    to it (a family), or the second letter of a flag (letters pair from their run's
    start). Never 0: a window that is all one such character is cut anyway."""
    start = index
    while 0 < index < len(text) and (_extends(text[index]) or text[index - 1] == ZWJ):
        index -= 1
    letters = 0
    while letters < index and _flag_letter(text[index - 1 - letters]):
        letters += 1
    if letters % 2 and index < len(text) and _flag_letter(text[index]):
        index -= 1
    return index or start


def _extends(char: str) -> bool:
    """Whether `char` belongs to the character before it."""
    code = ord(char)
    return (
        unicodedata.category(char) in ("Mn", "Mc", "Me")  # accents and other marks
        or char in (ZWJ, "\ufe0e", "\ufe0f")  # text and emoji presentation
        or 0x1F3FB <= code <= 0x1F3FF  # skin tones
        or 0xE0020 <= code <= 0xE007F  # tags: the flags of England, Scotland, Wales
    )


def _flag_letter(char: str) -> bool:
    return 0x1F1E6 <= ord(char) <= 0x1F1FF  # a regional indicator; two make a flag


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
