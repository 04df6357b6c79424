"""The terminal chat: stdin lines in, streamed answers out, through the same service.

Interactive on a terminal (a `you>` prompt; Ctrl-C while an answer is written stops it,
as the platforms' Stop button does); with piped input each line is one turn and it ends
at end of input. `/reset` clears the conversation, `/forget` deletes it. Knows nothing of
Slack or Discord, and nothing of the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import re
import signal
import termios
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from types import FrameType
from typing import Any, TextIO

from adapters.base import Adapter, answer, command
from bot import replies
from bot.service import ChatService
from bot.types import ConversationKey, Turn
from storage.errors import is_outage

QUIT_COMMANDS = {"/quit", "/exit"}
# Notes the service puts after an answer, in italics (`_…_`), which a terminal would show
# as underscores.
ITALIC_NOTES = (replies.cut_repeating(), replies.stopped().strip("_"))


def _user_name() -> str:
    """Who chats, as the history names them: the login name, or the user id where it has
    none (a container run as an arbitrary user, `docker run --user 1234`)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (KeyError before 3.13)
        return str(os.getuid())


class ConsoleSink:
    """Writes one answer to the terminal as it streams."""

    def __init__(self, output: TextIO) -> None:
        self.output = output
        self.shown = ""  # what was streamed of the answer
        self.over = False  # the answer or a failure is on screen
        self.unread = False  # the output was closed under it (`threadbot chat | head`)
        self.on_post: Callable[[], Awaitable[None]] | None = None  # nothing to keep track of

    def reply_target(self) -> dict[str, Any]:
        return {}  # a resumed answer is printed by the next chat of this conversation

    async def start(self) -> None:
        pass  # the answer itself starts the line

    async def append(self, chunk: str) -> None:
        self._write(chunk)
        self.shown += chunk

    async def restart(self) -> None:
        """What was printed stays: a line says the answer starts again below it."""
        if self.shown:
            self._write(f"\n{replies.writing_again()}\n")
        self.shown = ""

    async def notice(self, text: str) -> None:
        self._write(f"{text}\n")

    async def finish(self, text: str) -> None:
        """A terminal cannot take back what it showed: what the final text adds past the
        streamed one is printed (all of it past the stream, or nothing where the stream
        went past it: a loop's copies, cut), else the whole final text on a line of its
        own (reasoning streamed before it was known as such: it may start with the same
        words); a note (a loop cut, a stop), below."""
        body, note = _noted(text)
        shown = self.shown.strip()
        same = _common_start(shown, body)
        if same == len(body):  # shown whole, and more
            rest = ""
        elif same == len(shown) or body[same : same + 1] == "\n":
            rest = body[same:]
        else:
            rest = f"\n{body}"
        if note:
            rest += f"\n\n{note}" if rest or shown else note
        self._write(f"{rest}\n")
        self.over = True

    async def fail(self, text: str) -> None:
        if not self.over:
            self._write(f"\n{text}\n" if self.shown else f"{text}\n")
            self.over = True

    async def pause(self, text: str) -> None:
        # Nothing to edit later: the resumed answer prints anew. Its line is in italics
        # on a platform (`_…_`), which a terminal would show as underscores.
        await self.fail(text.removeprefix("_").removesuffix("_"))

    def _write(self, text: str) -> None:
        try:
            self.output.write(text)
            self.output.flush()
        except BrokenPipeError:  # no one reads on: the answer is still stored
            self.unread = True


class ConsoleAdapter(Adapter):
    """One named conversation in the terminal, stored like any thread."""

    platform = "console"

    def __init__(
        self,
        *,
        service: ChatService,
        conversation: str,
        input: TextIO,
        output: TextIO,
        interactive: bool,
    ) -> None:
        self.service = service
        self.author = _user_name()
        # Each login has its own conversations: on a Redis a team shares, everyone's
        # `default` is their own, and an answer left unfinished resumes in its own chat.
        login = self.author.replace(":", "_")
        self.key = ConversationKey(self.platform, login, conversation, conversation)
        self.scope = f"{self.platform}:{login}:{conversation}"
        self.input = input
        self.output = output
        self.interactive = interactive
        self.at_prompt = False  # `you>` is on screen, waiting for a line
        if interactive:  # input() then reads the line itself: no 4 KiB terminal line limit
            import readline  # noqa: F401
        # The terminal is there from the start: answers an earlier chat left unfinished
        # may be resumed into it at once.
        service.serve_platform(self.scope, lambda _target, _stop: ConsoleSink(self.output))

    async def resume(self) -> None:
        """First, what an earlier chat of this conversation left unanswered, shown whole
        before the prompt, not into it; Ctrl-C stops it as any answer."""
        stop = partial(self.service.stop_answers, self.scope, by=self.author)
        with _interrupt_stops(stop) if self.interactive else contextlib.nullcontext():
            try:
                # Kept by a version before each login had its own (`console:local:…`).
                shared = ConversationKey(self.platform, "local", self.key.channel, self.key.thread)
                await self.service.store.adopt(str(shared), str(self.key))
                await self.service.resume()
            except Exception as error:  # storage out: the resume passes take them once back
                if not is_outage(error):
                    raise
            await self.service.settled()

    async def run(self) -> None:
        try:
            with _modes_kept(self.input if self.interactive else None):
                await self._chat()
        finally:
            if self.at_prompt:  # ended there (Ctrl-D, Ctrl-C, a signal): the shell's
                with contextlib.suppress(OSError, ValueError):  # prompt on a line of its own
                    self.output.write("\n")
                    self.output.flush()

    async def _chat(self) -> None:
        while (line := await self._next_line()) is not None:
            text = line.strip()
            if text.lower() in QUIT_COMMANDS:  # typed or piped: a script may end its chat too
                return
            if not text:  # a blank line (between a file's paragraphs) asks nothing
                continue
            if re.fullmatch(r"/\S+", text) and command(text) is None:  # a typo: no question
                await ConsoleSink(self.output).fail(replies.unknown_command(text))
                continue
            # Its turn's id is in `scope`: resumed only in a chat of this conversation.
            message_id = f"{self.key.workspace}:{self.key.thread}:{uuid.uuid4().hex}"
            turn = Turn(self.key, self.author, text, message_id, command=command(text))
            sink = ConsoleSink(self.output)
            stop = partial(self.service.stop_answer, turn.id, by=self.author)
            with _interrupt_stops(stop) if self.interactive else contextlib.nullcontext():
                await answer(self.service, turn, sink, wait=True)
            if sink.unread:  # as other tools do when their reader goes: stop, quietly
                _silenced(self.output)
                return

    async def connected(self) -> bool:
        return True  # the terminal is there for as long as the chat runs

    async def _next_line(self) -> str | None:
        """The next line, read on a daemon thread so Ctrl-C never waits for a blocked read."""
        loop = asyncio.get_running_loop()
        line: asyncio.Future[str | None] = loop.create_future()

        def deliver(value: str | Exception | None) -> None:
            if line.done():
                return
            if isinstance(value, Exception):
                line.set_exception(value)
            else:
                line.set_result(value)

        def read() -> None:
            value: str | Exception | None
            try:
                value = self._read_line()
            except Exception as error:  # raised in the chat, not lost with this thread
                value = error
            with contextlib.suppress(RuntimeError):  # the loop may be gone after Ctrl-C
                loop.call_soon_threadsafe(deliver, value)

        threading.Thread(target=read, name="console-input", daemon=True).start()
        return await line

    def _read_line(self) -> str | None:
        """The next line, or None at end of input."""
        if self.interactive:
            self.at_prompt = True
            try:
                line = input("you> ")
            except EOFError:
                return None
            self.at_prompt = False
            return line
        line = self.input.readline()
        return line if line else None


def _noted(text: str) -> tuple[str, str]:
    """An answer's text, and its note (a loop cut, a stop) without its italics' marks."""
    for note in ITALIC_NOTES:
        marked = f"_{note}_"
        if text == marked:  # stopped before its first word
            return "", note
        if text.endswith(f"\n\n{marked}"):
            return text.removesuffix(f"\n\n{marked}"), note
    return text, ""


@contextlib.contextmanager
def _interrupt_stops(stop: Callable[[], bool]) -> Iterator[None]:
    """Within it, Ctrl-C calls `stop` (on the event loop) and the chat goes on, as a chat
    in a terminal does; where `stop` stops nothing (the answer not yet written: it waits
    for the lock), and at a second Ctrl-C, it ends the chat as at the prompt."""
    loop = asyncio.get_running_loop()
    before = signal.getsignal(signal.SIGINT)
    stopped = False

    def interrupted(signum: int, frame: FrameType | None) -> None:
        nonlocal stopped
        if not stopped and stop():
            stopped = True
            return
        signal.signal(signal.SIGINT, before)
        if callable(before):
            before(signum, frame)

    def on_interrupt(signum: int, frame: FrameType | None) -> None:  # between two bytecodes
        loop.call_soon_threadsafe(interrupted, signum, frame)

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _silenced(output: TextIO) -> None:
    """Point the closed output at /dev/null, or Python's own flush at exit says it failed."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), output.fileno())


@contextlib.contextmanager
def _modes_kept(terminal: TextIO | None) -> Iterator[None]:
    """The terminal's modes put back on the way out: readline, reading on its own thread,
    has them raw (no echo) at the prompt, and a Ctrl-C or SIGTERM there ends the chat
    before it can restore them, leaving the shell after it typing blind."""
    try:
        fd = terminal.fileno() if terminal is not None else -1
        saved = termios.tcgetattr(fd)
    except (OSError, ValueError, termios.error):  # not a terminal
        saved = None
    try:
        yield
    finally:
        if saved is not None:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _common_start(one: str, other: str) -> int:
    """How many characters the two start with in common."""
    pairs = zip(one, other, strict=False)
    return next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(one), len(other)))
