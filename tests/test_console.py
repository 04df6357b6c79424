"""The terminal chat's own parts: what it prints of an answer, and reading its input."""

from __future__ import annotations

import asyncio
import io
import os
import uuid

import pytest

from adapters.console import ConsoleAdapter, ConsoleSink
from bot import replies
from bot.types import ConversationKey


async def printed(streamed: list[str], final: str) -> str:
    output = io.StringIO()
    sink = ConsoleSink(output)
    for chunk in streamed:
        await sink.append(chunk)
    await sink.finish(final)
    return output.getvalue()


async def test_a_streamed_answer_is_not_printed_twice():
    assert await printed(["Paris is", " the capital."], "Paris is the capital.") == (
        "Paris is the capital.\n"
    )


@pytest.mark.parametrize(
    "streamed",
    [["Yes. ", "Yes. Yes. ", "Yes. Yes."], ["Yes.\n\n", "Yes.\n\nYes."]],
    ids=["in a line", "paragraphs"],
)
async def test_a_loop_cut_gets_its_note_after_the_stream(streamed):
    """A looping answer is cut: the terminal showed the repeats, and gets the note (with
    no underscores). Repeated paragraphs printed the whole answer again before it."""
    note = replies.cut_repeating()
    final = f"Yes.\n\n_{note}_"  # as bot.hygiene cuts it
    assert await printed(streamed, final) == f"{''.join(streamed)}\n\n{note}\n"


@pytest.mark.parametrize("streamed", [["Once upon", " a time"], []], ids=["begun", "not begun"])
async def test_a_stopped_answer_gets_its_note_after_the_stream(streamed):
    """Stopped (Ctrl-C): what was written stays, and the note follows, without the
    underscores of its italics; an answer stopped before its first word is the note."""
    written = "".join(streamed)
    final = f"{written}\n\n{replies.stopped()}".strip()  # as the service marks it
    after = f"{written}\n\n" if written else ""
    assert await printed(streamed, final) == f"{after}{replies.stopped().strip('_')}\n"


async def test_what_the_final_text_adds_is_printed_after_the_stream():
    assert await printed(["The answer ", "is"], "The answer is 42.") == "The answer is 42.\n"


@pytest.mark.parametrize(
    ("streamed", "final"),
    [
        (["Let me think..."], "42"),
        # The same first word: its rest was printed after the answer that had streamed.
        (["I need to add 2 and 2.\n", "I think it is 4."], "I think it is 4."),
    ],
)
async def test_a_final_text_that_differs_from_the_stream_is_printed_whole(streamed, final):
    """Reasoning streamed before it was known to be reasoning: the answer follows it."""
    assert await printed(streamed, final) == f"{''.join(streamed)}\n{final}\n"


@pytest.mark.parametrize("said", [replies.restarting(), replies.storage_lost()])
async def test_an_answer_left_for_later_says_so_without_markup(said):
    """A chat ended during an answer (SIGTERM, a second Ctrl-C; it is answered by the next
    chat): the line came with the underscores that make it italic on Slack and Discord."""
    output = io.StringIO()
    sink = ConsoleSink(output)
    await sink.append("Once upon")
    await sink.pause(said)
    assert output.getvalue() == f"Once upon\n{said.strip('_')}\n"


async def test_input_that_cannot_be_read_ends_the_chat_with_the_error(make_service):
    """A read error on the input thread reaches the chat (it waited for good before)."""
    unreadable = io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait?\n"), encoding="utf-8")
    async with make_service() as (service, _batcher):
        console = ConsoleAdapter(
            service=service, conversation="unreadable", input=unreadable,
            output=io.StringIO(), interactive=False,
        )  # fmt: skip
        with pytest.raises(UnicodeDecodeError):
            await asyncio.wait_for(console.run(), timeout=10)


async def test_a_user_with_no_login_name_chats_under_their_user_id(make_service, monkeypatch):
    """A container run as an arbitrary uid has no passwd entry for it: getuser() raises."""

    def no_entry() -> str:
        raise KeyError(f"getpwuid(): uid not found: {os.getuid()}")

    monkeypatch.setattr("getpass.getuser", no_entry)
    async with make_service() as (service, _batcher):
        console = ConsoleAdapter(
            service=service, conversation="nameless", input=io.StringIO("Hello\n"),
            output=io.StringIO(), interactive=False,
        )  # fmt: skip
        await asyncio.wait_for(console.run(), timeout=30)
        assert console.author == str(os.getuid())
        history = await service.store.load(str(console.key))
    assert history[0]["content"] == "Hello"


async def test_piped_input_skips_blank_lines_and_ends_at_quit(make_service):
    """As typed input does: a blank line asks nothing, a mistyped command (`/clear`) is
    said to be none, where the model was asked it, and /QUIT, as /quit, ends the chat."""
    piped = io.StringIO("\nHello\n  \n/clear\n/etc/hosts is broken\n/QUIT\nNever asked\n")
    output = io.StringIO()
    async with make_service() as (service, batcher):
        console = ConsoleAdapter(
            service=service, conversation="piped", input=piped, output=output,
            interactive=False,
        )  # fmt: skip
        await asyncio.wait_for(console.run(), timeout=30)
    asked = [prompt[-1]["content"] for prompt in batcher.prompts]
    assert asked == ["Hello", "/etc/hosts is broken"]
    assert replies.unknown_command("/clear") in output.getvalue()


async def test_a_conversation_kept_before_each_login_had_its_own_is_continued(make_service):
    """Kept under `console:local:NAME` by an older version: the chat of that name starts
    from it, where it started empty; a conversation of the login's own is never replaced."""
    name = f"kept-{uuid.uuid4().hex[:8]}"
    shared = ConversationKey("console", "local", name, name)
    async with make_service() as (service, batcher):
        await service.store.append(str(shared), {"role": "user", "content": "My name is Ada."})
        console = ConsoleAdapter(
            service=service, conversation=name, input=io.StringIO("What is my name?\n"),
            output=io.StringIO(), interactive=False,
        )  # fmt: skip
        await console.resume()
        await asyncio.wait_for(console.run(), timeout=30)
        mine = await service.store.load(str(console.key))
        await service.store.append(str(shared), {"role": "user", "content": "Someone else."})
        await console.resume()  # the login's own is there now: kept as it is
        assert await service.store.load(str(console.key)) == mine
        left = await service.store.load(str(shared))
    assert [m["content"] for m in batcher.prompts[0]] == ["My name is Ada.", "What is my name?"]
    assert left == [{"role": "user", "content": "Someone else."}]
