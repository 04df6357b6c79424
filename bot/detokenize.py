"""Incremental detokenization: an answer's new text after each token, in O(1) work per token.

Decoding the whole answer again after every token costs O(n) per token, O(n²) per answer.
Instead, as in transformers' `TextStreamer` and vLLM's incremental detokenizer, only a short
window of ids is decoded: a few ids already shown (their context: a tokenizer may render a
token differently at the start of a text, as SentencePiece drops a leading space) and the
ids not shown yet. The new text is what the window's decode adds to the context's.

Text is held back while it ends in U+FFFD, the mark of a multi-byte UTF-8 character whose
remaining bytes are in tokens still to come, and while the new ids add no text (special
tokens, which the decode skips). Either wait is cut short after `MAX_HELD` ids, so that
a run of invalid bytes or special tokens cannot make the window grow with the answer;
the ids of a character begun at its end are still kept back, special tokens among them.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"

MAX_HELD = 8
"""Ids held back at most before their text is let out: a UTF-8 character needs at most 4
byte tokens, so only malformed output or a run of special tokens reaches this."""


class IncrementalDetokenizer:
    """One answer's text, a chunk per call of `feed`, with `decode` (the engine's: ids to
    text, special tokens skipped) applied to at most twice `MAX_HELD` ids, and one more, per
    call.

    Joined, the chunks equal `decode` of the whole answer whenever decoding a window's
    ids extends the decode of its first ones, as with byte-level BPE (Qwen, Llama 3,
    GPT-2, SmolLM2). Where it does not (a tokenizer whose clean-up rewrites text
    already shown), the chunks go on from the same character count, and the final answer,
    decoded whole, is the one stored and shown last.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._fed = 0  # answer ids seen so far
        self._window: list[int] = []  # context ids, then the ids held back
        self._context = 0  # how many of the window's ids are context
        self._context_text = ""  # their decode
        self.text = ""  # every chunk so far

    def feed(self, answer: list[int]) -> str:
        """The text that the ids of `answer` beyond those fed before complete (may be "")."""
        self._window += answer[self._fed :]
        self._fed = len(answer)
        text = self._decode(self._window)
        held = len(self._window) - self._context
        complete = len(text) > len(self._context_text) and not text.endswith(REPLACEMENT)
        if not complete and held < MAX_HELD:
            return ""
        shown = len(self._window)
        if text.endswith(REPLACEMENT):
            shown, text = self._before_unfinished(text, held)
        # A decode that is not an extension of the context's still streams on: the
        # characters beyond as many as the context had.
        chunk = text[len(self._context_text) :]
        shown_ids = self._window[self._context : shown]  # the next context
        self._window = self._window[self._context :]
        self._context = len(shown_ids)
        self._context_text = self._decode(shown_ids)
        self.text += chunk
        return chunk

    def _before_unfinished(self, text: str, held: int) -> tuple[int, str]:
        """The window's ids up to a character whose last bytes are still to come, and
        their text; all of them (and `text`) where none is, as in malformed output. The
        character's first bytes may be any of the last `MAX_HELD` ids: special tokens (which
        decode to nothing) may follow them. (Not further back: a run of broken characters
        would be kept back whole, nothing let out, and the window grow with the answer.)"""
        for unfinished in range(1, min(held, MAX_HELD) + 1):
            before = self._decode(self._window[:-unfinished])
            if not before.endswith(REPLACEMENT):
                return len(self._window) - unfinished, before
        return len(self._window), text

    def rest(self, answer: str) -> str:
        """The end of the whole `answer` not streamed yet: what follows as many characters
        as were streamed (nothing if those were all of it)."""
        chunk = answer[len(self.text) :]
        self.text += chunk
        return chunk
