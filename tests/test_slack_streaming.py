"""Native Slack streaming end to end: real slack-bolt and slack_sdk against the fake Slack,
which keeps each stream's message as Slack builds it (chat.startStream, chat.appendStream,
chat.stopStream); SLACK_STREAMING's three modes, a workspace that refuses, a stream Slack
ends early, a long answer, and an answer resumed by another process.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from conftest import GatedBatcher, PacedBatcher, ScriptedBatcher
from fake_slack import FakeSlack
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from test_service import until
from test_slack_adapter import final_reply

from adapters import slack_adapter
from adapters.slack_adapter import PLACEHOLDER, SlackAdapter
from adapters.slack_assistant import THINKING
from adapters.slack_format import MARKDOWN_LIMIT, settled, to_markdown, to_mrkdwn
from adapters.slack_stream import NativeReply, SlackStream, SlackThread
from adapters.streaming import EditBudget
from adapters.text import split_message
from bot import replies
from bot.config import Access, Settings
from bot.types import ConversationKey

ANSWER = (
    "Paris is the **capital** of France. See [the atlas](https://atlas.example/fr) for more; "
    "it has sat on the Seine since Roman times, when it was called Lutetia."
)
# Seconds of writing for a paced model, and more than one message.
LONG_ANSWER = " ".join(f"Fact {n}: {ANSWER}" for n in range(100))
STREAMING = ("chat.startStream", "chat.appendStream", "chat.stopStream")


def streamed_text(slack: FakeSlack, ts: str) -> str:
    """The Markdown the stream calls for one message carried, in order."""
    return "".join(
        call.params.get("markdown_text") or ""
        for call in slack.calls
        if call.method in STREAMING
        and call.ok
        and ts in (call.response.get("ts"), call.params.get("ts"))
    )


async def test_an_answer_streams_natively_into_its_thread(slack, socket_mode):
    async with socket_mode(ScriptedBatcher(ANSWER), streaming="auto"):
        mention = slack.app_mention("C0001", "What is the capital of France?")
        await slack.send_event(mention)
        reply = await final_reply(slack, "C0001", mention["ts"])
    assert reply["text"] == to_markdown(ANSWER)
    assert streamed_text(slack, reply["ts"]) == reply["text"]  # built by the stream alone
    [start] = slack.calls_to("chat.startStream")
    assert start.params["thread_ts"] == mention["ts"]
    assert (start.params["recipient_user_id"], start.params["recipient_team_id"]) == (
        "U0ALICE",
        slack.team_id,
    )
    [stop] = slack.calls_to("chat.stopStream")
    assert stop.params["ts"] == reply["ts"]
    assert not slack.calls_to("chat.postMessage") and not slack.calls_to("chat.update")
    statuses = [call.params["status"] for call in slack.calls_to("assistant.threads.setStatus")]
    assert statuses[0] == THINKING and statuses[-1] == ""  # shown while thinking, then cleared
    assert slack.statuses == {}


STATUS_METHOD = "assistant.threads.setStatus"


async def test_an_answer_that_waits_keeps_the_threads_status_until_it_streams(
    slack, socket_mode, make_batcher, monkeypatch
):
    """Slack clears a status two minutes after it was set if nothing is posted: it is set
    again every STATUS_INTERVAL (here 0.05 s) while the answer waits, and no more after."""
    monkeypatch.setattr(slack_adapter, "STATUS_INTERVAL", 0.05)
    gated = GatedBatcher(make_batcher())
    async with socket_mode(gated, streaming="auto"):
        mention = slack.app_mention("C0001", "What is the capital of France?")
        await slack.send_event(mention)
        await slack.wait_for_calls(STATUS_METHOD, count=4)
        gated.gate.set()
        await final_reply(slack, "C0001", mention["ts"])
        await asyncio.sleep(0.2)  # four more intervals: no status once the answer is there
    streaming = [call.method for call in slack.calls].index("chat.startStream")
    statuses = [call.params["status"] for call in slack.calls_to(STATUS_METHOD)]
    assert statuses[:4] == [THINKING] * 4 and statuses[-1] == ""
    later = [c.params["status"] for c in slack.calls[streaming:] if c.method == STATUS_METHOD]
    assert THINKING not in later


async def test_a_redelivery_leaves_the_status_of_the_answer_on_its_way(
    slack, socket_mode, make_batcher
):
    """Slack delivers a DM again (its ack came late): that delivery is not answered, and
    it cleared the thread's status while the first delivery's answer was still waiting."""
    gated = GatedBatcher(make_batcher())
    async with socket_mode(gated, streaming="native"):
        message = slack.dm("D0001", "What is the capital of France?")
        message["thread_ts"] = message["ts"]
        await slack.send_event(message)
        await slack.wait_for_calls(STATUS_METHOD, count=1)
        await asyncio.sleep(0.3)  # the answer's own, as it starts
        shown = len(slack.calls_to(STATUS_METHOD))
        await slack.send_event(message, retry_attempt=1, retry_reason="timeout")
        await slack.wait_for_calls(STATUS_METHOD, count=shown + 1)  # the re-delivery's own
        await asyncio.sleep(0.3)  # (its clear came at once)
        statuses = [call.params["status"] for call in slack.calls_to(STATUS_METHOD)]
        gated.gate.set()
        await final_reply(slack, "D0001", message["ts"])
    assert set(statuses) == {THINKING}, statuses


async def test_a_rate_limited_status_is_skipped_not_waited_for(slack, socket_mode):
    """The status line is a nicety: rate-limited (Retry-After 100 s), it was retried after
    the wait, before the answer was even asked for, and again before its end."""
    async with socket_mode(ScriptedBatcher(ANSWER), streaming="native"):
        slack.rate_limit(STATUS_METHOD, count=2, retry_after=100)
        mention = slack.app_mention("C0001", "What is the capital of France?")
        await slack.send_event(mention)
        async with asyncio.timeout(20):
            reply = await final_reply(slack, "C0001", mention["ts"])
    assert reply["text"] == to_markdown(ANSWER)
    assert [call.status for call in slack.calls_to(STATUS_METHOD)][:2] == [429, 429]


async def test_a_stream_for_a_slack_connect_guest_names_their_own_team(slack, socket_mode):
    slack.users["U0GUEST"] = "guest"
    slack.external_users["U0GUEST"] = "T0OTHER"
    guests = Access.model_validate({"slack": {"users": {"allow": ["U0GUEST"]}}})
    async with socket_mode(ScriptedBatcher(ANSWER), streaming="native", access=guests):
        mention = slack.app_mention("C0SHARED", "hello from elsewhere", user="U0GUEST")
        await slack.send_event(mention)
        reply = await final_reply(slack, "C0SHARED", mention["ts"])
    assert reply["text"] == to_markdown(ANSWER)
    [start] = slack.calls_to("chat.startStream")
    assert (start.params["recipient_user_id"], start.params["recipient_team_id"]) == (
        "U0GUEST",
        "T0OTHER",
    )


async def test_a_long_native_answer_continues_in_further_streams(slack, socket_mode):
    paragraphs = [f"Paragraph {n}: " + "lorem ipsum " * 40 for n in range(60)]
    answer = "\n\n".join(paragraphs)
    assert len(answer) > 2 * MARKDOWN_LIMIT
    async with socket_mode(ScriptedBatcher(answer), streaming="native"):
        mention = slack.app_mention("C0001", "write a lot")
        await slack.send_event(mention)
        await final_reply(slack, "C0001", mention["ts"])
        starts = await slack.wait_for_calls("chat.startStream", count=3)
        await slack.wait_for_calls("chat.stopStream", count=len(starts))
    parts = [m for m in slack.channels["C0001"] if m.get("user") == slack.bot_user_id]
    assert len(parts) == len(starts) >= 3
    assert all(len(part["text"]) <= MARKDOWN_LIMIT for part in parts)
    assert not any(slack.is_streaming("C0001", part["ts"]) for part in parts)
    shown = [line for part in parts for line in part["text"].split("\n\n")]
    assert [line.strip() for line in shown] == [p.strip() for p in paragraphs]


async def test_a_refusing_workspace_is_answered_by_edits_and_not_asked_again(
    slack, socket_mode, caplog
):
    slack.refuse_streaming("method_not_allowed_for_app")
    caplog.set_level(logging.WARNING, logger="adapters.slack_adapter")
    async with socket_mode(ScriptedBatcher(ANSWER), streaming="auto"):
        first = slack.app_mention("C0001", "first question")
        await slack.send_event(first)
        refused = await final_reply(slack, "C0001", first["ts"])
        second = slack.app_mention("C0001", "second question")
        await slack.send_event(second)
        edited = await final_reply(slack, "C0001", second["ts"])
    assert len(slack.calls_to("chat.startStream")) == 1  # tried once, in the first answer
    assert not slack.calls_to("chat.appendStream") and not slack.calls_to("chat.stopStream")
    placeholders = slack.calls_to("chat.postMessage", ok_only=True)
    assert [call.params["text"] for call in placeholders] == [PLACEHOLDER, PLACEHOLDER]
    assert refused["ts"] == placeholders[0].response["ts"]  # the placeholder, edited
    assert refused["text"] == edited["text"] != PLACEHOLDER
    assert slack.calls_to("chat.update", ok_only=True)
    refusals = [r for r in caplog.records if "refused native streaming" in r.getMessage()]
    assert len(refusals) == 1 and "method_not_allowed_for_app" in refusals[0].getMessage()


async def test_a_channel_that_takes_no_stream_is_answered_by_edits_and_the_others_stream(
    slack, socket_mode
):
    """Slack refuses a stream in a kind of channel (`channel_type_not_supported`): that
    answer goes on by edits, and so do the channel's next ones, where the answer was
    never shown (its every try refused); the workspace's other channels still stream."""
    slack.refuse_streaming_in("C0LIST")
    async with socket_mode(ScriptedBatcher(ANSWER), streaming="auto"):
        replies_in = []
        for channel in ("C0LIST", "C0LIST", "C0001"):
            mention = slack.app_mention(channel, "a question")
            await slack.send_event(mention)
            replies_in.append(await final_reply(slack, channel, mention["ts"]))
    assert [call.params["channel"] for call in slack.calls_to("chat.startStream")] == [
        "C0LIST", "C0001",
    ]  # fmt: skip
    listed, again, elsewhere = replies_in
    assert listed["text"] == again["text"] and listed["text"].startswith("Paris is the *capital*")
    assert elsewhere["text"].startswith("Paris is the **capital**")  # Markdown: streamed
    assert not slack.is_streaming("C0001", elsewhere["ts"])  # and ended


async def test_a_refused_first_post_that_ends_the_turn_is_posted_by_the_edit_path(
    slack, socket_mode
):
    """Refused at an ending (a command's reply, the turn's only post): that text is posted
    as it is, with no placeholder before it."""
    slack.refuse_streaming("feature_not_enabled")
    async with socket_mode(streaming="auto"):
        mention = slack.app_mention("C0001", "reset")
        await slack.send_event(mention)
        reply = await final_reply(slack, "C0001", mention["ts"])
    assert reply["text"] == replies.nothing_stored("reset")
    assert len(slack.calls_to("chat.startStream")) == 1
    [post] = slack.calls_to("chat.postMessage", ok_only=True)
    assert post.params["text"] == replies.nothing_stored("reset")


async def test_edit_mode_never_streams(slack, socket_mode):
    async with socket_mode(ScriptedBatcher(ANSWER), streaming="edit"):
        mention = slack.app_mention("C0001", "What is the capital of France?")
        await slack.send_event(mention)
        reply = await final_reply(slack, "C0001", mention["ts"])
    assert reply["text"].startswith("Paris is the *capital*")  # mrkdwn, by chat.update
    assert not any(slack.calls_to(method) for method in STREAMING)


async def test_a_top_level_dm_answer_is_edited_as_slack_streams_only_in_threads(slack, socket_mode):
    async with socket_mode(ScriptedBatcher(ANSWER), streaming="native"):
        dm = f"D{uuid.uuid4().hex[:10].upper()}"  # a DM of its own: no other test's history
        await slack.send_event(slack.dm(dm, "hi"))
        reply = await final_reply(slack, dm, None)
    assert reply["text"].startswith("Paris is the *capital*")
    assert not slack.calls_to("chat.startStream")


async def answered_as_streams_end(
    slack, socket_mode, batcher: ScriptedBatcher, ends: Callable[[Any], bool]
) -> None:
    """A mention in C0001 answered natively by `batcher`, Slack ending every open stream
    after the call that `ends` picks, until the answer shows whole."""

    def end_streams_after(call):
        if ends(call):
            slack.end_streams()

    slack.after_call = end_streams_after
    async with socket_mode(batcher, streaming="native"):
        mention = slack.app_mention("C0001", "What is the capital of France?")
        await slack.send_event(mention)
        reply = await final_reply(slack, "C0001", mention["ts"])
        await slack.wait_for(lambda: reply["text"] == to_markdown(batcher.answer))


async def test_a_stream_slack_ends_early_still_gets_the_whole_answer(slack, socket_mode):
    """Slack ends a stream some minutes after it began: the message is edited from then on."""
    await answered_as_streams_end(
        slack, socket_mode, ScriptedBatcher(ANSWER),
        lambda call: call.method == "chat.startStream" and call.ok,
    )  # fmt: skip
    ended = [c for c in slack.calls if c.method in STREAMING[1:]]
    assert ended and ended[0].response["error"] == "message_not_in_streaming_state"
    updates = slack.calls_to("chat.update", ok_only=True)
    assert updates[-1].params["markdown_text"] == to_markdown(ANSWER)
    assert len([m for m in slack.channels["C0001"] if m.get("user") == slack.bot_user_id]) == 1


async def test_a_stream_slack_ended_is_edited_within_the_workspaces_budget(
    slack, socket_mode, monkeypatch
):
    """Slack ends a stream while its answer is still being written: the edits that carry
    the rest spend the workspace's chat.update budget (here one edit, besides the one that
    found the stream ended and the final text), where the stream's appends spend none."""
    monkeypatch.setattr("adapters.slack_adapter.EDIT_BURST", 1)
    monkeypatch.setattr("adapters.slack_adapter.EDITS_PER_MINUTE", 0.01)
    answer = LONG_ANSWER[: MARKDOWN_LIMIT // 3]

    def the_third_append(call) -> bool:
        return call.method == "chat.appendStream" and len(slack.calls_to(call.method)) == 3

    await answered_as_streams_end(slack, socket_mode, PacedBatcher(answer), the_third_append)
    assert len(slack.calls_to("chat.appendStream", ok_only=True)) == 3
    edits = [call.params["markdown_text"] for call in slack.calls_to("chat.update")]
    assert len(edits) == 3 and edits[-1] == to_markdown(answer)  # found ended, budget, final


async def long_answer_kept(slack, socket_mode, question: str) -> str:
    """Ask in C0001, answered with LONG_ANSWER paced and streamed natively; the answer
    stored for it, once it is (within 20 s)."""
    async with socket_mode(PacedBatcher(LONG_ANSWER), streaming="native") as (service, _):
        mention = slack.app_mention("C0001", question)
        await slack.send_event(mention)
        key = str(ConversationKey("slack", slack.team_id, "C0001", mention["ts"]))
        for _ in range(400):
            history = await service.store.load(key)
            if history and history[-1]["role"] == "assistant":
                return history[-1]["content"]
            await asyncio.sleep(0.05)
    raise AssertionError(f"no answer stored for {question!r}")


async def test_a_stream_a_reader_stopped_ends_the_answer_where_it_was(slack, socket_mode):
    """Slack's stop button ends a stream for good: nothing more is appended or posted,
    nothing replaces it, the generation ends, and what the reader saw is kept, marked
    stopped (what was written past it, which they never saw, was kept too)."""

    def stop_at_once(call):
        if call.method == "chat.startStream" and call.ok:
            slack.stop_by_user("C0001", call.response["ts"])

    slack.after_call = stop_at_once
    kept = await long_answer_kept(slack, socket_mode, "What is the capital of France?")
    written = kept.removesuffix(replies.stopped()).strip()
    assert kept.endswith(replies.stopped()) and LONG_ANSWER.startswith(written)
    assert len(written) < MARKDOWN_LIMIT  # stopped long before the end
    [start] = slack.calls_to("chat.startStream")
    message = slack.message("C0001", start.response["ts"])
    assert message["text"] == start.params["markdown_text"] == to_markdown(written)
    refused = [c.response["error"] for c in slack.calls if c.method in STREAMING[1:]]
    assert refused and set(refused) == {"stopped_by_user"}
    assert not slack.calls_to("chat.update") and not slack.calls_to("chat.postMessage")


async def test_a_stop_as_a_link_is_being_written_keeps_the_text_before_it(slack, socket_mode):
    """A link still being written is held back from the stream: stopped there, the reader
    saw the text before it, and that is the answer kept (not the link's first half)."""

    def stop_at_once(call):
        if call.method == "chat.startStream" and call.ok:
            slack.stop_by_user("C0001", call.response["ts"])

    slack.after_call = stop_at_once
    linked = "See [the atlas](https://atlas.example/fr) for more on Paris, and its maps."
    async with socket_mode(ScriptedBatcher(linked), streaming="native") as (service, _):
        mention = slack.app_mention("C0001", "Where can I read about Paris?")
        await slack.send_event(mention)
        key = str(ConversationKey("slack", slack.team_id, "C0001", mention["ts"]))

        async def answered() -> bool:
            return len(await service.store.load(key)) == 2

        await until(answered)
        kept = (await service.store.load(key))[-1]["content"]
    [start] = slack.calls_to("chat.startStream")
    assert start.params["markdown_text"] == "See "  # the first 40 characters end in the link
    assert kept == f"See\n\n{replies.stopped()}"


async def stopped_long_answer(slack, socket_mode, stop_at: Callable[[Any], str | None]) -> str:
    """LONG_ANSWER, asked for in C0001 and stopped by a reader in the message that
    `stop_at` names after a call (once): the answer kept is what was written before the
    stop, marked stopped. The stopped message's ts."""
    stopped: list[str] = []

    def stop(call):
        if not stopped and (ts := stop_at(call)):
            slack.stop_by_user("C0001", ts)
            stopped.append(ts)

    slack.after_call = stop
    kept = await long_answer_kept(slack, socket_mode, "write a lot")
    written = kept.removesuffix(replies.stopped()).strip()
    assert stopped and kept.endswith(replies.stopped())
    assert LONG_ANSWER.startswith(written) and len(written) < len(LONG_ANSWER)
    return stopped[0]


async def test_a_stop_once_the_first_message_is_full_ends_a_long_answer(slack, socket_mode):
    """The stream of a long answer's first message ends once that message is full, which
    is when Slack tells of a stop just before: the generation ends there, and the rest of
    the answer is neither written nor posted."""
    [first, *_] = split_message(to_markdown(LONG_ANSWER), MARKDOWN_LIMIT)
    full = first[: settled(first)]  # all the first message's stream takes before its end

    def once_full(call) -> str | None:
        if call.method != "chat.appendStream" or not call.ok:
            return None
        ts = call.params["ts"]
        return ts if len(slack.message("C0001", ts)["text"]) >= len(full) else None

    stopped = await stopped_long_answer(slack, socket_mode, once_full)
    assert slack.message("C0001", stopped)["text"].startswith(full)
    [stop] = slack.calls_to("chat.stopStream")
    assert stop.response["error"] == "stopped_by_user"
    assert len(slack.calls_to("chat.startStream")) == 1
    assert not slack.calls_to("chat.update") and not slack.calls_to("chat.postMessage")


async def test_a_long_answers_next_message_streams_and_a_stop_there_ends_it(slack, socket_mode):
    """Once the first message is full, the answer streams on natively in a second, whose
    own stop button ends the answer there: the first message holds its whole part, and
    nothing more is written or posted."""
    [first, *_] = split_message(to_markdown(LONG_ANSWER), MARKDOWN_LIMIT)

    def the_second(call) -> str | None:
        starts = slack.calls_to("chat.startStream")
        if call.method == "chat.startStream" and call.ok and len(starts) == 2:
            return call.response["ts"]
        return None

    stopped = await stopped_long_answer(slack, socket_mode, the_second)
    [one, two] = [start.response["ts"] for start in slack.calls_to("chat.startStream")]
    assert slack.message("C0001", one)["text"] == first
    assert two == stopped and not slack.is_streaming("C0001", two)
    assert not slack.calls_to("chat.postMessage")


async def long_answer_begun(slack, on_stop=None, budget: EditBudget | None = None) -> NativeReply:
    """A native sink into a new thread of C0001 (edits at once, within `budget`),
    LONG_ANSWER's first 100 characters streamed into it."""
    client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
    mention = slack.app_mention("C0001", "write a lot")
    thread = SlackThread(client, team=slack.team_id, channel="C0001",
                         thread_ts=mention["ts"], recipient="U0ALICE")  # fmt: skip
    sink = NativeReply(
        target=SlackStream(thread, on_stop=on_stop),
        render=to_markdown, limit=MARKDOWN_LIMIT, interval=0, mark="", budget=budget,
    )  # fmt: skip
    await sink.start()
    await sink.append(LONG_ANSWER[:100])
    return sink


async def test_an_answer_started_again_replaces_what_was_streamed_as_it_goes(slack):
    """Another try writes the answer again (a worker died): its text could not be
    appended to the old try's, so the message showed the old text until the answer's end."""
    sink = await long_answer_begun(slack)
    [start] = slack.calls_to("chat.startStream")
    await sink.restart()
    await sink.append("A second try says pears.")
    shown = slack.message("C0001", start.response["ts"])["text"]
    assert shown == "A second try says pears." and not slack.is_streaming(
        "C0001", start.response["ts"]
    )
    await sink.append(" And more pears.")
    await sink.finish("A second try says pears. And more pears.")
    shown = slack.message("C0001", start.response["ts"])["text"]
    assert shown == "A second try says pears. And more pears."
    assert slack.statuses == {}


async def test_an_answer_started_again_ends_a_stream_before_deleting_its_message(slack):
    """Another try of a long answer deletes the messages past its first: the last one's
    stream was still open, and Slack deletes no message that streams (it was refused, and
    the old try's text was left in the thread)."""
    sink = await long_answer_begun(slack)
    assert len(LONG_ANSWER) > 15000
    await sink.append(LONG_ANSWER[100:15000])  # a second message, its stream open
    [_first, second] = [start.response["ts"] for start in slack.calls_to("chat.startStream")]
    assert slack.is_streaming("C0001", second)
    await sink.restart()
    calls = [(call.method, call.params.get("ts")) for call in slack.calls if call.ok]
    assert calls.index(("chat.stopStream", second)) < calls.index(("chat.delete", second))
    assert slack.message("C0001", second) is None


async def test_a_stopped_stream_gets_no_continuation(slack):
    """The reader stopped the answer just as it ended: its first message stays as they
    stopped it, and the rest of a long answer is not posted after it."""
    stops: list[bool] = []
    sink = await long_answer_begun(slack, on_stop=lambda: stops.append(True))
    [start] = slack.calls_to("chat.startStream")
    slack.stop_by_user("C0001", start.response["ts"])
    await sink.finish(LONG_ANSWER)
    assert stops == [True]
    shown = slack.message("C0001", start.response["ts"])["text"]
    assert shown == start.params["markdown_text"] and shown.startswith("Fact 0: Paris")
    assert len(slack.calls_to("chat.startStream")) == 1
    assert not slack.calls_to("chat.update") and not slack.calls_to("chat.postMessage")
    assert slack.statuses == {}


async def test_a_stream_a_reader_stopped_spends_no_edits(slack):
    """Stopped while it streamed, and found so by the next append: its final text is not
    put into it, and nothing is taken from the workspace's chat.update budget for it."""
    budget = EditBudget(per_minute=0.01, burst=5)
    sink = await long_answer_begun(slack, budget=budget)
    [start] = slack.calls_to("chat.startStream")
    slack.stop_by_user("C0001", start.response["ts"])
    await sink.append(LONG_ANSWER[100:200])  # refused: the stop is known from here on
    await sink.finish(LONG_ANSWER)
    assert not slack.calls_to("chat.update")
    assert budget.tokens == pytest.approx(5, abs=0.01)


async def test_a_failed_end_of_the_full_first_message_still_posts_the_rest(slack):
    """Ending the first message's stream once it is full fails once (a transient error,
    not a reader's stop): the rest of the long answer is posted all the same, and closing
    ends that first stream after all."""
    sink = await long_answer_begun(slack)
    slack.fail_next("chat.stopStream", "internal_error")
    await sink.finish(LONG_ANSWER)
    parts = split_message(to_markdown(LONG_ANSWER), MARKDOWN_LIMIT)
    starts = slack.calls_to("chat.startStream")
    assert len(parts) > 1 and len(starts) == len(parts)
    shown = [slack.message("C0001", start.response["ts"])["text"] for start in starts]
    assert shown == parts  # no "the rest could not be posted"
    assert not any(slack.is_streaming("C0001", start.response["ts"]) for start in starts)


async def test_a_stream_that_will_not_end_leaves_the_others_ended(slack):
    """The first message's stream refuses to end, when full and again at the close: the
    answer's later streams are ended all the same, and the close tells of the failure."""
    sink = await long_answer_begun(slack)
    slack.fail_next("chat.stopStream", "internal_error", count=2)
    with pytest.raises(SlackApiError):
        await sink.finish(LONG_ANSWER)
    [first, *later] = [start.response["ts"] for start in slack.calls_to("chat.startStream")]
    assert later and slack.is_streaming("C0001", first)
    assert not any(slack.is_streaming("C0001", ts) for ts in later)


def saved_target(slack: FakeSlack, thread_ts: str, **more: Any) -> dict[str, Any]:
    """An answer's target as an earlier process saved it, in a thread of C0001."""
    return {"team": slack.team_id, "channel": "C0001", "thread_ts": thread_ts,
            "recipient": "U0ALICE", "recipient_team": slack.team_id, **more}  # fmt: skip


def resumed(
    slack: FakeSlack, service: Any, saved: dict[str, Any], stop: Callable[..., object]
) -> Any:
    """The sink the adapter of a process that took the answer up rebuilds from `saved`."""
    settings = Settings(_env_file=None, slack_bot_token=slack.bot_token,
                        slack_api_url=slack.api_url, stream_edit_interval=0.05)  # fmt: skip
    return SlackAdapter.from_settings(settings, service)._resumed(saved, stop)


async def test_a_resumed_native_answer_is_edited_in_its_own_message(slack, make_service):
    """Another process began streaming the answer and died: the rebuilt sink stops that
    stream and edits the message, never posting a second one."""
    client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
    mention = slack.app_mention("C0001", "What is the capital of France?")
    begun = await client.chat_startStream(
        channel="C0001",
        thread_ts=mention["ts"],
        recipient_team_id=slack.team_id,
        recipient_user_id="U0ALICE",
        markdown_text="Paris is",
    )
    saved = saved_target(slack, mention["ts"], native=True, messages=[begun["ts"]])
    async with make_service() as (service, _batcher):
        sink = resumed(slack, service, saved, lambda: None)
        await sink.start()
        await sink.append("Paris is the capital")
        await sink.finish(ANSWER)
    assert sink.reply_target() == saved
    assert slack.message("C0001", begun["ts"])["text"] == to_markdown(ANSWER)
    assert not slack.is_streaming("C0001", begun["ts"])
    assert len(slack.calls_to("chat.startStream")) == 1  # the earlier process's alone
    assert not slack.calls_to("chat.postMessage")


@pytest.mark.parametrize("native", [False, True])
async def test_a_resumed_answer_whose_message_was_deleted_is_posted_again(
    slack, make_service, native
):
    """Someone deleted the answer's message before the next process took it up: the
    answer goes into a new message, whose ts is saved, where each edit failed with
    message_not_found until the turn gave up, the answer never shown."""
    client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
    mention = slack.app_mention("C0001", "What is the capital of France?")
    posted = await client.chat_postMessage(channel="C0001", thread_ts=mention["ts"], text="…")
    await client.chat_delete(channel="C0001", ts=posted["ts"])
    saved = saved_target(slack, mention["ts"], native=native, messages=[posted["ts"]])
    async with make_service() as (service, _batcher):
        sink = resumed(slack, service, saved, lambda: None)
        await sink.start()
        await sink.finish(ANSWER)
    [again] = sink.reply_target()["messages"]
    assert again != posted["ts"]
    shown = to_markdown(ANSWER) if native else to_mrkdwn(ANSWER)
    assert slack.message("C0001", again)["text"] == shown


async def test_a_message_the_answer_no_longer_needs_and_someone_deleted_is_let_go(
    slack, make_service
):
    """The final text needs one message of the two an earlier process posted, and the
    second was deleted meanwhile: its delete failed (message_not_found), so the answer's
    saved messages kept it, where a Regenerate or the next answer then looked for it."""
    client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
    mention = slack.app_mention("C0001", "What is the capital of France?")
    first, second = [
        (await client.chat_postMessage(channel="C0001", thread_ts=mention["ts"], text=t))["ts"]
        for t in ("Paris is the", "capital…")
    ]
    await client.chat_delete(channel="C0001", ts=second)
    saved = saved_target(slack, mention["ts"], messages=[first, second])
    async with make_service() as (service, _batcher):
        sink = resumed(slack, service, saved, lambda: None)
        await sink.start()
        await sink.finish(ANSWER)
    assert sink.reply_target()["messages"] == [first]
    assert slack.message("C0001", first)["text"] == to_mrkdwn(ANSWER)


@pytest.mark.parametrize("streamed_after", ["", " More follows."])
async def test_a_native_answer_whose_message_is_deleted_while_it_streams_is_posted_again(
    slack, make_service, streamed_after
):
    """Someone deleted the streaming message: each call into its stream failed with
    message_not_found, the answer was never shown, and the turn gave up after its tries.
    Found by the next text streamed into it, or at the stream's end if none came."""
    client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
    mention = slack.app_mention("C0001", "What is the capital of France?")
    saved = saved_target(slack, mention["ts"], native=True)
    async with make_service() as (service, _batcher):
        sink = resumed(slack, service, saved, lambda: None)
        await sink.start()
        await sink.append(ANSWER)
        [deleted] = sink.reply_target()["messages"]
        await client.chat_delete(channel="C0001", ts=deleted)
        await sink.append(ANSWER + streamed_after)
        await sink.finish(ANSWER + streamed_after)
    [again] = sink.reply_target()["messages"]
    assert again != deleted
    assert slack.message("C0001", again)["text"] == to_markdown(ANSWER + streamed_after)
    assert not slack.is_streaming("C0001", again)


@pytest.mark.parametrize("first_repost_fails", [False, True])
async def test_a_full_message_deleted_before_its_stream_ends_is_posted_again(
    slack, make_service, first_repost_fails
):
    """A long answer's second message, full, deleted before its stream was ended: the
    end failed (message_not_found), was only logged, and that part of the answer was
    never shown again, a gap between the first message and the third. Where posting it
    again fails too, the next text tries again."""
    mention = slack.app_mention("C0001", "Tell me about Paris.")
    saved = saved_target(slack, mention["ts"], native=True)
    answer = " ".join(f"Fact {n}: {ANSWER}" for n in range(180))  # three messages
    started: list[str] = []

    def second_deleted_once_posted(call):
        if call.method == "chat.startStream" and call.ok:
            started.append(call.response["ts"])
            if len(started) == 2:
                slack.delete_by_user("C0001", call.response["ts"])
                if first_repost_fails:
                    slack.fail_next("chat.startStream", "internal_error")

    slack.after_call = second_deleted_once_posted
    async with make_service() as (service, _batcher):
        sink = resumed(slack, service, saved, lambda: None)
        await sink.start()
        await sink.append(answer)
        await sink.finish(answer)
    messages = sink.reply_target()["messages"]
    assert len(messages) == 3 and started[1] not in messages
    shown = " ".join(slack.message("C0001", ts)["text"] for ts in messages)
    assert shown.split() == to_markdown(answer).split()  # every word, in order, once
    assert not any(slack.is_streaming("C0001", ts) for ts in messages)


async def test_a_resumed_answer_s_new_stream_stopped_by_a_reader_stops_the_answer(
    slack, make_service
):
    """Another process accepted the turn and died before posting: the rebuilt sink streams
    the answer anew, and a reader's stop of that stream reaches what stops the answer."""
    mention = slack.app_mention("C0001", "What is the capital of France?")
    saved = saved_target(slack, mention["ts"])

    def stop_at_once(call):
        if call.method == "chat.startStream" and call.ok:
            slack.stop_by_user("C0001", call.response["ts"])

    slack.after_call = stop_at_once
    stops: list[str | None] = []
    async with make_service() as (service, _batcher):
        sink = resumed(slack, service, saved, lambda shown: stops.append(shown))
        await sink.start()
        for text in ("Paris", "Paris is", "Paris is the capital"):
            await sink.append(text)
        await sink.finish(ANSWER)
    [start] = slack.calls_to("chat.startStream")
    assert [to_markdown(shown) for shown in stops] == [start.params["markdown_text"]]
