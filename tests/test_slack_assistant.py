"""The assistant pane (Agents & AI Apps) end to end against the fake Slack: a greeting and
suggested prompts when a thread starts, the status while a turn is queued and answered
(cleared after, failures included), and the title from the first question.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import FailsOnceBatcher, GatedBatcher, ScriptedBatcher
from fake_slack import FakeSlack
from test_slack_adapter import SLACK_ACK_SECONDS, final_reply

from adapters.slack_assistant import GREETING, SUGGESTED_PROMPTS, THINKING, title_of
from bot import replies
from bot.config import Access


def statuses(slack: FakeSlack) -> list[str]:
    return [call.params["status"] for call in slack.calls_to("assistant.threads.setStatus")]


async def test_a_new_assistant_thread_is_greeted_with_suggested_prompts(slack, socket_mode):
    async with socket_mode(streaming="auto"):
        started = slack.assistant_thread_started("D0001")
        await slack.wait_for_ack(await slack.send_event(started))
        thread_ts = started["assistant_thread"]["thread_ts"]
        await slack.wait_for(lambda: ("D0001", thread_ts) in slack.prompts)
    [greeting] = [m for m in slack.thread("D0001", thread_ts) if m.get("bot_id")]
    assert greeting["text"] == GREETING
    assert slack.prompts[("D0001", thread_ts)] == list(SUGGESTED_PROMPTS)


@pytest.mark.parametrize("again", ["after its ack", "while it is greeted"])
async def test_a_thread_start_delivered_again_is_greeted_once(slack, socket_mode, again):
    """Slack sends an event again after a late or lost ack: two greetings came, and still
    did where the first delivery was still being greeted (Redis slow to answer)."""
    async with socket_mode(streaming="auto") as (service, _batcher):
        first_seen = service.store.first_seen

        async def slowly(*args, **kwargs) -> bool:
            await asyncio.sleep(0.5)
            return await first_seen(*args, **kwargs)

        service.store.first_seen = slowly
        started = slack.assistant_thread_started("D0001")
        thread_ts = started["assistant_thread"]["thread_ts"]
        first = await slack.send_event(started)
        if again == "after its ack":
            await slack.wait_for_ack(first)
        retry = await slack.send_event(started, retry_attempt=1, retry_reason="timeout")
        await slack.wait_for_ack(first)
        await slack.wait_for_ack(retry)
    assert [m["text"] for m in bot_posts(slack, thread_ts)] == [GREETING]


def bot_posts(slack: FakeSlack, thread_ts: str) -> list[dict]:
    return [m for m in slack.thread("D0001", thread_ts) if m.get("bot_id")]


async def test_a_user_denied_dms_is_told_so_in_the_pane_and_not_greeted(slack, socket_mode):
    """`dms: false` turns the pane off: no greeting, no prompts, the denial instead."""
    access = Access.model_validate({"slack": {"dms": False}})
    async with socket_mode(streaming="auto", access=access):
        started = slack.assistant_thread_started("D0001", user="U0BOB")
        thread_ts = started["assistant_thread"]["thread_ts"]
        await slack.send_event(started)
        await slack.wait_for(lambda: bot_posts(slack, thread_ts))
    [told] = bot_posts(slack, thread_ts)
    assert told["text"] == replies.denied()
    assert ("D0001", thread_ts) not in slack.prompts


async def test_the_status_shows_while_answering_and_the_title_is_the_first_question(
    slack, socket_mode, make_batcher
):
    gated = GatedBatcher(make_batcher())
    async with socket_mode(gated, streaming="auto"):
        started = slack.assistant_thread_started("D0001")
        await slack.send_event(started)
        thread_ts = started["assistant_thread"]["thread_ts"]
        question = slack.user_message(
            "D0001", "How do   tides work?", thread_ts=thread_ts, channel_type="im"
        )
        await slack.send_event(question)
        await slack.wait_for(lambda: ("D0001", thread_ts) in slack.titles)
        assert slack.titles[("D0001", thread_ts)] == "How do tides work?"
        assert slack.statuses[("D0001", thread_ts)] == THINKING  # no answer yet: still thinking
        gated.gate.set()  # the model may answer now
        await final_reply(slack, "D0001", thread_ts, after=1)  # after the greeting
        follow_up = slack.user_message(
            "D0001", "and waves?", thread_ts=thread_ts, channel_type="im"
        )
        await slack.send_event(follow_up)
        await final_reply(slack, "D0001", thread_ts, after=2)
    assert ("D0001", thread_ts) not in slack.statuses  # cleared once each answer was shown
    assert len(slack.calls_to("assistant.threads.setTitle")) == 1  # the first question's only
    [first_prompt, _] = gated.prompts
    assert first_prompt[-1] == {"role": "user", "content": "How do   tides work?"}  # as written
    assert all("Chats from" not in m["content"] for m in first_prompt)  # Slack's own title


async def test_a_question_slack_sends_again_leaves_no_status(slack, socket_mode):
    """Slack sends an answered question again (its ack was late or lost): it is not
    answered again, and the status it showed on the way is cleared."""
    async with socket_mode(ScriptedBatcher("Hello."), streaming="auto") as (_service, batcher):
        started = slack.assistant_thread_started("D0001")
        await slack.send_event(started)
        thread_ts = started["assistant_thread"]["thread_ts"]
        question = slack.user_message("D0001", "hello", thread_ts=thread_ts, channel_type="im")
        await slack.send_event(question, event_id="EvQ")
        await final_reply(slack, "D0001", thread_ts, after=1)
        await slack.wait_for(lambda: statuses(slack)[-1:] == [""])  # the stream's end clears it
        shown = len(statuses(slack))
        again = await slack.send_event(question, event_id="EvQ", retry_attempt=1)
        await slack.wait_for_ack(again)
        await slack.wait_for(lambda: len(statuses(slack)) >= shown + 2)
    assert statuses(slack)[shown:] == [THINKING, ""]
    assert ("D0001", thread_ts) not in slack.statuses
    assert len(batcher.prompts) == 1


async def test_a_slow_title_does_not_hold_up_the_ack(slack, socket_mode):
    slack.delays["assistant.threads.setTitle"] = 5.0
    async with socket_mode(ScriptedBatcher("Hello."), streaming="auto"):
        started = slack.assistant_thread_started("D0001")
        await slack.send_event(started)
        thread_ts = started["assistant_thread"]["thread_ts"]
        question = slack.user_message("D0001", "hello", thread_ts=thread_ts, channel_type="im")
        sent = time.monotonic()
        await slack.wait_for_ack(await slack.send_event(question), timeout=15)
        waited = time.monotonic() - sent
        answered = await final_reply(slack, "D0001", thread_ts, after=1)
    assert waited < SLACK_ACK_SECONDS
    assert answered["text"] == "Hello."


async def test_a_slow_greeting_does_not_hold_up_the_ack(slack, socket_mode):
    slack.delays["assistant.threads.setSuggestedPrompts"] = 5.0
    async with socket_mode():
        started = slack.assistant_thread_started("D0001")
        sent = time.monotonic()
        await slack.wait_for_ack(await slack.send_event(started), timeout=15)
        waited = time.monotonic() - sent
    assert waited < SLACK_ACK_SECONDS
    [greeting] = slack.calls_to("chat.postMessage")
    assert greeting.params["text"] == GREETING


async def test_a_failed_answer_clears_the_status(slack, socket_mode, make_batcher):
    async with socket_mode(FailsOnceBatcher(make_batcher()), streaming="auto"):
        started = slack.assistant_thread_started("D0001")
        await slack.send_event(started)
        thread_ts = started["assistant_thread"]["thread_ts"]
        question = slack.user_message("D0001", "hello", thread_ts=thread_ts, channel_type="im")
        await slack.send_event(question)
        failed = await final_reply(slack, "D0001", thread_ts, after=1)
        await slack.wait_for(lambda: statuses(slack)[-1:] == [""])
    assert failed["text"] == replies.failed()
    assert statuses(slack)[0] == THINKING
    assert ("D0001", thread_ts) not in slack.statuses


async def test_a_pane_answer_by_edits_sets_the_status_too(slack, socket_mode):
    async with socket_mode(ScriptedBatcher("Fine, thanks."), streaming="edit"):
        started = slack.assistant_thread_started("D0001")
        await slack.send_event(started)
        thread_ts = started["assistant_thread"]["thread_ts"]
        question = slack.user_message(
            "D0001", "how are you", thread_ts=thread_ts, channel_type="im"
        )
        await slack.send_event(question)
        answered = await final_reply(slack, "D0001", thread_ts, after=1)
    assert answered["text"] == "Fine, thanks."
    assert statuses(slack) == [THINKING]  # the placeholder's post cleared it, as Slack does
    assert ("D0001", thread_ts) not in slack.statuses


def test_a_title_is_one_short_line():
    assert title_of("  What is\n\nthe   answer? ") == "What is the answer?"
    long = title_of("word " * 40)
    assert len(long) <= 80 and long.endswith("…") and long.startswith("word word")
