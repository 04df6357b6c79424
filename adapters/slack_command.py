"""The `/threadbot <command>` slash command: the turn it gives the service, and a sink
that answers only the person who typed it (ephemeral, through the command's response_url).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from slack_sdk.web.async_client import AsyncWebClient

from adapters.base import command
from adapters.slack_format import MESSAGE_LIMIT, to_mrkdwn
from adapters.text import split_message
from bot.types import Command, ConversationKey, Turn

logger = logging.getLogger(__name__)

SLASH_COMMAND = "/threadbot"
RESPONSES = 5  # replies Slack takes on one command's response_url
CUT_SHORT = "_(The rest does not fit in the replies Slack allows a command.)_"
Respond = Callable[..., Awaitable[Any]]  # bolt's `respond`, bound to a response_url


def thread_only(order: Command) -> str:
    """In a channel, `reset`/`forget` would name no conversation: each thread is one, and
    Slack sends no thread with a slash command."""
    return (
        f"`{SLASH_COMMAND} {order}` works in a DM with me. In a channel, each thread is its "
        f"own conversation: send `{order}` in the thread you mean (mention me if I am not "
        "in it yet)."
    )


def typed_in_dm(payload: dict[str, Any]) -> bool:
    """Whether the command was typed in a DM (with the bot), not in a channel."""
    return str(payload.get("channel_id", "")).startswith("D")


def where_typed(payload: dict[str, Any]) -> dict[str, str]:
    """The `channel` and `channel_type` a message event where the command was typed would
    carry, so the channel is named for a persona's `{channel_name}` as its messages are
    (the payload's own `channel_name` is bare: `general`, `directmessage`, `mpdm-…`)."""
    if typed_in_dm(payload):
        kind = "im"
    elif str(payload.get("channel_name", "")).startswith("mpdm-"):
        kind = "mpim"
    else:
        kind = "channel"
    return {"channel": payload["channel_id"], "channel_type": kind}


def command_turn(
    payload: dict[str, Any],
    *,
    team: str,
    author_name: str = "",
    channel_name: str = "",
    bot_name: str = "",
) -> Turn:
    """The turn a slash command gives the service: its command (`help` where the text names
    none), for the DM or the channel it was typed in, in workspace `team` (ours, as its
    messages' conversations are); one per invocation (trigger id). The names fill a
    persona's placeholders, as the conversation's first turn there would."""
    channel = payload["channel_id"]
    text = payload.get("text", "").strip()
    return Turn(
        ConversationKey("slack", team, channel, channel),
        payload["user_id"],
        text,
        f"{team}:{channel}:command:{payload['trigger_id']}",
        command=command(text) or "help",
        author_name=author_name,
        channel_name=channel_name,
        bot_name=bot_name,
    )


class EphemeralReply:
    """A ReplySink for a slash command: shows only its outcome (the answer, a failure or a
    pause), to the person who typed it. Nothing is streamed. A response_url is a
    short-lived capability, never stored: a `reset` or `forget` resumed after a restart
    is told with `PostedEphemeral` instead."""

    def __init__(self, respond: Respond, *, channel: str, user: str) -> None:
        self.respond = respond
        self.channel = channel
        self.user = user
        self.on_post: Callable[[], Awaitable[None]] | None = None
        self.over = False
        self._posted = 0  # replies sent on the response_url

    def reply_target(self) -> dict[str, Any]:
        return {"ephemeral": True, "channel": self.channel, "user": self.user}

    async def start(self) -> None:
        """Slack shows nothing while a command runs, and needs nothing."""

    async def append(self, chunk: str) -> None:
        """Only the outcome is shown."""

    async def restart(self) -> None:
        """Nothing was shown."""

    async def notice(self, text: str) -> None:
        """Commands build no prompt: there is no history to leave out."""

    async def finish(self, text: str) -> None:
        self.over = True
        await self._say(text)

    async def fail(self, text: str) -> None:
        if not self.over:  # an answer (or failure) already shown stays the outcome
            self.over = True
            await self._say(text)

    async def pause(self, text: str) -> None:
        if not self.over:
            await self._say(text)

    async def _say(self, text: str) -> None:
        parts = split_message(to_mrkdwn(text), MESSAGE_LIMIT)
        left = RESPONSES - self._posted
        if len(parts) > left:  # the last that Slack takes says the rest is not shown
            parts = [*parts[: left - 1], CUT_SHORT] if left else []
        for part in parts:
            response = await self.respond(
                text=part, response_type="ephemeral", unfurl_links=False, unfurl_media=False
            )
            self._posted += 1
            if response.status_code != 200:
                logger.warning("Slack refused a command's response (HTTP %d)", response.status_code)
                return


class PostedEphemeral(EphemeralReply):
    """The sink of a slash command resumed after a restart (`reply_target`'s): its outcome
    is posted with chat.postEphemeral, to the same person in the same channel, as the
    response_url it came with is not kept."""

    def __init__(self, client: AsyncWebClient, *, channel: str, user: str) -> None:
        super().__init__(client.chat_postEphemeral, channel=channel, user=user)

    async def _say(self, text: str) -> None:
        for part in split_message(to_mrkdwn(text), MESSAGE_LIMIT):
            await self.respond(channel=self.channel, user=self.user, text=part)
