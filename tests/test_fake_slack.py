"""The fake Slack, driven by the real slack_sdk and slack_bolt (no threadbot code)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from fake_slack import FakeSlack
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as fake:
        yield fake


def web_client(slack: FakeSlack, **kwargs: Any) -> AsyncWebClient:
    return AsyncWebClient(token=slack.bot_token, base_url=slack.api_url, **kwargs)


async def test_web_api_shapes(slack: FakeSlack) -> None:
    """auth.test, chat.postMessage, chat.update, conversations.replies, users.info."""
    client = web_client(slack)
    auth = await client.auth_test()
    assert auth.headers["content-type"].startswith("application/json")
    assert (auth["team_id"], auth["user_id"], auth["bot_id"]) == (slack.team_id, "U0BOT", "B0BOT")
    assert auth["is_enterprise_install"] is False

    parent = slack.user_message("C0001", "hi bot")
    posted = await client.chat_postMessage(channel="C0001", text="...", thread_ts=parent["ts"])
    assert posted["channel"] == "C0001" and posted["message"]["thread_ts"] == parent["ts"]
    assert float(posted["ts"]) > float(parent["ts"])
    updated = await client.chat_update(channel="C0001", ts=posted["ts"], text="hello!")
    assert updated["ts"] == posted["ts"] and updated["text"] == "hello!"
    assert slack.message("C0001", posted["ts"])["text"] == "hello!"
    assert len(slack.calls_to("chat.update")) == 1
    with pytest.raises(SlackApiError) as err:
        await client.chat_update(channel="C0001", ts="1.000001", text="x")
    assert err.value.response["error"] == "message_not_found"

    replies = await client.conversations_replies(channel="C0001", ts=parent["ts"])
    assert [m["ts"] for m in replies["messages"]] == [parent["ts"], posted["ts"]]
    assert replies["messages"][0]["reply_count"] == 1 and replies["has_more"] is False
    assert replies["messages"][1]["text"] == "hello!" and replies["messages"][1]["bot_id"]
    first = await client.conversations_replies(channel="C0001", ts=parent["ts"], limit=1)
    assert len(first["messages"]) == 1 and first["has_more"] is True

    dm = slack.dm(text="psst")
    assert (dm["channel"], dm["channel_type"], dm["type"]) == ("D0001", "im", "message")
    other = slack.bot_message("C0001", "beep", thread_ts=parent["ts"])
    assert (other["subtype"], other["bot_id"]) == ("bot_message", "B0OTHER")
    thread = (await client.conversations_replies(channel="C0001", ts=parent["ts"]))["messages"]
    assert [m["ts"] for m in thread] == [parent["ts"], posted["ts"], other["ts"]]
    with pytest.raises(SlackApiError) as err:
        await client.chat_update(channel="C0001", ts=parent["ts"], text="not mine")
    assert err.value.response["error"] == "cant_update_message"

    user = await client.users_info(user="U0ALICE")
    assert user["user"]["id"] == "U0ALICE" and user["user"]["profile"]["display_name"] == "alice"

    with pytest.raises(SlackApiError) as err:
        await AsyncWebClient(token="xoxb-wrong", base_url=slack.api_url).auth_test()
    assert err.value.response["error"] == "invalid_auth"


async def test_replies_are_paged_by_time_and_cursor_as_slack_documents(slack: FakeSlack) -> None:
    """conversations.replies: earliest first between `oldest` and `latest` (their own ts only
    with `inclusive`), at most `limit` a page, the rest behind `next_cursor`."""
    client = web_client(slack)
    parent = slack.user_message("C0001", "0")
    ts = [parent["ts"]] + [
        slack.user_message("C0001", str(n), thread_ts=parent["ts"])["ts"] for n in range(1, 6)
    ]

    async def texts(**params: Any) -> list[str]:
        response = await client.conversations_replies(channel="C0001", ts=ts[0], **params)
        return [m["text"] for m in response["messages"]]

    assert await texts(latest=ts[3]) == ["0", "1", "2"]
    assert await texts(latest=ts[3], inclusive=True) == ["0", "1", "2", "3"]
    assert await texts(oldest=ts[1], latest=ts[4]) == ["2", "3"]
    assert await texts(oldest=ts[1], latest=ts[4], inclusive=True) == ["1", "2", "3", "4"]

    pages, cursor = [], None
    while True:
        page = await client.conversations_replies(
            channel="C0001", ts=ts[0], latest=ts[5], limit=2, cursor=cursor
        )
        pages.append(([m["text"] for m in page["messages"]], page["has_more"]))
        if not (cursor := page["response_metadata"]["next_cursor"]):
            break
    assert pages == [(["0", "1"], True), (["2", "3"], True), (["4"], False)]
    with pytest.raises(SlackApiError) as err:
        await client.conversations_replies(channel="C0001", ts=ts[0], cursor="not-a-cursor")
    assert err.value.response["error"] == "invalid_cursor"


async def test_rate_limit_is_retried(slack: FakeSlack) -> None:
    """A 429 with Retry-After is raised plainly, and retried by the rate-limit handler."""
    client = web_client(slack)
    posted = await client.chat_postMessage(channel="C0001", text="draft")
    slack.rate_limit("chat.update", retry_after=0)
    with pytest.raises(SlackApiError) as err:
        await client.chat_update(channel="C0001", ts=posted["ts"], text="v1")
    assert err.value.response.status_code == 429
    assert err.value.response["error"] == "ratelimited"
    assert err.value.response.headers["Retry-After"] == "0"

    retrying = web_client(slack, retry_handlers=[AsyncRateLimitErrorRetryHandler(3)])
    slack.rate_limit("chat.update", count=2, retry_after=0)
    done = await retrying.chat_update(channel="C0001", ts=posted["ts"], text="final")
    assert done["ok"] and slack.message("C0001", posted["ts"])["text"] == "final"
    statuses = [c.status for c in slack.calls_to("chat.update")]
    assert statuses == [429, 429, 429, 200]


async def test_socket_mode_with_bolt(slack: FakeSlack) -> None:
    """Bolt connects over Socket Mode, acks events, and replies in the thread."""
    app = AsyncApp(client=web_client(slack))
    seen: list[dict[str, Any]] = []

    @app.event("app_mention")
    async def on_mention(event: dict[str, Any], say: Any) -> None:
        seen.append(event)
        await say(text="on it", thread_ts=event.get("thread_ts") or event["ts"])

    # The handler's SocketModeClient uses app.client (or web_client=...) for apps.connections.open.
    handler = AsyncSocketModeHandler(app, slack.app_token)
    try:
        await asyncio.wait_for(handler.connect_async(), 5)
        await slack.wait_connected(5)
        opened = slack.calls_to("apps.connections.open")
        assert opened[0].token == "xapp-test" and opened[0].ok

        mention, message = slack.mention_pair("C0001", "what's up?")
        envelope = await slack.send_event(mention)
        ack = await slack.wait_for_ack(envelope, timeout=5)
        assert ack == {"envelope_id": envelope}
        calls = await slack.wait_for_calls("chat.postMessage", timeout=5)
        assert calls[0].params["thread_ts"] == mention["ts"]
        assert [m["text"] for m in slack.thread("C0001", mention["ts"])][1:] == ["on it"]
        assert len(seen) == 1 and len(slack.calls_to("auth.test")) == 1

        # No listener for `message`: bolt answers 404 internally and sends no ack at all.
        unhandled = await slack.send_event(message)
        with pytest.raises(TimeoutError):
            await slack.wait_for_ack(unhandled, timeout=0.3)

        # A redelivery (retry_attempt > 0) is dispatched again: bolt does not deduplicate.
        retry = await slack.send_event(mention, retry_attempt=1, retry_reason="timeout")
        await slack.wait_for_ack(retry, timeout=5)
        await slack.wait_for_calls("chat.postMessage", count=2, timeout=5)
        assert len(seen) == 2

        # Slack's `disconnect` makes the SDK fetch a fresh URL and reconnect.
        await slack.disconnect()
        await slack.wait_for(lambda: slack.connections == 2 and slack.connected, 5)
        assert len(slack.calls_to("apps.connections.open")) == 2
        await slack.wait_for_ack(await slack.send_event(mention), timeout=5)
    finally:
        await asyncio.wait_for(handler.close_async(), 5)


async def test_http_events_with_bolt(slack: FakeSlack) -> None:
    """Signed events are handled (200); a bad signature gets 401 and is not dispatched."""
    app = AsyncApp(client=web_client(slack), signing_secret=slack.signing_secret)
    seen: list[tuple[dict[str, Any], Any]] = []

    @app.event("app_mention")
    async def on_mention(event: dict[str, Any], request: Any, say: Any) -> None:
        seen.append((event, request.headers.get("x-slack-retry-num")))
        await say(text="pong", thread_ts=event["ts"])

    runner = web.AppRunner(app.web_app(path="/slack/events", port=0))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/slack/events"

        bad = slack.app_mention("C0001", "forged")
        assert await slack.post_event(url, bad, bad_signature=True) == 401
        stale = int(time.time()) - 600
        assert await slack.post_event(url, bad, timestamp=stale) == 401
        assert await slack.post_event(url, bad, signing_secret="other") == 401

        good = slack.app_mention("C0001", "ping")
        assert await slack.post_event(url, good) == 200
        calls = await slack.wait_for_calls("chat.postMessage", timeout=5)
        assert calls[0].params["thread_ts"] == good["ts"]
        assert await slack.post_event(url, good, retry_num=1) == 200
        await slack.wait_for_calls("chat.postMessage", count=2, timeout=5)
        assert [(e["ts"], n) for e, n in seen] == [(good["ts"], None), (good["ts"], ["1"])]

        challenge = {"type": "url_verification", "token": "t", "challenge": "abc123"}
        status, body = await slack.post_signed(url, challenge)
        assert (status, json.loads(body)) == (200, {"challenge": "abc123"})
        status = await slack.post_event(url, slack.user_message("C0001", "hi"))
        assert status == 404  # no `message` listener: bolt answers 404 (Slack would retry)
    finally:
        await runner.cleanup()


async def test_streams_grow_a_message_as_slack_documents(slack: FakeSlack) -> None:
    """chat.startStream posts (in a channel, for a named recipient), appendStream and
    stopStream add Markdown at its end; a stopped or expired stream takes no more."""
    client = web_client(slack)
    parent = slack.user_message("C0001", "hi bot")
    with pytest.raises(SlackApiError) as err:
        await client.chat_startStream(channel="C0001", thread_ts=parent["ts"])
    assert err.value.response["error"] == "invalid_arguments"  # no recipient outside a DM
    recipient = {"recipient_team_id": slack.team_id, "recipient_user_id": "U0ALICE"}
    started = await client.chat_startStream(
        channel="C0001", thread_ts=parent["ts"], markdown_text="**Hel", **recipient
    )
    ts = started["ts"]
    assert slack.is_streaming("C0001", ts)
    await client.chat_appendStream(channel="C0001", ts=ts, markdown_text="lo**")
    await client.chat_appendStream(
        channel="C0001", ts=ts, chunks=[{"type": "markdown_text", "text": " world"}]
    )
    stopped = await client.chat_stopStream(channel="C0001", ts=ts, markdown_text="!")
    assert stopped["message"]["text"] == "**Hello** world!"
    assert not slack.is_streaming("C0001", ts)
    assert [m["text"] for m in slack.thread("C0001", parent["ts"])] == [
        "hi bot",
        "**Hello** world!",
    ]
    with pytest.raises(SlackApiError) as err:
        await client.chat_appendStream(channel="C0001", ts=ts, markdown_text="more")
    assert err.value.response["error"] == "message_not_in_streaming_state"
    with pytest.raises(SlackApiError) as err:
        await client.chat_appendStream(channel="C0001", ts="1.000001", markdown_text="x")
    assert err.value.response["error"] == "message_not_found"

    by_reader = await client.chat_startStream(channel="D0001", thread_ts=slack.dm()["ts"])
    slack.stop_by_user("D0001", by_reader["ts"])
    with pytest.raises(SlackApiError) as err:
        await client.chat_appendStream(channel="D0001", ts=by_reader["ts"], markdown_text="x")
    assert err.value.response["error"] == "stopped_by_user"

    dm = await client.chat_startStream(channel="D0001", thread_ts=slack.dm()["ts"])
    slack.end_streams()  # as Slack does some minutes after a stream began
    with pytest.raises(SlackApiError) as err:
        await client.chat_stopStream(channel="D0001", ts=dm["ts"])
    assert err.value.response["error"] == "message_not_in_streaming_state"
    await client.chat_update(channel="D0001", ts=dm["ts"], markdown_text="edited instead")
    assert slack.message("D0001", dm["ts"])["text"] == "edited instead"
    with pytest.raises(SlackApiError) as err:
        await client.chat_postMessage(channel="C0001", markdown_text="x" * 12001)
    assert err.value.response["error"] == "msg_too_long"

    slack.refuse_streaming("missing_scope")
    with pytest.raises(SlackApiError) as err:
        await client.chat_startStream(channel="C0001", thread_ts=parent["ts"], **recipient)
    assert err.value.response["error"] == "missing_scope"


async def test_assistant_threads_status_title_and_prompts(slack: FakeSlack) -> None:
    """The status shows until the bot posts in the thread (or it is cleared); title and
    suggested prompts are kept per thread."""
    client = web_client(slack)
    started = slack.assistant_thread_started("D0001")
    thread = started["assistant_thread"]
    assert (started["type"], thread["user_id"], thread["channel_id"]) == (
        "assistant_thread_started",
        "U0ALICE",
        "D0001",
    )
    [root] = slack.thread("D0001", thread["thread_ts"])
    assert root["subtype"] == "assistant_app_thread"
    where = {"channel_id": "D0001", "thread_ts": thread["thread_ts"]}
    await client.assistant_threads_setStatus(**where, status="is thinking…")
    assert slack.statuses == {("D0001", thread["thread_ts"]): "is thinking…"}
    await client.chat_postMessage(channel="D0001", thread_ts=thread["thread_ts"], text="hi")
    assert slack.statuses == {}
    await client.assistant_threads_setStatus(**where, status="is thinking…")
    await client.assistant_threads_setStatus(**where, status="")
    assert slack.statuses == {}
    await client.assistant_threads_setTitle(**where, title="Tides")
    assert slack.titles == {("D0001", thread["thread_ts"]): "Tides"}
    prompts = [{"title": "Go", "message": "Tell me more"}]
    await client.assistant_threads_setSuggestedPrompts(**where, prompts=prompts)
    assert slack.prompts[("D0001", thread["thread_ts"])] == prompts
    with pytest.raises(SlackApiError) as err:
        await client.assistant_threads_setSuggestedPrompts(**where, prompts=[{"title": "x"}])
    assert err.value.response["error"] == "invalid_arguments"


async def test_slash_commands_with_bolt(slack: FakeSlack) -> None:
    """A slash command arrives over Socket Mode; bolt acks it and `respond` reaches the
    command's response_url."""
    app = AsyncApp(client=web_client(slack))
    seen: list[dict[str, Any]] = []

    @app.command("/threadbot")
    async def on_command(ack: Any, command: dict[str, Any], respond: Any) -> None:
        await ack()
        seen.append(command)
        await respond(text="only you can see this", response_type="ephemeral")

    handler = AsyncSocketModeHandler(app, slack.app_token)
    try:
        await asyncio.wait_for(handler.connect_async(), 5)
        await slack.wait_connected(5)
        trigger = await slack.send_command("C0001", "help me")
        await slack.wait_for_ack(slack.envelopes[-1]["envelope_id"])
        await slack.wait_for(lambda: slack.responses[trigger], 5)
    finally:
        await asyncio.wait_for(handler.close_async(), 5)
    [command] = seen
    assert (command["text"], command["channel_id"], command["user_id"]) == (
        "help me",
        "C0001",
        "U0ALICE",
    )
    assert slack.responses[trigger] == [
        {"text": "only you can see this", "response_type": "ephemeral"}
    ]
