"""The bot's commands as Discord application ("slash") commands, answered ephemerally.

Registered at start: in each server the bot is in, and in each it joins later (server
commands appear at once), or once for all of Discord with DISCORD_GLOBAL_COMMANDS
(which can take up to an hour to show, but also reaches DMs). The list not in use is
emptied, so switching never shows a command twice. A command is handed to the service
as a `Turn` of the conversation it was run in; only the person who ran it sees the reply.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import discord
from discord import app_commands
from discord.http import Route

from adapters.base import answer, failure_text
from adapters.discord_channel import (
    MESSAGE_LIMIT,
    NO_PINGS,
    Memberships,
    bot_name,
    channel_name,
    conversation_key,
    requester,
)
from adapters.text import split_message
from bot import replies
from bot.service import ChatService
from bot.types import THREAD_ONLY, Command, NowhereToAnswer, Turn

logger = logging.getLogger(__name__)

EPHEMERAL = discord.MessageFlags(ephemeral=True)

DESCRIPTIONS: dict[Command, str] = {
    "help": "What I can do, and how to ask",
    "reset": "Start this conversation over: I forget its history and go on answering here",
    "forget": "Delete everything I stored of this conversation",
    "status": "How I am doing",
    "prompt": "The system prompt I use here",
    "reload": "Reload the team's configuration (admins only)",
    "stats": "Usage statistics (admins only)",
}
SCOPE_HELP = (
    "invite the bot again with its logged invite link (it has the applications.commands scope)"
)


def thread_only(order: Command) -> str:
    """In a server channel, `reset`/`forget` would name no conversation: each thread is
    one, and each chain of replies to an answer given in the channel."""
    return (
        f"`/{order}` works in a thread or a DM with me. In a channel, each thread is its own "
        f"conversation: run it in the thread you mean, or, where I answered in the channel, "
        f"send `{order}` as a reply to my answer."
    )


class _Ephemeral:
    """A command's reply, seen only by who ran it: the deferred ("thinking") response is
    replaced by the text, and any further parts follow as ephemeral follow-ups."""

    def __init__(self) -> None:
        self.on_post: Callable[[], Awaitable[None]] | None = None
        self.notice_text = ""
        self.over = False

    async def start(self) -> None:
        """The response was deferred already: Discord shows the bot thinking."""

    async def append(self, chunk: str) -> None:
        """Nothing: a command's reply is shown whole."""

    async def restart(self) -> None:
        """Nothing was shown."""

    async def notice(self, text: str) -> None:
        self.notice_text = f"*{text}*\n\n"

    async def finish(self, text: str) -> None:
        await self._show(self.notice_text + text)

    async def fail(self, text: str) -> None:
        if not self.over:
            await self._show(text)

    async def pause(self, text: str) -> None:
        await self.fail(text)

    async def _show(self, text: str) -> None:
        first, *rest = split_message(text, MESSAGE_LIMIT) or [text]
        await self._respond(first)
        self.over = True
        for part in rest:
            await self._follow_up(part)

    async def _respond(self, text: str) -> None:
        """`text` in place of the deferred response."""
        raise NotImplementedError

    async def _follow_up(self, text: str) -> None:
        """`text` as an ephemeral follow-up."""
        raise NotImplementedError


class EphemeralReply(_Ephemeral):
    """A slash command's reply, through its Interaction. A `reset` or `forget` resumed
    after a restart is told through the interaction's token (`ResumedEphemeral`), which
    its reply target keeps."""

    def __init__(self, interaction: discord.Interaction) -> None:
        super().__init__()
        self.interaction = interaction

    def reply_target(self) -> dict[str, Any]:
        application = str(self.interaction.application_id)
        return {"ephemeral": True, "application": application, "token": self.interaction.token}

    async def _respond(self, text: str) -> None:
        await self.interaction.edit_original_response(content=text, allowed_mentions=NO_PINGS)

    async def _follow_up(self, text: str) -> None:
        await self.interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_PINGS)


class ResumedEphemeral(_Ephemeral):
    """The reply of a `reset` or `forget` resumed after a restart (maybe by another
    process), where its Interaction is gone: through the interaction's webhook and token,
    which Discord honours for 15 minutes; past them, there is nowhere left to tell it."""

    HOOK = "/webhooks/{application}/{token}"

    def __init__(self, client: discord.Client, target: dict[str, Any]) -> None:
        super().__init__()
        self.client = client
        self.hook = {"application": target["application"], "token": target["token"]}

    def reply_target(self) -> dict[str, Any]:
        return {"ephemeral": True, **self.hook}

    async def _respond(self, text: str) -> None:
        await self._request(Route("PATCH", self.HOOK + "/messages/@original", **self.hook), text)

    async def _follow_up(self, text: str) -> None:
        await self._request(Route("POST", self.HOOK, **self.hook), text, flags=EPHEMERAL.value)

    async def _request(self, route: Route, text: str, **fields: Any) -> None:
        message = {"content": text, "allowed_mentions": NO_PINGS.to_dict(), **fields}
        try:
            await self.client.http.request(route, json=message)
        except discord.NotFound as error:
            raise NowhereToAnswer("its interaction's token has expired") from error


class SlashCommands:
    """The commands' tree on the client, their registration, and their handling."""

    def __init__(
        self,
        *,
        client: discord.Client,
        service: ChatService,
        memberships: Memberships,
        global_commands: bool,
    ) -> None:
        self.client = client
        self.service = service
        self.memberships = memberships
        self.global_commands = global_commands
        # The tree holds them as global commands, so an interaction finds its command
        # whichever way it was registered; `register_in` copies them to a server.
        self.tree = app_commands.CommandTree(client)
        for name, description in DESCRIPTIONS.items():
            command = app_commands.Command(
                name=name, description=description, callback=self._callback(name)
            )
            self.tree.add_command(command)
        self._registered: set[int] = set()  # servers done by this process

    async def register(self) -> None:
        """The global list, once logged in: the commands, or none where each server has
        its own. A refusal is logged; the text commands still work."""
        try:
            if self.global_commands:
                await self.tree.sync()
            else:
                await self.client.http.bulk_upsert_global_commands(self.client.application_id, [])
        except discord.HTTPException as error:
            logger.warning("Discord refused the global commands (%s): %s", error, SCOPE_HELP)

    def forget(self, guild: discord.Guild | None = None) -> None:
        """The server is left: its commands are registered again should it be joined. With
        none, every server (a new session: one left while none was up, whose GUILD_DELETE
        never came, may have been joined again, its commands gone); each is registered
        again as it comes."""
        if guild is None:
            self._registered.clear()
        else:
            self._registered.discard(guild.id)

    async def register_in(self, guild: discord.Guild) -> None:
        """A server the bot is in (at start, or just joined), once a process: its own list,
        the commands, or none where the global list has them."""
        if guild.id in self._registered:
            return
        self._registered.add(guild.id)
        if not self.global_commands:
            self.tree.copy_global_to(guild=guild)
        try:
            await self.tree.sync(guild=guild)
        except (discord.HTTPException, aiohttp.ClientError, OSError) as error:
            if isinstance(error, discord.HTTPException):
                logger.warning("Discord refused the commands in server %s (%s): %s", guild.id,
                               error, SCOPE_HELP)  # fmt: skip
            else:  # a network blip, which discord.py does not retry
                logger.warning("could not register the commands in server %s: %r", guild.id,
                               error)  # fmt: skip
            self._registered.discard(guild.id)  # tried again once the server is available
            return
        logger.info("commands registered in server %s", guild.id)

    def _callback(self, name: Command) -> Callable[[discord.Interaction], Awaitable[None]]:
        async def run(interaction: discord.Interaction) -> None:
            await self._run(interaction, name)

        return run

    async def _run(self, interaction: discord.Interaction, name: Command) -> None:
        """Acknowledge at once (Discord allows 3 s), then let the service answer."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        sink = EphemeralReply(interaction)
        if (channel := interaction.channel) is None:  # a kind discord.py does not know:
            logger.warning("/%s in a kind of channel discord.py does not know", name)
            await sink.finish(replies.unknown_channel())  # it keeps not even the channel's id
            return
        guild = str(interaction.guild_id) if interaction.guild_id else "-"
        key = conversation_key(channel, guild=guild, root=str(interaction.id))
        # Only the user sees the answer, so a denied one is always told (even `silent`).
        access = self.service.team.settings.access
        try:
            who = await requester(
                interaction.user, key, access=access, memberships=self.memberships
            )
            admitted = await self.service.admit(who, key, sink.finish)
        except Exception as error:  # e.g. Redis gone: not "thinking…" until Discord gives up
            with contextlib.suppress(Exception):
                await sink.fail(failure_text(error, f"Discord command /{name}"))
            return
        if not admitted:
            if not sink.over:
                await sink.finish(replies.denied())
            return
        if name in THREAD_ONLY and not isinstance(channel, discord.DMChannel | discord.Thread):
            await sink.finish(thread_only(name))
            return
        turn = Turn(
            key,
            str(interaction.user.id),
            f"/{name}",
            str(interaction.id),
            command=name,
            author_name=interaction.user.display_name,
            channel_name=channel_name(channel),  # as a conversation there fills the prompt
            bot_name=bot_name(self.client, interaction.guild),
        )
        await answer(self.service, turn, sink)
