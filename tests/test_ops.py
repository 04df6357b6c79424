"""Health, readiness, metrics and the per-turn log line, over real HTTP on 127.0.0.1.

The service runs as `threadbot run` wires it (the ops server, the real service and queue
on the tiny model, the Slack adapter in Socket Mode on the fake Slack), on a redis-server
of each test's own, so that a test can stop it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import discord
import pytest
from conftest import BrokenLoopBatcher, SpyBatcher, running
from discord.gateway import DiscordWebSocket
from fake_discord import FakeDiscord
from fake_openai import FakeOpenAI
from fake_slack import FakeSlack
from processes import RedisServer, free_port
from prometheus_client.parser import text_string_to_metric_families
from test_slack_adapter import final_reply

import bot.ops_server
from adapters.discord_adapter import DiscordAdapter
from adapters.slack_adapter import SlackAdapter
from bot import replies
from bot.config import Settings
from bot.health import Vitals
from bot.logs import JsonFormatter
from bot.metrics import OUTCOMES, Metrics
from bot.ops_server import OpsServer, OpsServerError
from bot.runtime import connect_redis, open_answering, open_gateway, open_service, version
from bot.team import Team
from bot.turn_report import conversation_tag
from bot.types import ConversationKey, Turn
from storage.turns import TurnJournal

T = TypeVar("T")

ALLOWED_LABELS = {"platform", "outcome", "le", "version", "model", "device", "dtype"}
WAIT_S = 40  # the SDK retries a lost Socket Mode connection every 10 s
ANSWERED = frozenset({("platform", "slack"), ("outcome", "answered")})


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """This module's tests each have their own redis-server (they stop it)."""
    return redis_server.url


@dataclass
class Ops:
    url: str  # the ops server's base URL
    service: Any
    batcher: Any
    metrics: Metrics

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as http, http.get(self.url + path) as response:
            return response.status, await response.text()

    async def reachable(self) -> bool:
        """Whether /healthz answers 200 (a process may not listen yet)."""
        try:
            return (await self.get("/healthz"))[0] == 200
        except aiohttp.ClientConnectionError:
            return False

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        status, body = await self.get("/readyz")
        return status, json.loads(body)

    async def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of /metrics, parsed by prometheus-client: (name, labels) → value."""
        status, text = await self.get("/metrics")
        assert status == 200
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


async def until(
    probe: Callable[[], Awaitable[T]], check: Callable[[T], bool], timeout: float = WAIT_S
) -> T:
    """Probe until `check` holds; bounded in count and time."""
    deadline = asyncio.get_running_loop().time() + timeout
    for _ in range(int(timeout * 10)):
        if check(result := await probe()):
            return result
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    raise AssertionError(f"not reached within {timeout}s; last: {result}")


@pytest.fixture
def ops(slack: FakeSlack, make_service: Any, make_batcher: Any):
    """The ops server, the service and the Slack adapter, wired as `threadbot run` does."""

    @asynccontextmanager
    async def start(batcher: Any = None, **service_options: Any) -> AsyncIterator[Ops]:
        metrics = Metrics()
        settings = Settings(
            _env_file=None,
            slack_bot_token=slack.bot_token,
            slack_app_token=slack.app_token,
            slack_api_url=slack.api_url,
            stream_edit_interval=0.05,
            slack_streaming="edit",
        )
        vitals = Vitals(metrics=metrics, platforms=["slack"])
        port = free_port()
        if batcher is None:
            batcher = SpyBatcher(make_batcher(metrics=metrics))
        async with (
            OpsServer(vitals=vitals, metrics=metrics, port=port, host="127.0.0.1"),
            make_service(batcher, metrics=metrics, **service_options) as (service, batcher),
        ):
            adapter = SlackAdapter.from_settings(settings, service)
            vitals.started(service, [adapter])
            async with running(adapter):
                await slack.wait_connected(timeout=WAIT_S)
                yield Ops(f"http://127.0.0.1:{port}", service, batcher, metrics)

    return start


def ready(answer: tuple[int, dict[str, Any]]) -> bool:
    return answer[0] == 200


def not_ready(answer: tuple[int, dict[str, Any]]) -> bool:
    return answer[0] == 503


async def test_healthy_and_ready_once_everything_is_up(ops):
    async with ops() as up:
        assert await up.get("/healthz") == (200, json.dumps({"status": "alive"}))
        _, body = await until(up.readiness, ready)
        assert (await up.samples())["threadbot_loading", frozenset()] == 0
    assert body == {
        "ready": True,
        "checks": {"redis": "ok", "model": "ok", "engine": "ok", "slack": "ok"},
    }


async def test_alive_but_not_ready_while_the_model_loads():
    """Before the service is open (the model loading), /healthz answers and /readyz says why."""
    metrics = Metrics()
    port = free_port()
    vitals = Vitals(metrics=metrics, platforms=["slack", "discord"])
    async with OpsServer(vitals=vitals, metrics=metrics, port=port, host="127.0.0.1"):
        up = Ops(f"http://127.0.0.1:{port}", None, None, metrics)
        assert (await up.get("/healthz"))[0] == 200
        status, body = await up.readiness()
        assert status == 503
        assert body["checks"] == {
            "model": "loading",
            "slack": "not connected",
            "discord": "not connected",
        }
        samples = await up.samples()
    # Starting; the configured platforms' series exist from the start, at 0.
    assert samples["threadbot_loading", frozenset()] == 1
    assert math.isnan(samples["threadbot_pending_turns", frozenset()])  # not counted yet
    for platform in ("slack", "discord"):
        assert samples["threadbot_platform_connected", frozenset({("platform", platform)})] == 0
        for outcome in OUTCOMES:
            labels = frozenset({("platform", platform), ("outcome", outcome)})
            assert samples["threadbot_turns_total", labels] == 0


async def test_not_ready_while_redis_is_down_and_ready_when_it_is_back(ops, redis_server):
    async with ops() as up:
        await until(up.readiness, ready)
        redis_server.kill()
        _, body = await until(up.readiness, not_ready)
        assert body["checks"]["redis"].startswith("not answering")
        assert {name for name, state in body["checks"].items() if state != "ok"} == {"redis"}
        assert (await up.get("/healthz"))[0] == 200  # alive all the same
        pending = ("threadbot_pending_turns", frozenset())
        assert math.isnan((await up.samples())[pending])  # unknown, not the count before
        redis_server.start()
        await until(up.readiness, ready)
        assert (await up.samples())[pending] == 0


async def test_not_ready_while_redis_refuses_writes_and_ready_once_it_takes_them(ops, redis_client):
    """A Redis at its maxmemory (noeviction) still answers PING, while every message is
    refused ("storage unavailable"): /readyz said ok, and a load balancer kept sending."""
    async with ops() as up:
        await until(up.readiness, ready)
        await redis_client.config_set("maxmemory-policy", "noeviction")
        await redis_client.config_set("maxmemory", 1)
        try:
            _, body = await until(up.readiness, not_ready)
        finally:
            await redis_client.config_set("maxmemory", 0)
        assert body["checks"]["redis"].startswith("refuses writes: command not allowed")
        await until(up.readiness, ready)


async def test_pending_turns_are_those_of_the_platforms_it_serves(
    ops, redis_client, store, platform
):
    """A turn another platform's process left pending (the console's, `threadbot chat` on
    the same Redis stopped mid-answer; a platform no longer set up) is taken up by no
    process here: counted, it kept ThreadbotStuck ("restart the bot") firing through every
    quiet night."""
    gone = TurnJournal(redis=redis_client, store=store, owner=f"{platform}-gone", lease_seconds=2)
    conversation = ConversationKey(platform, "team", "channel", "C1")
    assert await gone.accept(Turn(conversation, "U1", "hello?", "m1"), {}) is not None
    async with ops() as up:
        await until(up.readiness, ready)
        assert (await up.samples())[("threadbot_pending_turns", frozenset())] == 0


async def test_not_ready_while_slack_is_disconnected(ops, slack):
    """The fake Slack drops the socket and refuses new ones for a while: /readyz names
    Slack, the connection gauge drops to 0; once Slack takes connections, both recover."""
    async with ops() as up:
        await until(up.readiness, ready)
        slack.fail_next("apps.connections.open", "internal_error", count=1000)
        await slack.close_sockets()
        _, body = await until(up.readiness, not_ready)
        assert body["checks"]["slack"] == "not connected"
        assert body["checks"]["redis"] == "ok"
        connected = ("threadbot_platform_connected", frozenset({("platform", "slack")}))
        assert (await up.samples())[connected] == 0
        slack.clear_failures()
        await until(up.readiness, ready)
        assert (await up.samples())[connected] == 1


async def test_discord_is_connected_from_ready_through_a_resume_until_the_gateway_is_lost(
    make_service, monkeypatch
):
    """Discord counts as connected from READY, again after a RESUMED, and not once the
    gateway is gone for good (here: the intent refused)."""
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", DiscordWebSocket.DEFAULT_GATEWAY)
    metrics = Metrics()
    vitals = Vitals(metrics=metrics, platforms=["discord"])
    port = free_port()
    up = Ops(f"http://127.0.0.1:{port}", None, None, metrics)
    async with (
        FakeDiscord() as fake,
        OpsServer(vitals=vitals, metrics=metrics, port=port, host="127.0.0.1"),
        make_service() as (service, _),
    ):
        settings = Settings(
            _env_file=None, discord_bot_token=fake.token, discord_api_url=fake.api_url
        )
        adapter = DiscordAdapter.from_settings(settings, service)
        vitals.started(service, [adapter])
        async with running(adapter) as task:
            await until(up.readiness, ready)
            await fake.close_gateway(4000)  # a dropped connection, resumed
            await fake.wait_resumed()
            await until(up.readiness, ready)
            await fake.close_gateway(4014)
            await asyncio.wait([task], timeout=WAIT_S)
            _, body = await up.readiness()
    assert body["checks"]["discord"] == "not connected"


async def test_not_ready_while_draining(ops):
    """A stop has begun (SIGTERM): a load balancer sends new events elsewhere, where it
    was told all was ready until the process went."""
    async with ops() as up:
        await until(up.readiness, ready)
        await up.service.drain(0)
        status, body = await up.readiness()
    assert status == 503 and body["checks"]["service"] == "draining"


async def test_not_ready_once_the_engine_thread_died(ops, slack, make_batcher):
    async with ops(BrokenLoopBatcher(make_batcher())) as up:
        await until(up.readiness, ready)
        await slack.send_event(slack.app_mention("C0001", "hello"))  # the batcher meets the bug
        _, body = await until(up.readiness, not_ready)
    assert body["checks"]["engine"] == "the engine thread died"


async def test_metrics_count_real_turns_without_ids_in_labels(ops, slack):
    async with ops() as up:
        first = slack.app_mention("C0001", "hello there")
        await slack.send_event(first)
        await final_reply(slack, "C0001", first["ts"])
        follow_up = slack.user_message("C0001", "and again", thread_ts=first["ts"])
        await slack.send_event(follow_up)
        await final_reply(slack, "C0001", first["ts"], after=1)
        empty = slack.app_mention("C0002", "")
        await slack.send_event(empty)
        assert (await final_reply(slack, "C0002", empty["ts"]))["text"] == replies.empty_message()
        long = slack.app_mention("C0003", "x" * 300)  # over the fixture's 200 characters
        await slack.send_event(long)
        await final_reply(slack, "C0003", long["ts"])
        samples = await up.samples()
        text = (await up.get("/metrics"))[1]

    def turns(outcome: str) -> float:
        return samples[
            "threadbot_turns_total", frozenset({("platform", "slack"), ("outcome", outcome)})
        ]

    assert (turns("answered"), turns("empty"), turns("too_long"), turns("failed")) == (2, 1, 1, 0)
    unlabelled = {name: value for (name, labels), value in samples.items() if not labels}
    assert unlabelled["threadbot_time_to_first_token_seconds_count"] == 2
    assert unlabelled["threadbot_answer_seconds_count"] == 2
    assert unlabelled["threadbot_answer_seconds_sum"] > 0
    assert unlabelled["threadbot_prompt_tokens_total"] > 0
    assert unlabelled["threadbot_generated_tokens_total"] > 0
    assert unlabelled["threadbot_kv_reused_tokens_total"] > 0  # the follow-up reused its turn
    assert unlabelled["threadbot_pending_turns"] == 0
    assert unlabelled["threadbot_queue_waiting"] == 0
    assert unlabelled["threadbot_batch_rows"] == 0
    assert samples["threadbot_platform_connected", frozenset({("platform", "slack")})] == 1
    # No label is anything but a platform, an outcome, a bucket or the build.
    for name, labels in samples:
        assert {key for key, _ in labels} <= ALLOWED_LABELS, name
    for identifier in (slack.team_id, "C0001", "C0002", "U0ALICE", first["ts"], follow_up["ts"]):
        assert identifier not in text


async def test_each_answered_turn_logs_one_info_line_without_the_text(ops, slack, caplog):
    caplog.set_level(logging.INFO)
    secret = "pumpernickel rhubarb"

    def ours() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name.split(".")[0] in ("bot", "adapters", "storage")]

    def answered() -> list[logging.LogRecord]:
        return [r for r in ours() if r.getMessage().startswith("answered turn")]

    async with ops():
        mention = slack.app_mention("C0001", f"the password is {secret}")
        await slack.send_event(mention)
        await final_reply(slack, "C0001", mention["ts"])
        # The thread shows the final text a moment before the turn is marked done and
        # logged; leaving at once would stop the service with the turn still running.
        await slack.wait_for(answered)
    [line] = answered()
    conversation = f"slack:{slack.team_id}:C0001:{mention['ts']}"
    assert line.levelno == logging.INFO
    assert (line.platform, line.conversation) == ("slack", conversation_tag(conversation))
    assert line.prompt_tokens > 0 and line.answer_tokens > 0
    assert 0 <= line.queue_wait_s <= line.first_token_s <= line.total_s
    message = line.getMessage()
    for words in (
        "tokens in",
        "queue wait",
        "first token",
        "total",
        conversation_tag(conversation),
    ):
        assert words in message
    assert not [r.getMessage() for r in ours() if secret in r.getMessage()]
    # In JSON logs the same values are fields of their own.
    fields = json.loads(JsonFormatter().format(line))
    assert fields["answer_tokens"] == line.answer_tokens and fields["level"] == "INFO"


def test_json_formatter_writes_one_parsable_line_per_record():
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.getLogger("bot.test").makeRecord(
            "bot.test", logging.ERROR, __file__, 1, "two\nlines %s", ("here",), sys.exc_info(),
            extra={"platform": "slack", "path": Path("/tmp")},
        )  # fmt: skip
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "two\nlines here" and entry["level"] == "ERROR"
    assert entry["logger"] == "bot.test" and entry["platform"] == "slack"
    assert entry["path"] == "/tmp"
    assert "ValueError: bad" in entry["exception"]


async def test_a_port_in_use_is_a_clear_error_naming_http_port():
    metrics = Metrics()
    vitals = Vitals(metrics=metrics, platforms=[])
    port = free_port()
    async with OpsServer(vitals=vitals, metrics=metrics, port=port, host="127.0.0.1"):
        with pytest.raises(OpsServerError, match=rf"HTTP_PORT={port}.*or to 0"):
            async with OpsServer(vitals=vitals, metrics=metrics, port=port, host="127.0.0.1"):
                pass


@asynccontextmanager
async def ops_alone() -> AsyncIterator[int]:
    """The ops server alone, on a port of its own; yields the port."""
    metrics = Metrics()
    port = free_port()
    vitals = Vitals(metrics=metrics, platforms=[])
    async with OpsServer(vitals=vitals, metrics=metrics, port=port, host="127.0.0.1"):
        yield port


async def test_a_connection_whose_request_never_ends_is_closed(monkeypatch):
    """It held a file descriptor for an hour (aiohttp's default): a thousand such made the
    process unable to open a socket, or a file."""
    monkeypatch.setattr(bot.ops_server, "IDLE_CLOSE_S", 0.5)
    async with ops_alone() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        await writer.drain()
        try:
            closed = await asyncio.wait_for(reader.read(), timeout=10) == b""
        finally:
            writer.close()
    assert closed


async def test_a_malformed_request_is_answered_400_and_not_logged_as_an_error(caplog):
    async with ops_alone() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nX-Long: " + b"a" * 10_000 + b"\r\n\r\n")
        await writer.drain()
        try:
            status = await asyncio.wait_for(reader.readline(), timeout=10)
        finally:
            writer.close()
    assert status.split()[1] == b"400"
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def build_info(metrics: Metrics) -> dict[str, str]:
    """The labels of `threadbot_build_info`, as /metrics serves them."""
    text = metrics.render().decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    [labels] = [s.labels for s in samples if s.name == "threadbot_build_info"]
    return labels


async def test_build_info_names_the_model_inference_url_serves():
    metrics = Metrics()
    async with FakeOpenAI() as server:
        settings = Settings(_env_file=None, inference_url=server.url)
        async with open_answering(settings, metrics):
            pass
    expected = {"version": version(), "model": "fake-model", "device": "remote", "dtype": "-"}
    assert build_info(metrics) == expected


async def test_the_batch_settings_reach_the_batcher(tmp_path, tiny_model, qwen_tokenizer):
    """MAX_BATCH, MAX_STEP_TOKENS and PREFILL_FIRST_STEPS, as the model's loader and queue
    are put together for a process that answers."""
    tiny_model.save_pretrained(tmp_path)
    qwen_tokenizer.save_pretrained(tmp_path)
    settings = Settings(
        _env_file=None, model=str(tmp_path), max_batch=3, max_step_tokens=48,
        prefill_first_steps=0,
    )  # fmt: skip
    async with open_answering(settings, Metrics()) as answering:
        batcher = answering.queue.batcher
        assert (batcher.max_batch, batcher.step_tokens, batcher.prefill_first_steps) == (3, 48, 0)


async def test_build_info_of_a_gateway_names_the_workers_model(
    redis_url, tmp_path, tiny_model, qwen_tokenizer
):
    """A gateway loads MODEL's tokenizer only: the model is the workers' to run."""
    tiny_model.config.save_pretrained(tmp_path)
    qwen_tokenizer.save_pretrained(tmp_path)
    metrics = Metrics()
    settings = Settings(_env_file=None, model=str(tmp_path), redis_url=redis_url)
    async with (
        connect_redis(settings, metrics) as redis,
        open_gateway(settings, redis, metrics, name="gateway"),
    ):
        pass
    expected = {"version": version(), "model": str(tmp_path), "device": "workers", "dtype": "-"}
    assert build_info(metrics) == expected


@pytest.mark.parametrize("shared", [True, False], ids=["REDIS_URL", "embedded"])
async def test_a_service_counts_its_redis_shared_where_redis_url_names_one(
    redis_url, tmp_path, tiny_model, qwen_tokenizer, shared
):
    """A REDIS_URL's Redis may have restarted as this process started, its other
    processes' leases lapsed unseen (`TurnJournal.shared`); the embedded one is ours."""
    tiny_model.config.save_pretrained(tmp_path / "model")
    qwen_tokenizer.save_pretrained(tmp_path / "model")
    where = {"redis_url": redis_url} if shared else {}
    settings = Settings(
        _env_file=None, model=str(tmp_path / "model"), data_dir=tmp_path / "data", **where
    )
    async with open_service(Team(settings), role="gateway") as service:
        assert service.journal.shared == shared


# --- `threadbot run` as a real process ----------------------------------------------------


@pytest.mark.slow
async def test_threadbot_run_serves_ops_and_logs_json(slack, threadbot_run, redis_server):
    """The real command on HTTP_PORT, with LOG_FORMAT=json: alive while the model loads,
    ready once Slack is connected, not ready while its Redis is down; a real turn moves
    the metrics; every line on stderr is a JSON object, and none holds the message."""
    port = free_port()
    up = Ops(f"http://127.0.0.1:{port}", None, None, Metrics())
    settings = {
        "SLACK_BOT_TOKEN": slack.bot_token,
        "SLACK_APP_TOKEN": slack.app_token,
        "SLACK_API_URL": slack.api_url,
        "HTTP_PORT": str(port),
        "LOG_FORMAT": "json",
    }
    async with threadbot_run(**settings) as stopped:
        await until(up.reachable, bool, timeout=120)
        await until(up.readiness, ready, timeout=120)
        mention = slack.app_mention("C0001", "What is the capital of France?")
        await slack.send_event(mention)
        reply = await final_reply(slack, "C0001", mention["ts"])
        # the turn is counted just after its reply lands, so wait for the count
        samples = await until(up.samples, lambda s: s.get(("threadbot_turns_total", ANSWERED)))
        redis_server.kill()
        _, body = await until(up.readiness, not_ready)
        errors = (await up.samples())["threadbot_redis_errors_total", frozenset()]
        redis_server.start()
        await until(up.readiness, ready)
    assert "paris" in reply["text"].lower()
    assert samples["threadbot_turns_total", ANSWERED] == 1
    assert samples["threadbot_answer_seconds_count", frozenset()] == 1
    assert samples["threadbot_generated_tokens_total", frozenset()] > 0
    [build] = [dict(labels) for name, labels in samples if name == "threadbot_build_info"]
    assert build.pop("dtype") in ("float32", "bfloat16")  # DTYPE=auto: what this CPU computes
    assert build == {"version": version(), "model": "bundled", "device": "cpu"}
    assert body["checks"]["redis"].startswith("not answering")
    assert errors > 0
    assert stopped.returncode == 0
    entries = [json.loads(line) for line in stopped.stderr.splitlines()]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    [turn] = [e for e in entries if e["message"].startswith("answered turn")]
    assert turn["level"] == "INFO" and turn["platform"] == "slack"
    assert turn["prompt_tokens"] > 0 and turn["answer_tokens"] > 0
    assert "capital of France" not in stopped.stderr
