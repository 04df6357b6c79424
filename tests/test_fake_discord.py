"""The fake Discord, driven by the real discord.py (no threadbot code)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import aiohttp
import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route
from fake_discord import FakeDiscord

pytestmark = pytest.mark.timeout(30)

INTENTS = discord.Intents(guilds=True, guild_messages=True, dm_messages=True, message_content=True)
REAL_BASE, REAL_GATEWAY = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY


@dataclass
class Bot:
    client: discord.Client
    inbox: asyncio.Queue[discord.Message] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None

    def connect(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self.client.connect(reconnect=True))
        return self.task

    async def ready(self) -> None:
        await asyncio.wait_for(self.client.wait_until_ready(), 5)

    async def next_message(self) -> discord.Message:
        return await asyncio.wait_for(self.inbox.get(), 5)


@pytest.fixture(autouse=True)
def _discord_urls_restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    yield
    monkeypatch.undo()  # what the test pointed at the fake goes back first
    assert (Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY) == (REAL_BASE, REAL_GATEWAY)


@pytest.fixture
async def discord_fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as fake:
        yield fake


@pytest.fixture
def intents() -> discord.Intents:
    return INTENTS


@pytest.fixture
async def bot(
    discord_fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch, intents: discord.Intents
) -> AsyncIterator[Bot]:
    """A logged-in discord.Client pointed at the fake; tests call bot.connect()."""
    monkeypatch.setattr(Route, "BASE", discord_fake.api_url)
    # guild_ready_timeout: on_ready comes this long after the last GUILD_CREATE (default 2 s)
    bot = Bot(discord.Client(intents=intents, guild_ready_timeout=0.05))

    @bot.client.event
    async def on_message(message: discord.Message) -> None:
        bot.inbox.put_nowait(message)

    await bot.client.login(discord_fake.token)
    _shards, url, _limits = await bot.client.http.get_bot_gateway()  # as the app does
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(url))
    try:
        yield bot
    finally:
        await bot.client.close()
        if bot.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(bot.task, 5)


async def test_connects_and_resolves_guild(bot: Bot, discord_fake: FakeDiscord) -> None:
    bot.connect()
    await bot.ready()
    client = bot.client
    me = int(discord_fake.bot["id"])
    assert client.user is not None and client.user.id == me and client.user.bot
    assert client.application_id == 999
    guild = client.get_guild(2000)
    assert guild is not None and guild.me.id == me and guild.default_role.id == 2000
    channel = client.get_channel(3000)
    assert isinstance(channel, discord.TextChannel) and channel.name == "general"
    assert channel.permissions_for(guild.me).send_messages
    assert discord_fake.identifies == 1 and discord_fake.intents == INTENTS.value
    assert discord_fake.connections == ["/gateway?v=10&encoding=json&compress=zlib-stream"]
    started = [(r.method, r.path) for r in discord_fake.requests]
    assert started == [
        ("GET", "/users/@me"),
        ("GET", "/oauth2/applications/@me"),
        ("GET", "/gateway/bot"),
    ]
    assert discord_fake.received[0]["op"] == 1  # discord.py heartbeats right after HELLO
    assert any(p["op"] == 11 for p in discord_fake.sent)


async def test_zlib_stream_frames(discord_fake: FakeDiscord) -> None:
    url = discord_fake.gateway_url + "?v=10&encoding=json&compress=zlib-stream"
    inflate = zlib.decompressobj()
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        hello = await ws.receive_bytes(timeout=5)
        assert hello.endswith(b"\x00\x00\xff\xff")
        assert b'"op": 10' in inflate.decompress(hello)
        await ws.send_json({"op": 1, "d": None})
        ack = await ws.receive_bytes(timeout=5)  # same stream: needs the earlier context
        assert b'"op": 11' in inflate.decompress(ack)
        await ws.send_json({"op": 2, "d": {"token": "wrong", "intents": 0}})
        assert (await ws.receive(timeout=5)).type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4004


async def test_message_reply_thread_edit(bot: Bot, discord_fake: FakeDiscord) -> None:
    replied: asyncio.Future[discord.Message] = asyncio.get_running_loop().create_future()

    @bot.client.event
    async def on_message(message: discord.Message) -> None:
        if message.author == bot.client.user:
            return
        bot.inbox.put_nowait(message)
        if replied.done():
            return  # replies once, to the first message from someone else
        try:
            reply = await message.channel.send(
                "hi alice",
                allowed_mentions=discord.AllowedMentions.none(),
                nonce="n-1",
                reference=message,
                mention_author=False,
            )
            replied.set_result(reply)
        except Exception as exc:
            replied.set_exception(exc)

    bot.connect()
    await discord_fake.wait_identified()
    event = discord_fake.user_message(discord_fake.channel_id, "hello", mentions_bot=True)
    await discord_fake.dispatch("MESSAGE_CREATE", event)
    incoming = await bot.next_message()
    assert incoming.content == f"<@{discord_fake.bot['id']}> hello" and incoming.guild is not None
    assert isinstance(incoming.author, discord.Member) and incoming.author.name == "alice"
    assert bot.client.user in incoming.mentions and incoming.channel.id == 3000

    reply = await asyncio.wait_for(replied, 5)
    [post] = discord_fake.requests_to("POST", r"/channels/3000/messages")
    assert post.json["content"] == "hi alice" and post.json["nonce"] == "n-1"
    assert post.json["enforce_nonce"] is True
    assert post.json["allowed_mentions"] == {"parse": [], "replied_user": False}
    assert post.json["message_reference"]["message_id"] == incoming.id
    assert reply.author.id == int(discord_fake.bot["id"])
    assert reply.reference.message_id == incoming.id
    assert reply.type is discord.MessageType.reply

    again = await incoming.channel.send("hi alice", nonce="n-1")  # same nonce: same message
    assert again.id == reply.id and len(discord_fake.messages["3000"]) == 2
    # A reply to a reply carries the one it replies to, one level deep: that one's own is
    # left out (unknown, to be fetched), not null, which would say it was deleted.
    chained = await incoming.channel.send("and more", reference=reply)
    assert isinstance(parent := chained.reference.resolved, discord.Message)
    assert parent.id == reply.id and parent.reference.message_id == incoming.id
    assert parent.reference.resolved is None
    await chained.delete()

    thread = await incoming.create_thread(name="chat with alice")
    assert (thread.id, thread.parent_id, thread.name) == (incoming.id, 3000, "chat with alice")
    await discord_fake.wait_for(lambda: bot.client.get_channel(thread.id))  # THREAD_CREATE
    async with thread.typing():
        in_thread = await thread.send("streaming…")
    edited = await in_thread.edit(content="streamed!")
    assert edited.content == "streamed!" and edited.edited_at is not None
    assert discord_fake.message(str(thread.id), str(in_thread.id))["content"] == "streamed!"
    [patch] = discord_fake.requests_to("PATCH", rf"/channels/{thread.id}/messages/\d+")
    assert patch.json["content"] == "streamed!"
    assert discord_fake.requests_to("POST", rf"/channels/{thread.id}/typing")

    await discord_fake.dispatch(
        "MESSAGE_CREATE", discord_fake.thread_message(str(thread.id), "and then?")
    )
    follow_up = await bot.next_message()
    assert follow_up.channel == thread and follow_up.content == "and then?"
    history = [m async for m in thread.history(limit=10)]
    assert [m.content for m in history] == ["and then?", "streamed!", ""]
    opener = history[-1]  # the thread's starter message: it carries the one it was made from
    assert opener.type is discord.MessageType.thread_starter_message
    assert opener.reference is not None and isinstance(opener.reference.resolved, discord.Message)
    assert opener.reference.resolved.content == f"<@{discord_fake.bot['id']}> hello"
    older = [m.content async for m in thread.history(before=follow_up)]
    assert older == ["streamed!", ""]
    fetched = await incoming.channel.fetch_message(incoming.id)
    assert fetched.content == f"<@{discord_fake.bot['id']}> hello"


async def test_dms_webhooks_and_other_bots(bot: Bot, discord_fake: FakeDiscord) -> None:
    bot.connect()
    await discord_fake.wait_identified()
    await discord_fake.dispatch("MESSAGE_CREATE", discord_fake.dm_message("psst"))
    dm = await bot.next_message()
    assert dm.guild is None and isinstance(dm.channel, discord.DMChannel) and dm.content == "psst"
    await dm.channel.send("hi in private")
    await dm.channel.send("the log", file=discord.File(io.BytesIO(b"abc"), "log.txt"))
    [*_, upload] = discord_fake.requests_to("POST", rf"/channels/{dm.channel.id}/messages")
    assert upload.json["content"] == "the log" and upload.files[0]["filename"] == "log.txt"
    channel = await dm.author.create_dm()  # POST /users/@me/channels
    assert channel.id == dm.channel.id

    hook = discord_fake.webhook_message(discord_fake.channel_id, "deploy done")
    await discord_fake.dispatch("MESSAGE_CREATE", hook)
    other = discord_fake.bot_authored_message(discord_fake.channel_id, "beep")
    await discord_fake.dispatch("MESSAGE_CREATE", other)
    got = [await bot.next_message() for _ in range(4)]  # the bot's own DM replies come first
    assert got[0].author == bot.client.user and got[0].content == "hi in private"
    assert got[1].attachments[0].filename == "log.txt" and got[1].attachments[0].size == 3
    assert got[2].webhook_id is not None and got[2].content == "deploy done"
    assert got[3].author.bot and got[3].author.id == 1002


async def test_bad_token(discord_fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Route, "BASE", discord_fake.api_url)
    client = discord.Client(intents=INTENTS)
    try:
        with pytest.raises(discord.LoginFailure):
            await client.login("not-the-token")
    finally:
        await client.close()
    assert discord_fake.requests[0].status == 401


async def test_rate_limits_and_errors(bot: Bot, discord_fake: FakeDiscord) -> None:
    bot.connect()
    await bot.ready()
    discord_fake.rate_limit("POST", r"/channels/3000/messages", count=1, retry_after=0.1)
    channel = bot.client.get_channel(3000)
    assert isinstance(channel, discord.TextChannel)
    sent = await asyncio.wait_for(channel.send("hello"), 5)
    posts = discord_fake.requests_to("POST", r"/channels/3000/messages")
    assert [p.status for p in posts] == [429, 200]
    assert posts[1].at - posts[0].at >= 0.1
    assert [m["id"] for m in discord_fake.messages["3000"]] == [str(sent.id)]

    discord_fake.rate_limit("POST", r"/channels/3000/messages", via=False)  # Cloudflare-style
    with pytest.raises(discord.HTTPException) as err:
        await channel.send("again")
    assert err.value.status == 429

    with pytest.raises(discord.HTTPException) as err:
        await channel.send("x" * 2001)
    assert (err.value.status, err.value.code) == (400, 50035)
    with pytest.raises(discord.NotFound):
        await channel.fetch_message(12345)


async def test_close_4000_resumes(bot: Bot, discord_fake: FakeDiscord) -> None:
    bot.connect()
    await bot.ready()
    await discord_fake.close_gateway(4000)
    # dispatched while the bot is away: replayed on RESUME, before RESUMED
    missed = discord_fake.user_message(discord_fake.channel_id, "missed")
    seq = await discord_fake.dispatch("MESSAGE_CREATE", missed)
    await discord_fake.wait_resumed()
    assert (await bot.next_message()).content == "missed"
    [resume] = [p for p in discord_fake.received if p["op"] == 6]
    assert resume["d"]["seq"] == 2 and resume["d"]["session_id"] == discord_fake.session_id
    events = [(p["t"], p["s"]) for p in discord_fake.sent if p["op"] == 0]
    assert events[-2:] == [("MESSAGE_CREATE", seq), ("RESUMED", seq + 1)]
    await discord_fake.dispatch(
        "MESSAGE_CREATE", discord_fake.user_message(discord_fake.channel_id, "after")
    )
    assert (await bot.next_message()).content == "after"
    assert (discord_fake.identifies, discord_fake.resumes) == (1, 1)
    assert discord_fake.connections[1].startswith("/gateway-resume?v=10")  # resume_gateway_url


async def test_invalid_session_reidentifies(bot: Bot, discord_fake: FakeDiscord) -> None:
    async def no_wait(shard_id: int | None, *, initial: bool = False) -> None:
        pass  # discord.py's default sleeps 5 s before every IDENTIFY but the first

    bot.client.before_identify_hook = no_wait  # type: ignore[method-assign]
    bot.connect()
    await discord_fake.wait_identified()
    await discord_fake.invalidate_session(resumable=False)
    await discord_fake.wait_identified(2)
    assert discord_fake.connections[1].startswith("/gateway?")  # back to DEFAULT_GATEWAY
    await discord_fake.request_reconnect()  # op 7: resumes
    await discord_fake.wait_resumed()
    await discord_fake.dispatch(
        "MESSAGE_CREATE", discord_fake.user_message(discord_fake.channel_id, "still here")
    )
    assert (await bot.next_message()).content == "still here"
    assert discord_fake.connections[2].startswith("/gateway-resume?")


@pytest.mark.parametrize("how", ["portal", "close"])
async def test_4014_raises_privileged_intents_required(
    bot: Bot, discord_fake: FakeDiscord, how: str
) -> None:
    if how == "portal":  # message content intent not enabled in the developer portal
        discord_fake.privileged_intents = 0
    task = bot.connect()
    if how == "close":
        await discord_fake.wait_identified()
        await discord_fake.close_gateway(4014)
    with pytest.raises(discord.PrivilegedIntentsRequired):
        await asyncio.wait_for(task, 5)


@pytest.mark.parametrize("intents", [discord.Intents(guilds=True, guild_messages=True)])
async def test_without_message_content_intent(bot: Bot, discord_fake: FakeDiscord) -> None:
    bot.connect()
    await discord_fake.wait_identified()
    for text, mention in (("plain", False), ("hey", True)):
        event = discord_fake.user_message(discord_fake.channel_id, text, mentions_bot=mention)
        await discord_fake.dispatch("MESSAGE_CREATE", event)
    assert (await bot.next_message()).content == ""  # as on Discord: content is redacted...
    mentioned = f"<@{discord_fake.bot['id']}> hey"
    assert (await bot.next_message()).content == mentioned  # ...unless the bot is mentioned
    assert await discord_fake.dispatch("MESSAGE_CREATE", discord_fake.dm_message("x")) is None
