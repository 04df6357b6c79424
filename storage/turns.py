"""Pending turns on Redis: every accepted message stays here until it is answered, and
every `reset` or `forget` until it is carried out and told.

A turn is accepted in one MULTI (the message marked seen, its record written, and the
record indexed by arrival), written to as it is answered only by the process that owns
it, and removed in the same MULTI that stores its answer. Each process holds an owner
lease (a key with a TTL) while it runs; another process claims the turns of an owner
whose lease is gone, so a crash, a redeploy or a lost connection never loses a turn.

Owns the pending-turn records and owner leases under `storage.keys`; conversation
values stay the business of `storage.store`, which queues its writes on our MULTIs.
Knows nothing of platforms or models.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from bot.types import ChatMessage, ConversationKey, Turn
from storage import keys
from storage.connection import up_for
from storage.errors import is_outage
from storage.once import TOKEN_KEPT_S
from storage.store import ConversationStore

logger = logging.getLogger(__name__)

SEEN_TTL_SECONDS = 86400  # platforms re-deliver within minutes; a day is ample
UNANSWERED_KEPT_AT_LEAST_S = 86400
"""A turn not yet answered is kept this long even where conversations expire sooner (a
short HISTORY_TTL_DAYS): a restart, a redeploy or an outage must not drop it."""
WATCH_TRIES = 5  # optimistic transactions retried when a watched key changed

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PendingTurn:
    """An accepted turn and how far its answer got; `target` is where the answer goes."""

    turn: Turn
    target: dict[str, Any]
    accepted_at: float = field(default_factory=time.time)
    attempts: int = 1
    stored: bool = False  # the user's message is in the conversation's history
    answer: str | None = None  # generated, maybe not yet delivered
    tokens: tuple[int, int] | None = None  # that answer's prompt and answer tokens
    failure: str | None = None  # told (or being told) to the user: over, but for closing
    regenerates: dict[str, Any] | None = None  # the place of the answer it replaces
    kept: str | None = None  # that answer, once taken back from the history
    taken_up: bool = False  # claimed (after a stop, a crash, an outage): owed an answer

    @property
    def id(self) -> str:
        return self.turn.id

    @property
    def conversation(self) -> str:
        return str(self.turn.conversation)


class TurnJournal:
    """Accepts, tracks and hands back pending turns; one per process, owned by `owner`."""

    def __init__(
        self,
        *,
        redis: Redis,
        store: ConversationStore,
        owner: str,
        lease_seconds: float,
        shared: bool = False,
    ) -> None:
        """`shared`: a Redis that other processes use too (not an embedded one), which may
        have come back from an outage as this process started."""
        self._redis = redis
        self._store = store
        self.owner = owner
        self.lease_seconds = lease_seconds
        # Our claims that failed midway (an outage), perhaps made, never answered: by turn,
        # the token they were made with, which the next try uses too.
        self._claims_in_doubt: dict[str, str] = {}
        # Turns told they could not be taken, each with its refused tries' acceptances: the
        # record one of them may have written all the same (not one a later delivery wrote;
        # a redelivery refused in the same outage adds its own).
        self._refused: dict[str, set[str]] = {}
        # Since when Redis has answered our renewals without a failure (monotonic), and a
        # shared one has run (read at a renewal half a lease or more after the last): after
        # an outage, every process's lease may have lapsed in it, not its process, so
        # others' turns are left to them for a lease's time (to renew theirs).
        self._in_touch_since = -math.inf
        self._out_of_touch = False  # a renewal failed
        self.shared = shared
        self._renewed_at = -math.inf  # monotonic

    # --- this process's lease ---------------------------------------------------------

    def lost_touch(self) -> None:
        """Redis did not answer us (an outage): our lease, and others', may lapse."""
        self._out_of_touch = True

    async def renew_lease(self) -> None:
        began = time.monotonic()
        try:
            await self._redis.set(keys.owner(self.owner), str(time.time()), px=self._lease_ms)
        except Exception:
            self._out_of_touch = True
            raise
        # Our first in half a lease or more (at start; after a model's load): an outage we
        # did not see (Redis restarted meanwhile) let others' leases lapse all the same, so
        # we are in touch at most since Redis started.
        unseen = self.shared and began - self._renewed_at > self.lease_seconds / 2
        redis_up_for = await up_for(self._redis) if unseen else math.inf
        now = time.monotonic()
        # One that took long was retried through an outage as long, at least.
        if self._out_of_touch or now - began > self.lease_seconds / 3:
            self._in_touch_since = now
        else:
            self._in_touch_since = max(self._in_touch_since, now - redis_up_for)
        self._out_of_touch, self._renewed_at = False, now

    async def drop_lease(self) -> None:
        """At a clean exit: our unfinished turns may be claimed at once."""
        await self._redis.delete(keys.owner(self.owner))

    @property
    def kept_seconds(self) -> int:
        """How long an unanswered turn's record lasts: as long as its conversation's
        history, but at least `UNANSWERED_KEPT_AT_LEAST_S`."""
        return max(self._store.ttl_seconds, UNANSWERED_KEPT_AT_LEAST_S)

    @property
    def _lease_ms(self) -> int:
        return max(round(self.lease_seconds * 1000), 1)

    # --- a turn's life ----------------------------------------------------------------

    async def accept(
        self, turn: Turn, target: dict[str, Any], *, regenerates: dict[str, Any] | None = None
    ) -> PendingTurn | None:
        """Record a new turn, owned by us (its author becomes the conversation's starter
        if it has none), or one answering the last question again in place of the answer
        shown at `regenerates` (its presser starts nothing); None if this message was
        seen before. One that raises is taken as refused: should it be recorded all the
        same, the next `claim` drops it."""
        pending = PendingTurn(turn, target, regenerates=regenerates)
        seen = keys.seen(turn.conversation.platform, turn.message_id)
        acceptance = uuid.uuid4().hex  # tells our own earlier try from another delivery

        async def write(pipe: Pipeline) -> bool:
            if await pipe.exists(seen):  # seen before; by this very call if its reply was lost
                return await pipe.hget(keys.turn(pending.id), "acceptance") == acceptance
            pipe.multi()
            pipe.set(seen, "1", ex=SEEN_TTL_SECONDS)
            record = self._record(pending) | {"acceptance": acceptance}
            pipe.hset(keys.turn(pending.id), mapping=record)
            # Never answered (its platform no longer served), it goes with its conversation
            # (but kept a day at least: `kept_seconds`).
            pipe.expire(keys.turn(pending.id), self.kept_seconds)
            pipe.zadd(keys.PENDING_TURNS, {pending.id: pending.accepted_at})
            if turn.command is not None:  # a reset or forget: no message waiting for an
                return True  # answer (a sender's count, a `forget`'s drop), nor a starter
            by = keys.pending_by(turn.conversation.platform, turn.author)
            for index in (by, keys.pending_in(pending.conversation)):
                pipe.zadd(index, {pending.id: pending.accepted_at})
                pipe.expire(index, self.kept_seconds)
            if regenerates is None:  # a regeneration's conversation has its starter, or
                # was forgotten since the press: it must not be known again
                self._store.queue_starter(pipe, pending.conversation, turn.author)
            return True

        try:
            accepted = await self._transaction([seen], write)
        except Exception:
            self._refused.setdefault(pending.id, set()).add(acceptance)
            raise
        if accepted:  # a delivery again, after one refused: this one is answered
            self._refused.pop(pending.id, None)
        return pending if accepted else None

    async def take_back(self, pending: PendingTurn, answer: str) -> bool:
        """A regeneration's first step: remove the conversation's last question and its
        `answer`, which the record keeps (put back should the new answer fail), in one
        MULTI, once however often this is retried; False if the turn is no longer ours."""
        conversation = keys.conversation(pending.conversation)

        async def write(pipe: Pipeline) -> bool:
            if not await self._ours(pipe, pending):
                return False
            if await pipe.hexists(keys.turn(pending.id), "kept"):
                return True  # an earlier try got through (its reply may have been lost)
            pipe.multi()
            pipe.ltrim(conversation, 0, -3)
            pipe.hset(keys.turn(pending.id), "kept", answer)
            return True

        return await self._transaction([keys.turn(pending.id), conversation], write)

    async def begin(self, pending: PendingTurn) -> PendingTurn | None:
        """Put the user's message into the history (once, however often this is retried);
        None if the turn is no longer ours."""
        if pending.stored:
            return pending
        conversation = keys.conversation(pending.conversation)

        async def write(pipe: Pipeline) -> bool:
            if not await self._ours(pipe, pending):
                return False
            if await pipe.hget(keys.turn(pending.id), "stored") == "1":
                return True  # an earlier try got through (its reply may have been lost)
            new_thread = not await pipe.exists(conversation)
            pipe.multi()
            if new_thread:  # the thread's earlier messages, read when the bot joined it
                self._store.queue_append(pipe, pending.conversation, *pending.turn.context)
            self._store.queue_append(pipe, pending.conversation, user_message(pending.turn))
            # Named at accept, but a `forget` between (this turn came after it) took it.
            self._store.queue_starter(pipe, pending.conversation, pending.turn.author)
            pipe.hset(keys.turn(pending.id), "stored", "1")
            return True

        written = await self._transaction([keys.turn(pending.id), conversation], write)
        return replace(pending, stored=True) if written else None

    async def keep_context(self, pending: PendingTurn) -> None:
        """For a turn refused before it began (its message too long): the thread's earlier
        messages, read when the bot joined it, stored where the conversation has none yet,
        as `begin` would have. The bot now knows the thread: its next turn there reads
        them, where the adapter reads them no more."""
        conversation = keys.conversation(pending.conversation)
        if not pending.turn.context:
            return

        async def write(pipe: Pipeline) -> bool:
            if not await self._ours(pipe, pending) or await pipe.exists(conversation):
                return False
            pipe.multi()
            self._store.queue_append(pipe, pending.conversation, *pending.turn.context)
            return True

        await self._transaction([keys.turn(pending.id), conversation], write)

    async def save(self, pending: PendingTurn, *, target: dict[str, Any] | None = None,
                   answer: str | None = None, tokens: tuple[int, int] | None = None,
                   failure: str | None = None) -> bool:  # fmt: skip
        """Record progress (where the answer is posted, the answer itself and its prompt
        and answer `tokens`, or the failure the user is told, with the answer it keeps:
        none but a regeneration's old one, so an answer generated and saved before is
        dropped); False if the turn is no longer ours."""
        fields = {"target": json.dumps(target)} if target is not None else {}
        fields |= {
            name: value for name, value in (("answer", answer), ("failure", failure)) if value
        }
        if tokens is not None:
            fields["tokens"] = json.dumps(tokens)
        dropped = failure is not None and not answer  # after a restart, stored as told

        async def write(pipe: Pipeline) -> bool:
            if not await self._ours(pipe, pending):
                return False
            pipe.multi()
            pipe.hset(keys.turn(pending.id), mapping=fields)
            if dropped:
                pipe.hdel(keys.turn(pending.id), "answer", "tokens")
            return True

        return await self._transaction([keys.turn(pending.id)], write)

    async def finish(self, pending: PendingTurn, answer: str | None = None) -> bool:
        """Store the answer (if any) and remove the record, in one MULTI. An answer goes
        after its question: where other messages came after the question (it was asked
        again at the end), or a reset took it, the question is stored again before it."""
        done = keys.once(uuid.uuid4().hex)  # tells our own earlier try, which left no record
        question = user_message(pending.turn)

        async def write(pipe: Pipeline) -> bool:
            if await pipe.exists(done):  # an earlier try got through (its reply was lost)
                return True
            if not await self._ours(pipe, pending):
                return False
            asked_again = not await self._store.ends_with(pipe, pending.conversation, question)
            pipe.multi()
            pipe.set(done, "1", ex=TOKEN_KEPT_S)
            if answer is not None:
                message: ChatMessage = {"role": "assistant", "content": answer}
                exchange = [question, message] if asked_again else [message]
                self._store.queue_append(pipe, pending.conversation, *exchange)
            self._queue_removal(pipe, pending.id, pending.conversation)
            return True

        watched = [keys.turn(pending.id), keys.conversation(pending.conversation)]
        return await self._transaction(watched, write)

    async def reset(self, pending: PendingTurn, reply: str) -> str | None:
        """Carry out a `reset` turn: its conversation's history emptied, cut where it was
        asked (`ConversationStore.queue_clear`), and its `reply` saved, in one MULTI, once
        however often this is retried. The reply saved; None if the turn is no longer ours."""

        async def effect(pipe: Pipeline) -> str:
            pipe.multi()
            self._store.queue_clear(
                pipe, pending.conversation, at=pending.accepted_at, message=pending.turn.message_id
            )
            return reply

        return await self._carry_out(pending, [], effect)

    async def forget(self, pending: PendingTurn, reply: Callable[[int], str]) -> str | None:
        """Carry out a `forget` turn: everything stored of its conversation deleted, and its
        turns accepted before it that are still pending (left for a later try, or a gone
        process's) dropped, with its reply (`reply` of how many), in one MULTI, once however
        often this is retried: none of them is answered, nor stores anything, after this
        (a turn asks `owns` once it holds the conversation's lock). The reply saved; None
        if the turn is no longer ours. Acceptance times are each process's clock: across
        machines, as near as theirs."""
        index = keys.pending_in(pending.conversation)
        asked_at = pending.accepted_at

        async def effect(pipe: Pipeline) -> str:
            earlier = await pipe.zrangebyscore(index, "-inf", asked_at)
            scores = await pipe.zmscore(keys.PENDING_TURNS, earlier) if earlier else []
            pipe.multi()
            self._store.queue_forget(
                pipe, pending.conversation, at=asked_at, message=pending.turn.message_id
            )
            dropped = [turn_id for turn_id, at in zip(earlier, scores, strict=True) if at]
            for turn_id in dropped:
                self._queue_removal(pipe, turn_id)
            if earlier:  # dropped now, or finished before
                pipe.zrem(index, *earlier)
            return reply(len(dropped))

        return await self._carry_out(pending, [index], effect)

    async def owns(self, pending: PendingTurn) -> bool:
        """Whether the turn is still ours: not taken over, nor dropped by a `forget`."""
        return await self._ours(self._redis, pending)

    async def abandon(self, pending: PendingTurn) -> None:
        """Remove the record, leaving the conversation alone: for a turn that cannot be
        closed (its history unreadable), given up on, so it is not taken up for ever."""

        async def write(pipe: Pipeline) -> None:
            if await self._ours(pipe, pending):
                pipe.multi()
                self._queue_removal(pipe, pending.id, pending.conversation)

        await self._transaction([keys.turn(pending.id)], write)

    async def release(self, pending: PendingTurn) -> None:
        """Leave a turn for the next process without counting this try (a clean stop)."""

        async def write(pipe: Pipeline) -> bool:
            if not await self._ours(pipe, pending):
                return False
            pipe.multi()
            pipe.hset(keys.turn(pending.id), "attempts", str(pending.attempts - 1))
            return True

        await self._transaction([keys.turn(pending.id)], write)

    # --- claiming the turns of processes that are gone ---------------------------------

    async def claim(
        self,
        scopes: Collection[str],
        *,
        orphaned: Collection[str] = (),
        uncounted: Collection[str] = (),
        stop: Callable[[], bool] = lambda: False,
        limit: int | None = None,
    ) -> list[PendingTurn]:
        """Take over, in arrival order, the pending turns in `scopes` (turn id prefixes,
        such as `slack`) whose owner's lease is gone, and of our own only those listed as
        `orphaned` (their task gave them up); each claim counts as an attempt, but for
        those `uncounted` (left in an outage, whose `release` failed). Stops claiming as
        soon as `stop()` says so, or `limit` are claimed."""
        claimed: list[PendingTurn] = []
        expired = time.time() - self.kept_seconds  # their records are gone
        await self._redis.zremrangebyscore(keys.PENDING_TURNS, "-inf", expired)
        renewed, refused = time.monotonic(), set(self._refused)
        indexed = await self._redis.zrange(keys.PENDING_TURNS, 0, -1)
        await self._drop_refused(refused, indexed)  # first: a full queue claims none
        # Should this raise, the caller never gets those claimed: they stay in doubt, and
        # the next pass takes them again, as they are.
        for turn_id in indexed:
            if stop() or (limit is not None and len(claimed) >= limit):
                break
            if time.monotonic() - renewed > self.lease_seconds / 3:  # a long pass (a backlog)
                await self.renew_lease()  # must not let our running turns go to others
                renewed = time.monotonic()
            if (
                turn_id not in refused
                and in_scope(turn_id, scopes)
                and (pending := await self._claim(turn_id, orphaned, uncounted))
            ):
                claimed.append(pending)
        for pending in claimed:
            del self._claims_in_doubt[pending.id]
        return claimed

    async def drop_refused(self) -> None:
        """Drop what refused tries wrote all the same (`_drop_refused`), where no more
        claims will (a stop has begun): the next process would answer them."""
        if refused := set(self._refused):
            await self._drop_refused(refused, await self._redis.zrange(keys.PENDING_TURNS, 0, -1))

    async def _drop_refused(self, refused: set[str], indexed: Collection[str]) -> None:
        """A turn whose user was told it could not be taken goes unanswered, as told,
        should one of its refused tries have written its record all the same. `refused`
        were taken before `indexed` was read: those not in it, nothing of them landed."""
        landed = refused.intersection(indexed)
        for turn_id in refused - landed:  # at once: one refused again later may land
            self._refused.pop(turn_id, None)
        for turn_id in landed:
            if (acceptances := self._refused.pop(turn_id, None)) is not None:
                await self._drop_refused_turn(turn_id, acceptances)

    async def _drop_refused_turn(self, turn_id: str, acceptances: set[str]) -> None:
        async def write(pipe: Pipeline) -> bool:
            owner, acceptance = await pipe.hmget(keys.turn(turn_id), ["owner", "acceptance"])
            if owner != self.owner or acceptance not in acceptances:
                return False
            pipe.multi()
            self._queue_removal(pipe, turn_id)
            return True

        try:
            dropped = await self._transaction([keys.turn(turn_id)], write)
        except Exception:
            self._refused[turn_id] = acceptances  # the next pass tries again
            raise
        if dropped:
            logger.info("dropped turn %s, refused to its user in an outage", turn_id)

    async def count(self, scopes: Collection[str] | None = None) -> int:
        """Turns accepted and not yet finished, by any process: of `scopes` alone, if
        given (those of other platforms, the console's say, no process here takes up)."""
        if scopes is None:
            return await self._redis.zcard(keys.PENDING_TURNS)
        pending = await self._redis.zrange(keys.PENDING_TURNS, 0, -1)
        return sum(in_scope(turn_id, scopes) for turn_id in pending)

    async def is_pending(self, turn_id: str) -> bool:
        """Whether the turn is accepted and not yet finished, by any process."""
        return await self._redis.zscore(keys.PENDING_TURNS, turn_id) is not None

    async def pending_of(self, platform: str, user: str) -> int:
        """How many of `user`'s turns are accepted and not yet finished, by any process
        (those finished since the last count are dropped from the user's index)."""
        by = keys.pending_by(platform, user)
        if not (indexed := await self._redis.zrange(by, 0, -1)):
            return 0
        scores = await self._redis.zmscore(keys.PENDING_TURNS, indexed)
        if finished := [turn_id for turn_id, at in zip(indexed, scores, strict=True) if at is None]:
            await self._redis.zrem(by, *finished)
        return len(indexed) - len(finished)

    async def pending_ids(self) -> set[str]:
        """Every turn accepted and not yet finished, by any process."""
        return set(await self._redis.zrange(keys.PENDING_TURNS, 0, -1))

    async def _claim(
        self, turn_id: str, orphaned: Collection[str], uncounted: Collection[str]
    ) -> PendingTurn | None:
        key = keys.turn(turn_id)
        # Tells our own earlier try from another claim; in doubt until the caller has it.
        claim = self._claims_in_doubt.setdefault(turn_id, uuid.uuid4().hex)

        async def write(pipe: Pipeline) -> PendingTurn | None:
            record = await pipe.hgetall(key)
            if record.get("claim") == claim:  # an earlier try got through (its reply was lost)
                earlier = _parse(turn_id, record)
                return earlier and replace(earlier, taken_up=True)
            owner = record.get("owner")
            # Both read now, together: a turn orphaned since the claim began is left
            # uncounted in the same step (`ChatService._leave_for_later`).
            count = turn_id not in uncounted
            if owner == self.owner and turn_id not in orphaned:
                # Ours, and being answered (or just accepted), whatever an earlier try of
                # this claim did not get to read (one that wrote was found above).
                return None
            if owner and owner != self.owner:
                if time.monotonic() - self._in_touch_since < self.lease_seconds:
                    return None  # its lease may have lapsed in our gap, not its owner
                await pipe.watch(keys.owner(owner))  # a renewal now must abort the claim
                if await pipe.exists(keys.owner(owner)):
                    return None
            pending = _parse(turn_id, record)
            pipe.multi()
            if pending is None:  # gone, or unreadable: drop it rather than retry forever
                self._queue_removal(pipe, turn_id)
                return None
            attempts = pending.attempts + count
            pipe.hset(key, mapping={"owner": self.owner, "claim": claim, "attempts": attempts})
            return replace(pending, attempts=attempts, taken_up=True)

        claimed = await self._transaction([key], write)  # (raising, it stays in doubt)
        if claimed is None:
            del self._claims_in_doubt[turn_id]
        return claimed

    # --- helpers ------------------------------------------------------------------------

    def _record(self, pending: PendingTurn) -> dict[str, str]:
        record = {
            "turn": json.dumps(asdict(pending.turn), ensure_ascii=False),
            "target": json.dumps(pending.target),
            "accepted_at": repr(pending.accepted_at),
            "attempts": str(pending.attempts),
            "owner": self.owner,
        }
        if pending.regenerates is not None:
            record["regenerates"] = json.dumps(pending.regenerates)
        return record

    async def _carry_out(
        self, pending: PendingTurn, watched: list[str], effect: Callable[[Pipeline], Awaitable[str]]
    ) -> str | None:
        """A command's `effect` (which reads, opens the MULTI and queues its writes) and
        the reply it returns, saved as the turn's answer, in one MULTI; once: a turn that
        has its answer was carried out before."""
        key = keys.turn(pending.id)

        async def write(pipe: Pipeline) -> str | None:
            if not await self._ours(pipe, pending):
                return None
            if (done := await pipe.hget(key, "answer")) is not None:
                return done  # an earlier try got through (its reply may have been lost)
            reply = await effect(pipe)
            pipe.hset(key, "answer", reply)
            return reply

        return await self._transaction([key, *watched], write)

    async def _ours(self, client: Redis | Pipeline, pending: PendingTurn) -> bool:
        return await client.hget(keys.turn(pending.id), "owner") == self.owner

    @staticmethod
    def _queue_removal(pipe: Pipeline, turn_id: str, conversation: str | None = None) -> None:
        """Queue a turn's removal, and from its conversation's index where it is known
        (a turn ended there; those dropped unread stay until `forget` or its expiry)."""
        pipe.delete(keys.turn(turn_id))
        pipe.zrem(keys.PENDING_TURNS, turn_id)
        if conversation is not None:
            pipe.zrem(keys.pending_in(conversation), turn_id)

    async def _transaction(
        self, watched: list[str], write: Callable[[Pipeline], Awaitable[T]]
    ) -> T:
        """WATCH `watched`, let `write` read and queue a MULTI, execute; retried on a
        WatchError, so the result is always consistent. redis-py raises WatchError too when
        the connection breaks while waiting for EXEC's reply, after Redis may have run it:
        `accept`, `begin`, `keep_context`, `save`, `finish`, `claim` and `_carry_out` check
        whether an earlier try took effect, and `release` sets the count of attempts rather
        than adding to it. The last try's WatchError from a broken connection is the outage
        it hides."""
        for _ in range(WATCH_TRIES - 1):
            try:
                return await self._once(watched, write)
            except WatchError:
                continue
        try:
            return await self._once(watched, write)
        except WatchError as error:
            if error.__context__ is not None and is_outage(error.__context__):
                raise error.__context__ from error
            raise

    async def _once(self, watched: list[str], write: Callable[[Pipeline], Awaitable[T]]) -> T:
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.watch(*watched)
            result = await write(pipe)
            if pipe.explicit_transaction:  # `write` opened a MULTI: run it
                await pipe.execute()
            return result


def in_scope(turn_id: str, scopes: Collection[str]) -> bool:
    """Whether a turn id (`platform:message id`) starts with one of `scopes` and a colon."""
    return any(turn_id.startswith(f"{scope}:") for scope in scopes)


def user_message(turn: Turn) -> ChatMessage:
    message: ChatMessage = {"role": "user", "content": turn.text}
    if turn.author_name:
        message["name"] = turn.author_name
    return message


def _parse(turn_id: str, record: dict[str, str]) -> PendingTurn | None:
    """A record back as a PendingTurn; None (with a warning) if missing or unreadable."""
    if not record:
        return None
    try:
        raw = json.loads(record["turn"])
        turn = Turn(
            conversation=ConversationKey(**raw["conversation"]),
            author=raw["author"],
            text=raw["text"],
            message_id=raw["message_id"],
            context=tuple(raw.get("context") or ()),
            author_name=raw.get("author_name", ""),
            channel_name=raw.get("channel_name", ""),
            bot_name=raw.get("bot_name", ""),
            command=raw.get("command"),
        )
        return PendingTurn(
            turn,
            json.loads(record["target"]),
            accepted_at=float(record["accepted_at"]),
            attempts=int(record["attempts"]),
            stored=record.get("stored") == "1",
            answer=record.get("answer"),
            tokens=tuple(json.loads(record["tokens"])) if "tokens" in record else None,
            failure=record.get("failure"),
            regenerates=json.loads(record["regenerates"]) if "regenerates" in record else None,
            kept=record.get("kept"),
        )
    except (KeyError, TypeError, ValueError):
        logger.warning("dropping unreadable pending turn %s", turn_id)
        return None
