"""Where a Discord answer goes: its conversation's key, and the messages it is posted in.

Shared by the adapter (messages), its commands and its buttons; knows nothing of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from functools import partial
from time import monotonic
from typing import Any, NamedTuple

import discord

from adapters.streaming import Gone
from bot.access import Requester, dm_membership_admits, dm_servers
from bot.config import Access
from bot.types import ConversationKey, NowhereToAnswer

logger = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000
THREAD_ARCHIVE_MINUTES = 1440
THREAD_EXISTS = 160004  # Discord's error code: a thread was already opened from the message
UNKNOWN_MESSAGE = 10008  # Discord's error code: no such message (it was deleted)
UNKNOWN_CHANNEL = 10003  # Discord's error code: no such channel (a thread deleted)
THREAD_ARCHIVED = 50083  # Discord's error code: an edit or deletion in an archived thread
INVALID_FORM_BODY = 50035  # Discord's error code: a field refused (a reply's message gone)
NO_PINGS = discord.AllowedMentions.none()
MEMBERSHIP_SECONDS = 300.0  # how long a DM asker's looked-up roles in a server are trusted
MEMBERSHIPS_KEPT = 10_000  # (user, server) memberships remembered, at most
DM_LOOKUPS = 10  # servers looked up (REST calls) for one DM, at most
LOOKUP_SECONDS = 5.0  # one lookup, before it counts as failed
FAILED_LOOKUP_SECONDS = 20.0  # how long a failed lookup counts as not a member

_threadless: set[str] = set()  # channels where opening a thread was refused (warned once)


def nonce(seed: str, index: int) -> str:
    """A send nonce derived from the turn, so a retried send cannot post twice."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return str(int.from_bytes(digest[:8], "big"))  # Discord allows up to 25 characters


def conversation_key(channel: discord.abc.Snowflake, *, guild: str, root: str) -> ConversationKey:
    """The conversation a message (or command) in `channel` belongs to: a DM is one
    conversation, a thread is one, and in a server channel each conversation is keyed by
    the message it started from (`root`)."""
    channel_id = str(channel.id)
    if isinstance(channel, discord.DMChannel):
        return ConversationKey(PLATFORM, "-", channel_id, channel_id)
    if isinstance(channel, discord.Thread):
        return ConversationKey(PLATFORM, guild, str(channel.parent_id), channel_id)
    return ConversationKey(PLATFORM, guild, channel_id, root)


def channel_name(channel: discord.abc.Snowflake) -> str:
    """The channel as a persona's `{channel_name}` reads it; a thread by its channel's."""
    if isinstance(channel, discord.DMChannel):
        return "a direct message"
    parent = getattr(channel, "parent", None)
    return f"#{getattr(parent or channel, 'name', '') or 'channel'}"


def bot_name(client: discord.Client, guild: discord.Guild | None) -> str:
    """The bot's name where it speaks (a persona's `{bot_name}`): its server nickname."""
    me = guild.me if guild else None
    assert client.user is not None  # connected
    return (me or client.user).display_name


async def set_buttons(
    client: discord.Client, channel: str, message_id: str, view: discord.ui.View | None
) -> None:
    """Replace a message's buttons (None: take them off), leaving its text as it is."""
    message = client.get_partial_messageable(int(channel)).get_partial_message(int(message_id))
    await message.edit(view=view, allowed_mentions=NO_PINGS)


class DiscordChannel:
    """Posts and edits the messages of one answer, by ids alone, so another process can
    take the answer over. Never pings anyone, never embeds a link (Discord would fetch
    a URL that model output or injected text put there), and never posts twice: each
    send carries a nonce derived from the turn and the message's place in the answer.

    With `reply_to`, every message of the answer is a reply to that message, so that a
    reply to any of them, not only the first, leads back along the reply chain to the
    conversation's start (how an inline conversation is keyed).

    With `thread_from`, the answer goes into a thread opened from that message (whose id
    the thread takes), opened on the first post; where Discord refuses to open it, the
    answer is given inline instead, as replies to that message, and where that message
    was deleted meanwhile, nowhere (NowhereToAnswer). `buttons` ride on every
    post and edit while set; while None, edits take any buttons off.
    """

    def __init__(
        self,
        client: discord.Client,
        *,
        channel: str,
        seed: str,
        reply_to: str | None = None,
        thread_from: str | None = None,
        thread_name: str = "",
        posted: int = 0,
    ) -> None:
        self.client = client
        self.channel = channel
        self.seed = seed
        self.reply_to = reply_to
        self.thread_from = thread_from
        self.thread_name = thread_name
        self.posted = posted  # messages of this answer sent so far (earlier tries included)
        self.thread_open = bool(posted)
        self.buttons: discord.ui.View | None = None

    def where(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "seed": self.seed,
            "reply_to": self.reply_to,
            "thread_from": self.thread_from,
            "thread_name": self.thread_name,
            "posted": self.posted,  # so a resumed answer's sends take nonces none has had
        }

    @property
    def destination_id(self) -> str:
        """The channel the messages are in: the answer's thread, or the channel itself."""
        return self.thread_from or self.channel

    @property
    def destination(self) -> discord.PartialMessageable:
        return self.client.get_partial_messageable(int(self.destination_id))

    async def typing(self) -> None:
        await self._open_thread()
        with self._not_deleted():
            await self._in_open_thread(self.destination.typing)

    async def post(self, text: str) -> str:
        await self._open_thread()
        options: dict[str, Any] = {"allowed_mentions": NO_PINGS, "suppress_embeds": True}
        if self.buttons is not None:
            options["view"] = self.buttons
        if self.reply_to is not None:
            reference = discord.MessageReference(
                message_id=int(self.reply_to),
                channel_id=int(self.channel),
                # An answer's first message, its question deleted, is not posted bare in
                # the channel; its later ones stay, replying to nothing.
                fail_if_not_exists=self.posted == 0,
            )
            options |= {"reference": reference, "mention_author": False}
        seeded = nonce(self.seed, self.posted)
        with self._not_deleted():
            try:
                message = await self.destination.send(text, nonce=seeded, **options)
            except discord.HTTPException as error:
                if error.code == INVALID_FORM_BODY and "message_reference" in error.text:
                    why = f"its question (message {self.reply_to}) was deleted"
                    raise NowhereToAnswer(why) from error
                raise
        self.posted += 1
        return str(message.id)

    async def edit(self, message_id: str, text: str) -> None:
        message = self.destination.get_partial_message(int(message_id))
        try:
            with self._not_deleted():
                await self._in_open_thread(
                    lambda: message.edit(content=text, allowed_mentions=NO_PINGS, view=self.buttons)
                )
        except discord.NotFound as error:
            if error.code == UNKNOWN_MESSAGE:
                raise Gone(message_id) from error
            raise

    @contextlib.contextmanager
    def _not_deleted(self) -> Iterator[None]:
        """The answer's thread (or channel) deleted, or closed to the bot (a permission
        such as Send Messages in Threads denied there): it has nowhere to go, now or
        later, as tries again would be refused again."""
        try:
            yield
        except discord.NotFound as error:
            if error.code == UNKNOWN_CHANNEL:
                why = f"its thread or channel ({self.destination_id}) was deleted"
                raise NowhereToAnswer(why) from error
            raise
        except discord.Forbidden as error:
            why = f"the bot may not post in {self.destination_id}: Discord said {error.text}"
            raise NowhereToAnswer(why) from error

    async def delete(self, message_id: str) -> None:
        message = self.destination.get_partial_message(int(message_id))
        with contextlib.suppress(discord.NotFound):  # deleted already: what was asked
            await self._in_open_thread(message.delete)

    async def _in_open_thread(self, call: Callable[[], Awaitable[object]]) -> None:
        """`call`, and again once the answer's thread is unarchived, where Discord refused
        it as archived (idle past its auto-archive duration, a day: a Regenerate pressed
        then, whose answer begins with typing, not a post, which would unarchive it), as
        Discord's own client does; a thread also locked is nowhere to answer."""
        try:
            await call()
            return
        except discord.HTTPException as error:
            if error.code != THREAD_ARCHIVED:
                raise
        try:
            await self.client.http.edit_channel(int(self.destination_id), archived=False)
        except discord.Forbidden as error:  # locked by a moderator
            why = f"its thread ({self.destination_id}) is archived and locked"
            raise NowhereToAnswer(why) from error
        await call()

    async def _open_thread(self) -> None:
        if self.thread_from is None or self.thread_open:
            return
        try:
            await self.client.http.start_thread_with_message(
                int(self.channel),
                int(self.thread_from),
                name=self.thread_name or "threadbot",
                auto_archive_duration=THREAD_ARCHIVE_MINUTES,
            )
        except discord.HTTPException as error:
            if error.code == THREAD_EXISTS:  # opened already, by an earlier try
                pass
            elif error.code == UNKNOWN_MESSAGE:  # not an answer bare in the channel
                why = f"its question (message {self.thread_from}) was deleted"
                raise NowhereToAnswer(why) from error
            elif error.status < 500 and error.status != 429:  # refused, as it would be again
                self._answer_inline(error)
                return
            else:  # Discord's trouble, or its rate limit past discord.py's own retries
                raise
        _threadless.discard(self.channel)  # allowed again: a later refusal is news
        self.thread_open = True

    def reply_in_place(self) -> None:
        """Where no thread is open yet, send to the channel as replies to the message: a
        refusal before any answer (a limit, an empty or too long message) opens no thread
        for one line, one per refused message."""
        if self.thread_from is not None and not self.thread_open:
            self.reply_to, self.thread_from = self.thread_from, None

    def _answer_inline(self, error: discord.HTTPException) -> None:
        """No thread may be opened in the channel (the bot lacks Create Public Threads
        there, or the channel has none, as a voice channel's chat): the answer goes inline,
        as replies to the message, rather than nowhere. Its conversation keeps its key, the
        message's id, which is also the chain root of those replies, so replies to the
        answer continue it as in inline mode. The operator is told once per channel, not
        on every answer."""
        if self.channel not in _threadless:
            _threadless.add(self.channel)
            why = (
                "the bot lacks the Create Public Threads permission there"
                if error.status == 403
                else "threads cannot be opened there"
            )
            logger.warning(
                "Discord refused to open a thread in channel %s (%s): %s; answering in the "
                "channel instead", self.channel, error.text or error.status, why,
            )  # fmt: skip
        self.reply_in_place()


class Membership(NamedTuple):
    """What a lookup said of a user in a server, until when it is trusted."""

    roles: tuple[str, ...] | None  # None: not a member; else with @everyone's (the server id)
    expires: float  # monotonic()


class Memberships:
    """A user's role ids in the bot's servers, for a DM, which is in no server (see
    `requester`). The bot has no members intent, so a lookup is one REST call, under
    Discord's global limit (about 50 a second) that posting answers shares, and every DM
    would repeat it: a user's membership of a server is remembered for
    MEMBERSHIP_SECONDS (a role given or taken counts within that time), the
    MEMBERSHIPS_KEPT newest at most; servers are looked up one at a time, only until one
    admits the user, and at most DM_LOOKUPS of them per DM."""

    def __init__(self, client: discord.Client) -> None:
        self.client = client
        self._known: OrderedDict[tuple[int, str], Membership] = OrderedDict()  # (user, server)

    def servers(self) -> list[str]:
        return [str(guild.id) for guild in self.client.guilds]

    async def until_admitted(
        self, user_id: int, servers: Iterable[str], admits: Callable[[str, tuple[str, ...]], bool]
    ) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The user's role ids in each of `servers` they are a member of: the remembered
        ones first (no REST call), then the others looked up in turn, until `admits` one
        (server, roles); servers left after DM_LOOKUPS lookups count as not the user's."""
        found: list[tuple[str, tuple[str, ...]]] = []
        unknown: list[str] = []
        for server in servers:
            known = self._known.get((user_id, server))
            if known is None or known.expires <= monotonic():
                unknown.append(server)
            elif known.roles is not None:
                found.append((server, known.roles))
        if any(admits(server, roles) for server, roles in found):
            return tuple(found)
        for server in unknown[:DM_LOOKUPS]:
            roles = (await self._look_up(user_id, server)).roles
            if roles is not None:
                found.append((server, roles))
                if admits(server, roles):
                    return tuple(found)
        if len(unknown) > DM_LOOKUPS:
            logger.info("user %s: stopped after %d server lookups", user_id, DM_LOOKUPS)
        return tuple(found)

    async def _look_up(self, user_id: int, server: str) -> Membership:
        """One GET; any failure counts as not a member (deny). An answer is remembered for
        MEMBERSHIP_SECONDS; a failure for FAILED_LOOKUP_SECONDS, so it is logged once, not
        retried on every DM, and yet a member is not refused long for one transient error."""
        seconds = MEMBERSHIP_SECONDS
        try:
            async with asyncio.timeout(LOOKUP_SECONDS):
                member = await self.client.http.get_member(int(server), user_id)
            roles: tuple[str, ...] | None = (server, *member["roles"])
        except discord.NotFound:
            roles = None
        except Exception as error:
            logger.warning("could not look up user %s in server %s: %r", user_id, server, error)
            roles, seconds = None, FAILED_LOOKUP_SECONDS
        key = user_id, server
        known = self._known[key] = Membership(roles, monotonic() + seconds)
        self._known.move_to_end(key)
        while len(self._known) > MEMBERSHIPS_KEPT:
            self._known.popitem(last=False)  # the oldest, so about the soonest to expire
        return known


async def requester(
    user: discord.abc.User, key: ConversationKey, *, access: Access, memberships: Memberships
) -> Requester:
    """Who asks where, for the access rules: a server member's roles count. A DM carries no
    roles, so the asker's roles are looked up in the servers the rules name: per server,
    not pooled, as the rules judge each server on its own (bot.access decides, and says
    which servers to look in and when one is enough)."""
    roles = getattr(user, "roles", ())  # a Member's; a DM's User has none
    dm = key.workspace == "-"
    return Requester(
        PLATFORM,
        str(user.id),
        key.channel,  # a thread's parent
        workspace=None if dm else key.workspace,
        dm=dm,
        roles=tuple(str(role.id) for role in roles),
        memberships=await _memberships(user.id, access, memberships) if dm else (),
    )


async def _memberships(
    user_id: int, access: Access, memberships: Memberships
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The user's role ids in the servers where a DM's roles count (none: no lookup), until
    one admits them."""
    servers = dm_servers(access, str(user_id), memberships.servers())
    return await memberships.until_admitted(user_id, servers, partial(dm_membership_admits, access))
