"""Discord: mentions answered in threads (or inline replies), thread follow-ups and DMs;
slash commands, and Stop / Regenerate buttons on answers.

Owns everything Discord-specific, on discord.py: which messages to answer, conversation
keys (guild, channel, thread), threads it creates, earlier thread messages, display
names, and the reply target (no pings, idempotent sends). Commands live in
`discord_commands`, buttons in `discord_buttons`, posting in `discord_channel`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any

import aiohttp
import discord
import yarl
from discord.gateway import DiscordWebSocket

from adapters.attachments import Attachment, attached, with_files_named
from adapters.base import (
    Adapter,
    AdapterError,
    InOrder,
    Joining,
    answer,
    command,
    failure_text,
)
from adapters.discord_buttons import AnswerButtons, Asker, DiscordReply
from adapters.discord_catch_up import CATCH_UP_S, missed
from adapters.discord_channel import (
    MESSAGE_LIMIT,
    NO_PINGS,
    PLATFORM,
    DiscordChannel,
    Memberships,
    bot_name,
    channel_name,
    conversation_key,
    requester,
)
from adapters.discord_commands import ResumedEphemeral, SlashCommands
from adapters.streaming import EditBudgets
from adapters.text import with_forwarded
from bot.config import Settings
from bot.service import ChatService
from bot.types import ChatMessage, ConversationKey, ReplySink, Turn
from bot.waiting import set_within
from storage.errors import is_outage

logger = logging.getLogger(__name__)

HISTORY_LIMIT = 50  # earlier thread messages read when first mentioned in a thread
REPLY_CHAIN_LIMIT = 50  # replies followed back to find an inline conversation's start
THREAD_NAME_LENGTH = 90  # Discord allows 100
ATTACHMENT_SECONDS = 10.0  # reading a message's attached files
JOIN_WAIT_S = 15.0  # how long a message waits for a mention taking the bot into its thread
TYPING_INTERVAL = 8.0  # Discord's typing indicator lasts about 10 s
READ_BACK_WAIT_S = 60.0  # the longest a live message waits for the read-back before it
AWAY_MARGIN_S = 90.0  # discord.py notices a dead connection only at its heartbeat timeout (60 s)
# Discord limits a channel's message edits together, about 5 in 5 s: answers streaming
# side by side in one channel (inline mode) share them, and the finals are counted too.
EDITS_PER_MINUTE = 50
EDIT_BURST = 5
ANSWERED_TYPES = {discord.MessageType.default, discord.MessageType.reply}
PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    create_public_threads=True,
    read_message_history=True,
)
MENTION = re.compile(r"([ \t]*)<(@!?|@&|#)(\d+)>([ \t]*)")  # with the spaces around it
INTENTS_HELP = (
    "Discord refused the message content intent (close code 4014): in the developer portal, "
    "open your application → Bot → Privileged Gateway Intents and turn on Message Content Intent"
)


def gateway_intents() -> discord.Intents:
    """What the bot receives: servers, their messages and DMs, with message content."""
    intents = discord.Intents.none()
    intents.guilds = intents.guild_messages = intents.dm_messages = True
    intents.message_content = True
    return intents


def _sent_after(cut: tuple[float, str] | None) -> discord.Object | datetime | None:
    """What a thread is read back after, once its conversation was reset or forgotten: the
    command's own message (a snowflake, as a slash command's interaction id is too), else
    when it was handled."""
    if cut is None:
        return None
    at, message = cut
    return discord.Object(id=int(message)) if message.isdigit() else datetime.fromtimestamp(at, UTC)


def _point_at_api(settings: Settings) -> None:
    """discord.py keeps its REST base and gateway URL as class attributes: one Discord
    connection per process, pointed where DISCORD_API_URL says."""
    discord.http.Route.BASE = settings.discord_api_url.rstrip("/")


def _token(settings: Settings) -> str:
    token = settings.discord_bot_token
    return token.get_secret_value() if token else ""


@contextlib.contextmanager
def _as_adapter_errors(settings: Settings) -> Iterator[None]:
    """Discord's refusals, and its being out of reach, said as `threadbot run` says them."""
    try:
        yield
    except discord.LoginFailure as error:
        raise AdapterError(f"Discord refused DISCORD_BOT_TOKEN ({error})", setting=True) from error
    except discord.PrivilegedIntentsRequired as error:
        raise AdapterError(INTENTS_HELP, setting=True) from error
    except (aiohttp.ClientError, TimeoutError, discord.DiscordServerError) as error:
        raise AdapterError(
            f"could not reach Discord at DISCORD_API_URL={settings.discord_api_url} "
            f"({error.__class__.__name__}: {error})"
        ) from error


class DiscordAdapter(Adapter):
    """Answers Discord mentions, thread follow-ups and DMs through the service; runs its
    slash commands and its answers' buttons."""

    platform = PLATFORM

    def __init__(
        self,
        *,
        client: discord.Client,
        service: ChatService,
        settings: Settings,
        typing_interval: float = TYPING_INTERVAL,
    ) -> None:
        self.client = client
        self.service = service
        self.joining = Joining(service)  # threads a mention is taking the bot into
        self.in_order = InOrder()  # each conversation's messages, accepted as they came
        self.arrivals = InOrder()  # each channel's messages, routed one by one as they came
        self.settings = settings
        self.typing_interval = typing_interval
        self.edit_budgets = EditBudgets(per_minute=EDITS_PER_MINUTE, burst=EDIT_BURST)  # by channel
        self.memberships = Memberships(client)  # DM askers' roles, shared by all three paths
        self.commands = SlashCommands(
            client=client,
            service=service,
            memberships=self.memberships,
            global_commands=settings.discord_global_commands,
        )
        self.buttons = AnswerButtons(
            service=service, memberships=self.memberships, regenerating=self._regenerating
        )
        self._gateway_up = False  # between READY (or RESUMED) and a disconnect
        self._away_since: float | None = None  # when the last session went down
        self._session_began = 0.0  # when the session now up began (READY)
        self.caught_up = asyncio.Event()  # cleared while a new session reads back
        self.caught_up.set()
        for handler in (self.on_message, self.on_interaction, self.on_guild_available,
                        self.on_guild_join, self.on_guild_remove, self.on_connect,
                        self.on_ready, self.on_resumed, self.on_disconnect):  # fmt: skip
            client.event(handler)

    @classmethod
    def from_settings(cls, settings: Settings, service: ChatService) -> DiscordAdapter:
        client = discord.Client(intents=gateway_intents())
        return cls(client=client, service=service, settings=settings)

    @staticmethod
    async def check_token(settings: Settings) -> None:
        """Ask Discord about DISCORD_BOT_TOKEN before the model loads (a download and a
        load: minutes at a first start), as `run` will: an AdapterError as it would raise."""
        _point_at_api(settings)
        client = discord.Client(intents=gateway_intents())
        try:
            with _as_adapter_errors(settings):
                await client.login(_token(settings))
        finally:
            await client.close()

    async def run(self) -> None:
        _point_at_api(self.settings)
        try:
            with _as_adapter_errors(self.settings):
                await self.client.login(_token(self.settings))
                self.service.serve_platform(PLATFORM, self._resumed)  # REST is enough for that
                _, gateway, _ = await self.client.http.get_bot_gateway()
                # A plain Client never asks /gateway/bot; Discord says to, and proxies need it.
                DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)
                application = self.client.application_id or self.client.user.id  # type: ignore[union-attr]
                logger.info(
                    "Discord: invite the bot with %s",
                    discord.utils.oauth_url(application, permissions=PERMISSIONS),
                )
                await self.commands.register()
                await self.client.connect(reconnect=True)
        finally:
            await self.client.close()

    async def connected(self) -> bool:
        return self._gateway_up and not self.client.is_closed()

    async def on_connect(self) -> None:
        """READY came: a new session, whose events come from now on."""
        self._session_began = time.time()
        self.caught_up.clear()
        self.commands.forget()

    async def on_ready(self) -> None:
        """A new session: none of the events since the last one will come."""
        self._gateway_up = True
        logger.info("Discord: connected to the gateway")
        await self._catch_up()

    async def on_resumed(self) -> None:
        self._gateway_up = True
        logger.info("Discord: gateway session resumed")

    async def on_disconnect(self) -> None:
        if self._gateway_up and not self.client.is_closed():  # not our own stop
            logger.warning("Discord: disconnected from the gateway; reconnecting")
            self._away_since = time.time()
        self._gateway_up = False

    async def _catch_up(self) -> None:
        """Handle the messages sent while no session was up that were not seen (see
        `discord_catch_up`): since the last session went down (less `AWAY_MARGIN_S`), or
        in a new process, within `CATCH_UP_S`; live messages wait until it is over."""
        began, away = self._session_began, self._away_since  # since it began: live
        since = max(began - CATCH_UP_S, away - AWAY_MARGIN_S if away else 0.0)
        caught = 0
        try:
            me = self.client.user
            dms = await self.service.store.heard(PLATFORM, str(me.id)) if me else []
            seen = partial(self.service.store.seen, PLATFORM)
            async for message in missed(self.client, dms, since, began, seen):
                caught += 1
                await self._handle(message, read_back=True)
        except Exception as error:  # the next new session reads them back
            logger.warning("Discord: could not read back what was sent while away: %s",
                           error, exc_info=not is_outage(error))  # fmt: skip
        else:
            self._away_since = None
        if caught:
            logger.info("Discord: read back %d messages sent while the bot was away", caught)
        self.caught_up.set()

    async def on_guild_available(self, guild: discord.Guild) -> None:
        await self.commands.register_in(guild)

    async def on_guild_join(self, guild: discord.Guild) -> None:
        await self.commands.register_in(guild)

    async def on_guild_remove(self, guild: discord.Guild) -> None:
        """Removed from a server, the app's commands there go with it: invited back, it
        registers them again."""
        self.commands.forget(guild)

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """Button presses; slash commands go to the command tree."""
        if interaction.type is discord.InteractionType.component:
            await self.buttons.on_press(interaction)

    def _sink(
        self,
        target: DiscordChannel,
        asker: Asker | None,
        message_ids: Sequence[str] = (),
        replacing: Sequence[str] = (),
        *,
        regenerates: bool = False,
    ) -> DiscordReply:
        return DiscordReply(
            target=target,
            asker=asker,
            service=self.service,
            replacing=replacing,
            regenerates=regenerates,
            render=str,  # Discord speaks Markdown; allowed_mentions stops every ping
            limit=MESSAGE_LIMIT,
            interval=self.settings.discord_edit_interval,
            budgets=self.edit_budgets,
            message_ids=message_ids,
            typing_interval=self.typing_interval,
            # typing until the first text, which comes within the request timeout
            typing_repeats=math.ceil(self.settings.request_timeout / self.typing_interval),
        )

    def _resumed(self, target: dict[str, Any], stop: Callable[[], object]) -> ReplySink:
        """The sink of an answer started earlier (maybe by another process). (Its Stop is
        a button, whose press reaches the service as an interaction: `stop` is not kept.)"""
        if target.get("ephemeral"):  # a slash command's
            return ResumedEphemeral(self.client, target)
        messages = target.get("messages", [])
        channel = DiscordChannel(
            self.client,
            channel=target["channel"],
            seed=target["seed"],
            reply_to=target.get("reply_to"),
            thread_from=target.get("thread_from"),
            thread_name=target.get("thread_name", ""),
            # Messages deleted since (a shorter final text, a restarted try) had nonces
            # too: counted by a version that saved no count, they would be sent again.
            posted=target.get("posted", len(messages)),
        )
        asker = None
        if "asker" in target:  # saved by a version with buttons
            key = ConversationKey.parse(target["conversation"])
            asker = Asker(target["asker"], key)
        return self._sink(
            channel, asker, messages,
            replacing=target.get("replacing", ()), regenerates=bool(target.get("regenerates")),
        )  # fmt: skip

    def _regenerating(self, place: dict[str, Any], seed: str, asker: Asker) -> DiscordReply:
        """The sink of a regenerated answer: it streams into the old answer's first message
        and deletes the others; `seed` (the press) keeps its sends' nonces new."""
        first, *others = place["messages"]
        channel = DiscordChannel(
            self.client,
            channel=place["channel"],
            seed=seed,
            reply_to=place.get("reply_to"),  # an inline answer's parts all reply to it
            posted=1,
        )
        return self._sink(channel, asker, [first], replacing=others, regenerates=True)

    async def on_message(self, message: discord.Message) -> None:
        """A live message: it came after those being read back, if any (waited for up to
        `READ_BACK_WAIT_S`: Discord slow to give them must not hold the bot up for long)."""
        await set_within(self.caught_up, READ_BACK_WAIT_S)
        await self._handle(message)

    async def _handle(self, message: discord.Message, *, read_back: bool = False) -> None:
        me = self.client.user
        if (
            me is None
            or message.author.bot
            or message.webhook_id is not None
            or message.type not in ANSWERED_TYPES
        ):
            return  # bots (ourselves included), webhooks, joins, pins and other system messages
        addressed = _addressed(message, me)
        try:
            async with contextlib.AsyncExitStack() as held:
                # A channel's messages are routed one by one as they came, since routing
                # may wait (Redis, a fetch): one routed sooner would take its conversation's
                # place ahead of one that came before it, or ask whether the bot is in a
                # thread before the mention that brings it in is joining.
                with self.arrivals.place(str(message.channel.id)) as after_earlier_ones:
                    await after_earlier_ones()
                    if (route := await self._route(message, me)) is None:
                        return
                    key, target, joins = route
                    if isinstance(message.channel, discord.DMChannel):  # for a catch-up
                        channel = str(message.channel.id)
                        await self.service.store.hear_from(PLATFORM, str(me.id), channel)
                    in_turn = held.enter_context(self.in_order.place(key))
                    if joins:
                        await held.enter_async_context(self.joining.joining(key))
                addressed = True
                earlier = await self._earlier(message, me, key) if joins else ()
                author = await _member(message) if read_back else message.author
                if author is None:
                    logger.info("message %s read back: its author left the server", message.id)
                    return
                access = self.service.team.settings.access
                who = await requester(author, key, access=access, memberships=self.memberships)
                if await self.service.admit(who, key, partial(_reply, message)):
                    await self._converse(message, key, target, earlier, in_turn, read_back)
        except Exception as error:
            text = failure_text(error, f"Discord message {message.id} in {message.channel.id}")
            if addressed:
                try:
                    await message.channel.send(
                        text, allowed_mentions=NO_PINGS, suppress_embeds=True
                    )
                except discord.DiscordException:
                    logger.warning("could not tell the user about the failure", exc_info=True)

    async def _route(
        self, message: discord.Message, me: discord.ClientUser
    ) -> tuple[ConversationKey, DiscordChannel, bool] | None:
        """Where a message's conversation lives, where to answer, and whether the bot joins
        a thread with it (its earlier messages are read); None to stay out."""
        channel, mentioned = message.channel, _mentions(message, me)
        here = partial(DiscordChannel, self.client, channel=str(channel.id), seed=str(message.id))
        guild = str(message.guild.id) if message.guild else "-"
        key_from = partial(conversation_key, channel, guild=guild)
        if isinstance(channel, discord.DMChannel):
            return key_from(root=str(message.id)), here(), False
        if isinstance(channel, discord.Thread):
            key = key_from(root=str(message.id))
            if channel.owner_id == me.id:  # a thread we opened: no need to ask Redis
                return key, here(), False
            by = asyncio.get_running_loop().time() + JOIN_WAIT_S
            known = await self.joining.knows(key, by=by)
            if not (mentioned or known):
                return None
            return key, here(), not known
        inline = self.settings.discord_reply_mode == "inline"
        if inline or message.reference is not None:
            # In thread mode too, a reply to one of our messages in the channel (an answer
            # given inline where no thread could be opened) continues its conversation
            # there; a thread opened from the reply would be keyed apart from it.
            root = await self._reply_root(message, me, mentioned=inline and mentioned)
            key = None if root is None else key_from(root=root)
            # In thread mode, only a conversation the bot has: not a refusal's or a
            # command's reply in place, which are no conversation (yet one whose answer is
            # still being written, and so not yet known as an answer, is).
            if key is not None and (inline or await self.service.knows(key)):
                return key, here(reply_to=str(message.id)), False
            if inline:
                return None
        if not mentioned:
            return None
        text = self._readable(message, me)
        if command(text) is not None:  # a line or a few (reset and forget name no
            # conversation here): a reply in place, where a thread per command filled the
            # channel's thread list, each one a conversation the bot then answered unasked
            return key_from(root=str(message.id)), here(reply_to=str(message.id)), False
        # The answer opens a thread from this message, which takes the message's id.
        target = here(thread_from=str(message.id), thread_name=thread_name(text))
        return key_from(root=str(message.id)), target, False

    async def _converse(
        self,
        message: discord.Message,
        key: ConversationKey,
        target: DiscordChannel,
        earlier: tuple[ChatMessage, ...],
        in_turn: Callable[[], Awaitable[None]],
        read_back: bool,
    ) -> None:
        me = self.client.user
        assert me is not None
        text = self._readable(message, me)
        order = command(text)
        turn = Turn(
            key,
            str(message.author.id),
            text,
            str(message.id),
            context=earlier,
            command=order,
            author_name=message.author.display_name,
            channel_name=channel_name(message.channel),
            bot_name=bot_name(self.client, message.guild),
            read_back=read_back,
        )
        if order is None:
            turn = await attached(self.service, turn, _files(message), timeout=ATTACHMENT_SECONDS)
        asker = (
            None if turn.command else Asker(turn.author, key)
        )  # a command's reply has no buttons
        await in_turn()
        await answer(self.service, turn, self._sink(target, asker))

    async def _earlier(
        self, message: discord.Message, me: discord.ClientUser, key: ConversationKey
    ) -> tuple[ChatMessage, ...]:
        """The thread's messages before this one, oldest first (ours as the assistant's):
        the last HISTORY_LIMIT, and in a longer thread its first one too, which says what
        the thread is about (in a thread made from a channel message, that message); none
        from before the conversation was last reset or forgotten."""
        after = _sent_after(await self.service.store.cut(str(key)))
        thread, history = message.channel, []
        try:  # each read adds whole or not at all: answering without them beats not answering
            read = thread.history(
                limit=HISTORY_LIMIT, before=message, after=after, oldest_first=False
            )
            history += [m async for m in read]
            if len(history) == HISTORY_LIMIT:  # maybe more before them
                first = [m async for m in thread.history(limit=1, after=after, oldest_first=True)]
                history += [m for m in first if m.id < history[-1].id]
        except (discord.DiscordException, aiohttp.ClientError, OSError):  # (a dropped
            # connection: discord.py retries only a few kinds of it, and passes the rest on)
            logger.warning("could not read the thread's earlier messages", exc_info=True)
        said = [
            (m, with_files_named(self._readable(m, me), _files(m)))
            for m in map(_said, reversed(history))
        ]
        return tuple(
            {"role": "assistant", "content": text}
            if m.author == me
            else {"role": "user", "content": text, "name": m.author.display_name}
            for m, text in said
            if text
        )

    async def _reply_root(
        self, message: discord.Message, me: discord.ClientUser, *, mentioned: bool
    ) -> str | None:
        """The id of the first message of the reply chain `message` ends, or None if
        `message` is not for the bot.

        The first hop alone decides: a mention, or a reply to one of the bot's messages.
        A reply to an answer whose conversation is known takes that one's root; only else
        is the chain walked back, so channel chatter costs no REST call, and a
        conversation one per hop at most up to its nearest answer known.
        """

        async def replied_to(child: discord.Message) -> discord.Message | None:
            """The message `child` replies to: as the gateway sent it, else fetched once;
            None where there is none (a forward refers to a message, but is no reply), or
            it was deleted or cannot be read."""
            reference = child.reference
            if reference is None or reference.message_id is None:
                return None
            if reference.type is not discord.MessageReferenceType.reply:
                return None
            if (resolved := reference.resolved) is not None:  # the message, or its deletion
                return resolved if isinstance(resolved, discord.Message) else None
            try:
                return await child.channel.fetch_message(reference.message_id)
            except discord.DiscordException:
                return None

        parent = await replied_to(message)
        if (parent is None or parent.author != me) and not mentioned:
            return None
        root = message
        for hop in range(REPLY_CHAIN_LIMIT):
            if hop:  # the first hop was read above
                parent = await replied_to(root)
            if parent is None:
                break  # the chain starts here
            if parent.author == me and (
                known := await self.service.answered_in(PLATFORM, str(parent.id))
            ):
                return known.thread
            root = parent
        return str(root.id)

    @staticmethod
    def _readable(message: discord.Message, me: discord.ClientUser) -> str:
        """Content with our mention removed and other mentions as display names, then what
        it forwards (a forward's own content is empty: the copy is in its snapshots), and
        its stickers by name (a sticker alone is no empty message)."""
        names = {
            "@": {u.id: f"@{u.display_name}" for u in message.mentions},
            "@&": {r.id: f"@{r.name}" for r in message.role_mentions},
            "#": {c.id: f"#{c.name}" for c in message.channel_mentions},
        }

        ours = _own_role(message)

        def readable(match: re.Match[str]) -> str:
            before, kind, ident, after = (
                match[1],
                match[2].replace("!", ""),
                int(match[3]),
                match[4],
            )
            if (kind == "@" and ident == me.id) or (kind == "@&" and ours and ident == ours.id):
                return " "  # the spaces on both sides as one; any others, code's indents, kept
            return before + names[kind].get(ident, f"<{match[2]}{match[3]}>") + after

        said = MENTION.sub(readable, message.content).strip()
        forwarded = (snapshot.content for snapshot in message.message_snapshots)
        stickers = [f"[sticker: {sticker.name}]" for sticker in message.stickers]
        return "\n\n".join([with_forwarded(said, forwarded), *stickers]).strip()


def thread_name(text: str) -> str:
    """A thread's name, from the words of the message it opens from: as many whole words
    as fit, or where the first alone is too long (a URL), as much of it as fits."""
    name = textwrap.shorten(text, THREAD_NAME_LENGTH, placeholder="…")
    return name if name != "…" else text[: THREAD_NAME_LENGTH - 1] + "…"


def _addressed(message: discord.Message, me: discord.ClientUser) -> bool:
    """Whether a message is to the bot, so it hears of a failure: a mention, a DM, a
    message in a thread the bot opened, or a reply to one of its messages. (Others, in
    conversations it may not be part of, are left in silence.)"""
    channel, replied = message.channel, message.reference and message.reference.resolved
    return (
        _mentions(message, me)
        or isinstance(channel, discord.DMChannel)
        or (isinstance(channel, discord.Thread) and channel.owner_id == me.id)
        or (isinstance(replied, discord.Message) and replied.author.id == me.id)
    )


def _mentions(message: discord.Message, me: discord.ClientUser) -> bool:
    """Whether the message mentions the bot: its user, or the role Discord made for it
    (named as the bot, so people typing @name often pick it)."""
    ours = _own_role(message)
    return me in message.mentions or (ours is not None and ours in message.role_mentions)


def _own_role(message: discord.Message) -> discord.Role | None:
    """The role Discord made for the bot in the message's server, if it has one."""
    return message.guild.self_role if message.guild else None


async def _member(message: discord.Message) -> discord.abc.User | None:
    """A message's author as a live message names them: a server's message read back
    names a user, with no roles, where the access rules count the member's. None where
    they are no member now."""
    guild, author = message.guild, message.author
    if guild is None or isinstance(author, discord.Member):
        return author
    try:
        return await guild.fetch_member(author.id)
    except discord.NotFound:
        return None


async def _reply(message: discord.Message, text: str) -> None:
    """A short answer to `message` itself, where it was written (no thread, no ping)."""
    await message.channel.send(
        text,
        reference=message.to_reference(fail_if_not_exists=False),
        mention_author=False,
        allowed_mentions=NO_PINGS,
        suppress_embeds=True,
    )


def _files(message: discord.Message) -> list[Attachment]:
    """A message's files, and those of the messages it forwards."""
    forwarded = (a for snapshot in message.message_snapshots for a in snapshot.attachments)
    return [_attachment(attachment) for attachment in [*message.attachments, *forwarded]]


def _attachment(attachment: discord.Attachment) -> Attachment:
    """A Discord attachment; its size is known, so one too large is never downloaded."""
    return Attachment(
        name=attachment.filename,
        mimetype=attachment.content_type or "",
        size=attachment.size,
        download=partial(_read_whole, attachment),
    )


async def _read_whole(attachment: discord.Attachment, _wanted: int) -> bytes:
    """Discord's CDN serves a file whole (the reader caps it at MAX_FILE_BYTES first)."""
    return await attachment.read()


def _said(message: discord.Message) -> discord.Message:
    """What a thread's message said: a thread made from a channel message opens with an
    empty starter message that carries that message (the question the thread is about)."""
    starter = message.type is discord.MessageType.thread_starter_message
    carried = message.reference.resolved if message.reference is not None else None
    return carried if starter and isinstance(carried, discord.Message) else message
