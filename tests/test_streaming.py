"""StreamingReply: placeholder, throttled edits, a shared edit budget, split final text."""

from __future__ import annotations

from adapters.streaming import STREAMING_MARK, EditBudget, StreamingReply


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
        self.typed = 0

    def where(self) -> dict:
        return {"to": "the test"}

    async def typing(self) -> None:
        self.typed += 1

    async def post(self, text: str) -> str:
        message_id = str(len(self.messages))
        self.messages[message_id] = text
        return message_id

    async def edit(self, message_id: str, text: str) -> None:
        self.edits += 1
        self.messages[message_id] = text


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


async def test_the_notice_leads_the_answer():
    target, clock = Target(), Clock()
    sink = reply(target, clock, render=str, limit=200)
    await sink.notice("2 older messages were left out.")
    await sink.start()
    await sink.finish("answer")
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
