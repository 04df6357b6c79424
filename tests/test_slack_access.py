"""Access rules on Slack, end to end: real slack-bolt against the fake Slack, real service.

Denied people are never stored or answered; they hear one polite line an hour per thread
(or nothing with `deny: silent`); Slack Connect users of another organisation are denied
unless allowed by id."""

from __future__ import annotations

import pytest
from test_slack_adapter import bot_posts, final_reply

from bot import replies
from bot.config import Access
from storage import keys


def rules(**slack_rules: object) -> Access:
    return Access.model_validate({"slack": slack_rules})


async def denied_reply(slack, channel: str, thread_ts: str | None) -> list[str]:
    """The bot's texts in a thread, once the last event was acknowledged."""
    await slack.wait_for_ack(slack.envelopes[-1]["envelope_id"])
    return [m["text"] for m in bot_posts(slack, channel) if m.get("thread_ts") == thread_ts]


async def test_a_denied_user_hears_once_and_nothing_is_stored(slack, socket_mode, redis_client):
    async with socket_mode(access=rules(users={"deny": ["U0BOB"]})) as (_service, engine):
        first = slack.app_mention("C0001", "hello", user="U0BOB")
        await slack.send_event(first)
        await slack.send_event(slack.app_mention("C0001", "again", user="U0BOB",
                                                 thread_ts=first["ts"]))  # fmt: skip
        texts = await denied_reply(slack, "C0001", first["ts"])
        allowed = slack.app_mention("C0001", "hi, I may")
        await slack.send_event(allowed)
        await final_reply(slack, "C0001", allowed["ts"])
    assert texts == [replies.denied()]
    assert [p[-1]["content"] for p in engine.prompts] == ["hi, I may"]
    assert not await redis_client.exists(keys.conversation(f"slack:T0001:C0001:{first['ts']}"))


@pytest.mark.parametrize(
    "access",
    [
        rules(channels={"allow": ["C0SUPPORT"]}),
        rules(channels={"deny": ["C0001"]}),
        rules(workspaces={"deny": ["T0001"]}),
        rules(users={"allow": ["U0CAROL"]}),
    ],
)
async def test_channels_workspaces_and_allow_lists(slack, socket_mode, access):
    async with socket_mode(access=access) as (_service, engine):
        mention = slack.app_mention("C0001", "hello")
        await slack.send_event(mention)
        texts = await denied_reply(slack, "C0001", mention["ts"])
    assert texts == [replies.denied()]
    assert engine.prompts == []


async def test_dms_off_and_deny_silent(slack, socket_mode):
    access = rules(dms=False).model_copy(update={"deny": "silent"})
    async with socket_mode(access=access) as (_service, engine):
        await slack.send_event(slack.dm("D0001", "hi there"))
        texts = await denied_reply(slack, "D0001", None)
        mention = slack.app_mention("C0001", "but here is fine")
        await slack.send_event(mention)
        await final_reply(slack, "C0001", mention["ts"])
    assert texts == []
    assert [p[-1]["content"] for p in engine.prompts] == ["but here is fine"]


async def test_slack_connect_strangers_are_denied_unless_allowed(slack, socket_mode):
    slack.users["U0GUEST"] = "guest"
    slack.external_users["U0GUEST"] = "T0OTHER"
    async with socket_mode() as (_service, engine):
        mention = slack.app_mention("C0SHARED", "hello from elsewhere", user="U0GUEST")
        await slack.send_event(mention)
        texts = await denied_reply(slack, "C0SHARED", mention["ts"])
    assert texts == [replies.denied()]
    assert engine.prompts == []

    async with socket_mode(access=rules(users={"allow": ["U0GUEST", "U0ALICE"]})) as (_s, engine):
        mention = slack.app_mention("C0SHARED", "hello again", user="U0GUEST")
        await slack.send_event(mention)
        await final_reply(slack, "C0SHARED", mention["ts"])
    assert [p[-1]["content"] for p in engine.prompts] == ["hello again"]
