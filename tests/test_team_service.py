"""The team's rules in the service: who is denied and told so, the rate limit, personas kept
byte for byte, and the commands with their permissions (real Redis, queue and tiny model)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from conftest import GatedBatcher
from redis.exceptions import ConnectionError as RedisConnectionError
from test_service import RecordingSink, until

from bot import replies
from bot.access import Requester
from bot.config import Access, Persona, load_settings
from bot.types import ConversationKey, Turn


@pytest.fixture
def conversation() -> ConversationKey:
    return ConversationKey("slack", "TACME", "CSUPPORT", uuid.uuid4().hex)


def new_user() -> str:
    """A user of the test's own: denials and rate limits are remembered in Redis."""
    return f"U{uuid.uuid4().hex[:10].upper()}"


def say(conversation: ConversationKey, text: str, *, author: str = "UALICE", **fields) -> Turn:
    return Turn(conversation, author, text, uuid.uuid4().hex, **fields)


def command(conversation: ConversationKey, name: str, *, author: str = "UALICE") -> Turn:
    return say(conversation, name, author=author, command=name)


async def test_a_denied_user_is_told_once_an_hour_per_channel(make_service, conversation):
    told: list[str] = []
    bob = Requester("slack", new_user(), "CSUPPORT", workspace="TACME")
    rules = Access.model_validate({"slack": {"users": {"deny": [bob.user]}}})
    async with make_service(access=rules) as (service, _batcher):
        for _ in range(3):
            assert not await service.admit(bob, conversation, told.append)
        assert await service.admit(Requester("slack", "UALICE", "CSUPPORT"), conversation,
                                   told.append)  # fmt: skip
        same_channel = ConversationKey("slack", "TACME", "CSUPPORT", uuid.uuid4().hex)
        assert not await service.admit(bob, same_channel, told.append)
        assert told == [replies.denied()]  # once an hour, however many threads he tries
        elsewhere = ConversationKey("slack", "TACME", uuid.uuid4().hex, "1")
        assert not await service.admit(bob, elsewhere, told.append)
    assert told == [replies.denied(), replies.denied()]


async def test_deny_silent_says_nothing(make_service, conversation):
    told: list[str] = []
    rules = Access.model_validate({"deny": "silent", "slack": {"dms": False}})
    async with make_service(access=rules) as (service, _batcher):
        dm = Requester("slack", new_user(), "DBOB", dm=True)
        assert not await service.admit(dm, conversation, told.append)
    assert told == []


async def test_the_rate_limit_holds_across_a_restart(make_service, store, conversation):
    """Two messages a minute: the third, sent to a new service on the same Redis, is refused
    and not stored; another user is not affected."""
    rules = Access(rate_limit_per_minute=2)
    alice, bob = new_user(), new_user()
    async with make_service(access=rules) as (service, _batcher):
        for text in ("one", "two"):
            await service.handle(say(conversation, text, author=alice), RecordingSink())
    refused, other = RecordingSink(), RecordingSink()
    async with make_service(access=rules) as (service, _batcher):
        await service.handle(say(conversation, "three", author=alice), refused)
        await service.handle(say(conversation, "four", author=bob), other)
    [text] = refused.kinds("finish")
    assert text.startswith("You're asking faster") and "(It was not saved.)" in text
    assert other.kinds("finish") and other.kinds("finish")[0] != text
    contents = [m["content"] for m in await store.load(str(conversation))]
    assert "three" not in contents and "four" in contents


async def test_a_rate_under_one_a_minute_lets_one_message_through_at_a_time(
    make_service, conversation
):
    """One message every two minutes: the first is answered, the second waits its turn."""
    rules = Access(rate_limit_per_minute=0.5)
    alice = new_user()
    first, second = RecordingSink(), RecordingSink()
    async with make_service(access=rules) as (service, _batcher):
        await service.handle(say(conversation, "one", author=alice), first)
        await service.handle(say(conversation, "two", author=alice), second)
    [answer] = first.kinds("finish")
    assert not answer.startswith("You're asking faster")
    [refusal] = second.kinds("finish")
    assert refusal.startswith("You're asking faster")


async def test_a_message_delivered_twice_takes_from_the_rate_limit_once(make_service, conversation):
    """Slack's retries, and its two events for a mention that shares a file, deliver one
    message again: with two messages a minute, two messages are still answered."""
    rules = Access(rate_limit_per_minute=2)
    alice = new_user()
    first, again, second = RecordingSink(), RecordingSink(), RecordingSink()
    async with make_service(access=rules) as (service, _batcher):
        message = say(conversation, "one", author=alice)
        await asyncio.gather(service.handle(message, first), service.handle(message, again))
        await service.handle(say(conversation, "two", author=alice), second)
    assert len(first.kinds("finish") + again.kinds("finish")) == 1
    [answer] = second.kinds("finish")
    assert not answer.startswith("You're asking faster")


async def test_a_message_refused_for_pending_answers_takes_nothing_from_the_rate_limit(
    make_service, make_batcher, conversation
):
    """Two messages a minute, one pending at a time: a message refused while the first is
    answered costs no message of the rate, so the next one after the answer is answered."""
    rules, alice = Access(rate_limit_per_minute=2), new_user()
    gated = GatedBatcher(make_batcher())
    first, refused, later = RecordingSink(), RecordingSink(), RecordingSink()
    async with make_service(gated, access=rules, max_pending_per_user=1) as (service, _):
        answering = asyncio.create_task(service.handle(say(conversation, "one", author=alice),
                                                       first))  # fmt: skip
        await until(lambda: asyncio.sleep(0, service.queue.depth == 1))
        await service.handle(say(conversation, "too soon", author=alice), refused)
        gated.gate.set()
        await asyncio.wait_for(answering, timeout=30)
        await service.handle(say(conversation, "two", author=alice), later)
    assert refused.events == [("finish", replies.slow_down(1))]
    [answer] = later.kinds("finish")
    assert not answer.startswith("You're asking faster")


async def test_a_message_delivered_again_at_the_pending_limit_gives_back_nothing(
    make_service, make_batcher, conversation
):
    """Two messages a minute, one pending at a time: the first's re-delivery, refused as
    its sender has one pending (the first itself), gave back a token it never took, so
    a third message in the minute was answered."""
    rules, alice = Access(rate_limit_per_minute=2), new_user()
    gated = GatedBatcher(make_batcher())
    first = say(conversation, "one", author=alice)
    sinks = [RecordingSink() for _ in range(4)]
    async with make_service(gated, access=rules, max_pending_per_user=1) as (service, _):
        answering = asyncio.create_task(service.handle(first, sinks[0]))
        await until(lambda: asyncio.sleep(0, service.queue.depth == 1))
        await service.handle(first, sinks[1])  # Slack's retry of it
        gated.gate.set()
        await asyncio.wait_for(answering, timeout=30)
        await service.handle(say(conversation, "two", author=alice), sinks[2])
        await service.handle(say(conversation, "three", author=alice), sinks[3])
    assert sinks[1].events == []  # a re-delivery: nothing said
    [refusal] = sinks[3].kinds("finish")
    assert refusal.startswith("You're asking faster")


async def test_the_system_prompt_is_filled_once_and_kept_byte_for_byte(
    make_service, conversation, monkeypatch
):
    """{time} changes between turns, but the conversation keeps the prompt of its first turn,
    until its persona changes or it is reset."""
    clock = iter(f"09:0{i} UTC" for i in range(10))

    def values(turn: Turn) -> dict[str, str]:
        return {"date": "Tuesday", "time": next(clock), "user_name": turn.author_name,
                "channel_name": turn.channel_name, "bot_name": turn.bot_name}  # fmt: skip

    monkeypatch.setattr("bot.service.placeholder_values", values)
    persona = {"channel": "CSUPPORT", "system_prompt": "{bot_name} for {user_name} at {time}."}
    async with make_service(personas=[persona], system_prompt="Global.") as (service, batcher):
        talk = {"author_name": "Alice", "bot_name": "Helper", "channel_name": "support"}
        await service.handle(say(conversation, "first", **talk), RecordingSink())
        await service.handle(say(conversation, "second", author="UBOB", author_name="Bob",
                                 bot_name="Helper"), RecordingSink())  # fmt: skip
        first, second = batcher.prompts[0][0], batcher.prompts[1][0]
        assert first == second == {"role": "system", "content": "Helper for Alice at 09:00 UTC."}

        service.team.settings = service.team.settings.model_copy(
            update={
                "personas": (Persona.model_validate(persona | {"system_prompt": "New: {time}."}),)
            }
        )  # what a reload does
        await service.handle(say(conversation, "third", **talk), RecordingSink())
        assert batcher.prompts[2][0]["content"] == "New: 09:01 UTC."

        await service.handle(command(conversation, "reset"), RecordingSink())
        await service.handle(say(conversation, "fourth", **talk), RecordingSink())
        assert batcher.prompts[3][0]["content"] == "New: 09:02 UTC."

        sink = RecordingSink()
        await service.handle(command(conversation, "prompt"), sink)
        assert "New: 09:02 UTC." in sink.kinds("finish")[0]


@pytest.mark.parametrize("fence", ["```", "````"])
def test_a_prompt_with_a_code_fence_is_shown_whole_inside_its_own(fence):
    prompt = f"Answer with code in {fence}python blocks{fence}."
    shown = replies.prompt_in_effect(prompt, max_new_tokens=64, temperature=None)
    assert shown.count("```") == 2  # the one it is shown in
    assert prompt in shown.replace("\u200b", "")


async def test_only_the_starter_or_an_admin_may_reset_or_forget(make_service, store, conversation):
    rules = Access(admins=("UADMIN",))
    async with make_service(access=rules) as (service, _batcher):
        await service.handle(say(conversation, "hello"), RecordingSink())  # Alice starts it
        for name in ("reset", "forget"):
            refused = RecordingSink()
            await service.handle(command(conversation, name, author="UBOB"), refused)
            assert refused.kinds("finish") == [replies.not_starter(name)]
        assert await store.load(str(conversation))

        by_admin = RecordingSink()
        await service.handle(command(conversation, "reset", author="UADMIN"), by_admin)
        assert by_admin.kinds("finish") == [replies.conversation_reset()]
        assert await store.load(str(conversation)) == []

        by_starter = RecordingSink()
        await service.handle(command(conversation, "forget"), by_starter)
        assert by_starter.kinds("finish") == [replies.forgotten()]
        assert not await store.exists(str(conversation))


async def test_a_message_sent_after_a_reset_is_answered_after_it(
    make_service, store, conversation, monkeypatch
):
    """Accepted in order, the reset's task read the conversation twice before it asked for
    its lock, and the message after it could take the lock first: answered with the history
    the user dropped, and then its own exchange dropped too. (Here a slow read.)"""
    async with make_service() as (service, batcher):
        await service.handle(say(conversation, "remember 7"), RecordingSink())
        exists = store.exists

        async def slow_exists(key: str) -> bool:
            await asyncio.sleep(0.3)
            return await exists(key)

        monkeypatch.setattr(store, "exists", slow_exists)
        reset = await service.accept(command(conversation, "reset"), RecordingSink())
        after = await service.accept(say(conversation, "what number?"), RecordingSink())
        assert reset is not None and after is not None
        await asyncio.wait_for(asyncio.gather(reset, after), timeout=30)
    assert batcher.prompts[-1] == [{"role": "user", "content": "what number?"}]
    [question, _answer] = await store.load(str(conversation))
    assert question == {"role": "user", "content": "what number?"}


async def test_a_reset_that_storage_fails_is_carried_out_once_it_is_back(
    make_service, store, conversation, monkeypatch
):
    """Taken as a message is, it waits for storage as a message does: its sender hears
    that it will be done, then that it was. (Its message was marked seen as it came, and
    it failed for good: the sender had to send it again.)"""
    async with make_service() as (service, _batcher):
        await service.handle(say(conversation, "hello"), RecordingSink())
        reset = service.journal.reset

        async def lost_once(*args: object) -> str | None:
            monkeypatch.setattr(service.journal, "reset", reset)
            raise RedisConnectionError("Redis is gone")

        monkeypatch.setattr(service.journal, "reset", lost_once)
        sink = RecordingSink()
        service.serve_platform(conversation.platform, lambda _target, _stop: sink)
        await service.handle(command(conversation, "reset"), sink)
        await until(lambda: asyncio.sleep(0, bool(sink.kinds("finish"))), timeout=30)
    assert sink.events == [
        ("pause", replies.storage_lost()), ("finish", replies.conversation_reset()),
    ]  # fmt: skip
    assert await store.load(str(conversation)) == []


async def test_help_and_admin_commands(make_service, conversation, tmp_path: Path, monkeypatch):
    config = tmp_path / "team.yml"
    config.write_text("access:\n  admins: [UADMIN]\n")
    monkeypatch.setenv("THREADBOT_CONFIG", str(config))
    settings = load_settings()
    async with make_service(access=settings.access) as (service, _batcher):

        async def run(name: str, author: str) -> str:
            sink = RecordingSink()
            await service.handle(command(conversation, name, author=author), sink)
            [text] = sink.kinds("finish")
            return text

        assert "`reload`" not in await run("help", "UALICE")
        assert "`reload`" in await run("help", "UADMIN")
        for name in ("reload", "stats"):
            assert await run(name, "UALICE") == replies.admins_only(name)

        service.team._load = load_settings  # the file the test wrote
        config.write_text("access:\n  admins: [UADMIN, UALICE]\n")
        assert "access" in await run("reload", "UADMIN")
        assert "`reload`" in await run("help", "UALICE")  # Alice is an admin now

        config.write_text("access:\n  admins: UADMIN\n    broken: [\n")
        text = await run("reload", "UADMIN")
        assert text.startswith("Configuration not reloaded; the old one stays")
        assert "line" in text
        assert service.team.is_admin("UALICE")


async def test_status_tells_the_queue_and_your_place(make_service, make_batcher, conversation):
    """Alice's first question is being answered (the batcher is held), her second, in another
    thread, waits; Bob asks for the status meanwhile."""
    gated = GatedBatcher(make_batcher(max_batch=1))
    async with make_service(gated, model_name="tiny (float32 on cpu)") as (service, _batcher):
        alice = new_user()
        answering = [RecordingSink(), RecordingSink()]
        threads = [conversation, ConversationKey("slack", "TACME", "CSUPPORT", uuid.uuid4().hex)]
        tasks = [
            asyncio.create_task(service.handle(say(where, "question", author=alice), sink))
            for where, sink in zip(threads, answering, strict=True)
        ]
        for _ in range(200):  # until both are queued (bounded)
            if service.queue.depth == 2:
                break
            await asyncio.sleep(0.01)
        hers, his = RecordingSink(), RecordingSink()
        await service.handle(command(conversation, "status", author=alice), hers)
        await service.handle(command(conversation, "status", author=new_user()), his)
        gated.gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    [text] = hers.kinds("finish")
    assert "Model: tiny (float32 on cpu)." in text
    assert "Queue: 2 answering or waiting, room for 2 more." in text
    assert "Yours: being answered, #1 in line." in text
    assert his.kinds("finish")[0].endswith("Yours: none.")


async def test_stats_sums_up_the_last_hour_for_admins(make_service, conversation):
    admin = new_user()
    async with make_service(access=Access(admins=(admin,))) as (service, spy):
        for text in ("one", "two"):
            await service.handle(say(conversation, text), RecordingSink())
        sink = RecordingSink()
        await service.handle(command(conversation, "stats", author=admin), sink)
    [text] = sink.kinds("finish")
    prompt_tokens = sum(len(spy.batcher.engine.prompt_ids(p)) for p in spy.prompts)
    assert text.startswith(f"Last hour: 2 answers, {prompt_tokens:,} prompt tokens, ")
    assert "latency p50 " in text and "p95 " in text


async def test_a_channels_answer_length_and_temperature_reach_the_batcher(
    make_service, conversation
):
    persona = {"channel": "CSUPPORT", "max_new_tokens": 5, "temperature": 0}
    async with make_service(personas=[persona]) as (service, batcher):
        await service.handle(say(conversation, "hello"), RecordingSink())
        elsewhere = ConversationKey("slack", "TACME", "CRANDOM", uuid.uuid4().hex)
        await service.handle(say(elsewhere, "hello"), RecordingSink())
    assert batcher.options == [
        {"max_new_tokens": 5, "temperature": 0},
        {"max_new_tokens": None, "temperature": None},
    ]


async def test_a_persona_whose_answers_outgrow_the_window_still_reads_messages(
    make_service, conversation
):
    """Its max_new_tokens past the model's window: its prompts keep half their budget,
    where none was left, and every message was refused as too long. The answer asked for
    is what the window leaves beside the prompt: an OpenAI-compatible server refused the
    whole request (a 400), every message there."""
    persona = {"channel": "CSUPPORT", "max_new_tokens": 1_000_000}
    sink = RecordingSink()
    async with make_service(personas=[persona]) as (service, batcher):
        await service.handle(say(conversation, "hello"), sink)
        context = service.prompt_budget + service.team.settings.max_new_tokens
        left = context - service.count_tokens(batcher.prompts[0])
    assert sink.kinds("finish") and len(batcher.prompts) == 1
    assert batcher.options[0]["max_new_tokens"] == left


async def test_whoever_runs_the_terminal_chat_is_an_admin(make_service):
    console = ConversationKey("console", "-", "demo", "demo")
    sink = RecordingSink()
    async with make_service() as (service, _batcher):
        await service.handle(command(console, "stats", author="root"), sink)
    assert sink.kinds("finish")[0] != replies.admins_only("stats")


async def test_an_empty_persona_prompt_is_told_as_none(make_service, conversation):
    """`system_prompt: ""` turns the global one off: the model gets no system message, so
    `prompt` says the model's default applies, not that the prompt is empty."""
    persona = Persona(platform=conversation.platform, system_prompt="")
    async with make_service(system_prompt="Be brief.", personas=(persona,)) as (service, b):
        await service.handle(say(conversation, "hi"), RecordingSink())
        sink = RecordingSink()
        await service.handle(command(conversation, "prompt"), sink)
    assert b.prompts == [[{"role": "user", "content": "hi"}]]
    assert sink.kinds("finish")[0].startswith("No system prompt is set here")


async def test_a_filled_in_prompt_keeps_the_kv_cache_of_the_last_turn(
    make_service, conversation, monkeypatch
):
    """With {time} in the persona and the clock moving, the second turn's prompt still
    starts with the first turn's tokens, whose keys and values are reused."""
    clock = iter(["09:00 UTC", "09:07 UTC"])
    monkeypatch.setattr(
        "bot.service.placeholder_values", lambda turn: {"time": next(clock)} | dict.fromkeys(
            ("date", "user_name", "channel_name", "bot_name"), "x")
    )  # fmt: skip
    persona = {"platform": "slack", "system_prompt": "It is {time}. Be brief."}
    async with make_service(personas=[persona]) as (service, spy):
        await service.handle(say(conversation, "first"), RecordingSink())
        await service.handle(say(conversation, "second"), RecordingSink())
    first_turn = spy.batcher.engine.prompt_ids(spy.prompts[0])
    assert spy.batcher.stats.reused >= len(first_turn)


async def test_a_reload_command_run_as_a_process_starts_reaches_it(
    make_service, redis_client, tmp_path, monkeypatch
):
    """The command ran in another process while this one loaded its model, after it had
    read the team's file: its first resume pass took that count for the one it started
    with, and it kept the old rules."""
    from bot.team import Team
    from storage.reloads import TeamReloads

    monkeypatch.chdir(tmp_path)  # no developer's .env
    team_file = tmp_path / "threadbot.yml"
    team_file.write_text("access:\n  admins: [U0ADMIN]\n")
    monkeypatch.setenv("THREADBOT_CONFIG", str(team_file))
    reloads = TeamReloads(redis=redis_client, scope=f"test-{uuid.uuid4().hex}")
    team, seen = Team(load_settings()), await reloads.count()  # as `open_service` reads them
    team_file.write_text("access:\n  admins: [U0ADMIN, U0OTHER]\n")
    await reloads.add()  # an admin's `reload`, in another process
    async with make_service(team=team, reloads=reloads, reloads_seen=seen):
        async with asyncio.timeout(30):  # its first resume pass
            while not team.is_admin("U0OTHER"):
                await asyncio.sleep(0.05)


async def test_a_reload_command_reaches_every_process_of_the_deployment(
    make_service, redis_client, tmp_path, monkeypatch
):
    """Two gateways, one team file: an admin denies a user and runs `reload` in one of
    them; the other reads the file too, where it went on answering the denied user."""
    from bot.team import Team
    from storage.reloads import TeamReloads

    monkeypatch.chdir(tmp_path)  # no developer's .env
    team_file = tmp_path / "threadbot.yml"
    team_file.write_text("access:\n  admins: [U0ADMIN]\n")
    monkeypatch.setenv("THREADBOT_CONFIG", str(team_file))
    deployment = {"reloads": TeamReloads(redis=redis_client, scope=f"test-{uuid.uuid4().hex}")}
    key = ConversationKey("slack", "T1", "C1", uuid.uuid4().hex)
    mallory = Requester("slack", "U0MALLORY", "C1", workspace="T1")
    async with (
        make_service(team=Team(load_settings()), **deployment) as (one, _),
        make_service(team=Team(load_settings()), **deployment) as (other, _),
    ):
        async with asyncio.timeout(30):  # both have read the count (a first resume pass)
            while one._reloads_seen is None or other._reloads_seen is None:
                await asyncio.sleep(0.05)
        denied = "  slack:\n    users:\n      deny: [U0MALLORY]\n"
        team_file.write_text(team_file.read_text() + denied)
        sink = RecordingSink()
        await one.handle(command(key, "reload", author="U0ADMIN"), sink)
        [said] = sink.kinds("finish")
        assert said.startswith("configuration reloaded: access changed")
        assert said.endswith(replies.RELOADED_EVERYWHERE)
        assert not await one.admit(mallory, key, RecordingSink().finish)
        async with asyncio.timeout(30):  # its next resume pass
            while await other.admit(mallory, key, RecordingSink().finish):
                await asyncio.sleep(0.1)
