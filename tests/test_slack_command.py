"""`/threadbot <command>` end to end: the fake Slack sends the slash command over Socket
Mode, bolt acks it, and the answer reaches the command's response_url, ephemeral."""

from __future__ import annotations

import pytest
from fake_slack import FakeSlack
from test_slack_adapter import final_reply, serving

from adapters.slack_command import thread_only
from bot import replies


@pytest.fixture
async def slack():
    async with FakeSlack() as fake:
        yield fake


async def responses(slack: FakeSlack, trigger_id: str, count: int = 1) -> list[dict]:
    """What the command's response_url was sent, once it was sent `count` messages."""
    return await slack.wait_for(lambda: len(slack.responses[trigger_id]) >= count and
                                slack.responses[trigger_id], timeout=30)  # fmt: skip


async def test_reset_in_a_dm_clears_that_dm_and_answers_only_its_sender(slack, make_service, store):
    async with serving(slack, make_service) as (_service, engine):
        await slack.send_event(slack.dm("D0001", "remember the number 42"))
        await final_reply(slack, "D0001", None)
        assert await store.load("slack:T0001:D0001:D0001")
        trigger = await slack.send_command("D0001", "reset")
        await slack.wait_for_ack(slack.envelopes[-1]["envelope_id"])
        [response] = await responses(slack, trigger)
        assert await store.load("slack:T0001:D0001:D0001") == []
        await slack.send_event(slack.dm("D0001", "what was the number?"))
        await final_reply(slack, "D0001", None, after=1)
    assert response["response_type"] == "ephemeral"
    assert response["text"] == replies.conversation_reset()
    assert engine.prompts[-1] == [{"role": "user", "content": "what was the number?"}]


@pytest.mark.parametrize("text", ["", "help", "frobnicate the widgets"])
async def test_help_and_unknown_commands_are_answered_ephemerally(slack, make_service, text):
    async with serving(slack, make_service):
        trigger = await slack.send_command("D0001", text)
        [response] = await responses(slack, trigger)
    assert response["response_type"] == "ephemeral"
    assert response["text"]
    assert "D0001" not in slack.channels  # nothing was posted in the DM itself


@pytest.mark.parametrize("order", ["reset", "forget"])
async def test_reset_in_a_channel_points_to_the_thread_and_clears_nothing(
    slack, make_service, store, order
):
    async with serving(slack, make_service):
        mention = slack.app_mention("C0001", "remember the number 42")
        await slack.send_event(mention)
        await final_reply(slack, "C0001", mention["ts"])
        trigger = await slack.send_command("C0001", f" {order.upper()} ")
        [response] = await responses(slack, trigger)
    assert response["response_type"] == "ephemeral"
    assert response["text"] == thread_only(order)
    assert len(await store.load(f"slack:T0001:C0001:{mention['ts']}")) == 2  # untouched
