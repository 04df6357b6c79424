"""Fault injection: `threadbot run` as a real process, the fake Slack (and Discord), and a
redis-server of the test's own; each test says what it injects and what must hold.

Every run logs at DEBUG; after each test its whole log is searched for every token,
secret and password the test configured, and none may appear.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BYTE_LEVEL_WHITESPACE, data_dir_with
from fake_discord import FakeDiscord
from fake_slack import FakeSlack
from processes import BotProcess, RedisServer
from redis.asyncio import Redis
from test_cli import cli_env
from test_ops import until
from test_prompt import STRICT_TEMPLATE

from adapters.slack_adapter import PLACEHOLDER
from adapters.streaming import STREAMING_MARK
from bot import replies
from storage import keys

pytestmark = pytest.mark.slow

REDIS_PASSWORD = "fault-test-redis-password"
DRAGON = "Write a long story about a dragon who learns to bake bread."
PAUSED = (replies.restarting(), replies.storage_lost())


@pytest.fixture
def redis_server(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path / "redis", password=REDIS_PASSWORD)
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as fake:
        yield fake


@pytest.fixture
async def bot(tmp_path: Path, bundled_cache: Path, redis_server: RedisServer, slack: FakeSlack):
    """Starts `threadbot run` (the bundled model, the fake Slack, the test's Redis) with
    extra settings; every start shares one data dir and one log. After the test, any
    process still running is killed, and the log is checked for secrets."""
    data = data_dir_with(bundled_cache, tmp_path / "data")
    log = tmp_path / "threadbot.log"
    started: list[BotProcess] = []
    secrets = [slack.bot_token, slack.app_token, REDIS_PASSWORD]

    async def start(code: str | None = None, **settings: str) -> BotProcess:
        defaults = dict(
            MODEL="bundled", MAX_NEW_TOKENS="60", DATA_DIR=str(data), REDIS_URL=redis_server.url,
            SLACK_BOT_TOKEN=slack.bot_token, SLACK_APP_TOKEN=slack.app_token,
            SLACK_API_URL=slack.api_url, STREAM_EDIT_INTERVAL="0.2", TURN_LEASE_S="1",
            LOG_LEVEL="DEBUG", SLACK_STREAMING="edit",  # the faults of the placeholder path
        )  # fmt: skip
        env = cli_env(**(defaults | settings))
        secrets.extend(value for name, value in settings.items() if name.endswith("_TOKEN"))
        process = BotProcess(cwd=tmp_path, env=env, log=log, code=code)
        connections = slack.connections
        await process.start()
        started.append(process)
        await slack.wait_for(lambda: slack.connections > connections or not process.alive, 120)
        assert process.alive, process.text()
        return process

    yield start
    for process in started:
        await process.close()
    if log.exists():
        text = log.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, "a secret reached the log"


def bot_replies(slack: FakeSlack, channel: str, thread_ts: str | None) -> list[dict]:
    return [
        m
        for m in slack.channels.get(channel, [])
        if m.get("user") == slack.bot_user_id and m.get("thread_ts") == thread_ts
    ]


async def streaming(slack: FakeSlack, mention: dict) -> None:
    """Once the answer to `mention` is being written (a partial text is shown)."""
    await slack.wait_for(
        lambda: any(
            m["text"].endswith(STREAMING_MARK)
            for m in bot_replies(slack, mention["channel"], mention["ts"])
        ),
        60,
    )


def is_final(text: str) -> bool:
    return text != PLACEHOLDER and not text.endswith(STREAMING_MARK) and text not in PAUSED


async def answered(slack: FakeSlack, channel: str, thread_ts: str | None, timeout: float = 90):
    """The thread's bot messages once every one of them shows a final text."""

    def done() -> list[dict] | None:
        posts = bot_replies(slack, channel, thread_ts)
        return posts if posts and all(is_final(m["text"]) for m in posts) else None

    return await slack.wait_for(done, timeout)


async def stored(redis_server: RedisServer, conversation: str) -> list[dict]:
    async with Redis.from_url(redis_server.url, decode_responses=True) as client:
        return [json.loads(m) for m in await client.lrange(keys.conversation(conversation), 0, -1)]


async def stored_once_answered(
    redis_server: RedisServer, conversation: str, turns: int
) -> list[dict]:
    """The history once it holds `turns` questions and answers: an answer is shown in its
    thread before it is stored, so a test that has seen it may read the history too soon."""
    return await until(
        lambda: stored(redis_server, conversation), lambda history: len(history) >= 2 * turns
    )


async def test_kill_9_while_an_answer_streams(slack, bot, redis_server):
    """Injected: SIGKILL while an answer streams. Holds: after the restart the thread has
    exactly one message, the whole answer, in the placeholder posted before the crash. The
    dead process's hold on the conversation lapses soon after its turns' (TURN_LEASE_S,
    twice that), not after a fixed 30 s, which the turn taken over waited for."""
    first = await bot()
    mention = slack.app_mention("C0001", DRAGON)
    conversation = f"slack:{slack.team_id}:C0001:{mention['ts']}"
    await slack.send_event(mention)
    await streaming(slack, mention)
    async with Redis.from_url(redis_server.url) as client:
        assert 0 < await client.pttl(keys.turn_lock(conversation)) <= 2000
    first.kill()
    await first.wait()
    second = await bot()
    [reply] = await answered(slack, "C0001", mention["ts"])
    assert len(slack.calls_to("chat.postMessage", ok_only=True)) == 1  # the one placeholder
    assert reply["ts"] == slack.calls_to("chat.postMessage")[0].response["ts"]
    await second.wait_log(r"answered turn slack:\S+ \(attempt 2\)")
    history = await stored(redis_server, conversation)
    assert [m["role"] for m in history] == ["user", "assistant"]


async def test_kill_9_after_the_answer_was_posted_before_it_was_marked_done(slack, bot):
    """Injected: SIGKILL the moment Slack has the final answer, before the bot hears back
    (so before the turn is marked done). Holds: after the restart, no second message, and
    the answer shown is the one shown before the crash."""
    first = await bot()
    mention = slack.app_mention("C0001", "What is the capital of France?")

    def kill_on_the_final_edit(call: Any) -> None:
        text = call.params.get("text", "")
        if call.method == "chat.update" and call.ok and is_final(text):
            slack.after_call = None
            os.kill(first.process.pid, signal.SIGKILL)

    slack.after_call = kill_on_the_final_edit
    await slack.send_event(mention)
    assert await first.wait() == -signal.SIGKILL
    [shown] = bot_replies(slack, "C0001", mention["ts"])
    assert is_final(shown["text"])
    before = shown["text"]
    second = await bot()
    await second.wait_log(r"answered turn slack:\S+ \(attempt 2\)")
    [reply] = await answered(slack, "C0001", mention["ts"])
    assert reply["text"] == before
    assert len(slack.calls_to("chat.postMessage", ok_only=True)) == 1
    assert "prompt for" not in second.text()  # delivered from the record, not generated again


async def test_sigterm_with_answers_running_and_waiting(slack, bot):
    """Injected: SIGTERM with 2 answers running and 1 waiting (MAX_BATCH=2). Holds: exit 0
    within the grace period; the threads say the bot is restarting; after the restart
    each of the 3 has exactly one message, a whole answer."""
    settings = {"MAX_BATCH": "2", "SHUTDOWN_GRACE_S": "1"}
    first = await bot(**settings)
    mentions = [slack.app_mention("C0001", f"{DRAGON} Part {n}.") for n in (1, 2, 3)]
    for mention in mentions:
        await slack.send_event(mention)
    await first.wait_log(r"(?s)(prompt for .*){3}")  # all three accepted and queued
    await slack.wait_for(lambda: len(slack.calls_to("chat.postMessage", ok_only=True)) == 3)
    started = asyncio.get_running_loop().time()
    assert await first.stop() == 0
    assert asyncio.get_running_loop().time() - started < 1 + 10  # grace, plus closing down
    assert "stopped cleanly; 3 turns stay pending" in first.text()
    for mention in mentions:
        [paused] = bot_replies(slack, "C0001", mention["ts"])
        assert paused["text"] == replies.restarting()
    second = await bot(**settings)
    for mention in mentions:
        [reply] = await answered(slack, "C0001", mention["ts"], timeout=180)
        assert len(reply["text"]) > 20
    assert len(slack.calls_to("chat.postMessage", ok_only=True)) == 3
    await second.wait_log(r"(?s)(answered turn \S+ \(attempt 1\).*){3}")  # a stop is no try


async def test_redis_killed_and_restarted_on_the_same_port(slack, bot, redis_server):
    """Injected: redis-server SIGKILLed while the bot runs, then started again on its port.
    Holds: the bot never exits; a message during the outage gets the 'unavailable' reply;
    after it, new mentions and an old thread (its history intact) are answered."""
    process = await bot(REDIS_HEALTH_CHECK_S="1")
    before = slack.app_mention("C0001", "What is the capital of France?")
    await slack.send_event(before)
    await answered(slack, "C0001", before["ts"])

    redis_server.kill()
    during = slack.app_mention("C0002", "Are you there?")
    await slack.send_event(during)
    [refused] = await answered(slack, "C0002", during["ts"])
    assert refused["text"] == replies.storage_unavailable()
    assert process.alive

    redis_server.start()
    after = slack.app_mention("C0003", "What is the capital of Italy?")
    await slack.send_event(after)
    await answered(slack, "C0003", after["ts"])
    follow_up = slack.user_message("C0001", "And of Spain?", thread_ts=before["ts"])
    await slack.send_event(follow_up)
    await slack.wait_for(lambda: len(bot_replies(slack, "C0001", before["ts"])) == 2, 90)
    await answered(slack, "C0001", before["ts"])
    assert f"prompt for slack:{slack.team_id}:C0001:{before['ts']}: 3 messages" in process.text()
    assert process.alive
    assert "storage unavailable" in process.text()


async def test_redelivered_events_are_answered_once(slack, bot, redis_server):
    """Injected: one Slack event delivered 4 times (Slack's retries), one Discord message
    dispatched twice. Holds: one answer each."""
    async with FakeDiscord() as discord_fake:
        process = await bot(DISCORD_BOT_TOKEN=discord_fake.token,
                            DISCORD_API_URL=discord_fake.api_url)  # fmt: skip
        await discord_fake.wait_identified(timeout=60)
        mention = slack.app_mention("C0001", "What is the capital of France?")
        for attempt in range(4):
            await slack.send_event(mention, retry_attempt=attempt, event_id="Ev0REDELIVERED")
        message = discord_fake.dm_message("What is the capital of France?")
        for _ in range(2):
            await discord_fake.dispatch("MESSAGE_CREATE", message)
        await answered(slack, "C0001", mention["ts"])
        channel = message["channel_id"]
        await discord_fake.wait_for(
            lambda: any(
                m["author"]["id"] == discord_fake.bot["id"]
                and not m["content"].endswith(STREAMING_MARK)
                for m in discord_fake.messages.get(channel, [])
            ),
            90,
        )
        await asyncio.sleep(1)  # time for any second answer to show up
        ours = [
            m
            for m in discord_fake.messages.get(channel, [])
            if m["author"]["id"] == discord_fake.bot["id"]
        ]
    assert len(bot_replies(slack, "C0001", mention["ts"])) == 1
    assert len(ours) == 1
    assert all(r.json.get("flags", 0) & 4 for r in discord_fake.requests_to("POST", r"/messages"))
    assert process.text().count("skipping re-delivered message") >= 4
    assert process.alive


async def test_reset_during_a_running_answer_and_kill_9(slack, bot, redis_server):
    """Injected: `reset` in the thread while its answer streams, then SIGKILL while the
    reset waits for it. Holds: after the restart the answer is completed, then the reset
    is done and told, once, and the next turn's prompt holds that turn alone. (The reset
    was marked seen as it came, and lost with the process, untold.)"""
    first = await bot(MAX_NEW_TOKENS="100")
    mention = slack.app_mention("C0001", DRAGON)
    await slack.send_event(mention)
    await streaming(slack, mention)
    await slack.send_event(slack.user_message("C0001", "reset", thread_ts=mention["ts"]))
    async with Redis.from_url(redis_server.url) as client:
        await until(lambda: client.zcard(keys.PENDING_TURNS), lambda pending: pending == 2)
    first.kill()
    await first.wait()
    second = await bot(MAX_NEW_TOKENS="100")
    answer, cleared = await slack.wait_for(
        lambda: (posts := bot_replies(slack, "C0001", mention["ts"])) and len(posts) == 2
        and is_final(posts[0]["text"]) and is_final(posts[1]["text"]) and posts,
        90,
    )  # fmt: skip
    assert len(answer["text"]) > 100  # whole, not cut off by the reset
    assert cleared["text"] == replies.conversation_reset()
    again = slack.app_mention("C0001", "What is the capital of France?", thread_ts=mention["ts"])
    await slack.send_event(again)
    await answered(slack, "C0001", mention["ts"])
    conversation = f"slack:{slack.team_id}:C0001:{mention['ts']}"
    history = await stored_once_answered(redis_server, conversation, 1)
    assert len(history) == 2 and "capital of France" in history[0]["content"]
    assert len(bot_replies(slack, "C0001", mention["ts"])) == 3
    assert second.text().count(f"reset of slack:{slack.team_id}:C0001:{mention['ts']}") == 1


@pytest.fixture(scope="session")
def strict_model_dir(tmp_path_factory, tiny_model, qwen_tokenizer) -> Path:
    """The tiny model saved with a chat template that raises unless roles alternate
    (as Mistral's, Gemma's and Llama 2's do)."""
    folder = tmp_path_factory.mktemp("strict-model")
    tiny_model.save_pretrained(folder)
    tokenizer = type(qwen_tokenizer).from_pretrained(qwen_tokenizer.name_or_path)
    tokenizer.chat_template = STRICT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


async def test_hostile_input_gets_clear_replies_and_the_bot_stays_up(slack, bot, strict_model_dir):
    """Injected: 39,000 characters; only zero-width characters; a lone surrogate; only
    mentions; a 3-message thread on a strict-alternation template. Holds: each gets a
    clear reply, and the process is still up."""
    assert BYTE_LEVEL_WHITESPACE  # the tiny model never answers whitespace only
    process = await bot(MODEL=str(strict_model_dir), MAX_NEW_TOKENS="8")
    cases = {
        "C0001": ("x" * 39_000, replies.too_long(39_000, 16_000)),
        "C0002": ("\u200b\u200c\u200d\ufeff", replies.empty_message()),
        "C0003": (f"<@{slack.bot_user_id}> <@{slack.bot_user_id}>", replies.empty_message()),
    }
    for channel, (text, _) in cases.items():
        await slack.send_event(slack.app_mention(channel, text))
    surrogate = slack.app_mention("C0004", "what is \ud800 this?")
    await slack.send_event(surrogate)
    parent = slack.user_message("C0005", "we deploy on fridays", user="U0BOB")
    slack.user_message("C0005", "is that wise?", thread_ts=parent["ts"])
    asked = slack.app_mention("C0005", "what do you think?", thread_ts=parent["ts"])
    await slack.send_event(asked)

    for channel, (_, reply) in cases.items():
        [shown] = await answered(slack, channel, slack.channels[channel][0]["ts"])
        assert shown["text"] == reply
    for channel, ts in (("C0004", surrogate["ts"]), ("C0005", parent["ts"])):
        [shown] = await answered(slack, channel, ts)
        assert shown["text"] not in (replies.failed(), replies.empty_message())
    assert "Traceback" not in process.text()
    assert process.alive


async def test_the_engine_thread_dies(slack, bot):
    """Injected: the engine thread's loop raises. Holds: the process exits non-zero after
    leaving the turn pending (its thread says so), and a restart answers it."""
    dies = (
        "import sys; from bot import queue, cli\n"
        "def broken(self, running): raise RuntimeError('injected: the engine loop fails')\n"
        "queue.InferenceQueue._step = broken\n"
        "sys.exit(cli.main(['run']))\n"
    )
    first = await bot(code=dies)
    mention = slack.app_mention("C0001", "What is the capital of France?")
    await slack.send_event(mention)
    assert await first.wait(60) == 1
    assert "the engine thread died" in first.text()
    [paused] = bot_replies(slack, "C0001", mention["ts"])
    assert paused["text"] == replies.restarting()
    await bot()
    [reply] = await answered(slack, "C0001", mention["ts"])
    assert "paris" in reply["text"].lower()


async def test_one_user_floods_while_another_asks_once(slack, bot):
    """Injected: one user mentions the bot in 8 threads at once while another asks once
    (MAX_BATCH=2). Holds: the other gets a whole answer, every thread gets exactly one
    reply (an answer, or a request to slow down), and the bot stays up."""
    process = await bot(MAX_BATCH="2", MAX_NEW_TOKENS="24")
    floods = [slack.app_mention(f"C1{n:03}", f"Question {n}?", user="U0BOB") for n in range(8)]
    for mention in floods:
        await slack.send_event(mention)
    other = slack.app_mention("C0001", "What is the capital of France?")
    await slack.send_event(other)
    [reply] = await answered(slack, "C0001", other["ts"], timeout=180)
    assert "paris" in reply["text"].lower()
    for mention in floods:
        [one] = await answered(slack, mention["channel"], mention["ts"], timeout=180)
        assert one["text"] not in (replies.failed(), replies.busy())
    slowed = [
        m
        for mention in floods
        for m in bot_replies(slack, mention["channel"], mention["ts"])
        if "still working on your" in m["text"]
    ]
    assert len(slowed) == 4  # MAX_PENDING_PER_USER=4 were taken, the rest asked to wait
    assert process.alive


async def test_a_second_sigterm_exits_at_once(slack, bot, redis_server):
    """Injected: SIGTERM, and a second one while an answer has most of its grace period
    left. Holds: the process exits at once; the turn stays pending, and the next start
    answers it in the same message."""
    first = await bot(SHUTDOWN_GRACE_S="120", MAX_NEW_TOKENS="200")
    mention = slack.app_mention("C0001", DRAGON)
    await slack.send_event(mention)
    await streaming(slack, mention)
    first.process.send_signal(signal.SIGTERM)
    await first.wait_log("SIGTERM received")
    first.process.send_signal(signal.SIGTERM)
    assert await first.wait(10) == 128 + signal.SIGTERM
    async with Redis.from_url(redis_server.url, decode_responses=True) as client:
        assert await client.zcard(keys.PENDING_TURNS) == 1
    await bot(MAX_NEW_TOKENS="20")
    [reply] = await answered(slack, "C0001", mention["ts"])
    assert reply["ts"] == slack.calls_to("chat.postMessage")[0].response["ts"]


async def test_sighup_reloads_the_team_file_without_dropping_anything(
    slack, bot, redis_server, tmp_path
):
    """Injected: threadbot.yml rewritten to deny Alice, then SIGHUP; then rewritten with a
    mistake, then SIGHUP again. Holds: the first reload denies Alice at once, with her
    conversation kept and the Socket Mode connection never dropped; the broken file is
    refused with its line, and the rules in effect stay."""
    config = tmp_path / "threadbot.yml"  # the bot runs in tmp_path: found without a setting
    config.write_text("access:\n  admins: [U0ADMIN]\n")
    process = await bot()
    connections = slack.connections
    first = slack.app_mention("C0001", "What is the capital of France?")
    await slack.send_event(first)
    await answered(slack, "C0001", first["ts"])

    config.write_text("access:\n  slack:\n    users:\n      deny: [U0ALICE]\n")
    process.reload()
    await process.wait_log(r"configuration reloaded: access changed")
    follow_up = slack.user_message("C0001", "And of Spain?", thread_ts=first["ts"])
    await slack.send_event(follow_up)
    denial = await slack.wait_for(
        lambda: (posts := bot_replies(slack, "C0001", first["ts"])) and len(posts) == 2
        and posts[1],
        30,
    )  # fmt: skip
    assert denial["text"] == replies.denied()
    conversation = f"slack:{slack.team_id}:C0001:{first['ts']}"
    kept = await stored(redis_server, conversation)
    assert [m["role"] for m in kept] == ["user", "assistant"]  # and not the denied message

    config.write_text("access:\n  slack:\n    users:\n      deny: [U0ALICE\n")
    process.reload()
    await process.wait_log(r"configuration not reloaded; the old one stays: .*line \d")
    bob = slack.app_mention("C0001", "What is the capital of Italy?", user="U0BOB")
    await slack.send_event(bob)
    await answered(slack, "C0001", bob["ts"])
    await slack.send_event(slack.user_message("C0001", "Hello?", thread_ts=first["ts"]))
    await slack.wait_for_ack(slack.envelopes[-1]["envelope_id"])
    assert await stored(redis_server, conversation) == kept  # Alice is still denied
    assert slack.connections == connections and process.alive
