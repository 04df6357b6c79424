"""A fake Slack for tests: Web API (AI streaming and assistant threads too), Socket Mode,
slash commands with their response_url, and an Events API sender, all on 127.0.0.1.

The real slack_sdk / slack_bolt talk to it over HTTP and websockets, inside the test's loop::

    async with FakeSlack() as slack:
        client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
        handler = AsyncSocketModeHandler(AsyncApp(client=client), slack.app_token)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Self, TypeVar

import aiohttp
from aiohttp import web
from fake_server import serve, wait_for

T = TypeVar("T")
JSON = dict[str, Any]
Handler = Callable[[JSON], Awaitable[JSON]]

DEFAULT_USERS = {"U0ALICE": "alice", "U0BOB": "bob", "U0BOT": "threadbot"}
SCOPES = (
    "app_mentions:read", "assistant:write", "channels:history", "channels:read", "chat:write",
    "commands", "files:read", "groups:history", "groups:read", "im:history", "mpim:history",
    "mpim:read", "users:read",
)  # fmt: skip
# What conversations.info needs, by the channel id's first letter, as Slack's scope docs say.
INFO_SCOPES = {"C": "channels:read", "G": "groups:read", "D": "im:read"}
SIGN_IN_PAGE = "<!DOCTYPE html><html><head><title>Slack</title></head><body>Sign in</body></html>"
PAYLOAD_KEYS = ("blocks", "attachments", "metadata", "chunks", "prompts")
MARKDOWN_LIMIT = 12000  # what one markdown_text may hold
STREAMING_METHODS = ("chat.startStream", "chat.appendStream", "chat.stopStream")


@dataclass
class ApiCall:
    """One Web API request as the fake saw it (params: query, form and JSON merged).

    status is the HTTP status answered; at is time.monotonic() on arrival.
    """

    method: str
    params: JSON
    token: str | None
    status: int = 200
    response: JSON = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.response.get("ok"))


class FakeSlack:
    """Fake Slack server: records every call and keeps a message log per channel."""

    team_domain = "fake-team"
    bot_user_id = "U0BOT"
    bot_id = "B0BOT"
    app_id = "A0001"
    bot_token = "xoxb-test"
    app_token = "xapp-test"
    signing_secret = "fake-signing-secret"

    def __init__(self, users: dict[str, str] | None = None) -> None:
        # A workspace of its own, so tests sharing one Redis never share a conversation
        # (a DM's is its channel, whose id tests choose).
        self.team_id = f"T{uuid.uuid4().hex[:8].upper()}"
        self.users = dict(DEFAULT_USERS if users is None else users)
        # Slack Connect: users of other organisations, by user id -> their team id. They
        # share a channel with the bot, so users.info names their team and does not call
        # them `is_stranger` (that is for those sharing none, whom the bot never hears).
        self.external_users: dict[str, str] = {}
        # Enterprise Grid: team id -> its organisation's (enterprise) id; ours too, for an
        # app installed in a Grid workspace. A team not here is an organisation of its own.
        self.enterprises: dict[str, str] = {}
        self.channel_names: dict[str, str] = {}  # by channel id; unnamed: the id, lowered
        self.group_dms: set[str] = set()  # channel ids of group DMs (mpim): told by their events
        self.calls: list[ApiCall] = []
        self.channels: dict[str, list[JSON]] = {}  # channel -> messages, oldest first
        self.envelopes: list[JSON] = []  # Socket Mode envelopes sent
        self.acks: dict[str, JSON] = {}  # envelope_id -> the client's ack
        self.connections = 0  # websocket connections accepted so far
        self.files: dict[str, tuple[bytes, str]] = {}  # id -> content and type, at its URLs
        self.downloads: list[str] = []  # file ids served to a client with the bot token
        self.streaming: set[tuple[str, str]] = set()  # (channel, ts) of open streams
        self.stopped_by_user: set[tuple[str, str]] = set()  # streams a reader stopped
        self.statuses: dict[tuple[str, str], str] = {}  # (channel, thread_ts) -> status shown
        self.titles: dict[tuple[str, str], str] = {}  # (channel, thread_ts) -> assistant title
        self.prompts: dict[tuple[str, str], list[JSON]] = {}  # suggested prompts, likewise
        self.responses: dict[str, list[JSON]] = {}  # slash command trigger id -> responses
        self.ephemerals: list[JSON] = []  # chat.postEphemeral's: channel, user and text
        self.streaming_refusal: str | None = None  # the error every streaming call gets
        self.unstreamable: set[str] = set()  # channels of a kind that takes no stream
        # method ("files": a file's download) -> seconds each call waits for its answer
        self.delays: dict[str, float] = {}
        self.scopes = list(SCOPES)  # granted to the bot token: every answer's X-OAuth-Scopes
        self.handlers: dict[str, Handler] = {
            "auth.test": self._auth_test,
            "apps.connections.open": self._connections_open,
            "chat.postMessage": self._post_message,
            "chat.postEphemeral": self._post_ephemeral,
            "chat.update": self._update,
            "chat.delete": self._delete,
            "chat.startStream": self._start_stream,
            "chat.appendStream": self._append_stream,
            "chat.stopStream": self._stop_stream,
            "assistant.threads.setStatus": self._set_status,
            "assistant.threads.setTitle": self._set_title,
            "assistant.threads.setSuggestedPrompts": self._set_suggested_prompts,
            "conversations.replies": self._replies,
            "conversations.info": self._conversations_info,
            "users.info": self._users_info,
        }
        self._failures: dict[str, list[tuple[int, str, int | None]]] = {}
        # Called with each call once it is handled, before the answer goes back (a fault
        # test can kill the client there: the call took effect, the client never heard).
        self.after_call: Callable[[ApiCall], None] | None = None
        self._sockets: list[web.WebSocketResponse] = []
        self._last_us = 0  # the last ts given, in whole microseconds: exact, as a float is not
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_get("/socket-mode", self._socket)
        app.router.add_get("/files-pri/{team_file}/{path:.*}", self._file)
        app.router.add_get("/signin", self._sign_in)
        app.router.add_post("/commands/{trigger_id}", self._command_response)
        self._runner, self.port = await serve(app)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        """Web API base URL, with the trailing slash AsyncWebClient wants."""
        return f"http://127.0.0.1:{self.port}/api/"

    def next_ts(self) -> str:
        """A unique, increasing message ts from the clock, as Slack's are (``1700000000.000100``).

        Unique across fakes too, so tests sharing one Redis never share a thread.
        """
        self._last_us = max(time.time_ns() // 1000, self._last_us + 1)
        return f"{self._last_us // 10**6}.{self._last_us % 10**6:06d}"

    def pass_time(self, seconds: float) -> None:
        """The next message is sent `seconds` later (its ts says so): a thread of days."""
        self._last_us = max(time.time_ns() // 1000, self._last_us) + round(seconds * 10**6)

    # --- records and waiting --------------------------------------------------------------

    def calls_to(self, method: str, *, ok_only: bool = False) -> list[ApiCall]:
        """Recorded calls of one method, oldest first (ok_only: only successful ones)."""
        return [c for c in self.calls if c.method == method and (c.ok or not ok_only)]

    def message(self, channel: str, ts: str) -> JSON | None:
        """The current state of one message, or None."""
        return next((m for m in self.channels.get(channel, []) if m["ts"] == ts), None)

    def thread(self, channel: str, thread_ts: str) -> list[JSON]:
        """Parent plus replies, oldest first."""
        log = self.channels.get(channel, [])
        return [m for m in log if thread_ts in (m["ts"], m.get("thread_ts"))]

    def _record(self, channel: str, message: JSON) -> None:
        self.channels.setdefault(channel, []).append(message)
        self.channels[channel].sort(key=lambda m: float(m["ts"]))

    async def wait_for(
        self, predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02
    ) -> T:
        """Poll predicate until it returns something truthy; TimeoutError after timeout."""
        return await wait_for(predicate, timeout, interval)

    async def wait_for_calls(
        self, method: str, count: int = 1, timeout: float = 10.0
    ) -> list[ApiCall]:
        """Wait until at least count successful calls of method were made; returns them."""
        return await self.wait_for(
            lambda: (c := self.calls_to(method, ok_only=True)) and len(c) >= count and c, timeout
        )

    # --- failure injection ----------------------------------------------------------------

    def rate_limit(self, method: str, count: int = 1, retry_after: int = 1) -> None:
        """Answer the next count calls of method with HTTP 429, Retry-After and ratelimited."""
        self.fail_next(method, "ratelimited", count=count, status=429, retry_after=retry_after)

    def fail_next(
        self,
        method: str,
        error: str,
        *,
        count: int = 1,
        status: int = 200,
        retry_after: int | None = None,
    ) -> None:
        """Answer the next count calls of method with ``{"ok": false, "error": error}``."""
        self._failures.setdefault(method, []).extend([(status, error, retry_after)] * count)

    def clear_failures(self) -> None:
        """Answer every method normally again (undo `fail_next` and `rate_limit`)."""
        self._failures.clear()

    def refuse_streaming(self, error: str = "method_not_allowed_for_app") -> None:
        """From now on, answer the AI streaming methods with `error`, as Slack does for an app
        or workspace without them."""
        self.streaming_refusal = error

    def refuse_streaming_in(self, channel: str) -> None:
        """From now on, refuse to start a stream in `channel`, as Slack does in a kind of
        channel that takes none (a Slack List item's comment thread)."""
        self.unstreamable.add(channel)

    def is_streaming(self, channel: str, ts: str) -> bool:
        """Whether a message is a stream still open (started, not yet stopped or expired)."""
        return (channel, ts) in self.streaming

    def end_streams(self) -> None:
        """End every open stream as Slack does a few minutes after each began."""
        self.streaming.clear()

    def delete_by_user(self, channel: str, ts: str) -> None:
        """Someone (an admin) deletes a message: a stream into it is gone with it."""
        self.channels[channel].remove(self.message(channel, ts))
        self.streaming.discard((channel, ts))

    def stop_by_user(self, channel: str, ts: str) -> None:
        """A reader presses a stream's stop button: it takes nothing more."""
        self.streaming.discard((channel, ts))
        self.stopped_by_user.add((channel, ts))

    # --- Web API --------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params: JSON = dict(request.query)
        if request.content_type == "application/json":
            params.update(await request.json())
        elif request.body_exists:
            params.update(await request.post())
        for key in PAYLOAD_KEYS:  # form-encoded blocks arrive as JSON strings
            if isinstance(params.get(key), str) and params[key].startswith(("[", "{")):
                params[key] = json.loads(params[key])
        auth = request.headers.get("Authorization", "")
        token = params.pop("token", None) or (auth[7:] if auth.startswith("Bearer ") else None)
        call = ApiCall(method, params, token)
        self.calls.append(call)
        if delay := self.delays.get(method):  # a slow Slack
            await asyncio.sleep(delay)
        wanted = self.app_token if method == "apps.connections.open" else self.bot_token
        headers: dict[str, str] = {}
        if token == wanted:  # Slack names a valid token's scopes on every answer
            scopes = ["connections:write"] if token == self.app_token else self.scopes
            headers["X-OAuth-Scopes"] = ",".join(scopes)
        if token is None:
            body: JSON = {"ok": False, "error": "not_authed"}
        elif token != wanted:
            body = {"ok": False, "error": "invalid_auth"}
        elif queue := self._failures.get(method):
            call.status, error, retry_after = queue.pop(0)
            body = {"ok": False, "error": error}
            if retry_after is not None:
                headers["Retry-After"] = str(retry_after)
        elif method in STREAMING_METHODS and self.streaming_refusal:
            body = {"ok": False, "error": self.streaming_refusal}
        elif handler := self.handlers.get(method):
            body = await handler(params)
        else:
            body = {"ok": False, "error": "unknown_method", "req_method": method}
        call.response = body
        if self.after_call is not None:
            self.after_call(call)
        return web.json_response(body, status=call.status, headers=headers)

    async def _auth_test(self, params: JSON) -> JSON:
        return {
            "ok": True,
            "url": f"https://{self.team_domain}.slack.com/",
            "team": "Fake Team",
            "user": self.users.get(self.bot_user_id, "threadbot"),
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    async def _connections_open(self, params: JSON) -> JSON:
        query = f"ticket={uuid.uuid4()}&app_id={self.app_id}"
        return {"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket-mode?{query}"}

    async def _post_message(self, params: JSON) -> JSON:
        channel = params.get("channel")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        text = params.get("markdown_text") or params.get("text")
        if not text and not params.get("blocks"):
            return {"ok": False, "error": "no_text"}
        if len(params.get("markdown_text") or "") > MARKDOWN_LIMIT:
            return {"ok": False, "error": "msg_too_long"}
        message = self._bot_post(channel, params.get("thread_ts"), text or "")
        message.update({k: params[k] for k in PAYLOAD_KEYS if k in params})
        return {"ok": True, "channel": channel, "ts": message["ts"], "message": dict(message)}

    async def _post_ephemeral(self, params: JSON) -> JSON:
        """Shown to `user` alone, in `channel`; no message of the channel's history."""
        if not params.get("channel"):
            return {"ok": False, "error": "channel_not_found"}
        if not params.get("user"):
            return {"ok": False, "error": "user_not_found"}
        if not params.get("text") and not params.get("blocks"):
            return {"ok": False, "error": "no_text"}
        self.ephemerals.append({k: params.get(k) for k in ("channel", "user", "text")})
        return {"ok": True, "message_ts": self.next_ts()}

    def _bot_post(self, channel: str, thread_ts: str | None, text: str) -> JSON:
        """A new message of the bot's (which clears the thread's assistant status, as Slack
        does when the app replies)."""
        message: JSON = {
            "type": "message",
            "user": self.bot_user_id,
            "bot_id": self.bot_id,
            "app_id": self.app_id,
            "team": self.team_id,
            "text": text,
            "ts": self.next_ts(),
        }
        if thread_ts:
            parent = self.message(channel, thread_ts)
            message.update(thread_ts=thread_ts, parent_user_id=parent and parent.get("user"))
            self.statuses.pop((channel, thread_ts), None)
        self._record(channel, message)
        return message

    def _own(self, params: JSON, refusal: str) -> JSON:
        """The bot's own message that `params` name, or Slack's error ({"ok": False})."""
        message = self.message(params.get("channel", ""), params.get("ts", ""))
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        if message.get("user") != self.bot_user_id:
            return {"ok": False, "error": refusal}
        return message

    async def _update(self, params: JSON) -> JSON:
        channel, ts = params.get("channel", ""), params.get("ts", "")
        message = self._own(params, "cant_update_message")
        if message.get("ok") is False:
            return message
        if len(params.get("markdown_text") or "") > MARKDOWN_LIMIT:
            return {"ok": False, "error": "msg_too_long"}
        message.update({k: params[k] for k in ("text", *PAYLOAD_KEYS) if k in params})
        if params.get("markdown_text"):
            message["text"] = params["markdown_text"]
        message["edited"] = {"user": self.bot_user_id, "ts": self.next_ts()}
        text = message.get("text", "")
        return {"ok": True, "channel": channel, "ts": ts, "text": text, "message": dict(message)}

    async def _delete(self, params: JSON) -> JSON:
        """A message of the bot's own goes (a stream too, open or not)."""
        channel, ts = params.get("channel", ""), params.get("ts", "")
        message = self._own(params, "cant_delete_message")
        if message.get("ok") is False:
            return message
        self.channels[channel].remove(message)
        self.streaming.discard((channel, ts))
        return {"ok": True, "channel": channel, "ts": ts}

    async def _start_stream(self, params: JSON) -> JSON:
        """A new message in a thread that grows as it streams, for one recipient (named
        outside DMs); it may start empty."""
        channel, thread_ts = params.get("channel", ""), params.get("thread_ts")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        if channel in self.unstreamable:
            return {"ok": False, "error": "channel_type_not_supported"}
        recipient = params.get("recipient_user_id") and params.get("recipient_team_id")
        if not channel.startswith("D") and not recipient:
            return {"ok": False, "error": "invalid_arguments"}
        text = _markdown(params)
        if text is None:
            return {"ok": False, "error": "msg_too_long"}
        message = self._bot_post(channel, thread_ts, text)
        self.streaming.add((channel, message["ts"]))
        return {"ok": True, "channel": channel, "ts": message["ts"]}

    async def _append_stream(self, params: JSON) -> JSON:
        return self._grow_stream(params, stop=False)

    async def _stop_stream(self, params: JSON) -> JSON:
        return self._grow_stream(params, stop=True)

    def _grow_stream(self, params: JSON, *, stop: bool) -> JSON:
        """The stream's message gets the new Markdown at its end; a stop ends the stream."""
        channel, ts = params.get("channel", ""), params.get("ts", "")
        message = self.message(channel, ts)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        if (channel, ts) in self.stopped_by_user:
            return {"ok": False, "error": "stopped_by_user"}
        if (channel, ts) not in self.streaming:
            return {"ok": False, "error": "message_not_in_streaming_state"}
        text = _markdown(params)
        if text is None:
            return {"ok": False, "error": "msg_too_long"}
        message["text"] += text
        if stop:
            self.streaming.discard((channel, ts))
            return {"ok": True, "channel": channel, "ts": ts, "message": dict(message)}
        return {"ok": True, "channel": channel, "ts": ts}

    async def _set_status(self, params: JSON) -> JSON:
        """The status under a thread; an empty one clears it."""
        where = (params.get("channel_id", ""), params.get("thread_ts", ""))
        if "status" not in params or not all(where):
            return {"ok": False, "error": "invalid_arguments"}
        if params["status"]:
            self.statuses[where] = params["status"]
        else:
            self.statuses.pop(where, None)
        return {"ok": True}

    async def _set_title(self, params: JSON) -> JSON:
        where = (params.get("channel_id", ""), params.get("thread_ts", ""))
        if not params.get("title") or not all(where):
            return {"ok": False, "error": "invalid_arguments"}
        self.titles[where] = params["title"]
        return {"ok": True}

    async def _set_suggested_prompts(self, params: JSON) -> JSON:
        where = (params.get("channel_id", ""), params.get("thread_ts", ""))
        prompts = params.get("prompts")
        valid = isinstance(prompts, list) and all(
            isinstance(p, dict) and p.get("title") and p.get("message") for p in prompts
        )
        if not valid or not all(where):
            return {"ok": False, "error": "invalid_arguments"}
        self.prompts[where] = prompts
        return {"ok": True}

    async def _replies(self, params: JSON) -> JSON:
        """A thread as Slack pages it: the earliest messages in the time range first.

        `oldest` and `latest` bound the range (their own ts only with `inclusive`), `limit`
        caps a page (at most 1000), and `cursor` is a previous page's opaque `next_cursor`.
        """
        channel, ts = params.get("channel", ""), params.get("ts", "")
        if channel not in self.channels:
            return {"ok": False, "error": "channel_not_found"}
        messages = [dict(m) for m in self.thread(channel, ts)]
        if not messages:
            return {"ok": False, "error": "thread_not_found"}
        parent, replies = messages[0], messages[1:]
        if parent["ts"] == ts and replies:
            parent.update(
                thread_ts=ts,
                reply_count=len(replies),
                latest_reply=replies[-1]["ts"],
                reply_users=sorted({r["user"] for r in replies if r.get("user")}),
            )
        oldest = Decimal(params.get("oldest") or 0)
        latest = Decimal(params.get("latest") or "Infinity")
        inclusive = str(params.get("inclusive", "")).lower() in ("1", "true")

        def in_range(message: JSON) -> bool:
            at = Decimal(message["ts"])
            return oldest < at < latest or (inclusive and at in (oldest, latest))

        messages = [m for m in messages if in_range(m)]
        if cursor := params.get("cursor"):
            try:
                start = Decimal(base64.b64decode(cursor).decode().removeprefix("next_ts:"))
            except (ValueError, ArithmeticError):
                return {"ok": False, "error": "invalid_cursor"}
            messages = [m for m in messages if Decimal(m["ts"]) >= start]
        limit = min(int(params.get("limit") or 1000), 1000)
        page, rest = messages[:limit], messages[limit:]
        next_cursor = base64.b64encode(f"next_ts:{rest[0]['ts']}".encode()).decode() if rest else ""
        return {
            "ok": True,
            "messages": page,
            "has_more": bool(rest),
            "response_metadata": {"next_cursor": next_cursor},
        }

    async def _users_info(self, params: JSON) -> JSON:
        user_id = params.get("user", "")
        if user_id not in self.users:
            return {"ok": False, "error": "user_not_found"}
        name = self.users[user_id]
        profile = {"display_name": name, "real_name": name.title()}
        team = self.external_users.get(user_id, self.team_id)
        user = {"id": user_id, "team_id": team, "name": name, "real_name": name.title()}
        if enterprise := self.enterprises.get(team):
            user["enterprise_user"] = {"id": user_id, "enterprise_id": enterprise, "teams": [team]}
        return {
            "ok": True,
            "user": {**user, "is_bot": user_id == self.bot_user_id, "profile": profile},
        }

    async def _conversations_info(self, params: JSON) -> JSON:
        channel = params.get("channel", "")
        group_dm = channel in self.group_dms  # its id starts with G, as a private channel's
        needed = "mpim:read" if group_dm else INFO_SCOPES.get(channel[:1], "channels:read")
        if needed not in self.scopes:
            provided = ",".join(self.scopes)
            return {"ok": False, "error": "missing_scope", "needed": needed, "provided": provided}
        name = f"mpdm-{channel.lower()}-1" if group_dm else channel.lower()
        info = {"is_im": channel[0] == "D", "is_mpim": group_dm}
        return {
            "ok": True,
            "channel": {"id": channel, "name": self.channel_names.get(channel, name), **info},
        }

    # --- files ----------------------------------------------------------------------------

    def upload(self, name: str, data: bytes, mimetype: str, *, user: str = "U0ALICE") -> JSON:
        """Keep a file as if `user` uploaded it; returns its file object, as a message's
        `files` carry it (share it with `file_share`)."""
        file_id = "F" + secrets.token_hex(5).upper()
        self.files[file_id] = (data, mimetype)
        base = f"http://127.0.0.1:{self.port}/files-pri/{self.team_id}-{file_id}"
        now = int(time.time())
        return {
            "id": file_id,
            "created": now,
            "timestamp": now,
            "name": name,
            "title": name,
            "mimetype": mimetype,
            "filetype": name.rpartition(".")[2] if "." in name else "binary",
            "user": user,
            "user_team": self.team_id,
            "size": len(data),
            "mode": "hosted",
            "is_external": False,
            "is_public": False,
            "url_private": f"{base}/{name}",
            "url_private_download": f"{base}/download/{name}",
            "permalink": f"https://{self.team_domain}.slack.com/files/{user}/{file_id}/{name}",
        }

    async def _file(self, request: web.Request) -> web.StreamResponse:
        """A file's content for the bot token with `files:read`; Slack's sign-in page
        (through a redirect, an HTML 200) for anyone else."""
        authorized = request.headers.get("Authorization") == f"Bearer {self.bot_token}"
        if not authorized or "files:read" not in self.scopes:
            raise web.HTTPFound(f"/signin?redir={request.path}")
        file_id = request.match_info["team_file"].removeprefix(f"{self.team_id}-")
        if file_id not in self.files:
            raise web.HTTPNotFound()
        await asyncio.sleep(self.delays.get("files", 0))
        self.downloads.append(file_id)
        data, mimetype = self.files[file_id]
        return web.Response(body=data, headers={"Content-Type": mimetype})

    async def _sign_in(self, request: web.Request) -> web.Response:
        return web.Response(text=SIGN_IN_PAGE, content_type="text/html")

    # --- Socket Mode ----------------------------------------------------------------------

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)  # answers the SDK's pings with pongs
        await ws.prepare(request)
        self._sockets.append(ws)
        self.connections += 1
        debug = {"host": "applink-fake-1", "build_number": 1, "approximate_connection_time": 18060}
        await ws.send_json(
            {
                "type": "hello",
                "num_connections": len(self._sockets),
                "debug_info": debug,
                "connection_info": {"app_id": self.app_id},
            }
        )
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT and "envelope_id" in (data := msg.json()):
                    self.acks[data["envelope_id"]] = data
        finally:
            self._sockets.remove(ws)
        return ws

    @property
    def connected(self) -> bool:
        return any(not ws.closed for ws in self._sockets)

    @property
    def connections_open(self) -> int:
        """Socket Mode connections open: one per client (a gateway) connected."""
        return sum(not ws.closed for ws in self._sockets)

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Wait until a Socket Mode client is connected (hello sent)."""
        await self.wait_for(lambda: self.connected, timeout)

    async def close_sockets(self) -> None:
        """Close every Socket Mode connection from the server's side, as a lost network
        or a Slack outage does (the SDK then asks apps.connections.open for a new one)."""
        for ws in list(self._sockets):
            await ws.close()

    async def disconnect(self, reason: str = "refresh_requested") -> None:
        """Send ``disconnect`` as Slack does before recycling a connection (SDK reconnects)."""
        for ws in list(self._sockets):
            await ws.send_json({"type": "disconnect", "reason": reason, "debug_info": {}})

    def event_payload(self, event: JSON, *, event_id: str | None = None) -> JSON:
        """An Events API ``event_callback`` body wrapping event."""
        auth = {
            "enterprise_id": self.enterprises.get(self.team_id),
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "is_bot": True,
            "is_enterprise_install": False,
        }
        return {
            "token": "fake-verification-token",
            "team_id": self.team_id,
            "api_app_id": self.app_id,
            "event": event,
            "type": "event_callback",
            "event_id": event_id or "Ev" + secrets.token_hex(5).upper(),
            "event_time": int(float(event.get("event_ts") or time.time())),
            "authorizations": [auth],
            "is_ext_shared_channel": False,
            "event_context": f"4-{event.get('type')}-{self.team_id}-{event.get('channel')}",
        }

    async def send_event(
        self,
        event: JSON,
        *,
        retry_attempt: int = 0,
        retry_reason: str = "",
        event_id: str | None = None,
        connection: int = -1,
    ) -> str:
        """Send event in an ``events_api`` envelope to a client (`connection`: the index of
        its connection among those open, oldest first; the newest by default), as Slack
        spreads events among an app's connections; returns envelope_id."""
        sockets = [ws for ws in self._sockets if not ws.closed]
        if not sockets:
            raise RuntimeError("no Socket Mode client is connected")
        envelope = {
            "envelope_id": str(uuid.uuid4()),
            "payload": self.event_payload(event, event_id=event_id),
            "type": "events_api",
            "accepts_response_payload": False,
            "retry_attempt": retry_attempt,
            "retry_reason": retry_reason,
        }
        self.envelopes.append(envelope)
        await sockets[connection].send_json(envelope)
        return envelope["envelope_id"]

    async def send_command(
        self,
        channel: str,
        text: str,
        *,
        user: str = "U0ALICE",
        command: str = "/threadbot",
        channel_name: str | None = None,
        team: str | None = None,
    ) -> str:
        """Send a slash command in a ``slash_commands`` envelope, as typed by `user` in
        `channel` (the payload's `team_id`: `team`, else ours); returns its trigger id,
        under which its responses are kept."""
        sockets = [ws for ws in self._sockets if not ws.closed]
        if not sockets:
            raise RuntimeError("no Socket Mode client is connected")
        trigger_id = f"{secrets.randbelow(10**10)}.{secrets.token_hex(8)}"
        self.responses[trigger_id] = []
        dm = channel.startswith("D")
        payload = {
            "token": "fake-verification-token",
            "team_id": team or self.team_id,
            "team_domain": self.team_domain,
            "channel_id": channel,
            "channel_name": channel_name or ("directmessage" if dm else "general"),
            "user_id": user,
            "user_name": self.users.get(user, user),
            "command": command,
            "text": text,
            "api_app_id": self.app_id,
            "enterprise_id": self.enterprises.get(self.team_id),
            "is_enterprise_install": "false",
            "response_url": f"http://127.0.0.1:{self.port}/commands/{trigger_id}",
            "trigger_id": trigger_id,
        }
        envelope = {
            "envelope_id": str(uuid.uuid4()),
            "payload": payload,
            "type": "slash_commands",
            "accepts_response_payload": True,
        }
        self.envelopes.append(envelope)
        await sockets[-1].send_json(envelope)
        return trigger_id

    async def _command_response(self, request: web.Request) -> web.Response:
        """A slash command's response_url: messages for the person who typed it, five at
        most (Slack's limit on one response_url)."""
        responses = self.responses.get(request.match_info["trigger_id"])
        if responses is None:
            return web.Response(status=404, text="invalid_token")
        if len(responses) >= 5:
            return web.Response(status=404, text="used_url")
        try:
            responses.append(await request.json())
        except ValueError:
            return web.Response(status=400, text="invalid_payload")
        return web.Response(text="ok")

    async def wait_for_ack(self, envelope_id: str, timeout: float = 5.0) -> JSON:
        """Wait for the client's ``{"envelope_id": ...}`` ack and return it."""
        return await self.wait_for(lambda: self.acks.get(envelope_id), timeout)

    # --- Events API over HTTP: the fake as the sender -------------------------------------

    def sign(self, body: str, timestamp: int, secret: str | None = None) -> str:
        """``v0=`` + hex HMAC-SHA256 of ``v0:{timestamp}:{body}``."""
        key = (secret or self.signing_secret).encode()
        return "v0=" + hmac.new(key, f"v0:{timestamp}:{body}".encode(), hashlib.sha256).hexdigest()

    async def post_signed(
        self,
        url: str,
        payload: JSON,
        *,
        signing_secret: str | None = None,
        bad_signature: bool = False,
        timestamp: int | None = None,
        retry_num: int | None = None,
        retry_reason: str = "http_timeout",
    ) -> tuple[int, str]:
        """POST payload as signed JSON to an app's request URL; returns (status, body text)."""
        body = json.dumps(payload)
        ts = int(time.time()) if timestamp is None else timestamp
        signature = "v0=" + "0" * 64 if bad_signature else self.sign(body, ts, signing_secret)
        headers = {
            "Content-Type": "application/json",
            "X-Slack-Request-Timestamp": str(ts),
            "X-Slack-Signature": signature,
            "User-Agent": "Slackbot 1.0 (+https://api.slack.com/robots)",
        }
        if retry_num is not None:
            headers.update(
                {"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": retry_reason}
            )
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.post(url, data=body.encode(), headers=headers) as resp,
        ):
            return resp.status, await resp.text()

    async def post_event(
        self, url: str, event: JSON, *, event_id: str | None = None, **signing: Any
    ) -> int:
        """POST an ``event_callback`` for event to url as Slack would; returns the status.

        `signing` takes post_signed's options (bad_signature, timestamp, retry_num, ...).
        """
        status, _ = await self.post_signed(
            url, self.event_payload(event, event_id=event_id), **signing
        )
        return status

    # --- event builders: each also records the message in the channel log -----------------

    def _event(self, channel: str, text: str, thread_ts: str | None, **fields: Any) -> JSON:
        ts = self.next_ts()
        event: JSON = {**fields, "text": text, "ts": ts}
        if "user" in fields:
            team = self.external_users.get(fields["user"], self.team_id)
            event.update(client_msg_id=str(uuid.uuid4()), team=team, user_team=team)
        if thread_ts:
            parent = self.message(channel, thread_ts)
            event.update(thread_ts=thread_ts, parent_user_id=parent and parent.get("user"))
        if fields.get("channel_type") == "mpim":
            self.group_dms.add(channel)
        stored = {k: v for k, v in event.items() if k != "channel_type"}
        self._record(channel, {**stored, "type": "message"})
        return {**event, "channel": channel, "event_ts": ts}

    def user_message(
        self,
        channel: str,
        text: str,
        *,
        user: str = "U0ALICE",
        thread_ts: str | None = None,
        channel_type: str = "channel",
        attachments: list[JSON] | None = None,
    ) -> JSON:
        """A ``message`` event from a person; `attachments` as Slack sends a forwarded
        message's (`forwarded`)."""
        shared = {"attachments": attachments} if attachments else {}
        return self._event(
            channel, text, thread_ts, type="message", user=user, channel_type=channel_type,
            **shared,
        )  # fmt: skip

    def app_mention(
        self,
        channel: str,
        text: str,
        *,
        user: str = "U0ALICE",
        thread_ts: str | None = None,
        files: list[JSON] | None = None,
    ) -> JSON:
        """An ``app_mention`` event; text gets a leading ``<@U0BOT>`` if it lacks one."""
        mention = f"<@{self.bot_user_id}>"
        text = text if mention in text else f"{mention} {text}"
        shared = {"files": files, "upload": True} if files else {}
        return self._event(channel, text, thread_ts, type="app_mention", user=user, **shared)

    def file_share(
        self,
        channel: str,
        text: str,
        files: list[JSON],
        *,
        user: str = "U0ALICE",
        thread_ts: str | None = None,
        channel_type: str = "channel",
    ) -> JSON:
        """A ``message`` event with ``subtype: file_share``: a person's message with files
        (`upload`'s file objects); the text may be empty."""
        return self._event(
            channel,
            text,
            thread_ts,
            type="message",
            subtype="file_share",
            user=user,
            files=files,
            upload=True,
            display_as_bot=False,
            channel_type=channel_type,
        )

    def mention_pair(
        self,
        channel: str,
        text: str,
        *,
        user: str = "U0ALICE",
        thread_ts: str | None = None,
        channel_type: str = "channel",
        files: list[JSON] | None = None,
    ) -> tuple[JSON, JSON]:
        """What Slack sends for one mention: ``app_mention`` and ``message``, same ts; with
        files, the message is a ``file_share``."""
        mention = self.app_mention(channel, text, user=user, thread_ts=thread_ts, files=files)
        if channel_type == "mpim":
            self.group_dms.add(channel)
        message = {**mention, "type": "message", "channel_type": channel_type}
        return mention, message | ({"subtype": "file_share"} if files else {})

    def bot_message(
        self,
        channel: str,
        text: str,
        *,
        bot_id: str = "B0OTHER",
        username: str = "otherbot",
        thread_ts: str | None = None,
        channel_type: str = "channel",
    ) -> JSON:
        """A ``message`` event with ``subtype: bot_message`` (another bot unless bot_id says)."""
        return self._event(
            channel,
            text,
            thread_ts,
            type="message",
            subtype="bot_message",
            bot_id=bot_id,
            username=username,
            channel_type=channel_type,
        )

    def dm(
        self,
        channel: str = "D0001",
        text: str = "hello",
        *,
        user: str = "U0ALICE",
        attachments: list[JSON] | None = None,
    ) -> JSON:
        """A direct-message ``message`` event (``channel_type: im``)."""
        return self.user_message(
            channel, text, user=user, channel_type="im", attachments=attachments
        )

    def forwarded(self, channel: str, text: str, *, user: str = "U0BOB") -> JSON:
        """The attachment in which Slack sends a message forwarded from `channel`: its
        text, where it came from and who wrote it."""
        ts = self.next_ts()
        return {
            "is_share": True, "is_msg_unfurl": True, "text": text, "fallback": f"[{ts}] {text}",
            "author_id": user, "author_name": self.users.get(user, user),
            "channel_id": channel, "ts": ts,
            "from_url": f"https://fake.slack.com/archives/{channel}/p{ts.replace('.', '')}",
            "mrkdwn_in": ["text"], "id": 1,
        }  # fmt: skip

    def assistant_thread_started(self, channel: str = "D0001", *, user: str = "U0ALICE") -> JSON:
        """An ``assistant_thread_started`` event: the user opened a new thread in the pane,
        whose first message (``assistant_app_thread``) Slack posts in the DM."""
        ts = self.next_ts()
        root = {
            "type": "message",
            "subtype": "assistant_app_thread",
            "user": user,
            "team": self.team_id,
            "text": f"Chats from {time.strftime('%Y-%m-%d')}",
            "ts": ts,
            "thread_ts": ts,
        }
        self._record(channel, root)
        context = {"channel_id": "C0001", "team_id": self.team_id, "enterprise_id": None}
        thread = {"user_id": user, "context": context, "channel_id": channel, "thread_ts": ts}
        return {"type": "assistant_thread_started", "assistant_thread": thread, "event_ts": ts}


def _markdown(params: JSON) -> str | None:
    """The Markdown a streaming call adds (markdown_text, or markdown_text chunks), or None
    if it is longer than Slack takes."""
    text = params.get("markdown_text") or ""
    for chunk in params.get("chunks") or []:
        if chunk.get("type") == "markdown_text":
            text += chunk.get("text", "")
    return text if len(text) <= MARKDOWN_LIMIT else None
