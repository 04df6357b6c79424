"""ChatService with real Redis, the real queue and a tiny real model; a recording sink."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from functools import partial
from itertools import pairwise
from typing import Any

import pytest
from conftest import FailsOnceBatcher, GatedBatcher, ScriptedBatcher, SpyBatcher
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from test_turns import forget

import storage.store
from bot import replies
from bot.config import Access
from bot.job_queue import JobQueue
from bot.queue import InferenceQueue
from bot.types import ConversationKey, NowhereToAnswer, Turn
from bot.worker import Worker
from storage import keys
from storage.locks import ConversationLocks
from storage.store import ConversationStore
from storage.turns import PendingTurn, TurnJournal


class RecordingSink:
    """Keeps every call the service makes, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.on_post = None

    def reply_target(self) -> dict:
        return {}

    async def start(self) -> None:
        self.events.append(("start", ""))

    async def append(self, chunk: str) -> None:
        self.events.append(("append", chunk))

    async def restart(self) -> None:
        self.events.append(("restart", ""))

    async def notice(self, text: str) -> None:
        self.events.append(("notice", text))

    async def finish(self, text: str) -> None:
        self.events.append(("finish", text))

    async def fail(self, text: str) -> None:
        self.events.append(("fail", text))

    async def pause(self, text: str) -> None:
        self.events.append(("pause", text))

    def kinds(self, kind: str) -> list[str]:
        return [text for event, text in self.events if event == kind]


@pytest.fixture
def conversation() -> ConversationKey:
    return ConversationKey("test", "team", "channel", uuid.uuid4().hex)


def turn(conversation: ConversationKey, text: str, message_id: str | None = None) -> Turn:
    return Turn(conversation, "U1", text, message_id or uuid.uuid4().hex)


async def test_a_turn_is_answered_streamed_and_stored(make_service, store, conversation):
    sink = RecordingSink()
    async with make_service() as (service, _batcher):
        await service.handle(turn(conversation, "Hello there"), sink)
    [answer] = sink.kinds("finish")
    assert sink.events[0] == ("start", "")
    assert "".join(sink.kinds("append")).strip() == answer
    assert await store.load(str(conversation)) == [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": answer},
    ]


async def test_reasoning_the_chat_template_opens_is_never_shown_nor_stored(
    make_service, store, conversation
):
    """A model whose template opens `<think>` in the prompt (DeepSeek-R1's): the answer
    begins inside the block, and its reasoning streamed into the thread."""
    reasoned = "The user greets me. I should greet back.\n</think>\n\nHello!"
    sink = RecordingSink()
    async with make_service(ScriptedBatcher(reasoned), prompt_opens_reasoning=True) as (
        service, _batcher,
    ):  # fmt: skip
        await service.handle(turn(conversation, "hi"), sink)
    assert "".join(sink.kinds("append")) == "Hello!" == sink.kinds("finish")[0]
    assert [m["content"] for m in await store.load(str(conversation))] == ["hi", "Hello!"]


async def test_history_grows_and_builds_the_next_prompt(make_service, store, conversation):
    async with make_service(system_prompt="You are terse.") as (service, batcher):
        await service.handle(turn(conversation, "first question"), RecordingSink())
        await service.handle(turn(conversation, "second question"), RecordingSink())
    first_answer = (await store.load(str(conversation)))[1]["content"]
    assert batcher.prompts[1] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "second question"},
    ]
    assert len(await store.load(str(conversation))) == 4


async def test_turns_of_one_conversation_are_answered_in_order(make_service, store, conversation):
    """A second message sent before the first is answered waits, and sees that answer."""
    async with make_service() as (service, batcher):
        await asyncio.gather(
            service.handle(turn(conversation, "first"), RecordingSink()),
            service.handle(turn(conversation, "second"), RecordingSink()),
        )
    history = await store.load(str(conversation))
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert batcher.prompts[1][:3] == history[:3]


async def test_two_processes_answer_one_conversations_turns_one_after_the_other(
    make_service, store, redis_client, conversation
):
    """Two gateways behind one app each get a message of one thread at once: whichever
    answers second has the first answer in its prompt, and the history alternates."""
    other = TurnJournal(
        redis=redis_client, store=store, owner=f"test-{uuid.uuid4().hex}", lease_seconds=2.0
    )
    async with make_service() as (one, spy), make_service(journal=other) as (two, other_spy):
        await asyncio.gather(
            one.handle(turn(conversation, "first"), RecordingSink()),
            two.handle(turn(conversation, "second"), RecordingSink()),
        )
    prompts = spy.prompts + other_spy.prompts
    history = await store.load(str(conversation))
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert max(prompts, key=len)[:3] == history[:3]


async def test_a_redelivered_message_is_answered_once(make_service, conversation):
    first, again = RecordingSink(), RecordingSink()
    async with make_service() as (service, batcher):
        message_id = uuid.uuid4().hex
        await service.handle(turn(conversation, "hi", message_id=message_id), first)
        await service.handle(turn(conversation, "hi", message_id=message_id), again)
    assert len(first.kinds("finish")) == 1
    assert again.events == []
    assert len(batcher.prompts) == 1


@pytest.mark.parametrize(
    ("text", "reply"),
    [("   \n ", replies.empty_message()), ("x" * 201, replies.too_long(201, 200))],
)
async def test_bad_input_gets_a_reply_and_no_generation(
    make_service, store, conversation, text, reply
):
    sink = RecordingSink()
    async with make_service() as (service, batcher):
        await service.handle(turn(conversation, text), sink)
    assert sink.events == [("finish", reply)]
    assert batcher.prompts == []
    assert await store.load(str(conversation)) == []


def exchanges(count: int) -> list[dict]:
    return [
        {"role": role, "content": f"{role} message number {i} " + "filler " * 20}
        for i in range(count)
        for role in ("user", "assistant")
    ]


async def test_trimming_drops_the_oldest_and_keeps_system_and_newest(
    make_service, make_engine, store, conversation
):
    counter = make_engine()
    system, newest = "You are terse.", "the newest question"
    old = exchanges(2)
    await store.append(str(conversation), *old)
    full = [{"role": "system", "content": system}, *old, {"role": "user", "content": newest}]
    budget = counter.count_tokens(full) - 10  # just too small for everything
    sink = RecordingSink()
    async with make_service(system_prompt=system, prompt_budget=budget) as (service, batcher):
        await service.handle(turn(conversation, newest), sink)
    # The oldest exchange goes whole, so the kept history still starts with a user turn.
    assert batcher.prompts == [[full[0], *old[2:], full[-1]]]
    assert counter.count_tokens(batcher.prompts[0]) <= budget
    assert sink.kinds("notice") == [replies.history_dropped(2)]
    assert sink.kinds("finish")


async def test_history_cut_by_the_store_still_starts_with_a_user_turn(
    make_service, store, conversation
):
    old = exchanges(3)
    # With the new turn, 7 messages pass the cap of 6; the store keeps the newest 4.
    await store.append(str(conversation), *old)
    sink = RecordingSink()
    async with make_service() as (service, batcher):
        await service.handle(turn(conversation, "newest"), sink)
    assert batcher.prompts == [[*old[4:], {"role": "user", "content": "newest"}]]
    assert sink.kinds("notice") == []  # nothing was dropped to fit the context
    assert (await store.load(str(conversation)))[0] == old[4]  # the answer first is gone too


LONG_SYSTEM_PROMPT = "You are a helpful assistant who answers in one short sentence. " * 12


async def converse(
    make_service: Any, conversation: ConversationKey, turns: int, **options: Any
) -> tuple[SpyBatcher, list[RecordingSink]]:
    """`turns` questions in one conversation, each answered before the next; the batcher
    (a SpyBatcher) and each turn's sink."""
    sinks = [RecordingSink() for _ in range(turns)]
    async with make_service(system_prompt=LONG_SYSTEM_PROMPT, **options) as (service, batcher):
        for number, sink in enumerate(sinks):
            await service.handle(turn(conversation, f"question {number}: why? " * 3), sink)
    return batcher, sinks


def well_reused_share(batcher: SpyBatcher, make_engine: Any) -> float:
    """The share of turns that took at least 80% of their prompt from the KV cache."""
    counter = make_engine()
    shares = [
        reused / counter.count_tokens(prompt)
        for reused, prompt in zip(batcher.reused, batcher.prompts, strict=True)
    ]
    return sum(share >= 0.8 for share in shares) / len(shares)


def fronts_moved(batcher: SpyBatcher) -> list[bool]:
    """Per turn: whether its prompt's history starts elsewhere than the last turn's did."""
    fronts = [prompt[1] for prompt in batcher.prompts]  # after the system prompt
    return [False] + [front != last for last, front in pairwise(fronts)]


@pytest.mark.parametrize("store", [100], indirect=True)
async def test_a_long_conversation_over_the_budget_trims_seldom_and_reuses_its_cache(
    make_service, make_engine, store, conversation
):
    budget = 700  # about 16 turns, with the system prompt
    batcher, sinks = await converse(make_service, conversation, 30, prompt_budget=budget)
    counter = make_engine()
    assert all(counter.count_tokens(prompt) <= budget for prompt in batcher.prompts)
    moved = fronts_moved(batcher)
    assert sum(moved) >= 2  # the conversation passed its budget more than once
    assert well_reused_share(batcher, make_engine) >= 0.8
    # Told once per trim: at the turn whose prompt lost the oldest messages, and then not.
    notices = [sink.kinds("notice") for sink in sinks]
    assert [len(told) for told in notices] == [int(trimmed) for trimmed in moved]


@pytest.mark.parametrize("store", [40], indirect=True)
async def test_a_long_conversation_over_the_message_cap_reuses_its_cache(
    make_service, make_engine, store, conversation
):
    batcher, sinks = await converse(make_service, conversation, 30)
    assert sum(fronts_moved(batcher)) >= 2  # the store's cap trimmed it more than once
    assert well_reused_share(batcher, make_engine) >= 0.8
    assert all(sink.kinds("notice") == [] for sink in sinks)  # the cap trims silently


async def test_a_message_over_the_token_budget_is_refused_and_the_history_kept(
    make_service, make_engine, store, conversation
):
    """Under MAX_INPUT_CHARS but over the prompt's budget in tokens (digits, hex and CJK
    text take a token or more per character): no trim could fit it, so the asker hears
    how long it was, and the conversation goes on as it was."""
    short, long = "a short question", " ".join("9" * 90)
    budget = make_engine().count_tokens([{"role": "user", "content": long}]) - 1
    around = make_engine().count_tokens([{"role": "user", "content": ""}])  # the template's
    sinks = [RecordingSink() for _ in range(3)]
    async with make_service(prompt_budget=budget) as (service, batcher):
        for sink, text in zip(sinks, [short, long, short], strict=True):
            await service.handle(turn(conversation, text), sink)
    told = replies.too_many_tokens(budget + 1 - around, budget - around)
    assert sinks[1].events == [("fail", told)]
    assert all(sink.kinds("finish") for sink in (sinks[0], sinks[2]))
    assert len(batcher.prompts) == 2
    history = await store.load(str(conversation))
    assert [m["content"] for m in history if m["role"] == "user"] == [short, short]
    assert batcher.prompts[1][:2] == history[:2]  # the first exchange, not trimmed away


async def test_a_mention_refused_as_too_long_keeps_the_threads_earlier_messages(
    make_service, make_engine, store, conversation
):
    """The mention brought the bot into the thread, and the earlier messages read with it
    were never stored: the asker's shorter follow-up there was answered without them."""
    long = " ".join("9" * 90)
    budget = make_engine().count_tokens([{"role": "user", "content": long}]) - 1
    earlier = ({"role": "user", "content": "the deploy failed at step 3"},)
    refused, answered = RecordingSink(), RecordingSink()
    async with make_service(prompt_budget=budget) as (service, batcher):
        await service.handle(replace(turn(conversation, long), context=earlier), refused)
        assert await service.knows(conversation)  # the follow-up is answered unasked
        await service.handle(turn(conversation, "why did it fail?"), answered)
    assert refused.kinds("fail") and answered.kinds("finish")
    assert batcher.prompts[0] == [*earlier, {"role": "user", "content": "why did it fail?"}]


async def test_a_message_is_held_to_the_token_budget_with_its_authors_name(
    make_service, make_engine, conversation
):
    """With others in the thread the model reads "alice: …": a message that fits only
    without its author's name is refused, not sent over the budget."""
    text = " ".join("9" * 90)
    budget = make_engine().count_tokens([{"role": "user", "content": text}])
    named = make_engine().count_tokens([{"role": "user", "content": f"alice: {text}"}])
    around = make_engine().count_tokens([{"role": "user", "content": ""}])
    sink = RecordingSink()
    async with make_service(prompt_budget=budget) as (service, batcher):
        await service.handle(replace(turn(conversation, text), author_name="alice"), sink)
    assert sink.events == [("fail", replies.too_many_tokens(named - around, budget - around))]
    assert not batcher.prompts


async def test_a_system_prompt_over_the_budget_is_named_not_the_askers_message(
    make_service, make_engine, conversation, caplog
):
    """A persona pasted with a long policy: every "hi" there was told it was thousands of
    tokens long; the asker hears it is the instructions, and the log says where."""
    system_prompt = " ".join("9" * 200)
    budget = make_engine().count_tokens([{"role": "system", "content": system_prompt}]) - 10
    sink = RecordingSink()
    async with make_service(prompt_budget=budget, system_prompt=system_prompt) as (service, b):
        await service.handle(turn(conversation, "hi"), sink)
    assert sink.events == [("fail", replies.system_prompt_too_long())]
    assert not b.prompts
    assert f"the system prompt for {conversation} takes" in caplog.text


async def test_a_template_with_a_default_system_prompt_tells_no_limit_past_the_budget(
    make_service, make_engine, conversation
):
    """SmolLM2's and Qwen2.5's templates write a system prompt of their own where the
    prompt has none: counted alone, the message took it along, and the instructions
    (a short persona's, which replaces it) came out fewer than none, the limit told more
    than the whole budget."""
    engine, default = make_engine(), 40  # tokens of the template's own system prompt

    def count(messages: list) -> int:
        own = messages[0]["role"] == "system"
        return engine.count_tokens(messages) + (0 if own else default)

    text, system_prompt = " ".join("9" * 90), "Be brief."
    prompt = [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]
    budget = count(prompt)
    sink = RecordingSink()
    async with make_service(
        prompt_budget=budget - 1, count_tokens=count, system_prompt=system_prompt
    ) as (service, _batcher):
        await service.handle(turn(conversation, text), sink)
    [(kind, told)] = sink.events
    limit = int(told.split("more than the ")[1].split(" ")[0].replace(",", ""))
    assert kind == "fail" and limit < budget - 1


async def test_a_message_over_what_the_system_prompt_leaves_is_told_its_own_length(
    make_service, make_engine, conversation
):
    system_prompt, text = "Be brief.", " ".join("9" * 90)
    engine = make_engine()
    with_system = engine.count_tokens(
        [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]
    )
    instructions = engine.count_tokens(
        [{"role": "system", "content": system_prompt}, {"role": "user", "content": ""}]
    )
    budget = with_system - 1
    sink = RecordingSink()
    async with make_service(prompt_budget=budget, system_prompt=system_prompt) as (service, _b):
        await service.handle(turn(conversation, text), sink)
    told = replies.too_many_tokens(with_system - instructions, budget - instructions)
    assert sink.events == [("fail", told)]


async def test_a_failing_generation_keeps_the_message_and_the_service(
    make_service, make_batcher, store, conversation
):
    broken, fine = RecordingSink(), RecordingSink()
    async with make_service(FailsOnceBatcher(make_batcher())) as (service, _batcher):
        await service.handle(turn(conversation, "first try"), broken)
        await service.handle(turn(conversation, "second try"), fine)
    assert broken.kinds("fail") == [replies.failed()]
    assert fine.kinds("finish")
    history = await store.load(str(conversation))
    assert [m["content"] for m in history[:2]] == ["first try", "second try"]


async def test_a_busy_queue_says_so(make_service, make_batcher, conversation):
    gated = GatedBatcher(make_batcher())
    async with make_service(gated, queue_max=1) as (service, _batcher):
        first, second = RecordingSink(), RecordingSink()
        running = asyncio.create_task(service.handle(turn(conversation, "one"), first))
        for _ in range(100):  # until the first is in the queue (bounded)
            if first.events:
                break
            await asyncio.sleep(0.01)
        other = ConversationKey("test", "team", "channel", uuid.uuid4().hex)
        await service.handle(turn(other, "two"), second)
        gated.gate.set()
        await asyncio.wait_for(running, timeout=30)
    assert second.kinds("fail") == [replies.busy()]
    assert first.kinds("finish")


async def test_a_timeout_is_answered(make_service, make_batcher, conversation):
    sink = RecordingSink()
    async with make_service(make_batcher(max_new_tokens=3000), timeout=0.3) as (service, _batcher):
        await service.handle(turn(conversation, "tell me everything"), sink)
    assert sink.kinds("fail") == [replies.timed_out()]


class StopsAtFirstText(RecordingSink):
    """Stops the answer once it has shown some text, as a Stop button would."""

    def __init__(self, stop: Callable[[], object]) -> None:
        super().__init__()
        self.stop = stop

    async def append(self, chunk: str) -> None:
        await super().append(chunk)
        if "".join(self.kinds("append")).strip():
            self.stop()


async def test_a_stopped_answer_counts_the_tokens_it_read_and_wrote(
    make_service, make_batcher, conversation, caplog
):
    """Stopped mid-way, an answer never reaches its end: its stats and its turn report
    count its prompt and the tokens written up to the stop, not 0."""
    caplog.set_level(logging.INFO, logger="bot.turn_report")
    spy = SpyBatcher(make_batcher(max_new_tokens=3000))
    message_id = uuid.uuid4().hex
    async with make_service(spy) as (service, _batcher):
        sink = StopsAtFirstText(lambda: service.stop_answer(f"test:{message_id}", by="U1"))
        await service.handle(turn(conversation, "tell me everything", message_id), sink)
        summary = await service.stats.summary()
    assert sink.kinds("finish")[0].endswith(replies.stopped())
    prompt_tokens = spy.batcher.engine.count_tokens(spy.prompts[0])
    assert (summary.turns, summary.prompt_tokens) == (1, prompt_tokens)
    assert 0 < summary.answer_tokens < 3000
    [report] = [record for record in caplog.records if record.name == "bot.turn_report"]
    assert (report.prompt_tokens, report.answer_tokens) == (prompt_tokens, summary.answer_tokens)


class StoppedAsItEnds(RecordingSink):
    """A platform that tells of its reader's stop only when the whole answer is put (Slack
    refuses a native stream's last call): the reader saw `shown`."""

    def __init__(self, stop: Callable[..., object], shown: str) -> None:
        super().__init__()
        self.stop, self.shown = stop, shown

    async def finish(self, text: str) -> None:
        self.stop(shown=self.shown)
        await super().finish(text)


async def test_an_answer_stopped_as_it_ends_is_stored_as_its_reader_saw_it(
    make_service, store, conversation
):
    """The stop came after the generation ended, so nothing stopped: the whole answer was
    stored, though the reader saw less of it and the answer's end went unmarked."""
    message_id = uuid.uuid4().hex
    async with make_service(ScriptedBatcher("Paris is the capital of France.")) as (service, _):
        sink = StoppedAsItEnds(partial(service.stop_answer, f"test:{message_id}", by="U1"), "Par")
        await service.handle(turn(conversation, "capital of France?", message_id), sink)
    assert sink.kinds("finish") == ["Paris is the capital of France."]
    stored = (await store.load(str(conversation)))[-1]
    assert stored == {"role": "assistant", "content": f"Par\n\n{replies.stopped()}"}


async def test_reset_forgets_the_conversation(make_service, store, conversation):
    async with make_service() as (service, _batcher):
        await service.handle(turn(conversation, "remember me"), RecordingSink())
        sink = RecordingSink()
        await service.handle(replace(turn(conversation, "reset"), command="reset"), sink)
    assert await store.load(str(conversation)) == []
    assert sink.events == [("finish", replies.conversation_reset())]


@pytest.mark.parametrize("order", ["reset", "forget"])
async def test_reset_of_a_conversation_never_had_says_nothing_is_stored(
    make_service, conversation, order
):
    """In a chat or a DM with no messages yet, or typed at a channel's top level (a
    conversation of its own, new): nothing is cleared, so saying it was would be untrue,
    and the bot does not take the place as one it knows."""
    async with make_service() as (service, _batcher):
        sink = RecordingSink()
        await service.handle(replace(turn(conversation, order), command=order), sink)
        assert not await service.knows(conversation)
    assert sink.events == [("finish", replies.nothing_stored(order))]


async def test_thread_context_seeds_a_new_conversation_only(make_service, store, conversation):
    """Mentioned halfway through a thread, the bot answers with the thread's earlier messages."""
    earlier = (
        {"role": "user", "content": "we deploy on fridays"},
        {"role": "user", "content": "is that wise?"},
    )
    seeded = Turn(conversation, "U1", "what do you think?", uuid.uuid4().hex, context=earlier)
    async with make_service() as (service, batcher):
        assert not await service.knows(conversation)
        await service.handle(seeded, RecordingSink())
        assert await service.knows(conversation)
        again = Turn(conversation, "U1", "and now?", uuid.uuid4().hex, context=earlier)
        await service.handle(again, RecordingSink())
    assert batcher.prompts[0] == [*earlier, {"role": "user", "content": "what do you think?"}]
    assert batcher.prompts[1][:3] == batcher.prompts[0]  # the context was not stored twice
    assert len(await store.load(str(conversation))) == 6


async def test_a_user_with_too_many_unanswered_messages_is_asked_to_slow_down(
    make_service, make_batcher, store
):
    gated = GatedBatcher(make_batcher())
    async with make_service(gated, max_pending_per_user=2) as (service, _batcher):
        threads = [ConversationKey("test", "team", "channel", uuid.uuid4().hex) for _ in range(4)]
        sinks = [RecordingSink() for _ in threads]
        waiting = [
            asyncio.create_task(service.handle(turn(threads[i], f"question {i}"), sinks[i]))
            for i in range(2)
        ]
        await until(lambda: asyncio.sleep(0, service.queue.depth == 2))  # both are in
        await service.handle(turn(threads[2], "one too many"), sinks[2])
        other_user = Turn(threads[3], "U2", "hello", uuid.uuid4().hex)
        answered = asyncio.create_task(service.handle(other_user, sinks[3]))
        gated.gate.set()
        await asyncio.wait_for(asyncio.gather(*waiting, answered), timeout=30)
    assert sinks[2].events == [("finish", replies.slow_down(2))]
    assert await store.load(str(threads[2])) == []  # not saved, as the reply says
    assert all(sink.kinds("finish") for sink in (sinks[0], sinks[1], sinks[3]))


async def test_a_users_unanswered_messages_count_against_the_limit_in_every_process(
    make_service, make_batcher, redis_client, store
):
    """Gateways on one Redis: two messages of one user waiting in one process leave that
    user none in another at MAX_PENDING_PER_USER=2; another user is answered there, and so
    is the first once their answers are done."""
    gated = GatedBatcher(make_batcher())
    elsewhere = TurnJournal(
        redis=redis_client, store=store, owner=f"test-{uuid.uuid4().hex}", lease_seconds=2.0
    )
    threads = [ConversationKey("test", "team", "channel", uuid.uuid4().hex) for _ in range(4)]
    sinks = [RecordingSink() for _ in threads]
    async with (
        make_service(gated, max_pending_per_user=2) as (first, _),
        make_service(max_pending_per_user=2, journal=elsewhere) as (second, _),
    ):
        waiting = [
            asyncio.create_task(first.handle(turn(threads[i], f"question {i}"), sinks[i]))
            for i in range(2)
        ]
        await until(lambda: asyncio.sleep(0, first.queue.depth == 2))  # both are in
        await second.handle(turn(threads[2], "one too many"), sinks[2])
        await second.handle(Turn(threads[3], "U2", "hello", uuid.uuid4().hex), sinks[3])
        gated.gate.set()
        await asyncio.wait_for(asyncio.gather(*waiting), timeout=30)
        await second.handle(turn(threads[2], "and now?"), sinks[2])
    refused, answered = sinks[2].events[0], sinks[2].kinds("finish")[1:]
    assert refused == ("finish", replies.slow_down(2))
    assert len(answered) == 1 and answered != [replies.slow_down(2)]
    assert all(sink.kinds("finish") for sink in (sinks[0], sinks[1], sinks[3]))


async def test_a_message_delivered_twice_at_once_at_the_pending_limit_is_answered(
    make_service, journal, monkeypatch, conversation
):
    """Slack's app_mention and message events for one mention, taken at once by a user
    with one answer left to their limit: the twin waits for nothing, where it counted the
    first against the limit, was refused, and marked the message seen first, so the
    first was skipped and never answered."""
    recording = asyncio.Event()
    accept = journal.accept

    async def slow_accept(*args: Any, **kwargs: Any) -> Any:
        await recording.wait()  # the twin arrives meanwhile
        return await accept(*args, **kwargs)

    monkeypatch.setattr(journal, "accept", slow_accept)
    message = turn(conversation, "hello")
    first, twin = RecordingSink(), RecordingSink()
    async with make_service(max_pending_per_user=1) as (service, _batcher):
        taking = asyncio.create_task(service.accept(message, first))
        await asyncio.sleep(0)  # the first is in, waiting for its record
        assert await service.accept(message, twin) is None
        recording.set()
        answer = await asyncio.wait_for(taking, timeout=10)
        assert answer is not None
        await answer
    assert first.kinds("finish") and not twin.events


async def test_with_several_people_each_message_says_who_wrote_it(
    make_service, store, conversation
):
    alone = Turn(conversation, "U1", "first", uuid.uuid4().hex, author_name="alice")
    joined = Turn(conversation, "U2", "second", uuid.uuid4().hex, author_name="bob")
    async with make_service() as (service, batcher):
        await service.handle(alone, RecordingSink())
        await service.handle(joined, RecordingSink())
    assert batcher.prompts[0] == [{"role": "user", "content": "first"}]  # one person: as written
    answer = batcher.prompts[1][1]
    assert batcher.prompts[1] == [
        {"role": "user", "content": "alice: first"},
        answer,
        {"role": "user", "content": "bob: second"},
    ]
    assert answer["role"] == "assistant" and ":" not in answer.get("name", "")
    stored = await store.load(str(conversation))
    assert [m.get("name") for m in stored] == ["alice", None, "bob", None]


async def test_names_stay_after_a_trim_leaves_one_persons_messages_until_a_reset(
    make_service, store, conversation
):
    """A trim dropped every message of the thread's second person: the prompt named no
    one from then on, so it began otherwise than the last (its cache unused once), and
    the model no longer saw whose words were whose."""

    def said(text: str, who: str) -> Turn:
        return Turn(conversation, who, text, uuid.uuid4().hex, author_name=who.lower())

    async with make_service() as (service, batcher):
        await service.handle(said("first", "BOB"), RecordingSink())
        await service.handle(said("second", "ALICE"), RecordingSink())
        await store.drop_oldest(str(conversation), 2)  # as a trim to the budget does
        await service.handle(said("third", "ALICE"), RecordingSink())
        reset = Turn(conversation, "BOB", "reset", uuid.uuid4().hex, command="reset")
        await service.handle(reset, RecordingSink())  # by its starter
        await service.handle(said("fourth", "ALICE"), RecordingSink())
    assert [m["content"] for m in batcher.prompts[2] if m["role"] == "user"] == [
        "alice: second", "alice: third",
    ]  # fmt: skip
    assert batcher.prompts[3] == [{"role": "user", "content": "fourth"}]


async def test_a_reset_behind_an_answer_longer_than_it_may_wait_says_to_send_it_again(
    make_service, make_batcher, store, conversation, monkeypatch
):
    """It waited for the running answer without end, and Discord's reply to a slash command
    expires after 15 minutes: the history was cleared, and its sender never told."""
    monkeypatch.setattr("bot.service.COMMAND_WAIT_S", 0.5)
    gated = GatedBatcher(make_batcher())
    told = RecordingSink()
    async with make_service(gated) as (service, _batcher):
        answering = asyncio.create_task(service.handle(turn(conversation, "hi"), RecordingSink()))
        await until(lambda: asyncio.sleep(0, service.queue.depth == 1))
        await service.handle(replace(turn(conversation, "reset"), command="reset"), told)
        gated.gate.set()
        await asyncio.wait_for(answering, timeout=30)
    assert told.events == [("fail", replies.still_answering("reset"))]
    assert len(await store.load(str(conversation))) == 2  # nothing was done


@pytest.mark.parametrize("text", ["\u200b\u200d\ufeff", " \u200c \u2060 "])
async def test_invisible_characters_alone_are_an_empty_message(make_service, conversation, text):
    sink = RecordingSink()
    async with make_service() as (service, batcher):
        await service.handle(turn(conversation, text), sink)
    assert sink.events == [("finish", replies.empty_message())]
    assert batcher.prompts == []


async def test_fitting_an_attachment_does_not_bring_the_bot_into_the_conversation(
    make_service, conversation
):
    """An adapter fits a mention's file to the prompt before the turn is accepted, which
    may refuse it (a rate limit, say): the system prompt filled in for that was kept, and
    the conversation then counted as one the bot is in, answered unasked for a month."""
    async with make_service(system_prompt="You help {user_name}.") as (service, _batcher):
        fits = await service.fitting(turn(conversation, "what is in this file?"))
        assert await fits("what is in this file?\n\n[attached: notes.txt]\nShip it.")
        assert not await service.knows(conversation)


async def test_a_lone_surrogate_is_stored_and_answered(make_service, store, conversation):
    sink = RecordingSink()
    async with make_service() as (service, _batcher):
        await service.handle(turn(conversation, "broken \ud800 text"), sink)
    assert sink.kinds("finish")
    [question, _answer] = await store.load(str(conversation))
    assert question["content"].startswith("broken ") and "\ud800" not in question["content"]


class ShowingSink(RecordingSink):
    """Says where its answer is shown once it is, as a platform's sink does: each answer
    at a place of its own."""

    def __init__(self, service: Any, conversation: ConversationKey) -> None:
        super().__init__()
        self.service, self.conversation = service, conversation
        self.place = {"answer": uuid.uuid4().hex}

    async def finish(self, text: str) -> None:
        await super().finish(text)
        await self.service.answer_shown(self.conversation, self.place)


async def test_two_regenerations_of_one_answer_at_once_write_one_answer(
    make_service, redis_client, store, conversation
):
    """A double click whose presses both find the conversation free and ending with the
    answer pressed: the first is taken, and the second is refused (so its presser hears
    it), not taken and then dropped in silence."""
    async with make_service() as (service, batcher):
        answered = ShowingSink(service, conversation)
        await service.handle(turn(conversation, "Hello there"), answered)
        presses = {uuid.uuid4().hex: ShowingSink(service, conversation) for _ in range(2)}
        taken = await asyncio.gather(*(
            service.regenerate(conversation, place=answered.place, by="U1", request_id=request,
                               sink=sink)
            for request, sink in presses.items()
        ))  # fmt: skip
        for request in presses:
            await until(lambda request=request: gone(redis_client, f"test:{request}"))
    assert sorted(taken, key=str) == [None, replies.not_regenerable()]
    [regenerated] = [sink for sink in presses.values() if sink.events]
    [answer] = regenerated.kinds("finish")
    assert len(batcher.prompts) == 2
    assert await store.load(str(conversation)) == [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": answer},
    ]


async def test_a_regeneration_pressed_as_a_stop_begins_is_left_to_the_next_start(
    make_service, redis_client, store, conversation, monkeypatch
):
    """A stop began while the press was being taken: the regeneration is left, untouched,
    to the next start, where it began answering outside the drain, and was cut off with
    the old answer half replaced. A press once the stop has begun is told to come back."""
    async with make_service() as (service, batcher):
        answered = ShowingSink(service, conversation)
        await service.handle(turn(conversation, "Hello there"), answered)
        first_regeneration = store.first_regeneration

        async def as_the_stop_begins(*args: Any) -> bool:
            await service.drain(0)
            return await first_regeneration(*args)

        monkeypatch.setattr(store, "first_regeneration", as_the_stop_begins)
        request, pressed = uuid.uuid4().hex, ShowingSink(service, conversation)
        taken = await service.regenerate(
            conversation, place=answered.place, by="U1", request_id=request, sink=pressed
        )
        later = await service.regenerate(
            conversation, place=answered.place, by="U1", request_id=uuid.uuid4().hex,
            sink=ShowingSink(service, conversation),
        )  # fmt: skip
        record = await redis_client.hgetall(keys.turn(f"test:{request}"))
    assert taken is None and pressed.events == []  # the old answer, shown as it was
    assert later == replies.restarting_resend("press the button again")
    assert record["attempts"] == "0" and "regenerates" in record  # the next start's, whole
    assert len(batcher.prompts) == 1
    assert (await store.load(str(conversation)))[-1]["content"] == answered.kinds("finish")[0]


async def test_a_regeneration_storage_could_not_take_may_be_asked_again(
    make_service, store, conversation, monkeypatch
):
    """Redis fails as the regeneration is recorded, after its press was marked as the
    answer's one regeneration: the presser hears of the failure, and a press once Redis
    is back regenerates, where every later press was refused for the marker's 30 days."""
    async with make_service() as (service, batcher):
        answered = ShowingSink(service, conversation)
        await service.handle(turn(conversation, "Hello there"), answered)
        outage = Outage()
        monkeypatch.setattr(service.journal, "accept", outage.refusing(service.journal.accept))
        with pytest.raises(RedisConnectionError):
            await service.regenerate(conversation, place=answered.place, by="U1",
                                     request_id=uuid.uuid4().hex, sink=RecordingSink())  # fmt: skip
        outage.down = False
        again = ShowingSink(service, conversation)
        refusal = await service.regenerate(
            conversation, place=answered.place, by="U1", request_id=uuid.uuid4().hex, sink=again
        )

        async def regenerated() -> bool:
            return bool(again.kinds("finish"))

        await until(regenerated)
    assert refusal is None and len(batcher.prompts) == 2


async def test_a_regeneration_whose_process_died_before_it_was_recorded_may_be_asked_again(
    make_service, store, conversation, monkeypatch
):
    """The press is marked as the answer's one regeneration, and its process dies (kill
    -9, a cancel at shutdown) before the turn is recorded: another press is refused while
    the mark holds, then regenerates, where every press was refused for the history's
    30 days. Recorded, the mark holds as long as the history."""
    monkeypatch.setattr(storage.store, "REGENERATION_TAKING_S", 1)
    async with make_service() as (service, batcher):
        answered = ShowingSink(service, conversation)
        await service.handle(turn(conversation, "Hello there"), answered)
        recording = asyncio.Event()

        async def dies_recording(*args: Any, **kwargs: Any) -> None:
            recording.set()
            await asyncio.Event().wait()

        with monkeypatch.context() as patch:
            patch.setattr(service.journal, "accept", dies_recording)
            pressed = asyncio.create_task(service.regenerate(
                conversation, place=answered.place, by="U1", request_id=uuid.uuid4().hex,
                sink=RecordingSink(),
            ))  # fmt: skip
            await recording.wait()
            pressed.cancel()
        presses = [ShowingSink(service, conversation) for _ in range(2)]

        async def press(sink: ShowingSink) -> str | None:
            return await service.regenerate(
                conversation,
                place=answered.place,
                by="U1",
                request_id=uuid.uuid4().hex,
                sink=sink,
            )

        refused = await press(presses[0])
        await asyncio.sleep(1.1)
        taken = await press(presses[1])
        await until(lambda: asyncio.sleep(0, bool(presses[1].kinds("finish"))))
        marked = await store._redis.ttl(storage.store._regenerated(str(conversation),
                                                                   answered.place))  # fmt: skip
    assert refused == replies.not_regenerable() and taken is None
    assert len(batcher.prompts) == 2
    assert store.ttl_seconds - 60 < marked <= store.ttl_seconds  # kept, once recorded


async def test_a_regeneration_a_newer_turn_overtakes_is_refused_to_the_presser(
    make_service, store, conversation, monkeypatch
):
    """A message whose turn takes the conversation between the press and the regeneration
    taking it: the answer pressed is no longer the last, so the presser hears that it
    cannot be regenerated, where the press used to end in silence; and hears it once the
    press's own turn is ended, which a stop right after could otherwise catch unended and
    leave pending, saying "I'm restarting" where the old answer is."""
    async with make_service() as (service, batcher):
        answered = ShowingSink(service, conversation)
        await service.handle(turn(conversation, "Q1"), answered)
        newer = ShowingSink(service, conversation)
        accept = service.journal.accept

        async def accepted_as_a_message_comes(*args: Any, **options: Any) -> Any:
            pending = await accept(*args, **options)
            monkeypatch.undo()  # the message's own turn is accepted as usual
            await service.handle(turn(conversation, "Q2"), newer)
            return pending

        monkeypatch.setattr(service.journal, "accept", accepted_as_a_message_comes)
        press = ShowingSink(service, conversation)
        refusal = await service.regenerate(
            conversation, place=answered.place, by="U1", request_id=uuid.uuid4().hex, sink=press
        )
        assert await service.journal.count() == 0  # the refused press's turn is ended
    assert refusal == replies.not_regenerable()
    assert press.events == [] and len(batcher.prompts) == 2
    [old], [new] = answered.kinds("finish"), newer.kinds("finish")
    assert [m["content"] for m in await store.load(str(conversation))] == ["Q1", old, "Q2", new]


async def test_a_regeneration_is_held_to_the_users_rate_limit_as_a_message_is(
    make_service, store, conversation
):
    """Regenerate pressed over and over asks for a new answer each time: past
    RATE_LIMIT_PER_MINUTE the presser hears when to press again, and nothing is run."""
    presser = f"U{uuid.uuid4().hex}"  # a bucket of the test's own: Redis keeps them
    async with make_service(access=Access(rate_limit_per_minute=2)) as (service, batcher):
        answered = ShowingSink(service, conversation)
        asked = Turn(conversation, presser, "Hello there", uuid.uuid4().hex)
        await service.handle(asked, answered)
        for allowed in (True, False):
            press = ShowingSink(service, conversation)
            refusal = await service.regenerate(
                conversation, place=answered.place, by=presser, request_id=uuid.uuid4().hex,
                sink=press,
            )  # fmt: skip
            if allowed:
                assert refusal is None
                await until(lambda press=press: asyncio.sleep(0, bool(press.kinds("finish"))))
                answered = press
    assert refusal is not None and refusal.endswith(replies.PRESS_AGAIN)
    assert refusal.startswith("You're asking faster") and len(batcher.prompts) == 2


async def test_regenerations_pressed_at_once_are_held_to_the_pending_limit(
    make_service, conversation, monkeypatch
):
    """Two answers' Regenerate pressed together by a user with one answer left to their
    limit: the second press is asked to wait, where both read a count of none while the
    first was being recorded, and both ran."""
    other = ConversationKey("test", "team", "channel", uuid.uuid4().hex)
    recording, entered = asyncio.Event(), asyncio.Event()
    async with make_service(max_pending_per_user=1) as (service, _batcher):
        shown = {key: ShowingSink(service, key) for key in (conversation, other)}
        for key, sink in shown.items():
            await service.handle(turn(key, "Hello"), sink)
        accept = service.journal.accept

        async def slow_accept(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            await recording.wait()  # the second press comes meanwhile
            return await accept(*args, **kwargs)

        monkeypatch.setattr(service.journal, "accept", slow_accept)
        presses = {key: ShowingSink(service, key) for key in shown}

        def press(key: ConversationKey) -> asyncio.Task[str | None]:
            return asyncio.create_task(service.regenerate(
                key, place=shown[key].place, by="U1", request_id=uuid.uuid4().hex,
                sink=presses[key],
            ))  # fmt: skip

        first = press(conversation)
        await asyncio.wait_for(entered.wait(), timeout=10)
        second = press(other)
        await asyncio.sleep(0.1)
        recording.set()
        refusals = await asyncio.wait_for(asyncio.gather(first, second), timeout=30)
        await until(lambda: asyncio.sleep(0, bool(presses[conversation].kinds("finish"))))
    assert refusals == [None, replies.slow_down(1, replies.PRESS_AGAIN)]
    assert not presses[other].events


class SlowToFail(ShowingSink):
    """Telling the thread of a failure takes a platform call's time."""

    async def fail(self, text: str) -> None:
        await asyncio.sleep(0.5)
        await super().fail(text)


async def test_a_regenerated_answer_that_fails_is_back_before_the_next_turn_reads_it(
    make_service, make_batcher, store, conversation
):
    """The next message waits for the regeneration: once that fails, the old answer is
    back in the history, in its place, before the next turn reads it."""
    batcher = FailsOnceBatcher(make_batcher())
    batcher.failed = True  # the first answer goes through
    async with make_service(batcher) as (service, _batcher):
        answered = ShowingSink(service, conversation)
        await service.handle(turn(conversation, "Q1"), answered)
        [old] = answered.kinds("finish")
        batcher.failed = False  # the regeneration's first step falls over
        press = SlowToFail(service, conversation)
        assert not await service.regenerate(
            conversation, place=answered.place, by="U1", request_id=uuid.uuid4().hex, sink=press
        )
        await service.handle(turn(conversation, "Q2"), RecordingSink())
    assert batcher.prompts[-1] == [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": old},
        {"role": "user", "content": "Q2"},
    ]
    assert [m["content"] for m in await store.load(str(conversation))][:3] == ["Q1", old, "Q2"]
    assert press.kinds("fail")


# --- durable turns: resumed, given up, left pending by a drain ----------------------------


def process(redis: Redis, store: ConversationStore, platform: str, name: str) -> TurnJournal:
    """Another process's journal; it holds no lease unless the test renews one."""
    return TurnJournal(redis=redis, store=store, owner=f"{platform}-{name}", lease_seconds=2.0)


def on(platform: str, text: str = "a question", author: str = "U1") -> Turn:
    return Turn(ConversationKey(platform, "team", "channel", uuid.uuid4().hex), author, text,
                uuid.uuid4().hex)  # fmt: skip


class Rebuilder:
    """An adapter's sink factory: records the targets it is given, one sink for each."""

    def __init__(self) -> None:
        self.targets: list[dict] = []
        self.sinks: list[RecordingSink] = []

    def __call__(self, target: dict, stop: Callable[[], object]) -> RecordingSink:
        self.targets.append(target)
        self.sinks.append(RecordingSink())
        return self.sinks[-1]


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.02)


async def nothing_pending(journal: TurnJournal) -> bool:
    """Whether every turn accepted has ended, answered or not."""
    return not await journal.count()


async def gone(redis: Redis, turn_id: str) -> bool:
    return not await redis.exists(keys.turn(turn_id)) and (
        await redis.zscore(keys.PENDING_TURNS, turn_id) is None
    )


async def taken_by(redis: Redis, pending: PendingTurn, owner: str) -> bool:
    return await redis.hget(keys.turn(pending.id), "owner") == owner


async def test_a_resumed_answer_is_stopped_by_what_its_rebuilt_sink_was_given(
    make_service, make_batcher, redis_client, store, platform
):
    """A turn another process accepted, taken over here: the adapter rebuilding its sink
    gets what stops its answer (Slack's stop of a native stream calls it), as a new turn's
    sink does; it was given none, and a stop there went unheard."""
    pending = await process(redis_client, store, platform, "dead").accept(
        on(platform, "tell me everything"), {}
    )
    sinks: list[StopsAtFirstText] = []

    def rebuild(target: dict, stop: Callable[[], object]) -> StopsAtFirstText:
        sinks.append(StopsAtFirstText(stop))
        return sinks[-1]

    async with make_service(make_batcher(max_new_tokens=3000)) as (service, _batcher):
        service.serve_platform(platform, rebuild)
        await until(lambda: gone(redis_client, pending.id), timeout=30)
    [sink] = sinks
    assert sink.kinds("finish")[0].endswith(replies.stopped())


async def test_more_pending_turns_than_the_queue_takes_are_all_answered_on_resume(
    make_service, redis_client, store, platform
):
    """A restart finds more turns pending than QUEUE_MAX: each was told it would be
    answered, so none is told busy; they are taken over as the queue has room."""
    dead = process(redis_client, store, platform, "dead")
    ids = [(await dead.accept(on(platform, f"question {i}", f"U{i}"), {})).id for i in range(5)]
    rebuild = Rebuilder()
    async with make_service(queue_max=2) as (service, batcher):
        service.serve_platform(platform, rebuild)
        for turn_id in ids:
            await until(lambda turn_id=turn_id: gone(redis_client, turn_id), timeout=30)
    assert len(batcher.prompts) == 5
    assert all(sink.kinds("fail") == [] and sink.kinds("finish") for sink in rebuild.sinks)


async def test_a_gateway_takes_over_turns_while_more_answers_run_than_queue_max(
    make_service, make_batcher, redis_client, store, journal, platform, streams
):
    """A gateway's queue counts the jobs running on the workers, which QUEUE_MAX does not
    bound (their rows do): past QUEUE_MAX of them, it took over no pending turn (a dead
    gateway's, or one left for later) until the load fell, though it took new messages."""
    dead = process(redis_client, store, platform, "dead")
    pending = await dead.accept(on(platform), {})
    assert pending is not None
    gated = GatedBatcher(make_batcher())
    hello = [{"role": "user", "content": "hello"}]
    async with (
        InferenceQueue(batcher=gated, max_size=8, timeout=60) as local,
        JobQueue(redis=streams, gateway=f"{platform}-gw", max_size=2, timeout=60) as jobs,
        make_service(inference=jobs) as (service, _batcher),
    ):
        working = Worker(redis=streams, inference=local, name=f"{platform}-w", rows=8,
                         claim_idle_s=60, max_deliveries=3)  # fmt: skip
        run = asyncio.create_task(working.run())
        try:
            running = []
            for n in range(3):  # two at most wait for a worker
                running.append(jobs.submit(hello, user=f"U{n}", conversation=f"c{n}"))
                await until(lambda n=n: asyncio.sleep(0, (jobs.depth, jobs.room) == (n + 1, 2)))
            service.serve_platform(platform, Rebuilder())
            await until(lambda: taken_by(redis_client, pending, journal.owner))
            gated.gate.set()
            for generation in running:
                await asyncio.wait_for(read_all(generation), timeout=30)
            await until(lambda: gone(redis_client, pending.id), timeout=30)
        finally:
            working.stop()
            await run
            await working.finish(0)


async def read_all(generation: Any) -> list[str]:
    return [chunk async for chunk in generation]


class FillsTheQueueAsItStarts(RecordingSink):
    """A new message takes the queue's room between a turn's claim and its request."""

    def __init__(self, queue: Any) -> None:
        super().__init__()
        self.queue = queue
        self.held: list = []

    async def start(self) -> None:
        await super().start()
        if not self.held:  # once: the turn's next try finds room
            message = [{"role": "user", "content": "hi"}]
            self.held.append(self.queue.submit(message, user="U9", conversation="another"))


@pytest.mark.parametrize("left_by", ["a clean stop", "a crash"])
async def test_a_turn_taken_up_that_finds_the_queue_full_waits_for_room(
    make_service, make_batcher, redis_client, store, platform, left_by
):
    """Told at the stop that it would be answered (or owed it after a crash): never told
    busy, though a clean stop gave back its try, so it is on its first once taken up."""
    dead = process(redis_client, store, platform, "dead")
    pending = await dead.accept(on(platform), {})
    if left_by == "a clean stop":
        await dead.release(pending)
    gated = GatedBatcher(make_batcher())
    async with make_service(gated, queue_max=1) as (service, _batcher):
        filling = FillsTheQueueAsItStarts(service.queue)
        service.serve_platform(platform, lambda target, stop: filling)
        await until(lambda: asyncio.sleep(0, filling.kinds("pause") or filling.kinds("fail")))
        told = filling.events[:]
        gated.gate.set()
        await until(lambda: gone(redis_client, pending.id), timeout=30)
    assert ("pause", replies.waiting_for_room()) in told and not filling.kinds("fail")
    assert filling.kinds("finish")


class Outage:
    """Redis refusing the calls put on it (`refusing`) while `down`."""

    def __init__(self) -> None:
        self.down = True

    def refusing(self, call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def during_the_outage(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise RedisConnectionError("Connection refused")
            return await call(*args, **kwargs)

        return during_the_outage


async def test_a_message_refused_in_an_outage_but_recorded_is_dropped_by_a_stopping_pass(
    make_service, journal, redis_client, platform, monkeypatch
):
    """Its record landed, but the reply was lost, and its user was told to send it again;
    a stop began before a claim pass found it: the next process answered it, beside the
    copy its user sent again."""
    transaction, calls = journal._transaction, []

    async def reply_lost(*args: Any, **kwargs: Any) -> Any:
        result = await transaction(*args, **kwargs)
        calls.append(args)
        if len(calls) == 1:  # the acceptance's
            raise RedisConnectionError("Connection reset by peer")
        return result

    monkeypatch.setattr(journal, "_transaction", reply_lost)
    message, sink = on(platform), RecordingSink()
    async with make_service() as (service, _batcher):
        await service.handle(message, sink)
        assert sink.events == [("fail", replies.storage_unavailable())]
        assert await journal.is_pending(message.id)
        await service.drain(0)
        service.stop()  # as `threadbot run` stops: its last pass drops it
        await until(lambda: gone(redis_client, message.id))


async def test_after_an_outage_a_live_processs_turn_is_left_to_it_for_a_lease(
    make_service, journal, redis_client, store, platform, monkeypatch
):
    """Redis let every lease lapse in an outage: the first pass once it was back took the
    turn another live process was answering (a pass fails at its first read, the team's
    reloads, before it renews the lease). Left to it for a lease; taken once it renews
    no more, as from a process gone."""
    elsewhere = TurnJournal(
        redis=redis_client, store=store, owner=f"test-{uuid.uuid4().hex}", lease_seconds=2.0
    )
    pending = await elsewhere.accept(on(platform), {})  # its lease lapsed in the outage
    assert pending is not None
    outage = Outage()
    async with make_service() as (service, _batcher):
        monkeypatch.setattr(service.reloads, "count", outage.refusing(service.reloads.count))
        service.serve_platform(platform, Rebuilder())
        await asyncio.sleep(journal.lease_seconds)  # passes fail
        outage.down = False
        await asyncio.sleep(journal.lease_seconds * 0.75)  # passes succeed
        assert await taken_by(redis_client, pending, elsewhere.owner)
        await until(lambda: gone(redis_client, pending.id), timeout=30)  # then answered here


class PassesAsItPauses(RecordingSink):
    """A resume pass (`resume`, once) falls due while the thread is told the turn waits."""

    resume: Callable[[], Awaitable[None]] | None = None

    async def pause(self, text: str) -> None:
        await super().pause(text)
        if self.resume is not None:
            resume, self.resume = self.resume, None
            await resume()


@pytest.mark.parametrize("pass_meanwhile", [False, True], ids=["after", "while-it-pauses"])
async def test_storage_lost_under_an_answer_costs_the_turn_no_try(
    make_service, journal, redis_client, platform, monkeypatch, pass_meanwhile
):
    """Redis goes away as the turn is begun, and with it the release of this try: once it
    is back, the turn is taken up again as the same try (an outage is no crash), where
    it counted one, and with TURN_MAX_ATTEMPTS=1 the user heard it was given up. So too
    where a resume pass claims it before its release was tried (under load, it did)."""
    outage = Outage()
    for name in ("begin", "release"):
        monkeypatch.setattr(journal, name, outage.refusing(getattr(journal, name)))
    message, sink = on(platform), PassesAsItPauses()
    async with make_service(max_attempts=1) as (service, _batcher):
        service.serve_platform(platform, Rebuilder())
        if pass_meanwhile:
            sink.resume = service.resume
        await service.handle(message, sink)
        assert sink.kinds("pause")[0] == replies.storage_lost()
        outage.down = False
        await until(lambda: gone(redis_client, f"{platform}:{message.message_id}"), timeout=30)
    assert sink.kinds("finish") and not sink.kinds("fail"), sink.events


@pytest.mark.parametrize("flaps", [False, True], ids=["back", "back, out, back"])
async def test_an_answer_stopped_while_storage_is_out_is_delivered_once_it_is_back(
    make_service, make_batcher, journal, redis_client, platform, monkeypatch, flaps
):
    """The asker pressed Stop while Redis was out, and the stopped answer could not be
    saved: once Redis is back, that answer is delivered, where a whole new one was
    written (the Stop undone); so too where Redis goes out again as it is stored."""
    outage = Outage()
    monkeypatch.setattr(journal, "save", outage.refusing(journal.save))
    finish, finishes = journal.finish, []

    async def flapping(*args: Any, **kwargs: Any) -> bool:
        finishes.append(args)
        if flaps and len(finishes) == 1:
            raise RedisConnectionError("Connection refused")
        return await finish(*args, **kwargs)

    monkeypatch.setattr(journal, "finish", flapping)
    message = on(platform, "tell me everything")
    spy = SpyBatcher(make_batcher(max_new_tokens=3000))
    async with make_service(spy) as (service, _batcher):
        service.serve_platform(platform, Rebuilder())
        sink = StopsAtFirstText(lambda: service.stop_answer(message.id, by=message.author))
        await service.handle(message, sink)
        assert sink.kinds("pause") == [replies.storage_lost()]
        outage.down = False
        await until(lambda: gone(redis_client, message.id), timeout=30)
    [answer] = set(sink.kinds("finish"))  # shown again where storing it failed: the same
    assert answer.endswith(replies.stopped()) and len(spy.prompts) == 1
    assert (await service.store.load(message.conversation))[-1]["content"] == answer


async def test_storage_back_as_the_thread_is_told_takes_back_no_counted_try(
    make_service, make_batcher, journal, redis_client, platform, monkeypatch
):
    """Redis goes away as the turn is begun, and is back while the thread is told that it
    waits, as a resume pass falls due: the pass took the turn up again (uncounted, this
    try owed back), and the try given back after the telling then counted the new one
    down: each such outage gave the turn one more try than TURN_MAX_ATTEMPTS."""
    outage = Outage()
    monkeypatch.setattr(journal, "begin", outage.refusing(journal.begin))
    message, sink, gated = on(platform), PassesAsItPauses(), GatedBatcher(make_batcher())
    async with make_service(gated) as (service, _batcher):
        service.serve_platform(platform, Rebuilder())

        async def back_and_a_pass() -> None:
            outage.down = False
            await service.resume()

        sink.resume = back_and_a_pass
        await service.handle(message, sink)
        assert sink.kinds("pause")[0] == replies.storage_lost()
        await until(lambda: asyncio.sleep(0, service.queue.depth > 0))  # the next try runs
        await asyncio.sleep(0.5)  # and whatever the first did after its telling is over
        tries = int(
            await redis_client.hget(keys.turn(f"{platform}:{message.message_id}"), "attempts")
        )
        gated.gate.set()
        await until(lambda: gone(redis_client, f"{platform}:{message.message_id}"), timeout=30)
    assert tries == 1  # the first try given back, the next counted: one


async def test_a_turn_orphaned_while_a_pass_claims_it_costs_no_try(
    make_service, journal, redis_client, platform, monkeypatch
):
    """A resume pass reaches the running turn (ours, not to take) and waits on Redis;
    meanwhile storage fails the turn, which is orphaned, to be taken up uncounted. The
    pass, going on, takes it as the same try, where it had decided to count one before."""
    message, sink = on(platform), RecordingSink()
    ours = f"{platform}:{message.message_id}"
    parked, gate, outage = asyncio.Event(), asyncio.Event(), Outage()
    claim_one, begin = journal._claim, outage.refusing(journal.begin)

    async def parks_on_ours(turn_id: str, *args: Any, **kwargs: Any) -> Any:
        if turn_id == ours and not parked.is_set():
            parked.set()
            await gate.wait()
        return await claim_one(turn_id, *args, **kwargs)

    async def begins_once_parked(*args: Any, **kwargs: Any) -> Any:
        await parked.wait()
        return await begin(*args, **kwargs)

    monkeypatch.setattr(journal, "_claim", parks_on_ours)
    monkeypatch.setattr(journal, "begin", begins_once_parked)
    monkeypatch.setattr(journal, "release", outage.refusing(journal.release))
    async with make_service(max_attempts=1) as (service, _batcher):
        service.serve_platform(platform, Rebuilder())
        assert await service.accept(message, sink) is not None
        passing = asyncio.create_task(service.resume())
        await until(lambda: asyncio.sleep(0, bool(sink.kinds("pause"))))
        outage.down = False
        gate.set()
        await passing
        await until(lambda: gone(redis_client, ours), timeout=30)
    assert sink.kinds("finish") and not sink.kinds("fail"), sink.events


async def test_an_orphaned_turn_another_process_finished_is_let_go_of(
    make_service, journal, redis_client, store, platform, monkeypatch
):
    """Storage fails a turn, which is orphaned (its sink kept, to take it up again), and
    the outage outlasts this process's lease: another process takes the turn up and
    finishes it. Once storage is back, this one lets go of it; it kept the sink forever."""
    outage = Outage()
    for name in ("begin", "release", "renew_lease"):
        monkeypatch.setattr(journal, name, outage.refusing(getattr(journal, name)))
    message, sink = on(platform), RecordingSink()
    async with make_service() as (service, _batcher):
        await service.handle(message, sink)  # (no scope served: this one claims none)
        assert sink.kinds("pause") == [replies.storage_lost()]
        await redis_client.delete(keys.owner(journal.owner))  # its lease lapses
        other = process(redis_client, store, platform, "other")
        [taken] = await other.claim([platform])
        await other.finish(taken, "answered there")
        outage.down = False
        await until(lambda: asyncio.sleep(0, not service._orphaned), timeout=10)
    assert not service._release_owed


async def stored_then_crashed(redis: Redis, store: ConversationStore, platform: str) -> PendingTurn:
    """A turn another process stored in the history and died with, its lease still on."""
    crashed = process(redis, store, platform, "crashed")
    pending = await crashed.accept(on(platform, "first question"), {})
    assert pending is not None and await crashed.begin(pending)
    await crashed.renew_lease()
    return pending


async def test_a_stored_turn_resumed_after_later_turns_is_asked_again_at_the_end(
    make_service, redis_client, store, platform
):
    """The asker went on while its process was dead: the later message was answered
    (its prompt had the first one too). The first is answered once its process's lease
    lapses, asked again after what came, as the thread shows it."""
    pending = await stored_then_crashed(redis_client, store, platform)
    later = dataclasses.replace(pending.turn, text="second question", message_id="m2")
    async with make_service() as (service, batcher):
        service.serve_platform(platform, Rebuilder())
        await service.handle(later, RecordingSink())
        await until(lambda: gone(redis_client, pending.id), timeout=15)
    history = await store.load(pending.conversation)
    [second_answer, first_answer] = [m for m in history if m["role"] == "assistant"]
    assert batcher.prompts == [
        [{"role": "user", "content": "first question"},
         {"role": "user", "content": "second question"}],
        [{"role": "user", "content": "first question"},
         {"role": "user", "content": "second question"},
         second_answer,
         {"role": "user", "content": "first question"}],
    ]  # fmt: skip
    assert first_answer["content"] and second_answer["content"]
    # Stored as asked: the question again, before its answer (no two answers in a row).
    assert history == [*batcher.prompts[1], first_answer]


async def test_a_stored_turn_resumed_after_a_reset_is_asked_anew(
    make_service, redis_client, store, platform
):
    pending = await stored_then_crashed(redis_client, store, platform)
    reset = dataclasses.replace(pending.turn, text="reset", message_id="m2", command="reset")
    rebuild = Rebuilder()
    async with make_service() as (service, batcher):
        await service.handle(reset, RecordingSink())
        service.serve_platform(platform, rebuild)
        await until(lambda: gone(redis_client, pending.id), timeout=15)
    assert batcher.prompts == [[{"role": "user", "content": "first question"}]]
    [sink] = rebuild.sinks
    assert sink.kinds("finish") and not sink.kinds("fail")
    [answer] = sink.kinds("finish")
    assert await store.load(pending.conversation) == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": answer},
    ]  # the question the reset took, stored again before its answer


OLD_EXCHANGE = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Red."},
]
"""The conversation `regeneration_left_by_a_crash` leaves: the exchange it regenerates."""


async def regeneration_left_by_a_crash(
    redis: Redis, store: ConversationStore, platform: str, *, taken_back: bool
) -> PendingTurn:
    """A conversation of one exchange whose answer's Regenerate was pressed in a process
    that died: after it accepted the regeneration, or once it had taken the answer back."""
    question = on(platform, OLD_EXCHANGE[0]["content"])
    conversation, place = str(question.conversation), {"answer": uuid.uuid4().hex}
    await store.append(conversation, *OLD_EXCHANGE)
    await store.set_answer_place(conversation, place)
    crashed = process(redis, store, platform, "crashed")
    pending = await crashed.accept(question, {}, regenerates=place)
    assert pending is not None
    if taken_back:
        assert await crashed.take_back(pending, "Red.")
        assert await store.load(conversation) == []
    return pending


async def test_a_regeneration_resumed_before_its_take_back_stores_the_question_once(
    make_service, redis_client, store, platform
):
    """Taken up after the crash, it takes the old answer back first, as the thread shows
    the new answer in its place; it was answered as a new turn, the question stored twice
    and the old answer left in the history."""
    pending = await regeneration_left_by_a_crash(redis_client, store, platform, taken_back=False)
    rebuild = Rebuilder()
    async with make_service() as (service, _batcher):
        service.serve_platform(platform, rebuild)
        await until(lambda: gone(redis_client, pending.id), timeout=30)
    [sink] = rebuild.sinks
    [answer] = sink.kinds("finish")
    assert await store.load(pending.conversation) == [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": answer},
    ]


class RaisingLock:
    """Taking the conversation's lock fails, as nothing in Redis's reply could explain."""

    @contextlib.asynccontextmanager
    async def hold(self, conversation: str) -> AsyncIterator[None]:
        raise RuntimeError("injected: the lock could not be taken")
        yield


@pytest.mark.parametrize("fails", ["in the model", "before it takes the conversation"])
async def test_a_regeneration_that_fails_after_a_crash_puts_the_old_answer_back(
    make_service, make_batcher, redis_client, store, platform, monkeypatch, fails
):
    """The old answer was taken back from the history, and held in memory only: the new
    answer failing in the next process lost it, and its message showed the apology; and
    where it failed before the take-back was done again there, it lost it still."""
    pending = await regeneration_left_by_a_crash(redis_client, store, platform, taken_back=True)
    rebuild = Rebuilder()
    batcher = FailsOnceBatcher(make_batcher()) if fails == "in the model" else None
    async with make_service(batcher) as (service, _batcher):
        if fails == "before it takes the conversation":
            monkeypatch.setattr(service, "locks", RaisingLock())
        service.serve_platform(platform, rebuild)
        await until(lambda: gone(redis_client, pending.id), timeout=30)
    [sink] = rebuild.sinks
    assert sink.kinds("fail") == [replies.answer_kept("Red.", replies.failed())]
    assert await store.load(pending.conversation) == OLD_EXCHANGE


async def test_a_regeneration_that_fails_before_its_take_back_shows_the_old_answer_again(
    make_service, store, conversation, monkeypatch
):
    """The old answer was never taken out of the history: it is shown again with why, as
    after a failed new answer, and not stored twice; its message showed the apology alone."""
    async with make_service() as (service, batcher):
        answered = ShowingSink(service, conversation)
        await service.handle(turn(conversation, "Q1"), answered)
        [old] = answered.kinds("finish")

        async def unreadable(*_args: Any) -> bool:
            raise RuntimeError("injected: the history could not be read")

        monkeypatch.setattr(service.journal, "take_back", unreadable)
        press = ShowingSink(service, conversation)
        refusal = await service.regenerate(
            conversation, place=answered.place, by="U1", request_id=uuid.uuid4().hex, sink=press
        )
        await until(lambda: asyncio.sleep(0, bool(press.events)))
    assert refusal is None and len(batcher.prompts) == 1
    assert press.events == [("fail", replies.answer_kept(old, replies.failed()))]
    assert [m["content"] for m in await store.load(str(conversation))] == ["Q1", old]


class Gone(ShowingSink):
    """Its place was deleted meanwhile (the answer's message, say): it takes no answer."""

    async def finish(self, text: str) -> None:
        raise NowhereToAnswer("its message was deleted")


async def test_a_regenerated_answer_with_nowhere_to_go_puts_the_old_one_back(
    make_service, redis_client, store, conversation
):
    """The new answer was written, but its message is gone: the old answer, taken out of
    the history for it, goes back, where the turn ended with the question alone."""
    async with make_service() as (service, batcher):
        answered = ShowingSink(service, conversation)
        await service.handle(turn(conversation, "Q1"), answered)
        [old] = answered.kinds("finish")
        request = uuid.uuid4().hex
        refusal = await service.regenerate(
            conversation, place=answered.place, by="U1", request_id=request,
            sink=Gone(service, conversation),
        )  # fmt: skip
        await until(lambda: gone(redis_client, f"test:{request}"))
    assert refusal is None and len(batcher.prompts) == 2
    assert [m["content"] for m in await store.load(str(conversation))] == ["Q1", old]


class NeverShown(ShowingSink):
    """A thread the platform fails every answer in (a 503 each time)."""

    async def finish(self, text: str) -> None:
        await RecordingSink.finish(self, text)
        raise RuntimeError("internal_error (HTTP 503)")


async def test_a_regeneration_that_ends_unshown_keeps_no_old_answer_in_the_process(
    make_service, redis_client, store, conversation
):
    """Past its last try its new answer is stored, unshown: the old answer it took back
    stayed in the process's memory for good (each such regeneration, an answer more)."""
    async with make_service(max_attempts=2) as (service, batcher):
        service.serve_platform(conversation.platform, Rebuilder())
        answered = ShowingSink(service, conversation)
        await service.handle(turn(conversation, "Q1"), answered)
        request, press = uuid.uuid4().hex, NeverShown(service, conversation)
        refusal = await service.regenerate(
            conversation, place=answered.place, by="U1", request_id=request, sink=press
        )
        await until(lambda: gone(redis_client, f"test:{request}"), timeout=30)
        assert refusal is None and len(press.kinds("finish")) == 2
        # Let go as its task ends, a step after its record goes: not at once, never.
        await until(lambda: asyncio.sleep(0, service._taken_back == {}))
    assert len(batcher.prompts) == 2
    assert [m["content"] for m in await store.load(str(conversation))] == [
        "Q1", press.kinds("finish")[0],
    ]  # fmt: skip


async def test_a_regeneration_stopped_before_its_take_back_leaves_the_old_answer_shown(
    make_service, redis_client, store, conversation, monkeypatch
):
    """A redeploy drains it while it waits for the conversation: its old answer, still the
    stored one, stays shown as it is, where it said "I'm restarting", which the next
    start would not replace if the conversation moved on meanwhile."""
    async with make_service() as (service, _batcher), contextlib.AsyncExitStack() as held:
        answered = ShowingSink(service, conversation)
        await service.handle(turn(conversation, "Q1"), answered)
        accept, taken = service.journal.accept, asyncio.Event()

        async def accepted_as_a_turn_takes_the_conversation(*args: Any, **options: Any) -> Any:
            pending = await accept(*args, **options)
            hold = ConversationLocks(redis=redis_client).hold(str(conversation))
            await held.enter_async_context(hold)
            taken.set()
            return pending

        monkeypatch.setattr(service.journal, "accept", accepted_as_a_turn_takes_the_conversation)
        press = ShowingSink(service, conversation)
        pressing = asyncio.create_task(service.regenerate(
            conversation, place=answered.place, by="U1", request_id=uuid.uuid4().hex, sink=press
        ))  # fmt: skip
        await taken.wait()
        assert await service.drain(0.2) == 1
        assert await pressing is None
    assert press.events == []
    assert len(await store.load(str(conversation))) == 2


async def test_a_regeneration_whose_thread_cannot_be_reached_puts_the_old_answer_back(
    make_service, redis_client, store, platform
):
    """Its saved target cannot be rebuilt (saved by an older version): the turn is dropped,
    and the old answer, which its record alone held, goes back into the history, once the
    conversation's turn under way (another process's) is over, not into its midst."""
    pending = await regeneration_left_by_a_crash(redis_client, store, platform, taken_back=True)

    def unreachable(target: dict, stop: Callable[[], object]) -> RecordingSink:
        raise KeyError("channel")

    async with make_service() as (service, batcher):
        async with ConversationLocks(redis=redis_client).hold(pending.conversation):
            service.serve_platform(platform, unreachable)
            await until(lambda: taken_by(redis_client, pending, service.journal.owner))
            await asyncio.sleep(0.3)  # time enough to write the history, were it free
            assert await store.load(pending.conversation) == []
        await until(lambda: gone(redis_client, pending.id), timeout=30)
    assert batcher.prompts == []
    assert await store.load(pending.conversation) == OLD_EXCHANGE


async def test_a_regeneration_told_it_failed_before_its_take_back_keeps_the_answer_on_resume(
    make_service, redis_client, store, platform
):
    """It failed before it took the old answer back, told the thread so (the old answer
    again, with why), and the process died before it closed the turn: the next one closes
    it as told, where it took the answer out of the history first, and lost it."""
    pending = await regeneration_left_by_a_crash(redis_client, store, platform, taken_back=False)
    told = replies.answer_kept("Red.", replies.failed())
    assert await process(redis_client, store, platform, "crashed").save(pending, failure=told)
    rebuild = Rebuilder()
    async with make_service() as (service, batcher):
        service.serve_platform(platform, rebuild)
        await until(lambda: gone(redis_client, pending.id), timeout=30)
    [sink] = rebuild.sinks
    assert sink.kinds("fail") == [told] and batcher.prompts == []
    assert await store.load(pending.conversation) == OLD_EXCHANGE


async def test_a_saved_answer_is_delivered_on_resume_without_generating(
    make_service, redis_client, store, platform
):
    crashed = process(redis_client, store, platform, "crashed")
    target = {"thread": "T1", "messages": ["M1"]}
    pending = await crashed.accept(on(platform, "a question"), target)
    assert pending is not None
    started = await crashed.begin(pending)
    assert started is not None
    assert await crashed.save(started, answer="the answer it had generated")
    rebuild = Rebuilder()
    # The resume is attempt 2, past max_attempts: delivering the answer generates nothing.
    async with make_service(max_attempts=1) as (service, batcher):
        service.serve_platform(platform, rebuild)
        await until(lambda: gone(redis_client, pending.id))
    assert rebuild.targets == [target]
    [sink] = rebuild.sinks
    assert sink.events == [("finish", "the answer it had generated")]
    assert batcher.prompts == []
    assert await store.load(pending.conversation) == [
        {"role": "user", "content": "a question"},
        {"role": "assistant", "content": "the answer it had generated"},
    ]


async def test_a_turn_past_its_attempts_is_given_up_and_removed(
    make_service, redis_client, store, platform
):
    pending = await process(redis_client, store, platform, "first").accept(on(platform), {})
    assert pending is not None
    for name in ("second", "third"):  # each claimed it and died: attempts 2, then 3
        [claimed] = await process(redis_client, store, platform, name).claim(
            [platform], orphaned=()
        )
    assert claimed.attempts == 3
    rebuild = Rebuilder()
    async with make_service(max_attempts=3) as (service, batcher):
        service.serve_platform(platform, rebuild)  # its claim is attempt 4
        await until(lambda: gone(redis_client, pending.id))
    [sink] = rebuild.sinks
    assert sink.events == [("fail", replies.gave_up(3))]
    assert batcher.prompts == []
    assert await store.load(pending.conversation) == []


async def test_drain_leaves_a_running_turn_pending_without_counting_the_try(
    make_service, make_batcher, redis_client, store, journal, platform
):
    gated = GatedBatcher(make_batcher())
    sink = RecordingSink()
    async with make_service(gated) as (service, _batcher):
        try:
            message = on(platform, "a question")
            task = await service.accept(message, sink)
            assert task is not None

            async def generating() -> bool:
                return bool(gated.prompts)

            await until(generating)
            assert await service.drain(0.2) == 1
            assert task.cancelled()
            assert not await gone(redis_client, f"{platform}:{message.message_id}")
            await journal.drop_lease()  # as `threadbot run` does after the drain
            [next_start] = await process(redis_client, store, platform, "next").claim(
                [platform], orphaned=()
            )
        finally:
            gated.gate.set()
    assert sink.kinds("pause") == [replies.restarting()]
    assert sink.kinds("finish") == sink.kinds("fail") == []
    assert gated.answers == []
    assert next_start.attempts == 1  # the drained try was given back
    assert next_start.stored  # its message is in the history already
    assert next_start.answer is None
    assert await store.load(next_start.conversation) == [{"role": "user", "content": "a question"}]


async def test_a_fifth_unanswered_turn_is_refused_until_the_first_four_are_answered(
    make_service, make_batcher, platform
):
    gated = GatedBatcher(make_batcher())
    async with make_service(gated) as (service, _batcher):  # max_pending_per_user=4
        try:
            sinks = [RecordingSink() for _ in range(6)]
            tasks = [await service.accept(on(platform, f"q{i}"), sinks[i]) for i in range(4)]
            assert all(tasks)  # counted as accepted, before any answer started
            await service.handle(on(platform, "one too many"), sinks[4])
            assert sinks[4].events == [("finish", replies.slow_down(4))]
        finally:
            gated.gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        await service.handle(on(platform, "and now?"), sinks[5])
    assert all(sink.kinds("finish") for sink in sinks[:4])
    [answer] = sinks[5].kinds("finish")
    assert answer != replies.slow_down(4)


async def test_a_command_marked_seen_as_a_stop_begins_asks_to_be_sent_again(
    make_service, store, conversation, monkeypatch
):
    """The stop began while the command was marked seen: the drain did not know of it, and
    its grace did not wait for it; cut off at the end, it was never answered."""
    first_seen, draining = store.first_seen, []

    async def stop_meanwhile(*args: Any) -> bool:
        seen = await first_seen(*args)
        draining.append(asyncio.create_task(service.drain(5)))  # a SIGTERM, now
        await asyncio.sleep(0)
        return seen

    sink = RecordingSink()
    async with make_service() as (service, _batcher):
        monkeypatch.setattr(service.store, "first_seen", stop_meanwhile)
        command = Turn(conversation, "U1", "help", uuid.uuid4().hex, command="help")
        assert await service.accept(command, sink) is None
        await asyncio.gather(*draining)
    assert sink.events == [("fail", replies.restarting_resend())]


async def test_a_reset_waiting_behind_an_answer_at_a_stop_is_left_for_the_next_start(
    make_service, make_batcher, redis_client, store, conversation
):
    """A reset waits for the answer being written; a stop's grace runs out first. It was
    marked seen as it was taken, and lost: its sender heard to send it again, where a
    crash lost it without a word. Taken as a message is, it stays pending, told so."""
    gated = GatedBatcher(make_batcher())
    answer, reset = RecordingSink(), RecordingSink()
    async with make_service(gated) as (service, _batcher):
        try:
            await store.append(str(conversation), {"role": "user", "content": "before"})
            await service.accept(turn(conversation, "hello"), answer)
            await until(lambda: asyncio.sleep(0, bool(gated.prompts)))
            command = Turn(conversation, "U1", "reset", uuid.uuid4().hex, command="reset")
            await service.accept(command, reset)
            await service.drain(0.2)
            record = await redis_client.hgetall(keys.turn(command.id))
        finally:
            gated.gate.set()
    assert reset.events == [("pause", replies.restarting())]
    assert json.loads(record["turn"])["command"] == "reset" and "answer" not in record
    assert len(await store.load(str(conversation))) == 2  # not carried out, nor lost


async def test_a_reset_a_dead_process_took_is_carried_out_here_once(
    make_service, redis_client, store, platform
):
    """Taken by a process that died before it held the conversation's lock: this one
    carries it out, and its sender hears so, where the sender used to hear nothing (its
    message marked seen) and the history went on."""
    dead = process(redis_client, store, platform, "dead")
    asked = on(platform, "a question")
    await store.append(str(asked.conversation), {"role": "user", "content": "before"})
    command = replace(asked, text="reset", message_id=uuid.uuid4().hex, command="reset")
    pending = await dead.accept(command, {"thread": "T1"})
    assert pending is not None
    rebuild = Rebuilder()
    async with make_service() as (service, batcher):
        service.serve_platform(platform, rebuild)
        await until(lambda: gone(redis_client, pending.id), timeout=30)
    [sink] = rebuild.sinks
    assert rebuild.targets == [{"thread": "T1"}]
    assert sink.events == [("finish", replies.conversation_reset())]
    assert await store.load(str(asked.conversation)) == [] and batcher.prompts == []
    assert await store.cut(str(asked.conversation)) == (pending.accepted_at, command.message_id)


async def test_a_reset_carried_out_before_a_crash_is_only_shown_after_it(
    make_service, redis_client, store, platform
):
    """The process died between the reset and its reply: the next one shows the reply
    saved with it, and empties the history no more (a message since stays)."""
    dead = process(redis_client, store, platform, "dead")
    asked = on(platform, "a question")
    conversation = str(asked.conversation)
    await store.append(conversation, {"role": "user", "content": "before"})
    command = replace(asked, text="reset", message_id=uuid.uuid4().hex, command="reset")
    pending = await dead.accept(command, {})
    assert pending is not None
    assert await dead.reset(pending, replies.conversation_reset()) is not None
    after = {"role": "user", "content": "after"}
    await store.append(conversation, after)
    rebuild = Rebuilder()
    async with make_service() as (service, _batcher):
        service.serve_platform(platform, rebuild)
        await until(lambda: gone(redis_client, pending.id), timeout=30)
    assert rebuild.sinks[0].events == [("finish", replies.conversation_reset())]
    assert await store.load(conversation) == [after]


async def test_forget_deletes_the_conversation_and_reset_keeps_it_known(
    make_service, store, conversation
):
    async with make_service() as (service, _batcher):
        await service.handle(turn(conversation, "remember me"), RecordingSink())
        await service.handle(replace(turn(conversation, "reset"), command="reset"), RecordingSink())
        assert await service.knows(conversation)  # the bot still answers there unasked
        await service.handle(turn(conversation, "again"), RecordingSink())
        sink = RecordingSink()
        await service.handle(replace(turn(conversation, "forget"), command="forget"), sink)
        assert not await service.knows(conversation)
    assert sink.events == [("finish", replies.forgotten())]
    assert await store.load(str(conversation)) == []


async def test_the_lease_is_kept_while_a_drain_waits(
    make_service, make_batcher, redis_client, store, journal, platform
):
    """Otherwise another process would take over an answer still finishing in the grace
    period, and both would answer it."""
    gated = GatedBatcher(make_batcher())
    async with make_service(gated) as (service, _batcher):
        try:
            task = await service.accept(on(platform), RecordingSink())
            assert task is not None
            draining = asyncio.create_task(service.drain(3 * journal.lease_seconds))
            await asyncio.sleep(2 * journal.lease_seconds)  # the lease would have lapsed
            other = process(redis_client, store, platform, "other")
            assert await other.claim([platform]) == []
        finally:
            gated.gate.set()
        assert await draining == 0  # answered within the grace
    assert task.done() and not task.cancelled()


class RefusingSink(RecordingSink):
    """A thread the platform no longer lets us write to (deleted, archived, bot removed),
    as the adapters report it."""

    async def fail(self, text: str) -> None:
        raise NowhereToAnswer("its channel is no more: Slack said channel_not_found")


async def test_a_turn_told_it_failed_is_not_answered_after_storage_comes_back(
    make_service, make_batcher, journal, redis_client, store, platform, monkeypatch
):
    """Told "something went wrong, try again", then Redis blinked as the turn closed: taken
    up again, it is closed as told, where it was answered all the same (and a user who had
    sent the message again got two answers)."""

    finish = journal.finish

    async def blinks_once(*args: Any) -> bool:
        monkeypatch.setattr(journal, "finish", finish)
        raise RedisConnectionError("Connection reset by peer")

    monkeypatch.setattr(journal, "finish", blinks_once)
    message, sink = on(platform), RecordingSink()
    async with make_service(FailsOnceBatcher(make_batcher())) as (service, batcher):
        service.serve_platform(platform, Rebuilder())
        await service.handle(message, sink)
        await until(lambda: gone(redis_client, f"{platform}:{message.message_id}"), timeout=30)
    assert sink.kinds("fail") == [replies.failed()] * 2 and not sink.kinds("finish")
    assert len(batcher.prompts) == 1
    assert await store.load(message.conversation) == [{"role": "user", "content": message.text}]


async def test_a_message_while_redis_fails_over_is_told_to_wait_not_that_it_failed(
    make_service, redis_client, platform
):
    """A failover under way (the old primary now a replica: READONLY) passes by itself:
    the user hears to send it again in a minute, as in any outage, where the adapter took
    the error for a bug."""
    message, sink = on(platform), RecordingSink()
    async with make_service() as (service, _batcher):
        await redis_client.execute_command("REPLICAOF", "127.0.0.1", "1")  # no such primary
        try:
            assert await service.accept(message, sink) is None
        finally:
            await redis_client.execute_command("REPLICAOF", "NO", "ONE")
    assert sink.events == [("fail", replies.storage_unavailable())]


async def test_a_turn_that_cannot_be_closed_is_abandoned_after_its_attempts(
    make_service, redis_client, platform
):
    """Its history is no list (damaged by hand): every close fails, as a Redis error that
    is no outage. After TURN_MAX_ATTEMPTS the record goes, the history left as it is,
    where the turn was taken up again every few seconds for ever."""
    message, sink = on(platform), RecordingSink()
    history = keys.conversation(str(message.conversation))
    await redis_client.set(history, "not a list")
    async with make_service(max_attempts=2) as (service, _batcher):
        service.serve_platform(platform, Rebuilder())
        await service.handle(message, sink)
        await until(lambda: gone(redis_client, f"{platform}:{message.message_id}"), timeout=30)
    assert await redis_client.get(history) == "not a list"
    assert sink.kinds("fail") and not sink.kinds("finish")
    await redis_client.delete(history)


async def test_a_failure_that_cannot_be_told_still_ends_the_turn(
    make_service, make_batcher, redis_client, platform
):
    message = on(platform)
    async with make_service(FailsOnceBatcher(make_batcher())) as (service, _batcher):
        await service.handle(message, RefusingSink())
        assert await gone(redis_client, f"{platform}:{message.message_id}")  # not retried


class FlakyPlatform(RecordingSink):
    """The platform fails a sink's first `failures` calls of one kind (a 503, a lost
    connection), or every one of them (a thread deleted)."""

    def __init__(self, kind: str, failures: float) -> None:
        super().__init__()
        self.kind, self.failures = kind, failures
        self.finished_at: list[float] = []  # when each try showed its answer, if it could

    async def start(self) -> None:
        await super().start()
        self._maybe_fail("start")

    async def finish(self, text: str) -> None:
        await super().finish(text)
        self.finished_at.append(time.monotonic())
        self._maybe_fail("finish")

    async def fail(self, text: str) -> None:
        await super().fail(text)
        self._maybe_fail("fail")

    def _maybe_fail(self, kind: str) -> None:
        if kind == self.kind and self.failures > 0:
            self.failures -= 1
            raise RuntimeError("internal_error (HTTP 503)")


@pytest.mark.parametrize("kind", ["start", "finish"])
async def test_a_passing_platform_failure_is_tried_again_and_the_answer_written_once(
    make_service, redis_client, store, platform, kind
):
    """The placeholder, or the answer, did not reach the thread once: the turn is tried
    again (an answer written is shown, not written again), where it ended there, the user
    unanswered and the answer thrown away. Shown at last, it counts in the stats once,
    with the tokens it was written with."""
    message, sink = on(platform), FlakyPlatform(kind, failures=1)
    async with make_service() as (service, batcher):
        service.serve_platform(platform, Rebuilder())
        await service.handle(message, sink)
        await until(lambda: gone(redis_client, f"{platform}:{message.message_id}"), timeout=30)
        summary = await service.stats.summary()
    assert len(batcher.prompts) == 1 and not sink.kinds("fail")
    prompt_tokens = batcher.batcher.engine.count_tokens(batcher.prompts[0])
    assert (summary.turns, summary.prompt_tokens) == (1, prompt_tokens)
    assert summary.answer_tokens > 0
    answers = sink.kinds("finish")
    assert len(answers) == (2 if kind == "finish" else 1) and len(set(answers)) == 1
    assert await store.load(message.conversation) == [
        {"role": "user", "content": message.text},
        {"role": "assistant", "content": answers[0]},
    ]


async def test_an_answer_the_platform_never_shows_is_stored_after_the_last_try(
    make_service, redis_client, store, platform
):
    message, sink = on(platform), FlakyPlatform("finish", failures=math.inf)
    async with make_service(max_attempts=2) as (service, batcher):
        service.serve_platform(platform, Rebuilder())
        await service.handle(message, sink)
        await until(lambda: gone(redis_client, f"{platform}:{message.message_id}"), timeout=30)
    assert len(batcher.prompts) == 1 and len(sink.kinds("finish")) == 2
    assert await store.load(message.conversation) == [
        {"role": "user", "content": message.text},
        {"role": "assistant", "content": sink.kinds("finish")[0]},
    ]


@pytest.mark.parametrize("failures", [1, math.inf], ids=["once", "always"])
async def test_a_failure_the_platform_did_not_show_is_told_again(
    make_service, redis_client, store, platform, failures
):
    """The reply that says why a turn failed did not reach the thread (a 503): it is told
    again later, as an answer is shown again, where the turn ended with the thread still
    showing its placeholder; a platform that never takes it gets as many tries."""
    message, sink = on(platform), FlakyPlatform("fail", failures=failures)
    async with make_service(ScriptedBatcher(""), max_attempts=2) as (service, _batcher):
        service.serve_platform(platform, Rebuilder())
        await service.handle(message, sink)
        await until(lambda: gone(redis_client, f"{platform}:{message.message_id}"), timeout=30)
    assert sink.kinds("fail") == [replies.empty_answer()] * 2
    assert await store.load(message.conversation) == [{"role": "user", "content": message.text}]


async def test_a_platform_failing_for_a_while_has_its_tries_spread_out(
    make_service, redis_client, store, platform
):
    """Each try waits for the platform longer than the one before (`platform_retry_s`,
    doubled), where the resume passes took the turn up again every few seconds (here
    every 0.67 s), and its tries were gone before a passing outage was."""
    message, sink = on(platform), FlakyPlatform("finish", failures=math.inf)
    async with make_service(max_attempts=3, platform_retry_s=1.0) as (service, _batcher):
        service.serve_platform(platform, Rebuilder())
        await service.handle(message, sink)
        await until(lambda: gone(redis_client, f"{platform}:{message.message_id}"), timeout=30)
    first, second, third = sink.finished_at
    assert second - first >= 1.0 and third - second >= 2.0


async def test_a_forget_drops_the_messages_before_it_that_wait_for_a_later_try(
    make_service, redis_client, store, platform
):
    """The platform did not show an answer, so its turn waits for a later try; a `forget`
    sent meanwhile must leave that try nothing to show or store, where it delivered the
    answer after the forget's reply and stored the exchange: the thread remembered."""
    message, sink = on(platform), FlakyPlatform("finish", failures=1)
    forget = replace(on(platform, "forget"), conversation=message.conversation, command="forget")
    told = RecordingSink()
    async with make_service(platform_retry_s=0.5) as (service, _batcher):
        service.serve_platform(platform, Rebuilder())
        await service.handle(message, sink)
        await service.handle(forget, told)
        await until(lambda: asyncio.sleep(0, message.id in service._orphaned))  # its try is due
        await until(lambda: asyncio.sleep(0, message.id not in service._orphaned))
        await service.settled()
    assert told.kinds("finish") == [replies.forgotten(1)]
    assert len(sink.kinds("finish")) == 1  # the try the platform did not show; no other
    assert await gone(redis_client, message.id)
    assert not await store.exists(str(message.conversation))


async def test_a_message_sent_after_a_forget_that_waits_behind_an_answer_is_answered(
    make_service, make_batcher, store, conversation
):
    """The forget waits for the answer being written; a message sent after it, which waits
    behind it, came after it: the forget does not drop it, and its sender starts the
    conversation anew (named at accept, before the forget took the starter)."""
    gated = GatedBatcher(make_batcher())
    sinks = [RecordingSink() for _ in range(3)]
    async with make_service(gated) as (service, _batcher):
        writing = await service.accept(turn(conversation, "first"), sinks[0])
        await until(lambda: asyncio.sleep(0, service.queue.depth == 1))
        forget = await service.accept(replace(turn(conversation, "forget"), command="forget"),
                                      sinks[1])  # fmt: skip
        after = await service.accept(turn(conversation, "after"), sinks[2])
        gated.gate.set()
        await asyncio.wait_for(asyncio.gather(writing, forget, after), timeout=30)
    assert sinks[1].kinds("finish") == [replies.forgotten()]
    history = await store.load(str(conversation))
    assert [m["content"] for m in history] == ["after", sinks[2].kinds("finish")[0]]
    assert await store.starter(str(conversation)) == "U1"  # else anyone may forget it


async def test_a_turn_waiting_while_another_process_forgets_its_conversation_ends_there(
    make_service, redis_client, store, conversation
):
    """Another gateway's `forget` ran while this turn waited for the conversation's lock:
    the turn ends unanswered, and writes nothing, where it filled in the persona's prompt
    again, and the conversation was stored after its forget."""
    elsewhere = ConversationLocks(redis=redis_client)
    forgetting = TurnJournal(
        redis=redis_client, store=store, owner=f"test-{uuid.uuid4().hex}", lease_seconds=2.0
    )
    sink = RecordingSink()
    async with make_service(system_prompt="You are {bot_name}.") as (service, batcher):
        async with elsewhere.hold(str(conversation)):  # as the other gateway's forget does
            task = await service.accept(turn(conversation, "before"), sink)
            assert task is not None and await store.exists(str(conversation))  # its starter
            assert await forget(forgetting, conversation) == 1
        await task
    assert sink.events == [] and batcher.prompts == []
    assert not await store.exists(str(conversation))


async def test_a_turn_whose_thread_cannot_be_rebuilt_does_not_block_the_others(
    make_service, redis_client, store, platform
):
    crashed = process(redis_client, store, platform, "crashed")
    broken = await crashed.accept(on(platform, "first"), {"from": "an older version"})
    good = await crashed.accept(on(platform, "second"), {"thread": "T1"})
    assert broken is not None and good is not None
    rebuild = Rebuilder()

    def rebuild_or_fail(target: dict, stop: Callable[[], object]) -> RecordingSink:
        if "from" in target:
            raise KeyError("thread")
        return rebuild(target, stop)

    async with make_service() as (service, _batcher):
        service.serve_platform(platform, rebuild_or_fail)
        await until(lambda: gone(redis_client, good.id))
        await until(lambda: gone(redis_client, broken.id))
    [sink] = rebuild.sinks
    assert sink.kinds("finish")


async def test_a_message_taken_during_a_drain_saves_where_its_pause_text_is(
    make_service, redis_client, platform
):
    """The next start edits that message into the answer; none is left behind."""

    class PostingSink(RecordingSink):
        def __init__(self) -> None:
            super().__init__()
            self.posted: list[str] = []

        def reply_target(self) -> dict:
            return {"messages": self.posted}

        async def pause(self, text: str) -> None:
            await super().pause(text)
            self.posted.append("M1")
            await self.on_post()

    sink = PostingSink()
    message = on(platform)
    async with make_service() as (service, _batcher):
        await service.drain(0)
        assert await service.accept(message, sink) is None  # left for the next start
        turn_id = f"{platform}:{message.message_id}"
        target = json.loads(await redis_client.hget(keys.turn(turn_id), "target"))
    assert sink.kinds("pause") == [replies.restarting()]
    assert target == {"messages": ["M1"]}
