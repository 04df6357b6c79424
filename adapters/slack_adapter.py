"""Slack: mentions, thread follow-ups and DMs answered in their thread, on slack-bolt;
the assistant pane, and the `/threadbot` slash command. A group DM is answered as a
channel is: when mentioned, in the mention's thread.

Owns everything Slack-specific: which events to answer, conversation keys (team, channel,
thread ts), the thread's earlier messages, user names, and how each answer is shown:
streamed natively where the workspace allows it (SLACK_STREAMING), else a placeholder
edited as the answer grows. Connects by Socket Mode (SLACK_APP_TOKEN) or serves the HTTP
Events API (SLACK_SIGNING_SECRET) on the ops server's port (HTTP_PORT), where bolt
checks every request's signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import math
import re
from collections.abc import Awaitable, Callable, Collection, Sequence
from decimal import Decimal
from functools import partial
from typing import Any, NamedTuple, TypeVar

import aiohttp
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse

from adapters.attachments import attached, with_files_named
from adapters.base import (
    Adapter,
    AdapterError,
    HttpRoutes,
    InOrder,
    Joining,
    answer,
    command,
    failure_text,
)
from adapters.slack_assistant import ThreadStatus, greet, set_title
from adapters.slack_command import (
    SLASH_COMMAND,
    EphemeralReply,
    PostedEphemeral,
    command_turn,
    thread_only,
    typed_in_dm,
    where_typed,
)
from adapters.slack_files import slack_attachments
from adapters.slack_format import (
    MARKDOWN_LIMIT,
    MESSAGE_LIMIT,
    labelled,
    to_markdown,
    to_mrkdwn,
)
from adapters.slack_stream import (
    CHANNEL_REFUSALS,
    FallbackReply,
    NativeReply,
    SlackStream,
    SlackThread,
)
from adapters.streaming import SKIPPABLE, EditBudgets, StreamingReply
from adapters.text import with_forwarded
from bot import replies
from bot.access import Requester
from bot.config import Settings
from bot.service import ChatService
from bot.types import THREAD_ONLY, ChatMessage, ConversationKey, ReplySink, Turn

logger = logging.getLogger(__name__)

PLACEHOLDER = "_thinking…_"  # italic in mrkdwn and in Markdown alike
THREAD_CONTEXT_LIMIT = 50  # earlier thread messages read when first mentioned in a thread
THREAD_PAGE = 200  # messages a conversations.replies page (Slack advises at most 200)
THREAD_PROBES = 10  # pages tried in a thread longer than one, to find its newest messages
THREAD_SPAN_S = 600  # the first of those tries reads the thread's last ten minutes,
THREAD_SPAN_GROWTH = 8  # and each try after it a span this many times longer
# All an event's lookups (its author, the people named, the thread, attached files) are
# made before its ack, which Slack wants within 3 s: together they take at most this.
BEFORE_ACK_SECONDS = 2.0
# Of those, the last this many are kept for reading attached files: a slow thread read
# or slow names would otherwise leave a file none, and it would go unread.
ATTACHMENT_SECONDS = 0.8
NAME_LOOKUPS = 10  # users.info calls made at once (Tier 4: 100+ a minute)
# A plain message, one with files, and a thread reply also sent to the channel.
ANSWERED_SUBTYPES = {None, "file_share", "thread_broadcast", "me_message"}  # me: "/me waves"
EDITS_PER_MINUTE = 50  # chat.update is Tier 3: about 50 a minute per workspace
EDIT_BURST = 10
# Slack clears a thread's status two minutes after it was set if nothing was posted: an
# answer waiting its turn for longer would show nobody at work.
STATUS_INTERVAL = 90.0
PEOPLE_CACHE_SIZE = 1000  # names remembered, each of people and channels
EVENTS_PATH = "/slack/events"
GROUP_DM = "mpim"  # the channel_type of a group DM: answered as a channel is, in threads
DM_NAME, GROUP_DM_NAME = "a direct message", "a group direct message"  # as {channel_name}
ASSISTANT_THREAD_ROOT = "assistant_app_thread"  # the subtype of an assistant thread's first message
USER_MENTION = re.compile(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>")
CHANNEL_LINK = re.compile(r"<#([A-Z0-9]+)(?:\|([^>]*))?>")  # the label may be empty
URL_LINK = re.compile(r"<((?:https?|mailto):[^|>]+)(?:\|([^>]*))?>")
SPECIAL = re.compile(r"<!(?:subteam\^)?([^|>]+)(?:\|([^>]*))?>")  # @here, a user group


class Person(NamedTuple):
    name: str
    team: str | None  # the workspace they are of (users.info's team_id), if it says
    enterprise: str | None  # their Enterprise Grid organisation's id; None outside one


class FinalsRetried(AsyncRateLimitErrorRetryHandler):
    """A rate-limited call is tried again after its Retry-After, but one made for a draft
    of an answer or a nicety (`SKIPPABLE`) fails at once: it is skipped, and the answer
    goes on."""

    async def _can_retry_async(self, **call: Any) -> bool:
        return not SKIPPABLE.get() and await super()._can_retry_async(**call)


PASSING = frozenset({"ratelimited", "internal_error", "fatal_error", "service_unavailable",
                     "request_timeout"})  # fmt: skip
"""Slack's errors that a start a little later may not meet: every other refusal stands."""


def _refusal_stands(error: SlackApiError) -> bool:
    return error.response.get("error") not in PASSING


def _sent_at(cut: tuple[float, str] | None) -> float | None:
    """When a conversation's last `reset` or `forget` was sent: its message's `ts` (Slack's
    clock, as the thread's are; its id is `team:channel:ts`), or, for a slash command,
    which has none (`team:channel:command:trigger`), when it was handled."""
    if cut is None:
        return None
    at, message = cut
    parts = message.split(":")
    return float(parts[2]) if len(parts) == 3 else at


def _web_client(settings: Settings) -> AsyncWebClient:
    token = settings.slack_bot_token.get_secret_value() if settings.slack_bot_token else None
    return AsyncWebClient(
        token=token,
        base_url=settings.slack_api_url,
        # Several 429 retries, each after Retry-After: a final text must not be lost.
        retry_handlers=[
            FinalsRetried(max_retry_count=5),
            AsyncConnectionErrorRetryHandler(max_retry_count=3),
        ],
    )


async def _signed_in(client: AsyncWebClient, settings: Settings) -> AsyncSlackResponse:
    """Who SLACK_BOT_TOKEN is (auth.test); an AdapterError where Slack refuses it, or
    cannot be reached."""
    try:
        return await client.auth_test()
    except SlackApiError as error:
        raise AdapterError(
            f"Slack refused SLACK_BOT_TOKEN ({error.response.get('error')}): set it to "
            "the app's Bot User OAuth Token (xoxb-…, under Install App)",
            setting=_refusal_stands(error),
        ) from error
    except (aiohttp.ClientError, TimeoutError) as error:
        raise AdapterError(
            f"could not reach Slack at SLACK_API_URL={settings.slack_api_url} "
            f"({error.__class__.__name__}: {error})"
        ) from error


class SlackAdapter(Adapter):
    """Answers Slack mentions and DMs through the service, in threads."""

    platform = "slack"

    def __init__(
        self,
        *,
        app: AsyncApp,
        service: ChatService,
        settings: Settings,
        routes: HttpRoutes | None = None,
    ) -> None:
        self.app = app
        self.service = service
        self.joining = Joining(service)  # threads a mention is taking the bot into
        self.in_order = InOrder()  # each conversation's messages, accepted as they came
        self.routing = InOrder()  # each thread's messages, asking whether the bot is in it
        self.settings = settings
        self.routes = routes  # where the Events API is served (HTTP mode)
        self._connected: Callable[[], Awaitable[bool]] | None = None  # set once running
        self.budgets = EditBudgets(per_minute=EDITS_PER_MINUTE, burst=EDIT_BURST)  # by team
        self.people: dict[str, Person] = {}  # by user id, oldest first
        self.channel_names: dict[str, str] = {}  # by channel id, oldest first
        # Workspaces, and (workspace, channel)s, where Slack refused native streaming.
        self.refused: set[str | tuple[str, str]] = set()
        # The workspace the app is installed in (auth.test): whose people are not strangers,
        # whatever workspace a slash command's payload names.
        self.home: str | None = None
        self._commands: set[asyncio.Task[None]] = set()  # carried out past their ack
        app.event("app_mention")(self.on_mention)
        app.event("message")(self.on_message)
        app.event("assistant_thread_started")(self.on_assistant_thread_started)
        app.event("assistant_thread_context_changed")(self.on_assistant_context_changed)
        app.command(SLASH_COMMAND)(self.on_command)

    @classmethod
    def from_settings(
        cls, settings: Settings, service: ChatService, *, routes: HttpRoutes | None = None
    ) -> SlackAdapter:
        secret = settings.slack_signing_secret
        app = AsyncApp(
            client=_web_client(settings),
            signing_secret=secret.get_secret_value() if secret else None,
            request_verification_enabled=secret is not None,
            # Acknowledge an event only once its turn is recorded: if we die before,
            # Slack delivers it again.
            process_before_response=True,
        )
        return cls(app=app, service=service, settings=settings, routes=routes)

    @staticmethod
    async def check_token(settings: Settings) -> None:
        """Ask Slack about SLACK_BOT_TOKEN before the model loads (a download and a load:
        minutes at a first start), as `run` will: an AdapterError as it would raise."""
        await _signed_in(_web_client(settings), settings)

    async def run(self) -> None:
        await self._sign_in()
        connect = self._socket_mode if self.settings.slack_app_token else self._events_api
        disconnect = await connect()
        self.service.serve_platform("slack", self._resumed)
        try:
            await asyncio.Event().wait()  # serve until cancelled
        finally:
            self._connected = None
            await disconnect()

    async def connected(self) -> bool:
        return self._connected is not None and await self._connected()

    async def _sign_in(self) -> None:
        """Check SLACK_BOT_TOKEN (auth.test) before serving: otherwise a refused token only
        shows when the first event fails to be answered."""
        identity = await _signed_in(self.app.client, self.settings)
        logger.info("Slack: signed in as %s to %s", identity.get("user"), identity.get("team"))
        self.home = identity.get("team_id")

    async def _socket_mode(self) -> Callable[[], Awaitable[None]]:
        token = self.settings.slack_app_token
        handler = AsyncSocketModeHandler(self.app, token.get_secret_value() if token else None)
        try:
            # Asked here, where a refusal raises: the SDK's own connect retries for ever.
            handler.client.wss_uri = await handler.client.issue_new_wss_url()
            await handler.connect_async()
        except SlackApiError as error:
            await handler.close_async()
            raise AdapterError(
                f"Slack refused Socket Mode ({error.response.get('error')}): check "
                "SLACK_APP_TOKEN (xapp-…, with connections:write) and SLACK_API_URL",
                setting=_refusal_stands(error),
            ) from error
        logger.info("Slack: connected by Socket Mode")
        # The SDK reconnects by itself; it knows whether its socket is open now.
        self._connected = handler.client.is_connected
        return handler.close_async

    async def _events_api(self) -> Callable[[], Awaitable[None]]:
        routes = self.routes
        if routes is None:
            raise AdapterError(
                "SLACK_SIGNING_SECRET: Slack's HTTP events are served on HTTP_PORT, which is 0; "
                "set HTTP_PORT to the port Slack's request URL reaches",
                setting=True,
            )
        routes.mount(EVENTS_PATH, self.on_http_request)
        self._connected = _serving
        logger.info("Slack: serving the Events API at %s on HTTP_PORT", EVENTS_PATH)

        async def unmount() -> None:
            routes.unmount(EVENTS_PATH)

        return unmount

    async def on_http_request(self, request: web.Request) -> web.StreamResponse:
        """One request to the Events API path; bolt checks its signature and dispatches it."""
        if request.method != "POST":
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        response = await self.app.async_dispatch(await to_bolt_request(request))
        return await to_aiohttp_response(response)

    async def on_mention(self, event: dict[str, Any], context: dict[str, Any]) -> None:
        await self._handle(event, context, mentioned=True)

    async def on_message(self, event: dict[str, Any], context: dict[str, Any]) -> None:
        await self._handle(event, context, mentioned=False)

    async def on_assistant_thread_started(
        self, event: dict[str, Any], context: dict[str, Any]
    ) -> None:
        """Someone opened a thread in the assistant pane: greet them and offer prompts, if
        the access rules let them use the bot (else they hear why, as in any DM). By the
        ack's deadline: Slack sends a late one again, and the greeting would come twice."""
        deadline = asyncio.get_running_loop().time() + BEFORE_ACK_SECONDS
        thread = event.get("assistant_thread", {})
        channel, thread_ts = thread.get("channel_id", ""), thread.get("thread_ts", "")
        team = context.get("team_id") or "-"
        who = Requester("slack", thread.get("user_id", ""), channel, workspace=team, dm=True)
        key = ConversationKey("slack", team, channel, thread_ts)

        async def tell(text: str) -> None:
            await self.app.client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=text)

        greeted = f"{team}:{channel}:{thread_ts}:greeted"  # a re-delivery greets no more
        try:
            # Claimed first: a re-delivery may come while this one is still greeting.
            if not await self.service.store.first_seen("slack", greeted):
                return
            if await self.service.admit(who, key, tell):
                await _by(deadline, greet(self.app.client, channel=channel, thread_ts=thread_ts))
        except Exception:
            logger.warning("could not greet assistant thread %s", thread, exc_info=True)

    async def on_assistant_context_changed(self, event: dict[str, Any]) -> None:
        """The pane's user moved to another channel: the answers do not depend on it."""
        logger.debug("assistant context changed: %s", event.get("assistant_thread"))

    async def on_command(
        self,
        ack: Callable[[], Awaitable[None]],
        payload: dict[str, Any],
        respond: Any,
        context: dict[str, Any],
    ) -> None:
        """`/threadbot <command>`, answered only to its sender: in a DM for the DM, in a
        channel for the channel (Slack sends no thread with it)."""
        # Slack takes the ack only once this returns (process_before_response), and says
        # the command failed past 3 s: what it looks up first keeps to a deadline, as for
        # a message, and what Redis is slow to do goes on after the ack (Slack never sends
        # a command again, so nothing is gained by holding it).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BEFORE_ACK_SECONDS
        await ack()
        work = asyncio.create_task(self._command(payload, respond, context, deadline))
        self._commands.add(work)
        work.add_done_callback(self._commands.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(work), max(deadline - loop.time(), 0))

    async def _command(
        self,
        payload: dict[str, Any],
        respond: Any,
        context: dict[str, Any],
        deadline: float,
    ) -> None:
        sink = EphemeralReply(
            respond, channel=payload.get("channel_id", ""), user=payload.get("user_id", "")
        )
        try:
            theirs, enterprise = payload.get("team_id") or "-", context.get("enterprise_id")
            # Outside Grid, the app's own workspace, as its messages' conversations have it:
            # the payload may name the user's (Slack Connect).
            ours = (self.home if enterprise is None else None) or theirs
            turn = command_turn(
                payload,
                team=ours,
                author_name=await self._name(payload["user_id"], deadline),
                channel_name=await self._channel_name(where_typed(payload), deadline),
                bot_name=await self._name(context["bot_user_id"], deadline),
            )
            stranger = await self._stranger(
                {"user": turn.author, "team": theirs}, ours, enterprise, deadline
            )
            who = Requester(
                "slack",
                turn.author,
                turn.conversation.channel,
                workspace=ours,
                dm=typed_in_dm(payload),
                stranger=stranger,
            )
            # Only the sender sees the answer, so a denial is always told (even `silent`).
            if not await self.service.admit(who, turn.conversation, sink.finish):
                if not sink.over:
                    await sink.finish(replies.denied())
                return
            if turn.command in THREAD_ONLY and not typed_in_dm(payload):
                await sink.finish(thread_only(turn.command))
                return
            await answer(self.service, turn, sink)
        except Exception as error:
            text = failure_text(error, f"Slack command {payload.get('trigger_id')}")
            with contextlib.suppress(Exception):
                await sink.fail(text)

    async def _handle(
        self, event: dict[str, Any], context: dict[str, Any], *, mentioned: bool
    ) -> None:
        """One Slack message event: decide whether to answer, and where."""
        deadline = asyncio.get_running_loop().time() + BEFORE_ACK_SECONDS
        bot_user, subtype = context["bot_user_id"], event.get("subtype")
        if (
            subtype not in ANSWERED_SUBTYPES
            or event.get("edited")  # an app_mention for an edit that added the mention
            or event.get("bot_id")
            or event.get("user") in (None, bot_user)
        ):
            return  # edits, deletions, joins, bots (ourselves included)
        channel, ts, text = event["channel"], event["ts"], event.get("text", "")
        thread_ts = event.get("thread_ts")
        is_dm = event.get("channel_type") == "im"
        if not mentioned and not is_dm and f"<@{bot_user}>" in text:
            if subtype != "file_share" and event.get("channel_type") != GROUP_DM:
                return  # the app_mention event for the same message answers it
            # Slack may send no app_mention for a mention that shares a file, or one in a
            # group DM; when it sends both, the journal keeps the pair to one answer.
            mentioned = True
        # Our workspace, not the author's: in a Slack Connect channel they differ.
        team = context.get("team_id") or event.get("team", "-")
        key = ConversationKey("slack", team, channel, thread_ts or (channel if is_dm else ts))
        thread = SlackThread(
            self.app.client,
            team=team,
            channel=channel,
            thread_ts=thread_ts or (None if is_dm else ts),
            recipient=event["user"],
            recipient_team=event.get("user_team", event.get("team")),
        )
        addressed = mentioned or is_dm
        try:
            async with contextlib.AsyncExitStack() as held:
                in_turn = held.enter_context(self.in_order.place(key))
                # A top-level DM has no thread to be in: its channel is the conversation,
                # and one DM would wait for the one before it to be taken.
                top_level_dm = is_dm and thread_ts is None
                known = not top_level_dm and await self._in_thread(key, addressed, held, deadline)
                if not (addressed or known):
                    return  # channel chatter the bot was not asked into
                addressed = True
                who = Requester(
                    "slack",
                    event["user"],
                    channel,
                    workspace=team,
                    dm=is_dm,
                    stranger=await self._stranger(
                        event, team, context.get("enterprise_id"), deadline
                    ),
                )
                if await self.service.admit(who, key, thread.post):
                    await self._converse(
                        event, key, thread, bot_user,
                        known=known, deadline=deadline, in_turn=in_turn,
                    )  # fmt: skip
        except Exception as error:  # e.g. Redis gone: log it, and tell whoever was talking to us
            text = failure_text(error, f"Slack message {ts} in {channel}")
            if addressed and self.service.told_once(f"slack:{team}:{channel}:{ts}"):
                with contextlib.suppress(Exception):
                    await thread.post(text)

    async def _in_thread(
        self,
        key: ConversationKey,
        addressed: bool,
        held: contextlib.AsyncExitStack,
        deadline: float,
    ) -> bool:
        """Whether the bot is in a thread (it answers there unasked, and has read it), once
        the mention taking it in (if any) is taken; an `addressed` message that finds the
        bot not in it takes it in, for as long as `held` holds (a mention in a channel too:
        its thread is keyed by it). A thread's messages ask one by one, as they came: one sent
        right after the mention that brings the bot in would ask before that mention is
        joining, and go unanswered."""
        with self.routing.place(key) as after_earlier_ones:
            await after_earlier_ones()
            known = await self.joining.knows(key, by=deadline)
            if addressed and not known:
                await held.enter_async_context(self.joining.joining(key))
            return known

    async def _converse(
        self,
        event: dict[str, Any],
        key: ConversationKey,
        thread: SlackThread,
        bot_user: str,
        *,
        known: bool,
        deadline: float,
        in_turn: Callable[[], Awaitable[None]],
    ) -> None:
        """Answer a message the bot was asked (or is expected) to answer; what it looks up
        first is looked up by `deadline`, the event's ack waiting on it, and it is accepted
        `in_turn`."""
        text = _text(event)
        looked_up_by = deadline - ATTACHMENT_SECONDS if event.get("files") else deadline
        words = _readable(text, bot_user, await self._names(_mentioned(text), looked_up_by))
        order = command(words)
        thread_ts = event.get("thread_ts")
        history: tuple[ChatMessage, ...] = ()
        if not (known or order or not thread_ts):
            since = _sent_at(await self.service.store.cut(str(key)))
            history = await self._thread_context(event, bot_user, looked_up_by, since=since)
        message_id = f"{key.workspace}:{key.channel}:{event['ts']}"
        turn = Turn(
            key,
            event["user"],
            words,
            message_id,
            context=history,
            command=order,
            author_name=await self._name(event["user"], looked_up_by),
            channel_name=await self._channel_name(event, looked_up_by),
            bot_name=await self._name(bot_user, looked_up_by),
        )
        if order is None:
            files = slack_attachments(event.get("files", ()), self.app.client)
            left = deadline - asyncio.get_running_loop().time()
            turn = await attached(self.service, turn, files, timeout=left)
        status = None
        if event.get("channel_type") == "im" and thread_ts:  # a DM thread: the pane's
            # Shown before the turn is taken: the answer's first post clears it.
            status = ThreadStatus(self.app.client, channel=key.channel, thread_ts=thread_ts)
            niceties = [status.show()]
            if words and not (known or order):  # a new thread: named after its question
                pane = {"channel": key.channel, "thread_ts": thread_ts}
                niceties.append(set_title(self.app.client, **pane, question=words))
            await _by(deadline, *niceties)
        # Slack's own stop of a native stream ends the answer, as a Stop button does.
        stop = partial(self.service.stop_answer, turn.id, by=turn.author)
        await in_turn()  # within the ack's time: those ahead are accepted within theirs
        taken = await answer(self.service, turn, self._sink(thread, stop))
        # Not taken (a re-delivery, say): no post of its own clears the status; but while
        # the first delivery's answer is on its way, the status is that answer's.
        if status is not None and not taken and not await self.service.being_answered(turn):
            await status.clear()

    def _sink(self, thread: SlackThread, stop: Callable[..., object] | None = None) -> ReplySink:
        """A new answer's sink: native where it may stream (SLACK_STREAMING), falling back
        to edits if Slack refuses (auto); else the edit path. `stop` ends the answer's
        generation, once a reader stopped its stream."""
        if not self._streams(thread):
            return self._edited(thread)
        native = self._native(thread, stop=stop)
        if self.settings.slack_streaming == "native":
            return native
        return FallbackReply(
            native=native,
            edited=partial(self._edited, thread),
            refused=partial(self._refuse, thread),
        )

    def _streams(self, thread: SlackThread) -> bool:
        """Whether a new answer streams natively: Slack streams replies in threads, to a
        recipient; with `auto`, only where Slack has not refused it."""
        mode = self.settings.slack_streaming
        if mode == "edit" or thread.thread_ts is None or thread.recipient is None:
            return False
        return mode == "native" or not self.refused & {thread.team, (thread.team, thread.channel)}

    def _refuse(self, thread: SlackThread, error: str) -> None:
        """Answer by edits from now on where Slack refused to stream: in the workspace, or
        where the refusal names the kind of channel, in that channel."""
        in_channel = error in CHANNEL_REFUSALS
        place = (thread.team, thread.channel) if in_channel else thread.team
        if place not in self.refused:
            self.refused.add(place)
            logger.warning(
                "Slack refused native streaming in %s %s (%s); answering there by editing "
                "messages from now on",
                "channel" if in_channel else "workspace",
                thread.channel if in_channel else thread.team,
                error,
            )

    def _edited(self, thread: SlackThread, message_ids: Sequence[str] = ()) -> StreamingReply:
        return StreamingReply(
            target=thread,
            render=to_mrkdwn,
            limit=MESSAGE_LIMIT,
            interval=self.settings.stream_edit_interval,
            budget=self.budgets.of(thread.team),
            placeholder=PLACEHOLDER,
            message_ids=message_ids,
        )

    def _native(
        self,
        thread: SlackThread,
        message_ids: Sequence[str] = (),
        stop: Callable[..., object] | None = None,
    ) -> NativeReply:
        """Streams natively; a message that is not an open stream (a resumed answer's, one
        whose stream Slack ended) is edited instead, through the workspace's chat.update
        budget."""
        return NativeReply(
            target=SlackStream(thread, earlier=message_ids),
            on_stop=stop,
            render=to_markdown,
            limit=MARKDOWN_LIMIT,
            interval=self.settings.stream_edit_interval,
            budget=self.budgets.of(thread.team),
            placeholder=PLACEHOLDER if message_ids else None,
            message_ids=message_ids,
            mark="",  # Slack shows a stream as being written
            typing_interval=STATUS_INTERVAL,
            # until the first text, which comes within the request timeout
            typing_repeats=math.ceil(self.settings.request_timeout / STATUS_INTERVAL),
        )

    def _resumed(self, target: dict[str, Any], stop: Callable[..., object]) -> ReplySink:
        """The sink of an answer started earlier (maybe by another process): its messages
        keep the kind they were posted as; with none yet, it is answered as a new one."""
        if target.get("ephemeral"):  # a slash command's
            return PostedEphemeral(self.app.client, channel=target["channel"], user=target["user"])
        thread = SlackThread(
            self.app.client,
            team=target["team"],
            channel=target["channel"],
            thread_ts=target.get("thread_ts"),
            recipient=target.get("recipient"),
            recipient_team=target.get("recipient_team"),
        )
        messages = target.get("messages", ())
        if not messages:
            return self._sink(thread, stop)
        return (
            self._native(thread, messages, stop=stop)
            if target.get("native")
            else self._edited(thread, messages)
        )

    async def _thread_context(
        self, event: dict[str, Any], bot_user: str, deadline: float, *, since: float | None
    ) -> tuple[ChatMessage, ...]:
        """The thread's newest THREAD_CONTEXT_LIMIT messages before this one, oldest first,
        as chat messages (the bot's as assistant), read and named by `deadline`; only those
        after `since` (when the conversation was last reset or forgotten), if given."""
        earlier = await self._earlier_messages(event, deadline)
        if since is not None:
            earlier = [message for message in earlier if float(message["ts"]) > since]
        texts = [_text(message) for message in earlier]
        people = {m["user"] for m in earlier if "user" in m}
        names = await self._names(people.union(*map(_mentioned, texts)), deadline)
        context: list[ChatMessage] = []
        for message, said in zip(earlier, texts, strict=True):
            files = slack_attachments(message.get("files", ()), self.app.client)
            text = with_files_named(_readable(said, bot_user, names), files)
            if message.get("user") == bot_user:
                context.append({"role": "assistant", "content": text})
            else:  # a person, or another bot (an alert, a CI report): not our own words
                name = _author(message, names)
                context.append({"role": "user", "content": text, "name": name})
        return tuple(context)

    async def _earlier_messages(
        self, event: dict[str, Any], deadline: float
    ) -> list[dict[str, Any]]:
        """The thread's newest THREAD_CONTEXT_LIMIT messages said before this one.

        Slack pages a thread from its start, never from its end. So the first page up to
        this message is read (`latest`: nothing after it comes back), and where the thread
        goes on past that page, its end is found from `oldest`: a window ending at this
        message, THREAD_SPAN_S long and THREAD_SPAN_GROWTH times longer each try until
        Slack says it goes on past a page, then halved between the two last tries. Each
        try is one call. The newest window read whole is kept (it ends at this message);
        if none was by `deadline` (or a call failed, or the tries ran out), only the
        thread's first message, which says what the thread is about: its first page's end
        is not "just before".
        """
        read = partial(
            self.app.client.conversations_replies,
            channel=event["channel"],
            ts=event["thread_ts"],
            latest=event["ts"],
            inclusive=True,
            limit=THREAD_PAGE,
        )
        late = Decimal(event["ts"])
        opening: list[dict[str, Any]] = []
        found: list[dict[str, Any]] | None = None  # a window up to this message, read whole
        try:
            async with asyncio.timeout_at(deadline):
                page = await read()
                opening = _said_between(page, Decimal("-Infinity"), late)
                if not _goes_on(page):
                    return opening[-THREAD_CONTEXT_LIMIT:]
                early = Decimal(page["messages"][-1]["ts"])  # the first page's end
                too_wide, too_narrow = None, late  # `oldest`s that read too many, too few
                span = Decimal(THREAD_SPAN_S)
                for _ in range(THREAD_PROBES):
                    if too_wide is None:
                        oldest, span = max(late - span, early), span * THREAD_SPAN_GROWTH
                    else:
                        oldest = ((too_wide + too_narrow) / 2).quantize(Decimal("0.000001"))
                    page = await read(oldest=str(oldest))
                    if _goes_on(page):
                        too_wide = oldest
                        continue
                    found = _said_between(page, oldest, late)
                    if oldest == early:  # it meets the first page: the whole thread is read
                        found = opening + found
                        break
                    if len(found) >= THREAD_CONTEXT_LIMIT:
                        break
                    too_narrow = oldest
                else:
                    logger.info(
                        "thread %s: the messages just before %s not all found in %d tries",
                        event["thread_ts"],
                        event["ts"],
                        THREAD_PROBES,
                    )
        except Exception:  # answering with what was read (perhaps nothing) beats not answering
            logger.warning("could not read all of the thread's earlier messages", exc_info=True)
        if found is None:
            return opening[:1]
        return found[-THREAD_CONTEXT_LIMIT:]

    async def _names(self, users: Collection[str], deadline: float) -> dict[str, str]:
        """The users' names by id, looked up together (NAME_LOOKUPS at a time) and kept;
        one not found (users.info failed, or had not answered by `deadline`) is its id."""
        lookups = asyncio.Semaphore(NAME_LOOKUPS)

        async def look_up(user: str) -> None:
            async with lookups:
                await self._person(user, deadline)

        await asyncio.gather(*map(look_up, users))
        return {user: person.name if (person := self.people.get(user)) else user for user in users}

    async def _name(self, user: str, deadline: float | None = None) -> str:
        person = await self._person(user, deadline)
        return person.name if person else user

    async def _channel_name(self, event: dict[str, Any], deadline: float | None = None) -> str:
        """How the channel is named (#general); its id if conversations.info has not
        answered by `deadline` (asked again next time)."""
        channel = event["channel"]
        if event.get("channel_type") == "im":
            return DM_NAME
        if event.get("channel_type") == GROUP_DM:  # an app_mention from it will carry none
            return _remember(self.channel_names, channel, GROUP_DM_NAME)
        if (name := self.channel_names.get(channel)) is not None:
            return name
        try:
            async with asyncio.timeout_at(deadline):
                info = (await self.app.client.conversations_info(channel=channel))["channel"]
        except TimeoutError:
            logger.info("conversations.info: no name in time for %s", channel)
            return channel
        except Exception as error:  # e.g. an app installed before it asked for channels:read
            if _needs_mpim_read(error):  # a group DM, in an install from before mpim:read
                return _remember(self.channel_names, channel, GROUP_DM_NAME)
            passing = not isinstance(error, SlackApiError) or not _refusal_stands(error)
            if passing or _not_in_it_yet(error):  # a private channel the bot is not in, say
                logger.info("conversations.info failed for %s, for now: %s", channel, error)
                return channel  # asked again next time
            logger.warning("conversations.info failed for %s", channel, exc_info=True)
            return _remember(self.channel_names, channel, channel)  # not asked at every message
        name = GROUP_DM_NAME if info.get("is_mpim") else f"#{info['name']}"
        return _remember(self.channel_names, channel, name)

    async def _stranger(
        self,
        event: dict[str, Any],
        team: str,
        enterprise: str | None,
        deadline: float | None = None,
    ) -> bool:
        """Whether the author belongs to another organisation (Slack Connect).

        Outside Enterprise Grid our organisation is our workspace: a stranger is of another
        team, which the event names, or else users.info. In Grid (`enterprise`: the
        installation's) it is the enterprise, whichever of its workspaces a user is in: the
        event may name the enterprise, else users.info says which one the user is of. One
        users.info cannot tell (it failed, or had not answered by `deadline`) is judged by
        the team the event names.
        """
        home = event.get("user_team", event.get("team", team))
        if enterprise is None:
            if home != team:
                return True
            person = await self._person(event["user"], deadline)
            return person is not None and person.team not in (None, team)
        if home == enterprise:
            return False
        person = await self._person(event["user"], deadline)
        return person.enterprise != enterprise if person else home != team

    async def _person(self, user: str, deadline: float | None = None) -> Person | None:
        """The user's name and whether they are a stranger; None if users.info fails or
        has not answered by `deadline` (asked again next time)."""
        if (person := self.people.get(user)) is not None:
            return person
        try:
            async with asyncio.timeout_at(deadline):
                profile = (await self.app.client.users_info(user=user))["user"]
        except Exception:
            logger.debug("users.info failed for %s", user, exc_info=True)
            return None
        name = (
            profile.get("profile", {}).get("display_name")
            or profile.get("real_name")
            or profile.get("name")
            or user
        )
        enterprise = profile.get("enterprise_user", {}).get("enterprise_id")
        person = Person(name, profile.get("team_id"), enterprise)
        return _remember(self.people, user, person)


Cached = TypeVar("Cached")


def _not_in_it_yet(error: SlackApiError) -> bool:
    """Refused because the bot is not in the channel: it may be invited later."""
    return error.response.get("error") in ("channel_not_found", "not_in_channel")


def _needs_mpim_read(error: Exception) -> bool:
    """Whether Slack refused to describe a channel for want of mpim:read: a group DM."""
    if not isinstance(error, SlackApiError):
        return False
    return error.response.get("error") == "missing_scope" and "mpim:read" in str(
        error.response.get("needed", "")
    )


def _remember(cache: dict[str, Cached], key: str, value: Cached) -> Cached:
    """`value`, kept in `cache` under `key`; the oldest entry forgotten to make room."""
    if key not in cache and len(cache) >= PEOPLE_CACHE_SIZE:
        del cache[next(iter(cache))]
    cache[key] = value
    return value


def _mentioned(text: str) -> set[str]:
    """The ids of the users a message mentions."""
    return set(USER_MENTION.findall(text))


def _readable(text: str, bot_user: str, names: dict[str, str]) -> str:
    """Slack markup to plain text: our mention removed, others as @names (`names`: by id, of
    everyone mentioned), channels as #names (their ids where Slack sent no name), links
    unwrapped, `<!here>` and user groups as @here and @group."""
    # The spaces on both sides as one; any others, code's indents, kept.
    text = re.sub(rf"[ \t]*<@{bot_user}>[ \t]*", " ", text)
    for user in _mentioned(text):
        name = names.get(user, user)
        # A function, not a template: a name may hold a backslash (`CORP\jdoe`).
        text = re.sub(rf"<@{user}(?:\|[^>]*)?>", lambda _, name=name: f"@{name}", text)
    text = CHANNEL_LINK.sub(lambda m: f"#{m[2] or m[1]}", text)
    text = URL_LINK.sub(_link_text, text)
    text = SPECIAL.sub(lambda m: m[2] or f"@{m[1]}", text)
    return html.unescape(text).strip()


def _link_text(link: re.Match[str]) -> str:
    """A link as its label and its address, so the model sees where it goes."""
    url, label = link[1], link[2]
    return labelled(label or url, url, link=url)


def _author(message: dict[str, Any], names: dict[str, str]) -> str:
    """Who wrote a thread's message: a person's name (`names`: by id), or another bot's."""
    if user := message.get("user"):
        return names.get(user, user)
    return message.get("username") or message.get("bot_profile", {}).get("name") or "a bot"


def _goes_on(page: dict[str, Any]) -> bool:
    """Whether a conversations.replies page has more of its range after it."""
    return bool(page.get("has_more") or page.get("response_metadata", {}).get("next_cursor"))


def _said_between(page: dict[str, Any], after: Decimal, before: Decimal) -> list[dict[str, Any]]:
    """A page's messages said strictly between two ts (Slack's `inclusive` takes both ends)."""
    return [m for m in page.get("messages", []) if after < Decimal(m["ts"]) < before and _said(m)]


def _said(message: dict[str, Any]) -> bool:
    """Whether a thread message is something someone said or shared (not the title Slack
    gives an assistant thread's first message)."""
    shared = _text(message) or message.get("files")
    return bool(shared) and message.get("subtype") != ASSISTANT_THREAD_ROOT


def _text(message: dict[str, Any]) -> str:
    """A message's text, then that of each message it forwards: Slack keeps a forwarded
    message in the new one's `attachments` (marked `is_share`, or `is_msg_unfurl` for a
    message a link points to), its own text empty or the forwarder's comment."""
    shared = message.get("attachments") or ()
    forwarded = (a.get("text", "") for a in shared if a.get("is_share") or a.get("is_msg_unfurl"))
    return with_forwarded(message.get("text", ""), forwarded)


async def _by(deadline: float, *calls: Awaitable[object]) -> None:
    """Run `calls` together, given up at `deadline`: niceties not worth a late ack."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            await asyncio.gather(*calls)


async def _serving() -> bool:
    return True  # HTTP mode: connected for as long as the Events API is served
