"""ChatService: one turn's whole life, platform-free, durable from the moment it is accepted.

A `Turn` comes in from an adapter. `accept` checks it and records it in the journal (one
MULTI: message seen, pending record with the reply target) before anything slow; the
answer then runs as a task of the service: under the conversation's lock the user's
message joins the history, the prompt is built and trimmed to the token budget, queued,
and streamed into the adapter's `ReplySink`; the answer is stored and the record removed
in one MULTI. A turn left unfinished (crash, stop, storage outage, engine death) stays in
the journal, and is claimed and answered once, by this process or the next, through a
sink that the adapter rebuilds from the saved target. Every user-facing outcome goes
through the sink; nothing here raises to adapters for a failure the user should hear of.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from bot import replies
from bot.access import Requester, refusal
from bot.config import ConfigError
from bot.hygiene import AnswerFilter
from bot.metrics import Metrics, Outcome
from bot.personas import Voice, fill, placeholder_values, voice_for
from bot.prompt import TokenCounter, fit, named, sanitized, several_people, tokens_over_budget
from bot.queue import (
    AnswerRestarted,
    EngineStopped,
    Generation,
    Inference,
    InferenceCancelled,
    InferenceTimeout,
    QueueFull,
)
from bot.team import Team
from bot.turn_report import Generated, report_answered
from bot.types import (
    ADMIN_COMMANDS,
    JOURNALED_COMMANDS,
    ChatMessage,
    ConversationKey,
    NowhereToAnswer,
    ReplySink,
    Turn,
)
from bot.waiting import set_within
from storage.errors import is_outage
from storage.limits import Limits
from storage.locks import ConversationLocks
from storage.reloads import TeamReloads
from storage.stats import TurnStats
from storage.store import ConversationStore
from storage.turns import PendingTurn, TurnJournal, in_scope, user_message

logger = logging.getLogger(__name__)

SinkFactory = Callable[[dict[str, Any], Callable[..., object]], ReplySink]
"""An adapter's way back into a thread: a sink for a saved reply target, given what stops
its answer (as the platform's own stop control, Slack's on a native stream, would; with
what it showed: `stop_answer`'s `shown`)."""

STATS_WINDOW_S = 3600  # what `stats` reports on
PAUSE_SECONDS = 10  # at a stop, for the unfinished answers to say they will be answered
# A turn lets go of its conversation only once its answer, shown with its buttons, is
# stored: a Regenerate pressed meanwhile waits this long for it, and is refused after.
REGENERATE_WAIT_S = 3.0
COMMAND_WAIT_S = 600.0
"""How long a `reset` or `forget` waits for the answers written before it: then the sender
hears to send it again (Discord's reply to a slash command must come within 15 minutes)."""
FAILURES_KEPT = 1000  # messages told they failed: a platform's redelivery is not told again
PLATFORM_RETRY_S = 15.0
"""A turn the platform did not show is tried again after this long, doubled at each try:
taken up at the resume passes' pace (every few seconds), a platform's passing trouble
would use up TURN_MAX_ATTEMPTS within seconds."""


class AnswerStopped(Exception):
    """Ends a generation early: the asker stopped it, and what was written is the answer."""


class _WaitedTooLong(Exception):
    """A reset or forget waited `COMMAND_WAIT_S` for the answers before it: nothing done."""


class _NotShown(Exception):
    """The platform did not take a turn's first message or its answer (a 5xx, a lost
    connection, a thread gone): the turn is tried again later, as after a crash."""

    def __init__(self, answer: str | None = None) -> None:
        super().__init__()
        self.answer = answer  # written and saved in the turn's record: shown, not written


async def _shown(showing: Awaitable[None], answer: str | None = None) -> None:
    """Await a sink's call, a failure of it (but storage's, or a place gone for good)
    raised as `_NotShown`."""
    try:
        await showing
    except Exception as error:
        if is_outage(error) or isinstance(error, NowhereToAnswer):
            raise
        raise _NotShown(answer) from error


class ChatService:
    """Answers turns from any adapter, remembering each conversation in the store."""

    def __init__(
        self,
        *,
        store: ConversationStore,
        journal: TurnJournal,
        locks: ConversationLocks,
        queue: Inference,
        count_tokens: TokenCounter,
        prompt_budget: int,
        team: Team,
        limits: Limits,
        stats: TurnStats,
        reloads: TeamReloads,
        max_attempts: int,
        model_name: str = "the model",
        metrics: Metrics | None = None,
        platform_retry_s: float = PLATFORM_RETRY_S,
        reloads_seen: int | None = None,
        prompt_opens_reasoning: bool = False,
    ) -> None:
        self.store = store
        self.journal = journal
        self.locks = locks  # one turn at a time per conversation: each holds the last answer
        self.queue = queue
        self.count_tokens = count_tokens
        # The chat template opens a <think> block (DeepSeek-R1's): answers begin inside it.
        self.prompt_opens_reasoning = prompt_opens_reasoning
        # Tokens for the prompt when answers may take MAX_NEW_TOKENS; a persona that allows
        # longer answers leaves its prompts less.
        self.prompt_budget = prompt_budget
        self.team = team  # the rules in effect now: read at each use, a reload swaps them
        self.limits = limits
        self.stats = stats
        self.reloads = reloads
        # The count of reload commands, as last read: where the team's settings were read
        # (before a model's load), else at the first resume pass.
        self._reloads_seen = reloads_seen
        self.max_attempts = max_attempts
        self.platform_retry_s = platform_retry_s
        self.model_name = model_name
        self.metrics = metrics if metrics is not None else Metrics()  # turns and their latency
        self._pending: Counter[str] = Counter()  # per user: turns accepted, not yet answered
        self._accepting: set[str] = set()  # turns being taken: a twin delivery waits for none
        self._failures_told: dict[str, None] = {}  # turn ids, oldest first (`told_once`)
        self._running: dict[str, asyncio.Task[None]] = {}  # by turn id (and command id)
        self._generations: dict[str, Generation] = {}  # by turn id, while streaming
        self._shown_at_stop: dict[str, str] = {}  # by turn id: `stop_answer`'s `shown`
        self._scopes: dict[str, SinkFactory] = {}  # connected adapters, for resuming
        # Our turns whose task gave them up when storage was lost, with their sinks (which
        # know every message posted, saved or not), to be taken up again once it is back.
        self._orphaned: dict[str, ReplySink] = {}
        self._release_owed: set[str] = set()  # orphaned turns whose last try is not to count
        # Their answers written, not saved (storage lost at the save): delivered once it is
        # back, as saved ones are, not written anew (a Stop pressed meanwhile stands).
        self._unsaved: dict[str, tuple[str, tuple[int, int]]] = {}  # with its tokens
        # Regenerated turns' old answers, by turn id: put back if the new one fails.
        self._taken_back: dict[str, str] = {}
        self._resuming = asyncio.Lock()  # one claim pass at a time
        self._resume_now = asyncio.Event()
        self._closing = False  # draining: no new turns
        self._stopped = False  # the lease is no longer kept

    # --- what adapters call -------------------------------------------------------------

    def serve_platform(self, scope: str, rebuild: SinkFactory) -> None:
        """An adapter is connected: its pending turns may now be resumed, through sinks
        that `rebuild` makes from saved reply targets. `scope` is its platform (`slack`),
        or a platform and message-id prefix (`console:NAME`) to resume only those turns."""
        self._scopes[scope] = rebuild
        self._resume_now.set()

    async def admit(
        self,
        who: Requester,
        conversation: ConversationKey,
        tell: Callable[[str], Awaitable[Any]],
    ) -> bool:
        """Whether the access rules let `who` use the bot here. If not, `tell` (a post in
        the conversation) says so at most once an hour to that person in that channel (so
        at most once an hour per conversation, and never a reply to each of many mentions),
        unless the team chose `deny: silent`."""
        access = self.team.settings.access
        if (reason := refusal(access, who)) is None:
            return True
        logger.info("denied %s user %s in %s: %s", who.platform, who.user, conversation, reason)
        self.metrics.count_turn(who.platform, "denied")
        told = f"{conversation.platform}:{conversation.workspace}:{conversation.channel}:{who.user}"
        if access.deny == "reply" and await self.limits.first_denial(told):
            try:
                await tell(replies.denied())
            except Exception:
                logger.warning("could not tell %s it is denied", conversation, exc_info=True)
        return False

    async def knows(self, conversation: ConversationKey) -> bool:
        """Whether the bot has history in this conversation (adapters answer there unasked)."""
        return await self.store.exists(str(conversation))

    async def accept(self, turn: Turn, sink: ReplySink) -> asyncio.Task[None] | None:
        """Take a turn: once this returns, it is recorded and will be answered exactly once,
        by the returned task (or, after a stop, by the next process). None when the turn
        was a re-delivery, or was answered at once (bad input, storage unavailable).

        A second delivery of a message while the first is being taken (Slack sends a
        mention as `app_mention` and as `message`; a retry) is a re-delivery at once: it
        would count the first against the sender's limits, and its refusal would mark the
        message seen before the first was recorded, which then went unanswered."""
        turn_id = turn.id
        if turn_id in self._accepting:
            return _skipped(turn)
        self._accepting.add(turn_id)
        try:
            return await self._accept(turn, sink)
        except Exception as error:
            if not is_outage(error):
                raise
            logger.warning("storage unavailable; message %s refused: %s", turn.message_id, error)
            if self.told_once(turn_id):
                if turn.command is None:
                    self.metrics.count_turn(turn.conversation.platform, "failed")
                await sink.fail(replies.storage_unavailable())
            return None
        finally:
            self._accepting.discard(turn_id)

    async def being_answered(self, turn: Turn) -> bool:
        """Whether the turn's message is being taken or answered, here or elsewhere (as
        far as storage says: unreachable, no)."""
        turn_id = turn.id
        if turn_id in self._accepting:
            return True
        try:
            return await self.journal.is_pending(turn_id)
        except Exception as error:
            if not is_outage(error):
                raise
            return False

    def told_once(self, turn_id: str) -> bool:
        """Whether a message that could not be taken (storage down when it came) is to be
        told so now: the first time. Slack delivers an event again until one delivery is
        acknowledged, and one refused in an outage is acknowledged late, after Redis's
        retries: each of up to four deliveries would say it again."""
        if turn_id in self._failures_told:
            return False
        if len(self._failures_told) >= FAILURES_KEPT:
            del self._failures_told[next(iter(self._failures_told))]
        self._failures_told[turn_id] = None
        return True

    async def handle(self, turn: Turn, sink: ReplySink) -> None:
        """Take a turn and wait for its answer (the tests; an adapter goes through
        `adapters.base.answer`, which says a failure in the thread)."""
        if task := await self.accept(turn, sink):
            await task

    # --- what the process runner calls ---------------------------------------------------

    async def keep_resuming(self) -> None:
        """Until `stop`: keep our lease (through a drain too, or another process would take
        over the answers still finishing), and until a drain, answer the pending turns
        whose owner is gone (every process's at start, a crashed one's after its lease).

        Stopped by a flag, not by cancellation: on Python 3.11 a cancel that lands inside
        redis-py's `wait_for` can be swallowed, and the loop would go on. One last pass
        follows the stop (`resume` then drops what refused messages left)."""
        outage = False
        while True:
            last = self._stopped
            try:
                await self._follow_reloads()
                await self.resume()
                if outage:
                    logger.warning("storage is reachable again")
                outage = False
            except Exception as error:
                if not is_outage(error):
                    logger.exception("resuming pending turns failed; trying again")
                else:
                    self.journal.lost_touch()
                    if not outage:
                        logger.warning("storage unavailable; retrying: %s", error)
                    outage = True
            if last:
                return
            self._resume_now.clear()
            await set_within(self._resume_now, self.journal.lease_seconds / 3)

    async def resume(self) -> None:
        """Renew our lease, and (unless stopping) start answering the pending turns we may
        take over."""
        async with self._resuming:  # two passes at once could both take an orphaned turn
            await self.journal.renew_lease()
            if self._closing:
                await self.journal.drop_refused()  # else the next start answers them
                return
            await self._let_go_of_finished()
            claimed = await self.journal.claim(
                self._scopes, orphaned=self._orphaned, uncounted=self._release_owed,
                stop=lambda: self._closing, limit=self._room(),
            )  # fmt: skip
            self._release_owed.difference_update(pending.id for pending in claimed)
            for pending in claimed:
                if self._closing:  # a stop began meanwhile: the next start takes it
                    await self.journal.release(pending)
                else:
                    self._resume(pending)

    def _room(self) -> int:
        """How many more turns the queue takes now: turns taken over beyond that would
        only wait for room (the rest stay pending for later passes). A running turn task
        not yet streaming holds its place, as its request may not be in the queue yet."""
        return max(self.queue.room - (len(self._running) - len(self._generations)), 0)

    def stop(self) -> None:
        """Take no new turns, resume none, and let `keep_resuming` return (the lease is
        no longer renewed)."""
        self._closing = self._stopped = True
        self._resume_now.set()

    @property
    def draining(self) -> bool:
        """Whether a stop has begun: no new turn is taken."""
        return self._closing

    async def settled(self) -> None:
        """Until the turns running now are over: answered, failed or left for later."""
        if running := set(self._running.values()):
            await asyncio.wait(running)

    async def drain(self, grace: float) -> int:
        """Stop taking turns, give running answers `grace` seconds, then leave the rest
        pending for the next start (their threads say so). Returns how many were left."""
        self._closing = True
        running = set(self._running.values())
        if not running:
            return 0
        logger.info("waiting up to %gs for %d running turns", grace, len(running))
        _, left = await asyncio.wait(running, timeout=grace)
        for task in left:
            task.cancel()
        if left:  # each says in its thread that it will be answered; bounded, come what may
            await asyncio.wait(left, timeout=PAUSE_SECONDS)
            logger.warning("%d turns left pending for the next start", len(left))
        return len(left)

    # --- accepting ----------------------------------------------------------------------

    async def _over_limits(
        self,
        platform: str,
        user: str,
        request_id: str,
        again: str = replies.SEND_AGAIN,
        *,
        capped: bool = True,
    ) -> str | None:
        """Why `user` may not ask for another answer now (RATE_LIMIT_PER_MINUTE, or, where
        `capped`, too many answers pending, here or in any process), if so. Nothing awaits
        after this process's count is read: those it is still taking are not in the journal
        yet."""
        settings = self.team.settings
        bucket, took = f"{platform}:{user}", False
        if per_minute := settings.access.rate_limit_per_minute:
            wait, took = await self.limits.take(bucket, f"{platform}:{request_id}", per_minute)
            if wait:
                return replies.rate_limited(wait, again)
        if not capped:
            return None
        anywhere = await self.journal.pending_of(platform, user)
        if (pending := max(anywhere, self._pending[user])) >= settings.max_pending_per_user:
            if took:  # a message refused costs no message of the rate
                await self.limits.give_back(bucket, per_minute)
            return replies.slow_down(pending, again)
        return None

    async def _accept(self, turn: Turn, sink: ReplySink) -> asyncio.Task[None] | None:
        platform = turn.conversation.platform
        text = sanitized(turn.text)
        refusal: tuple[Outcome, str] | None = None
        settings = self.team.settings
        if turn.command is None:
            if not text:
                refusal = "empty", replies.empty_message()
            elif len(text) > settings.max_input_chars:
                refusal = "too_long", replies.too_long(len(text), settings.max_input_chars)
            # From this check to the count below, nothing may await: a burst of messages
            # would all pass it.
            elif limited := await self._over_limits(
                platform, turn.author, turn.message_id, capped=not turn.read_back
            ):
                refusal = "rate_limited", limited
        # Answered at once; a reset or forget is taken as a message is, to its turn.
        instant = turn.command is not None and turn.command not in JOURNALED_COMMANDS
        if instant and self._closing:  # not marked seen: a re-delivery may carry it out
            await sink.fail(replies.restarting_resend())
            return None
        if refusal or instant:
            if not await self.store.first_seen(platform, turn.message_id):
                return _skipped(turn)
            if refusal:
                outcome, reply = refusal
                self.metrics.count_turn(platform, outcome)
                await sink.finish(reply)
                return None
            if self._closing:  # a stop began as it was marked seen: its drain would miss it
                await sink.fail(replies.restarting_resend())
                return None
            return self._spawn(turn.id, self._command(turn, sink))

        context = tuple(
            ChatMessage(message, content=sanitized(message["content"])) for message in turn.context
        )
        counts = turn.command is None  # a reset or forget is no message waiting for an answer
        if counts:  # counted now, so messages arriving meanwhile see it
            self._pending[turn.author] += 1
        accepted = None
        try:
            accepted = await self.journal.accept(
                replace(turn, text=text, context=context), sink.reply_target()
            )
            if accepted is not None and self._closing:  # stopping: the next start answers it
                self._track(accepted, sink)
                await self._leave_for_later(accepted, sink, release=True)
        finally:
            if counts and (accepted is None or self._closing):
                self._uncount(turn.author)
        if accepted is None:
            return _skipped(turn)
        return None if self._closing else self._start(accepted, sink, counted=True)

    async def _let_go_of_finished(self) -> None:
        """Forget orphaned turns that are pending no more: another process took them up
        and finished them (our lease lapsed in an outage). Their sinks were kept forever."""
        if not (self._orphaned or self._release_owed or self._unsaved):
            return
        pending = await self.journal.pending_ids()
        for kept in (self._orphaned, self._unsaved):
            for turn_id in kept.keys() - pending:
                del kept[turn_id]
        self._release_owed &= pending

    def _resume(self, pending: PendingTurn) -> None:
        logger.info(
            "resuming turn %s (attempt %d of %d)", pending.id, pending.attempts, self.max_attempts
        )
        try:
            if (sink := self._orphaned.pop(pending.id, None)) is None:
                rebuild = next(
                    r for scope, r in self._scopes.items() if in_scope(pending.id, [scope])
                )
                sink = rebuild(
                    pending.target, partial(self.stop_answer, pending.id, by=pending.turn.author)
                )
        except Exception:  # e.g. a target saved by an older version: never block the others
            logger.exception("cannot reach the thread of turn %s; dropping it", pending.id)
            self._spawn(pending.id, self._drop(pending))
            return
        if pending.regenerates is None:
            self._start(pending, sink)
        else:  # its old answer taken back first, if it was not yet
            self._start(pending, sink, before=partial(self._take_back_answer, pending))

    def _start(
        self,
        pending: PendingTurn,
        sink: ReplySink,
        *,
        counted: bool = False,
        before: Callable[[], Awaitable[bool]] | None = None,
    ) -> asyncio.Task[None]:
        """Answer `pending` in a task of its own; a message counts as the author's until
        done (a reset or forget does not)."""
        author = pending.turn.author
        counts = pending.turn.command is None
        if counts and not counted:
            self._pending[author] += 1
        self._track(pending, sink)
        task = self._spawn(pending.id, self._run(pending, sink, before))
        if counts:
            task.add_done_callback(lambda _: self._uncount(author))
        return task

    def _uncount(self, author: str) -> None:
        self._pending[author] -= 1
        if not self._pending[author]:
            del self._pending[author]

    def _spawn(self, key: str, work: Coroutine[Any, Any, Any]) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=f"turn {key}")
        self._running[key] = task

        def done(_: asyncio.Task[None]) -> None:
            if self._running.get(key) is task:
                del self._running[key]
                self._shown_at_stop.pop(key, None)  # a stop as it failed, say

        task.add_done_callback(done)
        return task

    def _track(self, pending: PendingTurn, sink: ReplySink) -> None:
        """Save where the answer is each time the sink posts a message."""
        sink.on_post = partial(self._save_target, pending, sink)

    async def _save_target(self, pending: PendingTurn, sink: ReplySink) -> None:
        try:
            await self.journal.save(pending, target=sink.reply_target())
        except Exception as error:  # the sink still knows; the next save carries it
            if not is_outage(error):
                raise
            logger.warning("could not save where turn %s is posted: %s", pending.id, error)

    # --- answering ------------------------------------------------------------------------

    async def _run(
        self,
        pending: PendingTurn,
        sink: ReplySink,
        before: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """A turn's task: answer it, or leave it for later, or give up on it; never raises
        for a failure the user should hear about. `before` runs first, under the
        conversation's lock; if it says no, the turn ends unanswered."""
        try:
            async with self._turn_of(pending):
                try:
                    await self._take_turn(pending, sink, before)
                except _NotShown as failure:
                    await self._not_shown(pending, sink, failure)
                except Exception as error:
                    if is_outage(error) or isinstance(error, InferenceCancelled | EngineStopped):
                        raise
                    # Under the lock: a regenerated answer that failed is put back before
                    # the conversation's next turn reads the history.
                    await self._failed(pending, sink, error)
                    return
        except asyncio.CancelledError:  # the grace period of a stop is over
            await self._leave_for_later(pending, sink, release=True)
            raise
        except _WaitedTooLong:
            await self._fail(pending, sink, replies.still_answering(str(pending.turn.command)),
                             outcome="busy")  # fmt: skip
        except InferenceCancelled:  # the queue is closing under it: a stop, not a failure
            await self._leave_for_later(pending, sink, release=True)
        except EngineStopped:
            logger.error("the engine died while answering %s; it stays pending", pending.id)
            await self._leave_for_later(pending, sink, release=False)
        except Exception as error:
            if not is_outage(error):  # in taking or giving back the lock
                await self._failed(pending, sink, error)
                return
            # The record stays: our resume loop claims it again once storage is back (not
            # before this try is given back: see `_leave_for_later`).
            logger.warning("storage lost while answering %s; it stays pending", pending.id)
            await self._leave_for_later(pending, sink, release=True,
                                        text=replies.storage_lost())  # fmt: skip
            self._orphaned[pending.id] = sink
        finally:  # a later try (here or elsewhere) reads the old answer from the record
            self._taken_back.pop(pending.id, None)

    @contextlib.asynccontextmanager
    async def _turn_of(self, pending: PendingTurn) -> AsyncIterator[None]:
        """The conversation's lock, for `pending`: a reset or forget waits for it
        `COMMAND_WAIT_S` at most (`_WaitedTooLong`), then says to send it again, since
        Discord's reply to a slash command expires after 15 minutes."""
        waiting = asyncio.timeout(COMMAND_WAIT_S if pending.turn.command else None)
        try:
            async with waiting, self.locks.hold(pending.conversation):
                waiting.reschedule(None)  # held: what it does is never cut short
                yield
        except TimeoutError as error:
            if waiting.expired():
                raise _WaitedTooLong from error
            raise

    async def _take_turn(
        self, pending: PendingTurn, sink: ReplySink, before: Callable[[], Awaitable[bool]] | None
    ) -> None:
        if pending.answer is None and (unsaved := self._unsaved.get(pending.id)) is not None:
            answer, tokens = unsaved
            owned = await self.journal.save(pending, answer=answer, tokens=tokens)  # at last
            if owned:  # (kept until then: another outage may come first)
                del self._unsaved[pending.id]
                pending = replace(pending, answer=answer, tokens=tokens)
        else:
            owned = await self.journal.owns(pending)
        if not owned:  # a `forget` dropped it while it waited, or another process took it
            _not_ours(pending)
        elif pending.failure is not None:  # told before a restart: closed as told (with the
            await self._close_failed(pending, sink)  # old answer a regeneration kept, if any)
        elif before is not None and not await before():
            await self.journal.finish(pending)
        elif pending.answer is not None:  # generated before a stop: delivered, whatever the
            await self._deliver(pending, sink, pending.answer)  # attempts (it costs no model)
        elif pending.attempts > self.max_attempts:
            logger.error("giving up on turn %s after %d attempts", pending.id, self.max_attempts)
            await self._fail(pending, sink, replies.gave_up(self.max_attempts))
        elif pending.turn.command is not None:
            await self._carry_out(pending, sink)
        else:
            await self._answer(pending, sink)

    async def _not_shown(self, pending: PendingTurn, sink: ReplySink, failure: _NotShown) -> None:
        """The platform did not show the turn: a resume pass tries again, as after a crash
        (one of TURN_MAX_ATTEMPTS; an answer written is shown, not written again). Past
        them the turn ends, and an answer written is stored all the same."""
        logger.warning("the platform did not show turn %s (attempt %d of %d)", pending.id,
                       pending.attempts, self.max_attempts, exc_info=failure.__cause__)  # fmt: skip
        if pending.attempts < self.max_attempts:
            self._retry_later(pending, sink)
        elif failure.answer is None:
            await self._fail(pending, sink, replies.failed())
        else:
            await self.journal.finish(pending, _kept(pending, failure.answer))
            self.metrics.count_turn(pending.turn.conversation.platform, "failed")

    def _retry_later(self, pending: PendingTurn, sink: ReplySink) -> None:
        """Orphan the turn once the platform had `platform_retry_s` (doubled at each try)
        to recover: a resume pass then takes it up again."""
        delay = self.platform_retry_s * 2 ** (pending.attempts - 1)
        asyncio.get_running_loop().call_later(delay, self._orphaned.__setitem__, pending.id, sink)

    async def _failed(self, pending: PendingTurn, sink: ReplySink, error: Exception) -> None:
        """A turn went wrong: fail it (with nothing said where there is nowhere to say
        it), or where storage fails us too, keep its record, to be taken up again."""
        if isinstance(error, NowhereToAnswer):
            logger.warning("turn %s is not answered: %s", pending.id, error)
        else:
            logger.error("answering %s failed", pending.id, exc_info=error)
        try:
            await self._fail(pending, sink, replies.failed())
        except Exception as closing:
            if is_outage(closing) or pending.attempts < self.max_attempts:
                logger.warning("could not close failed turn %s", pending.id, exc_info=True)
                if is_outage(closing):  # taken up again as soon as storage is back
                    self._orphaned[pending.id] = sink
                else:
                    self._retry_later(pending, sink)
                return
            logger.error("could not close failed turn %s after %d attempts; abandoned",
                         pending.id, pending.attempts, exc_info=True)  # fmt: skip
            await self.journal.abandon(pending)

    async def _answer(self, pending: PendingTurn, sink: ReplySink) -> None:
        voice = voice_for(self.team.settings, pending.turn.conversation)
        system = await self._system(pending.turn, voice)
        budget = self._budget(voice)
        # Before the message is stored: no answer could read it, and no later turn either.
        if not pending.stored and (refusal := await self._too_long(pending.turn, system, budget)):
            await self.journal.keep_context(pending)
            await self._fail(pending, sink, refusal, outcome="too_long")
            return
        started = await self.journal.begin(pending)
        if started is None:
            _not_ours(pending)
            return
        history = await self.store.load(pending.conversation)
        if history[-1:] != [question := user_message(pending.turn)]:
            # Stored by a try that died, and later turns (or a reset) came after it: it is
            # asked again at the end, its answer follows what came, and both are stored so.
            history.append(question)
        several = await self.store.had_several_people(
            pending.conversation, now=several_people(history)
        )
        messages, cut, dropped = await fit(
            system, named(history, several=several), count_tokens=self.count_tokens, budget=budget
        )
        logger.debug(
            "prompt for %s: %d messages, %d dropped", pending.conversation, len(messages), dropped
        )
        if cut:  # gone for good: the next turns' prompts start as this one does
            await self.store.drop_oldest(pending.conversation, cut)
        if dropped:  # once per trim, since the next turns have these messages no more
            await sink.notice(replies.history_dropped(dropped))
        await _shown(sink.start())
        try:
            generation = self.queue.submit(
                messages,
                user=pending.turn.author,
                conversation=pending.conversation,
                max_new_tokens=await self._answer_length(voice, messages),
                temperature=voice.temperature,
            )
        except QueueFull:
            if pending.taken_up:  # told it would be answered (or owed it): it waits
                await self._leave_for_later(started, sink, release=True,
                                            text=replies.waiting_for_room())  # fmt: skip
                self._orphaned[started.id] = sink  # for a later resume pass
            else:
                await self._fail(started, sink, replies.busy(), outcome="busy")
            return
        self._generations[started.id] = generation  # for `stop_answer`
        try:
            output, stopped = await self._stream(pending, generation, sink)
        except InferenceTimeout:
            await self._fail(started, sink, replies.timed_out())
            return
        finally:
            del self._generations[started.id]
            generation.cancel()  # no-op once finished; stops the engine if we were interrupted
        answer = output.final(generation.text).strip()
        if stopped:  # what was written (or what the reader saw of it) is the answer, marked so
            answer = _stopped_at(self._shown_at_stop.pop(started.id, None) or answer)
        if not answer and output.only_reasoning(generation.text):
            logger.warning("the answer to %s was all reasoning (%d tokens): more room for it "
                           "(MAX_NEW_TOKENS, a persona's) may let it reply", pending.id,
                           generation.answer_tokens)  # fmt: skip
            await self._fail(started, sink, replies.only_reasoning())
            return
        if not answer:
            await self._fail(started, sink, replies.empty_answer())
            return
        # Saved before it is shown: a stop from here on delivers this answer, not a new one.
        tokens = generation.prompt_tokens, generation.answer_tokens
        try:
            saved = await self.journal.save(started, answer=answer, tokens=tokens)
        except Exception as error:
            if is_outage(error):  # kept here instead: this process takes the turn up again
                self._unsaved[started.id] = answer, tokens
            raise
        if not saved:
            _not_ours(pending)
            return
        generated = Generated(
            prompt_tokens=generation.prompt_tokens,
            answer_tokens=generation.answer_tokens,
            queue_wait=generation.queue_wait or 0.0,
            first_token_at=generation.first_text_at or time.time(),
        )
        await self._deliver(replace(started, tokens=tokens), sink, answer, generated)

    async def fitting(self, turn: Turn) -> Callable[[str], Awaitable[bool]]:
        """Whether the turn, with a text of the adapter's, fits its conversation's prompt
        with the system prompt alone (else it is refused): for an adapter that can cut what
        it added to the message (an attached file's text), which the asker could not. The
        system prompt and budget are read once, for every text tried."""
        voice = voice_for(self.team.settings, turn.conversation)
        # Not kept: the turn may yet be refused, and a conversation with a system prompt
        # kept is one the bot is in (it would answer that thread unasked).
        system, budget = await self._system(turn, voice, keep=False), self._budget(voice)

        async def fits(text: str) -> bool:
            message = _as_counted(replace(turn, text=text))
            over = await tokens_over_budget(
                system, message, count_tokens=self.count_tokens, budget=budget
            )
            return over is None

        return fits

    async def _too_long(self, turn: Turn, system: list[ChatMessage], budget: int) -> str | None:
        """What to tell the asker where their message is over the prompt's token budget
        with the system prompt alone: no trim of the history could make it fit."""
        message = _as_counted(turn)
        tokens = await tokens_over_budget(
            system, message, count_tokens=self.count_tokens, budget=budget
        )
        if not tokens:
            return None
        # The prompt but the message's text: the system prompt, the template around them.
        # (The message counted alone would take the template's own default system prompt,
        # which ours replaces, and could make the instructions come out negative.)
        empty = {**message, "content": ""}
        instructions = await asyncio.to_thread(self.count_tokens, [*system, empty])
        if instructions >= budget:  # no message could fit: not the asker's
            logger.error("the system prompt for %s takes %d tokens, the whole prompt budget "
                         "(%d): every message there is refused", turn.conversation,
                         instructions, budget)  # fmt: skip
            return replies.system_prompt_too_long()
        return replies.too_many_tokens(tokens - instructions, budget - instructions)

    async def _stream(
        self, pending: PendingTurn, generation: Generation, sink: ReplySink
    ) -> tuple[AnswerFilter, bool]:
        """Stream the answer into the sink as it is written; where it starts again (another
        try, elsewhere), so does the sink. Returns the filter that saw what was shown, and
        whether the asker stopped the answer."""
        while True:
            output = AnswerFilter(
                strip_reasoning=self.team.settings.strip_reasoning,
                prompt_opens_reasoning=self.prompt_opens_reasoning,
            )
            try:
                async for chunk in generation:
                    if text := output.feed(chunk):
                        await sink.append(text)
                    if output.looping:
                        logger.info("the answer to %s was repeating itself; cut", pending.id)
                        break
                return output, False
            except AnswerStopped:
                return output, True
            except AnswerRestarted:
                logger.info("the answer to %s is being written again", pending.id)
                await sink.restart()

    async def _count(self, pending: PendingTurn) -> None:
        """Add an answered turn to the last hour's stats; they are not worth a failed turn."""
        try:
            # (0, 0): an answer saved by a version that kept no tokens
            await self.stats.record(time.time() - pending.accepted_at, *(pending.tokens or (0, 0)))
        except Exception:
            logger.warning("could not record the stats of turn %s", pending.id, exc_info=True)

    async def _deliver(
        self,
        pending: PendingTurn,
        sink: ReplySink,
        answer: str,
        generated: Generated | None = None,
    ) -> None:
        """Show the answer, then store it and close the turn; `generated` says how this
        process wrote it (None: it was saved before a restart). The old answer that a
        regeneration took back is forgotten only once this one is stored: until then a
        failure (`_fail`) puts it back."""
        await _shown(sink.finish(answer), answer)
        if (shown := self._shown_at_stop.pop(pending.id, None)) is not None:
            answer = _stopped_at(shown)  # stopped as it ended: the platform showed no more
        try:
            finished = await self.journal.finish(pending, _kept(pending, answer))
        except Exception as error:
            if not is_outage(error):
                raise
            # The record holds the answer: once storage is back, our resume loop shows the
            # same text again (an edit that changes nothing) and stores it.
            logger.warning("storage lost after answering %s; stored once it is back", pending.id)
            self._orphaned[pending.id] = sink
            return
        if not finished:
            _not_ours(pending)
            return
        if pending.turn.command is not None:  # carried out and told: no answer to count
            return
        report_answered(self.metrics, pending, generated)
        await self._count(pending)  # here, once, however late the answer is delivered

    async def _fail(
        self, pending: PendingTurn, sink: ReplySink, text: str, *, outcome: Outcome = "failed"
    ) -> None:
        """The user hears why (if the platform lets us say it); the turn is over either
        way (its message stays in the history). A regenerated answer that failed leaves
        the old one where it was, shown and stored."""
        kept = self._taken_back.pop(pending.id, pending.kept)
        if kept is not None:
            text = replies.answer_kept(kept, text)
        elif pending.regenerates is not None:  # failed before it took the old answer back:
            # stored still, so shown again but not stored again; unless no longer the last
            last = await self._last_exchange(str(pending.conversation), pending.regenerates)
            if last is None:
                await self.journal.finish(pending)
                return
            text = replies.answer_kept(last[1]["content"], text)
        # Saved before it is told: a restart from here on closes the turn as told, and a
        # user who sent the message again gets no second answer.
        if not await self.journal.save(pending, failure=text, answer=kept):
            _not_ours(pending)
            return
        await self._close_failed(replace(pending, failure=text, answer=kept), sink, outcome)

    async def _close_failed(
        self, pending: PendingTurn, sink: ReplySink, outcome: Outcome = "failed"
    ) -> None:
        """Tell the failure saved in `pending` and close the turn, storing back the old
        answer it keeps (of a regeneration). Where the platform did not show it (a 5xx, a
        lost connection), it is told again later, as an answer would be shown again: else
        the thread kept its placeholder, or a regeneration's emptied answer, for good."""
        try:
            await _shown(sink.fail(str(pending.failure)))
        except NowhereToAnswer:
            pass  # the turn's place is gone: as logged where that was found
        except _NotShown as failure:
            if pending.attempts < self.max_attempts:
                logger.warning("the platform did not show why turn %s failed (attempt %d of "
                               "%d)", pending.id, pending.attempts, self.max_attempts,
                               exc_info=failure.__cause__)  # fmt: skip
                self._retry_later(pending, sink)
                return
            logger.warning("could not tell turn %s's thread why it failed", pending.id,
                           exc_info=failure.__cause__)  # fmt: skip
        await self._end(pending, pending.answer)
        self.metrics.count_turn(pending.turn.conversation.platform, outcome)

    async def _drop(self, pending: PendingTurn) -> None:
        """End a turn with nowhere to answer, under its conversation's lock, with the old
        answer a regeneration took back put back; where storage fails, at the next start."""
        try:
            async with self.locks.hold(pending.conversation):
                await self._end(pending, pending.kept)
        except Exception:
            logger.warning("could not drop turn %s; the next start does", pending.id,
                           exc_info=True)  # fmt: skip

    async def _end(self, pending: PendingTurn, kept: str | None) -> None:
        """Close the turn unanswered, storing back the old answer it `kept` (of a
        regeneration), its question before it, once however often this is done."""
        if kept is not None:
            await self.journal.begin(pending)
        await self.journal.finish(pending, kept)

    async def _leave_for_later(
        self,
        pending: PendingTurn,
        sink: ReplySink,
        *,
        release: bool,
        text: str | None = None,
    ) -> None:
        """Keep the turn pending, tell the thread it will be answered, and (`release`:
        a clean stop, an outage) do not count this try against the turn's attempts. A
        turn our resume passes are to take up again is orphaned only after this: one
        claimed during the telling (a platform call) had its try taken back, uncounted,
        by the release after it, and was given one more than `TURN_MAX_ATTEMPTS`."""
        if release:  # until released, a resume pass that claims it meanwhile counts no try
            self._release_owed.add(pending.id)
        # A regeneration that has not taken its old answer back leaves it shown as it is:
        # once taken up again, it may find the conversation moved on, and replace nothing.
        if (
            pending.regenerates is None
            or self._taken_back.get(pending.id, pending.kept) is not None
        ):
            try:
                await sink.pause(text or replies.restarting())
            except Exception:  # the platform is gone too; the record still stands
                logger.warning("could not tell turn %s's thread it waits", pending.id,
                               exc_info=True)  # fmt: skip
        if not release:
            return
        try:
            await self.journal.release(pending)
        except Exception:  # storage is gone (an outage): our claim of it will not count
            logger.warning("could not release turn %s", pending.id, exc_info=True)
        else:
            self._release_owed.discard(pending.id)

    async def _command(self, turn: Turn, sink: ReplySink) -> None:
        """Carry out a command (not `JOURNALED_COMMANDS`) and answer it, or say why it could
        not be; the adapter chose the sink (in the thread, or only to the user)."""
        try:
            text = await self._command_reply(turn)
        except asyncio.CancelledError:  # a stop's grace ran out
            with contextlib.suppress(Exception):
                await sink.fail(replies.restarting_resend())
            raise
        except Exception as error:  # its message is marked seen: no re-delivery will come
            if is_outage(error):
                logger.warning("storage lost during the %s command: %s", turn.command, error)
                failure = replies.storage_unavailable()
            else:
                logger.exception("the %s command failed", turn.command)
                failure = replies.failed()
            with contextlib.suppress(Exception):  # the platform may be gone too
                await sink.fail(failure)
            return
        try:
            await sink.finish(text)
        except Exception:  # carried out all the same; nobody awaits this task to hear it
            logger.warning("could not show the %s command's reply", turn.command, exc_info=True)

    async def _command_reply(self, turn: Turn) -> str:
        command = turn.command
        assert command is not None
        admin = self.team.is_admin(turn.author, turn.conversation.platform)
        if command in ADMIN_COMMANDS and not admin:
            return replies.admins_only(command)
        if command == "help":
            return replies.help_text(admin=admin)
        if command == "status":
            return self._status(turn)
        if command == "prompt":
            return await self._prompt_in_effect(turn)
        if command == "reload":
            return await self._reload_everywhere()
        return await self._stats()

    def _status(self, turn: Turn) -> str:
        return replies.status(
            model=self.model_name,
            depth=self.queue.depth,
            room=self.queue.room,
            places=[p.place for p in self.queue.places(turn.author)],
        )

    async def _stats(self) -> str:
        return replies.last_hour(await self.stats.summary(STATS_WINDOW_S))

    def reload(self) -> str:
        """Read the team's configuration again (SIGHUP, the `reload` command); an invalid
        file keeps the rules in effect. Says what happened."""
        try:
            return self.team.reload()
        except ConfigError as error:
            logger.error("configuration not reloaded; the old one stays: %s", error)
            return f"Configuration not reloaded; the old one stays in effect:\n{error}"

    async def _reload_everywhere(self) -> str:
        """The `reload` command: this process reads the team's file now, and every other
        one of the deployment at its next resume pass (the command reaches one gateway)."""
        self._reloads_seen = await self.reloads.add()
        return f"{self.reload()}\n{replies.RELOADED_EVERYWHERE}"

    async def _follow_reloads(self) -> None:
        """Read the team's file again where a `reload` command ran in another process."""
        count = await self.reloads.count()
        if self._reloads_seen is not None and count != self._reloads_seen:
            logger.info("a reload command ran in another process: %s", self.reload())
        self._reloads_seen = count

    async def _carry_out(self, pending: PendingTurn, sink: ReplySink) -> None:
        """A `reset` (the history starts over; the bot goes on answering here) or a `forget`
        (everything stored is deleted, and the messages sent before it that wait for a
        later try are not answered), by the conversation's starter or an admin, under the
        conversation's lock: after the answers before it, never in their middle, and before
        a message sent after it. Its effect and reply are saved in one MULTI, so a restart
        shows the reply, and never carries it out twice."""
        turn, conversation = pending.turn, pending.conversation
        command = str(turn.command)
        admin = self.team.is_admin(turn.author, turn.conversation.platform)
        if not await self.store.exists(conversation):  # nothing yet, or a channel's top level
            reply: str | None = replies.nothing_stored(command)
        elif not admin and await self.store.starter(conversation) not in (None, turn.author):
            reply = replies.not_starter(command)
        else:
            logger.info("%s of %s by %s", command, turn.conversation, turn.author)
            if command == "forget":
                reply = await self.journal.forget(pending, replies.forgotten)
            else:
                reply = await self.journal.reset(pending, replies.conversation_reset())
        if reply is None:
            _not_ours(pending)
            return
        await self._deliver(replace(pending, answer=reply), sink, reply)

    async def _prompt_in_effect(self, turn: Turn) -> str:
        voice = voice_for(self.team.settings, turn.conversation)
        prompt = None
        if voice.system_prompt:  # "" sends no system message, as unset does
            template, prompt = await self.store.kept_system_prompt(str(turn.conversation))
            if template != voice.system_prompt or prompt is None:
                prompt = fill(voice.system_prompt, placeholder_values(turn))
        return replies.prompt_in_effect(
            prompt,
            max_new_tokens=voice.max_new_tokens or self.team.settings.max_new_tokens,
            temperature=voice.temperature,
        )

    async def _system(self, turn: Turn, voice: Voice, *, keep: bool = True) -> list[ChatMessage]:
        """The persona's prompt as this conversation keeps it (filled in at its first turn,
        and kept unless not `keep`)."""
        if not voice.system_prompt:
            return []
        text = await self.store.system_prompt(
            str(turn.conversation),
            voice.system_prompt,
            lambda: fill(voice.system_prompt or "", placeholder_values(turn)),
            keep=keep,
        )
        return [{"role": "system", "content": text}]

    def _budget(self, voice: Voice) -> int:
        """The prompt's tokens, where a persona's answers may take `max_new_tokens`: its
        longer answers leave its prompts less, but never under half (past that, a long
        answer is cut at the model's window, rather than every message refused)."""
        if voice.max_new_tokens is None:
            return self.prompt_budget
        longer = voice.max_new_tokens - self.team.settings.max_new_tokens
        return max(self.prompt_budget - longer, self.prompt_budget // 2, 1)

    async def _answer_length(self, voice: Voice, messages: list[ChatMessage]) -> int | None:
        """A persona's answer length, within what the context leaves beside this prompt:
        past it, an OpenAI-compatible server refuses the request (a 400), where the local
        engine cuts the answer there. Counted only where its prompts may leave less."""
        wanted = voice.max_new_tokens
        context = self.prompt_budget + self.team.settings.max_new_tokens
        if wanted is None or self._budget(voice) + wanted <= context:
            return wanted
        prompt = await asyncio.to_thread(self.count_tokens, messages)
        return max(min(wanted, context - prompt), 1)

    # --- stopping and regenerating answers ------------------------------------------------

    def stop_answer(self, turn_id: str, *, by: str, shown: str | None = None) -> bool:
        """End the answer being written for `turn_id` where it is: what was written is
        shown and stored as the answer, marked as stopped, and the turn finishes as any
        other; or, given what the reader was `shown` when they stopped it, where the
        platform shows no more of it (Slack's own stop button ends a stream), that is the
        answer stored. False when this process is not writing that answer. Whether `by`
        may stop it is the caller's to decide."""
        if shown is not None and turn_id in self._running:  # written, or being delivered
            self._shown_at_stop[turn_id] = shown
        if (generation := self._generations.get(turn_id)) is None:
            return False
        logger.info("turn %s stopped by %s", turn_id, by)
        generation.cancel(AnswerStopped)
        return True

    def stop_answers(self, scope: str, *, by: str) -> bool:
        """`stop_answer` for every answer this process is writing in `scope` (a turn id
        prefix, as `serve_platform` takes); False if it is writing none there."""
        writing = [turn_id for turn_id in self._generations if in_scope(turn_id, [scope])]
        return any([self.stop_answer(turn_id, by=by) for turn_id in writing])

    async def regenerate(
        self,
        conversation: ConversationKey,
        *,
        place: dict[str, Any],
        by: str,
        request_id: str,
        sink: ReplySink,
        channel_name: str = "",
        bot_name: str = "",
    ) -> str | None:
        """Answer the conversation's last question again, into `sink`, in place of the
        answer pressed: the one shown at `place`, as `answer_place` gave it then. The new
        answer replaces the last one in the history, and the question is not stored twice.
        A turn like any other (durable; its id `platform:request_id`, so it can be
        stopped), asked by `by`, and held to `by`'s limits as a message is; whether `by`
        may is the caller's to decide. None once the new answer is under way (it holds
        the conversation's lock, and the old answer is taken back), or has ended before
        that (a stop, an outage: the sink says so); else, with nothing done, what to tell
        the presser: `by` is over a limit, or (`replies.not_regenerable`) the conversation
        does not end with that answer (it was regenerated already, or a newer one came,
        even while this waited for the lock), its regeneration was asked already (a
        double click), or it is still being answered after REGENERATE_WAIT_S.
        `channel_name` and `bot_name` fill a persona's placeholders, as a message's turn's.

        It waits for the lock rather than the turn letting go before its buttons show:
        the lock is what keeps turns in every process from interleaving the history, and
        a turn that slips in between is caught under it by `_take_back_answer`."""
        key, platform = str(conversation), conversation.platform
        if self._closing:
            return replies.restarting_resend("press the button again")
        if not await self.locks.idle(key, within=REGENERATE_WAIT_S):
            return replies.not_regenerable()
        if (last := await self._last_exchange(key, place)) is None:
            return replies.not_regenerable()
        # Claimed first: a double click's second press takes nothing from the rate limit.
        if not await self.store.first_regeneration(key, place):
            return replies.not_regenerable()  # a second press of the same answer's button
        accepted = None
        try:
            if limited := await self._over_limits(platform, by, request_id, replies.PRESS_AGAIN):
                await self.store.forget_regeneration(key, place)  # pressed again once allowed
                return limited
            self._pending[by] += 1  # counted now, so presses and messages meanwhile see it
            try:
                question = last[0]
                turn = Turn(
                    conversation, by, question["content"], request_id,
                    author_name=question.get("name", ""), channel_name=channel_name,
                    bot_name=bot_name,
                )  # fmt: skip
                accepted = await self.journal.accept(turn, sink.reply_target(), regenerates=place)
            finally:
                if accepted is None:
                    self._uncount(by)
        except Exception:  # not taken: a press once storage is back may regenerate it
            with contextlib.suppress(Exception):  # if storage is still gone, it may not
                await self.store.forget_regeneration(key, place)
            raise
        if accepted is None:
            return replies.not_regenerable()
        if self._closing:  # a stop began as it was taken: the next start regenerates it
            self._uncount(by)
            self._track(accepted, sink)
            await self._leave_for_later(accepted, sink, release=True)
            await self._keep_marked(key, place)
            return None
        logger.info("regenerating the last answer of %s for %s", conversation, by)
        taken_back = asyncio.get_running_loop().create_future()

        async def take_back() -> bool:
            taken_back.set_result(await self._take_back_answer(accepted))
            return taken_back.result()

        task = self._start(accepted, sink, counted=True, before=take_back)
        await self._keep_marked(key, place)
        await asyncio.wait((taken_back, task), return_when=asyncio.FIRST_COMPLETED)
        if taken_back.done() and not taken_back.result():  # a newer turn took the lock first
            await asyncio.wait((task,))  # its record is ended before the presser hears no
            return replies.not_regenerable()
        return None

    async def _keep_marked(self, key: str, place: dict[str, Any]) -> None:
        """A regeneration is recorded: the press's mark is the answer's for good."""
        try:
            await self.store.keep_regeneration(key, place)
        except Exception as error:  # its mark lapses soon; the regeneration goes on
            logger.warning("could not keep the regeneration of %s marked: %s", key, error)

    async def answer_shown(
        self, conversation: ConversationKey, place: dict[str, Any], messages: Sequence[str] = ()
    ) -> None:
        """An adapter says where the conversation's newest answer is shown (its own JSON),
        to find it again with `answer_place` (e.g. to take its buttons off); and the
        platform ids of its `messages`, so that a reply to one finds the conversation
        (`answered_in`) without walking back the replies before it."""
        platform = conversation.platform
        shown = [f"{platform}:{message}" for message in messages]
        await self.store.set_answer_place(str(conversation), place, shown)

    async def answered_in(self, platform: str, message: str) -> ConversationKey | None:
        """The conversation whose answer the platform's `message` shows, if it was said."""
        found = await self.store.answered_in(f"{platform}:{message}")
        return ConversationKey.parse(found) if found else None

    async def answer_place(self, conversation: ConversationKey) -> dict[str, Any] | None:
        """Where the conversation's newest answer is shown, as `answer_shown` last said."""
        return await self.store.answer_place(str(conversation))

    async def _take_back_answer(self, pending: PendingTurn) -> bool:
        """Before a regenerated answer, under the conversation's lock: remove the last
        question and answer (`begin` stores the question again), the answer kept in the
        turn's record, to be put back if the new one fails; a turn taken up after a
        restart does it where it was not done yet. False if the conversation has moved on
        since the regeneration was asked for."""
        if pending.kept is None:
            assert pending.regenerates is not None
            last = await self._last_exchange(pending.conversation, pending.regenerates)
            if last is None or last[0]["content"] != pending.turn.text:
                logger.info("not regenerating in %s: it has moved on", pending.conversation)
                return False
            if not await self.journal.take_back(pending, last[1]["content"]):
                return False
            pending = replace(pending, kept=last[1]["content"])
        self._taken_back[pending.id] = pending.kept
        return True

    async def _last_exchange(
        self, conversation: str, place: dict[str, Any]
    ) -> list[ChatMessage] | None:
        """The conversation's last question and answer, if that answer is still the one
        shown at `place`. Each answer's place is its own (a platform's names its turn): one
        regenerated in the same messages has a new place, so a second press of its button
        finds the conversation moved on."""
        last = (await self.store.load(conversation))[-2:]
        if [message["role"] for message in last] != ["user", "assistant"]:
            return None
        return last if await self.store.answer_place(conversation) == place else None


def _as_counted(turn: Turn) -> ChatMessage:
    """The turn's message as its prompt holds it: with its author's name, as a thread
    with others shows it."""
    return named([user_message(turn)], several=True)[0]


def _kept(pending: PendingTurn, answer: str | None) -> str | None:
    """What of a turn's answer its conversation keeps: none of a reset's or forget's reply."""
    return None if pending.turn.command is not None else answer


def _not_ours(pending: PendingTurn) -> None:
    logger.warning("turn %s is no longer ours (another process took it over, or a forget "
                   "dropped it)", pending.id)  # fmt: skip


def _skipped(turn: Turn) -> None:
    logger.info("skipping re-delivered message %s on %s", turn.message_id,
                turn.conversation.platform)  # fmt: skip


def _stopped_at(text: str) -> str:
    """An answer stopped where `text` ends: the answer stored, marked so."""
    return f"{text.strip()}\n\n{replies.stopped()}".strip()
