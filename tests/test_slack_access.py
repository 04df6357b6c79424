"""Access rules on Slack, end to end: real slack-bolt against the fake Slack, real service.

Denied people are never stored or answered; they hear one polite line an hour per thread
(or nothing with `deny: silent`); Slack Connect users of another organisation are denied
unless allowed by id."""

from __future__ import annotations

import uuid

import pytest
from test_slack_adapter import bot_posts, final_reply

from bot import replies
from bot.config import Access
from storage import keys


def new_id(kind: str) -> str:
    """A channel of the test's own: a denial is remembered for an hour, in a Redis that
    may outlive the test run (REDIS_URL)."""
    return f"{kind}{uuid.uuid4().hex[:10].upper()}"


def rules(**slack_rules: object) -> Access:
    return Access.model_validate({"slack": slack_rules})


async def denied_reply(slack, channel: str, thread_ts: str | None) -> list[str]:
    """The bot's texts in a thread, once the last event was acknowledged."""
    await slack.wait_for_ack(slack.envelopes[-1]["envelope_id"])
    return [m["text"] for m in bot_posts(slack, channel) if m.get("thread_ts") == thread_ts]


async def test_a_denied_user_hears_once_and_nothing_is_stored(slack, socket_mode, redis_client):
    channel = new_id("C")
    async with socket_mode(access=rules(users={"deny": ["U0BOB"]})) as (_service, batcher):
        first = slack.app_mention(channel, "hello", user="U0BOB")
        await slack.send_event(first)
        await slack.send_event(slack.app_mention(channel, "again", user="U0BOB",
                                                 thread_ts=first["ts"]))  # fmt: skip
        texts = await denied_reply(slack, channel, first["ts"])
        allowed = slack.app_mention(channel, "hi, I may")
        await slack.send_event(allowed)
        await final_reply(slack, channel, allowed["ts"])
    assert texts == [replies.denied()]
    assert [p[-1]["content"] for p in batcher.prompts] == ["hi, I may"]
    assert not await redis_client.exists(
        keys.conversation(f"slack:{slack.team_id}:{channel}:{first['ts']}")
    )


@pytest.mark.parametrize(
    "denies",
    [
        lambda channel, team: rules(channels={"allow": ["C0SUPPORT"]}),
        lambda channel, team: rules(channels={"deny": [channel]}),
        lambda channel, team: rules(workspaces={"deny": [team]}),
        lambda channel, team: rules(users={"allow": ["U0CAROL"]}),
    ],
)
async def test_channels_workspaces_and_allow_lists(slack, socket_mode, denies):
    channel = new_id("C")
    async with socket_mode(access=denies(channel, slack.team_id)) as (_service, batcher):
        mention = slack.app_mention(channel, "hello")
        await slack.send_event(mention)
        texts = await denied_reply(slack, channel, mention["ts"])
    assert texts == [replies.denied()]
    assert batcher.prompts == []


async def test_dms_off_and_deny_silent(slack, socket_mode):
    access = rules(dms=False).model_copy(update={"deny": "silent"})
    async with socket_mode(access=access) as (_service, batcher):
        dm = new_id("D")
        await slack.send_event(slack.dm(dm, "hi there"))
        texts = await denied_reply(slack, dm, None)
        mention = slack.app_mention("C0001", "but here is fine")
        await slack.send_event(mention)
        await final_reply(slack, "C0001", mention["ts"])
    assert texts == []
    assert [p[-1]["content"] for p in batcher.prompts] == ["but here is fine"]


@pytest.mark.parametrize("command_team", ["ours", "theirs", "theirs, unknown to users.info"])
async def test_slack_connect_strangers_are_denied_unless_allowed(slack, socket_mode, command_team):
    """In a thread, and by the slash command, whichever workspace its payload names (the
    app's, or the user's): users.info says they are of another, or else the payload."""
    if command_team != "theirs, unknown to users.info":
        slack.users["U0GUEST"] = "guest"
    slack.external_users["U0GUEST"] = "T0OTHER"
    shared = new_id("C")
    async with socket_mode() as (_service, batcher):
        mention = slack.app_mention(shared, "hello from elsewhere", user="U0GUEST")
        await slack.send_event(mention)
        texts = await denied_reply(slack, shared, mention["ts"])
        team = "T0OTHER" if command_team.startswith("theirs") else None
        trigger = await slack.send_command(shared, "prompt", user="U0GUEST", team=team)
        told = await slack.wait_for(lambda: slack.responses[trigger], timeout=30)
    assert texts == [replies.denied()]
    assert [response["text"] for response in told] == [replies.denied()]
    assert batcher.prompts == []

    async with socket_mode(access=rules(users={"allow": ["U0GUEST", "U0ALICE"]})) as (_s, batcher):
        mention = slack.app_mention(shared, "hello again", user="U0GUEST")
        await slack.send_event(mention)
        await final_reply(slack, shared, mention["ts"])
    assert [p[-1]["content"] for p in batcher.prompts] == ["hello again"]


async def test_a_guests_slash_command_is_judged_in_our_workspace_as_their_messages_are(
    slack, socket_mode
):
    """A guest let in by user id, in a shared channel: their mention got our workspace's
    persona, but their `/threadbot prompt` (whose payload names their own workspace) was
    denied by the workspace rule, or shown no prompt, as if in another workspace."""
    slack.users["U0GUEST"] = "guest"
    slack.external_users["U0GUEST"] = "T0OTHER"
    allowed = rules(users={"allow": ["U0GUEST"]}, workspaces={"allow": [slack.team_id]})
    persona = {"platform": "slack", "workspace": slack.team_id, "system_prompt": "Ours."}
    async with socket_mode(access=allowed, personas=[persona]):
        trigger = await slack.send_command(new_id("C"), "prompt", user="U0GUEST", team="T0OTHER")
        [told] = await slack.wait_for(lambda: slack.responses[trigger], timeout=30)
    assert told["text"] != replies.denied() and "Ours." in told["text"]


@pytest.mark.parametrize("user_team", ["T0SIBLING", "E0ACME"])
async def test_in_enterprise_grid_a_sibling_workspace_is_of_our_organisation(
    slack, socket_mode, user_team
):
    """In Enterprise Grid the organisation is the enterprise: a user of a sibling workspace
    (their events name that workspace, or the enterprise) is admitted, in a thread and by
    the slash command; a user of another organisation still needs an allow."""
    slack.enterprises.update({slack.team_id: "E0ACME", "T0SIBLING": "E0ACME", "T0OTHER": "E0OTHER"})
    slack.users.update({"U0SIBLING": "sibling", "U0GUEST": "guest"})
    slack.external_users.update({"U0SIBLING": "T0SIBLING", "U0GUEST": "T0OTHER"})
    channel = new_id("C")
    async with socket_mode() as (_service, batcher):
        sibling = slack.app_mention(channel, "hello from next door", user="U0SIBLING")
        await slack.send_event(sibling | {"user_team": user_team})
        await final_reply(slack, channel, sibling["ts"])
        trigger = await slack.send_command(channel, "help", user="U0SIBLING")
        [told] = await slack.wait_for(lambda: slack.responses[trigger], timeout=30)
        guest = slack.app_mention(channel, "hello from elsewhere", user="U0GUEST")
        await slack.send_event(guest)
        texts = await denied_reply(slack, channel, guest["ts"])
    assert [p[-1]["content"] for p in batcher.prompts] == ["hello from next door"]
    assert told["text"] != replies.denied()
    assert texts == [replies.denied()]
