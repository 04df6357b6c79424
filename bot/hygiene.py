"""What of a model's output is shown and kept: reasoning left out, loops cut.

Pure and streaming. `AnswerFilter.feed` takes each chunk as the engine writes it and returns
the text to show now; `looping` turns true once the answer ends in a loop (the caller then
cancels the generation); `final` gives the answer to show and store.

Reasoning models write `<think>…</think>` before their answer. With `strip_reasoning`, a
block that opens the answer is left out, and text inside a block that is not closed yet is
never shown (a tag split across chunks is held back until it is whole). Templates that
open the block in the prompt (DeepSeek-R1's) leave only the closing tag, at the start of a
line and outside a code block, in the output: everything before it was reasoning. Where
the template is known to (`prompt_opens_reasoning`), nothing is shown before that tag,
nothing there is cut as a loop, and an answer that never writes it is all reasoning;
where it is not known, the text streamed before the tag cannot be taken back, but the
final text, which replaces it, leaves it out. Elsewhere the tags are text: an answer
about reasoning models may well write them, as in a code block that shows them.

A loop is one piece of text of at least MIN_UNIT characters repeated, copy after copy, at
the end of the answer. Shorter repeats (`ha ha`, `0, 0, 0`, `-----`) and a few repeated
lines are often meant, so they never count: a piece must repeat MIN_REPEATS times and span
LOOP_SPAN characters, and differing lines of a table or a list are no loop at all. A piece
of data (mostly digits and punctuation, as a matrix's identical rows) must repeat
DATA_REPEATS times.
"""

from __future__ import annotations

import math

from bot import replies

OPEN, CLOSE = "<think>", "</think>"
FENCE = "```"
MIN_UNIT = 20  # the shortest repeated piece that makes a loop
MAX_UNIT = 2000  # the longest one looked for (a repeated paragraph)
MIN_REPEATS = 5  # copies in a row of even a long piece
DATA_REPEATS = 32  # copies in a row of a piece of data (a matrix's identical rows)
LOOP_SPAN = 500  # characters of copies in a row: a short piece must repeat more often
MAX_CANDIDATES = 64  # piece lengths tried per check, bounding the work a chunk costs


class ReasoningSplitter:
    """Separates `<think>` blocks from the answer, chunk by chunk; `visible` is the answer
    so far (it starts at its first non-blank character)."""

    def __init__(self) -> None:
        self.visible = ""
        self._pending = ""  # not judged yet: it may be the start of a tag
        self._inside = False
        self._opened = False  # a block was opened: a later stray closing tag is just text
        self._last = "\n"  # the character before the text to judge (the answer starts a line)

    def feed(self, chunk: str) -> str:
        """The text of `chunk` (and of what was held back) that belongs to the answer."""
        text, shown = self._pending + chunk, ""
        self._pending = ""
        while text:  # each pass takes a tag out of `text`, or ends
            if self._inside:
                end = text.find(CLOSE)
                if end < 0:
                    self._hold(text, (CLOSE,))
                    break
                text, self._inside = self._after(text, end + len(CLOSE)), False
                continue
            start = text.find(OPEN)
            if self.visible or text[: max(start, 0)].strip():
                start = -1  # the answer has begun: a tag in it is text
            stray = -1 if self._opened else self._reasoning_end(text)
            if stray >= 0 and (start < 0 or stray < start):
                # The prompt opened the block: everything up to here was reasoning.
                self.visible, shown, self._opened = "", "", True
                text = self._after(text, stray + len(CLOSE))
                continue
            if start < 0:
                shown += self._show(self._hold(text, (OPEN, CLOSE)))
                break
            text, self._inside, self._opened = self._after(text, start + len(OPEN)), True, True
        return shown

    @property
    def opened(self) -> bool:
        """Whether a block was opened (by its tag, or by the prompt, whose end was met)."""
        return self._opened

    def _reasoning_end(self, text: str) -> int:
        """Where a closing tag first begins a line in `text` outside a code block (an odd
        number of fences before it opens one): the end of reasoning the prompt opened;
        -1 if nowhere, or if an opening tag began a line before it, outside a code block
        (an answer showing the format: reasoning the prompt opened may name the tag, but
        opens no block)."""
        index = self._at_line_start(text, CLOSE)
        while index >= 0 and (self.visible + text[:index]).count(FENCE) % 2:
            index = self._at_line_start(text, CLOSE, index + 1)
        if index >= 0 and _opens_a_line(self.visible + text[:index]):
            return -1
        return index

    def _at_line_start(self, text: str, tag: str, start: int = 0) -> int:
        """Where `tag` first begins a line in `text`, from `start`; -1 if nowhere."""
        index = text.find(tag, start)
        while index >= 0 and (text[index - 1] if index else self._last) != "\n":
            index = text.find(tag, index + 1)
        return index

    def _after(self, text: str, judged: int) -> str:
        """`text` less its first `judged` characters."""
        self._last = text[judged - 1]
        return text[judged:]

    def _hold(self, text: str, tags: tuple[str, ...]) -> str:
        """Hold back what may begin one of `tags` at the end of `text`; the rest."""
        judged = len(text) - _tag_start(text, tags)
        self._pending = text[judged:]
        if judged:
            self._last = text[judged - 1]
        return text[:judged]

    def flush(self) -> str:
        """At the end of the answer: held-back text that never became a tag is answer,
        unless it is inside an unclosed block."""
        text, self._pending = self._pending, ""
        return "" if self._inside else self._show(text)

    def _show(self, text: str) -> str:
        if not self.visible:
            text = text.lstrip()
        self.visible += text
        return text


def _opens_a_line(text: str) -> bool:
    """Whether an opening tag begins a line of `text` outside a code block."""
    index = text.find(OPEN)
    while index >= 0:
        if (index == 0 or text[index - 1] == "\n") and not text[:index].count(FENCE) % 2:
            return True
        index = text.find(OPEN, index + 1)
    return False


def without_reasoning(text: str, *, prompt_opened: bool = False) -> str:
    """A whole answer with its reasoning left out (as streaming it would show it); where
    the prompt opened a block that the answer never ends, nothing."""
    splitter = ReasoningSplitter()
    splitter.feed(text)
    splitter.flush()
    return "" if prompt_opened and not splitter.opened else splitter.visible


def _tag_start(text: str, tags: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could begin one of `tags`."""
    for length in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        if any(tag.startswith(text[-length:]) for tag in tags):
            return length
    return 0


def loop_end(text: str) -> int | None:
    """If `text` ends in a loop, where to cut it: after the first copy of the repeated
    piece (completed to the end of its word); else None."""
    end = len(text)
    if end < LOOP_SPAN:
        return None
    tail = text[end - MIN_UNIT :]
    lowest = max(0, end - MIN_UNIT - MAX_UNIT)
    before = end - MIN_UNIT  # an earlier copy of the tail must end by here: a piece >= MIN_UNIT
    for _ in range(MAX_CANDIDATES):  # shortest pieces first
        found = text.rfind(tail, lowest, before)
        if found < 0:
            return None
        period = end - MIN_UNIT - found
        if _repeats(text, period):
            return _first_copy_end(text, period)
        before = found + MIN_UNIT - 1
    return None


def _repeats(text: str, period: int) -> bool:
    """Whether `text` ends in enough copies of its last `period` characters."""
    unit = text[-period:]
    if (unit + unit).find(unit, 1) < period:
        return False  # copies of a shorter piece: too short to count, or tried already
    copies = DATA_REPEATS if _is_data(unit) else MIN_REPEATS
    span = max(copies, math.ceil(LOOP_SPAN / period)) * period
    return span <= len(text) and text[-span:-period] == text[-span + period :]


def _is_data(piece: str) -> bool:
    """Mostly digits, punctuation and space, not words: rows of a grid repeat by design."""
    return sum(char.isalpha() for char in piece) * 4 < len(piece)


def _first_copy_end(text: str, period: int) -> int:
    start = len(text) - period
    while start > 0 and text[start - 1] == text[start - 1 + period]:
        start -= 1  # back to where the repeating began
    cut = start + period
    limit = min(len(text), cut + period)
    # The copy may begin mid-word, where the text before it matched its end: finish the word.
    while 0 < cut < limit and not (text[cut - 1].isspace() or text[cut].isspace()):
        cut += 1
    return cut


class AnswerFilter:
    """One answer on its way out: feed it the chunks, show what it returns, stop the
    generation once `looping`, and show and store `final(...)`."""

    def __init__(self, *, strip_reasoning: bool, prompt_opens_reasoning: bool = False) -> None:
        self._splitter = ReasoningSplitter() if strip_reasoning else None
        self._prompt_opens = strip_reasoning and prompt_opens_reasoning
        self._raw = ""
        self._cut: str | None = None

    @property
    def looping(self) -> bool:
        return self._cut is not None

    def feed(self, chunk: str) -> str:
        """The new text to show; nothing once the answer is looping."""
        if self.looping:
            return ""
        if self._splitter is None:
            shown = chunk
            self._raw += chunk
            answer = self._raw
        else:
            shown, answer = self._splitter.feed(chunk), self._splitter.visible
            if self._prompt_opens and not self._splitter.opened:
                return ""  # the prompt's block, not ended yet: all of it is reasoning
        if shown and (cut := loop_end(answer)) is not None:
            self._cut = answer[:cut].rstrip()
            return ""
        return shown

    def only_reasoning(self, text: str) -> bool:
        """Whether the engine's whole `text` was reasoning and nothing else (a model that
        thought until its answer's length ran out): `final` leaves nothing of it."""
        return self._splitter is not None and bool(text.strip()) and not self.final(text).strip()

    def final(self, text: str) -> str:
        """The answer to show and store, from the engine's whole `text`: its reasoning left
        out; once looping, what came before the first repeat, and a word saying so."""
        if self._cut is not None:
            return f"{self._cut}\n\n_{replies.cut_repeating()}_"
        if self._splitter is None:
            return text
        return without_reasoning(text, prompt_opened=self._prompt_opens)
