"""A fake Discord for tests: REST API and a zlib-stream gateway, both on 127.0.0.1.

The real discord.py talks to it over HTTP and a websocket, inside the test's loop::

    async with FakeDiscord() as fake:
        discord.http.Route.BASE = fake.api_url          # restore it afterwards
        client = discord.Client(intents=...)
        await client.login(fake.token)
        _, url, _ = await client.http.get_bot_gateway()  # GET /gateway/bot
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url)  # restore it afterwards
        task = asyncio.create_task(client.connect())
        await fake.dispatch("MESSAGE_CREATE", fake.user_message(fake.channel_id, "hi"))

Application commands are registered with PUT (per server or global) and run with
`slash_command`; buttons on messages are pressed with `press_button`. Both arrive as
INTERACTION_CREATE and are answered as on Discord: one callback within 3 s (types 4-7,
flag 64 for ephemeral), then the original response edited and follow-ups sent through
the interaction's webhook for 15 minutes (`FakeInteraction` keeps what was shown).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import re
import secrets
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self, TypeVar

import aiohttp
from aiohttp import web
from fake_server import serve, wait_for

T = TypeVar("T")
JSON = dict[str, Any]

DISCORD_EPOCH_MS = 1420070400000
GUILDS, GUILD_MEMBERS, GUILD_PRESENCES = 1 << 0, 1 << 1, 1 << 8
GUILD_MESSAGES, DIRECT_MESSAGES, MESSAGE_CONTENT = 1 << 9, 1 << 12, 1 << 15
PRIVILEGED = GUILD_MEMBERS | GUILD_PRESENCES | MESSAGE_CONTENT
# @everyone may view, send, embed, attach, read history, react, create and talk in threads.
EVERYONE_PERMISSIONS = sum(1 << b for b in (6, 10, 11, 14, 15, 16, 18, 31, 35, 38))
NONCE_WINDOW_S = 300.0
MAX_CONTENT = 2000
EPHEMERAL, LOADING = 1 << 6, 1 << 7  # message flags
ACK_WINDOW_S, TOKEN_LIFETIME_S = 3.0, 900.0  # an interaction's first answer; its token
COMMAND_NAME = re.compile(r"[-_a-z0-9]{1,32}")
# Interaction type -> the callback types Discord accepts for it (4: message, 5: deferred
# message, 6: deferred update, 7: update the component's message, 9: modal).
CALLBACK_TYPES = {2: {4, 5, 9}, 3: {4, 5, 6, 7, 9}}
EMPTY_GUILD_LISTS = ("emojis", "stickers", "presences", "voice_states", "stage_instances")


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def op(code: int, d: Any = None) -> JSON:
    """A gateway payload that is not a dispatch."""
    return {"op": code, "d": d, "s": None, "t": None}


def make_user(user_id: str, name: str, *, bot: bool = False) -> JSON:
    user = {"id": user_id, "username": name, "discriminator": "0", "avatar": None}
    return {**user, "global_name": None if bot else name.title(), "public_flags": 0, "bot": bot}


class ApiError(Exception):
    def __init__(self, status: int, code: int, message: str, errors: JSON | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, {"message": message, "code": code}
        if errors:
            self.body["errors"] = errors


@dataclass
class Request:
    """One REST request as the fake saw it; path is relative to /api/v10, json is the body
    (for multipart: the parsed ``payload_json``), files the uploaded parts."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    headers: dict[str, str]
    files: list[JSON] = field(default_factory=list)
    status: int = 200
    at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Conn:
    ws: web.WebSocketResponse
    zlib: Any  # a zlib compressobj shared by the whole connection, or None for plain text
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class FakeInteraction:
    """One interaction as the fake sent it, and how the app answered it."""

    payload: JSON  # INTERACTION_CREATE's data
    at: float = field(default_factory=time.monotonic)
    callback: JSON | None = None  # the app's callback body, once acknowledged
    original: JSON | None = None  # the response message; a component's message after 6 or 7
    followups: list[JSON] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.payload["id"]

    @property
    def replies(self) -> list[JSON]:
        """What the app said in answer: its response message (types 4 and 5), then its
        follow-ups, in their current state."""
        responded = self.callback is not None and self.callback.get("type") in (4, 5)
        return ([self.original] if responded and self.original else []) + self.followups


class FakeDiscord:
    """Fake Discord: records every request and gateway payload, keeps a log per channel."""

    token = "fake-token"
    application_id = "999"
    guild_id = "2000"
    channel_id = "3000"

    def __init__(
        self, *, heartbeat_interval: int = 41250, privileged_intents: int = PRIVILEGED
    ) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.privileged_intents = privileged_intents  # as enabled in the developer portal
        self._last_id = 0
        self._sessions_open = asyncio.Event()  # cleared: a new session waits (`hold_...`)
        self._sessions_open.set()
        # Its own, as DM channels are: one test's bot does not read back another's DMs.
        self.bot = make_user(self.snowflake(), "threadbot", bot=True)
        self.alice = make_user("1001", "alice")
        self.other_bot = make_user("1002", "otherbot", bot=True)
        self.bob = make_user("1003", "bob")
        self.users = {u["id"]: u for u in (self.bot, self.alice, self.other_bot, self.bob)}
        self.roles: dict[str, str] = {}  # the guild's roles besides @everyone: id -> name
        # The role Discord makes for a bot added with permissions, named as the bot: people
        # typing @threadbot may pick it instead of the bot's user.
        self.bot_role_id = "1100"
        self.member_roles: dict[str, list[str]] = {}  # user id -> role ids
        # user id -> the only servers the user is in (by default: every server of the bot's)
        self.member_of: dict[str, set[str]] = {}
        self.member_lookup_delay = 0.0  # seconds GET /guilds/{g}/members/{u} takes to answer
        self.history_delay = 0.0  # seconds GET /channels/{c}/messages takes to answer
        self.fetch_delay = 0.0  # seconds GET /channels/{c}/messages/{m} takes to answer
        self.history_asked = 0  # how many such reads began
        self.guilds = {self.guild_id: "Fake Guild"}  # the servers the bot is in: id -> name
        self.channels: dict[str, JSON] = {self.channel_id: self._text_channel("general")}
        self.messages: dict[str, list[JSON]] = {}  # channel id -> messages, oldest first
        self.requests: list[Request] = []
        self.sent: list[JSON] = []  # gateway payloads sent (before compression)
        self.received: list[JSON] = []  # gateway payloads received from the client
        self.connections: list[str] = []  # gateway URLs (path and query) connected to
        self.identifies = self.resumes = 0
        self.intents: int | None = None  # from the last IDENTIFY
        self.session_id: str | None = None
        self.echo_bot_messages = True  # dispatch MESSAGE_CREATE/UPDATE for the bot's own posts
        self.commands: dict[str | None, list[JSON]] = {}  # server id (None: global) -> commands
        self.interactions: dict[str, FakeInteraction] = {}  # by interaction id
        self._seq = 0
        self._backlog: list[JSON] = []  # this session's dispatches, for RESUME
        self._live: _Conn | None = None  # the identified or resumed connection
        self._conns: set[_Conn] = set()
        self._rate_limits: list[list[Any]] = []  # [method, regex, count, retry_after, global, via]
        self._breaks: list[list[Any]] = []  # [method, regex, count, status: None drops it]
        self._nonces: dict[str, tuple[float, str, str]] = {}  # nonce -> (at, channel, message)
        self._files: dict[str, tuple[bytes, str]] = {}  # CDN path -> content and type
        self.downloads: list[str] = []  # CDN paths served
        self.cdn_delay = 0.0  # seconds each file download waits before it is served
        self._cdn_key = secrets.token_bytes(16)  # signs attachment URLs, as Discord's CDN does
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/gateway-resume", self._gateway)
        app.router.add_get("/attachments/{channel}/{id}/{filename}", self._cdn)
        self._runner, self.port = await serve(app)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in list(self._conns):
            await conn.ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    @property
    def resume_gateway_url(self) -> str:
        """READY's resume_gateway_url: a separate path, so tests can see discord.py use it."""
        return f"ws://127.0.0.1:{self.port}/gateway-resume"

    def snowflake(self) -> str:
        """A new, increasing snowflake whose timestamp is now."""
        now = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last_id = max(self._last_id + 1, now)
        return str(self._last_id)

    # --- records and waiting --------------------------------------------------------------

    def requests_to(
        self, method: str, path_pattern: str, *, ok_only: bool = False
    ) -> list[Request]:
        """Recorded requests of this method whose path fully matches the regex, oldest first."""
        found = [
            r for r in self.requests if r.method == method and re.fullmatch(path_pattern, r.path)
        ]
        return [r for r in found if r.status < 300] if ok_only else found

    def message(self, channel_id: str, message_id: str) -> JSON | None:
        """The current state of one message (REST form), or None."""
        return next((m for m in self.messages.get(channel_id, []) if m["id"] == message_id), None)

    async def wait_for(
        self, predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02
    ) -> T:
        """Poll predicate until it returns something truthy; TimeoutError after timeout."""
        return await wait_for(predicate, timeout, interval)

    async def wait_for_requests(
        self, method: str, path_pattern: str, count: int = 1, timeout: float = 10.0
    ) -> list[Request]:
        """Wait until at least count successful matching requests were made; returns them."""

        def answered() -> list[Request]:
            return self.requests_to(method, path_pattern, ok_only=True)

        return await self.wait_for(lambda: len(r := answered()) >= count and r, timeout)

    async def wait_identified(self, count: int = 1, timeout: float = 10.0) -> None:
        await self.wait_for(lambda: self.identifies >= count, timeout)

    async def wait_resumed(self, count: int = 1, timeout: float = 10.0) -> None:
        await self.wait_for(lambda: self.resumes >= count, timeout)

    # --- rate limits ----------------------------------------------------------------------

    def rate_limit(
        self,
        method: str,
        path_regex: str,
        count: int = 1,
        retry_after: float = 0.1,
        *,
        is_global: bool = False,
        via: bool = True,
    ) -> None:
        """Answer the next count matching requests with 429. discord.py retries a 429 only
        when it has a Via header (via=False looks like a Cloudflare ban: HTTPException)."""
        self._rate_limits.append([method, path_regex, count, retry_after, is_global, via])

    def drop(self, method: str, path_regex: str, count: int = 1) -> None:
        """Close the connection of the next count matching requests, unanswered: a
        network blip, which discord.py raises as aiohttp's, not as an HTTPException."""
        self._breaks.append([method, path_regex, count, None])

    def fail(self, method: str, path_regex: str, status: int, count: int = 1) -> None:
        """Answer the next count matching requests with `status`: Discord's servers failing
        for a moment (a 503, which discord.py raises at once, where it retries a 500)."""
        self._breaks.append([method, path_regex, count, status])

    def _broken(self, req: Request) -> list[Any] | None:
        """The rule (`drop`, `fail`) that breaks this request, its count taken; if any."""
        for rule in self._breaks:
            method, regex, count, _status = rule
            if count > 0 and method == req.method and re.fullmatch(regex, req.path):
                rule[2] -= 1
                return rule
        return None

    def _rate_limited(self, req: Request) -> web.Response | None:
        for rule in self._rate_limits:
            method, regex, count, retry_after, is_global, via = rule
            if count > 0 and method == req.method and re.fullmatch(regex, req.path):
                rule[2] -= 1
                body = {"message": "You are being rate limited.", "retry_after": retry_after}
                headers = {
                    **self._bucket_headers(regex, 0, retry_after),
                    "Retry-After": str(math.ceil(retry_after)),
                    "X-RateLimit-Scope": "global" if is_global else "user",
                }
                headers.update({"X-RateLimit-Global": "true"} if is_global else {})
                return self._json(429, {**body, "global": is_global}, headers, via=via)
        return None

    @staticmethod
    def _bucket_headers(key: str, remaining: int, reset_after: float) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": "5",
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": hashlib.md5(key.encode()).hexdigest(),
        }

    # --- objects --------------------------------------------------------------------------

    def _text_channel(self, name: str) -> JSON:
        channel = dict(id=self.channel_id, type=0, guild_id=self.guild_id, name=name, position=0)
        channel.update(parent_id=None, topic=None, nsfw=False, last_message_id=None, flags=0)
        return channel | dict(rate_limit_per_user=0, permission_overwrites=[])

    def _member(self, user: JSON, *, with_user: bool = True) -> JSON:
        roles = self.member_roles.get(user["id"], [])
        member = dict(nick=None, avatar=None, roles=roles, joined_at="2024-01-01T00:00:00+00:00")
        member.update(premium_since=None, deaf=False, mute=False, pending=False, flags=0)
        return {"user": user, **member} if with_user else member

    def guild_payload(self, guild_id: str | None = None) -> JSON:
        """The full guild (the first by default), as GUILD_CREATE carries it."""
        guild_id = guild_id or self.guild_id
        everyone = dict(id=guild_id, name="@everyone", position=0, color=0)
        everyone.update(permissions=str(EVERYONE_PERMISSIONS), hoist=False, managed=False)
        everyone.update(mentionable=False, flags=0, icon=None, unicode_emoji=None)
        chans = [c for c in self.channels.values() if c.get("guild_id") == guild_id]
        guild = dict(id=guild_id, name=self.guilds[guild_id], icon=None, owner_id=self.alice["id"])
        guild.update(unavailable=False, large=False, member_count=len(self.users), features=[])
        guild.update(joined_at="2024-01-01T00:00:00+00:00", preferred_locale="en-US")
        system_channel = self.channel_id if guild_id == self.guild_id else None
        guild.update(system_channel_id=system_channel, afk_timeout=300, premium_tier=0)
        guild.update(verification_level=0, default_message_notifications=0, nsfw_level=0)
        roles = [everyone | {"id": i, "name": n, "position": 1} for i, n in self.roles.items()]
        bot_role = everyone | {"id": self.bot_role_id, "name": self.bot["username"]}
        bot_role |= {"position": 1, "managed": True, "tags": {"bot_id": self.bot["id"]}}
        guild.update(explicit_content_filter=0, mfa_level=0, roles=[everyone, *roles, bot_role])
        members = [u for u in self.users.values() if self._is_member(guild_id, u["id"])]
        guild["members"] = [self._member(u) for u in members]
        guild["channels"] = [c for c in chans if c["type"] != 11]
        guild["threads"] = [
            c for c in chans if c["type"] == 11 and not c["thread_metadata"]["archived"]
        ]  # active ones alone
        return guild | {key: [] for key in EMPTY_GUILD_LISTS}

    def dm_channel(self, user_id: str) -> JSON:
        """The bot's DM channel with a user (type 1), created on first use."""
        for channel in self.channels.values():
            if channel["type"] == 1 and channel["recipients"][0]["id"] == user_id:
                return channel
        channel = {"id": self.snowflake(), "type": 1, "last_message_id": None, "flags": 0}
        channel["recipients"] = [self.users[user_id]]
        self.channels[channel["id"]] = channel
        return channel

    def _new_message(self, channel_id: str, content: str, author: JSON, **extra: Any) -> JSON:
        """A message (REST form), in no channel's log yet (an ephemeral one never is)."""
        msg = {"id": self.snowflake(), "type": 0, "channel_id": channel_id, "author": author}
        msg.update(content=content, timestamp=now_iso(), edited_timestamp=None, tts=False)
        msg.update(mention_everyone=False, mentions=[], mention_roles=[], attachments=[])
        msg.update(embeds=[], components=[], pinned=False, flags=0)
        return msg | extra

    def _create_message(self, channel_id: str, content: str, author: JSON, **extra: Any) -> JSON:
        """Append a message (REST form) to the channel's log."""
        channel = self.channels[channel_id]
        msg = self._new_message(channel_id, content, author, **extra)
        self.messages.setdefault(channel_id, []).append(msg)
        channel["last_message_id"] = msg["id"]
        if channel["type"] == 11:
            channel["message_count"] += 1
            channel["total_message_sent"] += 1
        return msg

    def event_form(self, msg: JSON) -> JSON:
        """A stored message as MESSAGE_CREATE/UPDATE carry it: guild_id and members added."""
        guild_id = self.channels[msg["channel_id"]].get("guild_id")
        if guild_id is None:
            return dict(msg)
        mentions = [{**u, "member": self._member(u, with_user=False)} for u in msg["mentions"]]
        event = {**msg, "guild_id": guild_id, "mentions": mentions}
        if "webhook_id" not in msg:
            event["member"] = self._member(msg["author"], with_user=False)
        return event

    def user_message(
        self,
        channel_id: str,
        content: str,
        *,
        author: JSON | None = None,
        mentions_bot: bool = False,
        mentions_bot_role: bool = False,
        **extra: Any,
    ) -> JSON:
        """Record a message by a user (alice by default); returns its MESSAGE_CREATE payload.

        mentions_bot prefixes the bot's mention (``<@its id> ``) and fills mentions;
        mentions_bot_role prefixes the bot's role, ``<@&1100> ``, and fills mention_roles.
        Guild channels (text channel, threads) get guild_id and member; DM channels
        don't."""
        if mentions_bot:
            content = f"<@{self.bot['id']}> {content}"
            extra["mentions"] = [self.bot]
        if mentions_bot_role:
            content = f"<@&{self.bot_role_id}> {content}"
            extra["mention_roles"] = [self.bot_role_id]
        msg = self._create_message(channel_id, content, author or self.alice, **extra)
        return self.event_form(msg)

    def bot_authored_message(self, channel_id: str, content: str, **kwargs: Any) -> JSON:
        """A message by the other bot (1002); pass author=fake.bot for the bot's own."""
        return self.user_message(channel_id, content, **{"author": self.other_bot, **kwargs})

    def webhook_message(self, channel_id: str, content: str, **kwargs: Any) -> JSON:
        """A message sent through a webhook: webhook_id set, author is the webhook, no member."""
        hook_id = self.snowflake()
        author = {**make_user(hook_id, "Captain Hook", bot=True), "discriminator": "0000"}
        return self.user_message(channel_id, content, author=author, webhook_id=hook_id, **kwargs)

    def dm_message(self, content: str, *, author: JSON | None = None, **kwargs: Any) -> JSON:
        """A DM to the bot (channel type 1, no guild_id); alice by default."""
        author = author or self.alice
        channel = self.dm_channel(author["id"])
        return self.user_message(channel["id"], content, author=author, **kwargs)

    def thread_message(self, thread_id: str, content: str, **kwargs: Any) -> JSON:
        """A user message inside a thread (create it first, e.g. with start_thread)."""
        if self.channels.get(thread_id, {}).get("type") != 11:
            raise KeyError(f"no thread {thread_id}")
        return self.user_message(thread_id, content, **kwargs)

    async def start_thread(
        self,
        channel_id: str,
        message_id: str,
        name: str,
        auto_archive_duration: int = 1440,
        *,
        owner: JSON | None = None,
    ) -> JSON:
        """Start a public thread from a message (the thread's id is the message's, as on
        Discord) and dispatch THREAD_CREATE. owner defaults to the bot, which then is a member."""
        starter, owner = self.message(channel_id, message_id), owner or self.bot
        if starter is None:
            raise ApiError(404, 10008, "Unknown Message")
        if message_id in self.channels:
            raise ApiError(400, 160004, "A thread has already been created for this message")
        meta = {"archived": False, "auto_archive_duration": auto_archive_duration, "locked": False}
        meta.update(archive_timestamp=now_iso(), create_timestamp=now_iso())
        thread = {"id": message_id, "type": 11, "guild_id": self.guild_id, "parent_id": channel_id}
        thread.update(owner_id=owner["id"], name=name, last_message_id=None, message_count=0)
        thread.update(member_count=1, rate_limit_per_user=0, flags=0, total_message_sent=0)
        thread["thread_metadata"] = meta
        self.channels[message_id] = thread
        starter.update(flags=starter["flags"] | 32, thread=dict(thread))  # HAS_THREAD
        # The thread opens with an empty THREAD_STARTER_MESSAGE (type 21) that refers to the
        # message it was made from, and carries it in REST's `referenced_message`.
        refers = {"channel_id": channel_id, "message_id": message_id, "guild_id": self.guild_id}
        carried = {"message_reference": refers, "referenced_message": dict(starter)}
        self._create_message(message_id, "", starter["author"], type=21, **carried)
        if owner["id"] == self.bot["id"]:
            member = {"id": message_id, "user_id": owner["id"], "flags": 0}
            thread["member"] = {**member, "join_timestamp": now_iso()}
        await self.dispatch("THREAD_CREATE", {**thread, "newly_created": True})
        return thread

    # --- attachments ----------------------------------------------------------------------

    def attachment(
        self, channel_id: str, filename: str, data: bytes, content_type: str | None = None
    ) -> JSON:
        """Keep a file on the CDN; returns the attachment object a message carries (pass
        it in `attachments=[...]` to user_message). Its URL is signed and expires, as
        Discord's are: the CDN serves only the URL it gave."""
        attachment_id = self.snowflake()
        path = f"/attachments/{channel_id}/{attachment_id}/{filename}"
        self._files[path] = (data, content_type or "application/octet-stream")
        issued = int(time.time())
        expires = f"{issued + 86400:x}"
        signature = self._signature(path, expires, f"{issued:x}")
        url = f"http://127.0.0.1:{self.port}{path}?ex={expires}&is={issued:x}&hm={signature}&"
        attachment = {"id": attachment_id, "filename": filename, "size": len(data)}
        attachment.update(url=url, proxy_url=url)
        return attachment | ({"content_type": content_type} if content_type else {})

    def _signature(self, path: str, expires: str, issued: str) -> str:
        message = f"{path}?ex={expires}&is={issued}".encode()
        return hmac.new(self._cdn_key, message, hashlib.sha256).hexdigest()

    async def _cdn(self, request: web.Request) -> web.Response:
        """A file, for the URL the fake signed, until it expires; else a 404, as Discord's
        CDN answers."""
        expires, issued = request.query.get("ex", ""), request.query.get("is", "")
        signature = self._signature(request.path, expires, issued)
        try:
            live = int(expires, 16) > time.time()
        except ValueError:
            live = False
        signed = hmac.compare_digest(request.query.get("hm", ""), signature)
        if not (signed and live and request.path in self._files):
            return web.Response(status=404, text="This content is no longer available.")
        await asyncio.sleep(self.cdn_delay)
        self.downloads.append(request.path)
        data, content_type = self._files[request.path]
        return web.Response(body=data, headers={"Content-Type": content_type})

    # --- interactions ---------------------------------------------------------------------

    async def slash_command(
        self, name: str, channel_id: str, *, user: JSON | None = None
    ) -> FakeInteraction:
        """A user (alice by default) runs /name in a channel. As on Discord, only a command
        registered where the channel can see it: its server's, else a global one (the only
        kind in DMs). LookupError otherwise."""
        channel = self._channel(channel_id)
        guild_id = channel.get("guild_id")
        scopes = [guild_id, None] if guild_id else [None]
        found = [
            (scope, command)
            for scope in scopes
            for command in self.commands.get(scope, [])
            if command["name"] == name and (guild_id or command.get("dm_permission") is not False)
        ]
        if not found:
            raise LookupError(f"/{name} is not registered where channel {channel_id} sees it")
        scope, command = found[0]
        data = {"id": command["id"], "name": name, "type": 1} | (
            {"guild_id": scope} if scope else {}
        )
        return await self._interact(2, data, channel, user or self.alice)

    async def press_button(
        self,
        channel_id: str,
        message_id: str,
        custom_id: str,
        *,
        user: JSON | None = None,
        shown: JSON | None = None,
    ) -> FakeInteraction:
        """A user (alice by default) presses a button of a message as their client shows
        it: as it is now, or `shown`, a copy of it taken earlier (a press sent before an
        edit reached them). LookupError if it has no such button, or it is disabled
        (Discord offers nothing to press)."""
        msg = shown or self._stored(channel_id, message_id)
        buttons = [item for row in msg["components"] for item in row.get("components", [])]
        if not any(b.get("custom_id") == custom_id and not b.get("disabled") for b in buttons):
            raise LookupError(f"message {message_id} has no button {custom_id!r} to press")
        data = {"custom_id": custom_id, "component_type": 2}
        channel = self._channel(channel_id)
        return await self._interact(3, data, channel, user or self.alice, message=dict(msg))

    def buttons(self, channel_id: str, message_id: str) -> list[str]:
        """The custom_ids of a message's buttons, in order."""
        msg = self.message(channel_id, message_id) or {}
        rows = msg.get("components", [])
        return [item["custom_id"] for row in rows for item in row.get("components", [])]

    async def _interact(
        self, kind: int, data: JSON, channel: JSON, user: JSON, **extra: Any
    ) -> FakeInteraction:
        """Record an interaction and send it as INTERACTION_CREATE."""
        payload = {"id": self.snowflake(), "application_id": self.application_id, "type": kind}
        payload.update(data=data, token=f"interaction-{uuid.uuid4().hex}", version=1)
        payload.update(channel_id=channel["id"], channel=channel, locale="en-US", entitlements=[])
        payload.update(app_permissions=str(EVERYONE_PERMISSIONS), attachment_size_limit=25 << 20)
        if guild_id := channel.get("guild_id"):
            member = {**self._member(user), "permissions": str(EVERYONE_PERMISSIONS)}
            payload.update(guild_id=guild_id, guild_locale="en-US", member=member, context=0)
            payload["guild"] = {"id": guild_id, "locale": "en-US", "features": []}
            payload["authorizing_integration_owners"] = {"0": guild_id}
        else:  # the bot's DM
            payload.update(user=user, context=1)
        interaction = FakeInteraction(payload | extra)
        self.interactions[interaction.id] = interaction
        await self.dispatch("INTERACTION_CREATE", interaction.payload)
        return interaction

    async def _interaction_message(
        self, interaction: FakeInteraction, content: str, flags: int, components: Any
    ) -> JSON:
        """A message the app sends in answer: only the user sees an ephemeral one, so it
        goes in no channel's log."""
        payload = interaction.payload
        user = payload["member"]["user"] if "member" in payload else payload["user"]
        metadata = {"id": interaction.id, "type": payload["type"], "user": user}
        extra = dict(
            type=20 if payload["type"] == 2 else 0, flags=flags, components=components or []
        )
        extra.update(webhook_id=self.application_id, application_id=self.application_id)
        extra["interaction_metadata"] = metadata
        if flags & EPHEMERAL:
            return self._new_message(payload["channel_id"], content, self.bot, **extra)
        msg = self._create_message(payload["channel_id"], content, self.bot, **extra)
        if self.echo_bot_messages:
            await self.dispatch("MESSAGE_CREATE", self.event_form(msg))
        return msg

    # --- gateway --------------------------------------------------------------------------

    async def dispatch(self, event: str, data: JSON) -> int | None:
        """Send a DISPATCH (op 0) to the bot; returns its sequence number, or None when the
        session's intents filter it out. Kept for RESUME; sent now if a session is live."""
        data = self._filtered(event, data, self.intents or 0)
        if data is None:
            return None
        self._seq += 1
        payload = {"op": 0, "t": event, "s": self._seq, "d": data}
        self._backlog.append(payload)
        if self._live is not None:
            await self._send(self._live, payload)
        return self._seq

    def _filtered(self, event: str, data: JSON, intents: int) -> JSON | None:
        if event in ("MESSAGE_CREATE", "MESSAGE_UPDATE", "MESSAGE_DELETE"):
            if not intents & (GUILD_MESSAGES if data.get("guild_id") else DIRECT_MESSAGES):
                return None
            if event != "MESSAGE_DELETE":
                return self._redacted(data, intents)
        elif event.startswith(("GUILD_", "CHANNEL_", "THREAD_")) and not intents & GUILDS:
            return None
        return data

    def _redacted(self, msg: JSON, intents: int) -> JSON:
        """Without MESSAGE_CONTENT, content-ish fields are empty, except in DMs, in the
        bot's own messages and in messages that mention it (as on Discord)."""
        if (
            intents & MESSAGE_CONTENT
            or self.channels.get(msg.get("channel_id", ""), {}).get("type") == 1
            or msg.get("author", {}).get("id") == self.bot["id"]
            or any(u["id"] == self.bot["id"] for u in msg.get("mentions", []))
        ):
            return msg
        return {**msg, "content": "", "embeds": [], "attachments": [], "components": []}

    async def close_gateway(self, code: int = 4000, message: str = "") -> None:
        """Close the bot's websocket with a close code. discord.py resumes after most codes;
        4004, 4010-4014 are fatal (4014: PrivilegedIntentsRequired). 4007 and 4009 also
        end the session here, so a RESUME is answered with an invalid session."""
        self._live = None
        if code in (4007, 4009):
            self.session_id = None
        for conn in list(self._conns):
            await conn.ws.close(code=code, message=message.encode())

    def hold_new_sessions(self) -> None:
        """Keep the next IDENTIFY waiting, as while the bot is away (restarting, or cut
        off): what is dispatched meanwhile reaches no session, and a new one never gets it."""
        self._sessions_open.clear()

    def open_new_sessions(self) -> None:
        self._sessions_open.set()

    async def invalidate_session(self, resumable: bool = False) -> None:
        """Send op 9. discord.py closes; resumable=False makes it IDENTIFY anew, on
        DiscordWebSocket.DEFAULT_GATEWAY."""
        if not resumable:
            self.session_id = None
        if conn := self._live:
            self._live = None
            await self._send(conn, op(9, resumable))

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT: discord.py closes and resumes on resume_gateway_url."""
        if conn := self._live:
            self._live = None
            await self._send(conn, op(7))

    async def _send(self, conn: _Conn, payload: JSON) -> None:
        data = json.dumps(payload).encode()
        async with conn.lock:  # compress and send in one order
            if conn.ws.closed:
                return
            self.sent.append(payload)
            try:
                if conn.zlib is None:
                    await conn.ws.send_str(data.decode())
                else:  # one zlib stream per connection, each frame ends with 00 00 ff ff
                    await conn.ws.send_bytes(conn.zlib.compress(data) + conn.zlib.flush(2))
            except (ConnectionError, RuntimeError):
                pass  # closing under us; a RESUME replays dispatches from the backlog

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        zlib_stream = request.query.get("compress") == "zlib-stream"  # else: plain text frames
        conn = _Conn(ws, zlib.compressobj() if zlib_stream else None)
        self._conns.add(conn)
        self.connections.append(str(request.rel_url))
        hello = {"heartbeat_interval": self.heartbeat_interval, "_trace": ["fake-gateway"]}
        await self._send(conn, op(10, hello))
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    payload = json.loads(msg.data)
                    self.received.append(payload)
                    await self._on_op(conn, payload.get("op"), payload.get("d"))
        finally:
            self._conns.discard(conn)
            if self._live is conn:
                self._live = None
        return ws

    async def _on_op(self, conn: _Conn, code: int | None, d: Any) -> None:
        if code == 1:  # HEARTBEAT
            await self._send(conn, op(11))
        elif code in (2, 6) and d.get("token") != self.token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
        elif code == 2:
            await self._identify(conn, d)
        elif code == 6:
            await self._resume(conn, d)
        elif code not in (3, 4, 8):  # presence, voice state, request members: accepted
            await conn.ws.close(code=4001, message=b"Unknown opcode.")

    async def _identify(self, conn: _Conn, d: JSON) -> None:
        await asyncio.wait_for(self._sessions_open.wait(), timeout=30)
        intents = d.get("intents", 0)
        if intents & PRIVILEGED & ~self.privileged_intents:
            await conn.ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        self.identifies += 1
        self.intents, self.session_id = intents, uuid.uuid4().hex
        self._seq, self._backlog, self._live = 0, [], conn
        application = {"id": self.application_id, "flags": self._application_flags()}
        ready = {"v": 10, "user": self.bot, "session_id": self.session_id}
        ready.update(resume_gateway_url=self.resume_gateway_url, application=application)
        guilds = [{"id": guild_id, "unavailable": True} for guild_id in self.guilds]
        ready.update(guilds=guilds, private_channels=[])
        ready.update(session_type="normal", user_settings={}, relationships=[], presences=[])
        await self.dispatch("READY", ready)
        for guild_id in self.guilds:
            await self.dispatch("GUILD_CREATE", self.guild_payload(guild_id))

    async def join_guild(self, guild_id: str, name: str = "Another Guild") -> None:
        """The bot is added to a server: GUILD_CREATE, with no `unavailable` (a new join)."""
        self.guilds[guild_id] = name
        payload = self.guild_payload(guild_id)
        del payload["unavailable"]
        await self.dispatch("GUILD_CREATE", payload)

    async def _resume(self, conn: _Conn, d: JSON) -> None:
        if d.get("session_id") != self.session_id or self.session_id is None:
            await self._send(conn, op(9, False))
            return
        self.resumes += 1
        seq, i = d.get("seq") or 0, 0
        while i < len(self._backlog):  # dispatches made meanwhile are caught up too
            if self._backlog[i]["s"] > seq:
                await self._send(conn, self._backlog[i])
            i += 1
        self._live = conn
        await self.dispatch("RESUMED", {"_trace": ["fake-gateway"]})

    def _application_flags(self) -> int:
        # GATEWAY_PRESENCE_LIMITED, GATEWAY_GUILD_MEMBERS_LIMITED, GATEWAY_MESSAGE_CONTENT_LIMITED
        pairs = ((GUILD_PRESENCES, 1 << 13), (GUILD_MEMBERS, 1 << 15), (MESSAGE_CONTENT, 1 << 19))
        return sum(flag for intent, flag in pairs if self.privileged_intents & intent)

    # --- REST -----------------------------------------------------------------------------

    @staticmethod
    def _json(
        status: int, body: Any, headers: JSON | None = None, via: bool = True
    ) -> web.Response:
        # discord.py parses JSON only when Content-Type is exactly application/json; Discord's
        # load balancer adds Via to every answer, and discord.py retries a 429 only with it
        headers = {**(headers or {}), "Content-Type": "application/json"}
        headers.update({"Via": "1.1 google"} if via else {})
        return web.Response(status=status, body=json.dumps(body).encode(), headers=headers)

    async def _rest(self, request: web.Request) -> web.Response:
        body, files = None, []
        if request.content_type == "application/json":
            body = await request.json()
        elif request.content_type.startswith("multipart/"):
            async for part in await request.multipart():
                if not isinstance(part, aiohttp.BodyPartReader):
                    continue
                if part.name == "payload_json":
                    body = json.loads(await part.text())
                else:
                    size = len(await part.read())
                    files.append({"name": part.name, "filename": part.filename, "size": size})
        path = "/" + request.match_info["path"]
        req = Request(request.method, path, dict(request.query), body, dict(request.headers), files)
        self.requests.append(req)
        # An interaction's callback and webhook are authorised by its token, in the path.
        by_token = path.startswith(("/interactions/", "/webhooks/"))
        if not by_token and request.headers.get("Authorization") != f"Bot {self.token}":
            req.status = 401
            return self._json(401, {"message": "401: Unauthorized", "code": 0})
        if (broken := self._broken(req)) is not None and (status := broken[3]) is not None:
            req.status = status
            return self._json(status, {"message": f"{status}: Service Unavailable", "code": 0})
        if broken is not None:
            req.status = 0  # no answer
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)  # never reaches the client
        if limited := self._rate_limited(req):
            req.status = 429
            return limited
        for method, pattern, handler in self._routes():
            if method == req.method and (match := re.fullmatch(pattern, path)):
                try:
                    req.status, result = await handler(req, *match.groups())
                except ApiError as exc:
                    req.status, result = exc.status, exc.body
                if req.status == 204:
                    return web.Response(status=204)
                headers = self._bucket_headers(f"{method} {pattern}", 4, 1.0)
                return self._json(req.status, result, headers)
        req.status = 404
        return self._json(404, {"message": "404: Not Found", "code": 0})

    def _routes(self) -> list[tuple[str, str, Callable[..., Any]]]:
        ch, msg = r"/channels/(\d+)", r"/channels/(\d+)/messages/(\d+)"
        cmds = r"/applications/\d+(?:/guilds/(\d+))?/commands"
        hook = r"/webhooks/(\d+)/([^/]+)"
        return [
            ("GET", "/users/@me", self._get_me),
            ("GET", "/gateway/bot", self._gateway_bot),
            ("GET", "/oauth2/applications/@me", self._app_info),
            ("GET", "/applications/@me", self._app_info),
            ("GET", cmds, self._get_commands),
            ("PUT", cmds, self._put_commands),
            ("POST", r"/interactions/(\d+)/([^/]+)/callback", self._interaction_callback),
            ("PATCH", hook + "/messages/@original", self._edit_original),
            ("POST", hook, self._followup),
            ("POST", "/users/@me/channels", self._create_dm),
            ("GET", r"/guilds/(\d+)/members/(\d+)", self._get_member),
            ("GET", ch, self._get_channel),
            ("PATCH", ch, self._edit_channel),
            ("POST", ch + "/typing", self._typing),
            ("GET", ch + "/messages", self._history),
            ("POST", ch + "/messages", self._post_message),
            ("GET", msg, self._get_message),
            ("PATCH", msg, self._edit_message),
            ("DELETE", msg, self._delete_message),
            ("POST", msg + "/threads", self._post_thread),
        ]

    async def _get_me(self, req: Request) -> tuple[int, Any]:
        return 200, {**self.bot, "verified": True, "mfa_enabled": False, "flags": 0}

    async def _gateway_bot(self, req: Request) -> tuple[int, Any]:
        limit = {"total": 1000, "remaining": 1000 - self.identifies, "max_concurrency": 1}
        limit["reset_after"] = 86_400_000
        return 200, {"url": self.gateway_url, "shards": 1, "session_start_limit": limit}

    async def _app_info(self, req: Request) -> tuple[int, Any]:
        app = {"id": self.application_id, "name": "threadbot", "icon": None, "description": ""}
        app.update(bot_public=True, bot_require_code_grant=False, verify_key="0" * 64)
        app.update(owner=self.alice, team=None, flags=self._application_flags(), bot=self.bot)
        return 200, {**app, "interactions_endpoint_url": None, "redirect_uris": []}

    async def _get_commands(self, req: Request, guild_id: str | None) -> tuple[int, Any]:
        return 200, self.commands.get(guild_id, [])

    async def _put_commands(self, req: Request, guild_id: str | None) -> tuple[int, Any]:
        """Bulk overwrite: the list becomes exactly these; a name kept keeps its id."""
        if guild_id is not None and guild_id not in self.guilds:
            raise ApiError(403, 50001, "Missing Access")
        commands, problems = req.json, {}
        if not isinstance(commands, list) or len(commands) > 100:
            raise ApiError(400, 50035, "Invalid Form Body", {"_errors": [{"code": "LIST"}]})
        names = [command.get("name") for command in commands]
        for index, command in enumerate(commands):
            name, description = command.get("name"), command.get("description")
            if (
                not isinstance(name, str)
                or not COMMAND_NAME.fullmatch(name)
                or names.count(name) > 1
            ):
                problems[str(index)] = {"name": {"_errors": [{"code": "APPLICATION_COMMAND_NAME"}]}}
            elif command.get("type", 1) == 1 and not (
                isinstance(description, str) and 1 <= len(description) <= 100
            ):
                problems[str(index)] = {
                    "description": {"_errors": [{"code": "BASE_TYPE_BAD_LENGTH"}]}
                }
        if problems:
            raise ApiError(400, 50035, "Invalid Form Body", problems)
        ids = {command["name"]: command["id"] for command in self.commands.get(guild_id, [])}
        scope = {"guild_id": guild_id} if guild_id else {}
        self.commands[guild_id] = [
            {**command, "type": command.get("type", 1), "application_id": self.application_id}
            | {"id": ids.get(command["name"]) or self.snowflake(), "version": self.snowflake()}
            | scope
            for command in commands
        ]
        return 200, self.commands[guild_id]

    def _interaction_by_token(self, application_id: str, token: str) -> FakeInteraction:
        """The interaction whose webhook this is, while its token lasts (15 minutes)."""
        for interaction in self.interactions.values():
            if (
                interaction.payload["token"] == token
                and application_id == self.application_id
                and time.monotonic() - interaction.at <= TOKEN_LIFETIME_S
            ):
                return interaction
        raise ApiError(404, 10015, "Unknown Webhook")

    async def _interaction_callback(
        self, req: Request, interaction_id: str, token: str
    ) -> tuple[int, Any]:
        """The one answer an interaction gets, within 3 s; `with_response` returns what it
        did (an InteractionCallbackResponse), else 204."""
        interaction = self.interactions.get(interaction_id)
        if (
            interaction is None
            or interaction.payload["token"] != token
            or time.monotonic() - interaction.at > ACK_WINDOW_S
        ):
            raise ApiError(404, 10062, "Unknown interaction")
        if interaction.callback is not None:
            raise ApiError(400, 40060, "Interaction has already been acknowledged.")
        body = req.json or {}
        kind, data = body.get("type"), body.get("data") or {}
        if kind not in CALLBACK_TYPES.get(interaction.payload["type"], set()):
            error = {"code": "INTERACTION_RESPONSE_TYPE_INVALID", "message": "Invalid type"}
            raise ApiError(400, 50035, "Invalid Form Body", {"type": {"_errors": [error]}})
        if kind in (4, 7):
            self._check_content(data.get("content"))
            self._check_components(data.get("components"))
        if kind == 4 and not (data.get("content") or data.get("embeds") or data.get("components")):
            raise ApiError(400, 50006, "Cannot send an empty message")
        interaction.callback = body
        message = None
        if kind in (4, 5):
            flags = (data.get("flags") or 0) & EPHEMERAL | (LOADING if kind == 5 else 0)
            content = data.get("content") or "" if kind == 4 else ""
            message = await self._interaction_message(
                interaction, content, flags, data.get("components")
            )
        elif kind in (6, 7):  # a component's message: later edits of @original go to it
            pressed = interaction.payload["message"]
            message = self._stored(pressed["channel_id"], pressed["id"])
            if kind == 7:
                await self._update_message(message, data)
        interaction.original = message
        if req.query.get("with_response") not in ("1", "true", "True"):
            return 204, None
        answered = {"id": interaction.id, "type": interaction.payload["type"]}
        resource: JSON = {"type": kind}
        if message is not None and kind != 6:
            answered.update(response_message_id=message["id"], response_message_loading=kind == 5)
            answered["response_message_ephemeral"] = bool(message["flags"] & EPHEMERAL)
            resource["message"] = message
        return 200, {"interaction": answered, "resource": resource}

    async def _edit_original(
        self, req: Request, application_id: str, token: str
    ) -> tuple[int, Any]:
        interaction = self._interaction_by_token(application_id, token)
        if interaction.original is None:
            raise ApiError(404, 10008, "Unknown Message")
        body = req.json or {}
        self._check_content(body.get("content"))
        self._check_components(body.get("components"))
        await self._update_message(interaction.original, body)
        return 200, interaction.original

    async def _followup(self, req: Request, application_id: str, token: str) -> tuple[int, Any]:
        interaction = self._interaction_by_token(application_id, token)
        if interaction.callback is None:  # the webhook exists once the interaction is answered
            raise ApiError(404, 10015, "Unknown Webhook")
        body = req.json or {}
        content = body.get("content") or ""
        self._check_content(content)
        self._check_components(body.get("components"))
        if not (content or body.get("embeds") or body.get("components")):
            raise ApiError(400, 50006, "Cannot send an empty message")
        flags = (body.get("flags") or 0) & EPHEMERAL
        message = await self._interaction_message(
            interaction, content, flags, body.get("components")
        )
        interaction.followups.append(message)
        return (200, message) if req.query.get("wait") in ("1", "true", "True") else (204, None)

    async def _create_dm(self, req: Request) -> tuple[int, Any]:
        user_id = str((req.json or {}).get("recipient_id"))
        if user_id not in self.users:
            raise ApiError(400, 50007, "Cannot send messages to this user")
        return 200, self.dm_channel(user_id)

    def _channel(self, channel_id: str) -> JSON:
        if channel_id not in self.channels:
            raise ApiError(404, 10003, "Unknown Channel")
        return self.channels[channel_id]

    def _stored(self, channel_id: str, message_id: str) -> JSON:
        self._channel(channel_id)
        if (msg := self.message(channel_id, message_id)) is None:
            raise ApiError(404, 10008, "Unknown Message")
        return msg

    def _rest_form(self, msg: JSON) -> JSON:
        # REST redacts content by the app's portal setting, not by the session's intents
        return self._redacted(msg, self.privileged_intents)

    def _is_member(self, guild_id: str, user_id: str) -> bool:
        in_guilds = self.member_of.get(user_id, self.guilds)
        return guild_id in self.guilds and user_id in self.users and guild_id in in_guilds

    async def _get_member(self, req: Request, guild_id: str, user_id: str) -> tuple[int, Any]:
        await asyncio.sleep(self.member_lookup_delay)
        if not self._is_member(guild_id, user_id):
            raise ApiError(404, 10007, "Unknown Member")
        return 200, self._member(self.users[user_id])

    async def _get_channel(self, req: Request, channel_id: str) -> tuple[int, Any]:
        return 200, self._channel(channel_id)

    async def archive(self, thread_id: str, *, locked: bool = False) -> None:
        """As Discord does to a thread idle past its auto-archive duration (or a moderator):
        its messages can be neither edited nor deleted until it is unarchived (a message
        sent into it unarchives it, unless it is locked). THREAD_UPDATE tells the bot,
        whose cache then drops it (as a new session's GUILD_CREATE leaves it out)."""
        thread = self.channels[thread_id]
        thread["thread_metadata"].update(archived=True, locked=locked)
        await self.dispatch("THREAD_UPDATE", dict(thread))

    async def _edit_channel(self, req: Request, channel_id: str) -> tuple[int, Any]:
        """Modify Channel, for a thread's `archived` alone: unarchiving takes no more than
        sending messages there, unless the thread is locked."""
        channel, body = self._channel(channel_id), req.json or {}
        meta = channel.get("thread_metadata")
        if meta is None or set(body) != {"archived"}:
            raise ApiError(400, 50035, "Invalid Form Body")
        if meta["locked"]:
            raise ApiError(403, 50013, "Missing Permissions")
        meta["archived"] = bool(body["archived"])
        return 200, channel

    def _writable(self, channel_id: str) -> None:
        """Edits and deletions in an archived thread are refused (Discord: 50083)."""
        meta = self._channel(channel_id).get("thread_metadata")
        if meta and meta["archived"]:
            raise ApiError(400, 50083, "Thread is archived")

    async def _typing(self, req: Request, channel_id: str) -> tuple[int, Any]:
        """Refused in an archived thread, as an edit is: only a message unarchives it."""
        self._writable(channel_id)
        return 204, None

    async def _history(self, req: Request, channel_id: str) -> tuple[int, Any]:
        """Newest first; limit (1-100, default 50), before, after (the ones right after)."""
        self.history_asked += 1
        await asyncio.sleep(self.history_delay)
        self._channel(channel_id)
        log, q = self.messages.get(channel_id, []), req.query
        limit = max(1, min(100, int(q.get("limit", 50))))
        if "after" in q:
            found = [m for m in log if int(m["id"]) > int(q["after"])][:limit]
        else:
            before = int(q.get("before", 1 << 63))
            found = [m for m in log if int(m["id"]) < before][-limit:]
        return 200, [self._rest_form(m) for m in reversed(found)]

    async def _get_message(self, req: Request, channel_id: str, message_id: str) -> tuple[int, Any]:
        await asyncio.sleep(self.fetch_delay)
        return 200, self._rest_form(self._stored(channel_id, message_id))

    @staticmethod
    def _check_components(components: Any) -> None:
        """Action rows (at most 5) of buttons (at most 5 a row), as Discord checks them: a
        custom_id (unique, at most 100 characters) on every button but links, labels of at
        most 80 characters. Other components are not part of the fake."""
        if components is None:
            return
        rows = components if isinstance(components, list) else [None]
        items = [
            item for row in rows if isinstance(row, dict) for item in row.get("components", [])
        ]
        custom_ids = [item.get("custom_id") for item in items if item.get("style") != 5]
        valid = (
            len(rows) <= 5
            and all(
                isinstance(row, dict) and row.get("type") == 1
                and 1 <= len(row.get("components", [])) <= 5
                for row in rows
            )
            and all(item.get("type") == 2 and len(item.get("label") or "") <= 80 for item in items)
            and all(isinstance(c, str) and 1 <= len(c) <= 100 for c in custom_ids)
            and len(set(custom_ids)) == len(custom_ids)
        )  # fmt: skip
        if not valid:
            error = {"code": "COMPONENT_INVALID", "message": "Invalid components"}
            raise ApiError(400, 50035, "Invalid Form Body", {"components": {"_errors": [error]}})

    @staticmethod
    def _check_content(content: Any) -> None:
        if isinstance(content, str) and len(content) > MAX_CONTENT:
            error = {"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length."}
            raise ApiError(400, 50035, "Invalid Form Body", {"content": {"_errors": [error]}})

    async def _post_message(self, req: Request, channel_id: str) -> tuple[int, Any]:
        channel, body = self._channel(channel_id), req.json or {}
        if (meta := channel.get("thread_metadata")) and meta["archived"]:
            if meta["locked"]:
                raise ApiError(400, 50083, "Thread is archived")
            meta["archived"] = False  # a message sent into it unarchives it
        nonce, content = body.get("nonce"), body.get("content") or ""
        if body.get("enforce_nonce") and nonce is not None and nonce in self._nonces:
            at, old_channel, old_id = self._nonces[nonce]
            old = self.message(old_channel, old_id)
            if old and time.monotonic() - at < NONCE_WINDOW_S:
                return 200, old
        if not (content or body.get("embeds") or req.files or body.get("sticker_ids")):
            raise ApiError(400, 50006, "Cannot send an empty message")
        self._check_content(content)
        self._check_components(body.get("components"))
        extra: JSON = {"tts": bool(body.get("tts")), "embeds": body.get("embeds") or []}
        extra["components"] = body.get("components") or []
        if nonce is not None:
            extra["nonce"] = nonce
        if ref := body.get("message_reference"):
            target = self.message(str(ref.get("channel_id") or channel_id), str(ref["message_id"]))
            if target is None and ref.get("fail_if_not_exists", True):
                error = {"code": "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "message": "Unknown message"}
                errors = {"message_reference": {"_errors": [error]}}
                raise ApiError(400, 50035, "Invalid Form Body", errors)
            if target is not None:
                reference = dict(type=0, channel_id=target["channel_id"], message_id=target["id"])
                extra["message_reference"] = reference | {"guild_id": channel.get("guild_id")}
                # Nested one level only: the message replied to, without its own (Discord
                # sends no key there; a null would say that one was deleted).
                replied = {k: v for k, v in target.items() if k != "referenced_message"}
                extra.update(type=19, referenced_message=replied)
        urls = [f"{self.api_url}/attachments/{f['filename']}" for f in req.files]
        extra["attachments"] = [
            dict(id=self.snowflake(), filename=f["filename"], size=f["size"], url=u, proxy_url=u)
            for f, u in zip(req.files, urls, strict=True)
        ]
        msg = self._create_message(channel_id, content, self.bot, **extra)
        if nonce is not None and body.get("enforce_nonce"):
            self._nonces[nonce] = (time.monotonic(), channel_id, msg["id"])
        if self.echo_bot_messages:
            await self.dispatch("MESSAGE_CREATE", self.event_form(msg))
        return 200, msg

    async def _edit_message(self, req: Request, channel_id: str, msg_id: str) -> tuple[int, Any]:
        msg, body = self._stored(channel_id, msg_id), req.json or {}
        self._writable(channel_id)
        if msg["author"]["id"] != self.bot["id"]:
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
        self._check_content(body.get("content"))
        self._check_components(body.get("components"))
        await self._update_message(msg, body)
        return 200, msg

    async def _update_message(self, msg: JSON, body: JSON) -> None:
        """Apply an edit (content, embeds, components, flags) to a message; a deferred
        response stops loading. A message in a channel's log is dispatched as updated."""
        if "content" in body:
            msg["content"] = body["content"] or ""
        for key in ("embeds", "components"):
            if body.get(key) is not None:
                msg[key] = body[key]
        # An edit cannot make a message ephemeral or not; it ends a deferred one's loading.
        flags = msg["flags"] if body.get("flags") is None else body["flags"]
        msg["flags"] = flags & ~(EPHEMERAL | LOADING) | msg["flags"] & EPHEMERAL
        msg["edited_timestamp"] = now_iso()
        logged = any(m is msg for m in self.messages.get(msg["channel_id"], []))
        if logged and self.echo_bot_messages:
            await self.dispatch("MESSAGE_UPDATE", self.event_form(msg))

    async def _delete_message(self, req: Request, channel_id: str, msg_id: str) -> tuple[int, Any]:
        msg = self._stored(channel_id, msg_id)
        if msg["author"]["id"] != self.bot["id"]:  # the fake grants no Manage Messages
            raise ApiError(403, 50013, "Missing Permissions")
        self._writable(channel_id)
        self.messages[channel_id].remove(msg)
        deleted = {"id": msg_id, "channel_id": channel_id}
        if guild_id := self.channels[channel_id].get("guild_id"):
            deleted["guild_id"] = guild_id
        await self.dispatch("MESSAGE_DELETE", deleted)
        return 204, None

    async def _post_thread(self, req: Request, channel_id: str, message_id: str) -> tuple[int, Any]:
        body = req.json or {}
        self._channel(channel_id)
        duration = body.get("auto_archive_duration") or 1440
        thread = self.start_thread(channel_id, message_id, body.get("name") or "thread", duration)
        return 201, await thread
