"""StreamingReply: placeholder, throttled edits, a shared edit budget, split final text,
and what resuming needs: known message ids, `on_post`, `pause`, the reply target."""

from __future__ import annotations

import gc
import json
import weakref

import pytest

from adapters.streaming import STREAMING_MARK, EditBudget, EditBudgets, StreamingReply
from adapters.text import split_message
from bot import replies


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Target:
    """Records posts and edits as the platform would show them."""

    def __init__(self) -> None:
        self.messages: dict[str, str] = {}
        self.edits = 0
        self.posts = 0
        self.typed = 0

    def where(self) -> dict:
        return {"to": "the test"}

    async def typing(self) -> None:
        self.typed += 1

    async def post(self, text: str) -> str:
        message_id = str(len(self.messages))
        self.messages[message_id] = text
        self.posts += 1
        return message_id

    async def edit(self, message_id: str, text: str) -> None:
        self.edits += 1
        self.messages[message_id] = text

    async def delete(self, message_id: str) -> None:
        del self.messages[message_id]


def reply(target: Target, clock: Clock, **options) -> StreamingReply:
    defaults = {"render": str.upper, "limit": 50, "interval": 1.0, "placeholder": "..."}
    return StreamingReply(target=target, clock=clock, **(defaults | options))


async def test_edits_are_throttled_and_the_final_text_replaces_the_placeholder():
    target, clock = Target(), Clock()
    sink = reply(target, clock)
    await sink.start()
    assert target.messages == {"0": "..."}
    for word in ("one ", "two ", "three "):
        clock.now += 0.4
        await sink.append(word)
    assert target.edits == 1  # at 1.2 s only; 0.4 and 0.8 were inside the interval
    assert target.messages["0"] == "ONE TWO THREE" + STREAMING_MARK.upper()
    await sink.finish("one two three four")
    assert target.messages == {"0": "ONE TWO THREE FOUR"}


async def test_a_long_answer_continues_in_further_messages():
    target, clock = Target(), Clock()
    sink = reply(target, clock)
    await sink.start()
    await sink.finish(" ".join(["word"] * 30))
    assert len(target.messages) > 1
    assert all(len(text) <= 50 for text in target.messages.values())
    assert " ".join(target.messages.values()).split() == ["WORD"] * 30


@pytest.mark.parametrize("ending", ["finish", "fail", "pause"])
async def test_the_notice_leads_the_answer_or_why_there_is_none(ending):
    """The messages it names are gone from the history for good, whatever the answer's
    fate: a failure (a timeout, the queue full) or a pause came without it, and the next
    try, with nothing more to leave out, said nothing."""
    target, clock = Target(), Clock()
    sink = reply(target, clock, render=str, limit=200)
    await sink.notice("2 older messages were left out.")
    await sink.start()
    await getattr(sink, ending)("answer")
    assert target.messages["0"] == "*2 older messages were left out.*\n\nanswer"


async def test_without_a_placeholder_the_first_text_is_posted():
    target, clock = Target(), Clock()
    sink = reply(target, clock, placeholder=None)
    await sink.start()
    assert target.messages == {}
    clock.now += 5
    await sink.append("hello")
    assert target.messages == {"0": "HELLO" + STREAMING_MARK.upper()}
    await sink.finish("hello")
    assert target.messages == {"0": "HELLO"}


async def test_a_spent_budget_skips_edits_but_never_the_final_text():
    target, clock = Target(), Clock()
    budget = EditBudget(per_minute=60, burst=1, clock=clock)
    first, second = reply(target, clock, budget=budget), reply(target, clock, budget=budget)
    await first.start()
    await second.start()
    clock.now += 1.0
    await first.append("a")  # takes the one token
    await second.append("b")  # none left: skipped
    clock.now += 1.0  # one token refilled (one a second)
    await second.append("c")  # takes it
    await first.append("d")  # none left: skipped
    assert target.edits == 2
    assert target.messages == {
        "0": "A" + STREAMING_MARK.upper(),
        "1": "BC" + STREAMING_MARK.upper(),
    }
    await first.finish("done one")
    await second.finish("done two")
    assert target.messages == {"0": "DONE ONE", "1": "DONE TWO"}
    assert budget.tokens < 0  # the final edits were counted, so streaming edits now wait


def test_a_place_keeps_its_budget_and_full_ones_are_let_go_past_the_kept_count(monkeypatch):
    """A budget is each place's own and lasts while it is short of full; past `KEPT`
    places, the full ones are let go (a new one would be the same), the spent ones stay,
    and one let go while an answer still holds it is found again."""
    monkeypatch.setattr(EditBudgets, "KEPT", 3)
    clock = Clock()
    budgets = EditBudgets(per_minute=60, burst=2, clock=clock)
    spent = budgets.of("spent")
    spent.spend()
    assert budgets.of("spent") is spent and budgets.of("other") is not spent
    budgets.of("full")
    budgets.of("new")  # the fourth place: "other" and "full" are let go
    assert len(budgets) == 2 and budgets.of("spent") is spent
    clock.now += 1.0  # "spent" is full again
    for place in ("a", "b", "c"):
        budgets.of(place)
    assert budgets.of("spent") is spent  # let go, but held here: as an answer holds its own
    budgets.of("d")  # "spent" is let go again, and now held by nothing
    held = weakref.ref(spent)
    del spent
    gc.collect()
    assert held() is None  # nothing of it is kept


# --- resuming: known messages, on_post, pause, the reply target ---------------------------

WORDS = " ".join(["word"] * 30)  # at a limit of 50, several messages
WORDS_PARTS = split_message(WORDS.upper(), 50)


class FlakyTarget(Target):
    """A Target whose `failing`-th post attempt raises, as a platform outage would."""

    def __init__(self, failing: int) -> None:
        super().__init__()
        self.failing = failing
        self.attempts = 0

    async def post(self, text: str) -> str:
        self.attempts += 1
        if self.attempts == self.failing:
            raise ConnectionError("the platform is down")
        return await super().post(text)


def record_posts(sink: StreamingReply) -> list[list[str]]:
    """The message ids the sink reports each time it awaits `on_post`."""
    saved: list[list[str]] = []

    async def on_post() -> None:
        saved.append(list(sink.reply_target()["messages"]))

    sink.on_post = on_post
    return saved


async def test_a_rebuilt_sink_edits_its_messages_and_posts_only_beyond_them():
    assert len(WORDS_PARTS) >= 3
    target, clock = Target(), Clock()
    target.messages = {"0": "PARTIAL" + STREAMING_MARK, "1": "MORE" + STREAMING_MARK}
    sink = reply(target, clock, message_ids=["0", "1"])  # posted by the process that stopped
    saved = record_posts(sink)

    await sink.start()
    assert target.messages == {"0": "...", "1": "MORE" + STREAMING_MARK}  # the placeholder is back
    assert (target.posts, saved) == (0, [])
    await sink.finish(WORDS)
    assert target.messages == {str(i): part for i, part in enumerate(WORDS_PARTS)}
    assert target.posts == len(WORDS_PARTS) - 2
    assert saved == [[str(i) for i in range(n)] for n in range(3, len(WORDS_PARTS) + 1)]


async def test_on_post_is_awaited_after_each_new_message_and_never_after_an_edit():
    target, clock = Target(), Clock()
    sink = reply(target, clock)
    saved = record_posts(sink)
    await sink.start()
    assert saved == [["0"]]  # the id is in the reply target by the time on_post runs
    for word in ("one ", "two "):
        clock.now += 5
        await sink.append(word)
    assert target.edits == 2
    assert saved == [["0"]]
    await sink.finish(WORDS)
    assert saved == [[str(i) for i in range(n)] for n in range(1, len(WORDS_PARTS) + 1)]


async def test_a_long_answer_streams_into_its_next_message_once_one_is_full():
    """Readers see the whole answer grow: once the first message is full, the text goes on
    in a second one (marked as being written), and the full one is not edited again."""
    target, clock = Target(), Clock()
    sink = reply(target, clock, placeholder=None)
    ended: list[int] = []

    async def filled(index: int) -> None:
        ended.append(index)

    sink._filled = filled
    await sink.start()
    words = WORDS.split(" ")
    for count in range(1, len(words) + 1):
        clock.now += 1
        await sink.append(("" if count == 1 else " ") + words[count - 1])
        if count == 15:
            assert len(target.messages) == 2  # 15 words of 5 characters pass 50
            edits_when_full = target.edits
    *full, last = WORDS_PARTS
    assert target.messages == {
        **{str(i): part for i, part in enumerate(full)},
        str(len(full)): last + STREAMING_MARK,
    }
    assert len(full) > 1
    assert target.edits - edits_when_full == len(words) - 15  # one an append: full ones stay
    assert ended == list(range(len(target.messages) - 1))  # each ended once, once full
    await sink.finish(WORDS)
    assert target.messages == {str(i): part for i, part in enumerate(WORDS_PARTS)}
    assert ended == list(range(len(WORDS_PARTS) - 1))


@pytest.mark.parametrize("ending", ["finish", "fail", "pause"])
async def test_messages_the_final_text_does_not_need_are_deleted(ending):
    """A resumed answer had four messages from an earlier process's draft: one that needs
    fewer (a short answer, a failure, a pause) deletes the rest, and records that."""
    target, clock = Target(), Clock()
    target.messages = {str(i): f"DRAFT {i}" for i in range(4)}
    sink = reply(target, clock, message_ids=list(target.messages))
    saved = record_posts(sink)
    await sink.start()
    await getattr(sink, ending)("short")
    assert target.messages == {"0": "SHORT"}
    assert sink.message_ids == ["0"] and saved[-1] == ["0"]
    assert target.posts == 0


async def test_the_streaming_mark_never_takes_a_message_of_its_own():
    target, clock = Target(), Clock()
    sink = reply(target, clock, placeholder=None)
    await sink.start()
    clock.now += 5
    await sink.append("x" * 49)  # the mark would take it past the limit of 50
    assert target.messages == {"0": "X" * 49}
    await sink.finish("x" * 49)
    assert target.messages == {"0": "X" * 49} and target.posts == 1


@pytest.mark.parametrize("reput", [False, True])
async def test_the_final_text_edits_only_what_changed_unless_every_message_must_be_put(reput):
    """Streamed whole, a long answer's full messages show their final text already: the
    end edits the last one alone, and each one where the final put itself matters (a
    platform whose edit takes a button off), every edit counted against the budget."""
    target, clock = Target(), Clock()
    budget = EditBudget(per_minute=60, burst=100, clock=clock)
    sink = reply(target, clock, placeholder=None, budget=budget)
    sink.reput_final = reput
    await sink.start()
    clock.now += 5
    await sink.append(WORDS)
    edits, tokens = target.edits, budget.tokens
    await sink.finish(WORDS)
    assert target.messages == {str(i): part for i, part in enumerate(WORDS_PARTS)}
    expected = len(WORDS_PARTS) if reput else 2  # the first (always put) and the marked last
    assert target.edits - edits == expected
    assert tokens - budget.tokens == pytest.approx(expected)


async def test_a_full_message_that_would_not_end_is_ended_with_the_next_text():
    target, clock = Target(), Clock()
    sink = reply(target, clock, placeholder=None)
    tries: list[int] = []

    async def filled(index: int) -> None:
        tries.append(index)
        if len(tries) == 1:
            raise RuntimeError("a transient error")

    sink._filled = filled
    await sink.start()
    for text in (WORDS, WORDS + " more"):
        clock.now += 5
        await sink.append(text[len(sink.text) :])
    assert tries.count(0) == 2  # tried again with the next text, then ended for good
    assert tries.count(1) == 1


@pytest.mark.parametrize("failing", [1, 2])
async def test_a_final_edit_that_fails_leaves_the_others_put_and_is_reported(failing):
    """The final edit of one streamed message fails (a transient error): every other
    message still gets its final text, and the failure is reported after them."""
    target, clock = Target(), Clock()
    sink = reply(target, clock, placeholder=None)
    await sink.start()
    clock.now += 5
    await sink.append(WORDS.replace("word", "wurd"))  # every message exists, to be edited
    streamed = dict(target.messages)
    failing_edit = target.edit

    async def edit(message_id: str, text: str) -> None:
        if message_id == str(failing):
            raise RuntimeError("a transient error")
        await failing_edit(message_id, text)

    target.edit = edit
    await sink.finish(WORDS + " end")
    final = split_message((WORDS + " end").upper(), 50)
    *kept, note = target.messages.values()
    assert kept == [streamed[str(i)] if i == failing else p for i, p in enumerate(final)]
    assert note == replies.continuation_failed().upper()


@pytest.mark.parametrize("failing", [2, 3])  # the post of part 2, of part 3
async def test_a_continuation_that_cannot_be_posted_is_reported_after_what_was(failing):
    target, clock = FlakyTarget(failing), Clock()
    sink = reply(target, clock)
    saved = record_posts(sink)
    await sink.start()  # the placeholder is post 1
    await sink.finish(WORDS)
    shown = WORDS_PARTS[: failing - 1]
    expected = {
        **{str(i): part for i, part in enumerate(shown)},
        str(len(shown)): replies.continuation_failed().upper(),
    }
    assert target.messages == expected
    assert saved[-1] == [str(i) for i in range(len(shown) + 1)]
    await sink.pause("restarting")  # the answer is over: a stop now changes nothing
    assert target.messages == expected


@pytest.mark.parametrize("ending", ["finish", "fail"])
@pytest.mark.parametrize("then", ["pause", "fail"])
async def test_once_the_answer_or_a_failure_is_shown_nothing_replaces_it(ending, then):
    target, clock = Target(), Clock()
    sink = reply(target, clock)
    await sink.start()
    await getattr(sink, ending)("over")
    shown, edits, posts = dict(target.messages), target.edits, target.posts
    await getattr(sink, then)("restarting, or something went wrong")
    assert (target.messages, target.edits, target.posts) == (shown, edits, posts)
    assert shown == {"0": "OVER"}


async def test_a_failed_record_of_a_post_is_not_taken_for_a_failed_post():
    target, clock = Target(), Clock()
    sink = reply(target, clock)

    async def record_fails() -> None:
        raise RuntimeError("the record of it failed")

    sink.on_post = record_fails
    await sink.start()
    await sink.finish(" ".join(["word"] * 30))
    assert " ".join(target.messages.values()).split() == ["WORD"] * 30  # whole, no note


@pytest.mark.parametrize("ending", ["fail", "pause"])
async def test_a_long_failure_or_pause_is_split_as_an_answer_is(ending):
    """A regeneration that failed gives the old answer back, with why: as long as an
    answer, it goes over as many messages, each within the platform's limit."""
    target, clock = Target(), Clock()
    sink = reply(target, clock)
    await sink.start()
    clock.now += 5
    await sink.append(" ".join(["draft"] * 20))
    kept = " ".join(["word"] * 30)
    await getattr(sink, ending)(kept)
    assert len(target.messages) > 1
    assert all(len(text) <= 50 for text in target.messages.values())
    assert " ".join(target.messages.values()).split() == ["WORD"] * 30


async def test_pause_before_anything_was_posted_posts_the_text():
    target, clock = Target(), Clock()
    sink = reply(target, clock, placeholder=None)
    saved = record_posts(sink)
    await sink.pause("back soon")
    assert target.messages == {"0": "BACK SOON"}
    assert saved == [["0"]]


async def test_pause_mid_answer_replaces_the_streamed_text():
    target, clock = Target(), Clock()
    sink = reply(target, clock)
    await sink.start()
    clock.now += 5
    await sink.append("half an answer")
    await sink.pause("back soon")
    assert target.messages == {"0": "BACK SOON"}
    assert target.posts == 1


async def test_an_answer_started_again_takes_back_the_messages_its_old_text_went_on_into():
    """A worker died mid-answer and another writes it again: the old text's further
    messages go at once, and the new text streams from the first message on."""
    target, clock = Target(), Clock()
    sink = reply(target, clock, placeholder=None)
    saved = record_posts(sink)
    await sink.start()
    clock.now += 5
    await sink.append(WORDS)
    assert len(target.messages) == len(WORDS_PARTS) > 1
    await sink.restart()
    assert list(target.messages) == ["0"] and saved[-1] == ["0"]
    clock.now += 5
    await sink.append("a new answer")
    assert target.messages == {"0": "A NEW ANSWER" + STREAMING_MARK.upper()}


async def test_an_answer_written_again_into_the_same_sink_starts_from_nothing():
    """Storage was lost after a whole answer streamed (it was never saved), and the turn
    is answered again into the same sink: its edits show the new text alone."""
    target, clock = Target(), Clock()
    sink = reply(target, clock)
    await sink.start()
    clock.now += 5
    await sink.append("the first try")
    await sink.pause("storage lost")
    await sink.start()
    clock.now += 5
    await sink.append("a new answer")
    assert target.messages == {"0": "A NEW ANSWER" + STREAMING_MARK.upper()}


async def test_the_reply_target_is_where_plus_the_message_ids():
    target, clock = Target(), Clock()
    known = ("7",)
    sink = reply(target, clock, message_ids=known)
    assert sink.reply_target() == {"to": "the test", "messages": ["7"]}
    await sink.finish(WORDS)  # edits "7", posts the rest
    ids = sink.reply_target()["messages"]
    assert ids[0] == "7"
    assert len(ids) == len(WORDS_PARTS)
    assert json.loads(json.dumps(sink.reply_target())) == {"to": "the test", "messages": ids}
    assert known == ("7",)
