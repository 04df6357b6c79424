"""A ReplySink that streams an answer into platform messages: post, throttled edits, split.

Platform-neutral: an adapter supplies a `MessageTarget` (how to post and edit one message
in the right thread), a renderer (Markdown to the platform's markup) and its length limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, Protocol

from adapters.text import split_message
from bot import replies
from bot.types import NowhereToAnswer
from bot.waiting import set_within

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
STREAMING_MARK = " …"  # shown after partial text while the answer is still being written
SKIPPABLE: ContextVar[bool] = ContextVar("SKIPPABLE", default=False)
"""True while partial text (or a nicety, as a status line) is put: a platform call
rate-limited then is better failed at once than retried after the wait, which would hold
back the rest of the answer and its end (the next text carries what this one had)."""


@contextlib.contextmanager
def skippable() -> Iterator[None]:
    """Platform calls in the block that are rate-limited fail at once (`SKIPPABLE`)."""
    token = SKIPPABLE.set(True)
    try:
        yield
    finally:
        SKIPPABLE.reset(token)


def _went_without(error: Exception, what: str) -> None:
    """Log a failed call that the answer goes on without: one line where the platform
    rate-limited it (skipped on purpose, `skippable`; routine with several processes
    sharing a workspace's limits), its traceback otherwise."""
    response = getattr(error, "response", None)
    if 429 in (getattr(error, "status", None), getattr(response, "status_code", None)):
        logger.info("%s: rate-limited, skipped", what)
    else:
        logger.warning("%s", what, exc_info=error)


class Refused(Exception):
    """A target will not take this kind of message at all (a platform feature the workspace
    does not allow). Raised through `append` too, not skipped like a failed edit, so that
    whoever holds the sink can answer another way."""


class Gone(Exception):
    """The message to edit no longer exists (someone deleted it): the text it was to
    show goes into a new one."""


class MessageTarget(Protocol):
    """Where one answer goes: a thread, a channel, a DM."""

    def where(self) -> dict[str, Any]:
        """This target as JSON, from which the adapter can rebuild it in another process."""
        ...

    async def typing(self) -> None:
        """Show that an answer is being written, where the platform can (no placeholder);
        the platform may let it lapse after a while, so it may be called again."""
        ...

    async def post(self, text: str) -> str:
        """Send a new message; return its id."""
        ...

    async def edit(self, message_id: str, text: str) -> None:
        """Replace a message's text; raise `Gone` if the message was deleted."""
        ...

    async def delete(self, message_id: str) -> None:
        """Delete a message of the bot's own."""
        ...


class EditBudget:
    """A token bucket of edits shared by every answer streaming in one workspace.

    Intermediate edits take a token when there is one and are skipped otherwise; final
    texts are always sent and only counted, so under load answers edit less often but
    never lose their end.
    """

    def __init__(self, *, per_minute: float, burst: int, clock: Clock = time.monotonic) -> None:
        self.rate = per_minute / 60
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.updated = clock()

    def try_take(self) -> bool:
        self._refill()
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def spend(self) -> None:
        """Count a call that is made regardless (may go into debt)."""
        self._refill()
        self.tokens -= 1

    @property
    def full(self) -> bool:
        self._refill()
        return self.tokens >= self.burst

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now


class EditBudgets:
    """An `EditBudget` for each place whose edits a platform limits together (Slack: a
    workspace; Discord: a channel), made as each is first used."""

    KEPT = 1000  # past this many places, those whose budgets are full again are let go

    def __init__(self, *, per_minute: float, burst: int, clock: Clock = time.monotonic) -> None:
        self.per_minute = per_minute
        self.burst = burst
        self.clock = clock
        self._budgets: dict[str, EditBudget] = {}
        # Let go, but found again while an answer still holds one (waiting to stream):
        # another answer there must share it.
        self._let_go: weakref.WeakValueDictionary[str, EditBudget] = weakref.WeakValueDictionary()

    def of(self, place: str) -> EditBudget:
        budget = self._budgets.get(place) or self._let_go.pop(place, None)
        if budget is None:
            if len(self._budgets) >= self.KEPT:
                self._let_go_of_full()
            budget = EditBudget(per_minute=self.per_minute, burst=self.burst, clock=self.clock)
        self._budgets[place] = budget
        return budget

    def __len__(self) -> int:
        return len(self._budgets)

    def _let_go_of_full(self) -> None:
        """A full budget is what a new one would be: letting it go forgets nothing (Discord
        makes every thread a channel, so places would otherwise pile up)."""
        for place, budget in list(self._budgets.items()):
            if budget.full:
                self._let_go[place] = self._budgets.pop(place)


class StreamingReply:
    """Streams one answer: optional placeholder, edits every `interval` s, split over as
    many messages as it needs as it is written, each message ended (`_filled`) once full.

    `message_ids` are the messages this answer already has (a resumed answer edits them
    rather than posting again); `on_post` is awaited after each one posted or deleted. The
    messages that the final text does not need (an earlier, longer draft's) are deleted.
    Without a placeholder, the target shows typing from `start` until the first text,
    again every `typing_interval` s (at most `typing_repeats` times) where the platform's
    lapses.
    """

    reput_final = False
    """Whether the final text is put into every message, even one that shows it already."""

    def __init__(
        self,
        *,
        target: MessageTarget,
        render: Callable[[str], str],
        limit: int,
        interval: float,
        budget: EditBudget | None = None,
        placeholder: str | None = None,
        message_ids: Sequence[str] = (),
        mark: str = STREAMING_MARK,
        typing_interval: float = 0,
        typing_repeats: int = 0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.target = target
        self.render = render
        self.limit = limit
        self.interval = interval
        self.budget = budget
        self.placeholder = placeholder
        self.message_ids = list(message_ids)
        self.mark = mark  # after partial text; "" where the platform shows progress itself
        self.clock = clock
        self.on_post: Callable[[], Awaitable[None]] | None = None
        self.text = ""
        self.notice_text = ""
        self.last_edit = float("-inf")
        self.over = False  # the final text (answer or failure) is shown: nothing replaces it
        self.shown: dict[int, str] = {}  # what this answer put into each of its messages
        self.filled: set[int] = set()  # its messages ended as full
        self.typing_interval = typing_interval
        self.typing_repeats = typing_repeats
        self._text_shown = asyncio.Event()
        self._typing: asyncio.Task[None] | None = None

    def reply_target(self) -> dict[str, Any]:
        return {**self.target.where(), "messages": self.message_ids}

    async def start(self) -> None:
        """An answer is about to be written: a try that failed before it (storage lost, the
        turn taken up again in this process) leaves nothing to add to."""
        self.text = ""
        if self.placeholder is not None:
            await self._show_final(self.placeholder)
        else:
            await self.target.typing()
            if self.typing_repeats and self._typing is None:
                self._typing = asyncio.create_task(self._keep_typing())

    async def notice(self, text: str) -> None:
        self.notice_text = f"*{text}*\n\n"

    def edit_budget(self) -> EditBudget | None:
        """What the answer's edits spend, where the platform limits them together."""
        return self.budget

    async def append(self, chunk: str) -> None:
        self.text += chunk
        if self.clock() - self.last_edit < self.interval or not self.text.strip():
            return
        edited = len(self.message_ids) - 1  # the message the text is being written into
        budget = self.edit_budget()
        if budget and self._edit_costs(edited) and not budget.try_take():
            return
        try:
            with skippable():
                await self._show(self.text.rstrip())
        except (Refused, NowhereToAnswer):
            raise
        except Exception as error:  # a lost intermediate edit is harmless: the final text follows
            _went_without(error, "a streaming edit failed; the final text will follow")

    async def restart(self) -> None:
        """The next appends replace the text streamed so far, in the first message: the
        messages the old text went on into go now, rather than show it until replaced."""
        self.text = ""
        await self._drop(1)

    async def finish(self, text: str) -> None:
        """The answer, split over as many messages as it needs: the first is the one that
        streamed; a message that cannot be put is reported after the others."""
        parts = await self._show_first(self.notice_text + text)
        self.over = True
        if not await self._put_rest(parts, final=True):
            await self._post(self.render(replies.continuation_failed()))

    async def fail(self, text: str) -> None:
        """Why there is no answer; long where it gives back an earlier answer (whose
        regeneration failed), so it is split as an answer is."""
        if not self.over:  # an answer (or failure) already shown stays shown
            parts = await self._show_first(self.notice_text + text)
            self.over = True
            await self._put_rest(parts, final=True)

    async def pause(self, text: str) -> None:
        if not self.over:  # a stop just after the answer was shown leaves it shown
            await self._put_rest(await self._show_first(self.notice_text + text), final=True)

    async def _show_first(self, markdown: str) -> list[str]:
        """A final text's first part, in the message that streamed; all of its parts."""
        parts = split_message(self.render(markdown), self.limit) or [""]
        await self._show_final(parts[0])
        return parts

    def stopped(self) -> bool:
        """Whether a reader stopped the answer on the platform: what they saw stays as it
        is, and the rest of a long answer is not posted after it."""
        return False

    async def _show(self, markdown: str) -> None:
        """Partial text: the messages it fills, and the one it is being written into,
        marked as being written where the mark fits."""
        self.last_edit = self.clock()
        parts = split_message(self.render(self.notice_text + markdown), self.limit)
        if len(marked := parts[-1] + self.render(self.mark)) <= self.limit:
            parts[-1] = marked
        if self.shown.get(0) != parts[0]:
            await self._put(0, parts[0])
        await self._put_rest(parts, final=False)

    async def _put_rest(self, parts: Sequence[str], *, final: bool) -> bool:
        """Each part after the first into its message where it changed, each message
        before it ended as full first; none once a reader stopped the answer. A final text
        tries every message whatever one did (in order: none is posted after one that was
        not), deletes the messages it does not need, and says whether every one was put."""
        put = True
        for index in range(1, len(parts)):
            await self._fill(index - 1)
            if self.stopped():
                return put
            if self.shown.get(index) == parts[index] and not (final and self.reput_final):
                continue
            try:
                await (self._put_final if final else self._put)(index, parts[index])
            except Exception:
                if not final:
                    raise
                logger.warning("putting part %d of an answer failed", index, exc_info=True)
                put = False
                if index >= len(self.message_ids):  # not posted
                    return put
        if final:
            await self._drop(len(parts))
        return put

    def _edit_costs(self, index: int) -> bool:
        """Whether putting text into the answer's `index`-th message spends an edit of the
        platform's (it exists: a post is not an edit)."""
        return 0 <= index < len(self.message_ids)

    async def _fill(self, index: int) -> None:
        if index in self.filled:
            return
        try:
            await self._filled(index)
        except Gone:  # deleted: its text goes into a new message, ended with the next text
            text = self.shown.pop(index)  # not shown: put again by the next text if not now
            try:
                await self._post_again(index, text)
            except Exception:
                logger.warning("posting a deleted message of an answer again failed",
                               exc_info=True)  # fmt: skip
                return
            self.shown[index] = text
            return
        except Exception as error:  # not a reader's stop: the rest can still be posted
            _went_without(error, "ending a full message of an answer failed")
            return  # tried again with the next text
        self.filled.add(index)

    async def _filled(self, index: int) -> None:
        """The answer's `index`-th message holds all of the answer it can: the rest goes
        into the next."""

    async def _drop(self, count: int) -> None:
        """Delete the answer's messages after its first `count`: only tidying, so a
        failure is logged and the message stays."""
        while len(self.message_ids) > count:
            try:
                await self.target.delete(self.message_ids[-1])
            except Exception:
                logger.warning("could not delete a message the answer no longer needs",
                               exc_info=True)  # fmt: skip
                return
            self.message_ids.pop()
            self.shown.pop(len(self.message_ids), None)
            self.filled.discard(len(self.message_ids))
            await self._changed()

    async def _show_final(self, text: str) -> None:
        self.last_edit = self.clock()
        await self._put_final(0, text)

    async def _put_final(self, index: int, text: str) -> None:
        """A final text is always sent, and an edit of it only counted."""
        if (budget := self.edit_budget()) and self._edit_costs(index):
            budget.spend()
        await self._put(index, text)

    async def _keep_typing(self) -> None:
        for _ in range(self.typing_repeats):
            if await set_within(self._text_shown, self.typing_interval):
                return
            try:
                await self.target.typing()
            except Exception:  # only a nicety: the answer goes on without it
                logger.warning("could not show typing", exc_info=True)
                return

    async def _stop_typing(self) -> None:
        """No typing once text shows; a typing call under way ends before the text."""
        self._text_shown.set()
        if self._typing is not None:
            await self._typing

    async def _put(self, index: int, text: str) -> None:
        """The answer's `index`-th message gets `text`: an edit if it exists, else a post."""
        await self._stop_typing()
        if index >= len(self.message_ids):
            await self._post(text)
        else:
            try:
                await self.target.edit(self.message_ids[index], text)
            except Gone:  # its text would be lost with it
                await self._post_again(index, text)
        self.shown[index] = text

    async def _post_again(self, index: int, text: str) -> None:
        """The answer's `index`-th message was deleted: `text` goes into a new one, posted
        after the others, in its place among the answer's messages."""
        self.message_ids[index] = await self.target.post(text)
        await self._changed()

    async def _post(self, text: str) -> None:
        self.message_ids.append(await self.target.post(text))
        await self._changed()

    async def _changed(self) -> None:
        """The answer's messages changed: `on_post` records them."""
        if self.on_post is not None:
            try:
                await self.on_post()
            except Exception:  # the change is made: a failed record of it is no failed post
                logger.exception("could not record the answer's messages")
