"""Files attached to a message, as text the model reads with it: text files read, others named.

Platform-neutral: an adapter describes each file as an `Attachment` (name, type, size, and
how to download its first bytes), and `with_attachments` adds them to the message's text.
Text files (by extension or text/* type) are read as UTF-8, up to MAX_ATTACHMENT_CHARS in
all, and never past what leaves the whole message within MAX_INPUT_CHARS, nor past what
leaves it within the prompt's tokens (`fits`; the service enforces both, and would refuse
a message the asker cannot shorten); what is cut is marked. Other files, files that turn
out to hold binary data, files over MAX_FILE_BYTES and failed or slow downloads are named
with the reason, so neither the model nor the user is left guessing; nothing here fails
the turn.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from bot.config import Settings

if TYPE_CHECKING:
    from bot.service import ChatService
    from bot.types import Turn

logger = logging.getLogger(__name__)

TEXT_EXTENSIONS = frozenset({
    "txt", "text", "md", "markdown", "rst", "adoc", "org", "tex", "py", "pyi", "ipynb", "json",
    "jsonl", "ndjson", "csv", "tsv", "yaml", "yml", "toml", "ini", "cfg", "conf", "env",
    "properties", "log", "diff", "patch", "js", "mjs", "cjs", "jsx", "ts", "tsx", "vue",
    "svelte", "html", "htm", "css", "scss", "sass", "less", "xml", "svg", "sql", "sh", "bash",
    "zsh", "fish", "ps1", "bat", "c", "h", "cc", "cpp", "cxx", "hpp", "hh", "cs", "java", "kt",
    "kts", "scala", "groovy", "gradle", "go", "rs", "rb", "php", "pl", "pm", "lua", "r", "jl",
    "swift", "m", "mm", "dart", "ex", "exs", "erl", "hs", "ml", "clj", "elm", "nim", "zig",
    "proto", "graphql", "gql", "tf", "hcl", "srt", "vtt",
    "dockerfile", "makefile", "gitignore", "editorconfig",  # whole names, no extension
})  # fmt: skip
TEXT_TYPES = frozenset({
    "application/json", "application/xml", "application/javascript", "application/x-javascript",
    "application/yaml", "application/x-yaml", "application/toml", "application/sql",
    "application/x-sh", "application/x-python", "application/x-ndjson", "application/ld+json",
})  # fmt: skip
MAX_FILE_BYTES = 2**20  # larger files are named, not downloaded
NAME_CHARS = 100  # a file name is shortened to this in its label
LABEL_ROOM = 300  # room kept in MAX_INPUT_CHARS for each file's label lines
TRUNCATED = "[… truncated]"
NO_ROOM = "[{count} attached file(s) not read: the message is at its length limit]"
REPLACED = "\N{REPLACEMENT CHARACTER}"
FITTING_STEPS = 7  # halvings in the search for how much of the files' text fits: within 1%
EARLIER = "not read: attached to an earlier message"


@dataclass(frozen=True, slots=True)
class Attachment:
    """One file on a message, as the platform describes it.

    `download(n)` returns at least the file's first `n` bytes (all of a shorter file; it
    may return more) and raises on failure; None where the file cannot be downloaded."""

    name: str
    mimetype: str  # "" where the platform does not say
    size: int | None  # in bytes, where the platform says
    download: Callable[[int], Awaitable[bytes]] | None


class _NotRead(Exception):
    """A file is named rather than read; the message says why."""


def is_text(name: str, mimetype: str) -> bool:
    """Whether a file is meant to be read as text, by its type or its name."""
    mimetype = mimetype.split(";")[0].strip().lower()
    if mimetype.startswith("text/") or mimetype in TEXT_TYPES:
        return True
    path = PurePosixPath(name.lower())
    return (
        path.suffix.removeprefix(".") in TEXT_EXTENSIONS or path.name.lstrip(".") in TEXT_EXTENSIONS
    )


async def attached(
    service: ChatService, turn: Turn, attachments: Sequence[Attachment], *, timeout: float
) -> Turn:
    """The turn with its attachments after its text, cut where it would not fit its
    conversation's prompt."""
    if not attachments:
        return turn
    fits = await service.fitting(turn)
    settings = service.team.settings
    text = await with_attachments(
        turn.text, attachments, settings=settings, timeout=timeout, fits=fits
    )
    return replace(turn, text=text)


async def with_attachments(
    text: str,
    attachments: Sequence[Attachment],
    *,
    settings: Settings,
    timeout: float,
    fits: Callable[[str], Awaitable[bool]] | None = None,
) -> str:
    """`text` followed by its attachments: each text file's content under its name, each
    other file named. Downloads together take at most `timeout` seconds. Where the message
    would not `fit` (the prompt's tokens), each file's text is cut by the same share, to
    as much as fits."""
    if not attachments:
        return text
    room = settings.max_input_chars - len(text) - LABEL_ROOM * len(attachments)
    if room < 0:  # what was typed leaves no room to name them: said in a line, if it fits
        noted = f"{text}\n\n{NO_ROOM.format(count=len(attachments))}".strip()
        return noted if len(noted) <= settings.max_input_chars else text
    budget = max(0, min(settings.max_attachment_chars, room))
    deadline = asyncio.get_running_loop().time() + timeout
    # Together: one slow file does not use up the time of those after it.
    downloads = await asyncio.gather(*(_fetched(a, budget, deadline) for a in attachments))
    wanted = _bytes_for(budget)
    parts = []
    for attachment, data in zip(attachments, downloads, strict=True):
        try:
            content, cut = _read(data, wanted, budget)
        except _NotRead as reason:
            parts.append(_Part(_label(attachment, str(reason))))
            continue
        budget -= len(content)
        parts.append(_Part(_label(attachment), content, cut))

    def joined(share: float) -> str:
        return _joined(text, [part.shown(share) for part in parts])

    whole = joined(1.0)
    if fits is None or await fits(whole):
        return whole
    fitting, over = 0.0, 1.0  # the shares of each file's text known to fit, and not to
    for _ in range(FITTING_STEPS):
        share = (fitting + over) / 2
        if await fits(joined(share)):
            fitting = share
        else:
            over = share
    return joined(fitting)


def with_files_named(text: str, attachments: Sequence[Attachment]) -> str:
    """`text` followed by each file named, not read: an earlier message's, in a thread read
    back as context. The model knows the file is there, and that it cannot see it."""
    return _joined(text, [_label(attachment, EARLIER) for attachment in attachments])


def _joined(text: str, parts: Sequence[str]) -> str:
    return "\n\n".join([*([text] if text else []), *parts])


@dataclass(frozen=True, slots=True)
class _Part:
    """One file in the message: its label, and a text file's text (None: named only)."""

    label: str
    content: str | None = None
    cut: bool = False  # the text read is not all of the file

    def shown(self, share: float) -> str:
        """As the message holds it, with `share` of its text."""
        if self.content is None:
            return self.label
        kept = self.content[: math.floor(len(self.content) * share)]
        cut = self.cut or len(kept) < len(self.content)
        return "\n".join([self.label, kept, *([TRUNCATED] if cut else [])])


async def _fetched(attachment: Attachment, budget: int, deadline: float) -> bytes | _NotRead:
    """The bytes of the file's first `budget` characters at most (all of a shorter file),
    or why it is not read."""
    if not is_text(attachment.name, attachment.mimetype) or attachment.download is None:
        return _NotRead("not read")
    if attachment.size is not None and attachment.size > MAX_FILE_BYTES:
        return _NotRead(f"not read: larger than {_size(MAX_FILE_BYTES)}")
    if budget <= 0:
        return _NotRead("not read: no room left for attachments")
    wanted = _bytes_for(budget)
    try:
        async with asyncio.timeout_at(deadline):
            return (await attachment.download(wanted))[:wanted]
    except TimeoutError:
        return _NotRead("not read: the download took too long")
    except Exception as error:
        logger.warning("downloading attachment %r failed: %s", attachment.name, error)
        return _NotRead("not read: the download failed")


def _bytes_for(chars: int) -> int:
    return 4 * chars + 4  # UTF-8 takes at most 4 bytes a character


def _read(data: bytes | _NotRead, wanted: int, budget: int) -> tuple[str, bool]:
    """A file's text, at most `budget` characters, and whether it was cut; or _NotRead.
    `data` is its first `wanted` bytes (fewer: the whole file), or why it was not read."""
    if isinstance(data, _NotRead):
        raise data
    if budget <= 0:  # the files before it took it all
        raise _NotRead("not read: no room left for attachments")
    encoding = _marked_encoding(data)
    if b"\0" in data and encoding is None:
        raise _NotRead("not read: binary data")
    if not data:
        raise _NotRead("empty")
    complete = len(data) < wanted
    content = _decoded(data, encoding, final=complete)
    return content[:budget], len(content) > budget or not complete


def _marked_encoding(data: bytes) -> str | None:
    """UTF-32 or UTF-16 with its byte-order mark (Windows' "Unicode" text: PowerShell's
    `>`, Notepad, Excel) is text, for all its NUL bytes. (UTF-32 LE's mark begins with
    UTF-16 LE's, so it is looked for first.)"""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return None


def _decoded(data: bytes, encoding: str | None, *, final: bool) -> str:
    """The text: as its mark says, else UTF-8 (a few bytes off replaced); but where bytes
    above ASCII make mostly no UTF-8 character, Windows-1252 (Excel's CSV and most older
    Western text files), whose every byte is one, where UTF-8 lost every accented letter;
    and text in another encoding (Cyrillic, Chinese) is named unread, not read as garbage. A
    download cut short may end inside a character: the decoder holds it back."""
    if encoding is not None:
        return _decoder(encoding).decode(data, final=final)
    with contextlib.suppress(UnicodeDecodeError):  # a U+FFFD of its own is no mistake
        return _decoder("utf-8-sig", errors="strict").decode(data, final=final)
    text = _decoder("utf-8-sig").decode(data, final=final)
    wrong = text.count(REPLACED)
    if sum(c > "\x7f" for c in text) - wrong >= wrong:  # UTF-8, a few bytes off
        return text
    if _western(data):
        return _decoder("cp1252").decode(data, final=final)
    raise _NotRead("not read: not UTF-8 text (save it as UTF-8)")


def _western(data: bytes) -> bool:
    """Whether the bytes above ASCII are mostly alone or in pairs, as a Western text's
    accented letters are; in a Cyrillic or Chinese encoding, runs of them make up words.
    (A run of one byte again is a rule line: `————`.)"""
    runs = re.findall(rb"[\x80-\xff]+", data)
    in_words = sum(len(run) for run in runs if len(run) > 2 and len(set(run)) > 1)
    return 2 * in_words <= sum(map(len, runs))


def _decoder(encoding: str, errors: str = "replace") -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder(encoding)(errors=errors)


def _label(attachment: Attachment, reason: str | None = None) -> str:
    """`[attached: name]`, or for a file not read, `[attached: name, type, size: reason]`."""
    name = _cleaned(attachment.name) or "a file"
    if reason is None:
        return f"[attached: {name}]"
    facts = [name, _cleaned(attachment.mimetype.split(";")[0])]
    if attachment.size is not None:
        facts.append(_size(attachment.size))
    return f"[attached: {', '.join(fact for fact in facts if fact)}: {reason}]"


def _cleaned(text: str) -> str:
    """One line, no brackets (which would end the label), at most NAME_CHARS long."""
    text = re.sub(r"[\s\[\]]+", " ", text).strip()
    return text if len(text) <= NAME_CHARS else text[: NAME_CHARS - 1] + "…"


def _size(size: int) -> str:
    if size < 1000:
        return f"{size} bytes"
    if size < 1_000_000:
        return f"{math.ceil(size / 1000)} KB"
    return f"{size / 1_000_000:.1f} MB"
