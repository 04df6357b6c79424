"""Where a Slack answer goes, and how it streams there: by editing messages (SlackThread),
or natively with Slack's AI streaming methods (SlackStream: chat.startStream,
chat.appendStream, chat.stopStream), which Slack rate-limits far more loosely than
chat.update. Both sit under one StreamingReply, which throttles and splits.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack_assistant import ThreadStatus
from adapters.slack_format import settled
from adapters.streaming import Gone, Refused, StreamingReply
from bot.types import NowhereToAnswer

logger = logging.getLogger(__name__)

# What Slack answers where a workspace or app may not stream (no AI features, an old token).
REFUSALS = frozenset(
    {
        "method_not_allowed_for_app",
        "not_allowed_token_type",
        "unknown_method",
        "missing_scope",
        "feature_not_enabled",
    }
)
CHANNEL_REFUSALS = frozenset({"channel_type_not_supported"})
"""What Slack answers where a kind of channel takes no stream (a Slack List item's comment
thread): the workspace's other channels may."""
STREAM_OVER = "message_not_in_streaming_state"  # Slack ends a stream minutes after it began
STOPPED_BY_USER = "stopped_by_user"  # a reader pressed stop: nothing more goes into it
ENDED = frozenset({STREAM_OVER, STOPPED_BY_USER})
PLACE_GONE = frozenset({"channel_not_found", "is_archived", "not_in_channel"})
POSTING_REFUSED = frozenset(
    {  # the workspace's rules: a read-only or announcement channel, threads turned off
        "restricted_action",
        "restricted_action_read_only_channel",
        "restricted_action_thread_only_channel",
        "restricted_action_non_threadable_channel",
        "posting_to_general_channel_denied",
        "ekm_access_denied",
    }
)


def _error(error: SlackApiError) -> str:
    return str(error.response.get("error", ""))


def _raise_if_nowhere(error: SlackApiError) -> None:
    """NowhereToAnswer where the answer's channel was deleted or archived, the bot taken
    out of it, or its posts refused there: nothing can be shown, now or on another try."""
    if _error(error) in PLACE_GONE:
        raise NowhereToAnswer(f"its channel is no more: Slack said {_error(error)}") from error
    if _error(error) in POSTING_REFUSED:
        raise NowhereToAnswer(f"Slack refuses its posts there: {_error(error)}") from error


async def _gone_if_deleted(update: Awaitable[object], message_id: str) -> None:
    """A chat.update, raising `Gone` where its message was deleted."""
    try:
        await update
    except SlackApiError as error:
        if _error(error) == "message_not_found":
            raise Gone(message_id) from error
        _raise_if_nowhere(error)
        raise


class SlackThread:
    """Posts and edits the messages of one answer in one Slack thread (or DM).

    `recipient` is the person the answer is for, of `recipient_team` (their own
    organisation's, in a Slack Connect channel): native streams name them. Nothing posted
    is unfurled: Slack would otherwise fetch a URL that model output or injected thread
    text put there, with conversation text in it.
    """

    def __init__(
        self,
        client: AsyncWebClient,
        *,
        team: str,
        channel: str,
        thread_ts: str | None,
        recipient: str | None = None,
        recipient_team: str | None = None,
    ) -> None:
        self.client = client
        self.team = team
        self.channel = channel
        self.thread_ts = thread_ts
        self.recipient = recipient
        self.recipient_team = recipient_team or team

    def where(self) -> dict[str, Any]:
        return {
            "team": self.team,
            "channel": self.channel,
            "thread_ts": self.thread_ts,
            "recipient": self.recipient,
            "recipient_team": self.recipient_team,
        }

    async def typing(self) -> None:
        """Slack has no typing indicator for bots: the adapter posts a placeholder instead."""

    async def post(self, text: str) -> str:
        try:
            response = await self.client.chat_postMessage(
                channel=self.channel,
                thread_ts=self.thread_ts,
                text=text,
                unfurl_links=False,
                unfurl_media=False,
            )
        except SlackApiError as error:
            _raise_if_nowhere(error)
            raise
        return response["ts"]

    async def edit(self, message_id: str, text: str) -> None:
        await _gone_if_deleted(
            # `parse` is "none" as chat.postMessage's is: chat.update's defaults to "client"
            self.client.chat_update(channel=self.channel, ts=message_id, text=text, parse="none"),
            message_id,
        )

    async def delete(self, message_id: str) -> None:
        try:
            await self.client.chat_delete(channel=self.channel, ts=message_id)
        except SlackApiError as error:
            if _error(error) != "message_not_found":  # deleted already: what was asked
                raise


class SlackStream:
    """The messages of one answer as native Slack streams, in a thread.

    StreamingReply hands it each message's whole (Markdown) text so far. A stream only
    grows, so it streams what a text adds to the last, and of that only what can no longer
    change (a link still being written waits). `close` ends every stream with its whole
    text, replacing it (chat.update) where the stream could not get there: a text that
    changed rather than grew, or a stream Slack already ended. A message it did not open
    (an earlier process's, on resume) is edited with chat.update. Slack tells of a reader's
    stop only by refusing the next call into that stream: `on_stop` then hears of it. A
    message that holds all it can is ended at once (`end`), so a stop is never missed.
    """

    def __init__(
        self,
        thread: SlackThread,
        *,
        earlier: Sequence[str] = (),
        on_stop: Callable[[], object] | None = None,
    ) -> None:
        if thread.thread_ts is None:
            raise ValueError("Slack streams only into threads")
        self.thread = thread
        self.client = thread.client
        self.status = ThreadStatus(
            thread.client, channel=thread.channel, thread_ts=thread.thread_ts
        )
        self.streamed: dict[str, str] = {}  # open streams: ts -> the text streamed into it
        self.wanted: dict[str, str] = {}  # open streams: ts -> the text it is to end with
        self.earlier = set(earlier)  # posted by an earlier process: perhaps still streaming
        self.stopped: set[str] = set()  # stopped by a reader: left as they are
        self.whole: dict[str, str] = {}  # streams ended, messages replaced: ts -> their text
        self.on_stop = on_stop  # e.g. to end the answer's generation where it is

    def where(self) -> dict[str, Any]:
        return {**self.thread.where(), "native": True}

    async def typing(self) -> None:
        """Until the first words stream in, the thread's status says the bot is at work."""
        await self.status.show()

    async def post(self, text: str) -> str:
        shown = text[: settled(text)]
        try:
            response = await self.client.chat_startStream(
                channel=self.thread.channel,
                thread_ts=self.thread.thread_ts,
                recipient_team_id=self.thread.recipient_team,
                recipient_user_id=self.thread.recipient,
                markdown_text=shown or None,
            )
        except SlackApiError as error:
            if _error(error) in REFUSALS | CHANNEL_REFUSALS:
                raise Refused(_error(error)) from error
            _raise_if_nowhere(error)
            raise
        message_id = response["ts"]
        self.streamed[message_id], self.wanted[message_id] = shown, text
        return message_id

    async def edit(self, message_id: str, text: str) -> None:
        if message_id in self.stopped or self.whole.get(message_id) == text:
            return
        if message_id not in self.streamed:
            await self._replace(message_id, text)
            return
        self.wanted[message_id] = text
        streamed = self.streamed[message_id]
        if not text.startswith(streamed):  # the answer started again (another try)
            # What was streamed cannot be taken back: the stream ends, its message is
            # replaced, and edited from now on, where it showed the old try to the end.
            await self._stop(message_id)
            return
        more = text[len(streamed) : settled(text)]
        if not more:
            return
        try:
            await self.client.chat_appendStream(
                channel=self.thread.channel, ts=message_id, markdown_text=more
            )
        except SlackApiError as error:
            if _error(error) not in ENDED:
                self._forget_if_deleted(message_id, error)
                raise
            del self.streamed[message_id], self.wanted[message_id]
            await self._ended(message_id, error, text)
            return
        self.streamed[message_id] = streamed + more

    async def delete(self, message_id: str) -> None:
        if message_id in self.streamed:  # Slack deletes no message while it streams
            with contextlib.suppress(SlackApiError):  # ended meanwhile: deleted all the same
                await self.client.chat_stopStream(channel=self.thread.channel, ts=message_id)
        await self.thread.delete(message_id)
        for kept in (self.streamed, self.wanted, self.whole):
            kept.pop(message_id, None)
        self.earlier.discard(message_id)
        self.stopped.discard(message_id)

    async def end(self, message_id: str) -> None:
        """End a message's stream now, with its whole text: Slack refuses if a reader
        stopped it."""
        if message_id in self.streamed:
            await self._stop(message_id)

    async def close(self) -> None:
        """End every open stream with its whole text, each tried whatever the others did
        (after: `Gone`, naming every message deleted meanwhile, else the first failure);
        no status is left showing after."""
        failures: list[SlackApiError | Gone] = []
        try:
            for message_id in list(self.streamed):
                try:
                    await self._stop(message_id)
                except (SlackApiError, Gone) as error:
                    failures.append(error)
        finally:
            await self.status.clear()
        if gone := [failure.args[0] for failure in failures if isinstance(failure, Gone)]:
            raise Gone(*gone)
        if failures:
            raise failures[0]

    async def _stop(self, message_id: str) -> None:
        """End a stream with its whole text; one that fails (e.g. ratelimited) stays open,
        for `close` to try again."""
        streamed, text = self.streamed[message_id], self.wanted[message_id]
        rest = text[len(streamed) :] if text.startswith(streamed) else None
        try:
            await self.client.chat_stopStream(
                channel=self.thread.channel, ts=message_id, markdown_text=rest or None
            )
        except SlackApiError as error:
            if _error(error) not in ENDED:
                self._forget_if_deleted(message_id, error)
                raise
            del self.streamed[message_id], self.wanted[message_id]
            await self._ended(message_id, error, text)
            return
        del self.streamed[message_id], self.wanted[message_id]
        if rest is None:
            await self._replace(message_id, text)
        self.whole[message_id] = text

    def _forget_if_deleted(self, message_id: str, error: SlackApiError) -> None:
        """`Gone` where a call into a stream failed as its message was deleted: the stream
        is forgotten, and its text goes into a new message. NowhereToAnswer where its
        channel went."""
        if _error(error) == "message_not_found":
            del self.streamed[message_id], self.wanted[message_id]
            raise Gone(message_id) from error
        _raise_if_nowhere(error)

    async def _ended(self, message_id: str, error: SlackApiError, text: str) -> None:
        """Slack ended this stream early: a reader stopped it (it stays as they left it),
        or its time ran out (an ordinary message now, edited to `text`)."""
        logger.info("Slack ended stream %s early (%s)", message_id, _error(error))
        if _error(error) == STOPPED_BY_USER:
            self.stopped.add(message_id)
            if self.on_stop is not None:
                self.on_stop()
        else:
            await self._replace(message_id, text)

    async def _replace(self, message_id: str, text: str) -> None:
        if message_id in self.earlier:  # its process may have died with the stream open
            self.earlier.discard(message_id)
            with contextlib.suppress(SlackApiError):
                await self.client.chat_stopStream(channel=self.thread.channel, ts=message_id)
        await _gone_if_deleted(
            self.client.chat_update(channel=self.thread.channel, ts=message_id, markdown_text=text),
            message_id,
        )
        self.whole[message_id] = text


class NativeReply(StreamingReply):
    """A StreamingReply into a SlackStream: whatever ends or pauses the answer also ends
    its streams (their whole text, and the thread's status cleared). Once a reader stopped
    a stream, nothing more of the answer is posted, and `on_stop` hears what the reader
    saw of it (`shown`: None where this reply showed none)."""

    target: SlackStream

    def __init__(self, *, on_stop: Callable[..., object] | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.shown_text: str | None = None  # the answer's text as last streamed whole
        if on_stop is not None:
            self.target.on_stop = lambda: on_stop(shown=self.shown_text)

    def stopped(self) -> bool:
        return bool(self.target.stopped)

    async def start(self) -> None:
        self.shown_text = None
        await super().start()

    async def restart(self) -> None:
        self.shown_text = None
        await super().restart()

    async def _show(self, markdown: str) -> None:
        await super()._show(markdown)
        if not self.stopped():  # a stop refused some of it: the reader saw the text before
            self.shown_text = markdown[: settled(markdown)]  # as the stream holds it back

    def _edit_costs(self, index: int) -> bool:
        """Text into an open stream is appended, and none goes into one a reader stopped; a
        message whose stream has ended (Slack ends one minutes after it began), or an
        earlier process's, is edited."""
        if not super()._edit_costs(index):
            return False
        message_id = self.message_ids[index]
        return message_id not in self.target.streamed and message_id not in self.target.stopped

    async def _filled(self, index: int) -> None:
        """A full message takes no more: its stream is ended now, as Slack tells of a
        reader's stop only by refusing a call into it, before the next is begun."""
        await self.target.end(self.message_ids[index])

    async def finish(self, text: str) -> None:
        await self._closing(super().finish(text))

    async def fail(self, text: str) -> None:
        await self._closing(super().fail(text))

    async def pause(self, text: str) -> None:
        await self._closing(super().pause(text))

    async def _closing(self, ending: Awaitable[None]) -> None:
        try:
            await ending
        finally:
            try:
                await self.target.close()
            except Gone as gone:  # deleted at their end: their text in new streams, ended too
                for message_id in gone.args:
                    index = self.message_ids.index(message_id)
                    await self._post_again(index, self.shown[index])
                await self.target.close()


class FallbackReply:
    """SLACK_STREAMING=auto: a native answer, until Slack refuses to stream in the
    workspace. Slack refuses the first post, so nothing is shown yet: the answer goes on
    by the edit path from where it was, and `refused` hears the error (the adapter then
    sends the workspace's later answers by the edit path from the start)."""

    def __init__(
        self,
        *,
        native: NativeReply,
        edited: Callable[[], StreamingReply],
        refused: Callable[[str], None],
    ) -> None:
        self.sink: StreamingReply = native
        self.edited = edited
        self.refused = refused
        self.noticed: str | None = None

    @property
    def on_post(self) -> Callable[[], Awaitable[None]] | None:
        return self.sink.on_post

    @on_post.setter
    def on_post(self, callback: Callable[[], Awaitable[None]] | None) -> None:
        self.sink.on_post = callback

    def reply_target(self) -> dict[str, Any]:
        return self.sink.reply_target()

    async def start(self) -> None:
        await self.sink.start()

    async def notice(self, text: str) -> None:
        self.noticed = text
        await self.sink.notice(text)

    async def append(self, chunk: str) -> None:
        try:
            await self.sink.append(chunk)
        except Refused as refusal:
            await self._fall_back(refusal, ending=False)  # the chunk is in the text taken over

    async def restart(self) -> None:
        await self.sink.restart()

    async def finish(self, text: str) -> None:
        await self._ending(lambda sink: sink.finish(text))

    async def fail(self, text: str) -> None:
        await self._ending(lambda sink: sink.fail(text))

    async def pause(self, text: str) -> None:
        await self._ending(lambda sink: sink.pause(text))

    async def _ending(self, end: Callable[[StreamingReply], Awaitable[None]]) -> None:
        try:
            await end(self.sink)
        except Refused as refusal:
            await self._fall_back(refusal, ending=True)
            await end(self.sink)

    async def _fall_back(self, refusal: Refused, *, ending: bool) -> None:
        native = self.sink
        if native.message_ids:  # a stream began after all: it is no workspace refusal
            raise refusal
        self.refused(str(refusal))
        self.sink = self.edited()
        self.sink.on_post = native.on_post
        if self.noticed is not None:
            await self.sink.notice(self.noticed)
        if not ending:  # an ending posts its own text; else show what was written so far
            await self.sink.start()
            await self.sink.append(native.text)
