"""The output filter: reasoning left out while streaming and at the end, loops cut and
legitimate repetition kept; on its own, then through the service (real queue and Redis)."""

from __future__ import annotations

import time
import uuid

import pytest
from conftest import ScriptedBatcher
from fake_server import wait_for
from test_service import RecordingSink

from bot import replies
from bot.hygiene import AnswerFilter, loop_end, without_reasoning
from bot.types import ConversationKey, Turn

MARK = f"\n\n_{replies.cut_repeating()}_"


def streamed(
    chunks: list[str], *, strip_reasoning: bool = True, prompt_opens_reasoning: bool = False
) -> tuple[list[str], AnswerFilter]:
    """What the filter shows for each chunk, and the filter."""
    answer = AnswerFilter(
        strip_reasoning=strip_reasoning, prompt_opens_reasoning=prompt_opens_reasoning
    )
    return [answer.feed(chunk) for chunk in chunks], answer


def in_pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


# --- reasoning ----------------------------------------------------------------------------


def test_a_think_block_split_across_chunks_is_never_shown():
    chunks = ["<th", "ink>The user wa", "nts a greeting.</thi", "nk>\n\nHello", " there!"]
    shown, answer = streamed(chunks)
    assert shown == ["", "", "", "Hello", " there!"]
    assert answer.final("".join(chunks)) == "Hello there!"
    assert not answer.looping


def test_nothing_is_shown_while_a_block_is_open_and_an_unclosed_block_is_no_answer():
    chunks = ["<think>", "Let me think about ", "this for a while", " longer"]
    shown, answer = streamed(chunks)
    assert shown == ["", "", "", ""]
    assert answer.final("".join(chunks)) == ""


@pytest.mark.parametrize(
    "text",
    [
        "Sure. <think>is it?</think>Yes, it is.",
        "To turn it off, remove the `<think>` tag from the template. Then restart.",
        "Models write their reasoning in <think> and </think> tags before the answer.",
        "Sure! The reasoning ends at </think>, and the answer follows.",
    ],
)
def test_tags_once_the_answer_has_begun_are_text(text):
    """Only a block that opens the answer is reasoning (and a closing tag alone only at a
    line's start): an answer about reasoning models keeps what it says of the tags."""
    assert "".join(streamed(in_pieces(text, 3))[0]) == text
    assert without_reasoning(text) == text


def test_a_held_back_angle_bracket_that_is_no_tag_is_shown_after_all():
    shown, answer = streamed(["if a <", "b then", " x </", "div>"])
    assert shown == ["if a ", "<b then", " x ", "</div>"]
    assert answer.final("if a <b then x </div> <th") == "if a <b then x </div> <th"


def test_a_closing_tag_alone_means_the_prompt_opened_the_block():
    """DeepSeek-R1's template ends the prompt in <think>: only the end of it comes back."""
    text = "The user asks for 2+2. That is 4.\n</think>\n\nIt is 4."
    assert without_reasoning(text) == "It is 4."
    _, answer = streamed(in_pieces(text, 5))
    assert answer.final(text) == "It is 4."


def test_reasoning_a_known_template_opened_is_never_shown_nor_cut_nor_kept():
    """The template is known to open the block (DeepSeek-R1's): its reasoning showed while
    streaming; a loop in it was cut as the answer, and posted and stored, reasoning and
    all; and reasoning that never ended (the answer's length ran out) was the answer."""
    text = "The user asks for 2+2. That is 4.\n</think>\n\nIt is 4."
    shown, answer = streamed(in_pieces(text, 5), prompt_opens_reasoning=True)
    assert "".join(shown) == "It is 4." == answer.final(text)
    looping = "Let me check that again, carefully. " * 30
    shown, answer = streamed(in_pieces(looping, 7), prompt_opens_reasoning=True)
    assert not any(shown) and not answer.looping
    assert answer.final(looping) == ""  # only reasoning: an empty answer
    _, unknown = streamed(in_pieces(looping, 7))  # a template not known to open it
    assert unknown.looping


def test_a_closing_tag_in_a_code_block_is_text_and_a_later_one_ends_the_reasoning():
    """A model showing the format in a code block writes the tags as text; reasoning that
    the prompt opened may hold code blocks of its own, and ends at the tag after them."""
    shown = "The format:\n\n```\n<think>\nThe user wants X.\n</think>\n\nHere is X.\n```\n\nDone."
    assert without_reasoning(shown) == shown
    reasoned = "Try:\n```\nprint(4)\n```\nThat prints 4.\n</think>\n\nIt prints 4."
    assert without_reasoning(reasoned) == "It prints 4."
    _, answer = streamed(in_pieces(shown, 4))
    assert answer.final(shown) == shown


def test_an_answer_showing_the_tags_outside_a_code_block_keeps_its_start():
    """Both tags written as text, after the answer began: the closing one does not end
    reasoning the prompt opened (that writes no opening tag), and wipes nothing."""
    text = (
        "Reasoning models write like this:\n\n<think>\nThe user asks for 2+2.\n</think>\n\n"
        "The answer is 4. Only the part after the closing tag is shown."
    )
    assert without_reasoning(text) == text
    _, answer = streamed(in_pieces(text, 6))
    assert answer.final(text) == text


def test_reasoning_the_prompt_opened_may_name_the_opening_tag():
    """DeepSeek-R1 reasoning about the tags themselves: the tag it names mid-line opens no
    block, and the reasoning still ends at the closing tag."""
    text = "The user asks what the <think> tag does.\n</think>\n\nIt wraps reasoning."
    assert without_reasoning(text) == "It wraps reasoning."
    _, answer = streamed(in_pieces(text, 5))
    assert answer.final(text) == "It wraps reasoning."


def test_a_closing_tag_after_a_closed_block_is_just_text():
    assert without_reasoning("<think>x</think>Use </think> to end it.") == "Use </think> to end it."


def test_without_strip_reasoning_everything_is_shown():
    chunks = ["<think>hmm</think>", "Hi"]
    shown, answer = streamed(chunks, strip_reasoning=False)
    assert shown == chunks
    assert answer.final("".join(chunks)) == "<think>hmm</think>Hi"


# --- loops --------------------------------------------------------------------------------

SENTENCE = "I am always happy to help you with that. "


def test_a_repeated_sentence_is_cut_after_its_first_copy():
    text = "Of course! " + SENTENCE * 40
    shown, answer = streamed(in_pieces(text, 7))
    assert answer.looping
    cut_at = next(i for i, piece in enumerate(shown) if not piece and i > 2)
    assert all(piece == "" for piece in shown[cut_at:])  # nothing more once looping
    assert cut_at * 7 < len(text) // 2  # found early, not at the end
    assert answer.final("ignored: the generation was cancelled") == (
        "Of course! I am always happy to help you with that." + MARK
    )


def test_a_repeated_line_is_cut_after_its_first_copy():
    text = "Here is the answer:\n" + "The answer is forty-two, always and forever.\n" * 20
    _, answer = streamed(in_pieces(text, 11))
    assert (
        answer.final("")
        == "Here is the answer:\nThe answer is forty-two, always and forever." + MARK
    )


def test_a_row_of_data_repeated_on_and_on_is_cut_all_the_same():
    row = "[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],\n"
    _, answer = streamed(in_pieces("board = [\n" + row * 40, 9))
    assert answer.looping
    assert answer.final("") == "board = [\n" + row.rstrip() + MARK


def test_a_repeated_paragraph_is_cut_once_it_has_five_copies():
    paragraph = (
        "This paragraph explains the idea once more. "
        "It uses the very same words as the one before it, again.\n\n"
    )
    _, four = streamed(in_pieces(paragraph * 4, 13))
    _, five = streamed(in_pieces(paragraph * 5, 13))
    assert not four.looping
    assert five.looping
    assert five.final("") == paragraph.rstrip() + MARK


def test_a_loop_after_reasoning_is_cut_from_the_answer():
    text = "<think>" + SENTENCE * 3 + "</think>Fine. " + SENTENCE * 30
    _, answer = streamed(in_pieces(text, 9))
    assert answer.final("") == "Fine. " + SENTENCE.rstrip() + MARK


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            "| n | fruit | colour |\n|---|---|---|\n"
            + "".join(f"| {n} | apple | red and green |\n" for n in range(40)),
            id="table rows that differ",
        ),
        pytest.param(
            "".join(f"- Step {n}: stir the mixture for one more minute\n" for n in range(30)),
            id="list of similar lines",
        ),
        pytest.param(
            "```python\n" + "    self.assertEqual(result, expected)\n" * 3 + "```\n",
            id="a few identical code lines",
        ),
        pytest.param("Here:\n" + "-" * 600 + "\n" + "=" * 600, id="rules"),
        pytest.param("zeros = [" + "0, " * 300 + "0]", id="array of zeros"),
        pytest.param(
            "board = [\n" + "    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],\n" * 16 + "]",
            id="a grid of identical rows",
        ),
        pytest.param("Ha" + " ha" * 300, id="laughter"),
        pytest.param("I will not waste chalk.\n" * 10, id="ten lines as asked"),
        pytest.param(
            ("Row, row, row your boat, gently down the stream.\n" * 2 + "Merrily.\n") * 4,
            id="a song's verse four times",
        ),
    ],
)
def test_legitimate_repetition_is_kept(text):
    shown, answer = streamed(in_pieces(text, 5), strip_reasoning=False)
    assert not answer.looping
    assert "".join(shown) == text
    assert answer.final(text) == text
    assert loop_end(text) is None


def test_a_short_text_is_no_loop():
    assert loop_end(SENTENCE * 3) is None
    assert loop_end("") is None


# --- through the service ------------------------------------------------------------------

REASONING = "<think>The user greets me. I should greet them back.</think>\n\n"


class EndlessLoop(ScriptedBatcher):
    """A model stuck in a loop: the same sentence after a first one, until it is stopped."""

    def __init__(self) -> None:
        super().__init__("")
        self.left: list[object] = []  # requests the queue took out of the batch

    def leave(self, key: object) -> None:
        self.left.append(key)
        super().leave(key)

    def step(self) -> list:
        from bot.batching import Update

        time.sleep(0.001)  # a model's pace, more or less: the event loop keeps up
        updates = []
        for key, written in self.written.items():
            self.written[key] = written + 1
            updates.append(Update(key, "Of course! " if written == 0 else SENTENCE))
        return updates


@pytest.fixture
def conversation() -> ConversationKey:
    return ConversationKey("test", "team", "channel", uuid.uuid4().hex)


def turn(conversation: ConversationKey, text: str) -> Turn:
    return Turn(conversation, "U1", text, uuid.uuid4().hex)


async def test_reasoning_is_neither_streamed_nor_stored(make_service, store, conversation):
    sink = RecordingSink()
    async with make_service(ScriptedBatcher(REASONING + "Hello! How can I help?")) as (service, _):
        await service.handle(turn(conversation, "hi"), sink)
    assert sink.kinds("finish") == ["Hello! How can I help?"]
    assert "".join(sink.kinds("append")) == "Hello! How can I help?"
    assert await store.load(str(conversation)) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ]


@pytest.mark.parametrize(
    ("written", "told"),
    [
        ("<think>No idea at all, really.", replies.only_reasoning()),  # out of room
        (REASONING, replies.only_reasoning()),  # thought, then ended
        ("  \n", replies.empty_answer()),
    ],
    ids=["unfinished", "finished", "blank"],
)
async def test_an_answer_of_only_reasoning_says_so(
    make_service, store, conversation, written, told
):
    """Not "an empty answer, try rephrasing": the model thought and never replied (most
    often its answer's length ran out), which the asker and the log are told."""
    sink = RecordingSink()
    async with make_service(ScriptedBatcher(written)) as (service, _):
        await service.handle(turn(conversation, "hi"), sink)
    assert sink.kinds("append") == []
    assert sink.kinds("fail") == [told]
    assert [m["role"] for m in await store.load(str(conversation))] == ["user"]


async def test_strip_reasoning_is_read_at_each_answer(make_service, store, conversation):
    """A reload that turns it off takes effect at the next answer."""
    answer = REASONING + "Hi."
    async with make_service(ScriptedBatcher(answer)) as (service, _):
        await service.handle(turn(conversation, "one"), RecordingSink())
        service.team.settings = service.team.settings.model_copy(update={"strip_reasoning": False})
        await service.handle(turn(conversation, "two"), RecordingSink())
    stored = [m["content"] for m in await store.load(str(conversation)) if m["role"] != "user"]
    assert stored == ["Hi.", answer.strip()]


async def test_a_looping_answer_is_cut_stopped_and_stored_cut(make_service, store, conversation):
    sink = RecordingSink()
    batcher = EndlessLoop()
    async with make_service(batcher, timeout=10) as (service, _):
        await service.handle(turn(conversation, "can you help?"), sink)
        # The generation was cancelled: the batcher lets it go at its next step, well
        # before the 10 s timeout (a queue closed first would clear it instead).
        await wait_for(lambda: batcher.left, timeout=5)
    cut = "Of course! I am always happy to help you with that." + MARK
    assert sink.kinds("finish") == [cut]
    assert len(batcher.left) == 1
    assert (await store.load(str(conversation)))[-1] == {"role": "assistant", "content": cut}
