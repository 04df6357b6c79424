"""Discord's own features, end to end: slash commands, Stop and Regenerate buttons, and
typing while an answer waits. The real discord.py against the fake Discord, on the real
service, queue and Redis.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, get_args

import discord
import pytest
from conftest import GatedBatcher, ScriptedBatcher, running
from discord.gateway import DiscordWebSocket
from fake_discord import EPHEMERAL, LOADING, FakeDiscord, FakeInteraction, make_user
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from test_discord_adapter import (
    EDITS_AT_TEST_PACE,
    bot_messages,
    final_reply,
    mention,
    ready,
    settings_for,
)
from test_service import nothing_pending, until

from adapters import discord_adapter, discord_channel
from adapters.discord_adapter import DiscordAdapter, gateway_intents
from adapters.discord_buttons import REGENERATE_REFUSED, STOP_REFUSED, Asker
from adapters.discord_channel import DiscordChannel
from adapters.discord_commands import DESCRIPTIONS, thread_only
from bot import replies
from bot.config import Access
from bot.service import ChatService
from bot.types import Command, ConversationKey
from storage import keys
from storage.locks import ConversationLocks

JSON = dict[str, Any]
STORY = "Once upon a time, in a land far away, there lived a bot that wrote long stories."


@dataclass
class Bot:
    fake: FakeDiscord
    adapter: DiscordAdapter
    service: ChatService
    batcher: Any

    async def history(
        self, key: ConversationKey, until: Callable[[list[JSON]], bool] = bool
    ) -> list[JSON]:
        """The conversation's stored messages once `until` holds (an answer is shown
        before it is stored); TimeoutError after 10 s."""
        for _ in range(500):
            history = list(await self.service.store.load(str(key)))
            if until(history):
                return history
            await asyncio.sleep(0.02)
        raise TimeoutError(f"history of {key} never settled: {history}")


@pytest.fixture
def discord_bot(make_service, monkeypatch) -> Callable[..., Any]:
    """The adapter on a fake Discord, with typing repeated every 0.05 s and servers ready
    at once (discord.py waits 2 s for more of them by default)."""
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", DiscordWebSocket.DEFAULT_GATEWAY)
    monkeypatch.setattr(discord_adapter, "EDITS_PER_MINUTE", EDITS_AT_TEST_PACE)

    @asynccontextmanager
    async def start(batcher: Any = None, *, global_commands: bool = False,
                    reply_mode: str = "thread", **options: Any
                    ) -> AsyncIterator[Bot]:  # fmt: skip
        async with FakeDiscord() as fake, make_service(batcher, **options) as (service, batcher):
            settings = settings_for(
                fake, discord_global_commands=global_commands, discord_reply_mode=reply_mode
            )
            client = discord.Client(intents=gateway_intents(), guild_ready_timeout=0.05)
            adapter = DiscordAdapter(
                client=client, service=service, settings=settings, typing_interval=0.05
            )
            async with running(adapter):
                await fake.wait_identified()
                await ready(adapter)
                yield Bot(fake, adapter, service, batcher)

    return start


class HaltingBatcher(ScriptedBatcher):
    """Writes the first `steps` * 40 characters of its answer (`pace` s a step), then waits
    for the test's gate."""

    def __init__(self, answer: str, *, steps: int = 1, pace: float = 0) -> None:
        super().__init__(answer)
        self.gate = threading.Event()
        self.halt_at, self.pace = steps, pace
        self.steps = 0

    def step(self) -> list:
        if self.steps >= self.halt_at:
            assert self.gate.wait(timeout=30), "the test never opened the gate"
        self.steps += 1
        time.sleep(self.pace)
        return super().step()


class Answers(ScriptedBatcher):
    """Answers each prompt with the next of its answers."""

    def __init__(self, *answers: str) -> None:
        super().__init__(answers[0])
        self.left = list(answers)

    def join(self, key: object, messages: list[dict], *, conversation: str, **options) -> None:
        self.answer = self.left.pop(0)
        super().join(key, messages, conversation=conversation, **options)


class HeldAnswers(Answers):
    """Answers each prompt with the next of its answers, the second once the test opens
    the gate."""

    def __init__(self, *answers: str) -> None:
        super().__init__(*answers)
        self.gate = threading.Event()

    def step(self) -> list:
        if len(self.prompts) == 2:
            assert self.gate.wait(timeout=30), "the test never opened the gate"
        return super().step()


def answered(interaction: FakeInteraction) -> list[JSON]:
    """The interaction's replies once the bot has written them (none still loading)."""
    replies_now = interaction.replies
    done = replies_now and all(not reply["flags"] & LOADING for reply in replies_now)
    return replies_now if done else []


def button(fake: FakeDiscord, channel: str, prefix: str) -> tuple[JSON, str] | None:
    """The bot's message in `channel` with a button whose custom_id starts with `prefix`."""
    for message in bot_messages(fake, channel):
        for custom_id in fake.buttons(channel, message["id"]):
            if custom_id.startswith(prefix):
                return message, custom_id
    return None


def answered_once(history: list[JSON]) -> bool:
    return [message["role"] for message in history] == ["user", "assistant"]


def thread_key(fake: FakeDiscord, thread: str) -> ConversationKey:
    return ConversationKey("discord", fake.guild_id, fake.channel_id, thread)


def dm_key(channel: str) -> ConversationKey:
    return ConversationKey("discord", "-", channel, channel)


async def answered_in_a_dm(bot: Bot, question: str) -> tuple[str, JSON, JSON]:
    """Ask in a DM; its channel, the answer as soon as it offers Regenerate (its turn may
    not have let go of the conversation yet), and that button."""
    asked = bot.fake.dm_message(question)
    channel = asked["channel_id"]
    await bot.fake.dispatch("MESSAGE_CREATE", asked)
    answer, regenerate = await bot.fake.wait_for(lambda: button(bot.fake, channel, "tb:regen:"))
    return channel, answer, regenerate


async def commands_registered(fake: FakeDiscord, guild: str | None = None) -> None:
    scope = f"/guilds/{guild}" if guild else ""
    await fake.wait_for_requests("PUT", rf"/applications/{fake.application_id}{scope}/commands")


# --- slash commands -----------------------------------------------------------------------


def test_every_command_is_a_slash_command():
    assert set(DESCRIPTIONS) == set(get_args(Command))
    assert all(1 <= len(description) <= 100 for description in DESCRIPTIONS.values())


async def test_commands_are_registered_in_each_server_and_none_globally(discord_bot):
    async with discord_bot() as bot:
        fake = bot.fake
        await commands_registered(fake, fake.guild_id)
        await bot.adapter.client.wait_until_ready()  # from now on, a server is a new join
        await fake.join_guild("2001")
        await commands_registered(fake, "2001")
    names = set(DESCRIPTIONS)
    assert {command["name"] for command in fake.commands[fake.guild_id]} == names
    assert {command["name"] for command in fake.commands["2001"]} == names
    [global_list] = fake.requests_to("PUT", rf"/applications/{fake.application_id}/commands")
    assert global_list.json == []  # emptied, so no command shows twice


async def test_commands_lost_to_a_network_blip_are_registered_when_the_server_is_back(
    discord_bot,
):
    """The registration met a dropped connection (aiohttp's error, not discord.py's): the
    server stayed marked registered, so joining it again registered nothing."""
    async with discord_bot() as bot:
        fake = bot.fake
        await commands_registered(fake, fake.guild_id)
        await bot.adapter.client.wait_until_ready()
        # Twice: aiohttp sends an idempotent request again once, on a new connection.
        put = ("PUT", rf"/applications/{fake.application_id}/guilds/2001/commands")
        fake.drop(*put, count=2)
        await fake.join_guild("2001")
        await fake.wait_for(lambda: len(fake.requests_to(*put)) == 2)
        await fake.join_guild("2001")  # removed and added again, say
        await fake.wait_for(lambda: fake.commands.get("2001"))
    assert {command["name"] for command in fake.commands["2001"]} == set(DESCRIPTIONS)


async def joined_another_server(bot: Bot) -> tuple[str, str]:
    """The bot joins server 2001 once ready, and registers its commands there; the
    request that does it (method, path), to count."""
    fake = bot.fake
    await commands_registered(fake, fake.guild_id)
    await bot.adapter.client.wait_until_ready()
    put = ("PUT", rf"/applications/{fake.application_id}/guilds/2001/commands")
    await fake.join_guild("2001")
    await fake.wait_for(lambda: len(fake.requests_to(*put)) == 1)
    return put


async def test_a_server_that_removes_the_bot_and_invites_it_back_gets_the_commands_again(
    discord_bot,
):
    """Removing an app takes its commands in that server with it; invited back while the
    process ran, it registered nothing (the server was marked registered), and the server
    had no slash commands until a restart."""
    async with discord_bot() as bot:
        fake, put = bot.fake, await joined_another_server(bot)
        await fake.dispatch("GUILD_DELETE", {"id": "2001"})  # the bot removed
        fake.commands.pop("2001", None)
        await fake.wait_for(lambda: bot.adapter.client.get_guild(2001) is None)
        await fake.join_guild("2001")  # invited back
        await fake.wait_for(lambda: len(fake.requests_to(*put)) == 2)
    assert {command["name"] for command in fake.commands["2001"]} == set(DESCRIPTIONS)


async def test_a_server_that_removed_the_bot_while_it_was_away_gets_the_commands_again(
    discord_bot,
):
    """Removed while no session was up (its GUILD_DELETE never came) and invited back: the
    server was still marked registered, and had no slash commands until a restart."""
    async with discord_bot() as bot:
        fake, put = bot.fake, await joined_another_server(bot)
        fake.hold_new_sessions()
        await fake.close_gateway(4009)  # the session is lost, not resumed
        del fake.guilds["2001"]
        fake.commands.pop("2001", None)
        await fake.dispatch("GUILD_DELETE", {"id": "2001"})  # no session to hear it
        fake.open_new_sessions()
        await fake.wait_identified(2)
        await fake.wait_for(lambda: bot.adapter.client.get_guild(2001) is None)
        await fake.join_guild("2001")  # invited back
        await fake.wait_for(lambda: len(fake.requests_to(*put)) == 2)
    assert {command["name"] for command in fake.commands["2001"]} == set(DESCRIPTIONS)


async def test_global_commands_are_registered_once_for_every_server(discord_bot):
    async with discord_bot(global_commands=True) as bot:
        fake = bot.fake
        await commands_registered(fake, fake.guild_id)
    assert {command["name"] for command in fake.commands[None]} == set(DESCRIPTIONS)
    assert fake.commands[fake.guild_id] == []


async def test_help_is_answered_to_whoever_ran_it_alone(discord_bot):
    async with discord_bot() as bot:
        fake = bot.fake
        await commands_registered(fake, fake.guild_id)
        ran = await fake.slash_command("help", fake.channel_id)
        [reply] = await fake.wait_for(lambda: answered(ran))
    assert ran.callback is not None
    assert ran.callback["type"] == 5 and ran.callback["data"]["flags"] & EPHEMERAL
    assert reply["flags"] & EPHEMERAL
    assert reply["content"] and reply["content"] != replies.failed()
    assert bot_messages(fake, fake.channel_id) == []  # nothing the channel can see


async def test_reset_in_a_thread_clears_that_thread_alone(discord_bot):
    async with discord_bot(ScriptedBatcher("Noted.")) as bot:
        fake = bot.fake
        await commands_registered(fake, fake.guild_id)
        asked = await mention(fake, "remember the number 7")
        await final_reply(fake, asked["id"])
        elsewhere = fake.dm_message("remember the colour blue")
        await fake.dispatch("MESSAGE_CREATE", elsewhere)
        await final_reply(fake, elsewhere["channel_id"])
        await bot.history(thread_key(fake, asked["id"]), until=answered_once)
        ran = await fake.slash_command("reset", asked["id"])
        [reply] = await fake.wait_for(lambda: answered(ran))
        in_thread = await bot.history(thread_key(fake, asked["id"]), until=lambda _: True)
        still_known = await bot.service.knows(thread_key(fake, asked["id"]))
        in_dm = await bot.history(dm_key(elsewhere["channel_id"]), until=answered_once)
    assert reply["content"] == replies.conversation_reset()
    assert reply["flags"] & EPHEMERAL
    assert in_thread == [] and still_known  # the bot goes on answering there
    assert [message["content"] for message in in_dm] == ["remember the colour blue", "Noted."]
    assert len(bot_messages(fake, asked["id"])) == 1  # the answer alone: no reply for all


async def thread_answered(bot: Bot) -> tuple[JSON, ConversationKey]:
    """A mention answered in a thread of its own, with the commands registered: the
    mention, and the thread's conversation."""
    await commands_registered(bot.fake, bot.fake.guild_id)
    asked = await mention(bot.fake, "remember the number 7")
    await final_reply(bot.fake, asked["id"])
    return asked, thread_key(bot.fake, asked["id"])


async def pending_targets(redis: Redis) -> list[dict[str, Any]]:
    """The reply targets of the turns pending now."""
    turns = await redis.zrange(keys.PENDING_TURNS, 0, -1)
    return [json.loads(await redis.hget(keys.turn(turn), "target") or "{}") for turn in turns]


async def test_a_reset_resumed_after_a_restart_edits_its_deferred_response(
    discord_bot, redis_client: Redis
):
    """`/reset`, waiting for an answer in its thread, is a pending turn: a process that
    takes it over after a restart, where the Interaction is gone, still tells its sender,
    in the same deferred response, through the interaction's token kept with the turn.
    Its target was empty, and such a turn was dropped undone."""
    async with discord_bot(ScriptedBatcher("Noted.")) as bot:
        fake = bot.fake
        asked, key = await thread_answered(bot)
        async with ConversationLocks(redis=redis_client).hold(str(key)):  # an answer's turn
            ran = await fake.slash_command("reset", asked["id"])
            token = ran.payload["token"]

            async def saved() -> bool:
                return token in [t.get("token") for t in await pending_targets(redis_client)]

            await until(saved)
            [target] = [t for t in await pending_targets(redis_client) if t.get("token") == token]
            await bot.adapter._resumed(target, lambda: None).finish(replies.conversation_reset())
            [shown] = await fake.wait_for(lambda: answered(ran))
    assert target == {"ephemeral": True, "application": fake.application_id, "token": token}
    assert shown["content"] == replies.conversation_reset() and shown["flags"] & EPHEMERAL


@pytest.mark.parametrize("order", ["reset", "forget"])
async def test_reset_or_forget_in_a_channel_points_to_the_thread_and_clears_nothing(
    discord_bot, order
):
    """Run in the channel, they would name no conversation (each thread is one): saying
    it was cleared would be untrue."""
    async with discord_bot(ScriptedBatcher("Noted.")) as bot:
        fake = bot.fake
        _asked, key = await thread_answered(bot)
        await bot.history(key, until=answered_once)
        ran = await fake.slash_command(order, fake.channel_id)
        [reply] = await fake.wait_for(lambda: answered(ran))
        history = await bot.history(key, until=answered_once)
    assert reply["content"] == thread_only(order) and reply["flags"] & EPHEMERAL
    assert [message["content"] for message in history] == ["remember the number 7", "Noted."]


@pytest.mark.parametrize("order", ["reset", "forget"])
async def test_reset_or_forget_mentioned_in_a_channel_opens_no_thread_and_clears_nothing(
    discord_bot, order
):
    """`@threadbot forget` typed in the channel, not in the thread meant: said to be done,
    it cleared nothing (a new conversation of its own), in a new thread named "forget"."""
    async with discord_bot(ScriptedBatcher("Noted.")) as bot:
        fake = bot.fake
        asked = await mention(fake, "remember the number 7")
        await final_reply(fake, asked["id"])
        key = thread_key(fake, asked["id"])
        await bot.history(key, until=answered_once)
        typed = await mention(fake, order)
        [reply] = await fake.wait_for(lambda: bot_messages(fake, fake.channel_id))
        history = await bot.history(key, until=answered_once)
    assert reply["content"] == replies.nothing_stored(order)
    assert reply["message_reference"]["message_id"] == typed["id"]
    assert typed["id"] not in fake.channels  # no thread opened from it
    assert [message["content"] for message in history] == ["remember the number 7", "Noted."]


@pytest.mark.parametrize("order", ["help", "status"])
async def test_a_command_mentioned_in_a_channel_is_answered_in_place(discord_bot, order):
    """`@threadbot help` in the channel: its reply answers the message where it is, with
    no thread opened for a line or two (and left in the channel's list)."""
    async with discord_bot() as bot:
        fake = bot.fake
        typed = await mention(fake, order)
        [reply] = await fake.wait_for(lambda: bot_messages(fake, fake.channel_id))
    assert reply["message_reference"]["message_id"] == typed["id"]
    assert typed["id"] not in fake.channels  # no thread opened from it
    assert reply["content"].strip()


async def test_forget_in_a_dm_through_a_global_command(discord_bot):
    async with discord_bot(ScriptedBatcher("Noted."), global_commands=True) as bot:
        fake = bot.fake
        await commands_registered(fake)
        asked = fake.dm_message("remember this")
        await fake.dispatch("MESSAGE_CREATE", asked)
        await final_reply(fake, asked["channel_id"])
        ran = await fake.slash_command("forget", asked["channel_id"])
        [reply] = await fake.wait_for(lambda: answered(ran))
        known = await bot.service.knows(dm_key(asked["channel_id"]))
    assert reply["content"] == replies.forgotten()
    assert reply["flags"] & EPHEMERAL
    assert not known


async def test_a_command_in_a_kind_of_channel_discord_py_does_not_know_is_told_so(discord_bot):
    """Discord adds kinds of channel; discord.py gives an interaction in one no channel,
    nor its id. The user is told, where the command failed and "thinking…" stayed until
    Discord gave up."""
    async with discord_bot() as bot:
        fake = bot.fake
        await commands_registered(fake)
        novel = {**fake.channels[fake.channel_id], "id": fake.snowflake(), "type": 99}
        fake.channels[novel["id"]] = novel
        ran = await fake.slash_command("status", novel["id"])
        [reply] = await fake.wait_for(lambda: answered(ran))
    assert reply["content"] == replies.unknown_channel()
    assert reply["flags"] & EPHEMERAL


async def test_commands_as_text_and_as_slash_commands_with_their_permissions(discord_bot):
    """Alice, an admin, starts a thread. Bob may not reset or forget it, nor use the admin
    commands, whether he types them in the thread or runs them; he may ask for the status
    and the prompt. Alice may."""
    async with discord_bot(ScriptedBatcher("Noted."), system_prompt="Be brief.") as bot:
        fake = bot.fake
        bot.service.team.settings = bot.service.team.settings.model_copy(
            update={"access": Access(admins=(fake.alice["id"],))}
        )
        await commands_registered(fake, fake.guild_id)
        asked = await mention(fake, "remember the number 7")
        thread = asked["id"]
        await final_reply(fake, thread)

        async def typed(text: str, user: JSON) -> str:
            posted = len(bot_messages(fake, thread))
            await fake.dispatch("MESSAGE_CREATE", fake.thread_message(thread, text, author=user))
            return (await final_reply(fake, thread, after=posted))["content"]

        async def ran(name: str, user: JSON) -> str:
            interaction = await fake.slash_command(name, thread, user=user)
            [reply] = await fake.wait_for(lambda: answered(interaction))
            assert reply["flags"] & EPHEMERAL
            return reply["content"]

        bob, alice = fake.bob, fake.alice
        assert await typed("reset", bob) == replies.not_starter("reset")
        assert await ran("forget", bob) == replies.not_starter("forget")
        assert await typed("stats", bob) == replies.admins_only("stats")
        assert await ran("reload", bob) == replies.admins_only("reload")
        assert (await ran("status", bob)).startswith("Model: ")
        assert "Be brief." in await typed("prompt", bob)
        assert "`reload`" not in await ran("help", bob)
        assert "`reload`" in await typed("help", alice)
        assert (await ran("stats", alice)).startswith("Last hour: 1 answer,")
        history = await bot.history(thread_key(fake, thread), until=answered_once)
        assert await ran("reset", alice) == replies.conversation_reset()
    assert [m["content"] for m in history] == ["remember the number 7", "Noted."]


async def test_the_prompt_shown_is_the_one_a_conversation_there_then_uses(discord_bot):
    """/prompt filled a persona's {channel_name} with the channel's id and its {bot_name}
    with `threadbot`, where a conversation there fills in `#general` and the bot's name."""
    persona = "{bot_name} answers {user_name} in {channel_name}."
    async with discord_bot(ScriptedBatcher("Noted."), system_prompt=persona) as bot:
        fake = bot.fake
        await commands_registered(fake, fake.guild_id)
        interaction = await fake.slash_command("prompt", fake.channel_id)
        [shown] = await fake.wait_for(lambda: answered(interaction))
        asked = await mention(fake, "hi")
        await final_reply(fake, asked["id"])
    [system, _question] = bot.batcher.prompts[0]
    assert system["content"].endswith("in #general.")
    assert system["content"] in shown["content"]


async def test_a_denied_user_is_told_by_the_slash_command_alone(discord_bot):
    rules = Access.model_validate({"deny": "silent", "discord": {"users": {"deny": ["1003"]}}})
    async with discord_bot(access=rules) as bot:
        fake = bot.fake
        await commands_registered(fake, fake.guild_id)
        interaction = await fake.slash_command("status", fake.channel_id, user=fake.bob)
        [reply] = await fake.wait_for(lambda: answered(interaction))
    assert reply["content"] == replies.denied() and reply["flags"] & EPHEMERAL
    assert bot_messages(fake, fake.channel_id) == []


async def test_a_slash_command_that_meets_a_storage_outage_says_so(discord_bot, monkeypatch):
    """Telling a denied user needs Redis: with Redis gone, the command still ends with a
    clear answer instead of "thinking…" until Discord gives up."""
    rules = Access.model_validate({"discord": {"users": {"deny": ["1003"]}}})
    async with discord_bot(access=rules) as bot:
        fake = bot.fake

        async def redis_gone(_told: str) -> bool:
            raise RedisConnectionError("Connection refused")

        monkeypatch.setattr(bot.service.limits, "first_denial", redis_gone)
        await commands_registered(fake, fake.guild_id)
        interaction = await fake.slash_command("status", fake.channel_id, user=fake.bob)
        [reply] = await fake.wait_for(lambda: answered(interaction))
    assert reply["content"] == replies.storage_unavailable() and reply["flags"] & EPHEMERAL


async def test_role_rules_apply_to_slash_commands_and_regenerate_in_a_dm(discord_bot, monkeypatch):
    """A DM is in no server: once the rules want a role, Alice, without it in the bot's
    server, may not press Regenerate or run /status there; with it, she may (once her
    remembered roles expire: here at once)."""
    monkeypatch.setattr(discord_channel, "MEMBERSHIP_SECONDS", 0.0)
    async with discord_bot(Answers("First answer."), global_commands=True) as bot:
        fake = bot.fake
        await commands_registered(fake)
        channel, first, regenerate = await answered_in_a_dm(bot, "what should I cook?")
        role = fake.bot_role_id  # a role the server had when the bot connected
        strict = Access.model_validate({"discord": {"roles": {"allow": [role]}}})
        bot.service.team.settings = bot.service.team.settings.model_copy(update={"access": strict})

        async def status() -> str:
            ran = await fake.slash_command("status", channel)
            [reply] = await fake.wait_for(lambda: answered(ran))
            return reply["content"]

        pressed = await fake.press_button(channel, first["id"], regenerate)
        [refused_press] = await fake.wait_for(lambda: answered(pressed))
        refused_status = await status()
        fake.member_roles = {fake.alice["id"]: [role]}
        allowed_status = await status()
    assert refused_press["content"] == refused_status == replies.denied()
    assert allowed_status.startswith("Model: ")
    assert fake.message(channel, first["id"])["content"] == "First answer."


async def test_a_regenerate_in_a_dm_is_acknowledged_before_the_askers_roles_are_looked_up(
    discord_bot,
):
    """Looking up a DM asker's roles takes REST calls (one a server): the press is
    acknowledged first, within Discord's 3 s, and a refusal follows for the presser alone."""
    async with discord_bot(Answers("First answer.")) as bot:
        fake = bot.fake
        channel, first, regenerate = await answered_in_a_dm(bot, "what should I cook?")
        strict = Access.model_validate({"discord": {"roles": {"allow": ["77"]}}})
        bot.service.team.settings = bot.service.team.settings.model_copy(update={"access": strict})
        pressed = await fake.press_button(channel, first["id"], regenerate)
        [refusal] = await fake.wait_for(lambda: pressed.replies)
    paths = [request.path for request in fake.requests]
    acknowledged = paths.index(f"/interactions/{pressed.id}/{pressed.payload['token']}/callback")
    looked_up = paths.index(f"/guilds/{fake.guild_id}/members/{fake.alice['id']}")
    assert acknowledged < looked_up
    assert pressed.callback == {"type": 6}
    assert refusal["content"] == replies.denied() and refusal["flags"] & EPHEMERAL
    assert fake.message(channel, first["id"])["content"] == "First answer."


# --- Stop ------------------------------------------------------------------------------------


async def test_stop_by_the_asker_keeps_what_was_written(discord_bot):
    batcher = HaltingBatcher(STORY)
    async with discord_bot(batcher) as bot:
        fake = bot.fake
        try:
            asked = await mention(fake, "tell me a story")
            thread = asked["id"]
            streaming, stop = await fake.wait_for(lambda: button(fake, thread, "tb:stop:"))
            pressed = await fake.press_button(thread, streaming["id"], stop)
            final = await final_reply(fake, thread)
            offered = await fake.wait_for(lambda: fake.buttons(thread, final["id"]))
            history = await bot.history(thread_key(fake, thread), until=answered_once)
        finally:
            batcher.gate.set()
    assert pressed.callback == {"type": 6}  # acknowledged; the answer's own edit shows it
    assert final["content"] == f"{STORY[:40].strip()}\n\n{replies.stopped()}"
    assert history[-1] == {"role": "assistant", "content": final["content"]}
    assert [custom_id.split(":")[1] for custom_id in offered] == ["regen"]  # Stop is gone


async def test_a_long_answer_goes_on_in_a_second_message_each_with_stop_until_it_ends(
    discord_bot,
):
    """Past 2,000 characters the answer streams on in a second message while it is
    written, each with Stop; once it ends, Stop is off both and Regenerate on the last."""
    answer = "word " * 500 + "ONE."  # 2,504 characters
    batcher = HaltingBatcher(answer, steps=60, pace=0.01)  # 2,400 of them, then it waits
    async with discord_bot(batcher) as bot:
        fake = bot.fake
        try:
            thread = (await mention(fake, "write a lot"))["id"]

            def both_with_stop() -> list[JSON]:
                parts = bot_messages(fake, thread)
                with_stop = [p for p in parts if any(
                    c.startswith("tb:stop:") for c in fake.buttons(thread, p["id"])
                )]  # fmt: skip
                return len(parts) == 2 and with_stop == parts and parts

            streaming = await fake.wait_for(both_with_stop)
        finally:
            batcher.gate.set()

        def ended() -> list[JSON]:
            parts = bot_messages(fake, thread)
            done = parts and parts[-1]["content"].endswith("ONE.")
            return done and fake.buttons(thread, parts[-1]["id"]) and parts

        final = await fake.wait_for(ended)
    assert [part["id"] for part in final] == [part["id"] for part in streaming]  # edited
    assert " ".join(part["content"] for part in final).split() == answer.split()
    assert fake.buttons(thread, final[0]["id"]) == []
    assert [c.split(":")[1] for c in fake.buttons(thread, final[1]["id"])] == ["regen"]


async def stop_pressed_by_bob(bot: Bot, batcher: HaltingBatcher) -> tuple[FakeInteraction, JSON]:
    """alice asks; bob presses Stop while the answer is written; then the batcher goes on."""
    fake = bot.fake
    try:
        asked = await mention(fake, "tell me a story")
        streaming, stop = await fake.wait_for(lambda: button(fake, asked["id"], "tb:stop:"))
        pressed = await fake.press_button(asked["id"], streaming["id"], stop, user=fake.bob)
        await fake.wait_for(lambda: pressed.callback)
    finally:
        batcher.gate.set()
    final = await final_reply(fake, asked["id"])
    await bot.history(thread_key(fake, asked["id"]), until=answered_once)
    return pressed, final


async def test_stop_by_someone_else_is_refused(discord_bot):
    batcher = HaltingBatcher(STORY)
    async with discord_bot(batcher) as bot:
        pressed, final = await stop_pressed_by_bob(bot, batcher)
    [refusal] = pressed.replies
    assert refusal["content"] == STOP_REFUSED and refusal["flags"] & EPHEMERAL
    assert final["content"] == STORY  # written to its end


async def test_an_admin_may_stop_anyones_answer(discord_bot):
    batcher = HaltingBatcher(STORY)
    async with discord_bot(batcher, access={"admins": ["1003"]}) as bot:
        pressed, final = await stop_pressed_by_bob(bot, batcher)
    assert pressed.replies == []
    assert final["content"].endswith(replies.stopped())


# --- Regenerate ------------------------------------------------------------------------------


async def test_regenerate_replaces_the_answer_in_its_message_and_in_history(discord_bot):
    async with discord_bot(Answers("First answer.", "Second answer.")) as bot:
        fake = bot.fake
        channel, first, regenerate = await answered_in_a_dm(bot, "what should I cook?")
        first_text = first["content"]  # the fake's own record, which the edit changes
        pressed = await fake.press_button(channel, first["id"], regenerate)

        def regenerated() -> JSON | None:
            message = fake.message(channel, first["id"])
            return message if message and message["content"] == "Second answer." else None

        await fake.wait_for(regenerated)
        offered_again = await fake.wait_for(lambda: fake.buttons(channel, first["id"]))
        history = await bot.history(
            dm_key(channel), until=lambda h: h[-1]["content"] == "Second answer."
        )
    assert first_text == "First answer."
    assert pressed.callback == {"type": 6}
    assert [m["content"] for m in bot_messages(fake, channel)] == ["Second answer."]
    assert offered_again == [regenerate]
    assert history == [
        {"role": "user", "content": "what should I cook?", "name": "Alice"},
        {"role": "assistant", "content": "Second answer."},
    ]
    assert bot.batcher.prompts[1] == bot.batcher.prompts[0]  # the same question, once


@pytest.mark.parametrize("locked", [False, True])
async def test_regenerate_in_a_thread_discord_archived_meanwhile(discord_bot, locked):
    """Discord archives a thread idle past its auto-archive duration (a day), then refuses
    every edit and deletion in it (50083): Regenerate pressed then showed nothing, and
    its turn was taken up again and again. The bot unarchives it, as Discord's own
    client does, and regenerates there; a thread a moderator locked is nowhere to answer."""
    async with discord_bot(Answers("First answer.", "Second answer.")) as bot:
        fake = bot.fake
        asked = await mention(fake, "what should I cook?")
        thread = asked["id"]  # opened from the question
        first, regenerate = await fake.wait_for(lambda: button(fake, thread, "tb:regen:"))
        await fake.archive(thread, locked=locked)
        await fake.wait_for(lambda: bot.adapter.client.get_channel(int(thread)) is None)
        await fake.press_button(thread, first["id"], regenerate)
        if locked:
            key = ConversationKey("discord", fake.guild_id, fake.channel_id, thread)
            await bot.history(key, until=lambda h: h[-1]["content"] == "First answer.")
            await until(lambda: nothing_pending(bot.service.journal))  # its turn ended
        else:
            await fake.wait_for(
                lambda: fake.message(thread, first["id"])["content"] == "Second answer."
            )
    assert fake.channels[thread]["thread_metadata"]["archived"] is locked
    assert await nothing_pending(bot.service.journal)


async def test_a_regeneration_fills_a_changed_persona_as_a_message_would(discord_bot):
    """The persona's text changed since the answer (a reload), so the press filled it
    anew, with the channel's id for {channel_name}, and the conversation kept that."""
    persona = "Hello from {channel_name}."
    async with discord_bot(Answers("First.", "Second."), system_prompt=persona) as bot:
        fake = bot.fake
        channel, first, regenerate = await answered_in_a_dm(bot, "hi")
        bot.service.team.settings = bot.service.team.settings.model_copy(
            update={"system_prompt": "Now in {channel_name}."}
        )
        await fake.press_button(channel, first["id"], regenerate)
        await fake.wait_for(lambda: fake.message(channel, first["id"])["content"] == "Second.")
    assert bot.batcher.prompts[0][0]["content"] == "Hello from a direct message."
    assert bot.batcher.prompts[1][0] == {"role": "system", "content": "Now in a direct message."}


async def test_regenerate_pressed_as_a_turn_ends_waits_for_it(discord_bot, redis_client: Redis):
    """A turn lets go of its conversation a moment after its buttons show (longer on a slow
    Redis, or for a turn in another process): a press meanwhile is acknowledged at once,
    waits for the turn to end, and is served."""
    async with discord_bot(Answers("First answer.", "Second answer.")) as bot:
        fake = bot.fake
        channel, first, regenerate = await answered_in_a_dm(bot, "what should I cook?")
        first_text = first["content"]  # the fake's own record, which the edit changes
        async with ConversationLocks(redis=redis_client).hold(str(dm_key(channel))):
            pressed = await fake.press_button(channel, first["id"], regenerate)
            acknowledged = await fake.wait_for(lambda: pressed.callback)
            await asyncio.sleep(0.5)  # the turn ending elsewhere
        # the final text, not a streamed edit before it (the bot stops once this is left)
        await fake.wait_for(
            lambda: fake.message(channel, first["id"])["content"] == "Second answer."
        )
    assert first_text == "First answer."
    assert acknowledged == {"type": 6} and pressed.replies == []


async def test_regenerate_while_an_answer_is_written_is_refused_within_the_deadline(
    discord_bot, redis_client: Redis
):
    """Another answer is being written (in another process): the press is acknowledged
    within Discord's 3 s, and refused once the wait for it is over."""
    async with discord_bot(Answers("First answer.")) as bot:
        fake = bot.fake
        channel, first, regenerate = await answered_in_a_dm(bot, "what should I cook?")
        async with ConversationLocks(redis=redis_client).hold(str(dm_key(channel))):
            pressed = await fake.press_button(channel, first["id"], regenerate)
            [refusal] = await fake.wait_for(lambda: pressed.replies)
    assert pressed.callback == {"type": 6}
    assert refusal["content"] == replies.not_regenerable() and refusal["flags"] & EPHEMERAL
    assert fake.message(channel, first["id"])["content"] == "First answer."
    assert len(bot.batcher.prompts) == 1


async def test_regenerate_pressed_twice_regenerates_once(discord_bot):
    """A double click: the second press, sent before the first's new answer reached the
    presser, waits for it to end, finds the answer it pressed replaced, and is refused."""
    async with discord_bot(HeldAnswers("First answer.", "Second answer.", "Third.")) as bot:
        fake = bot.fake
        channel, first, regenerate = await answered_in_a_dm(bot, "what should I cook?")
        await bot.history(dm_key(channel), until=answered_once)
        as_shown = copy.deepcopy(first)  # its Regenerate, which the new answer takes off
        await fake.press_button(channel, first["id"], regenerate)
        await fake.wait_for(lambda: len(bot.batcher.prompts) == 2)  # its answer is written
        again = await fake.press_button(channel, first["id"], regenerate, shown=as_shown)
        await fake.wait_for(lambda: again.callback)
        await asyncio.sleep(0.5)  # it reads which answer is the newest, and waits
        bot.batcher.gate.set()
        [refusal] = await fake.wait_for(lambda: again.replies)
        history = await bot.history(dm_key(channel), until=lambda h: len(h) == 2)
    assert refusal["content"] == replies.not_regenerable() and refusal["flags"] & EPHEMERAL
    assert fake.message(channel, first["id"])["content"] == "Second answer."
    assert [m["content"] for m in history] == ["what should I cook?", "Second answer."]
    assert len(bot.batcher.prompts) == 2


async def test_a_double_clicked_regenerate_takes_one_message_of_the_rate_limit(discord_bot):
    """Three messages a minute: a question, then a Regenerate clicked twice at once. The
    refused second press took a message of the rate all the same, and the next question
    in the minute was turned away."""
    rate = Access(rate_limit_per_minute=3)
    async with discord_bot(Answers("First.", "Second.", "Third."), access=rate) as bot:
        fake = bot.fake
        # A user of the test's own: a user's rate is kept in Redis, which tests share.
        carol = make_user(fake.snowflake(), "carol")
        fake.users[carol["id"]] = carol
        asked = fake.dm_message("what should I cook?", author=carol)
        channel = asked["channel_id"]
        await fake.dispatch("MESSAGE_CREATE", asked)
        first, regenerate = await fake.wait_for(lambda: button(fake, channel, "tb:regen:"))
        await bot.history(dm_key(channel), until=answered_once)
        presses = await asyncio.gather(
            *(fake.press_button(channel, first["id"], regenerate, user=carol) for _ in range(2))
        )
        await fake.wait_for(lambda: all(press.callback for press in presses))
        await bot.history(dm_key(channel), until=lambda h: h[-1]["content"] == "Second.")
        await fake.dispatch("MESSAGE_CREATE", fake.dm_message("and for dessert?", author=carol))
        await bot.history(dm_key(channel), until=lambda h: h[-1]["content"] == "Third.")
    assert len(bot.batcher.prompts) == 3


async def test_regenerate_of_an_answer_a_newer_one_replaces_meanwhile_is_refused(
    discord_bot, redis_client: Redis
):
    """Regenerate is pressed as the next question comes, while the answer's turn has not
    let go yet (held here by the test): the next answer is written while the press waits,
    and the press is refused; the next answer stays, shown and stored."""
    async with discord_bot(Answers("First answer.", "Second answer.", "Third.")) as bot:
        fake = bot.fake
        channel, first, regenerate = await answered_in_a_dm(bot, "what should I cook?")
        await bot.history(dm_key(channel), until=answered_once)
        async with ConversationLocks(redis=redis_client).hold(str(dm_key(channel))):
            await fake.dispatch("MESSAGE_CREATE", fake.dm_message("and for dessert?"))
            pressed = await fake.press_button(channel, first["id"], regenerate)
            await fake.wait_for(lambda: pressed.callback)
            await asyncio.sleep(0.5)  # it reads which answer is the newest, and waits
        [refusal] = await fake.wait_for(lambda: pressed.replies)
        history = await bot.history(dm_key(channel), until=lambda h: len(h) == 4)
        second = await final_reply(fake, channel, after=1)
    assert refusal["content"] == replies.not_regenerable() and refusal["flags"] & EPHEMERAL
    assert fake.message(channel, first["id"])["content"] == "First answer."
    assert second["content"] == "Second answer."
    assert [m["content"] for m in history] == [
        "what should I cook?",
        "First answer.",
        "and for dessert?",
        "Second answer.",
    ]
    assert len(bot.batcher.prompts) == 2


async def test_a_regenerated_answer_that_fails_leaves_the_old_one_shown_and_stored(
    discord_bot,
):
    """The new answer comes out empty (or the queue is full, or it times out): the old
    answer is not lost, in its message or in the history, and the asker hears why. It
    keeps its Regenerate, and a second press is answered."""
    async with discord_bot(Answers("First answer.", "", "Third answer.")) as bot:
        fake = bot.fake
        channel, first, regenerate = await answered_in_a_dm(bot, "what should I cook?")
        await fake.press_button(channel, first["id"], regenerate)
        kept = replies.answer_kept("First answer.", replies.empty_answer())
        await fake.wait_for(lambda: fake.message(channel, first["id"])["content"] == kept)
        history = await bot.history(dm_key(channel), until=lambda h: len(h) == 2)
        offered_again = await fake.wait_for(lambda: fake.buttons(channel, first["id"]))
        await fake.press_button(channel, first["id"], regenerate)
        await fake.wait_for(
            lambda: fake.message(channel, first["id"])["content"] == "Third answer."
        )
        regenerated = await bot.history(
            dm_key(channel), until=lambda h: h[-1]["content"] == "Third answer."
        )
    assert history == [
        {"role": "user", "content": "what should I cook?", "name": "Alice"},
        {"role": "assistant", "content": "First answer."},
    ]
    assert offered_again == [regenerate]
    assert [m["content"] for m in regenerated] == ["what should I cook?", "Third answer."]


LONG_ANSWER = "word " * 500 + "ONE."  # two messages


async def answered_at_length_in_a_dm(bot: Bot) -> tuple[str, JSON, str]:
    """A DM asked for LONG_ANSWER (the bot's next), answered: the DM, the answer's last
    message and its Regenerate button's custom id."""
    asked = bot.fake.dm_message("write a lot")
    channel = asked["channel_id"]
    await bot.fake.dispatch("MESSAGE_CREATE", asked)
    last, regenerate = await bot.fake.wait_for(
        lambda: button(bot.fake, channel, "tb:regen:"), timeout=60
    )
    return channel, last, regenerate


async def test_a_regeneration_that_fails_before_it_starts_shows_a_long_answer_once(
    discord_bot, monkeypatch
):
    """The old answer is two messages, and its regeneration fails before it starts (its
    prompt could not be built): the old answer is shown again once, in two messages, where
    its second part stayed and the kept text was posted again after it. (Its further part
    is deleted and posted again, not edited: a message a try before a restart deleted may
    still be named in the journal.)"""
    first_answer = LONG_ANSWER
    async with discord_bot(Answers(first_answer)) as bot:
        fake = bot.fake
        channel, last, regenerate = await answered_at_length_in_a_dm(bot)

        async def unbuildable(*_args: Any) -> str:
            raise RuntimeError("injected: the prompt could not be built")

        old_parts = bot_messages(fake, channel)
        monkeypatch.setattr(bot.service, "_system", unbuildable)
        await fake.press_button(channel, last["id"], regenerate)
        kept = replies.answer_kept(first_answer, replies.failed())

        def shown_again() -> list[JSON]:
            parts = bot_messages(fake, channel)
            told = "".join(part["content"] for part in parts).endswith(kept[-40:])
            return parts if told and fake.buttons(channel, parts[-1]["id"]) else []

        parts = await fake.wait_for(shown_again, timeout=60)  # Regenerate offered again
    assert len(parts) == 2 and parts[0]["id"] == old_parts[0]["id"]
    assert " ".join(part["content"] for part in parts).split() == kept.split()


async def test_a_long_answer_regenerated_after_a_failed_tidy_leaves_none_of_its_parts(
    discord_bot,
):
    """Deleting the old answer's second message failed as the new answer started (a
    Discord 503): the new answer came out in the first message, with the old second part
    left after it, its Regenerate still on it."""
    async with discord_bot(Answers(LONG_ANSWER, "Short now.")) as bot:
        fake = bot.fake
        channel, last, regenerate = await answered_at_length_in_a_dm(bot)
        deletions = rf"/channels/{channel}/messages/\d+"
        fake.fail("DELETE", deletions, 503)
        await fake.press_button(channel, last["id"], regenerate)

        def regenerated() -> list[JSON]:
            parts = bot_messages(fake, channel)
            done = (
                parts
                and parts[0]["content"] == "Short now."
                and fake.buttons(channel, parts[-1]["id"])
            )
            return parts if done and len(parts) == 1 else []

        [shown] = await fake.wait_for(regenerated, timeout=60)
    failed = [r for r in fake.requests if r.method == "DELETE" and r.status == 503]
    assert len(failed) == 1  # the first try did fail
    assert shown["content"] == "Short now."


async def test_a_regenerated_answer_taken_up_after_a_restart_still_keeps_the_old_one(
    discord_bot,
):
    """The sink rebuilt from a regenerated answer's saved target (another process's, or
    this one's before a crash) is a regeneration's too: it deletes the old answer's further
    messages, and if it fails, the old answer shown again keeps its Regenerate."""
    async with discord_bot(Answers("First answer.")) as bot:
        channel, first, _ = await answered_in_a_dm(bot, "what should I cook?")
        place = await bot.service.answer_place(dm_key(channel))
        place["messages"].append("1999")  # an answer in two messages: the second goes
        asker = Asker("1002", dm_key(channel))
        saved = bot.adapter._regenerating(place, "1234", asker).reply_target()
        resumed = bot.adapter._resumed(json.loads(json.dumps(saved)), stop=lambda: None)
        answer = bot.adapter._sink(resumed.target, asker, [first["id"]])
    assert resumed.regenerates and resumed.message_ids == [first["id"]]
    assert resumed.replacing == ["1999"]
    assert not answer.regenerates


async def test_an_answer_resumed_after_a_restart_never_sends_a_nonce_again(discord_bot):
    """Discord returns the message an earlier send with the same nonce made, for minutes:
    an answer whose further messages were deleted (a shorter final text, a restarted try)
    and that is then taken up by another process must not send their nonces again."""
    async with discord_bot() as bot:
        fake = bot.fake
        channel = fake.dm_channel(fake.alice["id"])["id"]
        three_parts = "word " * 1000
        answer = bot.adapter._sink(DiscordChannel(bot.adapter.client, channel=channel,
                                                  seed="4242"), asker=None)  # fmt: skip
        await answer.finish(three_parts)
        await answer.restart()  # a try that starts the answer over keeps its first message
        saved = json.loads(json.dumps(answer.reply_target()))
        resumed = bot.adapter._resumed(saved, stop=lambda: None)
        await resumed.finish(three_parts)
    nonces = [
        request.json["nonce"]
        for request in fake.requests_to("POST", rf"/channels/{channel}/messages")
    ]
    assert len(nonces) == 5 and len(set(nonces)) == 5
    assert len(bot_messages(fake, channel)) == 3


async def test_a_resumed_answer_whose_message_was_deleted_is_posted_again(discord_bot):
    """Someone deleted the answer's message before the next process took it up: the
    answer goes into a new message, saved as its place, where each edit failed (10008)
    until the turn gave up, the answer never shown."""
    async with discord_bot() as bot:
        fake = bot.fake
        channel = fake.dm_channel(fake.alice["id"])["id"]
        first = DiscordChannel(bot.adapter.client, channel=channel, seed="4343")
        deleted = await first.post("…")
        await first.delete(deleted)
        saved = {**first.where(), "messages": [deleted]}
        resumed = bot.adapter._resumed(json.loads(json.dumps(saved)), stop=lambda: None)
        await resumed.finish("Paris.")
    [again] = resumed.reply_target()["messages"]
    assert again != deleted and fake.message(channel, again)["content"] == "Paris."


async def test_a_regenerated_inline_answer_replies_to_the_question_in_every_part(discord_bot):
    """Inline, each part of an answer replies to the question (so replying to any part
    continues the conversation): a regenerated answer's new parts too."""
    first_answer, second_answer = "word " * 500 + "ONE.", "more " * 500 + "TWO."  # two parts
    async with discord_bot(Answers(first_answer, second_answer), reply_mode="inline") as bot:
        fake, channel = bot.fake, bot.fake.channel_id
        asked = await mention(fake, "write a lot")
        last, regenerate = await fake.wait_for(
            lambda: button(fake, channel, "tb:regen:"), timeout=60
        )
        await fake.press_button(channel, last["id"], regenerate)

        def regenerated() -> list[JSON]:
            parts = bot_messages(fake, channel)
            done = len(parts) == 2 and parts[-1]["content"].endswith("TWO.")
            return done and fake.buttons(channel, parts[-1]["id"]) and parts

        parts = await fake.wait_for(regenerated, timeout=60)  # two long answers, streamed
    assert last["content"].endswith("ONE.")
    assert parts[0]["content"].startswith("more") and parts[1]["id"] != last["id"]
    assert [part["message_reference"]["message_id"] for part in parts] == [asked["id"]] * 2


async def test_regenerate_moves_to_the_newest_answer(discord_bot):
    async with discord_bot(ScriptedBatcher("Noted.")) as bot:
        fake = bot.fake
        first_question = fake.dm_message("one")
        channel = first_question["channel_id"]
        await fake.dispatch("MESSAGE_CREATE", first_question)
        first, _ = await fake.wait_for(lambda: button(fake, channel, "tb:regen:"))
        await fake.dispatch("MESSAGE_CREATE", fake.dm_message("two"))
        second = await final_reply(fake, channel, after=1)
        await fake.wait_for(lambda: fake.buttons(channel, second["id"]))
        await bot.history(dm_key(channel), until=lambda h: len(h) == 4)
    assert fake.buttons(channel, first["id"]) == []


async def test_regenerate_by_someone_else_is_refused(discord_bot):
    async with discord_bot(ScriptedBatcher("Noted.")) as bot:
        fake = bot.fake
        asked = await mention(fake, "one")
        answer, regenerate = await fake.wait_for(lambda: button(fake, asked["id"], "tb:regen:"))
        await bot.history(thread_key(fake, asked["id"]), until=answered_once)
        pressed = await fake.press_button(asked["id"], answer["id"], regenerate, user=fake.bob)
        [refusal] = await fake.wait_for(lambda: pressed.replies)
        history = await bot.history(thread_key(fake, asked["id"]), until=answered_once)
    assert refusal["content"] == REGENERATE_REFUSED and refusal["flags"] & EPHEMERAL
    assert [m["content"] for m in history] == ["one", "Noted."]
    assert len(bot.batcher.prompts) == 1


async def test_regenerate_after_a_reset_is_refused(discord_bot):
    async with discord_bot(ScriptedBatcher("Noted.")) as bot:
        fake = bot.fake
        asked = fake.dm_message("one")
        channel = asked["channel_id"]
        await fake.dispatch("MESSAGE_CREATE", asked)
        answer, regenerate = await fake.wait_for(lambda: button(fake, channel, "tb:regen:"))
        await fake.dispatch("MESSAGE_CREATE", fake.dm_message("reset"))
        await final_reply(fake, channel, after=1)
        pressed = await fake.press_button(channel, answer["id"], regenerate)
        [refusal] = await fake.wait_for(lambda: pressed.replies)
    assert refusal["content"] == replies.not_regenerable() and refusal["flags"] & EPHEMERAL
    assert fake.message(channel, answer["id"])["content"] == "Noted."
    assert len(bot.batcher.prompts) == 1


# --- typing ----------------------------------------------------------------------------------


async def test_typing_shows_while_answers_wait_and_stops_at_their_text(discord_bot, make_batcher):
    """One answer at a time (a batch of one, held by the gate): both conversations show
    typing, again and again, until their text; none after it."""
    batcher = GatedBatcher(make_batcher(max_batch=1))
    async with discord_bot(batcher) as bot:
        fake = bot.fake
        try:
            first, second = fake.dm_message("one"), fake.dm_message("two", author=fake.bob)
            for message in (first, second):
                await fake.dispatch("MESSAGE_CREATE", message)
            for message in (first, second):  # the second waits in the queue behind the first
                await fake.wait_for_requests(
                    "POST", rf"/channels/{message['channel_id']}/typing", count=3
                )
        finally:
            batcher.gate.set()
        for message in (first, second):
            await final_reply(fake, message["channel_id"])
    for message in (first, second):
        calls = [
            r.path.rsplit("/", 1)[1]
            for r in fake.requests
            if r.method == "POST" and r.path.startswith(f"/channels/{message['channel_id']}/")
        ]
        shown = calls.index("messages")
        assert calls[:shown] == ["typing"] * shown and shown >= 3
        assert "typing" not in calls[shown:]
