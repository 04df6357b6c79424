"""The Discord adapter end to end: the real discord.py against the fake Discord.

The adapter runs exactly as `threadbot run` builds it from settings, on the real service,
queue and Redis; the model is the bundled one where the answer matters (Paris), the tiny
one where only the flow does, and a scripted one where a test needs a particular text.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from functools import partial
from types import SimpleNamespace

import aiohttp
import discord
import pytest
from conftest import (
    LONG_CODE_ANSWER,
    FailsOnceBatcher,
    GatedBatcher,
    PacedBatcher,
    ScriptedBatcher,
    assert_split_with_fences,
    running,
)
from discord.gateway import DiscordWebSocket
from fake_discord import ApiError, FakeDiscord
from processes import free_port
from redis.exceptions import ConnectionError as RedisConnectionError
from test_service import nothing_pending, until

from adapters import discord_adapter, discord_channel
from adapters.attachments import EARLIER, MAX_FILE_BYTES
from adapters.base import AdapterError
from adapters.discord_adapter import (
    EDIT_BURST,
    EDITS_PER_MINUTE,
    INTENTS_HELP,
    MESSAGE_LIMIT,
    THREAD_NAME_LENGTH,
    DiscordAdapter,
    gateway_intents,
    thread_name,
)
from adapters.discord_channel import DM_LOOKUPS, FAILED_LOOKUP_SECONDS, MEMBERSHIP_SECONDS
from adapters.streaming import STREAMING_MARK
from bot import replies
from bot.config import Access, Settings
from bot.types import ConversationKey
from storage import keys


@pytest.fixture
async def fake():
    async with FakeDiscord() as discord_fake:
        yield discord_fake


@pytest.fixture(autouse=True)
def _discord_urls_restored(monkeypatch):
    """The adapter points discord.py's class-level URLs at the fake; put them back after."""
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", DiscordWebSocket.DEFAULT_GATEWAY)


# The tests edit every 0.05 s, not 1.5: a channel's budget as much faster, so that it
# holds back a single answer no more than it would at 1.5 s (the tests of it set it back).
EDITS_AT_TEST_PACE = 30 * EDITS_PER_MINUTE


def settings_for(fake: FakeDiscord, **values) -> Settings:
    return Settings(
        _env_file=None,
        discord_bot_token=fake.token,
        discord_api_url=fake.api_url,
        discord_edit_interval=0.05,
        **values,
    )


@pytest.fixture
def discord_bot(fake, make_service, monkeypatch):
    """Runs the adapter on a service; yields (service, batcher) once it has identified."""
    monkeypatch.setattr(discord_adapter, "EDITS_PER_MINUTE", EDITS_AT_TEST_PACE)

    @asynccontextmanager
    async def start(batcher=None, *, reply_mode="thread", **service_options):
        async with make_service(batcher, **service_options) as (service, batcher):
            settings = settings_for(fake, discord_reply_mode=reply_mode)
            # Servers ready at once: discord.py waits 2 s for more of them by default.
            client = discord.Client(intents=gateway_intents(), guild_ready_timeout=0.05)
            adapter = DiscordAdapter(client=client, service=service, settings=settings)
            async with running(adapter):
                await fake.wait_identified()
                await ready(adapter)
                yield service, batcher

    return start


async def ready(adapter: DiscordAdapter) -> None:
    """Until discord.py has dispatched READY, which its own task does a moment after the
    servers arrive (a client closed before then leaves that dispatch to a closed loop),
    and what was sent before it is read back: none of the test's messages yet."""
    await asyncio.wait_for(adapter.client.wait_until_ready(), timeout=10)
    await asyncio.wait_for(adapter.caught_up.wait(), timeout=10)


def bot_messages(fake: FakeDiscord, channel_id: str) -> list[dict]:
    return [m for m in fake.messages.get(channel_id, []) if m["author"]["id"] == fake.bot["id"]]


async def final_reply(fake: FakeDiscord, channel_id: str, *, after: int = 0) -> dict:
    """The bot's message in a channel once streaming has ended in its final text."""

    def done():
        posts = bot_messages(fake, channel_id)
        text = posts[after]["content"] if len(posts) > after else STREAMING_MARK
        return not text.endswith(STREAMING_MARK) and posts[after]

    return await fake.wait_for(done, timeout=60)


async def mention(fake: FakeDiscord, content: str, channel_id: str | None = None) -> dict:
    message = fake.user_message(channel_id or fake.channel_id, content, mentions_bot=True)
    await fake.dispatch("MESSAGE_CREATE", message)
    return message


@pytest.mark.slow
async def test_a_mention_opens_a_thread_with_the_answer(fake, discord_bot, bundled_batcher):
    async with discord_bot(bundled_batcher):
        message = await mention(fake, "What is the capital of France?")
        reply = await final_reply(fake, message["id"])  # the thread's id is the message's
    assert "paris" in reply["content"].lower()
    thread = fake.channels[message["id"]]
    assert thread["type"] == 11 and thread["parent_id"] == fake.channel_id
    assert thread["name"] == "What is the capital of France?"
    assert fake.requests_to("POST", rf"/channels/{message['id']}/typing")


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("What is the capital of France?", "What is the capital of France?"),
        (" ".join(["word"] * 30), " ".join(["word"] * 18) + "…"),
        ("https://e.example/" + "a" * 100 + " explain", "https://e.example/" + "a" * 71 + "…"),
    ],
    ids=["whole", "whole words", "a long first word"],
)
def test_a_thread_is_named_from_the_first_words_of_its_message(text, name):
    """A message that begins with a long URL named its thread "…"."""
    assert thread_name(text) == name
    assert len(name) <= THREAD_NAME_LENGTH


async def test_a_follow_up_in_the_thread_needs_no_mention(fake, discord_bot):
    async with discord_bot() as (service, batcher):
        message = await mention(fake, "hello bot")
        await final_reply(fake, message["id"])
        chatter = fake.user_message(fake.channel_id, "unrelated chatter")
        await fake.dispatch("MESSAGE_CREATE", chatter)
        follow_up = fake.thread_message(message["id"], "and another thing")
        await fake.dispatch("MESSAGE_CREATE", follow_up)  # handled after the chatter
        await final_reply(fake, message["id"], after=1)

        def key(root: dict) -> ConversationKey:
            return ConversationKey("discord", fake.guild_id, fake.channel_id, root["id"])

        assert await service.knows(key(message)) and not await service.knows(key(chatter))
    assert [p[-1]["content"] for p in batcher.prompts] == ["hello bot", "and another thing"]
    assert len(batcher.prompts[1]) == 3  # the thread's history came along


async def test_a_thread_deleted_before_its_answer_shows_ends_the_turn_there(
    fake, discord_bot, make_batcher
):
    """Discord: 10003 Unknown Channel. The answer is written for nobody no further, not
    tried again, and not stored: it was written whole, and each try failed to show it,
    until the last stored it, an answer nobody saw."""
    gated = GatedBatcher(make_batcher(max_new_tokens=12))
    async with discord_bot(gated) as (service, _batcher):
        message = await mention(fake, "hello bot")
        thread = message["id"]  # opened from the message, before the answer's first text
        await fake.wait_for(lambda: thread in fake.channels)
        del fake.channels[thread]
        gated.gate.set()
        await until(lambda: nothing_pending(service.journal), timeout=15)
        key = ConversationKey("discord", fake.guild_id, fake.channel_id, thread)
        history = await service.store.load(str(key))
    assert [m["role"] for m in history] == ["user"]
    assert not bot_messages(fake, fake.channel_id)  # not bare in the channel either


async def away(fake: FakeDiscord, *sent: dict, read_back_s: float = 0.0) -> None:
    """The bot's session ends (no RESUME); `sent` are dispatched then, to no session; a new
    one begins, whose reads of a channel's history take `read_back_s`."""
    fake.hold_new_sessions()
    await fake.close_gateway(4009)
    for message in sent:
        await fake.dispatch("MESSAGE_CREATE", message)
    fake.history_delay = read_back_s
    fake.open_new_sessions()
    await fake.wait_identified(2)


async def test_messages_sent_while_no_session_was_up_are_read_back_and_answered_once(
    fake, discord_bot
):
    """Discord replays what a session missed only to that session, resumed: a message in
    the bot's thread, a DM and a mention sent while its new session was not up yet came
    to no session, and were never answered. Read back once the session is up, each is
    answered once; those answered before, in the same histories, are not again."""
    async with discord_bot(ScriptedBatcher("Noted.")) as (_service, batcher):
        asked = await mention(fake, "before the gap")
        await final_reply(fake, asked["id"])
        dm = fake.dm_message("a DM before")
        await fake.dispatch("MESSAGE_CREATE", dm)
        await final_reply(fake, dm["channel_id"])
        sent = [
            fake.thread_message(asked["id"], "in the thread, while away"),
            fake.dm_message("a DM while away"),
            fake.user_message(fake.channel_id, "a mention while away", mentions_bot=True),
        ]
        await away(fake, *sent)
        await final_reply(fake, asked["id"], after=1)
        await final_reply(fake, dm["channel_id"], after=1)
        await final_reply(fake, sent[2]["id"])  # in the thread opened from it
    asked_before = [prompt[-1]["content"] for prompt in batcher.prompts[:2]]
    asked_after = sorted(prompt[-1]["content"] for prompt in batcher.prompts[2:])
    assert asked_before == ["before the gap", "a DM before"]
    assert asked_after == ["a DM while away", "a mention while away", "in the thread, while away"]
    assert len(bot_messages(fake, asked["id"])) == len(bot_messages(fake, dm["channel_id"])) == 2


async def test_more_mentions_than_may_wait_sent_while_away_are_each_answered(fake, discord_bot):
    """MAX_PENDING_PER_USER refuses a message that comes while its sender's answers are
    still pending, so one sends no more till they come; one who sent more than that while
    the bot was away could not have waited, and was asked to send the rest again."""
    async with discord_bot(ScriptedBatcher("Noted."), max_pending_per_user=2) as (_, batcher):
        sent = [
            fake.user_message(fake.channel_id, f"while away {n}", mentions_bot=True)
            for n in range(4)
        ]
        await away(fake, *sent)
        answers = [await final_reply(fake, message["id"]) for message in sent]
    assert [answer["content"] for answer in answers] == ["Noted."] * 4
    assert sorted(prompt[-1]["content"] for prompt in batcher.prompts) == [
        f"while away {n}" for n in range(4)
    ]


async def test_a_mention_sent_while_away_is_read_back_after_a_busy_hour(fake, discord_bot):
    """The channel had more than a page of messages in the hour read back: the latest
    are read, where the oldest page was, and the mention sent while away was not in it."""
    async with discord_bot(ScriptedBatcher("Noted.")) as (_service, batcher):
        for n in range(105):  # chatter the bot saw live, and let go
            fake.user_message(fake.channel_id, f"chatter {n}")
        mention = fake.user_message(fake.channel_id, "a mention while away", mentions_bot=True)
        await away(fake, mention)
        await final_reply(fake, mention["id"])
    assert [prompt[-1]["content"] for prompt in batcher.prompts] == ["a mention while away"]


async def test_a_dm_refused_before_one_answered_is_not_read_back(fake, discord_bot):
    """A DM refused (storage out, or a command at a stop: "send that again") is not seen;
    its sender sent on, and was answered. Read back, it was answered too, late, beside
    the one they sent again."""
    async with discord_bot(ScriptedBatcher("Noted.")) as (_service, batcher):
        fake.dm_message("refused, and sent again")  # as if refused: never marked seen
        answered = fake.dm_message("sent again")
        await fake.dispatch("MESSAGE_CREATE", answered)
        await final_reply(fake, answered["channel_id"])
        await away(fake, fake.dm_message("while away"))
        await final_reply(fake, answered["channel_id"], after=1)
    assert [prompt[-1]["content"] for prompt in batcher.prompts] == ["sent again", "while away"]


@pytest.mark.parametrize(
    ("wait_s", "read_back_s", "asked"),
    [
        (discord_adapter.READ_BACK_WAIT_S, 0.5, ["sent while away", "sent live"]),
        (0.2, 2.0, ["sent live", "sent while away"]),
    ],
    ids=["read back first", "past the wait"],
)
async def test_a_live_message_waits_for_the_read_back_so_long(
    fake, discord_bot, monkeypatch, wait_s, read_back_s, asked
):
    """The new session's first live DM came after the one sent while the bot was away:
    it is asked after it (where it went first, and a `forget` read back late would have
    dropped it), unless Discord gives the history back slower than `READ_BACK_WAIT_S`."""
    monkeypatch.setattr(discord_adapter, "READ_BACK_WAIT_S", wait_s)
    async with discord_bot(ScriptedBatcher("Noted.")) as (_service, batcher):
        dm = fake.dm_message("hello")
        await fake.dispatch("MESSAGE_CREATE", dm)
        await final_reply(fake, dm["channel_id"])
        await away(fake, fake.dm_message("sent while away"), read_back_s=read_back_s)
        await fake.dispatch("MESSAGE_CREATE", fake.dm_message("sent live"))
        await final_reply(fake, dm["channel_id"], after=2)
    assert [prompt[-1]["content"] for prompt in batcher.prompts] == ["hello", *asked]


async def test_a_dm_sent_while_no_process_ran_is_answered_by_the_next_one(fake, discord_bot):
    """A redeploy: the DM came while no process had a session; the next process, knowing
    the DM from storage, reads it back at its start."""
    async with discord_bot(ScriptedBatcher("Noted.")):
        dm = fake.dm_message("before the redeploy")
        await fake.dispatch("MESSAGE_CREATE", dm)
        await final_reply(fake, dm["channel_id"])
    await fake.dispatch("MESSAGE_CREATE", fake.dm_message("while none ran"))  # to no session
    async with discord_bot(ScriptedBatcher("Noted again.")) as (_service, batcher):
        again = await final_reply(fake, dm["channel_id"], after=1)
    assert [prompt[-1]["content"] for prompt in batcher.prompts] == ["while none ran"]
    assert again["content"] == "Noted again."


async def test_a_message_read_back_is_held_to_the_askers_roles_as_a_live_one_is(fake, discord_bot):
    """A message read back names its author as a user, with no roles: Bob, denied by
    his role, was answered as if he had none. His member is looked up, and he is not."""
    fake.roles = {"77": "helpers", "78": "guests"}
    fake.member_roles = {fake.alice["id"]: ["77"], fake.bob["id"]: ["78"]}
    access = discord_rules(roles={"deny": ["78"]})
    async with discord_bot(ScriptedBatcher("Noted."), access=access) as (service, batcher):
        said = [
            fake.user_message(fake.channel_id, "hi", author=author, mentions_bot=True)
            for author in (fake.bob, fake.alice)
        ]
        await away(fake, *said)
        await final_reply(fake, said[1]["id"])  # Alice's, in its thread
        await until(lambda: nothing_pending(service.journal))
    assert len(batcher.prompts) == 1
    assert [m["content"] for m in bot_messages(fake, fake.channel_id)] == [replies.denied()]


async def test_after_forget_in_its_own_thread_the_next_message_starts_anew_there(fake, discord_bot):
    """Everything stored of the thread's conversation is deleted; the bot still answers in
    the thread it opened, from the next message alone (none of what came before)."""
    async with discord_bot() as (_service, batcher):
        message = await mention(fake, "hello bot")
        await final_reply(fake, message["id"])
        await fake.dispatch("MESSAGE_CREATE", fake.thread_message(message["id"], "forget"))
        told = await final_reply(fake, message["id"], after=1)
        after = fake.thread_message(message["id"], "a fresh start")
        await fake.dispatch("MESSAGE_CREATE", after)
        await final_reply(fake, message["id"], after=2)
    assert told["content"] == replies.forgotten()
    assert batcher.prompts[1] == [{"role": "user", "content": "a fresh start"}]


def test_a_thread_is_read_back_after_the_forgets_own_message():
    """Handled late (read back after an outage), a forget's time left out the messages
    sent after it; its message's snowflake does not."""
    from adapters.discord_adapter import _sent_after

    assert _sent_after((1_700_000_999.0, "1172000000000000000")).id == 1172000000000000000
    assert _sent_after((1_700_000_999.0, "")).timestamp() == 1_700_000_999.0
    assert _sent_after(None) is None


async def test_after_forget_in_another_thread_the_bot_answers_only_once_mentioned(
    fake, discord_bot
):
    async with discord_bot() as (_service, batcher):
        starter = fake.user_message(fake.channel_id, "a thread of ours")
        thread = await fake.start_thread(fake.channel_id, starter["id"], "ours", owner=fake.alice)
        asked = fake.thread_message(thread["id"], f"<@{fake.bot['id']}> hello", mentions=[fake.bot])
        await fake.dispatch("MESSAGE_CREATE", asked)
        await final_reply(fake, thread["id"])
        await fake.dispatch("MESSAGE_CREATE", fake.thread_message(thread["id"], "forget"))
        await final_reply(fake, thread["id"], after=1)
        await fake.dispatch("MESSAGE_CREATE", fake.thread_message(thread["id"], "still there?"))
        again = fake.thread_message(
            thread["id"], f"<@{fake.bot['id']}> and now?", mentions=[fake.bot]
        )
        await fake.dispatch("MESSAGE_CREATE", again)  # handled after the one before
        await final_reply(fake, thread["id"], after=2)
    assert [p[-1]["content"] for p in batcher.prompts] == ["hello", "and now?"]
    assert len(bot_messages(fake, thread["id"])) == 3  # "still there?" went unanswered
    # Mentioned again, it reads the thread from the forget on: what came before was read
    # again, and stored again, as if never forgotten.
    read_again = [m["content"] for m in batcher.prompts[1]]
    assert "still there?" in read_again and "forget" not in read_again


@pytest.mark.parametrize("store", [12], indirect=True)  # the thread read back, whole
async def test_a_thread_read_back_once_its_history_expired_starts_at_its_reset(
    fake, discord_bot, redis_client
):
    """A reset conversation whose history, and the reset's marker, expired is read back
    when the bot is mentioned in its thread again: from the reset on, as after a forget,
    not with what the reset set aside."""
    async with discord_bot(ScriptedBatcher("Noted.")) as (_service, batcher):
        starter = fake.user_message(fake.channel_id, "a thread of ours")
        thread = await fake.start_thread(fake.channel_id, starter["id"], "ours", owner=fake.alice)

        async def asked(text: str) -> None:
            message = fake.thread_message(
                thread["id"], f"<@{fake.bot['id']}> {text}", mentions=[fake.bot]
            )
            await fake.dispatch("MESSAGE_CREATE", message)

        await asked("My password is hunter2")
        await final_reply(fake, thread["id"])
        await fake.dispatch("MESSAGE_CREATE", fake.thread_message(thread["id"], "reset"))
        reset = await final_reply(fake, thread["id"], after=1)
        assert reset["content"] == replies.conversation_reset()
        key = str(ConversationKey("discord", fake.guild_id, fake.channel_id, thread["id"]))
        expired = (keys.conversation, keys.cleared, keys.facts)
        assert await redis_client.delete(*(name(key) for name in expired)) == 2
        fake.thread_message(thread["id"], "The weather is fine")  # not to the bot
        await asked("What is my password?")
        await final_reply(fake, thread["id"], after=2)
    read_back = [message["content"] for message in batcher.prompts[-1]]
    assert any("weather" in text for text in read_back)
    assert not any("hunter2" in text for text in read_back)


async def test_a_file_posted_earlier_in_the_thread_is_named_in_what_is_read_back(fake, discord_bot):
    """A file posted alone before the mention was dropped from the thread read back (its
    message has no text), and the model answered "the log" as if there were none."""
    async with discord_bot() as (_service, batcher):
        starter = fake.user_message(fake.channel_id, "the nightly build")
        thread = await fake.start_thread(fake.channel_id, starter["id"], "build", owner=fake.alice)
        log = fake.attachment(thread["id"], "crash.log", b"Traceback: KeyError", "text/plain")
        fake.thread_message(thread["id"], "", attachments=[log])
        asked = fake.thread_message(thread["id"], f"<@{fake.bot['id']}> what is wrong?",
                                    mentions=[fake.bot])  # fmt: skip
        await fake.dispatch("MESSAGE_CREATE", asked)
        await final_reply(fake, thread["id"])
    named = f"[attached: crash.log, text/plain, 19 bytes: {EARLIER}]"
    assert [m["content"] for m in batcher.prompts[0]][-2:] == [named, "what is wrong?"]


@pytest.mark.parametrize("reply_mode", ["thread", "inline"])
async def test_a_follow_up_without_a_mention_in_a_storage_outage_is_told_so(
    fake, discord_bot, monkeypatch, reply_mode
):
    """In the bot's own thread, or as a reply to its answer: the message cannot be kept,
    so its sender is told, where it was refused in silence and lost."""
    async with discord_bot(reply_mode=reply_mode) as (service, _batcher):
        message = await mention(fake, "hello bot")
        where = message["id"] if reply_mode == "thread" else fake.channel_id
        answer = await final_reply(fake, where)

        async def gone(*args, **kwargs):
            raise RedisConnectionError("Connection refused")

        monkeypatch.setattr(service.journal, "accept", gone)  # where a message is kept
        for name in ("exists", "answered_in"):  # where a message is routed
            monkeypatch.setattr(service.store, name, gone)
        if reply_mode == "thread":
            follow_up = fake.thread_message(where, "and another thing")
        else:
            follow_up = reply_to(fake, answer, "and another thing")
        await fake.dispatch("MESSAGE_CREATE", follow_up)
        told = await final_reply(fake, where, after=1)
    assert told["content"] == replies.storage_unavailable()


async def test_a_mention_of_the_bots_role_is_a_mention_of_the_bot(fake, discord_bot):
    """Typing @threadbot, people may pick the role Discord made for the bot."""
    async with discord_bot() as (_service, batcher):
        message = fake.user_message(fake.channel_id, "hello by role", mentions_bot_role=True)
        await fake.dispatch("MESSAGE_CREATE", message)
        await final_reply(fake, message["id"])
    assert [p[-1]["content"] for p in batcher.prompts] == ["hello by role"]


@pytest.mark.parametrize(
    ("status", "code", "text", "why"),
    [
        (403, 50013, "Missing Permissions", "Create Public Threads"),
        (400, 50024, "Cannot execute action on this channel type", "cannot be opened"),
    ],
    ids=["no permission", "a channel without threads"],
)
async def test_where_no_thread_may_be_opened_it_answers_inline(
    fake, discord_bot, monkeypatch, caplog, status, code, text, why
):
    """Discord refuses the thread (no Create Public Threads in the channel, or a channel
    that has no threads, such as a voice channel's chat): the answer is a reply to the
    question in the channel, a reply to it continues the conversation, and the operator
    is told once why."""

    async def refused(_req, _channel_id, _message_id):
        raise ApiError(status, code, text)

    monkeypatch.setattr(fake, "_post_thread", refused)
    channel = fake.snowflake()  # this test's own: the bot warns once per channel
    fake.channels[channel] = fake.channels[fake.channel_id] | {"id": channel, "name": "locked"}
    async with discord_bot(ScriptedBatcher("Noted.")) as (_service, batcher):
        with caplog.at_level(logging.WARNING, logger="adapters.discord_channel"):
            question = await mention(fake, "first question", channel)
            answer = await final_reply(fake, channel)
            await fake.dispatch("MESSAGE_CREATE", reply_to(fake, answer, "and then?"))
            await final_reply(fake, channel, after=1)
            other = await mention(fake, "another question", channel)
            await final_reply(fake, channel, after=2)
    answers = bot_messages(fake, channel)
    assert [a["content"] for a in answers] == ["Noted."] * 3
    assert [a["message_reference"]["message_id"] for a in answers[::2]] == [
        question["id"], other["id"],
    ]  # fmt: skip
    assert question["id"] not in fake.channels and other["id"] not in fake.channels
    assert [m["content"] for m in batcher.prompts[1]] == ["first question", "Noted.", "and then?"]
    assert batcher.prompts[2] == [{"role": "user", "content": "another question"}]
    [warning] = [r.getMessage() for r in caplog.records if r.name == "adapters.discord_channel"]
    assert channel in warning and why in warning


async def test_a_rate_limited_thread_is_opened_later_not_given_up_for_the_channel(
    fake, discord_bot, caplog
):
    """A 429 on opening the thread (Cloudflare's, which discord.py does not retry) is a
    wait, not a refusal: the answer comes in the thread once it opens, where it went inline
    and the channel was taken for one without threads."""
    fake.rate_limit("POST", r"/channels/\d+/messages/\d+/threads", via=False)
    async with discord_bot(ScriptedBatcher("Noted.")):
        with caplog.at_level(logging.WARNING, logger="adapters.discord_channel"):
            question = await mention(fake, "first question")
            answer = await final_reply(fake, question["id"])
    assert answer["content"] == "Noted." and not bot_messages(fake, fake.channel_id)
    assert not [r for r in caplog.records if r.name == "adapters.discord_channel"]


async def test_a_refused_mention_is_answered_in_place_with_no_thread_of_its_own(fake, discord_bot):
    """Past the rate limit, and a bare mention: each refusal is one reply to its message
    in the channel, where each opened a public thread holding that one line."""
    async with discord_bot(ScriptedBatcher("Noted."), access=Access(rate_limit_per_minute=1)):
        answered = await mention(fake, "first question")
        await final_reply(fake, answered["id"])
        limited = await mention(fake, "second question")
        bare = await mention(fake, "")
        await fake.wait_for(lambda: len(bot_messages(fake, fake.channel_id)) == 2)
    refusals = {
        r["message_reference"]["message_id"]: r for r in bot_messages(fake, fake.channel_id)
    }
    assert refusals.keys() == {limited["id"], bare["id"]}  # (either may be posted first)
    assert refusals[bare["id"]]["content"] == replies.empty_message()
    assert len(fake.requests_to("POST", r"/channels/\d+/messages/\d+/threads")) == 1


async def test_a_reply_to_a_line_of_the_bots_that_is_no_answer_starts_no_conversation(
    fake, discord_bot
):
    """In thread mode, a reply continues a conversation only under an answer given in the
    channel (where no thread could be opened): a reply to the help a mention got in place
    was answered there, a conversation in the channel, no thread opened for it."""
    async with discord_bot(ScriptedBatcher("Noted.")) as (_service, batcher):
        await mention(fake, "help")
        await fake.wait_for(lambda: len(bot_messages(fake, fake.channel_id)) == 1)
        [helped] = bot_messages(fake, fake.channel_id)
        await fake.dispatch("MESSAGE_CREATE", reply_to(fake, helped, "thanks, bot"))
        asked = await mention(fake, "and Paris?")  # handled after the one before
        await final_reply(fake, asked["id"])  # in a thread of its own
    assert [prompt[-1]["content"] for prompt in batcher.prompts] == ["and Paris?"]
    assert len(bot_messages(fake, fake.channel_id)) == 1


async def test_a_reply_to_an_answer_still_written_in_the_channel_continues_its_conversation(
    fake, discord_bot, monkeypatch
):
    """Threads refused, the answer is written in the channel; a reply to it while it is
    still written (not yet known as an answer) is the conversation's next turn, where it
    went unanswered."""

    async def refused(_req, _channel_id, _message_id):
        raise ApiError(403, 50013, "Missing Permissions")

    monkeypatch.setattr(fake, "_post_thread", refused)
    batcher = PacedBatcher("x" * 400, pace=0.25)
    async with discord_bot(batcher) as (_service, _batcher):
        await mention(fake, "first question")
        streaming = await fake.wait_for(lambda: bot_messages(fake, fake.channel_id), timeout=30)
        assert streaming[0]["content"].endswith(STREAMING_MARK)
        await fake.dispatch("MESSAGE_CREATE", reply_to(fake, streaming[0], "and then?"))
        await fake.wait_for(lambda: len(batcher.prompts) == 2, timeout=60)
    assert [m["content"] for m in batcher.prompts[1]][::2] == ["first question", "and then?"]


async def test_a_question_deleted_before_its_thread_opens_is_not_answered_in_the_channel(
    fake, discord_bot, monkeypatch, caplog
):
    """The asker deletes the question just before the bot opens its thread
    (Discord: 10008 Unknown Message): no answer appears bare in the channel, the log says
    why (not that threads are refused there), and the channel's next question gets its
    thread."""
    post_thread = fake._post_thread
    deleted: list[str] = []

    async def deleted_first(req, channel_id, message_id):
        if not deleted:
            deleted.append(message_id)
            fake.messages[channel_id].remove(fake.message(channel_id, message_id))
        return await post_thread(req, channel_id, message_id)

    monkeypatch.setattr(fake, "_post_thread", deleted_first)
    async with discord_bot(ScriptedBatcher("Noted.")):
        with caplog.at_level(logging.WARNING):
            gone = await mention(fake, "never mind")
            why = f"its question (message {gone['id']}) was deleted"

            def said(record: logging.LogRecord) -> bool:
                error = record.exc_info[1] if record.exc_info else None
                return why in record.getMessage() or why in str(error)

            def ended() -> bool:
                logged = any(said(record) for record in caplog.records)
                return logged or bool(bot_messages(fake, fake.channel_id))

            await fake.wait_for(ended)
            kept = await mention(fake, "a question that stays")
            answer = await final_reply(fake, kept["id"])
    assert deleted == [gone["id"]] and gone["id"] not in fake.channels
    assert answer["content"] == "Noted." and not bot_messages(fake, fake.channel_id)
    assert not any("Create Public Threads" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # told as expected


async def test_inline_an_answer_whose_question_was_deleted_is_not_posted(
    fake, discord_bot, monkeypatch, caplog
):
    """DISCORD_REPLY_MODE=inline, the question deleted as the bot starts typing: nothing
    is posted (Discord dropped the reference, and the answer stood bare in the channel),
    nothing is stored, and the log says why; the next question is answered."""
    typing = fake._typing
    deleted: list[str] = []

    async def deleted_first(req, channel_id):
        if not deleted:
            [question] = [
                m for m in fake.messages[channel_id] if m["author"]["id"] != fake.bot["id"]
            ]
            deleted.append(question["id"])
            fake.messages[channel_id].remove(question)
        return await typing(req, channel_id)

    monkeypatch.setattr(fake, "_typing", deleted_first)
    async with discord_bot(ScriptedBatcher("Noted."), reply_mode="inline") as (service, _b):
        with caplog.at_level(logging.WARNING):
            gone = await mention(fake, "never mind")
            why = f"its question (message {gone['id']}) was deleted"
            await fake.wait_for(lambda: any(why in r.getMessage() for r in caplog.records))
            kept = await mention(fake, "a question that stays")
            answer = await final_reply(fake, fake.channel_id)
        key = ConversationKey("discord", fake.guild_id, fake.channel_id, gone["id"])
        history = await service.store.load(str(key))
    assert all(m["role"] != "assistant" for m in history)
    assert deleted == [gone["id"]]
    assert answer["message_reference"]["message_id"] == kept["id"]
    assert len(bot_messages(fake, fake.channel_id)) == 1


async def test_a_thread_the_bot_may_not_post_in_ends_the_turn_at_once(
    fake, discord_bot, monkeypatch, caplog
):
    """Send Messages in Threads denied to the bot where it may still open threads: Discord
    refuses its typing and posts there (403). The turn ends with one line in the log,
    where each of its tries was refused again after a back-off, each with a traceback."""
    typing, refused = fake._typing, []

    async def not_in_threads(req, channel_id):
        if channel_id != fake.channel_id:
            refused.append(channel_id)
            raise ApiError(403, 50013, "Missing Permissions")
        return await typing(req, channel_id)

    monkeypatch.setattr(fake, "_typing", not_in_threads)
    async with discord_bot(ScriptedBatcher("Noted.")) as (service, _batcher):
        with caplog.at_level(logging.WARNING):
            question = await mention(fake, "a question")
            why = f"the bot may not post in {question['id']}"
            await fake.wait_for(lambda: any(why in r.getMessage() for r in caplog.records))
            async with asyncio.timeout(10):  # the turn is closed: none left pending
                while await service.journal.count():
                    await asyncio.sleep(0.05)
    assert refused == [question["id"]]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_dm_is_answered(fake, discord_bot):
    async with discord_bot() as (_service, batcher):
        message = fake.dm_message("hi there")
        await fake.dispatch("MESSAGE_CREATE", message)
        reply = await final_reply(fake, message["channel_id"])
    assert reply["content"]
    assert batcher.prompts == [[{"role": "user", "content": "hi there"}]]


async def test_bots_and_webhooks_are_not_answered(fake, discord_bot):
    async with discord_bot() as (_service, batcher):
        for message in (
            fake.bot_authored_message(fake.channel_id, f"<@{fake.bot['id']}> ping"),
            fake.webhook_message(fake.channel_id, f"<@{fake.bot['id']}> ping"),
        ):
            await fake.dispatch("MESSAGE_CREATE", message)
        person = fake.dm_message("from a person")
        await fake.dispatch("MESSAGE_CREATE", person)
        await final_reply(fake, person["channel_id"])
    assert bot_messages(fake, fake.channel_id) == []
    assert len(batcher.prompts) == 1


async def test_a_long_answer_is_split_across_messages(fake, discord_bot):
    async with discord_bot(ScriptedBatcher(LONG_CODE_ANSWER)):
        message = await mention(fake, "write a long program")
        await fake.wait_for(
            lambda: any("That is all." in m["content"] for m in bot_messages(fake, message["id"]))
        )
    parts = [m["content"] for m in bot_messages(fake, message["id"])]
    assert_split_with_fences(parts, MESSAGE_LIMIT)


async def test_no_message_can_ping_and_every_send_has_a_nonce(fake, discord_bot):
    answer = "@everyone look, <@1001> and <@&2000> " + "word " * 500
    async with discord_bot(ScriptedBatcher(answer)):
        message = await mention(fake, "say something loud")
        await fake.wait_for(lambda: len(bot_messages(fake, message["id"])) >= 2)
        await final_reply(fake, message["id"], after=1)
    sends = fake.requests_to("POST", r"/channels/\d+/messages")
    edits = fake.requests_to("PATCH", r"/channels/\d+/messages/\d+")
    assert sends and edits
    for request in sends + edits:
        allowed = request.json["allowed_mentions"]
        assert allowed["parse"] == []  # no @everyone/@here, roles or users from the text
        assert not allowed.get("users") and not allowed.get("roles")
        assert not allowed.get("replied_user")
    assert all(request.json["flags"] & 4 for request in sends)  # SUPPRESS_EMBEDS: no link fetched
    nonces = [request.json["nonce"] for request in sends]
    assert len(set(nonces)) == len(nonces)
    assert all(len(nonce) <= 25 for nonce in nonces)


async def test_a_rate_limited_send_is_retried_and_the_answer_arrives(fake, discord_bot):
    async with discord_bot(ScriptedBatcher("The final answer.")):
        fake.rate_limit("POST", r"/channels/\d+/messages", count=1, retry_after=0.1)
        message = await mention(fake, "hi")
        reply = await final_reply(fake, message["id"])
    assert reply["content"] == "The final answer."
    statuses = [r.status for r in fake.requests_to("POST", r"/channels/\d+/messages")]
    assert statuses[:2] == [429, 200]


async def test_after_a_resumable_disconnect_the_bot_resumes_and_answers(fake, discord_bot):
    async with discord_bot():
        first = fake.dm_message("before")
        await fake.dispatch("MESSAGE_CREATE", first)
        await final_reply(fake, first["channel_id"])
        await fake.close_gateway(4000)
        await fake.wait_resumed()
        second = fake.dm_message("after")
        await fake.dispatch("MESSAGE_CREATE", second)
        await final_reply(fake, second["channel_id"], after=1)
    assert (fake.identifies, fake.resumes) == (1, 1)


async def test_mentioned_in_another_thread_it_reads_the_thread_first(fake, discord_bot):
    async with discord_bot() as (_service, batcher):
        starter = fake.user_message(fake.channel_id, "we deploy on fridays")
        thread = await fake.start_thread(
            fake.channel_id, starter["id"], "deploys", owner=fake.alice
        )
        await fake.dispatch("MESSAGE_CREATE", fake.thread_message(thread["id"], "is that wise?"))
        asked = fake.thread_message(
            thread["id"],
            f"<@{fake.bot['id']}> what do you think, <@{fake.alice['id']}>?",
            mentions=[fake.bot, fake.alice],
        )
        await fake.dispatch("MESSAGE_CREATE", asked)
        await final_reply(fake, thread["id"])
    assert batcher.prompts[0] == [
        {"role": "user", "content": "we deploy on fridays"},  # the message the thread is from
        {"role": "user", "content": "is that wise?"},
        {"role": "user", "content": "what do you think, @Alice?"},
    ]


async def test_mentioned_in_a_long_thread_it_reads_its_last_messages_and_its_start(
    fake, discord_bot, monkeypatch
):
    monkeypatch.setattr(discord_adapter, "HISTORY_LIMIT", 3)
    async with discord_bot() as (_service, batcher):
        starter = fake.user_message(fake.channel_id, "we deploy on fridays")
        thread = await fake.start_thread(
            fake.channel_id, starter["id"], "deploys", owner=fake.alice
        )
        for n in range(1, 6):
            fake.thread_message(thread["id"], f"remark {n}")
        await fake.dispatch("MESSAGE_CREATE", fake.thread_message(
            thread["id"], f"<@{fake.bot['id']}> so?", mentions=[fake.bot]
        ))  # fmt: skip
        await final_reply(fake, thread["id"])
    assert [m["content"] for m in batcher.prompts[0]] == [
        "we deploy on fridays",  # the thread's start, however long the thread
        "remark 3",
        "remark 4",
        "remark 5",
        "so?",
    ]


async def test_a_connection_dropped_while_the_thread_is_read_still_gets_an_answer(
    fake, discord_bot, monkeypatch
):
    """discord.py passes most dropped connections on as aiohttp's errors: reading the
    thread's earlier messages failing so, the mention is answered without them, where it
    got "something went wrong" and was never taken."""
    history = discord.Thread.history

    def dropped_once(self, *args, **kwargs):
        monkeypatch.setattr(discord.Thread, "history", history)
        raise aiohttp.ServerDisconnectedError()

    monkeypatch.setattr(discord.Thread, "history", dropped_once)
    async with discord_bot() as (_service, batcher):
        starter = fake.user_message(fake.channel_id, "we deploy on fridays")
        thread = await fake.start_thread(
            fake.channel_id, starter["id"], "deploys", owner=fake.alice
        )
        await fake.dispatch("MESSAGE_CREATE", fake.thread_message(
            thread["id"], f"<@{fake.bot['id']}> is that wise?", mentions=[fake.bot]
        ))  # fmt: skip
        reply = await final_reply(fake, thread["id"])
    assert [m["content"] for m in batcher.prompts[0]] == ["is that wise?"]
    assert reply["content"] != replies.failed()


@pytest.mark.parametrize("sent", ["while the thread is read", "right after the mention"])
async def test_a_follow_up_while_a_mention_takes_the_bot_into_a_thread_is_answered(
    fake, discord_bot, sent
):
    """The next message comes, unasked, while the mention's turn is still being taken (the
    thread read, slowly), or before the mention is even routed (whether the bot is in the
    thread would be asked of Redis for both at once): it waits to learn that the bot is in
    the thread, and is answered after the mention, where it was taken for chatter and lost."""
    reading = sent == "while the thread is read"
    fake.history_delay = 1.0 if reading else 0.0
    async with discord_bot() as (_service, batcher):
        starter = fake.user_message(fake.channel_id, "we deploy on fridays")
        thread = await fake.start_thread(
            fake.channel_id, starter["id"], "deploys", owner=fake.alice
        )
        asked = fake.thread_message(
            thread["id"], f"<@{fake.bot['id']}> is that wise?", mentions=[fake.bot]
        )
        await fake.dispatch("MESSAGE_CREATE", asked)
        if reading:
            await fake.wait_for(lambda: fake.history_asked)
        follow_up = fake.thread_message(thread["id"], "and on mondays?")
        await fake.dispatch("MESSAGE_CREATE", follow_up)
        await final_reply(fake, thread["id"], after=1)
    assert [prompt[-1]["content"] for prompt in batcher.prompts] == [
        "is that wise?", "and on mondays?",
    ]  # fmt: skip


async def test_inline_mode_replies_and_follows_the_reply_chain(fake, discord_bot):
    async with discord_bot(reply_mode="inline") as (_service, batcher):
        message = await mention(fake, "first question")
        answer = await final_reply(fake, fake.channel_id)
        reply = fake.user_message(
            fake.channel_id,
            "second question",
            message_reference={"message_id": answer["id"], "channel_id": fake.channel_id},
            referenced_message=answer,
            type=19,
        )
        await fake.dispatch("MESSAGE_CREATE", reply)
        await final_reply(fake, fake.channel_id, after=1)
    assert answer["message_reference"]["message_id"] == message["id"]
    assert fake.channels.get(message["id"]) is None  # no thread in inline mode
    assert [m["role"] for m in batcher.prompts[1]] == ["user", "assistant", "user"]
    assert batcher.prompts[1][0]["content"] == "first question"
    assert batcher.prompts[1][2]["content"] == "second question"


async def test_inline_mode_a_forward_of_an_answer_is_no_reply_to_it(fake, discord_bot):
    """A forward refers to the message it copies as a reply does (a reference of type 1,
    with no referenced_message): it is not a reply, and costs no fetch of that message."""
    async with discord_bot(reply_mode="inline") as (_service, batcher):
        await mention(fake, "first question")
        answer = await final_reply(fake, fake.channel_id)
        refers = {"type": 1, "message_id": answer["id"], "channel_id": fake.channel_id}
        copied = ("type", "content", "embeds", "attachments", "timestamp", "edited_timestamp")
        snapshot = {"message": {field: answer[field] for field in copied}}
        forward = fake.user_message(
            fake.channel_id, "", message_reference=refers, message_snapshots=[snapshot]
        )
        await fake.dispatch("MESSAGE_CREATE", forward)
        await mention(fake, "second question")  # answered after the forward was handled
        await final_reply(fake, fake.channel_id, after=1)
    assert len(bot_messages(fake, fake.channel_id)) == 2 and len(batcher.prompts) == 2
    assert not fake.requests_to("GET", rf"/channels/{fake.channel_id}/messages/{answer['id']}")


async def test_a_message_forwarded_to_the_bot_is_read_with_its_files(fake, discord_bot):
    """A forward's own content is empty (the copy is in its snapshots): it was refused as
    an empty message, and the text and file it carried never reached the model."""
    notes = fake.attachment(fake.channel_id, "notes.txt", b"Ship on Friday.", "text/plain")
    copied = {
        "type": 0, "content": "the build is red since this morning", "embeds": [],
        "attachments": [notes], "timestamp": "2026-12-01T09:00:00+00:00",
        "edited_timestamp": None,
    }  # fmt: skip
    elsewhere = {"type": 1, "message_id": fake.snowflake(), "channel_id": fake.channel_id}
    async with discord_bot(max_input_chars=2000) as (_service, batcher):
        forward = fake.dm_message("", message_reference=elsewhere,
                                  message_snapshots=[{"message": copied}])  # fmt: skip
        await fake.dispatch("MESSAGE_CREATE", forward)
        await final_reply(fake, forward["channel_id"])
    assert batcher.prompts[0][-1]["content"] == (
        "[forwarded]\nthe build is red since this morning\n\n[attached: notes.txt]\nShip on Friday."
    )


async def test_code_in_a_mention_keeps_its_indentation(fake, discord_bot):
    """Every run of spaces in a message became one (to tidy the gap the mention left), so
    pasted code reached the model, and its history, without its indentation."""
    code = "why does this fail?\n```py\ndef f(x):\n    if x:\n        return 1\n```"
    async with discord_bot() as (_service, batcher):
        asked = await mention(fake, f"look  <@{fake.bot['id']}>  {code}")
        await final_reply(fake, asked["id"])
    assert batcher.prompts[0][-1]["content"] == f"look {code}"


async def test_a_sticker_alone_is_read_by_its_name(fake, discord_bot):
    """It was refused as an empty message ("Write a question"), in a DM or a thread the
    bot is in, where a wave deserves a greeting."""
    async with discord_bot() as (_service, batcher):
        wave = {"id": fake.snowflake(), "name": "Wave", "format_type": 1}
        sent = fake.dm_message("", sticker_items=[wave])
        await fake.dispatch("MESSAGE_CREATE", sent)
        reply = await final_reply(fake, sent["channel_id"])
    assert batcher.prompts[0][-1]["content"] == "[sticker: Wave]"
    assert reply["content"] != replies.empty_message()


async def test_inline_mode_a_reply_to_any_part_of_a_long_answer_continues(fake, discord_bot):
    """Every part of an answer split over messages replies to the question, so a reply to
    the last part (the natural one to reply to) leads back to the conversation too."""
    long_answer = "word " * 500 + "END."  # two messages
    batcher = ScriptedBatcher(long_answer)
    async with discord_bot(batcher, reply_mode="inline") as (_service, batcher):
        message = await mention(fake, "first question")
        last = await final_reply(fake, fake.channel_id, after=1)
        await fake.dispatch("MESSAGE_CREATE", reply_to(fake, last, "second question"))
        await fake.wait_for(lambda: len(batcher.prompts) == 2)
        await final_reply(fake, fake.channel_id, after=3)
    assert [m["role"] for m in batcher.prompts[1]] == ["user", "assistant", "user"]
    assert batcher.prompts[1][0]["content"] == "first question"
    assert batcher.prompts[1][2]["content"] == "second question"
    parts = bot_messages(fake, fake.channel_id)[:2]
    assert parts[-1] == last and last["content"].endswith("END.")
    assert [p["message_reference"]["message_id"] for p in parts] == [message["id"]] * 2


def reply_to(fake: FakeDiscord, target: dict, content: str, *, resolved: bool = True) -> dict:
    """alice's reply to `target`, as the gateway sends it: with the replied-to message one
    level deep (`resolved`), or without it, as Discord sometimes leaves it out."""
    reference = {"message_id": target["id"], "channel_id": target["channel_id"]}
    extra: dict = {"type": 19, "message_reference": reference}
    if resolved:
        extra["referenced_message"] = {k: v for k, v in target.items() if k != "referenced_message"}
    return fake.user_message(target["channel_id"], content, **extra)


async def test_inline_mode_a_mention_replying_deep_in_a_conversation_joins_it(
    fake, discord_bot, monkeypatch
):
    """A mention replying to a question, not to the bot's answer, in a conversation longer
    than REPLY_CHAIN_LIMIT hops: the walk back stopped partway and began a conversation
    there, its history lost; it now stops at the nearest answer the bot knows."""
    monkeypatch.setattr(discord_adapter, "REPLY_CHAIN_LIMIT", 3)
    async with discord_bot(ScriptedBatcher("Noted."), reply_mode="inline") as (_service, batcher):
        question = await mention(fake, "q0")
        answer = await final_reply(fake, fake.channel_id)
        for n in range(1, 4):
            question = reply_to(fake, answer, f"q{n}")
            await fake.dispatch("MESSAGE_CREATE", question)
            answer = await final_reply(fake, fake.channel_id, after=n)
        reference = {"message_id": question["id"], "channel_id": question["channel_id"]}
        deep = fake.user_message(
            fake.channel_id, "what about that?", mentions_bot=True, type=19,
            message_reference=reference,
            referenced_message={k: v for k, v in question.items() if k != "referenced_message"},
        )  # fmt: skip
        await fake.dispatch("MESSAGE_CREATE", deep)
        await final_reply(fake, fake.channel_id, after=4)
    asked = [m["content"] for m in batcher.prompts[-1]]
    assert asked[-3:] == ["q3", "Noted.", "what about that?"]  # its history before it


async def test_inline_mode_a_reply_routed_slowly_is_still_asked_before_the_next_one(
    fake, discord_bot
):
    """Two replies to one answer, one right after the other: the first's replied-to message
    must be fetched (slowly), the second's came with it. The first is still asked first,
    where the second, routed sooner, took its conversation's place ahead of it."""
    async with discord_bot(ScriptedBatcher("Noted."), reply_mode="inline") as (_service, batcher):
        await mention(fake, "first question")
        answer = await final_reply(fake, fake.channel_id)
        fake.fetch_delay = 0.5
        await fake.dispatch("MESSAGE_CREATE", reply_to(fake, answer, "why?", resolved=False))
        await fake.dispatch("MESSAGE_CREATE", reply_to(fake, answer, "and how?"))
        await final_reply(fake, fake.channel_id, after=2)
    assert [prompt[-1]["content"] for prompt in batcher.prompts] == [
        "first question", "why?", "and how?",
    ]  # fmt: skip


async def test_inline_mode_a_long_conversation_stays_one_without_walking_back(
    fake, discord_bot, monkeypatch
):
    """Each exchange adds two hops to the reply chain: a reply to an answer finds its
    conversation from that answer, with no walk back (no fetch of the chain, however
    long), where past REPLY_CHAIN_LIMIT hops the walk stopped midway and started a new
    conversation at each message."""
    monkeypatch.setattr(discord_adapter, "REPLY_CHAIN_LIMIT", 3)
    async with discord_bot(ScriptedBatcher("Noted."), reply_mode="inline") as (service, _batcher):
        first = await mention(fake, "question 0")
        answer = await final_reply(fake, fake.channel_id)
        for n in range(1, 5):
            offered = partial(fake.message, fake.channel_id, answer["id"])  # its buttons: it
            await fake.wait_for(lambda offered=offered: offered()["components"])  # is recorded
            await fake.dispatch("MESSAGE_CREATE", reply_to(fake, answer, f"question {n}"))
            answer = await final_reply(fake, fake.channel_id, after=n)
        key = ConversationKey("discord", fake.guild_id, fake.channel_id, first["id"])
        history = await service.store.load(str(key))
    assert [m["content"] for m in history if m["role"] == "user"][-1] == "question 4"
    assert not fake.requests_to("GET", rf"/channels/{fake.channel_id}/messages/\d+")


async def test_inline_mode_chatter_costs_no_rest_call(fake, discord_bot):
    """Whether a message is for the bot comes from its first hop: chatter (no mention, a
    reply to a person, a reply to a deleted message) is dropped without a request, even
    where the chain it replies to leads back to the bot."""
    async with discord_bot(ScriptedBatcher("Noted."), reply_mode="inline") as (_service, batcher):
        await mention(fake, "first question")
        answer = await final_reply(fake, fake.channel_id)
        follow_up = reply_to(fake, answer, "thanks, and another thing")
        await fake.dispatch("MESSAGE_CREATE", follow_up)
        await final_reply(fake, fake.channel_id, after=1)
        start = len(fake.requests)
        deleted = {"id": fake.snowflake(), "channel_id": fake.channel_id}
        for chatter in (
            fake.user_message(fake.channel_id, "lunch anyone?"),
            reply_to(fake, follow_up, "I agree with you, not the bot"),
            {  # the gateway's null: the replied-to message was deleted
                **reply_to(fake, deleted, "what was that?", resolved=False),
                "referenced_message": None,
            },
        ):
            await fake.dispatch("MESSAGE_CREATE", chatter)
        await mention(fake, "last question")
        await final_reply(fake, fake.channel_id, after=2)
    assert [prompt[-1]["content"] for prompt in batcher.prompts] == [
        "first question", "thanks, and another thing", "last question",
    ]  # fmt: skip
    answering = {("POST", f"/channels/{fake.channel_id}/messages"),
                 ("POST", f"/channels/{fake.channel_id}/typing")}  # fmt: skip
    made = {
        (r.method, r.path)
        for r in fake.requests[start:]
        if r.method != "PATCH" and not r.path.startswith("/applications/")  # start-up's commands
    }
    assert made == answering


async def no_thread(_req, _channel_id, _message_id):
    """The fake's thread opening, where the bot lacks Create Public Threads."""
    raise ApiError(403, 50013, "Missing Permissions")


@pytest.mark.parametrize("inline", ["inline mode", "no thread may be opened"])
async def test_answers_side_by_side_in_a_channel_edit_within_its_budget(
    fake, discord_bot, monkeypatch, inline
):
    """Discord limits a channel's edits together: three answers streaming into one
    channel skip drafts once its budget is spent (each would edit every 0.05 s here),
    and each still ends in its whole text (and its buttons' edits). Where no thread may
    be opened, each answer's budget was its question's, the thread it would have opened."""
    monkeypatch.setattr(discord_adapter, "EDITS_PER_MINUTE", EDITS_PER_MINUTE)
    if inline == "no thread may be opened":
        monkeypatch.setattr(fake, "_post_thread", no_thread)
    answer = "word " * 300
    batcher = PacedBatcher(answer, pace=0.03)
    mode = "inline" if inline == "inline mode" else "thread"
    async with discord_bot(batcher, reply_mode=mode):
        started = time.monotonic()
        for question in ("one?", "two?", "three?"):
            await mention(fake, question)
        finals = [await final_reply(fake, fake.channel_id, after=n) for n in range(3)]
        took = time.monotonic() - started
    assert [final["content"] for final in finals] == [answer.strip()] * 3
    edits = fake.requests_to("PATCH", rf"/channels/{fake.channel_id}/messages/\d+")
    drafts = [edit for edit in edits if edit.json.get("content", "").endswith(STREAMING_MARK)]
    assert 1 <= len(drafts) <= EDIT_BURST + EDITS_PER_MINUTE / 60 * took


async def test_inline_mode_reads_a_reply_the_gateway_left_unresolved(fake, discord_bot):
    """A reply whose replied-to message did not come with it costs one fetch; it is the
    bot's, so the reply continues that conversation."""
    async with discord_bot(ScriptedBatcher("Noted."), reply_mode="inline") as (_service, batcher):
        await mention(fake, "first question")
        answer = await final_reply(fake, fake.channel_id)
        await fake.dispatch("MESSAGE_CREATE", reply_to(fake, answer, "why?", resolved=False))
        await final_reply(fake, fake.channel_id, after=1)
    fetches = fake.requests_to("GET", r"/channels/\d+/messages/\d+")
    assert [r.path for r in fetches] == [f"/channels/{fake.channel_id}/messages/{answer['id']}"]
    assert [m["content"] for m in batcher.prompts[1]] == ["first question", "Noted.", "why?"]


async def test_the_reply_says_when_older_history_was_left_out(fake, discord_bot, make_engine):
    budget = make_engine().count_tokens([{"role": "user", "content": "x " * 40}])
    async with discord_bot(ScriptedBatcher("Noted."), prompt_budget=budget):
        first = fake.dm_message("a " * 30)
        await fake.dispatch("MESSAGE_CREATE", first)
        await final_reply(fake, first["channel_id"])
        await fake.dispatch("MESSAGE_CREATE", fake.dm_message("b " * 30))
        reply = await final_reply(fake, first["channel_id"], after=1)
    assert reply["content"] == f"*{replies.history_dropped(2)}*\n\nNoted."


async def test_reset_clears_the_conversation(fake, discord_bot):
    async with discord_bot():
        first = fake.dm_message("remember this")
        await fake.dispatch("MESSAGE_CREATE", first)
        await final_reply(fake, first["channel_id"])
        await fake.dispatch("MESSAGE_CREATE", fake.dm_message("reset"))
        cleared = await final_reply(fake, first["channel_id"], after=1)
    assert cleared["content"] == replies.conversation_reset()


async def test_a_failure_is_reported_and_the_adapter_goes_on(fake, discord_bot, make_batcher):
    async with discord_bot(FailsOnceBatcher(make_batcher())):
        first = fake.dm_message("first")
        await fake.dispatch("MESSAGE_CREATE", first)
        failed = await final_reply(fake, first["channel_id"])
        await fake.dispatch("MESSAGE_CREATE", fake.dm_message("second"))
        answered = await final_reply(fake, first["channel_id"], after=1)
    assert failed["content"] == replies.failed()
    assert answered["content"] and answered["content"] != replies.failed()


async def test_a_refused_message_content_intent_is_explained(make_service):
    async with FakeDiscord(privileged_intents=0) as fake, make_service() as (service, _batcher):
        adapter = DiscordAdapter.from_settings(settings_for(fake), service)
        with pytest.raises(AdapterError) as refused:
            await asyncio.wait_for(adapter.run(), timeout=30)
    assert str(refused.value) == INTENTS_HELP
    assert refused.value.setting  # `threadbot run` exits 2: no restart enables the intent


async def test_discord_out_of_reach_at_start_is_one_line(make_service):
    """A network outage, a firewall or a typo in DISCORD_API_URL: said in one line (the
    process exits 1 with it), where it was a traceback."""
    closed = f"http://127.0.0.1:{free_port()}/api"
    settings = Settings(_env_file=None, discord_bot_token="abc.def.ghi", discord_api_url=closed)
    async with make_service() as (service, _batcher):
        adapter = DiscordAdapter.from_settings(settings, service)
        with pytest.raises(
            AdapterError, match=f"could not reach Discord at DISCORD_API_URL={closed}"
        ):
            await asyncio.wait_for(adapter.run(), timeout=30)


@pytest.mark.slow
async def test_threadbot_run_serves_discord_until_sigterm(fake, threadbot_run):
    """The real command, configured only by settings, answers a mention and stops cleanly."""
    async with threadbot_run(DISCORD_BOT_TOKEN=fake.token, DISCORD_API_URL=fake.api_url) as stopped:
        await fake.wait_identified(timeout=120)
        message = await mention(fake, "What is the capital of France?")
        reply = await final_reply(fake, message["id"])
    assert "paris" in reply["content"].lower()
    assert stopped.returncode == 0  # SIGTERM is a clean stop
    assert "Traceback" not in stopped.stderr
    assert "oauth2/authorize?client_id=" in stopped.stderr  # the invite link was logged


# --- access rules -------------------------------------------------------------------------


def discord_rules(**rules: object) -> Access:
    return Access.model_validate({"discord": rules})


async def replies_to(fake: FakeDiscord, message: dict) -> list[str]:
    """The bot's short answers to `message` in its channel (no thread is opened for them),
    once a later message by Alice has been answered (so the denied one was handled)."""
    later = await mention(fake, "and me?")
    await final_reply(fake, later["id"])
    return [
        m["content"]
        for m in bot_messages(fake, message["channel_id"])
        if (m.get("message_reference") or {}).get("message_id") == message["id"]
    ]


@pytest.mark.parametrize(
    "rules",
    [
        {"users": {"deny": ["1003"]}},
        {"roles": {"allow": ["77"]}},  # Bob has only role 78
        {"roles": {"deny": ["78"]}},
        {"servers": {"allow": ["123"]}},
        {"channels": {"deny": ["closed"]}},
    ],
)
async def test_denied_by_user_role_server_or_channel(fake, discord_bot, rules):
    """Bob, in the closed channel, is denied; Alice, an admin, is answered whatever the rules."""
    fake.roles = {"77": "helpers", "78": "guests"}
    fake.member_roles = {fake.alice["id"]: ["77"], fake.bob["id"]: ["78"]}
    closed = fake.snowflake()  # this test's own: a denial is remembered for an hour
    fake.channels[closed] = fake.channels[fake.channel_id] | {"id": closed, "name": "closed"}
    if "channels" in rules:
        rules = {"channels": {"deny": [closed]}}
    access = discord_rules(**rules).model_copy(update={"admins": (fake.alice["id"],)})
    async with discord_bot(access=access) as (_service, batcher):
        denied = fake.user_message(closed, "hello", author=fake.bob, mentions_bot=True)
        await fake.dispatch("MESSAGE_CREATE", denied)
        again = fake.user_message(closed, "hello?", author=fake.bob, mentions_bot=True)
        await fake.dispatch("MESSAGE_CREATE", again)
        said = await replies_to(fake, denied)
        said_again = await replies_to(fake, again)
    assert said == [replies.denied()]
    assert said_again == []  # once an hour per conversation
    assert [p[-1]["content"] for p in batcher.prompts] == ["and me?", "and me?"]
    assert denied["id"] not in fake.channels  # no thread was opened for it


async def test_dms_off(fake, discord_bot):
    async with discord_bot(access=discord_rules(dms=False)) as (_service, batcher):
        dm = fake.dm_message("hi in private")
        await fake.dispatch("MESSAGE_CREATE", dm)
        said = await replies_to(fake, dm)
    assert said == [replies.denied()]
    assert [p[-1]["content"] for p in batcher.prompts] == ["and me?"]


@pytest.mark.parametrize(
    ("rules", "in_no_server", "answered", "looked_up"),
    [
        ({}, False, True, False),  # neither servers nor roles rules: DMs as ever
        ({"roles": {"allow": ["77"]}}, False, False, True),  # Bob has only role 78
        ({"roles": {"allow": ["78"]}}, False, True, True),
        ({"roles": {"deny": ["78"]}}, False, False, True),
        ({"roles": {"deny": ["77"]}}, True, False, True),  # a member of none of the bot's servers
        ({"roles": {"allow": ["78"]}, "servers": {"allow": ["123"]}}, False, False, False),
        ({"servers": {"allow": [FakeDiscord.guild_id]}}, False, True, True),
        ({"servers": {"allow": [FakeDiscord.guild_id]}}, True, False, True),
        ({"servers": {"deny": [FakeDiscord.guild_id]}}, False, False, False),  # in that one alone
    ],
)
async def test_server_and_role_rules_apply_to_dms_by_the_bots_servers_the_asker_is_in(
    fake, discord_bot, rules, in_no_server, answered, looked_up
):
    """A DM is in no server: with a servers or roles rule, Bob is answered there only as a
    member of a server of the bot's that the rules admit, with an allowed role (and no
    denied one) there; without either rule, as ever."""
    fake.roles = {"77": "helpers", "78": "guests"}
    fake.member_roles = {fake.bob["id"]: ["78"]}
    fake.member_of = {fake.bob["id"]: set()} if in_no_server else {}
    access = discord_rules(**rules).model_copy(update={"admins": (fake.alice["id"],)})
    async with discord_bot(access=access) as (_service, batcher):
        dm = fake.dm_message("hi in private", author=fake.bob)
        await fake.dispatch("MESSAGE_CREATE", dm)
        if answered:
            await final_reply(fake, dm["channel_id"])
        said = await replies_to(fake, dm)
    assert said == ([] if answered else [replies.denied()])
    assert ("hi in private" in [p[-1]["content"] for p in batcher.prompts]) == answered
    lookups = fake.requests_to("GET", rf"/guilds/{fake.guild_id}/members/{fake.bob['id']}")
    assert bool(lookups) == looked_up


def member_lookups(fake: FakeDiscord, user: dict) -> list[str]:
    """The servers where the bot looked `user` up, in order."""
    lookups = fake.requests_to("GET", rf"/guilds/\d+/members/{user['id']}")
    return [request.path.split("/")[2] for request in lookups]


async def dm_answered(fake: FakeDiscord, content: str, *, after: int = 0) -> None:
    dm = fake.dm_message(content, author=fake.bob)
    await fake.dispatch("MESSAGE_CREATE", dm)
    await final_reply(fake, dm["channel_id"], after=after)


def many_servers(fake: FakeDiscord) -> list[str]:
    """More servers of the bot's than one DM may look up, after the fake's own."""
    servers = [str(3001 + i) for i in range(DM_LOOKUPS + 2)]
    fake.guilds |= {server: f"Server {server}" for server in servers}
    return servers


@pytest.fixture
def clock(monkeypatch):
    """The clock remembered memberships expire by, moved by hand (`clock.now += 10`)."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(discord_channel, "monotonic", lambda: clock.now)
    return clock


async def dm_denied(fake: FakeDiscord, content: str) -> None:
    dm = fake.dm_message(content, author=fake.bob)
    await fake.dispatch("MESSAGE_CREATE", dm)
    [denied] = await fake.wait_for(lambda: bot_messages(fake, dm["channel_id"]))
    assert denied["content"] == replies.denied()


async def test_a_dm_askers_membership_is_remembered(fake, discord_bot):
    """Each lookup is a REST call under Discord's global limit: Bob's next DM makes none."""
    fake.member_roles = {fake.bob["id"]: ["78"]}
    async with discord_bot(access=discord_rules(roles={"allow": ["78"]})):
        await dm_answered(fake, "first")
        await dm_answered(fake, "second", after=1)
    assert member_lookups(fake, fake.bob) == [fake.guild_id]


async def test_dm_lookups_stop_at_the_first_server_that_admits(fake, discord_bot):
    """The servers the rules admit are looked up in turn, only until one admits Bob."""
    servers = many_servers(fake)
    fake.member_roles = {fake.bob["id"]: ["78"]}
    fake.member_of = {fake.bob["id"]: {servers[1], servers[2]}}
    rules = discord_rules(roles={"allow": ["78"]}, servers={"deny": [fake.guild_id]})
    async with discord_bot(access=rules):
        await dm_answered(fake, "hi in private")
    assert member_lookups(fake, fake.bob) == servers[:2]


async def test_dm_lookups_are_bounded(fake, discord_bot):
    """Bob, a member of the bot's last server alone, is looked for in DM_LOOKUPS servers
    and denied: one DM costs a bounded number of REST calls."""
    servers = many_servers(fake)
    fake.member_of = {fake.bob["id"]: {servers[-1]}}
    rules = discord_rules(servers={"deny": [fake.guild_id]})
    access = rules.model_copy(update={"admins": (fake.alice["id"],)})  # Alice: replies_to
    async with discord_bot(access=access):
        dm = fake.dm_message("hi in private", author=fake.bob)
        await fake.dispatch("MESSAGE_CREATE", dm)
        said = await replies_to(fake, dm)
    assert said == [replies.denied()]
    assert member_lookups(fake, fake.bob) == servers[:DM_LOOKUPS]


async def test_a_remembered_admitting_membership_counts_whatever_the_lookups_left(
    fake, discord_bot, monkeypatch, clock
):
    """Bob is a member of the bot's fourth server alone. His first DM looks in the first
    three (denied), his second in the fourth (answered). Once the first three have expired,
    his third DM, with two lookups a DM, is answered by the fourth, still remembered, with
    no lookup: the expired servers ahead of it neither use up the lookups nor deny him."""
    monkeypatch.setattr(discord_channel, "DM_LOOKUPS", 3)
    servers = many_servers(fake)
    fake.member_of = {fake.bob["id"]: {servers[3]}}
    rules = discord_rules(servers={"deny": [fake.guild_id]})
    async with discord_bot(access=rules) as (_service, batcher):
        await dm_denied(fake, "first")
        clock.now += MEMBERSHIP_SECONDS * 0.6
        await dm_answered(fake, "second", after=1)
        clock.now += MEMBERSHIP_SECONDS * 0.6
        monkeypatch.setattr(discord_channel, "DM_LOOKUPS", 2)
        await dm_answered(fake, "third", after=2)
    assert [p[-1]["content"] for p in batcher.prompts] == ["second", "third"]
    assert member_lookups(fake, fake.bob) == servers[:4]


async def test_a_failed_member_lookup_is_retried_soon(fake, discord_bot, monkeypatch, clock):
    """A failure is remembered FAILED_LOOKUP_SECONDS, not as long as an answer: Bob, a
    member denied on a timed-out lookup, is answered once that time has passed."""
    monkeypatch.setattr(discord_channel, "LOOKUP_SECONDS", 0.1)
    fake.member_lookup_delay = 1.0
    fake.member_roles = {fake.bob["id"]: ["78"]}
    async with discord_bot(access=discord_rules(roles={"allow": ["78"]})):
        await dm_denied(fake, "first")
        fake.member_lookup_delay = 0.0
        clock.now += FAILED_LOOKUP_SECONDS
        await dm_answered(fake, "second", after=1)
    assert member_lookups(fake, fake.bob) == [fake.guild_id] * 2


async def test_a_failed_member_lookup_counts_as_not_a_member(
    fake, discord_bot, monkeypatch, caplog
):
    """A lookup that times out (no HTTP error) denies, as not a member, with no failure
    shown to the asker; it is remembered a while, so logged once."""
    monkeypatch.setattr(discord_channel, "LOOKUP_SECONDS", 0.1)
    fake.member_lookup_delay = 1.0
    fake.member_roles = {fake.bob["id"]: ["78"]}
    rules = discord_rules(roles={"allow": ["78"]})
    access = rules.model_copy(update={"admins": (fake.alice["id"],)})  # Alice: replies_to
    async with discord_bot(access=access) as (_service, batcher):
        first = fake.dm_message("hi in private", author=fake.bob)
        await fake.dispatch("MESSAGE_CREATE", first)
        [denied] = await fake.wait_for(lambda: bot_messages(fake, first["channel_id"]))
        again = fake.dm_message("hello?", author=fake.bob)
        await fake.dispatch("MESSAGE_CREATE", again)
        said_again = await replies_to(fake, again)
    assert denied["content"] == replies.denied()
    assert said_again == []  # told once an hour, as any denial
    assert [p[-1]["content"] for p in batcher.prompts] == ["and me?"]
    assert member_lookups(fake, fake.bob) == [fake.guild_id]
    failures = [r for r in caplog.records if r.getMessage().startswith("could not look up")]
    assert [r.levelno for r in failures] == [logging.WARNING]


# --- attachments --------------------------------------------------------------------------


async def test_a_text_attachment_reaches_the_prompt(fake, discord_bot):
    text = "Ship on Friday — maybe.".encode()
    notes = fake.attachment(fake.channel_id, "notes.txt", text, "text/plain; charset=utf-8")
    async with discord_bot(max_input_chars=2000) as (_service, batcher):
        message = fake.user_message(
            fake.channel_id, "what does this say?", mentions_bot=True, attachments=[notes]
        )
        await fake.dispatch("MESSAGE_CREATE", message)
        await final_reply(fake, message["id"])
    assert batcher.prompts[0][-1]["content"] == (
        "what does this say?\n\n[attached: notes.txt]\nShip on Friday — maybe."
    )
    assert len(fake.downloads) == 1


async def test_a_message_sent_while_the_one_before_it_downloads_its_file_comes_after_it(
    fake, discord_bot
):
    """Two messages of one conversation, the first with a file that takes a while to
    download: the second waits for it, and is asked (and stored) after it."""
    dm = fake.dm_channel(fake.alice["id"])["id"]
    notes = fake.attachment(dm, "notes.txt", b"Ship on Friday.", "text/plain")
    fake.cdn_delay = 0.5
    async with discord_bot(max_input_chars=2000) as (_service, batcher):
        await fake.dispatch("MESSAGE_CREATE", fake.dm_message("read this", attachments=[notes]))
        await fake.dispatch("MESSAGE_CREATE", fake.dm_message("and when do we ship?"))
        await final_reply(fake, dm, after=1)
    first, second = batcher.prompts
    assert first[-1]["content"] == "read this\n\n[attached: notes.txt]\nShip on Friday."
    assert second[-1]["content"] == "and when do we ship?"


async def test_a_text_attachment_over_the_prompts_tokens_is_cut_to_fit_not_refused(
    fake, discord_bot
):
    """A log file within the characters allowed but over the prompt's tokens (as Japanese
    text or a log is, at under two characters a token): its text is cut, and marked, to
    what fits beside the system prompt, where the whole message was refused, which the
    asker cannot shorten."""
    dm = fake.dm_channel(fake.alice["id"])["id"]
    log = "".join(f"12:{n:04} ERROR worker-{n % 7} lost its lease #{n * 7919 % 10007}\n"
                  for n in range(400))  # fmt: skip
    app_log = fake.attachment(dm, "app.log", log.encode(), "text/plain")
    budget = 400
    async with discord_bot(
        max_input_chars=30000, max_attachment_chars=30000, prompt_budget=budget
    ) as (service, batcher):
        await fake.dispatch("MESSAGE_CREATE", fake.dm_message("why?", attachments=[app_log]))
        await final_reply(fake, dm)
    [prompt] = batcher.prompts
    asked = prompt[-1]["content"]
    assert asked.startswith("why?\n\n[attached: app.log]\n12:0000 ERROR worker-0")
    assert asked.endswith("\n[… truncated]") and len(asked) < len(log) / 2
    assert service.count_tokens(prompt) <= budget


async def test_a_binary_attachment_alone_is_named_and_not_downloaded(fake, discord_bot):
    dm = fake.dm_channel(fake.alice["id"])["id"]
    photo = fake.attachment(dm, "photo.png", b"\x89PNG\r\n" + bytes(120_000), "image/png")
    async with discord_bot(max_input_chars=2000) as (_service, batcher):
        message = fake.dm_message("", attachments=[photo])
        await fake.dispatch("MESSAGE_CREATE", message)
        await final_reply(fake, dm)
    assert batcher.prompts == [
        [{"role": "user", "content": "[attached: photo.png, image/png, 121 KB: not read]"}]
    ]
    assert fake.downloads == []


async def test_attachments_too_large_or_unavailable_are_named_and_the_turn_goes_on(
    fake, discord_bot
):
    dm = fake.dm_channel(fake.alice["id"])["id"]
    huge = fake.attachment(dm, "huge.log", b"x" * (MAX_FILE_BYTES + 1), "text/plain")
    expired = fake.attachment(dm, "old.txt", b"from last year", "text/plain")
    expired["url"] = expired["url"].replace("hm=", "hm=0")  # a URL the CDN did not sign
    async with discord_bot(max_input_chars=2000) as (_service, batcher):
        message = fake.dm_message("two files", attachments=[huge, expired])
        await fake.dispatch("MESSAGE_CREATE", message)
        reply = await final_reply(fake, dm)
    assert batcher.prompts[0][-1]["content"] == (
        "two files\n\n"
        "[attached: huge.log, text/plain, 1.0 MB: not read: larger than 1.0 MB]\n\n"
        "[attached: old.txt, text/plain, 14 bytes: not read: the download failed]"
    )
    assert reply["content"]
    assert fake.downloads == []
