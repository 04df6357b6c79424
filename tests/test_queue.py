"""The inference queue: chunks stream out of the engine thread; fair order, bounds, timeouts,
cancellation, and requests that join a running batch."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
from conftest import (
    BrokenLoopBatcher,
    GatedBatcher,
    SpyBatcher,
    answer_alone,
    overflowing_qwen2,
)

from bot.batching import Batcher
from bot.engine import Engine
from bot.kv_cache import PrefixCache
from bot.queue import (
    AnswerRestarted,
    EngineStopped,
    FairOrder,
    Generation,
    InferenceCancelled,
    InferenceQueue,
    InferenceTimeout,
    QueueFull,
    UnusableOutput,
)

HELLO = [{"role": "user", "content": "hello"}]


async def collect(generation) -> list[str]:
    return [chunk async for chunk in generation]


async def test_chunks_stream_and_add_up_to_the_final_text(make_batcher):
    batcher = make_batcher(max_new_tokens=12)
    async with InferenceQueue(batcher=batcher, max_size=4, timeout=60) as queue:
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        chunks = await collect(generation)
    assert len(chunks) > 1
    assert "".join(chunks) == generation.text == answer_alone(batcher, HELLO)


async def test_a_stopped_answer_leaves_before_its_conversations_next_turn_joins(make_batcher):
    """Stop, and the conversation's next message at once, while a step runs: the stopped
    row leaves first, keeping its KV cache for the conversation, which the next turn then
    reuses. It joined first, found no cache (the row held it), and read it all again."""
    gated = GatedBatcher(make_batcher(max_new_tokens=30))
    async with InferenceQueue(batcher=gated, max_size=4, timeout=60) as queue:
        stopped = queue.submit(HELLO, user="u1", conversation="c1")
        for _ in range(200):  # bounded: until its row has joined (its step waits)
            if gated.prompts:
                break
            await asyncio.sleep(0.01)
        stopped.cancel()
        follow_up = [*HELLO, {"role": "assistant", "content": "Hi"}, *HELLO]
        next_turn = queue.submit(follow_up, user="u1", conversation="c1")
        gated.gate.set()
        await collect(next_turn)
    assert gated.reused[1] > 0


async def test_a_restarted_answer_says_so_and_reading_on_gives_the_new_one():
    """A writer that starts the answer again (another try) voids what was read."""
    generation = Generation(HELLO, user="u1", conversation="c1")
    generation.write("Hel", 5, 1)
    generation.restart()
    generation.write("Hi", 5, 1)
    generation.write(" there", 5, 2)
    generation.end("Hi there", prompt_tokens=5, answer_tokens=2)
    with pytest.raises(AnswerRestarted):
        await collect(generation)
    assert generation.text == ""
    assert await collect(generation) == ["Hi", " there"]
    assert (generation.text, generation.answer_tokens) == ("Hi there", 2)


async def test_a_cancelled_answer_tells_its_writer_and_takes_nothing_more():
    generation = Generation(HELLO, user="u1", conversation="c1")
    told: list[bool] = []
    generation.on_cancel = lambda: told.append(True)
    generation.write("Hel", 5, 1)
    generation.cancel()
    generation.write("lo", 5, 2)
    with pytest.raises(InferenceCancelled):
        await collect(generation)
    assert told == [True] and generation.text == "Hel"


async def test_an_answer_that_does_not_end_keeps_the_token_counts_of_what_was_read():
    """Stopped, cut or failed before its end, an answer counts the tokens read and written
    for the text read so far; a write with no text (held back) counts too."""
    generation = Generation(HELLO, user="u1", conversation="c1")
    generation.write("Hel", 5, 1)
    generation.write("", 5, 2)
    generation.write("lo", 5, 3)
    generation.fail(RuntimeError("out of memory"))
    chunks = aiter(generation)
    assert await anext(chunks) == "Hel"
    assert (generation.prompt_tokens, generation.answer_tokens) == (5, 1)
    assert await anext(chunks) == "lo"
    assert (generation.prompt_tokens, generation.answer_tokens) == (5, 3)
    with pytest.raises(RuntimeError):
        await anext(chunks)
    assert (generation.text, generation.answer_tokens) == ("Hello", 3)


async def test_a_request_joins_the_running_batch_and_answers_match_alone(make_batcher):
    """The second request starts while the first is still decoding, not after it."""
    batcher = make_batcher(max_new_tokens=40)
    second_question = [{"role": "user", "content": "what is a tokenizer?"}]
    async with InferenceQueue(batcher=batcher, max_size=4, timeout=60) as queue:
        first = queue.submit(HELLO, user="u1", conversation="c1")
        first_chunks = aiter(first)
        await anext(first_chunks)  # the first is decoding
        second = queue.submit(second_question, user="u2", conversation="c2")
        second_text = "".join(await collect(second))
        assert not first._over  # still running when the second finished its shorter answer
        [rest] = [[chunk async for chunk in first_chunks]]
    assert second_text == answer_alone(batcher, second_question)
    assert first.text == answer_alone(batcher, HELLO) and rest


async def test_users_take_turns_however_much_one_of_them_sends(make_batcher):
    """With one slot, a user who sends five messages gets every other turn, not the first five."""
    gated = GatedBatcher(make_batcher(max_batch=1, max_new_tokens=2))
    finished: list[str] = []

    async def ask(generation) -> None:
        await collect(generation)
        finished.append(generation.user)

    async with InferenceQueue(batcher=gated, max_size=16, timeout=60) as queue:
        flood = [queue.submit(HELLO, user="flooder", conversation=f"f{i}") for i in range(5)]
        others = [queue.submit(HELLO, user=f"u{i}", conversation=f"c{i}") for i in range(3)]
        gated.gate.set()
        await asyncio.gather(*(ask(g) for g in flood + others))
    assert finished == ["flooder", "u0", "u1", "u2", "flooder", "flooder", "flooder", "flooder"]


@pytest.mark.parametrize("first_runs_before_the_rest_come", [False, True])
async def test_a_user_whose_turn_ran_goes_behind_those_who_came_meanwhile(
    first_runs_before_the_rest_come,
):
    """The fair order does not hang on when the engine thread took the flooder's first
    request: before or after the others came, the flooder's next turn is after theirs."""
    order = FairOrder()

    def push(user: str, conversation: str) -> Generation:
        generation = Generation.submitted(
            HELLO,
            user=user,
            conversation=conversation,
            max_new_tokens=None,
            temperature=None,
            timeout=60,
        )
        order.push(generation)
        return generation

    first = push("flooder", "f0")
    if first_runs_before_the_rest_come:
        assert order.pop() is first
    for i in range(1, 5):
        push("flooder", f"f{i}")
    for i in range(3):
        push(f"u{i}", f"c{i}")
    if not first_runs_before_the_rest_come:
        assert order.pop() is first
    order.finished(first)
    expected = ["c0", "c1", "c2", "f1", "f2", "f3", "f4"]
    assert [g.conversation for g in order.line()] == expected
    taken = []
    while order:
        taken.append(order.pop())
        order.finished(taken[-1])
    assert [g.conversation for g in taken] == expected


async def test_a_full_queue_refuses_at_once_and_recovers(make_batcher):
    gated = GatedBatcher(make_batcher(max_new_tokens=4))
    async with InferenceQueue(batcher=gated, max_size=2, timeout=60) as queue:
        first = queue.submit(HELLO, user="u1", conversation="c1")
        second = queue.submit(HELLO, user="u2", conversation="c2")
        with pytest.raises(QueueFull):
            queue.submit(HELLO, user="u3", conversation="c3")
        gated.gate.set()
        await collect(first)
        await collect(second)
        third = queue.submit(HELLO, user="u3", conversation="c3")  # room again
        assert await collect(third)


async def test_timeout_stops_a_long_generation(make_batcher):
    spy = SpyBatcher(make_batcher(max_new_tokens=3000))  # far longer than the timeout allows
    async with InferenceQueue(batcher=spy, max_size=2, timeout=0.5) as queue:
        with pytest.raises(InferenceTimeout):
            await collect(queue.submit(HELLO, user="u1", conversation="c1"))
        for _ in range(100):  # until the engine thread has seen it (bounded)
            if not len(spy):
                break
            await asyncio.sleep(0.01)
        assert not len(spy) and not spy.answers  # it left the batch unfinished
        spy.batcher.engine.max_new_tokens = 4
        after = queue.submit(HELLO, user="u1", conversation="c1")  # the queue goes on serving
        assert await asyncio.wait_for(collect(after), timeout=60)
    assert spy.answers == [after.text]
    assert spy.batcher.stats.decoded < 1000


async def test_cancelling_while_waiting_skips_the_batcher(make_batcher):
    gated = GatedBatcher(make_batcher(max_batch=1, max_new_tokens=4))
    async with InferenceQueue(batcher=gated, max_size=4, timeout=60) as queue:
        running = queue.submit(HELLO, user="u1", conversation="c1")
        waiting = queue.submit(HELLO, user="u2", conversation="c2")
        waiting.cancel()
        gated.gate.set()
        await collect(running)
        with pytest.raises(InferenceCancelled):
            await collect(waiting)
        probe = queue.submit(HELLO, user="u3", conversation="c3")
        await collect(probe)
    assert len(gated.prompts) == 2  # the running one and the probe, never the cancelled one


async def test_requests_cancelled_while_waiting_make_room_at_once(make_batcher):
    """QUEUE_MAX counts requests waiting and running: those stopped or timed out while
    they wait count no more, though no row has freed yet."""
    gated = GatedBatcher(make_batcher(max_batch=1, max_new_tokens=4))
    async with InferenceQueue(batcher=gated, max_size=3, timeout=60) as queue:
        running = queue.submit(HELLO, user="u1", conversation="c1")
        waiting = [queue.submit(HELLO, user=f"u{n}", conversation=f"c{n}") for n in (2, 3)]
        for generation in waiting:
            generation.cancel()
        later = queue.submit(HELLO, user="u4", conversation="c4")  # not QueueFull
        assert queue.depth == 2  # the running one and this one
        gated.gate.set()
        assert await collect(running) and await collect(later)
    assert len(gated.prompts) == 2


async def test_a_cancelled_request_leaves_the_batch_and_the_others_go_on(make_batcher):
    batcher = make_batcher(max_new_tokens=30)
    question = [{"role": "user", "content": "and you?"}]
    async with InferenceQueue(batcher=batcher, max_size=4, timeout=60) as queue:
        leaving = queue.submit(HELLO, user="u1", conversation="c1")
        staying = queue.submit(question, user="u2", conversation="c2")
        await anext(aiter(leaving))
        leaving.cancel()
        assert "".join(await collect(staying)) == answer_alone(batcher, question)
    assert len(batcher) == 0
    assert batcher.stats.decoded < 60  # the cancelled one stopped early


async def test_a_cancelled_answer_counts_its_prompt_and_the_tokens_read(make_batcher):
    batcher = make_batcher(max_new_tokens=3000)  # would run for many seconds
    async with InferenceQueue(batcher=batcher, max_size=2, timeout=60) as queue:
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        chunks = aiter(generation)
        await anext(chunks), await anext(chunks)
        generation.cancel()
    assert generation.prompt_tokens == batcher.engine.count_tokens(HELLO)
    assert 2 <= generation.answer_tokens < 1000


async def test_batcher_errors_reach_every_request_in_the_batch(make_batcher):
    class Broken(SpyBatcher):
        def step(self):
            raise RuntimeError("out of memory")

    async with InferenceQueue(batcher=Broken(make_batcher()), max_size=2, timeout=60) as queue:
        requests = [queue.submit(HELLO, user=f"u{i}", conversation=f"c{i}") for i in range(2)]
        for generation in requests:
            with pytest.raises(RuntimeError, match="out of memory"):
                await collect(generation)


async def test_a_cancel_the_batcher_fails_to_carry_out_fails_the_batch_not_the_engine(
    make_batcher,
):
    """Leaving the batch stores the row's KV cache, which can run out of memory: the batch
    fails, as a failed step does, and the next request is answered, where the engine
    thread died and every request after failed until a restart."""

    class Unleavable(SpyBatcher):
        def leave(self, key: object) -> None:
            raise RuntimeError("out of memory")

    batcher = Unleavable(make_batcher(max_new_tokens=400))
    async with InferenceQueue(batcher=batcher, max_size=2, timeout=60) as queue:
        cancelled = queue.submit(HELLO, user="u1", conversation="c1")
        beside = queue.submit(HELLO, user="u2", conversation="c2")
        await anext(aiter(cancelled))
        await anext(aiter(beside))  # both in the batch (under load, `beside` may join late)
        cancelled.cancel()
        with pytest.raises(RuntimeError, match="out of memory"):
            await collect(beside)
        later = await collect(queue.submit(HELLO, user="u3", conversation="c3"))
        assert not queue.died.is_set()
    assert "".join(later) == batcher.answers[-1]


async def test_a_request_the_model_gives_nan_for_fails_alone(qwen_tokenizer):
    """The model's logits for one request are NaN: that request fails, saying so, and the
    one beside it in the batch is answered as it would be alone."""
    model = overflowing_qwen2(qwen_tokenizer, " zebra")
    engine = Engine(model=model, tokenizer=qwen_tokenizer, max_new_tokens=8)
    batcher = Batcher(engine=engine, max_batch=2, step_tokens=64, prefix_cache=PrefixCache(0))
    async with InferenceQueue(batcher=batcher, max_size=2, timeout=60) as queue:
        poisoned = queue.submit(
            [{"role": "user", "content": "a zebra"}], user="u1", conversation="c1"
        )
        sound = queue.submit(HELLO, user="u2", conversation="c2")
        with pytest.raises(UnusableOutput, match="not a number"):
            await collect(poisoned)
        assert "".join(await collect(sound)) == answer_alone(batcher, HELLO)


async def test_closing_the_queue_stops_the_running_generation(make_batcher):
    batcher = make_batcher(max_new_tokens=3000)  # would run for many seconds
    async with InferenceQueue(batcher=batcher, max_size=2, timeout=60) as queue:
        generation = queue.submit(HELLO, user="u1", conversation="c1")
        await anext(aiter(generation))  # it is running
    assert len(batcher) == 0 and batcher.stats.decoded < 1000
    with pytest.raises(InferenceCancelled):
        await collect(generation)


async def test_a_broken_engine_loop_stops_requests_and_says_the_engine_died(make_batcher):
    async with InferenceQueue(
        batcher=BrokenLoopBatcher(make_batcher()), max_size=2, timeout=60
    ) as queue:
        with pytest.raises(EngineStopped):
            await asyncio.wait_for(collect(queue.submit(HELLO, user="u", conversation="c")), 10)
        assert queue.died.is_set()  # what `threadbot run` waits on, to exit and be restarted
        with pytest.raises(EngineStopped):  # refused at once from now on, never "busy"
            queue.submit(HELLO, user="u", conversation="c")


class DiesWhenTold(SpyBatcher):
    """A batcher whose engine loop meets a bug once `dying` is set; `died` says it did."""

    def __init__(self, batcher: Batcher) -> None:
        super().__init__(batcher)
        self.dying, self.died = threading.Event(), threading.Event()

    @property
    def max_batch(self) -> int:
        if self.dying.is_set():
            self.died.set()
            raise RuntimeError("a bug in the loop")
        return self.batcher.max_batch

    @max_batch.setter
    def max_batch(self, value: int) -> None:
        pass


@pytest.mark.parametrize("dies", ["as it is sent", "just before, the loop not told yet"])
async def test_a_request_sent_as_the_engine_thread_dies_is_refused_not_left_waiting(
    make_batcher, monkeypatch, dies
):
    """The thread died between `submit`'s checks and its taking the line: the request
    joined a line that no one serves any more, and waited for its timeout. Just before,
    it was told busy (the line closed, `died` not yet set on the loop)."""
    batcher = DiesWhenTold(make_batcher(max_new_tokens=3000))
    submitted = Generation.submitted

    def die() -> None:
        batcher.dying.set()
        assert batcher.died.wait(timeout=10)
        time.sleep(0.5)  # the thread closes the line (and would be gone in any case)

    def dying_meanwhile(*args, **kwargs) -> Generation:
        generation = submitted(*args, **kwargs)
        die()
        return generation

    async with InferenceQueue(batcher=batcher, max_size=4, timeout=60) as queue:
        running = queue.submit(HELLO, user="u1", conversation="c1")
        await anext(aiter(running))  # the engine loop is going round
        if dies == "as it is sent":
            monkeypatch.setattr(Generation, "submitted", dying_meanwhile)
        else:
            die()  # with no await after it: the loop runs nothing meanwhile
        with pytest.raises(EngineStopped):
            late = queue.submit(HELLO, user="u2", conversation="c2")
            await asyncio.wait_for(collect(late), timeout=5)


async def test_options_reach_the_batcher_and_the_answer_reports_its_token_counts(make_batcher):
    spy = SpyBatcher(make_batcher(max_new_tokens=12))
    async with InferenceQueue(batcher=spy, max_size=4, timeout=60) as queue:
        generation = queue.submit(
            HELLO, user="u1", conversation="c1", max_new_tokens=5, temperature=0
        )
        assert (generation.prompt_tokens, generation.answer_tokens) == (0, 0)  # not yet
        await collect(generation)
    assert spy.options == [{"max_new_tokens": 5, "temperature": 0}]
    assert generation.text == answer_alone(spy.batcher, HELLO, max_new_tokens=5)
    assert generation.answer_tokens == 5
    assert generation.prompt_tokens == spy.batcher.engine.count_tokens(HELLO)


@pytest.mark.parametrize(
    "options, named",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
async def test_options_out_of_range_are_refused_by_name(make_batcher, options, named):
    spy = SpyBatcher(make_batcher())
    async with InferenceQueue(batcher=spy, max_size=4, timeout=60) as queue:
        with pytest.raises(ValueError, match=named):
            queue.submit(HELLO, user="u1", conversation="c1", **options)
        assert queue.depth == 0
    assert not spy.prompts


async def test_places_follow_the_fair_order_and_depth_counts_waiting_and_running(make_batcher):
    """One slot, held by alice's first request; her others wait behind bob's and carol's,
    since she already has one running."""
    gated = GatedBatcher(make_batcher(max_batch=1, max_new_tokens=2))
    async with InferenceQueue(batcher=gated, max_size=8, timeout=60) as queue:
        alice = [queue.submit(HELLO, user="alice", conversation=f"a{i}") for i in range(3)]
        bob = queue.submit(HELLO, user="bob", conversation="b")
        carol = queue.submit(HELLO, user="carol", conversation="c")
        async with asyncio.timeout(30):  # until the engine thread has taken alice's first
            while queue.place(alice[0]) != 0:
                await asyncio.sleep(0.01)
        assert queue.depth == 5
        assert [queue.place(g) for g in (*alice, bob, carol)] == [0, 3, 4, 1, 2]
        assert queue.places("alice") == [("a0", 0), ("a1", 3), ("a2", 4)]
        assert queue.places("bob") == [("b", 1)] and queue.places("dave") == []
        bob.cancel()  # out of the line at once: the others move up
        assert queue.place(bob) is None
        assert [queue.place(g) for g in (*alice, carol)] == [0, 2, 3, 1]
        served: list[str] = []

        async def ask(generation) -> None:
            await collect(generation)
            assert queue.place(generation) is None  # over as soon as its end is seen
            served.append(generation.conversation)

        gated.gate.set()
        await asyncio.gather(*(ask(g) for g in (*alice, carol)))
        assert served == ["a0", "c", "a1", "a2"]  # the order their places said
        assert queue.depth == 0
        assert queue.places("alice") == []


class Journal(SpyBatcher):
    """The real batcher, noting when each request joins and when it ends, in order."""

    def __init__(self, batcher) -> None:
        super().__init__(batcher)
        self.events: list[tuple[str, object]] = []

    def join(self, key: object, messages: list[dict], **options) -> None:
        self.events.append(("join", key))
        super().join(key, messages, **options)

    def step(self) -> list:
        updates = super().step()
        self.events += [("end", update.key) for update in updates if update.answer is not None]
        return updates


LONG_QUESTION = [{"role": "user", "content": "Tell me all about byte pair encoding. " * 8}]


async def journaled(batcher, *questions: list[dict]) -> tuple[list[tuple[str, object]], list]:
    """All `questions` submitted at once, each by a user and conversation of its own, and
    answered to the end: the batcher's join and end events, and the generations in order."""
    journal = Journal(batcher)
    async with InferenceQueue(batcher=journal, max_size=4, timeout=60) as queue:
        generations = [
            queue.submit(question, user=f"u{index}", conversation=f"c{index}")
            for index, question in enumerate(questions, 1)
        ]
        await asyncio.gather(*(collect(generation) for generation in generations))
    return journal.events, generations


async def test_a_request_too_big_for_the_batch_waits_while_a_short_one_joins(make_batcher):
    """MAX_BATCH_TOKENS counts the padding: with room for two rows as wide as a long one, a
    long and a short fit (the short padded to the long one's width), and a second long
    request waits until one of them has ended."""
    batcher = make_batcher(max_new_tokens=12)
    long_row = len(batcher.engine.prompt_ids(LONG_QUESTION)) + 12
    batcher.max_batch_tokens = 2 * long_row  # room for two rows as wide as a long one
    events, (first, short, second) = await journaled(batcher, LONG_QUESTION, HELLO, LONG_QUESTION)
    assert events.index(("join", short)) < events.index(("end", first))  # joined at once
    first_end = min(events.index(("end", first)), events.index(("end", short)))
    assert events.index(("join", second)) > first_end  # waited its turn
    assert first.text == second.text == answer_alone(batcher, LONG_QUESTION)
    assert short.text == answer_alone(batcher, HELLO)


async def test_a_request_larger_than_the_whole_budget_runs_alone(make_batcher):
    batcher = make_batcher(max_new_tokens=6, max_batch_tokens=1)
    events, (first, second) = await journaled(batcher, HELLO, HELLO)
    assert events == [("join", first), ("end", first), ("join", second), ("end", second)]
    assert first.text == second.text == answer_alone(batcher, HELLO)


async def test_a_waiting_request_is_not_passed_by_smaller_ones_behind_it(make_batcher):
    """The short request would fit beside the first long one, but the second long one is
    ahead of it in line: it goes first, so a long request cannot starve behind short ones."""
    batcher = make_batcher(max_new_tokens=6)
    batcher.max_batch_tokens = 2 * len(batcher.engine.prompt_ids(LONG_QUESTION)) - 1
    events, (first, second, short) = await journaled(batcher, LONG_QUESTION, LONG_QUESTION, HELLO)
    assert events.index(("join", second)) > events.index(("end", first))
    assert events.index(("join", short)) > events.index(("join", second))


class HungStep(SpyBatcher):
    """A batcher whose steps hang (a wedged device) until `go` is set."""

    def __init__(self, batcher: Batcher) -> None:
        super().__init__(batcher)
        self.stepping, self.go = threading.Event(), threading.Event()

    def step(self):
        self.stepping.set()
        self.go.wait(10)
        return super().step()


async def test_an_engine_stuck_in_one_step_past_the_request_timeout_is_not_ready(make_batcher):
    """The thread lives, but one step has run longer than any request may wait: readiness
    says so (a load balancer or an orchestrator then acts on it); once it moves, ready."""
    hung = HungStep(make_batcher())
    async with InferenceQueue(batcher=hung, max_size=2, timeout=0.3) as queue:
        generation = queue.submit(HELLO, user="u", conversation="c")
        assert await asyncio.to_thread(hung.stepping.wait, 10)
        assert queue.checks() == {"engine": "ok"}
        await asyncio.sleep(0.5)
        assert queue.checks()["engine"].startswith("stuck: one step has run for")
        hung.go.set()
        with contextlib.suppress(Exception):  # past its timeout by now
            await collect(generation)
        async with asyncio.timeout(10):  # the step ends, then the rest in a moment
            while queue.checks() != {"engine": "ok"}:
                await asyncio.sleep(0.05)


class SlowFits(SpyBatcher):
    """Admission tokenizes the request (in `fits`), while the event loop runs on."""

    def __init__(self, batcher) -> None:
        super().__init__(batcher)
        self.entered, self.go = threading.Event(), threading.Event()

    def fits(self, *args, **options) -> bool:
        self.entered.set()
        self.go.wait(10)
        return super().fits(*args, **options)


async def test_a_request_cancelled_as_its_admission_is_checked_leaves_the_engine_running(
    make_batcher,
):
    """The only request waiting is cancelled (Stop, a timeout) while the engine thread
    tokenizes it: the line is empty when the thread looks again, and it goes on."""
    slow = SlowFits(make_batcher())
    async with InferenceQueue(batcher=slow, max_size=4, timeout=60) as queue:
        first = queue.submit(HELLO, user="u1", conversation="c1")
        assert await asyncio.to_thread(slow.entered.wait, 10)
        first.cancel()
        slow.go.set()
        await asyncio.sleep(0.3)  # the thread looks at the line again (microseconds)
        second = queue.submit(HELLO, user="u2", conversation="c2")
        assert await collect(second)
        assert not queue.died.is_set()
