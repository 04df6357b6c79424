"""Messages sent to the bot while it was away from Discord's gateway (a restart, a
redeploy, a session Discord would not resume), read back once it is connected anew.

Discord replays the events a session missed only when that session is resumed; a new
session (IDENTIFY) gets none of them, so a message sent in between was never answered,
where Slack would have sent it again. At each new session the adapter reads the messages
sent since it went away (a new process: in the last `CATCH_UP_S`) in the channels and
active threads of its servers whose last message is newer, and in the DMs it was spoken
to in lately, and handles those it has not seen as if they came now, oldest first in each
channel (what it did handle is marked seen), before any that came live since: they came
after them (a `forget` among them must not drop a later message, nor be undone).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime

import aiohttp
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
    seen: Callable[[Sequence[str]], Awaitable[list[bool]]],
) -> AsyncIterator[discord.Message]:
    """The messages sent between `since` and `until` (times; after it they came live), in
    the channels and threads of the bot's servers whose last message is newer (the
    `MOST_CHANNELS` latest spoken in, those first), then in the DM channels `dms` that
    had one: channel by channel, each's `MOST_MESSAGES` latest, oldest first, those not
    `seen` (by id) that came after the last one seen (`_after_seen`). A channel that
    cannot be read (no Read Message History, gone, Discord failing) is passed over."""
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
    for dm in dms:
        try:
            # discord.py's DMChannel keeps no last message: the channel's own data does.
            data = await client.http.get_channel(int(dm))
            if int(data.get("last_message_id") or 0) > floor:
                channel = await client.fetch_channel(int(dm))
                if isinstance(channel, discord.DMChannel):
                    channels.append(channel)
        except (discord.HTTPException, aiohttp.ClientError) as error:  # closed to the bot
            logger.info("could not read back DM channel %s: %s", dm, error)
    after, before = discord.Object(floor), discord.Object(ceiling)
    for channel in channels:
        # The latest (from `before` back): the oldest of a busy hour would leave them out.
        read = channel.history(limit=MOST_MESSAGES, after=after, before=before, oldest_first=False)
        try:
            history = [message async for message in read][::-1]
        except (discord.HTTPException, aiohttp.ClientError) as error:
            logger.info("could not read back channel %s: %s", channel.id, error)
            continue
        by_author = not isinstance(channel, discord.Thread | discord.DMChannel)
        flags = await seen([str(message.id) for message in history])
        for message in _after_seen(history, flags, by_author=by_author):
            yield message


def _after_seen(
    history: list[discord.Message], flags: list[bool], *, by_author: bool
) -> list[discord.Message]:
    """The messages not seen that came after the last one seen, in a thread or a DM: the
    ones before it came live (in a thread, chatter from before the bot was in it; in a DM,
    a message refused in an outage, or a command at a stop, that its sender was told to
    send again, and sent on). In a channel, where each mention is its own conversation,
    after the last one seen of the same author."""

    def whose(message: discord.Message) -> int | None:
        return message.author.id if by_author else None

    marked = list(enumerate(zip(history, flags, strict=True)))
    last_seen = {whose(message): at for at, (message, was_seen) in marked if was_seen}
    return [
        message
        for at, (message, was_seen) in marked
        if not was_seen and at > last_seen.get(whose(message), -1)
    ]
