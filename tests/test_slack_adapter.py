"""The Slack adapter end to end: real slack-bolt and slack_sdk against the fake Slack.

Each test runs the adapter exactly as `threadbot run` builds it from settings, on the
real service, queue and Redis; the model is the bundled one where the answer matters
(Paris), the tiny one where only the flow does, and a scripted one where the test needs
a particular answer text (escaping, splitting).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid

import aiohttp
import pytest
from aiohttp import web
from conftest import (
    LONG_CODE_ANSWER,
    FailsOnceBatcher,
    GatedBatcher,
    ScriptedBatcher,
    assert_split_with_fences,
    running,
)
from fake_server import serve
from fake_slack import FakeSlack
from http_proxy import ForwardProxy
from redis.exceptions import ConnectionError as RedisConnectionError
from slack_sdk.web.async_client import AsyncWebClient
from test_service import nothing_pending, until

from adapters import slack_adapter
from adapters.attachments import EARLIER
from adapters.base import AdapterError
from adapters.slack_adapter import (
    MESSAGE_LIMIT,
    PLACEHOLDER,
    THREAD_CONTEXT_LIMIT,
    THREAD_PAGE,
    THREAD_PROBES,
    SlackAdapter,
)
from adapters.slack_files import SlackDownloadRefused, _on_slack, slack_attachments
from adapters.slack_format import to_mrkdwn
from adapters.streaming import STREAMING_MARK
from bot import replies
from bot.config import Settings
from bot.health import Vitals
from bot.metrics import Metrics
from bot.ops_server import OpsServer
from bot.types import ConversationKey
from storage import keys

SLACK_ACK_SECONDS = 3  # Slack retries an event not acknowledged within this


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def final_reply(slack: FakeSlack, channel: str, thread_ts: str | None, *, after: int = 0):
    """The bot's reply in a thread once it is whole: edited to its final text, or streamed
    and stopped."""

    def done():
        posts = [
            m
            for m in slack.channels.get(channel, [])
            if m.get("user") == slack.bot_user_id and m.get("thread_ts") == thread_ts
        ]
        if len(posts) <= after or slack.is_streaming(channel, posts[after]["ts"]):
            return None
        text = posts[after]["text"]
        return text != PLACEHOLDER and not text.endswith(STREAMING_MARK) and posts[after]

    return await slack.wait_for(done, timeout=60)


def bot_posts(slack: FakeSlack, channel: str) -> list[dict]:
    return [m for m in slack.channels.get(channel, []) if m.get("user") == slack.bot_user_id]


@pytest.mark.slow
async def test_a_mention_is_answered_in_its_thread(slack, socket_mode, bundled_batcher):
    async with socket_mode(bundled_batcher):
        mention = slack.app_mention("C0001", "What is the capital of France?")
        await slack.send_event(mention)
        reply = await final_reply(slack, "C0001", mention["ts"])
    assert "paris" in reply["text"].lower()
    [placeholder] = slack.calls_to("chat.postMessage")
    assert placeholder.params["text"] == PLACEHOLDER
    assert placeholder.params["thread_ts"] == mention["ts"]
    assert slack.calls_to("chat.update")  # the placeholder was edited, not reposted


def slack_key(slack, channel: str, ts: str) -> ConversationKey:
    """The conversation a message at a channel's top level would start."""
    return ConversationKey("slack", slack.team_id, channel, ts)


async def test_a_follow_up_in_the_thread_needs_no_mention(slack, socket_mode):
    async with socket_mode() as (service, batcher):
        mention = slack.app_mention("C0001", "hello bot")
        await slack.send_event(mention)
        await final_reply(slack, "C0001", mention["ts"])
        follow_up = slack.user_message("C0001", "and another thing", thread_ts=mention["ts"])
        await slack.send_event(follow_up)
        await final_reply(slack, "C0001", mention["ts"], after=1)
        # "Also send to #channel" ticked: the reply comes as a thread_broadcast
        broadcast = slack.user_message("C0001", "and for everyone", thread_ts=mention["ts"])
        await slack.send_event(broadcast | {"subtype": "thread_broadcast", "root": mention})
        await final_reply(slack, "C0001", mention["ts"], after=2)
        me = slack.user_message("C0001", "waves", thread_ts=mention["ts"])  # "/me waves"
        await slack.send_event(me | {"subtype": "me_message"})
        await final_reply(slack, "C0001", mention["ts"], after=3)
        elsewhere = slack.user_message("C0001", "unrelated chatter")
        await slack.send_event(elsewhere)
        await slack.wait_for_ack(slack.envelopes[-1]["envelope_id"])
        # Acknowledged once taken (accepted and recorded): taken, it would be known.
        assert await service.knows(slack_key(slack, "C0001", mention["ts"]))
        assert not await service.knows(slack_key(slack, "C0001", elsewhere["ts"]))
    asked = [p[-1]["content"] for p in batcher.prompts]
    assert asked == ["hello bot", "and another thing", "and for everyone", "waves"]
    assert len(batcher.prompts[1]) == 3  # the thread's history came along


async def test_a_dm_is_answered_in_the_dm(slack, socket_mode):
    async with socket_mode() as (_service, batcher):
        await slack.send_event(slack.dm("D0001", "hi there"))
        reply = await final_reply(slack, "D0001", None)
    assert reply["text"]
    assert batcher.prompts == [[{"role": "user", "content": "hi there"}]]


async def test_bots_are_not_answered(slack, socket_mode):
    async with socket_mode() as (_service, batcher):
        await slack.send_event(slack.bot_message("C0001", f"<@{slack.bot_user_id}> ping"))
        await slack.send_event(slack.dm("D0001", "from a person"))
        await final_reply(slack, "D0001", None)
    assert bot_posts(slack, "C0001") == []
    assert len(batcher.prompts) == 1


async def test_edits_are_not_answered_and_a_dm_thread_is_its_own_conversation(slack, socket_mode):
    async with socket_mode() as (_service, batcher):
        first = slack.dm("D0001", "top level")
        await slack.send_event(first)
        await final_reply(slack, "D0001", None)
        edited = {
            **slack.dm("D0001", "ignored"),
            "subtype": "message_changed",
            "message": {"text": "edited text"},
        }
        await slack.send_event(edited)
        in_thread = slack.user_message(
            "D0001", "in a thread", thread_ts=first["ts"], channel_type="im"
        )
        await slack.send_event(in_thread)
        await final_reply(slack, "D0001", first["ts"])
    # The DM thread is its own conversation, seeded from the thread (its parent message)
    # rather than continuing the DM's, which holds the bot's top-level answer.
    assert batcher.prompts[1] == [
        {"role": "user", "content": "top level"},
        {"role": "user", "content": "in a thread"},
    ]
    assert len(batcher.prompts) == 2  # the edit was not answered


async def test_a_message_edited_to_mention_the_bot_is_not_answered(slack, socket_mode):
    """Slack sends `app_mention` again, with `edited`, when an edit adds a mention."""
    async with socket_mode() as (_service, batcher):
        plain = slack.user_message("C0001", "hello everyone")
        await slack.send_event(plain)
        edited = {
            **slack.app_mention("C0001", "hello everyone"),
            "ts": plain["ts"],
            "edited": {"user": "U0ALICE", "ts": slack.next_ts()},
        }
        await slack.send_event(edited)
        asked = slack.app_mention("C0001", "a question")
        await slack.send_event(asked)
        await final_reply(slack, "C0001", asked["ts"])
    assert batcher.prompts == [[{"role": "user", "content": "a question"}]]


async def group_dm_exchange(slack) -> dict:
    """In a group DM: a mention that comes as message.mpim alone, answered, and an unasked
    follow-up in its thread, answered; the mention's event."""
    _mention, message = slack.mention_pair("G0GROUP", "hello all", channel_type="mpim")
    await slack.send_event(message)
    await final_reply(slack, "G0GROUP", message["ts"])
    follow_up = slack.user_message(
        "G0GROUP", "and you?", thread_ts=message["ts"], channel_type="mpim", user="U0BOB"
    )
    await slack.send_event(follow_up)
    await final_reply(slack, "G0GROUP", message["ts"], after=1)
    return message


async def test_in_a_group_dm_a_mention_is_answered_in_its_thread(slack, socket_mode):
    """A group DM (message.mpim) is answered as a channel is: a mention, even with no
    app_mention event for it, opens a thread; its follow-ups need none; chatter is left."""
    async with socket_mode() as (service, batcher):
        message = await group_dm_exchange(slack)
        chatter = slack.user_message("G0GROUP", "lunch?", channel_type="mpim", user="U0BOB")
        await slack.send_event(chatter)
        await slack.wait_for_ack(slack.envelopes[-1]["envelope_id"])
        assert await service.knows(slack_key(slack, "G0GROUP", message["ts"]))
        assert not await service.knows(slack_key(slack, "G0GROUP", chatter["ts"]))
    assert [p[-1]["content"] for p in batcher.prompts] == ["hello all", "bob: and you?"]
    assert len(bot_posts(slack, "G0GROUP")) == 2


async def test_in_a_group_dm_a_mention_sent_twice_gets_one_answer(slack, socket_mode):
    async with socket_mode() as (_service, batcher):
        mention, message = slack.mention_pair("G0GROUP", "once, please", channel_type="mpim")
        await slack.send_event(message)
        await slack.send_event(mention)
        await final_reply(slack, "G0GROUP", mention["ts"])
        await asyncio.gather(*(slack.wait_for_ack(e["envelope_id"]) for e in slack.envelopes))
    assert len(batcher.prompts) == 1
    assert len(bot_posts(slack, "G0GROUP")) == 1


async def test_each_message_gets_one_answer(slack, socket_mode):
    """The app_mention/message pair and a retried delivery all mean one message."""
    async with socket_mode() as (_service, batcher):
        mention, message = slack.mention_pair("C0001", "answer me once")
        await slack.send_event(mention, event_id="Ev1")
        await slack.send_event(message, event_id="Ev2")
        await slack.send_event(mention, event_id="Ev1", retry_attempt=1, retry_reason="timeout")
        await final_reply(slack, "C0001", mention["ts"])
        await asyncio.gather(*(slack.wait_for_ack(e["envelope_id"]) for e in slack.envelopes))
    assert len(batcher.prompts) == 1
    assert len(bot_posts(slack, "C0001")) == 1


@pytest.mark.parametrize("where", ["before-accepting", "accepting"])
async def test_a_message_refused_in_an_outage_is_told_so_once_however_often_slack_sends_it(
    slack, socket_mode, monkeypatch, where
):
    """Slack delivers an event again until one delivery is acknowledged, and each refused
    one is acknowledged late (Redis's retries): the thread is told once, not four times."""

    async def gone(*args, **kwargs):
        raise RedisConnectionError("Connection refused")

    async with socket_mode() as (service, _batcher):
        if where == "before-accepting":  # whether the bot is in the thread: not known
            monkeypatch.setattr(service.store, "exists", gone)
        else:
            monkeypatch.setattr(service.journal, "accept", gone)
        mention = slack.app_mention("C0001", "hello")
        for attempt in range(4):
            envelope = await slack.send_event(
                mention, event_id="Ev1", retry_attempt=attempt, retry_reason="timeout"
            )
            await slack.wait_for_ack(envelope)
    assert [post["text"] for post in bot_posts(slack, "C0001")] == [
        to_mrkdwn(replies.storage_unavailable())
    ]


async def test_a_long_answer_is_split_across_thread_messages(slack, socket_mode):
    async with socket_mode(ScriptedBatcher(LONG_CODE_ANSWER)):
        mention = slack.app_mention("C0001", "write a long program")
        await slack.send_event(mention)
        await final_reply(slack, "C0001", mention["ts"])
        await slack.wait_for(lambda: "That is all." in bot_posts(slack, "C0001")[-1]["text"])
    parts = [m["text"] for m in bot_posts(slack, "C0001")]
    assert_split_with_fences(parts, MESSAGE_LIMIT)
    posts = slack.calls_to("chat.postMessage")
    assert len(posts) == len(parts)
    for post in posts:  # Slack never fetches a URL that the answer put there
        assert post.params["unfurl_links"] is False and post.params["unfurl_media"] is False


@pytest.mark.parametrize(
    ("streaming", "error"),
    [
        ("edit", "is_archived"),
        ("native", "is_archived"),
        ("edit", "restricted_action_read_only_channel"),
        ("native", "restricted_action"),
    ],
)
async def test_a_channel_archived_while_its_answer_is_written_ends_the_turn_there(
    slack, socket_mode, make_batcher, streaming, error
):
    """Slack: is_archived (or channel_not_found, not_in_channel), or the workspace's rules
    refusing the bot's posts there. The answer is written for nobody no further, not
    tried again, and not stored: it was written whole, and each try failed to show it,
    until the last stored it, an answer nobody saw."""
    gated = GatedBatcher(make_batcher(max_new_tokens=12))
    async with socket_mode(gated, streaming=streaming) as (service, _batcher):
        mention = slack.app_mention("C0001", "hello")
        await slack.send_event(mention)
        first = "chat.postMessage" if streaming == "edit" else "assistant.threads.setStatus"
        await slack.wait_for_calls(first)  # the answer is begun
        for method in ("chat.postMessage", "chat.update", "chat.startStream"):
            slack.fail_next(method, error, count=100)
        gated.gate.set()
        await until(lambda: nothing_pending(service.journal), timeout=15)
        key = ConversationKey("slack", slack.team_id, "C0001", mention["ts"])
        history = await service.store.load(str(key))
    assert [m["role"] for m in history] == ["user"]


async def test_an_event_is_acknowledged_once_its_turn_is_recorded(
    slack, socket_mode, make_batcher, redis_client
):
    """bolt acks after the listener (process_before_response), and the listener returns
    once the turn is in the journal: an event Slack saw acknowledged is never lost."""
    gated = GatedBatcher(make_batcher())
    async with socket_mode(gated):
        mention = slack.app_mention("C0001", "hello")
        await slack.wait_for_ack(await slack.send_event(mention))
        turn_id = f"slack:{slack.team_id}:C0001:{mention['ts']}"
        assert await redis_client.zscore(keys.PENDING_TURNS, turn_id) is not None

        async def target() -> dict:
            return json.loads(await redis_client.hget(keys.turn(turn_id), "target"))

        where = {
            "team": slack.team_id,
            "channel": "C0001",
            "thread_ts": mention["ts"],
            "recipient": "U0ALICE",
            "recipient_team": slack.team_id,
        }
        assert (await target()).items() >= where.items()
        [placeholder] = await slack.wait_for_calls("chat.postMessage")
        for _ in range(100):  # the placeholder's ts is saved once it is posted
            if (await target())["messages"]:
                break
            await asyncio.sleep(0.05)
        assert await target() == where | {"messages": [placeholder.response["ts"]]}
        gated.gate.set()
        await final_reply(slack, "C0001", mention["ts"])
        for _ in range(100):  # answered: the record goes right after the final edit
            if not await redis_client.exists(keys.turn(turn_id)):
                break
            await asyncio.sleep(0.05)
    assert await redis_client.exists(keys.turn(turn_id)) == 0


async def test_a_rate_limited_update_is_retried_and_the_answer_arrives(slack, socket_mode):
    async with socket_mode(ScriptedBatcher("The final answer.")):
        slack.rate_limit("chat.update", count=2, retry_after=0)
        mention = slack.app_mention("C0001", "hi")
        await slack.send_event(mention)
        reply = await final_reply(slack, "C0001", mention["ts"])
    assert reply["text"] == "The final answer."
    assert [c.status for c in slack.calls_to("chat.update")][:2] == [429, 429]


class PacedAnswer(ScriptedBatcher):
    """Writes its answer 40 characters a step, a step every 30 ms, so it is edited in."""

    def step(self) -> list:
        time.sleep(0.03)
        return super().step()


@pytest.mark.parametrize("streaming", ["edit", "native"])
async def test_a_rate_limited_draft_is_skipped_not_waited_for(
    slack, socket_mode, streaming, caplog
):
    """Slack refuses a partial text's call for now (Retry-After 100 s): that text is
    skipped and the answer goes on to its end, where the call was retried after the wait
    and held the answer back; the final text's calls are still retried. The skip is one
    line in the log, not a warning with a traceback."""
    answer = " ".join(f"word{n}" for n in range(80)) + "."
    async with socket_mode(PacedAnswer(answer), streaming=streaming):
        draft = "chat.update" if streaming == "edit" else "chat.appendStream"
        slack.rate_limit(draft, count=1, retry_after=100)
        mention = slack.app_mention("C0001", "count for me")
        with caplog.at_level(logging.INFO, logger="adapters.streaming"):
            await slack.send_event(mention)
            async with asyncio.timeout(20):
                reply = await final_reply(slack, "C0001", mention["ts"])
    assert slack.calls_to(draft)[0].status == 429
    assert reply["text"] == answer
    logged = [r for r in caplog.records if r.name == "adapters.streaming"]
    assert [(r.levelno, r.exc_info) for r in logged] == [(logging.INFO, None)]
    assert "rate-limited, skipped" in logged[0].getMessage()


async def test_model_output_cannot_ping_the_channel(slack, socket_mode):
    async with socket_mode(ScriptedBatcher("Hey <!channel> and <@U0BOB>, **read** this")):
        mention = slack.app_mention("C0001", "say something")
        await slack.send_event(mention)
        reply = await final_reply(slack, "C0001", mention["ts"])
    assert reply["text"] == "Hey &lt;!channel&gt; and &lt;@U0BOB&gt;, *read* this"
    # chat.update parses as Slack's client does unless told not to (chat.postMessage
    # parses nothing by default): the escaped text, links too, is to stand as sent.
    assert [call.params.get("parse") for call in slack.calls_to("chat.update")] == ["none"]


async def test_the_reply_says_when_older_history_was_left_out(slack, socket_mode, make_engine):
    budget = make_engine().count_tokens([{"role": "user", "content": "x " * 40}])
    async with socket_mode(ScriptedBatcher("Noted."), prompt_budget=budget):
        mention = slack.app_mention("C0001", "a " * 30)
        await slack.send_event(mention)
        await final_reply(slack, "C0001", mention["ts"])
        follow_up = slack.user_message("C0001", "b " * 30, thread_ts=mention["ts"])
        await slack.send_event(follow_up)
        reply = await final_reply(slack, "C0001", mention["ts"], after=1)
    assert reply["text"] == f"_{replies.history_dropped(2)}_\n\nNoted."


@pytest.mark.parametrize("gateway", [0, 1], ids=["the same gateway", "another gateway"])
async def test_a_follow_up_sent_as_the_bot_joins_is_answered_by_any_gateway(
    slack, socket_mode, gateway
):
    """Two gateways, Slack spreading the events between them: a thread reply sent,
    unasked, while the mention that brings the bot in is being read (its thread read
    slowly here) waits for that mention wherever it arrives, where it was taken for
    chatter by a gateway that did not know of the joining."""
    slack.delays["conversations.replies"] = 1.0
    async with socket_mode(connections=2) as (_service, batcher):
        parent = slack.user_message("C0001", "we deploy on fridays", user="U0BOB")
        mention = slack.app_mention("C0001", "is that wise?", thread_ts=parent["ts"])
        follow_up = slack.user_message("C0001", "and on mondays?", thread_ts=parent["ts"])
        await slack.send_event(mention, connection=0)
        await slack.wait_for(lambda: slack.calls_to("conversations.replies"), timeout=10)
        await slack.send_event(follow_up, connection=gateway)
        await final_reply(slack, "C0001", parent["ts"], after=1)
    assert [p[-1]["content"] for p in batcher.prompts] == [
        "alice: is that wise?", "alice: and on mondays?"
    ]  # fmt: skip


async def test_mentioned_mid_thread_the_bot_reads_the_thread_first(slack, socket_mode):
    """With two people in the thread, each message says who wrote it."""
    async with socket_mode() as (_service, batcher):
        parent = slack.user_message("C0001", "we deploy on fridays", user="U0BOB")
        slack.user_message("C0001", "is that wise?", thread_ts=parent["ts"])
        mention = slack.app_mention("C0001", "what do you think, <@U0BOB>?", thread_ts=parent["ts"])
        await slack.send_event(mention)
        await final_reply(slack, "C0001", parent["ts"])
    assert batcher.prompts[0] == [
        {"role": "user", "content": "bob: we deploy on fridays"},
        {"role": "user", "content": "alice: is that wise?"},
        {"role": "user", "content": "alice: what do you think, @bob?"},
    ]


async def test_a_file_shared_earlier_in_the_thread_is_named_in_what_is_read_back(
    slack, socket_mode
):
    """A file posted alone before the mention was left out of the thread read back, and
    the model answered "the log above" as if there were none; it is named, not read."""
    log = slack.upload("crash.log", b"Traceback: KeyError", "text/plain", user="U0BOB")
    async with socket_mode() as (_service, batcher):
        parent = slack.user_message("C0001", "the nightly build broke", user="U0BOB")
        slack.file_share("C0001", "", [log], thread_ts=parent["ts"], user="U0BOB")
        mention = slack.app_mention("C0001", "what is wrong in the log?", thread_ts=parent["ts"])
        await slack.send_event(mention)
        await final_reply(slack, "C0001", parent["ts"])
    named = f"[attached: crash.log, text/plain, 19 bytes: {EARLIER}]"
    assert batcher.prompts[0] == [
        {"role": "user", "content": "bob: the nightly build broke"},
        {"role": "user", "content": f"bob: {named}"},
        {"role": "user", "content": "alice: what is wrong in the log?"},
    ]
    assert slack.downloads == []


@pytest.mark.parametrize("sent", ["while the thread is read", "right after the mention"])
async def test_a_follow_up_while_a_mention_takes_the_bot_into_a_thread_is_answered(
    slack, socket_mode, sent
):
    """The next message comes, unasked, while the mention's turn is still being taken (its
    thread read, slowly), or with the mention (whether the bot is in the thread would be
    asked of Redis for both at once): it waits to learn that the bot is in the thread, and
    is answered after the mention, where it was taken for chatter and lost."""
    reading = sent == "while the thread is read"
    slack.delays["conversations.replies"] = 1.0 if reading else 0.0
    async with socket_mode() as (_service, batcher):
        parent = slack.user_message("C0001", "we deploy on fridays", user="U0BOB")
        mention = slack.app_mention("C0001", "is that wise?", thread_ts=parent["ts"])
        follow_up = slack.user_message("C0001", "and on mondays?", thread_ts=parent["ts"])
        if reading:
            await slack.send_event(mention)
            await slack.wait_for(lambda: slack.calls_to("conversations.replies"), timeout=10)
            await slack.send_event(follow_up)
        else:
            await asyncio.gather(slack.send_event(mention), slack.send_event(follow_up))
        await final_reply(slack, "C0001", parent["ts"], after=1)
    assert [prompt[-1]["content"] for prompt in batcher.prompts] == [
        "alice: is that wise?", "alice: and on mondays?",
    ]  # fmt: skip


async def test_a_reply_while_a_channel_mention_is_taken_is_answered_after_it(slack, socket_mode):
    """A mention in a channel, with a file that takes a while to download, and a reply in
    its thread meanwhile, unasked: the reply waits for the mention's turn (its thread is
    keyed by the mention) and is answered after it, not taken for chatter."""
    notes = slack.upload("notes.txt", b"Ship on Friday.", "text/plain")
    slack.delays["files"] = 1.0
    async with socket_mode(ScriptedBatcher("Noted."), max_input_chars=2000) as (_, batcher):
        mention = slack.app_mention("C0001", "read this", files=[notes])
        await slack.send_event(mention)
        await asyncio.sleep(0.3)  # the file is downloading
        reply = slack.user_message("C0001", "in French please", thread_ts=mention["ts"])
        await slack.send_event(reply)
        await final_reply(slack, "C0001", mention["ts"], after=1)
    assert [prompt[-1]["content"] for prompt in batcher.prompts] == [
        "read this\n\n[attached: notes.txt]\nShip on Friday.", "in French please",
    ]  # fmt: skip


async def test_a_refused_app_token_stops_the_adapter_in_one_line(slack, make_service):
    """A revoked SLACK_APP_TOKEN (or the bot token pasted there): the adapter stops with
    one line, where the SDK retried every ten seconds for ever, a traceback each time."""
    settings = Settings(
        _env_file=None, slack_bot_token=slack.bot_token, slack_app_token="xapp-revoked",
        slack_api_url=slack.api_url,
    )  # fmt: skip
    async with make_service() as (service, _batcher):
        adapter = SlackAdapter.from_settings(settings, service)
        with pytest.raises(AdapterError) as refused:
            await asyncio.wait_for(adapter.run(), timeout=30)
    assert str(refused.value).startswith("Slack refused Socket Mode (invalid_auth)")


async def test_thread_history_keeps_other_bots_apart_and_takes_any_name(slack, socket_mode):
    """Another bot's message (an alert) is not the bot's own answer, and a name with a
    backslash in it (`CORP\\jdoe`) is a name, not part of a pattern."""
    slack.users["U0DEV"] = "CORP\\jdoe"
    async with socket_mode() as (_service, batcher):
        parent = slack.user_message("C0001", "db-1 looks slow", user="U0BOB")
        alert = "ALERT: disk full on db-1"
        slack.bot_message("C0001", alert, username="pagerduty", thread_ts=parent["ts"])
        mention = slack.app_mention("C0001", "what now, <@U0DEV>?", thread_ts=parent["ts"])
        await slack.send_event(mention)
        await final_reply(slack, "C0001", parent["ts"])
    assert batcher.prompts[0] == [
        {"role": "user", "content": "bob: db-1 looks slow"},
        {"role": "user", "content": f"pagerduty: {alert}"},
        {"role": "user", "content": "alice: what now, @CORP\\jdoe?"},
    ]


@pytest.mark.parametrize("granted", [True, False])
async def test_a_personas_channel_name_is_asked_once_and_needs_its_scope(
    slack, socket_mode, granted
):
    """{channel_name} is the channel's name with channels:read (the manifest asks for it);
    an app installed without it gets the channel's id, and Slack is not asked again."""
    if not granted:
        slack.scopes.remove("channels:read")
    async with socket_mode(system_prompt="You are in {channel_name}.") as (_service, batcher):
        for text in ("first", "second"):
            mention = slack.app_mention("C0001", text)
            await slack.send_event(mention)
            await final_reply(slack, "C0001", mention["ts"])
    where = "#c0001" if granted else "C0001"
    assert {p[0]["content"] for p in batcher.prompts} == {f"You are in {where}."}
    assert len(slack.calls_to("conversations.info")) == 1


@pytest.mark.parametrize("error", ["internal_error", "channel_not_found"])
async def test_a_channel_name_slack_failed_to_give_for_now_is_asked_again(
    slack, socket_mode, error
):
    """conversations.info failing in a way that passes (Slack's internal_error; a private
    channel the bot is not in yet, where a slash command was typed): the id for that
    message, and the name asked again at the next, where the id stood for good."""
    slack.fail_next("conversations.info", error)
    async with socket_mode(system_prompt="You are in {channel_name}.") as (_service, batcher):
        for text in ("first", "second"):
            mention = slack.app_mention("C0001", text)
            await slack.send_event(mention)
            await final_reply(slack, "C0001", mention["ts"])
    assert [p[0]["content"] for p in batcher.prompts] == ["You are in C0001.", "You are in #c0001."]
    assert len(slack.calls_to("conversations.info")) == 2


@pytest.mark.parametrize("granted", [True, False])
async def test_a_group_dms_channel_name_says_so_whichever_event_comes_first(
    slack, socket_mode, granted
):
    """In a group DM the app_mention, which carries no channel_type, may come before its
    message.mpim twin: conversations.info says it is one (with mpim:read, or by refusing
    for want of it) where its id, like a private channel's, does not."""
    if not granted:
        slack.scopes.remove("mpim:read")
    async with socket_mode(system_prompt="You are in {channel_name}.") as (_service, batcher):
        mention, message = slack.mention_pair("G0GROUP", "hello all", channel_type="mpim")
        await slack.send_event(mention)
        await final_reply(slack, "G0GROUP", mention["ts"])
        await slack.send_event(message)
        await slack.wait_for_ack(slack.envelopes[-1]["envelope_id"])
    assert [p[0]["content"] for p in batcher.prompts] == ["You are in a group direct message."]
    assert len(slack.calls_to("conversations.info")) == 1


async def test_names_are_remembered_up_to_a_bound(slack, socket_mode, monkeypatch):
    """Channel names (and people, the same way) are kept oldest first, at most
    PEOPLE_CACHE_SIZE: past it the oldest is forgotten, and asked for again."""
    monkeypatch.setattr(slack_adapter, "PEOPLE_CACHE_SIZE", 1)
    async with socket_mode(system_prompt="You are in {channel_name}.") as (_service, batcher):
        for channel in ("C0001", "C0001", "C0002", "C0001"):
            mention = slack.app_mention(channel, "hello")
            await slack.send_event(mention)
            await final_reply(slack, channel, mention["ts"])
    asked = [call.params["channel"] for call in slack.calls_to("conversations.info")]
    assert asked == ["C0001", "C0002", "C0001"]
    assert [p[0]["content"] for p in batcher.prompts][-1] == "You are in #c0001."


async def test_a_group_dm_named_again_forgets_no_other_name(slack, socket_mode, monkeypatch):
    """Each of a group DM's messages names it: a name already kept is not a new one, and
    no other is forgotten to make room for it."""
    monkeypatch.setattr(slack_adapter, "PEOPLE_CACHE_SIZE", 2)
    async with socket_mode(system_prompt="You are in {channel_name}.") as (_service, batcher):
        mention = slack.app_mention("C0001", "hello")
        await slack.send_event(mention)
        await final_reply(slack, "C0001", mention["ts"])
        await group_dm_exchange(slack)
        mention = slack.app_mention("C0001", "again")
        await slack.send_event(mention)
        await final_reply(slack, "C0001", mention["ts"])
    assert len(slack.calls_to("conversations.info")) == 1
    assert [p[0]["content"] for p in batcher.prompts][-1] == "You are in #c0001."


async def test_slack_markup_reaches_the_model_as_plain_text_that_keeps_its_meaning(
    slack, socket_mode
):
    """A link's address, a channel named or not (Slack may send `<#C…|>`), @here and a
    user group: where a channel became a bare `#`, a link lost its address, and the rest
    came through as markup. An email address, which Slack links, comes once."""
    markup = (
        "post <https://a.example/x|the doc> and <https://b.example> in <#C0002|> or "
        "<#C0003|general>, for <!here> and <!subteam^S012|@eng>; "
        "ask <mailto:bob@b.example|bob@b.example>"
    )
    async with socket_mode(ScriptedBatcher("Done.")) as (_service, batcher):
        mention = slack.app_mention("C0001", markup)
        await slack.send_event(mention)
        await final_reply(slack, "C0001", mention["ts"])
    assert batcher.prompts[0][-1]["content"] == (
        "post the doc (https://a.example/x) and https://b.example in #C0002 or #general, "
        "for @here and @eng; ask mailto:bob@b.example"
    )


async def test_a_forwarded_message_reaches_the_model_with_the_forwarders_words(slack, socket_mode):
    """Slack sends a forwarded message in the new one's `attachments`, its own text empty
    or a comment: the bot answered a bare forward as an empty message, and a forward with
    a comment as the comment alone; nor did a forward earlier in a thread come along."""
    log = "deploy failed, see <https://ci.example/42|the log>"
    async with socket_mode(ScriptedBatcher("Seen.")) as (_service, batcher):
        bare = slack.dm("D0001", "", attachments=[slack.forwarded("C0002", log)])
        await slack.send_event(bare)
        await final_reply(slack, "D0001", None)
        link_preview = {"title": "CI", "text": "a page's preview", "from_url": "https://ci.example"}
        shared = [slack.forwarded("C0002", "and again"), link_preview]
        await slack.send_event(slack.dm("D0001", "what broke?", attachments=shared))
        await final_reply(slack, "D0001", None, after=1)
        parent = slack.user_message("C0001", "", attachments=[slack.forwarded("C0002", log)])
        mention = slack.app_mention("C0001", "why?", thread_ts=parent["ts"])
        await slack.send_event(mention)
        await final_reply(slack, "C0001", parent["ts"])
    forwarded = "[forwarded]\ndeploy failed, see the log (https://ci.example/42)"
    assert batcher.prompts[0][-1]["content"] == forwarded
    assert batcher.prompts[1][-1]["content"] == "what broke?\n\n[forwarded]\nand again"
    assert batcher.prompts[2] == [
        {"role": "user", "content": forwarded},
        {"role": "user", "content": "why?"},
    ]


async def test_code_in_a_mention_keeps_its_indentation(slack, socket_mode):
    """Every run of spaces in a message became one (to tidy the gap the mention left), so
    pasted code reached the model, and its history, without its indentation."""
    code = "why does this fail?\n```\ndef f(x):\n    if x:\n        return 1\n```"
    async with socket_mode(ScriptedBatcher("Done.")) as (_service, batcher):
        mention = slack.app_mention("C0001", f"look  <@{slack.bot_user_id}>  {code}")
        await slack.send_event(mention)
        await final_reply(slack, "C0001", mention["ts"])
    assert batcher.prompts[0][-1]["content"] == f"look {code}"


@pytest.mark.parametrize("store", [THREAD_CONTEXT_LIMIT + 2], indirect=True)
async def test_mentioned_late_in_a_long_thread_the_bot_reads_what_came_just_before(
    slack, socket_mode
):
    """Of a 1,500-message thread, eight pages long, the 50 messages just before the mention,
    in order, found in a few pages (Slack pages a thread from its start only); nothing
    posted after the mention."""
    async with socket_mode(ScriptedBatcher("Noted.")) as (_service, batcher):
        parent = slack.user_message("C0001", "message 0")
        for number in range(1, 1500):
            slack.user_message("C0001", f"message {number}", thread_ts=parent["ts"])
        mention = slack.app_mention("C0001", "sum it up", thread_ts=parent["ts"])
        slack.user_message("C0001", "posted after the mention", thread_ts=parent["ts"])
        await slack.send_event(mention)
        await final_reply(slack, "C0001", parent["ts"])
    [prompt] = batcher.prompts
    assert [message["content"] for message in prompt] == [
        *(f"message {number}" for number in range(1500 - THREAD_CONTEXT_LIMIT, 1500)),
        "sum it up",
    ]
    pages = slack.calls_to("conversations.replies", ok_only=True)
    assert 1 < len(pages) <= 1 + THREAD_PROBES
    assert {page.params["latest"] for page in pages} == {mention["ts"]}


@pytest.mark.parametrize("store", [THREAD_CONTEXT_LIMIT + 2], indirect=True)
async def test_in_a_thread_of_a_day_it_reads_back_from_the_mention_first(slack, socket_mode):
    """A message a minute for a day, and Slack slow after the bot's second page: the first
    try after the first page reads the ten minutes just before the mention, and those are
    what the bot answers with, not the thread's first page."""
    calls = 0

    def slow_after_two(call):
        nonlocal calls
        calls += call.method == "conversations.replies"
        if calls == 2:
            slack.delays["conversations.replies"] = 3.0

    async with socket_mode(ScriptedBatcher("Noted.")) as (_service, batcher):
        parent = slack.user_message("C0001", "message 0")
        for number in range(1, 1440):
            slack.pass_time(60)
            slack.user_message("C0001", f"message {number}", thread_ts=parent["ts"])
        slack.pass_time(30)
        mention = slack.app_mention("C0001", "sum it up", thread_ts=parent["ts"])
        slack.after_call = slow_after_two
        await slack.send_event(mention)
        await final_reply(slack, "C0001", parent["ts"])
    [prompt] = batcher.prompts
    assert [message["content"] for message in prompt] == [
        *(f"message {number}" for number in range(1430, 1440)),
        "sum it up",
    ]


@pytest.mark.parametrize("store", [THREAD_CONTEXT_LIMIT + 2], indirect=True)
async def test_many_people_in_a_thread_do_not_hold_up_the_ack(slack, socket_mode):
    """bolt acknowledges an event once its listener returns (process_before_response), and
    Slack wants that within 3 s: a thread's 30 authors are named by users.info calls made
    together, not one after another, and each message still says who wrote it."""
    people = {f"U0P{number:02}": f"person{number}" for number in range(30)}
    slack.users.update(people)
    slack.delays["users.info"] = 0.15  # one after another: 32 people, about 5 s
    async with socket_mode(ScriptedBatcher("Noted.")) as (_service, batcher):
        parent = slack.user_message("C0001", "roll call", user="U0BOB")
        for user in people:
            slack.user_message("C0001", "here", user=user, thread_ts=parent["ts"])
        mention = slack.app_mention("C0001", "who is here?", thread_ts=parent["ts"])
        sent = time.monotonic()
        await slack.wait_for_ack(await slack.send_event(mention), timeout=15)
        waited = time.monotonic() - sent
        await final_reply(slack, "C0001", parent["ts"])
    assert waited < SLACK_ACK_SECONDS
    assert [message["content"] for message in batcher.prompts[0]] == [
        "bob: roll call",
        *(f"{name}: here" for name in people.values()),
        "alice: who is here?",
    ]


async def test_slow_lookups_do_not_hold_up_the_ack(slack, socket_mode):
    """What is looked up before the ack (whether the author is a stranger, the names of
    the people a message mentions, the channel's) shares one deadline: a slow Slack costs
    the names, ids standing in, not a late ack, and the message is still answered."""
    slack.delays.update({"users.info": 2.0, "conversations.info": 2.0})  # 8 s one by one
    async with socket_mode(ScriptedBatcher("Hello.")) as (_service, batcher):
        mention = slack.app_mention("C0001", "say hello to <@U0BOB>")
        sent = time.monotonic()
        await slack.wait_for_ack(await slack.send_event(mention), timeout=15)
        waited = time.monotonic() - sent
        reply = await final_reply(slack, "C0001", mention["ts"])
    assert waited < SLACK_ACK_SECONDS
    assert reply["text"] == "Hello."
    assert batcher.prompts[0][-1]["content"] == "say hello to @U0BOB"


@pytest.mark.parametrize("store", [THREAD_CONTEXT_LIMIT + 2], indirect=True)
async def test_a_slow_thread_read_leaves_time_for_an_attached_file(slack, socket_mode):
    """First mentioned in a thread longer than a page, whose later pages Slack is slow to
    send, with a file: the thread's first message is kept (what the thread is about; its
    first page's end is not what came just before), the file is still read, and the ack
    is in time."""
    notes = slack.upload("notes.txt", b"Ship on Friday.", "text/plain")

    def slow_after_the_first_page(call):
        if call.method == "conversations.replies":
            slack.delays["conversations.replies"] = 3.0

    slack.after_call = slow_after_the_first_page
    async with socket_mode(ScriptedBatcher("Noted."), max_input_chars=2000) as (_, batcher):
        parent = slack.user_message("C0001", "message 0")
        for number in range(1, THREAD_PAGE + 100):
            slack.user_message("C0001", f"message {number}", thread_ts=parent["ts"])
        mention = slack.app_mention("C0001", "sum it up", thread_ts=parent["ts"], files=[notes])
        sent = time.monotonic()
        await slack.wait_for_ack(await slack.send_event(mention), timeout=15)
        waited = time.monotonic() - sent
        await final_reply(slack, "C0001", parent["ts"])
    [prompt] = batcher.prompts
    assert waited < SLACK_ACK_SECONDS
    assert [message["content"] for message in prompt] == [
        "message 0",
        "sum it up\n\n[attached: notes.txt]\nShip on Friday.",
    ]


async def test_reset_clears_the_thread(slack, socket_mode):
    async with socket_mode():
        mention = slack.app_mention("C0001", "remember this")
        await slack.send_event(mention)
        await final_reply(slack, "C0001", mention["ts"])
        await slack.send_event(slack.app_mention("C0001", "reset", thread_ts=mention["ts"]))
        cleared = await final_reply(slack, "C0001", mention["ts"], after=1)
    assert cleared["text"] == replies.conversation_reset()


async def test_after_forget_in_a_pane_thread_what_came_before_is_not_read_again(slack, socket_mode):
    """A DM thread's next message is answered unmentioned, as a new conversation's: the
    thread was read back as its context, the forgotten messages with it, and stored again."""
    batcher = ScriptedBatcher("Noted.")
    async with socket_mode(batcher, streaming="edit"):
        started = slack.assistant_thread_started("D0001")
        await slack.send_event(started)
        ts = started["assistant_thread"]["thread_ts"]
        for n, text in enumerate(["My password is hunter2", "forget", "What is my password?"]):
            await slack.send_event(
                slack.user_message("D0001", text, thread_ts=ts, channel_type="im")
            )
            await final_reply(slack, "D0001", ts, after=n + 1)
    read_again = [message["content"] for message in batcher.prompts[-1]]
    assert read_again[-1] == "What is my password?"
    assert not any("hunter2" in text for text in read_again)


async def test_a_thread_read_back_once_its_history_expired_starts_at_its_reset(
    slack, socket_mode, redis_client
):
    """A reset conversation whose history, and the reset's marker, expired is read back
    when the bot is mentioned in its thread again: from the reset on, as after a forget,
    not with what the reset set aside."""
    batcher = ScriptedBatcher("Noted.")
    async with socket_mode(batcher):
        mention = slack.app_mention("C0001", "My password is hunter2")
        await slack.send_event(mention)
        thread = mention["ts"]
        await final_reply(slack, "C0001", thread)
        await slack.send_event(slack.app_mention("C0001", "reset", thread_ts=thread))
        assert (await final_reply(slack, "C0001", thread, after=1))["text"] == (
            replies.conversation_reset()
        )
        conversation = f"slack:{slack.team_id}:C0001:{thread}"
        expired = (keys.conversation, keys.cleared, keys.facts)
        assert await redis_client.delete(*(key(conversation) for key in expired)) == 2
        slack.user_message("C0001", "The weather is fine", thread_ts=thread)  # not to the bot
        await slack.send_event(slack.app_mention("C0001", "What is my password?", thread_ts=thread))
        await final_reply(slack, "C0001", thread, after=2)
    read_back = [message["content"] for message in batcher.prompts[-1]]
    assert any("weather" in text for text in read_back)
    assert not any("hunter2" in text for text in read_back)


def test_a_thread_is_read_back_from_the_forget_as_sent_not_as_handled():
    """A forget handled late (a re-delivery, Slack's clock ahead) left out the messages
    sent after it; a slash command's, which has no message, cuts when it was handled."""
    from adapters.slack_adapter import _sent_at

    assert _sent_at((1_700_000_999.0, "T1:D1:1700000000.000100")) == 1_700_000_000.0001
    assert _sent_at((1_700_000_999.0, "T1:D1:command:1234.5678.abcd")) == 1_700_000_999.0
    assert _sent_at(None) is None


async def test_a_failure_is_reported_and_the_adapter_goes_on(slack, socket_mode, make_batcher):
    async with socket_mode(FailsOnceBatcher(make_batcher())):
        first = slack.app_mention("C0001", "first")
        await slack.send_event(first)
        failed = await final_reply(slack, "C0001", first["ts"])
        second = slack.app_mention("C0001", "second")
        await slack.send_event(second)
        answered = await final_reply(slack, "C0001", second["ts"])
    assert failed["text"] == replies.failed()
    assert answered["text"] and answered["text"] != replies.failed()


async def test_a_storage_failure_before_the_service_is_still_answered(slack, socket_mode):
    """Redis failing while the adapter looks the thread up: the user hears, the bot goes on."""
    async with socket_mode() as (service, batcher):
        real_knows = service.knows
        calls = 0

        async def knows_fails_once(key):
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ConnectionError("Redis went away")
            return await real_knows(key)

        service.knows = knows_fails_once
        parent = slack.user_message("C0001", "we deploy on fridays", user="U0BOB")
        await slack.send_event(slack.app_mention("C0001", "first", thread_ts=parent["ts"]))
        failed = await final_reply(slack, "C0001", parent["ts"])
        await slack.send_event(slack.app_mention("C0001", "second", thread_ts=parent["ts"]))
        answered = await final_reply(slack, "C0001", parent["ts"], after=1)
    assert failed["text"] == replies.failed()
    assert answered["text"] and batcher.prompts[-1][-1]["content"] == "alice: second"


@pytest.mark.parametrize("mode", ["socket", "http"])
async def test_a_refused_bot_token_stops_the_start_naming_it(slack, make_service, mode):
    """auth.test at start: a revoked or mistyped SLACK_BOT_TOKEN is one line at start, not
    a failure at the first event."""
    connection = (
        {"slack_app_token": slack.app_token}
        if mode == "socket"
        else {"slack_signing_secret": slack.signing_secret}
    )
    settings = Settings(
        _env_file=None, slack_bot_token="xoxb-revoked", slack_api_url=slack.api_url, **connection
    )
    async with make_service() as (service, _batcher):
        adapter = SlackAdapter.from_settings(settings, service)
        with pytest.raises(AdapterError) as refused:
            await asyncio.wait_for(adapter.run(), timeout=30)
    [line] = str(refused.value).splitlines()
    assert "SLACK_BOT_TOKEN" in line and "invalid_auth" in line
    assert "xoxb-revoked" not in line
    assert refused.value.setting  # `threadbot run` exits 2: no restart fixes the token
    assert [call.method for call in slack.calls] == ["auth.test"]  # nothing served


async def test_an_unreachable_slack_api_stops_the_start_naming_its_url(make_service):
    url = f"http://127.0.0.1:{free_port()}/api/"  # nothing listens there
    settings = Settings(
        _env_file=None, slack_bot_token="xoxb-1", slack_app_token="xapp-1", slack_api_url=url
    )
    async with make_service() as (service, _batcher):
        adapter = SlackAdapter.from_settings(settings, service)
        with pytest.raises(AdapterError) as unreachable:
            await asyncio.wait_for(adapter.run(), timeout=30)
    [line] = str(unreachable.value).splitlines()
    assert f"SLACK_API_URL={url}" in line


async def test_http_mode_checks_signatures(slack, make_service):
    """HTTP mode serves the Events API on the ops server (HTTP_PORT), checking signatures."""
    port = free_port()
    settings = Settings(
        _env_file=None,
        slack_bot_token=slack.bot_token,
        slack_signing_secret=slack.signing_secret,
        slack_api_url=slack.api_url,
        http_port=port,
        stream_edit_interval=0.05,
    )
    metrics = Metrics()
    vitals = Vitals(metrics=metrics, platforms=["slack"])
    url = f"http://127.0.0.1:{port}/slack/events"
    async with (
        OpsServer(vitals=vitals, metrics=metrics, port=port, host="127.0.0.1") as server,
        make_service() as (service, batcher),
        running(SlackAdapter.from_settings(settings, service, routes=server)),
        aiohttp.ClientSession() as http,
    ):
        for _ in range(100):  # until the adapter has mounted its path (bounded)
            async with http.get(url) as response:
                if response.status == 405:  # served, and only POST
                    break
            await asyncio.sleep(0.05)
        forged = slack.app_mention("C0001", "forged")
        assert await slack.post_event(url, forged, bad_signature=True) == 401
        stale = slack.app_mention("C0001", "replayed")
        assert await slack.post_event(url, stale, timestamp=int(time.time()) - 600) == 401
        genuine = slack.app_mention("C0001", "genuine")
        assert await slack.post_event(url, genuine) == 200
        await final_reply(slack, "C0001", genuine["ts"])
    assert [p[-1]["content"] for p in batcher.prompts] == ["genuine"]


@pytest.mark.slow
async def test_threadbot_run_serves_slack_until_sigterm(slack, threadbot_run):
    """The real command, configured only by settings, answers a mention and stops cleanly."""
    settings = {
        "SLACK_BOT_TOKEN": slack.bot_token,
        "SLACK_APP_TOKEN": slack.app_token,
        "SLACK_API_URL": slack.api_url,
    }
    async with threadbot_run(**settings) as stopped:
        await slack.wait_connected(timeout=120)
        mention = slack.app_mention("C0001", "What is the capital of France?")
        await slack.send_event(mention)
        reply = await final_reply(slack, "C0001", mention["ts"])
    assert "paris" in reply["text"].lower()
    assert stopped.returncode == 0  # SIGTERM is a clean stop
    assert "Traceback" not in stopped.stderr


# --- attachments and model output ---------------------------------------------------------


async def test_a_text_file_shared_with_a_mention_reaches_the_prompt(slack, socket_mode):
    """Slack sends app_mention and a file_share message for it: one answer, file read."""
    plan = slack.upload("plan.txt", "Ship on Friday — maybe.".encode(), "text/plain")
    async with socket_mode(max_input_chars=2000) as (_service, batcher):
        mention, message = slack.mention_pair("C0001", "what does this say?", files=[plan])
        await slack.send_event(mention)
        await slack.send_event(message)
        await final_reply(slack, "C0001", mention["ts"])
        await asyncio.gather(*(slack.wait_for_ack(e["envelope_id"]) for e in slack.envelopes))
    assert [p[-1]["content"] for p in batcher.prompts] == [
        "what does this say?\n\n[attached: plan.txt]\nShip on Friday — maybe."
    ]
    assert len(bot_posts(slack, "C0001")) == 1
    assert plan["id"] in slack.downloads


async def test_a_mention_sharing_a_file_is_answered_without_its_app_mention(slack, socket_mode):
    """Slack may send only the file_share message for a mention that shares a file."""
    notes = slack.upload("notes.md", b"# Notes", "text/markdown")
    async with socket_mode(max_input_chars=2000) as (_service, batcher):
        _mention, message = slack.mention_pair("C0001", "read this", files=[notes])
        await slack.send_event(message)
        await final_reply(slack, "C0001", message["ts"])
    assert batcher.prompts[0][-1]["content"] == "read this\n\n[attached: notes.md]\n# Notes"


async def test_a_message_sent_while_the_one_before_it_downloads_its_file_comes_after_it(
    slack, socket_mode
):
    """Two DMs, each with a file that takes most of the ack's time to download: the second
    is read beside the first (its file too), waits for it, and is asked (and stored)
    after it; both acknowledged in time."""
    notes = slack.upload("notes.txt", b"Ship on Friday.", "text/plain")
    more = slack.upload("more.txt", b"Or on Monday.", "text/plain")
    slack.delays["files"] = 1.2
    dm = f"D{uuid.uuid4().hex[:8].upper()}"  # a DM of its own: no history from other tests
    async with socket_mode(ScriptedBatcher("Noted."), max_input_chars=2000) as (_, batcher):
        sent = time.monotonic()
        first = await slack.send_event(
            slack.file_share(dm, "read this", [notes], channel_type="im")
        )
        second = await slack.send_event(slack.file_share(dm, "and this", [more], channel_type="im"))
        await asyncio.gather(*(slack.wait_for_ack(envelope) for envelope in (first, second)))
        acknowledged = time.monotonic() - sent
        await final_reply(slack, dm, None, after=1)
    assert [prompt[-1]["content"] for prompt in batcher.prompts] == [
        "read this\n\n[attached: notes.txt]\nShip on Friday.",
        "and this\n\n[attached: more.txt]\nOr on Monday.",
    ]
    assert acknowledged < SLACK_ACK_SECONDS


async def test_a_binary_file_alone_is_named_and_not_downloaded(slack, socket_mode):
    photo = slack.upload("photo.png", b"\x89PNG\r\n" + bytes(120_000), "image/png")
    dm = f"D{uuid.uuid4().hex[:8].upper()}"  # a DM of its own: no history from other tests
    async with socket_mode(max_input_chars=2000) as (_service, batcher):
        await slack.send_event(slack.file_share(dm, "", [photo], channel_type="im"))
        await final_reply(slack, dm, None)
    assert batcher.prompts == [
        [{"role": "user", "content": "[attached: photo.png, image/png, 121 KB: not read]"}]
    ]
    assert slack.downloads == []


async def test_a_file_shared_in_a_known_thread_is_answered(slack, socket_mode):
    script = slack.upload("fix.py", b"print('hello')\n", "text/x-python")
    async with socket_mode(max_input_chars=2000) as (_service, batcher):
        mention = slack.app_mention("C0001", "I will send a script")
        await slack.send_event(mention)
        await final_reply(slack, "C0001", mention["ts"])
        await slack.send_event(slack.file_share("C0001", "", [script], thread_ts=mention["ts"]))
        await final_reply(slack, "C0001", mention["ts"], after=1)
        elsewhere = slack.file_share("C0001", "not for the bot", [script])
        await slack.send_event(elsewhere)
        await slack.wait_for_ack(slack.envelopes[-1]["envelope_id"])
    assert [p[-1]["content"] for p in batcher.prompts] == [
        "I will send a script",
        "[attached: fix.py]\nprint('hello')",
    ]
    assert slack.downloads == [script["id"]]  # the file shared in the channel was not read


async def test_a_file_slack_will_not_serve_is_named_and_the_turn_goes_on(slack, socket_mode):
    gone = slack.upload("gone.txt", b"deleted meanwhile", "text/plain")
    del slack.files[gone["id"]]
    async with socket_mode(max_input_chars=2000) as (_service, batcher):
        await slack.send_event(slack.file_share("D0001", "see file", [gone], channel_type="im"))
        reply = await final_reply(slack, "D0001", None)
    assert batcher.prompts[0][-1]["content"] == (
        "see file\n\n[attached: gone.txt, text/plain, 17 bytes: not read: the download failed]"
    )
    assert reply["text"]


async def test_a_remote_file_elsewhere_is_named_and_never_sent_the_token(slack, socket_mode):
    """A remote file's URL is wherever it lives (Slack: "don't send Slack tokens to it"):
    the bot neither fetches it nor sends it the token, whatever its name says."""
    asked: list[web.Request] = []

    async def elsewhere(request: web.Request) -> web.Response:
        asked.append(request)
        return web.Response(text="the internal secrets")

    app = web.Application()
    app.router.add_get("/{name}", elsewhere)
    runner, port = await serve(app)
    remote = {
        **slack.upload("notes.txt", b"", "application/vnd.slack-remote"),
        "mode": "external", "is_external": True, "external_type": "app",
        "url_private": f"http://127.0.0.1:{port}/notes.txt",
    }  # fmt: skip
    del remote["url_private_download"]
    moved = {**slack.upload("moved.txt", b"hosted", "text/plain"),
             "url_private": f"http://127.0.0.1:{port}/moved.txt"}  # fmt: skip
    del moved["url_private_download"]
    try:
        async with socket_mode(max_input_chars=2000) as (_service, batcher):
            dm = f"D{uuid.uuid4().hex[:8].upper()}"
            await slack.send_event(slack.file_share(dm, "see", [remote, moved], channel_type="im"))
            await final_reply(slack, dm, None)
    finally:
        await runner.cleanup()
    assert asked == []
    assert "internal secrets" not in batcher.prompts[0][-1]["content"]
    assert "notes.txt" in batcher.prompts[0][-1]["content"]


async def test_a_download_without_the_bot_token_meets_the_sign_in_page(slack):
    """Slack answers an unauthorised download with its sign-in page, never the file."""
    secret = slack.upload("secret.txt", b"the launch codes", "text/plain")
    async with aiohttp.ClientSession() as http, http.get(secret["url_private"]) as response:
        assert response.content_type == "text/html"
        assert "launch codes" not in await response.text()
    [wrong, right] = (
        slack_attachments([secret], AsyncWebClient(token=token, base_url=slack.api_url))[0]
        for token in ("xoxb-wrong", slack.bot_token)
    )
    assert wrong.download is not None and right.download is not None
    with pytest.raises(SlackDownloadRefused):
        await wrong.download(100)
    assert await right.download(100) == b"the launch codes"
    assert slack.downloads == [secret["id"]]


async def test_an_html_file_is_told_from_the_sign_in_page_by_its_size(slack):
    """Without `files:read` Slack answers with its sign-in page, HTML like the file."""
    page = slack.upload("page.html", b"<p>the launch codes</p>", "text/html")
    long = b"<p>" + b"the launch codes, again. " * 400 + b"</p>"  # longer than the sign-in page
    longer = slack.upload("long.html", long, "text/html")
    client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
    [html, long_html] = slack_attachments([page, longer], client)
    assert html.download is not None and long_html.download is not None
    assert await html.download(100) == b"<p>the launch codes</p>"
    assert await long_html.download(100) == long[:100]
    slack.scopes.remove("files:read")
    for refused in (html, long_html):  # the page and the long file, alike in their first bytes
        with pytest.raises(SlackDownloadRefused):
            await refused.download(100)


async def test_a_file_comes_through_the_proxy_that_slacks_client_uses(slack):
    """Behind an egress proxy (HTTPS_PROXY, which slack_sdk's client takes up), a file is
    downloaded through it, as every Slack call is, where it went direct (and, where only
    the proxy gets out, every file failed)."""
    notes = slack.upload("notes.txt", b"Ship on Friday.", "text/plain")
    async with ForwardProxy() as proxy:
        client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url, proxy=proxy.url)
        [attachment] = slack_attachments([notes], client)
        assert attachment.download is not None
        assert await attachment.download(100) == b"Ship on Friday."
    assert proxy.carried == [notes["url_private_download"]]


async def test_reasoning_is_never_posted(slack, socket_mode):
    reasoning = "<think>" + "The user wants a greeting, so I will greet them. " * 8 + "</think>"
    async with socket_mode(ScriptedBatcher(reasoning + "Hello there!")):
        mention = slack.app_mention("C0001", "hi")
        await slack.send_event(mention)
        reply = await final_reply(slack, "C0001", mention["ts"])
    assert reply["text"] == "Hello there!"
    sent = slack.calls_to("chat.postMessage") + slack.calls_to("chat.update")
    assert all("greet" not in call.params["text"] for call in sent)


@pytest.mark.parametrize(
    ("url", "ours"),
    [
        ("https://files.slack.com/files-pri/T1-F1/notes.txt", True),  # where Slack serves them
        ("https://slack.com/files-pri/T1-F1/notes.txt", True),
        ("https://files.slack.com.example.org/notes.txt", False),
        ("https://evil-slack.com/notes.txt", False),
        ("http://files.slack.com/files-pri/T1-F1/notes.txt", False),  # the token in clear
        ("https://files.slack.com:8443/notes.txt", False),
    ],
)
def test_the_token_goes_only_to_slacks_own_file_hosts(url: str, ours: bool) -> None:
    """The fake serves files beside its API; Slack serves them from files.slack.com."""
    assert _on_slack(url, "https://slack.com/api/") is ours
