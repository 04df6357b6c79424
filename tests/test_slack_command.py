"""`/threadbot <command>` end to end: the fake Slack sends the slash command over Socket
Mode, bolt acks it, and the answer reaches the command's response_url, ephemeral."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from fake_slack import FakeSlack
from test_slack_adapter import SLACK_ACK_SECONDS, final_reply

from adapters.slack_command import CUT_SHORT, EphemeralReply, command_turn, thread_only
from adapters.slack_format import to_mrkdwn
from bot import replies
from bot.config import Access
from storage.turns import TurnJournal


def new_dm() -> str:
    """A DM of the test's own: no history (or remembered denial) from other tests."""
    return f"D{uuid.uuid4().hex[:10].upper()}"


async def responses(slack: FakeSlack, trigger_id: str) -> list[dict]:
    """What the command's response_url was sent, once it was sent something."""
    return await slack.wait_for(lambda: slack.responses[trigger_id], timeout=30)


async def test_reset_in_a_dm_clears_that_dm_and_answers_only_its_sender(slack, socket_mode, store):
    dm = new_dm()
    async with socket_mode() as (_service, batcher):
        await slack.send_event(slack.dm(dm, "remember the number 42"))
        await final_reply(slack, dm, None)
        assert await store.load(f"slack:{slack.team_id}:{dm}:{dm}")
        trigger = await slack.send_command(dm, "reset")
        await slack.wait_for_ack(slack.envelopes[-1]["envelope_id"])
        [response] = await responses(slack, trigger)
        assert await store.load(f"slack:{slack.team_id}:{dm}:{dm}") == []
        await slack.send_event(slack.dm(dm, "what was the number?"))
        await final_reply(slack, dm, None, after=1)
    assert response["response_type"] == "ephemeral"
    assert response["text"] == replies.conversation_reset()
    assert batcher.prompts[-1] == [{"role": "user", "content": "what was the number?"}]


async def test_a_reset_a_dead_process_took_is_carried_out_and_told_to_its_sender(
    slack, socket_mode, store, redis_client
):
    """`/threadbot reset`, taken by a process that died before it carried it out: the
    next one does, and, the command's response_url gone with the process that had it,
    tells its sender with chat.postEphemeral, where the reset was dropped undone."""
    dm = new_dm()
    payload = {"channel_id": dm, "user_id": "U0ALICE", "text": "reset", "trigger_id": "1.2"}
    reset = command_turn(payload, team=slack.team_id)
    conversation = str(reset.conversation)
    await store.append(conversation, {"role": "user", "content": "remember the number 42"})
    dead = TurnJournal(redis=redis_client, store=store, owner=f"slack-dead-{dm}", lease_seconds=2)
    target = EphemeralReply(None, channel=dm, user="U0ALICE").reply_target()
    pending = await dead.accept(reset, target)
    assert pending is not None
    async with socket_mode():
        [told] = await slack.wait_for(lambda: slack.ephemerals, timeout=30)
    assert told == {"channel": dm, "user": "U0ALICE", "text": replies.conversation_reset()}
    assert await store.load(conversation) == []
    assert not await dead.is_pending(pending.id)


async def test_slow_lookups_do_not_hold_up_a_commands_ack(slack, socket_mode):
    """Slack takes a command's ack once the handler returns: what it looks up first (the
    sender's name, the channel's, whether the sender is a stranger) keeps to a deadline,
    so Slack does not report the command as failed, and it is still answered."""
    slack.delays.update({"users.info": 2.0, "conversations.info": 2.0})  # 6 s one by one
    async with socket_mode():
        await help_acked_in_time(slack)


async def help_acked_in_time(slack: FakeSlack) -> None:
    """`/threadbot help` is acknowledged within Slack's 3 seconds, and answered."""
    sent = time.monotonic()
    trigger = await slack.send_command("C0001", "help")
    await slack.wait_for_ack(slack.envelopes[-1]["envelope_id"], timeout=15)
    waited = time.monotonic() - sent
    [response] = await responses(slack, trigger)
    assert waited < SLACK_ACK_SECONDS
    assert response["text"] == to_mrkdwn(replies.help_text(admin=False))


async def test_a_slow_redis_does_not_hold_up_a_commands_ack(slack, socket_mode):
    """Redis slow to mark the command seen (3.5 s): the ack waited for it, and Slack told
    the user the command failed (operation_timeout) before its answer came."""
    async with socket_mode() as (service, _batcher):
        first_seen = service.store.first_seen

        async def slowly(*args, **kwargs) -> bool:
            await asyncio.sleep(3.5)
            return await first_seen(*args, **kwargs)

        service.store.first_seen = slowly
        await help_acked_in_time(slack)


@pytest.mark.parametrize("text", ["", "help", "frobnicate the widgets"])
async def test_help_and_unknown_commands_are_answered_with_the_help(slack, socket_mode, text):
    dm = new_dm()
    async with socket_mode():
        trigger = await slack.send_command(dm, text)
        [response] = await responses(slack, trigger)
    assert response["response_type"] == "ephemeral"
    assert response["text"] == to_mrkdwn(replies.help_text(admin=False))
    assert dm not in slack.channels  # nothing was posted in the DM itself


@pytest.mark.parametrize("order", ["reset", "forget"])
async def test_reset_in_a_channel_points_to_the_thread_and_clears_nothing(
    slack, socket_mode, store, order
):
    async with socket_mode():
        mention = slack.app_mention("C0001", "remember the number 42")
        await slack.send_event(mention)
        await final_reply(slack, "C0001", mention["ts"])
        trigger = await slack.send_command("C0001", f" {order.upper()} ")
        [response] = await responses(slack, trigger)
    assert response["response_type"] == "ephemeral"
    assert response["text"] == thread_only(order)
    assert len(await store.load(f"slack:{slack.team_id}:C0001:{mention['ts']}")) == 2  # untouched


@pytest.mark.parametrize("deny", ["reply", "silent"])
async def test_a_denied_user_is_told_each_time_and_nothing_is_done(slack, socket_mode, store, deny):
    """Only the sender sees a command's answer: a denial is always told, even `silent`."""
    dm = new_dm()
    denied = Access.model_validate({"deny": deny, "slack": {"users": {"deny": ["U0BOB"]}}})
    async with socket_mode(access=denied):
        await slack.send_event(slack.dm(dm, "remember the number 42"))
        await final_reply(slack, dm, None)
        triggers = [await slack.send_command(dm, "forget", user="U0BOB") for _ in range(2)]
        told = [await responses(slack, trigger) for trigger in triggers]
    denial = {"text": replies.denied(), "response_type": "ephemeral",
              "unfurl_links": False, "unfurl_media": False}  # fmt: skip
    assert told == [[denial], [denial]]
    assert len(await store.load(f"slack:{slack.team_id}:{dm}:{dm}")) == 2  # not forgotten


async def test_commands_as_text_and_as_the_slash_command_with_their_permissions(
    slack, socket_mode, store
):
    """Alice, an admin, opens a thread. Bob may not reset or forget it, nor use the admin
    commands, typed in the thread or through /threadbot; he may ask for the status and the
    prompt. Alice may."""
    channel = f"C{uuid.uuid4().hex[:10].upper()}"
    admins = Access(admins=("U0ALICE",))
    async with socket_mode(access=admins, system_prompt="Be brief.") as (_service, _batcher):
        mention = slack.app_mention(channel, "remember the number 42")
        await slack.send_event(mention)
        await final_reply(slack, channel, mention["ts"])

        async def typed(text: str, user: str) -> str:
            posted = len([m for m in slack.channels[channel] if m.get("user") == "U0BOT"])
            await slack.send_event(slack.user_message(channel, text, user=user,
                                                      thread_ts=mention["ts"]))  # fmt: skip
            return (await final_reply(slack, channel, mention["ts"], after=posted))["text"]

        async def ran(text: str, user: str) -> str:
            [response] = await responses(slack, await slack.send_command(channel, text, user=user))
            assert response["response_type"] == "ephemeral"
            return response["text"]

        assert await typed("reset", "U0BOB") == to_mrkdwn(replies.not_starter("reset"))
        assert await typed("forget", "U0BOB") == to_mrkdwn(replies.not_starter("forget"))
        assert await typed("stats", "U0BOB") == to_mrkdwn(replies.admins_only("stats"))
        assert await ran("reload", "U0BOB") == to_mrkdwn(replies.admins_only("reload"))
        assert (await ran("status", "U0BOB")).startswith("Model: ")
        assert "Be brief." in await typed("prompt", "U0BOB")
        assert "`reload`" in await ran("help", "U0ALICE")
        assert (await typed("stats", "U0ALICE")).startswith("Last hour: 1 answer,")
        assert len(await store.load(f"slack:{slack.team_id}:{channel}:{mention['ts']}")) == 2
        assert await typed("reset", "U0ALICE") == to_mrkdwn(replies.conversation_reset())
        assert await store.load(f"slack:{slack.team_id}:{channel}:{mention['ts']}") == []


async def test_a_reply_longer_than_five_messages_says_the_rest_is_cut(slack, socket_mode):
    """Slack takes five replies on a command's response_url: a long system prompt shown
    by `prompt` lost its end and the answer's length line, with nothing said of it."""
    long_prompt = " ".join(f"Rule {n}: answer kindly." for n in range(1400))  # ~30k chars
    async with socket_mode(system_prompt=long_prompt):
        trigger = await slack.send_command(new_dm(), "prompt")
        await slack.wait_for(lambda: len(slack.responses[trigger]) >= 5, timeout=30)
        await slack.wait_for_ack(slack.envelopes[-1]["envelope_id"])
    told = [response["text"] for response in slack.responses[trigger]]
    assert len(told) == 5 and told[-1] == CUT_SHORT
    assert "Rule 0:" in told[0] and "Rule 1399:" not in "".join(told)


@pytest.mark.parametrize("where", ["channel", "dm"])
async def test_the_prompt_shown_is_the_one_a_conversation_there_then_uses(
    slack, socket_mode, where
):
    """`/threadbot prompt` typed before anyone talks there shows the prompt filled as the
    first turn there fills it: the channel named as its messages name it (`#c0001`, not
    the command's bare `c0001`; `a direct message`, not `directmessage`)."""
    # What Slack sends as the command's `channel_name` there.
    channel, bare_name = (new_dm(), "directmessage") if where == "dm" else ("C0001", "c0001")
    persona = "{bot_name} answers {user_name} in {channel_name}."
    async with socket_mode(system_prompt=persona) as (_service, batcher):
        trigger = await slack.send_command(channel, "prompt", channel_name=bare_name)
        [shown] = await responses(slack, trigger)
        if where == "dm":
            await slack.send_event(slack.dm(channel, "hi"))
            await final_reply(slack, channel, None)
        else:
            mention = slack.app_mention(channel, "hi")
            await slack.send_event(mention)
            await final_reply(slack, channel, mention["ts"])
    [system, _question] = batcher.prompts[0]
    assert f"```\n{to_mrkdwn(system['content'])}\n```" in shown["text"]
