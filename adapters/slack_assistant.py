"""Slack's assistant pane (Agents & AI Apps): a greeting with suggested prompts when a
thread starts, the thread's title, and the status line under a thread ("is thinking…").

None of it is the answer itself: a call Slack refuses here (an ordinary DM thread, an
older workspace) is logged at DEBUG and the answer goes on.
"""

from __future__ import annotations

import logging
import re

from slack_sdk.web.async_client import AsyncWebClient

from adapters.streaming import skippable

logger = logging.getLogger(__name__)

GREETING = "Hi! Ask me anything: I answer here, and remember this thread's conversation."
SUGGESTED_PROMPTS = (
    {"title": "Explain a concept", "message": "Explain how public-key cryptography works."},
    {"title": "Summarize a text", "message": "Summarize the following text in three bullets:"},
    {"title": "Draft a message", "message": "Draft a short, friendly reminder about a meeting."},
)
THINKING = "is thinking…"
TITLE_LENGTH = 80  # a title is one line in the pane's history list


class ThreadStatus:
    """The status line Slack shows under a thread while the bot works on an answer.

    Slack clears it when the bot posts there, and after two minutes without a post."""

    def __init__(self, client: AsyncWebClient, *, channel: str, thread_ts: str) -> None:
        self.client = client
        self.channel = channel
        self.thread_ts = thread_ts

    async def show(self) -> None:
        await self._set(THINKING)

    async def clear(self) -> None:
        await self._set("")

    async def _set(self, status: str) -> None:
        try:
            with skippable():  # a nicety: never worth holding an answer (or an ack) back
                await self.client.assistant_threads_setStatus(
                    channel_id=self.channel, thread_ts=self.thread_ts, status=status
                )
        except Exception:
            logger.debug("no status in thread %s", self.thread_ts, exc_info=True)


async def greet(client: AsyncWebClient, *, channel: str, thread_ts: str) -> None:
    """A new assistant thread: say hello, and offer a few prompts to start from."""
    await client.chat_postMessage(
        channel=channel,
        thread_ts=thread_ts,
        text=GREETING,
        unfurl_links=False,
        unfurl_media=False,
    )
    try:
        await client.assistant_threads_setSuggestedPrompts(
            channel_id=channel, thread_ts=thread_ts, prompts=list(SUGGESTED_PROMPTS)
        )
    except Exception:
        logger.debug("no suggested prompts in thread %s", thread_ts, exc_info=True)


async def set_title(client: AsyncWebClient, *, channel: str, thread_ts: str, question: str) -> None:
    """Name the thread in the pane's history after its first question."""
    try:
        with skippable():
            await client.assistant_threads_setTitle(
                channel_id=channel, thread_ts=thread_ts, title=title_of(question)
            )
    except Exception:
        logger.debug("no title for thread %s", thread_ts, exc_info=True)


def title_of(question: str) -> str:
    """The question on one line, cut at a word to at most TITLE_LENGTH characters."""
    line = re.sub(r"\s+", " ", question).strip()
    if len(line) <= TITLE_LENGTH:
        return line
    cut = line[: TITLE_LENGTH - 1].rsplit(" ", 1)[0] or line[: TITLE_LENGTH - 1]
    return cut + "…"
