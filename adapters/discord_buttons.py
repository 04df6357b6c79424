"""Buttons on Discord answers: Stop while an answer is written, Regenerate on the newest.

Each button's custom_id carries what its press needs (the turn, the asker, the
conversation), so a button still works after a restart; only the asker or an admin may
press it. Presses arrive as component interactions, answered within Discord's 3 s:
a deferred update (the answer's own edits show the outcome), or an ephemeral refusal
(a follow-up for a Regenerate, which is deferred at once: it may look up the asker's
roles and wait for an ending turn).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import discord

from adapters.base import failure_text
from adapters.discord_channel import (
    PLATFORM,
    DiscordChannel,
    Memberships,
    bot_name,
    channel_name,
    requester,
    set_buttons,
)
from adapters.streaming import EditBudget, EditBudgets, StreamingReply
from bot import replies
from bot.service import ChatService
from bot.types import ConversationKey

logger = logging.getLogger(__name__)

# Discord allows custom_ids of 100 characters; four snowflakes (20 digits at most) fit.
STOP_ID = re.compile(r"tb:stop:(?P<seed>\d+):(?P<asker>\d+)")
REGENERATE_ID = re.compile(
    r"tb:regen:(?P<asker>\d+):(?P<workspace>\d+|-):(?P<channel>\d+):(?P<thread>\d+)"
)
STOP_REFUSED = "Only the asker or an admin can stop this."
REGENERATE_REFUSED = "Only the asker or an admin can regenerate this."
NOT_WRITING = "This answer is not being written any more."


@dataclass(frozen=True, slots=True)
class Asker:
    """Who asked for an answer, and in which conversation: what its buttons carry."""

    user: str
    conversation: ConversationKey


def stop_buttons(seed: str, asker: Asker) -> discord.ui.View:
    """Stop, for the answer to the message `seed` (the turn's platform id)."""
    return _view(discord.ui.Button(label="Stop", custom_id=f"tb:stop:{seed}:{asker.user}"))


def regenerate_buttons(asker: Asker) -> discord.ui.View:
    key = asker.conversation
    custom_id = f"tb:regen:{asker.user}:{key.workspace}:{key.channel}:{key.thread}"
    return _view(discord.ui.Button(label="Regenerate", emoji="🔄", custom_id=custom_id))


def _view(button: discord.ui.Button[discord.ui.View]) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(button)
    # Only its components are sent: stopped, discord.py keeps no per-message copy of it
    # (presses are read from the custom_id, see AnswerButtons).
    view.stop()
    return view


def last_message(place: dict[str, Any] | None) -> tuple[str, str] | None:
    """The channel and id of the last message of an answer whose place was recorded."""
    place = place or {}
    channel, messages = place.get("channel"), place.get("messages") or []
    return (str(channel), str(messages[-1])) if channel and messages else None


class DiscordReply(StreamingReply):
    """An answer with its buttons: Stop while it is written; once shown, Regenerate on
    its last message, and its place recorded with the service. Starting, it takes
    Regenerate off the conversation's previous answer, and deletes the further
    messages (`replacing`) of the answer it regenerates (finishing, those it could not).

    Without an asker (a command's reply, a target saved by an older version) it has no
    buttons. Refusals are finished without being started: they get no Regenerate. A
    regenerated answer that fails shows the old one again, which keeps its Regenerate.
    """

    target: DiscordChannel
    reput_final = True  # each message's final edit takes its Stop button off

    def __init__(
        self,
        *,
        target: DiscordChannel,
        asker: Asker | None,
        service: ChatService,
        budgets: EditBudgets,
        replacing: Sequence[str] = (),
        regenerates: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(target=target, **options)
        self.budgets = budgets
        self.asker = asker
        self.service = service
        self.replacing = list(replacing)
        self.regenerates = regenerates
        self.answering = bool(self.message_ids)  # a resumed answer has been started

    def reply_target(self) -> dict[str, Any]:
        target = super().reply_target()
        if self.asker is not None:
            target |= {"asker": self.asker.user, "conversation": str(self.asker.conversation)}
        if self.regenerates:  # and the old answer's messages still to delete
            target |= {"regenerates": True, "replacing": list(self.replacing)}
        return target

    async def start(self) -> None:
        self.answering = True
        if self.asker is not None:
            with self._tidying():
                await self._retire_previous(self.asker)
            self.target.buttons = stop_buttons(self.target.seed, self.asker)
        await super().start()

    async def finish(self, text: str) -> None:
        self.target.buttons = None
        if not self.answering and self.asker is not None:  # a message refused
            self.target.reply_in_place()
        await super().finish(text)
        if self.replacing:  # still shown: deleting them as the answer started failed
            with self._tidying():
                await self._delete_replaced()
        if self.answering and self.asker is not None:
            await self._offer_regenerate(self.asker)

    async def fail(self, text: str) -> None:
        self.target.buttons = None
        if not self.answering and self.asker is not None:  # before its answer began
            self.target.reply_in_place()
        shown = not self.over
        if self.replacing:  # still shown (it failed before it started, or could not tidy then):
            # deleted, since the kept answer is put back whole; a message deleted by a try
            # before a restart may still be named there, which editing would find gone
            with self._tidying():
                await self._delete_replaced()
        await super().fail(text)
        if shown and self.regenerates and self.asker is not None:
            await self._offer_regenerate(self.asker)  # the old answer, shown again

    async def pause(self, text: str) -> None:
        self.target.buttons = None
        await super().pause(text)

    async def _retire_previous(self, asker: Asker) -> None:
        previous = last_message(await self.service.answer_place(asker.conversation))
        if previous and previous[1] not in {*self.message_ids, *self.replacing}:
            self._count_edit()
            await set_buttons(self.target.client, *previous, None)
        await self._delete_replaced()

    async def _delete_replaced(self) -> None:
        """The further messages of the answer this one regenerates."""
        while self.replacing:
            await self.target.delete(self.replacing[-1])  # one gone already (a try before
            self.replacing.pop()  # a restart deleted it) counts as deleted

    def _count_edit(self) -> None:
        """A buttons' edit is sent, as a final text is, and spends the channel's edits."""
        self.edit_budget().spend()

    def edit_budget(self) -> EditBudget:
        """The budget of the channel the answer is in: its thread once opened, or, where
        none may be, the channel itself (known only then)."""
        return self.budgets.of(self.target.destination_id)

    @contextlib.contextmanager
    def _tidying(self) -> Iterator[None]:
        """Only tidying, so a failure is logged and the answer goes on."""
        try:
            yield
        except Exception:
            logger.warning("could not tidy up before answering in %s",
                           self.target.destination_id, exc_info=True)  # fmt: skip

    async def _offer_regenerate(self, asker: Asker) -> None:
        """The answer is shown already: a failure here is logged, not the user's problem."""
        place: dict[str, Any] = {
            "channel": self.target.destination_id,
            "messages": self.message_ids,
            # The turn's own (its question's id, or its Regenerate press's): an answer
            # regenerated in the same messages has a place of its own, which a late
            # second press of the old one's button does not match.
            "seed": self.target.seed,
        }
        if self.target.reply_to is not None:  # so a regenerated answer's parts reply too
            place["reply_to"] = self.target.reply_to
        try:  # recorded before the button shows, so a press finds this answer the newest
            await self.service.answer_shown(asker.conversation, place, self.message_ids)
            self._count_edit()
            await set_buttons(
                self.target.client, place["channel"], self.message_ids[-1],
                regenerate_buttons(asker),
            )  # fmt: skip
        except Exception:
            logger.warning("could not offer to regenerate in %s", asker.conversation,
                           exc_info=True)  # fmt: skip


async def _told_below(text: str) -> None:
    """A refusal the caller says itself."""


Regenerating = Callable[[dict[str, Any], str, Asker], DiscordReply]
"""The adapter's sink for a regenerated answer: (the old answer's place, seed, asker)."""


class AnswerButtons:
    """Carries out presses of Stop and Regenerate, for the asker or an admin."""

    def __init__(
        self, *, service: ChatService, memberships: Memberships, regenerating: Regenerating
    ) -> None:
        self.service = service
        self.memberships = memberships
        self.regenerating = regenerating

    async def on_press(self, interaction: discord.Interaction) -> None:
        """A component interaction: ours are carried out, others left alone. Never raises;
        a failure is logged and told to the presser alone."""
        custom_id = str((interaction.data or {}).get("custom_id", ""))
        by = str(interaction.user.id)
        try:
            if stop := STOP_ID.fullmatch(custom_id):
                await self._stop(interaction, seed=stop["seed"], asker=stop["asker"], by=by)
            elif regenerate := REGENERATE_ID.fullmatch(custom_id):
                key = ConversationKey(
                    PLATFORM, regenerate["workspace"], regenerate["channel"], regenerate["thread"]
                )
                await self._regenerate(interaction, Asker(regenerate["asker"], key), by=by)
        except Exception as error:
            text = failure_text(error, f"Discord button {custom_id} pressed by {by}")
            try:
                await self._tell(interaction, text)
            except discord.DiscordException:
                logger.warning("could not tell the presser about the failure", exc_info=True)

    async def _stop(
        self, interaction: discord.Interaction, *, seed: str, asker: str, by: str
    ) -> None:
        if not self._may(by, asker):
            await self._tell(interaction, STOP_REFUSED)
        elif self.service.stop_answer(f"{PLATFORM}:{seed}", by=by):
            await interaction.response.defer()  # the answer's final edit shows the rest
        else:  # it ended as it was pressed, or another process writes it
            await self._tell(interaction, NOT_WRITING)

    async def _regenerate(self, interaction: discord.Interaction, asker: Asker, *, by: str) -> None:
        if not self._may(by, asker.user):
            await self._tell(interaction, REGENERATE_REFUSED)
            return
        # Acknowledged first: a DM asker's roles may be looked up, and regenerate may wait
        # seconds for a turn that is ending. The answer's own edits show the new one.
        await interaction.response.defer()
        # A new answer is generated: the access rules in effect now apply, as to a message.
        # Only the presser sees a refusal, so it is always told (even `silent`), once.
        access = self.service.team.settings.access
        who = await requester(
            interaction.user, asker.conversation, access=access, memberships=self.memberships
        )
        if not await self.service.admit(who, asker.conversation, _told_below):
            await self._tell(interaction, replies.denied())
            return
        place = await self.service.answer_place(asker.conversation)
        pressed = interaction.message and str(interaction.message.id)
        newest = last_message(place)
        request = str(interaction.id)
        if place is None or newest is None or newest[1] != pressed:
            await self._tell(interaction, replies.not_regenerable())
            return
        # `place` names the pressed answer: refused if another replaced it meanwhile.
        refusal = await self.service.regenerate(
            asker.conversation, place=place, by=by, request_id=request,
            sink=self.regenerating(place, request, asker),
            channel_name=channel_name(interaction.channel),
            bot_name=bot_name(interaction.client, interaction.guild),
        )  # fmt: skip
        if refusal is not None:
            await self._tell(interaction, refusal)

    def _may(self, by: str, asker: str) -> bool:
        return by == asker or self.service.team.is_admin(by)

    @staticmethod
    async def _tell(interaction: discord.Interaction, text: str) -> None:
        """Say `text` to the presser alone, as the response or (once responded) after it."""
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
