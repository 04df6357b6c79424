"""Messages sent to the bot while it was away from Discord's gateway (a restart, a
redeploy, a session Discord would not resume), read back once it is connected anew.

Discord replays the events a session missed only when that session is resumed; a new
session (IDENTIFY) gets none of them, so a message sent in between was never answered,
where Slack would have sent it again. At each new session the adapter reads the messages
sent since it went away (a new process: in the last `CATCH_UP_S`) in the channels and
active threads of its servers whose last message is newer, and in the DMs it was spoken
to in lately, and handles those it has not seen as if they came now, oldest first in each
channel: what it did handle is marked seen, and what came before that came live too.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime

import discord

logger = logging.getLogger(__name__)

CATCH_UP_S = 3600  # read back at most this far: an answer an hour late is still wanted
MOST_CHANNELS = 50  # of the servers', read back at one new session: those spoken in latest
MOST_MESSAGES = 100  # of each: one page of its history

Readable = discord.TextChannel | discord.VoiceChannel | discord.Thread | discord.DMChannel


async def missed(
    client: discord.Client,
    dms: Sequence[str],
    since: float,
    until: float,
    seen: Callable[[str], Awaitable[bool]],
) -> AsyncIterator[discord.Message]:
    """The messages sent between `since` and `until` (times; after it they came live), and
    after the last one `seen` (by its id: handled live, as were all before it), in the
    channels and threads of the bot's servers whose last message is newer (the
    `MOST_CHANNELS` latest spoken in, those first), then in the DM channels `dms`:
    channel by channel, each oldest first. One the bot may not read, or gone, is passed
    over, as is a message whose author left its server."""
    floor, ceiling = (
        discord.utils.time_snowflake(datetime.fromtimestamp(at, UTC)) for at in (since, until)
    )
    spoken_in = [
        channel
        for guild in client.guilds
        for channel in (*guild.text_channels, *guild.voice_channels, *guild.threads)
        if (channel.last_message_id or 0) > floor
    ]
    spoken_in.sort(key=lambda channel: channel.last_message_id or 0, reverse=True)
    channels: list[Readable] = spoken_in[:MOST_CHANNELS]
    for dm in dms:  # Discord names no DM's last message: each is read
        try:
            channel = await client.fetch_channel(int(dm))
        except (discord.NotFound, discord.Forbidden):  # closed to the bot since
            continue
        if isinstance(channel, discord.DMChannel):
            channels.append(channel)
    members: dict[tuple[int, int], discord.Member | None] = {}
    for channel in channels:
        after, before = discord.Object(floor), discord.Object(ceiling)
        read = channel.history(limit=MOST_MESSAGES, after=after, before=before, oldest_first=True)
        try:
            history = [message async for message in read]
        except (discord.NotFound, discord.Forbidden) as error:  # no Read Message History
            logger.info("could not read back channel %s: %s", channel.id, error)
            continue
        unseen: list[discord.Message] = []
        for message in reversed(history):  # chatter before a message seen was let go
            if await seen(str(message.id)):
                break
            unseen.append(message)
        for message in reversed(unseen):
            if await _by_member(message, members):
                yield message


async def _by_member(
    message: discord.Message, members: dict[tuple[int, int], discord.Member | None]
) -> bool:
    """A server's message read back names its author as a user, where a live one names
    the member: the member's roles count for the access rules, so they are looked up
    (once each); False where the author is no member now. A DM's stays as it is."""
    guild, author = message.guild, message.author
    if guild is None or isinstance(author, discord.Member) or author.bot:
        return True
    if (guild.id, author.id) not in members:
        try:
            members[guild.id, author.id] = await guild.fetch_member(author.id)
        except discord.NotFound:
            members[guild.id, author.id] = None
    member = members[guild.id, author.id]
    if member is not None:
        message.author = member
    return member is not None
