"""TurnJournal against a real Redis: accept once, claim after a lease is gone, owner checks.

Each test uses a platform name of its own, so no other journal in the session (the service
tests, `threadbot run`) claims its turns, and every key it wrote is found and removed after.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
from lossy_proxy import LossyProxy, lossy_redis
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from bot.types import ChatMessage, ConversationKey, Turn
from storage import keys
from storage.store import ConversationStore
from storage.turns import UNANSWERED_KEPT_AT_LEAST_S, WATCH_TRIES, PendingTurn, TurnJournal

MakeJournal = Callable[..., TurnJournal]


@pytest.fixture
def make_journal(redis_client: Redis, store: ConversationStore, platform: str) -> MakeJournal:
    """Journals that stand for processes; owners are named after the test's platform."""

    def make(name: str, *, lease_seconds: float = 2.0) -> TurnJournal:
        return TurnJournal(
            redis=redis_client,
            store=store,
            owner=f"{platform}-{name}",
            lease_seconds=lease_seconds,
        )

    return make


def new_turn(
    platform: str,
    text: str = "hello",
    *,
    message_id: str | None = None,
    context: tuple[ChatMessage, ...] = (),
) -> Turn:
    conversation = ConversationKey(platform, "team", "channel", uuid.uuid4().hex)
    return Turn(conversation, "U1", text, message_id or uuid.uuid4().hex, context=context)


async def record(redis: Redis, pending: PendingTurn) -> dict[str, str]:
    return await redis.hgetall(keys.turn(pending.id))


async def indexed(redis: Redis, pending: PendingTurn) -> bool:
    return await redis.zscore(keys.PENDING_TURNS, pending.id) is not None


async def forget_turn(journal: TurnJournal, conversation: ConversationKey) -> PendingTurn:
    """A `forget` of `conversation`, taken by `journal` (asked now)."""
    pending = await journal.accept(
        Turn(conversation, "U1", "forget", uuid.uuid4().hex, command="forget"), {}
    )
    assert pending is not None
    return pending


async def forget(journal: TurnJournal, conversation: ConversationKey) -> int:
    """A `forget` of `conversation` taken, carried out and told (its record gone) by
    `journal`: how many turns it dropped."""
    command = await forget_turn(journal, conversation)
    reply = await journal.forget(command, str)
    assert reply is not None and await journal.finish(command)
    return int(reply)


async def test_a_message_is_accepted_once_per_platform(
    make_journal: MakeJournal, redis_client: Redis, platform: str
) -> None:
    journal = make_journal("a")
    message = new_turn(platform, "first", message_id="m1")
    pending = await journal.accept(message, {"thread": "T1"})
    assert pending is not None
    assert (pending.id, pending.attempts, pending.stored, pending.answer) == (
        f"{platform}:m1", 1, False, None,
    )  # fmt: skip
    assert await indexed(redis_client, pending)
    assert (await record(redis_client, pending))["owner"] == journal.owner

    redelivered = new_turn(platform, "first, again", message_id="m1")
    assert await journal.accept(redelivered, {"thread": "T2"}) is None
    [claimed] = await make_journal("b").claim([platform], orphaned=())  # "a" holds no lease
    assert claimed.turn == message  # the re-delivery did not overwrite the record
    assert claimed.target == {"thread": "T1"}

    elsewhere = new_turn(f"{platform}x", "same id, other platform", message_id="m1")
    other = await journal.accept(elsewhere, {"thread": "T3"})
    assert other is not None
    assert other.id == f"{platform}x:m1"
    assert await indexed(redis_client, other)


async def test_another_journal_claims_a_turn_only_once_its_owner_lease_is_gone(
    make_journal: MakeJournal, redis_client: Redis, platform: str
) -> None:
    first, second = make_journal("first"), make_journal("second")
    await first.renew_lease()
    context: tuple[ChatMessage, ...] = ({"role": "user", "content": "earlier, in the thread"},)
    message = new_turn(platform, "héllo 👋", context=context)
    pending = await first.accept(message, {"thread": "T1", "messages": ["M1"]})
    assert pending is not None

    assert await second.claim([platform], orphaned=()) == []  # the owner is alive
    await first.drop_lease()
    [claimed] = await second.claim([platform], orphaned=())

    assert claimed.turn == message
    assert claimed.target == {"thread": "T1", "messages": ["M1"]}
    assert claimed.accepted_at == pending.accepted_at
    assert claimed.attempts == 2
    assert (claimed.stored, claimed.answer) == (False, None)
    assert (await record(redis_client, pending))["owner"] == second.owner
    await second.renew_lease()
    assert await first.claim([platform], orphaned=()) == []  # "second" holds it now
    assert await second.claim([platform], orphaned=()) == []


async def test_a_lease_that_is_renewed_holds_and_one_that_expires_lets_go(
    make_journal: MakeJournal, redis_client: Redis, platform: str
) -> None:
    """Redis runs the lease out (its own clock, not the test's sleeps)."""
    first, second = make_journal("first", lease_seconds=30), make_journal("second")
    lease = keys.owner(first.owner)
    await first.renew_lease()
    assert await first.accept(new_turn(platform), {}) is not None
    await redis_client.pexpire(lease, 200)  # all but run out
    await first.renew_lease()
    assert await redis_client.pttl(lease) > 10_000  # renewed for its whole term
    assert await second.claim([platform], orphaned=()) == []
    await redis_client.pexpire(lease, 1)  # run out, as a dead process's does
    async with asyncio.timeout(5):
        while await redis_client.exists(lease):
            await asyncio.sleep(0.01)
    assert len(await second.claim([platform], orphaned=())) == 1


async def test_a_users_pending_turns_are_counted_across_journals_until_each_ends(
    make_journal: MakeJournal, redis_client: Redis, platform: str
) -> None:
    """Each process's journal counts the user's turns that any process accepted and none
    has finished or given up; those ended since are dropped from the user's index."""
    first, second = make_journal("first"), make_journal("second")
    taken = [await journal.accept(new_turn(platform), {}) for journal in (first, second, first)]
    answered, given_up, waiting = taken
    assert answered is not None and given_up is not None and waiting is not None
    other = Turn(waiting.turn.conversation, "U2", "hi", uuid.uuid4().hex)
    assert await second.accept(other, {}) is not None
    assert await second.pending_of(platform, "U1") == 3
    assert await first.finish(answered, "an answer")
    await second.abandon(given_up)
    assert await second.pending_of(platform, "U1") == 1
    assert await redis_client.zrange(keys.pending_by(platform, "U1"), 0, -1) == [waiting.id]
    assert await first.pending_of(platform, "U2") == 1
    assert await first.pending_of("elsewhere", "U1") == 0
    ttl = await redis_client.ttl(keys.pending_by(platform, "U1"))
    assert 0 < ttl <= first.kept_seconds  # gone with its turns' records, come what may


async def test_forget_drops_the_conversations_turns_accepted_before_it_and_no_others(
    make_journal: MakeJournal, redis_client: Redis, store: ConversationStore, platform: str
) -> None:
    """A turn of the conversation left for a later try, or a gone process's, would answer
    and store its exchange after a `forget`: it goes with the conversation, claimed by no
    one; a turn sent after the forget, and another conversation's, stay."""
    gone, here = make_journal("gone"), make_journal("here")
    before = await gone.accept(new_turn(platform, "before"), {})
    elsewhere = await gone.accept(new_turn(platform, "another thread"), {})
    assert before is not None and elsewhere is not None
    assert await gone.begin(before) is not None
    conversation = before.turn.conversation
    asked = await forget_turn(here, conversation)
    after = await here.accept(Turn(conversation, "U1", "after", uuid.uuid4().hex), {})
    assert after is not None
    assert await here.forget(asked, str) == "1"
    assert await here.forget(asked, str) == "1"  # carried out once: its reply, as saved
    assert await here.finish(asked)  # its reply shown
    assert await store.load(before.conversation) == []
    assert not await indexed(redis_client, before) and not await record(redis_client, before)
    assert not await gone.owns(before) and await here.owns(after)
    taker = make_journal("taker")
    claimed = await taker.claim([platform], orphaned=())  # neither holds a lease
    assert sorted(pending.id for pending in claimed) == sorted([elsewhere.id, after.id])
    assert await forget(here, conversation) == 1  # whoever has it
    assert not await taker.owns(after) and await taker.owns(elsewhere)


async def test_after_an_outage_others_turns_are_left_to_them_for_a_lease(
    make_journal: MakeJournal,
    redis_client: Redis,
    store: ConversationStore,
    platform: str,
    redis_url: str,
    tmp_path,
) -> None:
    """Redis let every lease lapse in an outage longer than one: another process took the
    turns a live one was still answering, the moment Redis was back, and that one's answer
    was thrown away. A process whose renewal failed leaves others' turns alone for a
    lease's time, while they renew theirs; then a turn whose owner is truly gone is its."""
    from storage.connection import Resilience

    answering = make_journal("answering", lease_seconds=1.0)
    await answering.renew_lease()
    pending = await answering.accept(new_turn(platform), {})
    assert pending is not None and await answering.begin(pending) is not None
    async with lossy_redis(redis_url, tmp_path, [], Resilience(0, health_check_s=0)) as (
        far,
        proxy,
    ):
        taker = TurnJournal(redis=far, store=store, owner=f"{platform}-taker", lease_seconds=1.0)
        proxy.cut()
        with pytest.raises(RedisConnectionError):
            await taker.renew_lease()
        await asyncio.sleep(1.2)  # every lease lapses in the outage
        proxy.back()
        await taker.renew_lease()
        assert await taker.claim([platform]) == []  # the answering process's is not gone
        await answering.renew_lease()  # as it does within a third of its lease
        assert await taker.claim([platform]) == []
        await asyncio.sleep(1.2)  # and now it is gone
        [claimed] = await taker.claim([platform])
    assert claimed.id == pending.id


async def test_a_process_that_did_not_see_redis_restart_leaves_others_turns_for_a_lease(
    redis_server, platform: str
) -> None:
    """Redis came back from an outage longer than a lease: a process that had seen no
    outage (started just then, or loading its model through it) took the turns a live
    process was still answering. At its first renewal in a lease or more, it is in touch
    only since Redis started; then a turn whose owner is truly gone is its."""

    def journal(client: Redis, name: str) -> TurnJournal:
        store = ConversationStore(redis=client, max_messages=50, ttl_seconds=3600)
        owner = f"{platform}-{name}"
        return TurnJournal(redis=client, store=store, owner=owner, lease_seconds=2, shared=True)

    def client() -> Redis:
        return Redis.from_url(redis_server.url, decode_responses=True, retry=Retry(NoBackoff(), 3))

    async with client() as before, client() as loading_client:
        answering, loading = journal(before, "answering"), journal(loading_client, "loading")
        await loading.renew_lease()
        await answering.renew_lease()
        pending = await answering.accept(new_turn(platform), {})
        assert pending is not None and await answering.begin(pending) is not None
        redis_server.kill()
        await asyncio.sleep(2.2)  # every lease lapses in the outage, unseen by `loading`
        redis_server.start()
        async with client() as back, client() as theirs:
            started = journal(back, "started")  # deployed in the outage, say
            for process in (started, loading):
                await process.renew_lease()
                assert await process.claim([platform]) == []
            await journal(theirs, "answering").renew_lease()  # as it does within a third of one
            assert await started.claim([platform]) == []
            await asyncio.sleep(2.2)  # and now it is gone
            [claimed] = await started.claim([platform])
    assert claimed.id == pending.id


async def test_a_turn_that_ends_leaves_its_conversations_index(
    make_journal: MakeJournal, redis_client: Redis, platform: str
) -> None:
    """The index a `forget` reads holds the conversation's turns pending, not every turn
    it ever had (a DM is one conversation for good)."""
    journal = make_journal("a")
    answered = await journal.accept(new_turn(platform), {})
    assert answered is not None
    given_up = await journal.accept(
        Turn(answered.turn.conversation, "U1", "again", uuid.uuid4().hex), {}
    )
    assert given_up is not None
    index = keys.pending_in(answered.conversation)
    assert len(await redis_client.zrange(index, 0, -1)) == 2
    assert await journal.finish(answered, "an answer")
    await journal.abandon(given_up)
    assert await redis_client.zrange(index, 0, -1) == []


async def test_claims_come_in_arrival_order_and_each_counts_an_attempt(
    make_journal: MakeJournal, redis_client: Redis, platform: str
) -> None:
    gone = make_journal("gone")  # never takes a lease: as if it had died
    accepted = []
    for message_id in ("c", "a", "b"):  # arrival order differs from id order
        pending = await gone.accept(new_turn(platform, message_id=message_id), {})
        assert pending is not None
        accepted.append(pending)

    taken = await make_journal("second").claim([platform], orphaned=())
    assert [p.id for p in taken] == [p.id for p in accepted]
    assert [p.attempts for p in taken] == [2, 2, 2]
    taken_again = await make_journal("third").claim([platform], orphaned=())  # "second" died too
    assert [p.id for p in taken_again] == [p.id for p in accepted]
    assert [p.attempts for p in taken_again] == [3, 3, 3]
    assert [(await record(redis_client, p))["attempts"] for p in accepted] == ["3", "3", "3"]


async def test_claim_takes_only_the_platforms_asked_for(
    make_journal: MakeJournal, platform: str
) -> None:
    gone = make_journal("gone")
    here = await gone.accept(new_turn(platform), {})
    assert await gone.accept(new_turn(f"{platform}x"), {}) is not None
    claimed = await make_journal("second").claim([platform], orphaned=())
    assert here is not None
    assert [p.id for p in claimed] == [here.id]


async def test_turns_no_process_serves_go_with_their_conversations_history(
    make_journal: MakeJournal, redis_client: Redis, store: ConversationStore, platform: str
) -> None:
    """A platform no process serves any more: its turns' records expire when a conversation
    would (HISTORY_TTL_DAYS, here 40 days), and any process's claim drops them from the
    index then."""
    store.ttl_seconds = 40 * 86400
    gone = make_journal("gone")
    old = await gone.accept(new_turn(f"{platform}x"), {})
    recent = await gone.accept(new_turn(f"{platform}x"), {})
    assert old is not None and recent is not None
    assert store.ttl_seconds - 5 < await redis_client.ttl(keys.turn(old.id)) <= store.ttl_seconds
    await redis_client.zadd(keys.PENDING_TURNS, {old.id: old.accepted_at - store.ttl_seconds})
    assert await make_journal("a").claim([platform]) == []
    assert not await indexed(redis_client, old)
    assert await indexed(redis_client, recent)


async def test_an_unanswered_turn_outlives_a_short_history_ttl(
    make_journal: MakeJournal, redis_client: Redis, store: ConversationStore, platform: str
) -> None:
    """HISTORY_TTL_DAYS of an hour (or a minute): a turn kept waiting by a restart or an
    outage longer than that is still answered, so its record lasts at least a day."""
    journal = make_journal("a")
    pending = await journal.accept(new_turn(platform), {})
    assert pending is not None
    assert store.ttl_seconds == 3600
    day = UNANSWERED_KEPT_AT_LEAST_S
    assert day - 5 < await redis_client.ttl(keys.turn(pending.id)) <= day
    await redis_client.zadd(keys.PENDING_TURNS, {pending.id: pending.accepted_at - 7200})
    [claimed] = await make_journal("b").claim([platform])  # "a" holds no lease
    assert claimed.id == pending.id


async def test_a_journal_claims_of_its_own_turns_only_the_orphaned(
    make_journal: MakeJournal, redis_client: Redis, platform: str
) -> None:
    journal = make_journal("self")
    await journal.renew_lease()  # alive: its own lease does not stop it
    running = await journal.accept(new_turn(platform, "running"), {})
    stranded = await journal.accept(new_turn(platform, "stranded"), {})  # its task lost storage
    assert running is not None
    assert stranded is not None

    [claimed] = await journal.claim([platform], orphaned=[stranded.id])
    assert claimed.id == stranded.id
    assert claimed.attempts == 2
    assert (await record(redis_client, running))["attempts"] == "1"  # left alone


async def test_two_journals_racing_for_a_turn_only_one_wins(
    make_journal: MakeJournal, redis_client: Redis, platform: str
) -> None:
    gone = make_journal("gone")
    left, right = make_journal("left"), make_journal("right")
    await left.renew_lease()  # both alive, as resuming processes are
    await right.renew_lease()
    for _ in range(8):
        pending = await gone.accept(new_turn(platform), {})
        assert pending is not None
        claims = await asyncio.gather(
            left.claim([platform], orphaned=()), right.claim([platform], orphaned=())
        )
        winners = [journal for journal, won in zip((left, right), claims, strict=True) if won]
        assert len(winners) == 1, claims
        [[claimed]] = [won for won in claims if won]
        assert claimed.attempts == 2
        stored = await record(redis_client, pending)
        assert (stored["owner"], stored["attempts"]) == (winners[0].owner, "2")
        assert await winners[0].finish(claimed)


async def test_begin_stores_context_for_a_new_conversation_and_the_message_once(
    make_journal: MakeJournal, store: ConversationStore, platform: str
) -> None:
    journal = make_journal("a")
    context: tuple[ChatMessage, ...] = (
        {"role": "user", "content": "we deploy on fridays"},
        {"role": "assistant", "content": "noted"},
    )
    message = new_turn(platform, "is that wise?", context=context)
    pending = await journal.accept(message, {})
    assert pending is not None

    started = await journal.begin(pending)
    assert started is not None
    assert started.stored
    assert await journal.begin(started) == started  # retried: nothing more is written
    history = [*context, {"role": "user", "content": "is that wise?"}]
    assert await store.load(pending.conversation) == history

    other = make_journal("b")
    [claimed] = await other.claim([platform], orphaned=())  # "a" holds no lease
    assert claimed.stored  # read back from the record
    assert await other.begin(claimed) is not None
    assert await store.load(pending.conversation) == history

    # A later turn in the same conversation adds its message, never the context again.
    later = await journal.accept(
        Turn(message.conversation, "U1", "and now?", uuid.uuid4().hex, context=context), {}
    )
    assert later is not None
    assert await journal.begin(later) is not None
    assert await store.load(pending.conversation) == [
        *history,
        {"role": "user", "content": "and now?"},
    ]


async def test_a_turn_taken_over_is_no_longer_written_by_its_old_owner(
    make_journal: MakeJournal, redis_client: Redis, store: ConversationStore, platform: str
) -> None:
    old, new = make_journal("old"), make_journal("new")
    pending = await old.accept(new_turn(platform, "question"), {"thread": "T1"})
    assert pending is not None
    [claimed] = await new.claim([platform], orphaned=())  # "old" holds no lease
    before = await record(redis_client, pending)

    assert await old.begin(pending) is None
    assert not await old.save(pending, target={"thread": "elsewhere"}, answer="stale")
    await old.release(pending)
    assert not await old.finish(pending, "stale answer")
    assert await record(redis_client, pending) == before  # attempts, target, answer untouched
    assert await indexed(redis_client, pending)
    assert await store.load(pending.conversation) == []

    assert await new.save(claimed, answer="fresh")
    assert (await record(redis_client, pending))["answer"] == "fresh"


async def test_save_records_progress_that_a_claim_reads_back(
    make_journal: MakeJournal, platform: str
) -> None:
    first = make_journal("first")
    pending = await first.accept(new_turn(platform), {"thread": "T1", "messages": []})
    assert pending is not None
    assert await first.save(pending, target={"thread": "T1", "messages": ["M1", "M2"]})
    assert await first.save(pending, answer="the answer, generated", tokens=(120, 7))
    [claimed] = await make_journal("second").claim([platform], orphaned=())
    assert claimed.target == {"thread": "T1", "messages": ["M1", "M2"]}
    assert (claimed.answer, claimed.tokens) == ("the answer, generated", (120, 7))


async def test_a_regeneration_pressed_as_its_conversation_is_forgotten_leaves_it_unknown(
    make_journal: MakeJournal, store: ConversationStore, platform: str
) -> None:
    """A press checked before a `forget` and taken after it: its turn ends unanswered (the
    conversation has no answer to replace), and the conversation stays forgotten, where
    the presser became its starter and the bot knew the thread again."""
    journal = make_journal("a")
    asked = new_turn(platform)
    assert await journal.accept(asked, {})
    await forget(journal, asked.conversation)
    press = replace(asked, author="U2", message_id=uuid.uuid4().hex)
    assert await journal.accept(press, {}, regenerates={"ts": "1.2"})
    assert not await store.exists(str(asked.conversation))
    assert await store.starter(str(asked.conversation)) is None


async def test_a_failure_saved_after_the_answer_keeps_no_answer(
    make_journal: MakeJournal, platform: str
) -> None:
    """The answer was written and saved, then could not be shown, and the user was told
    it failed: after a restart the turn was closed as told, but with that answer stored,
    one the user never saw. A regeneration's old answer, saved with its failure, stays."""
    first = make_journal("first")
    pending = await first.accept(new_turn(platform), {"thread": "T1", "messages": []})
    assert pending is not None
    assert await first.save(pending, answer="the answer, generated", tokens=(120, 7))
    assert await first.save(pending, failure="Sorry, that failed.")
    [claimed] = await make_journal("second").claim([platform], orphaned=())
    assert (claimed.failure, claimed.answer, claimed.tokens) == ("Sorry, that failed.", None, None)
    assert await make_journal("second").save(claimed, failure="It failed.", answer="old one")
    [again] = await make_journal("third").claim([platform], orphaned=())
    assert (again.failure, again.answer) == ("It failed.", "old one")


async def test_finish_stores_the_answer_and_removes_the_record_in_one_multi(
    make_journal: MakeJournal, redis_client: Redis, store: ConversationStore, platform: str
) -> None:
    journal = make_journal("a")
    pending = await journal.accept(new_turn(platform, "question"), {})
    assert pending is not None
    started = await journal.begin(pending)
    assert started is not None

    start, end = (f"sentinel-{name}-{uuid.uuid4().hex}" for name in ("start", "end"))
    commands: list[str] = []
    monitoring = asyncio.Event()
    async with redis_client.monitor() as monitor:

        async def listen() -> None:
            async for command in monitor.listen():
                if start in command["command"]:
                    monitoring.set()
                elif end in command["command"]:
                    return
                elif monitoring.is_set():
                    commands.append(command["command"])

        listening = asyncio.create_task(listen())
        async with asyncio.timeout(5):  # until MONITOR sees what is sent
            while not monitoring.is_set():
                await redis_client.get(start)
                await asyncio.sleep(0.02)
        assert await journal.finish(started, "the answer")
        await redis_client.get(end)
        await asyncio.wait_for(listening, timeout=5)

    assert await store.load(pending.conversation) == [
        {"role": "user", "content": "question"},
        {"role": "assistant", "content": "the answer"},
    ]
    assert await record(redis_client, pending) == {}
    assert not await indexed(redis_client, pending)

    # One MULTI … EXEC holds the answer's append, the record's removal and the index's.
    turn_key, conversation_key = keys.turn(pending.id), keys.conversation(pending.conversation)
    blocks, block = [], None
    for command in commands:
        name = command.split()[0].upper()
        if name == "MULTI":
            block = []
        elif name == "EXEC" and block is not None:
            blocks.append(block)
            block = None
        elif block is not None:
            block.append(command)
    [finishing] = [b for b in blocks if any(turn_key in c for c in b)]
    assert any(c.startswith("RPUSH ") and conversation_key in c for c in finishing)
    assert any(c.startswith("DEL ") and turn_key in c for c in finishing)
    assert any(c.startswith("ZREM ") and pending.id in c for c in finishing)


async def test_release_gives_back_the_attempt_a_claim_took(
    make_journal: MakeJournal, redis_client: Redis, platform: str
) -> None:
    pending = await make_journal("gone").accept(new_turn(platform), {})
    assert pending is not None
    second = make_journal("second")
    [claimed] = await second.claim([platform], orphaned=())
    assert claimed.attempts == 2
    await second.release(claimed)  # a clean stop: this try does not count
    assert (await record(redis_client, pending))["attempts"] == "1"
    [again] = await make_journal("third").claim([platform], orphaned=())
    assert again.attempts == 2


async def test_an_unreadable_or_missing_record_is_dropped_not_retried(
    make_journal: MakeJournal, redis_client: Redis, platform: str
) -> None:
    garbage, missing = f"{platform}:garbage", f"{platform}:missing"
    await redis_client.hset(keys.turn(garbage), mapping={"turn": "{not json", "owner": "x"})
    now = time.time()
    await redis_client.zadd(keys.PENDING_TURNS, {garbage: now - 2, missing: now - 1})
    good = await make_journal("gone").accept(new_turn(platform), {})
    assert good is not None

    journal = make_journal("a")
    claimed = await journal.claim([platform], orphaned=())
    assert [p.id for p in claimed] == [good.id]  # the good turn behind them still comes
    for turn_id in (garbage, missing):
        assert await redis_client.exists(keys.turn(turn_id)) == 0
        assert await redis_client.zscore(keys.PENDING_TURNS, turn_id) is None
    assert await journal.claim([platform]) == []  # now its own, and not orphaned


async def test_a_claim_stops_as_soon_as_it_is_told(
    make_journal: MakeJournal, redis_client: Redis, platform: str
) -> None:
    """A process that starts stopping mid-claim takes no more turns (the next one will)."""
    gone = make_journal("gone")
    first = await gone.accept(new_turn(platform, "first"), {})
    second = await gone.accept(new_turn(platform, "second"), {})
    assert first is not None and second is not None
    told = iter([False, True])  # told to stop after the first turn
    taken = await make_journal("taker").claim([platform], stop=lambda: next(told))
    assert [p.id for p in taken] == [first.id]
    assert (await record(redis_client, second))["owner"] == gone.owner


# --- writes whose reply was lost, sent again by the client's retry ---------------------


@asynccontextmanager
async def lossy_journal(
    redis_url: str, tmp_path, owner: str, lose: list[bytes], *, down_after_loss: bool = False
) -> AsyncIterator[tuple[TurnJournal, LossyProxy]]:
    """A journal whose Redis connection loses the reply to the first request holding each
    of `lose`, after Redis ran it (`lossy_redis`)."""
    async with lossy_redis(redis_url, tmp_path, lose, down_after_loss=down_after_loss) as (
        redis,
        proxy,
    ):
        store = ConversationStore(redis=redis, max_messages=6, ttl_seconds=3600)
        yield TurnJournal(redis=redis, store=store, owner=owner, lease_seconds=30), proxy


async def test_a_claim_whose_reply_was_lost_is_taken_once_and_answered(
    make_journal, redis_client, redis_url, tmp_path, platform
):
    """The claim's MULTI ran but its reply was lost, so it is tried again and finds the
    turn ours already: it is still handed over (not left as ours, unanswered), counted once."""
    gone = await make_journal("gone").accept(new_turn(platform), {})
    async with lossy_journal(redis_url, tmp_path, f"{platform}-me", [b"claim"]) as (me, proxy):
        await me.renew_lease()
        [claimed] = await me.claim([platform])
    assert proxy.lost == [b"claim"]
    assert claimed.id == gone.id and claimed.attempts == 2
    assert (await record(redis_client, gone))["attempts"] == "2"


async def test_a_claim_that_failed_after_it_was_made_is_taken_by_the_next_pass(
    make_journal, redis_client, redis_url, tmp_path, platform
):
    """The claim was made, but an outage hid it from the claimer: the turn names this
    process, which is not answering it, so the next pass takes it over all the same."""
    gone = await make_journal("gone").accept(new_turn(platform), {})
    owner = f"{platform}-me"
    async with lossy_journal(redis_url, tmp_path, owner, [b"claim"], down_after_loss=True) as (
        me,
        proxy,
    ):
        await me.renew_lease()
        with pytest.raises(RedisConnectionError):
            await me.claim([platform])
        assert (await record(redis_client, gone))["owner"] == owner
        proxy.back()
        [claimed] = await me.claim([platform])
    assert claimed.id == gone.id and claimed.attempts == 2  # the claim made, not another


async def test_turns_claimed_before_a_pass_failed_are_taken_by_the_next_pass(
    make_journal, redis_client, platform, monkeypatch
):
    """Storage dropped out as the pass claimed its second turn: the first, claimed, never
    reached the caller, and names this process, which is not answering it; the next pass
    hands it over with the rest."""
    gone = make_journal("gone")
    turns = [await gone.accept(new_turn(platform, f"question {n}"), {}) for n in range(3)]
    me = make_journal("me")
    await me.renew_lease()
    claim_one, calls = me._claim, []

    async def second_fails(turn_id: str, *args: Any) -> PendingTurn | None:
        calls.append(turn_id)
        if len(calls) == 2:
            raise RedisConnectionError("connection lost")
        return await claim_one(turn_id, *args)

    monkeypatch.setattr(me, "_claim", second_fails)
    with pytest.raises(RedisConnectionError):
        await me.claim([platform])
    assert (await record(redis_client, turns[0]))["owner"] == me.owner
    claimed = await me.claim([platform])
    assert [pending.id for pending in claimed] == [pending.id for pending in turns]
    assert [pending.attempts for pending in claimed] == [2, 2, 2]  # each claimed once


async def test_a_pass_that_failed_at_a_turn_of_ours_being_answered_leaves_it_to_us(
    make_journal, redis_client, platform, monkeypatch
):
    """Storage dropped out as the pass read a turn this process is answering: the next
    pass leaves it alone, where it took it over and a second copy of its answer ran."""
    me = make_journal("me")
    await me.renew_lease()
    answering = await me.accept(new_turn(platform), {})
    transaction = me._transaction

    async def first_fails(watched: list[str], *args: Any) -> Any:
        if watched == [keys.turn(answering.id)]:
            monkeypatch.undo()
            raise RedisConnectionError("connection lost")
        return await transaction(watched, *args)

    monkeypatch.setattr(me, "_transaction", first_fails)
    with pytest.raises(RedisConnectionError):
        await me.claim([platform])
    assert await me.claim([platform]) == []
    assert (await record(redis_client, answering))["attempts"] == "1"


async def test_a_release_whose_reply_was_lost_gives_back_one_attempt(
    make_journal, redis_client, redis_url, tmp_path, platform
):
    pending = await make_journal("me").accept(new_turn(platform), {})
    async with lossy_journal(redis_url, tmp_path, f"{platform}-me", [b"attempts"]) as (me, proxy):
        await me.release(pending)
    assert proxy.lost == [b"attempts"]
    assert (await record(redis_client, pending))["attempts"] == str(pending.attempts - 1)


async def test_a_finish_whose_reply_was_lost_says_it_finished(
    make_journal, redis_client, redis_url, tmp_path, platform
):
    """Sent again, it finds the record gone: by its own first try, so it did finish (the
    turn is counted answered, not taken for another process's)."""
    pending = await make_journal("me").accept(new_turn(platform), {})
    async with lossy_journal(redis_url, tmp_path, f"{platform}-me", [b"ZREM"]) as (me, proxy):
        started = await me.begin(pending)
        assert await me.finish(started, "the answer")
    assert proxy.lost == [b"ZREM"]
    assert not await indexed(redis_client, pending)
    history = await ConversationStore(redis=redis_client, max_messages=6, ttl_seconds=60).load(
        pending.conversation
    )
    assert [m["content"] for m in history] == ["hello", "the answer"]


@pytest.mark.parametrize(
    ("deliveries", "then"),
    [(1, "claim"), (2, "claim"), (1, "full"), (1, "stopping")],
    ids=["once", "again-in-the-outage", "queue-full", "stopping"],
)
async def test_a_turn_refused_in_an_outage_but_recorded_is_dropped_not_answered(
    redis_client, redis_url, tmp_path, platform, deliveries, then
):
    """Its MULTI ran, but an outage hid that: the user was told their message could not be
    taken, so once storage is back the record goes, unanswered, as they were told; also
    where the platform delivered it again in the outage, refused once more. Also by a pass
    that claims none (the queue full), and by a stopping process, which claims no more:
    the record stayed, counted against the user's pending limit, and the next process
    answered it."""
    async with lossy_journal(
        redis_url, tmp_path, f"{platform}-me", [b"acceptance"], down_after_loss=True
    ) as (me, proxy):
        await me.renew_lease()
        turn = new_turn(platform)
        for _ in range(deliveries):
            with pytest.raises(RedisConnectionError):
                await me.accept(turn, {})
        pending = await redis_client.zrange(keys.PENDING_TURNS, 0, -1)
        [turn_id] = [t for t in pending if platform in t]
        proxy.back()
        if then == "stopping":
            await me.drop_refused()
        else:
            limit = 0 if then == "full" else None
            assert await me.claim([platform], orphaned={turn_id}, limit=limit) == []
    assert not await redis_client.exists(keys.turn(turn_id))
    assert await redis_client.zscore(keys.PENDING_TURNS, turn_id) is None


async def test_a_connection_that_breaks_under_every_try_of_a_write_is_an_outage(
    redis_url, tmp_path, platform
):
    """redis-py says a connection lost while keys are watched with a WatchError, as if
    another client had changed them: after the last try it is the outage it was (the
    message told to send again, a turn kept for later), not a failure of the turn."""
    lose = [b"EXISTS"] * WATCH_TRIES  # accept's first read, after its WATCH, every try
    async with lossy_journal(redis_url, tmp_path, f"{platform}-me", lose) as (me, proxy):
        with pytest.raises(RedisConnectionError):
            await me.accept(new_turn(platform), {})
    assert proxy.lost == lose


async def test_a_message_refused_in_an_outage_and_delivered_again_is_answered(
    redis_url, tmp_path, platform
):
    """Nothing of its first try landed; the platform sent it again once storage was back,
    and that delivery was taken. The claim pass leaves it to be answered, where it took
    the record for the refused try's and dropped it, cutting the answer off for good."""
    async with lossy_journal(redis_url, tmp_path, f"{platform}-me", []) as (me, proxy):
        proxy.cut()
        turn = new_turn(platform)
        with pytest.raises(RedisConnectionError):
            await me.accept(turn, {})
        proxy.back()
        pending = await me.accept(turn, {})  # Slack's retry, or Discord's second dispatch
        assert pending is not None
        assert await me.claim([platform]) == []
        assert await me.begin(pending) is not None
        assert await me.finish(pending, "the answer")


async def test_a_refusal_of_which_nothing_landed_is_forgotten_by_the_next_pass(
    redis_url, tmp_path, platform
):
    """Kept in mind until a claim pass finds no record of it, not for ever (one entry per
    message refused in an outage)."""
    async with lossy_journal(redis_url, tmp_path, f"{platform}-me", []) as (me, proxy):
        proxy.cut()
        with pytest.raises(RedisConnectionError):
            await me.accept(new_turn(platform), {})
        proxy.back()
        assert me._refused
        assert await me.claim([platform]) == []
        assert not me._refused


async def test_a_long_claim_pass_keeps_our_lease(
    make_journal: MakeJournal, redis_client: Redis, platform: str, monkeypatch
) -> None:
    """A backlog of a live peer's turns takes a pass longer than our lease: we renew it on
    the way, or another process would take our running turns and answer them twice."""
    me, peer = make_journal("me", lease_seconds=0.6), make_journal("peer", lease_seconds=60)
    await peer.renew_lease()
    for _ in range(40):
        assert await peer.accept(new_turn(platform), {}) is not None
    claim_one = me._claim

    async def slowly(*args: Any, **options: Any) -> PendingTurn | None:
        await asyncio.sleep(0.05)  # a remote Redis's round trips: 2 s for the pass
        return await claim_one(*args, **options)

    monkeypatch.setattr(me, "_claim", slowly)
    await me.renew_lease()
    assert await me.claim([platform]) == []  # the peer is alive: nothing to take
    assert await redis_client.exists(keys.owner(me.owner))
