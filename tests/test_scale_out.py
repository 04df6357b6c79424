"""Scale-out with real processes on one machine: `threadbot run --role gateway` on the fake
Slack, `--role worker` processes on the bundled model (or an OpenAI-compatible server),
and a redis-server of the test's own. Workers are killed with SIGKILL, gateways too.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import data_dir_with
from fake_openai import FakeOpenAI, Status
from fake_server import wait_for
from fake_slack import FakeSlack
from processes import BotProcess, free_port
from redis.asyncio import Redis
from test_cli import cli_env
from test_faults import DRAGON, answered, bot_replies, is_final, stored_once_answered, streaming
from test_ops import Ops, until

from bot import replies
from bot.metrics import Metrics
from storage import keys

pytestmark = pytest.mark.slow

CHANNEL = "C0001"
# Workers claim a job idle this long: short where a test kills one or fails its jobs. Where
# nothing dies it is long, so that a worker slowed by a busy machine keeps its jobs (else
# another claims them, and answers them again).
QUICK_CLAIM_S, CLAIM_S = "1.5", "10"


class Cluster:
    """Gateways and workers of one deployment: one data dir, one Redis, the fake Slack;
    each process logs to its own file."""

    def __init__(self, tmp_path: Path, data: Path, redis_url: str, slack: FakeSlack) -> None:
        self.tmp_path, self.slack = tmp_path, slack
        self.common = dict(
            MODEL="bundled", MAX_NEW_TOKENS="16", DATA_DIR=str(data), REDIS_URL=redis_url,
            TURN_LEASE_S="1", JOB_CLAIM_IDLE_S=CLAIM_S,
        )  # fmt: skip
        self.started: list[BotProcess] = []
        self.metrics_ports: dict[BotProcess, int] = {}
        self.workers = 0

    async def gateway(self, **settings: str) -> BotProcess:
        slack = self.slack
        platform = dict(
            SLACK_BOT_TOKEN=slack.bot_token, SLACK_APP_TOKEN=slack.app_token,
            SLACK_API_URL=slack.api_url, STREAM_EDIT_INTERVAL="0.2", SLACK_STREAMING="edit",
        )  # fmt: skip
        env = cli_env(**(self.common | platform | settings))
        process = BotProcess(
            cwd=self.tmp_path, env=env, log=self.tmp_path / "gateway.log", role="gateway"
        )
        connections = slack.connections
        await self._start(process)
        await slack.wait_for(lambda: slack.connections > connections or not process.alive, 120)
        assert process.alive, process.text()
        return process

    async def worker(self, name: str, **settings: str) -> BotProcess:
        port = free_port()
        env = cli_env(**(self.common | {"HTTP_PORT": str(port)} | settings))
        log = self.tmp_path / f"{name}.log"
        process = BotProcess(cwd=self.tmp_path, env=env, log=log, role="worker")
        self.metrics_ports[process] = port
        await self._start(process)
        # A core of its own, before torch reads how many it may use: two workers' thread
        # teams on the same cores slow each other tenfold.
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(process.process.pid, {cores[self.workers % len(cores)]})
        self.workers += 1
        await process.wait_log("taking jobs", 120)
        return process

    async def _start(self, process: BotProcess) -> None:
        await process.start()
        self.started.append(process)

    async def metric(self, worker: BotProcess, name: str) -> float:
        """A counter's value on a worker's /metrics (0 if it has no sample yet)."""
        url = f"http://127.0.0.1:{self.metrics_ports[worker]}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text.decode(), re.MULTILINE)
        return float(found.group(1)) if found else 0.0


@pytest.fixture
async def cluster(tmp_path, bundled_engine, bundled_cache, redis_server, slack):
    """`bundled_engine` has converted the bundled model once, into `bundled_cache`: the
    gateway reads its tokenizer there, the workers its weights."""
    data = data_dir_with(bundled_cache, tmp_path / "data")
    made = Cluster(tmp_path, data, redis_server.url, slack)
    yield made
    for process in made.started:
        await process.close()


def answers_in(worker: BotProcess) -> list[str]:
    return re.findall(r"job (\w+) answered", worker.text())


async def answers_logged(workers: list[BotProcess], count: int) -> list[str]:
    """The jobs the workers logged as answered, once there are `count`: a worker logs it
    after writing the answer's end, which the gateway may show in the thread first."""

    def logged() -> list[str] | None:
        jobs = [job for worker in workers for job in answers_in(worker)]
        return jobs if len(jobs) >= count else None

    return await wait_for(logged, 60)


async def answered_turns(slack: FakeSlack, thread_ts: str, turns: int) -> list[dict]:
    """The thread once it shows `turns` final answers."""

    def done() -> list[dict] | None:
        posts = bot_replies(slack, CHANNEL, thread_ts)
        return posts if len(posts) == turns and all(is_final(p["text"]) for p in posts) else None

    return await slack.wait_for(done, 120)


async def test_one_gateway_and_two_workers_answer_every_turn_once_in_its_thread(
    cluster, slack, redis_server
):
    await cluster.gateway()
    workers = await asyncio.gather(cluster.worker("w1"), cluster.worker("w2"))

    async def converse(n: int) -> str:
        """One person's conversation (one person could not hold five at once:
        MAX_PENDING_PER_USER)."""
        person = f"U000{n}"
        question = f"Conversation {n}, question 1: name a colour."
        mention = slack.app_mention(CHANNEL, question, user=person)
        await slack.send_event(mention)
        await answered_turns(slack, mention["ts"], 1)
        for turn in range(2, 5):
            question = f"Conversation {n}, question {turn}: and another?"
            follow_up = slack.user_message(CHANNEL, question, user=person, thread_ts=mention["ts"])
            await slack.send_event(follow_up)
            await answered_turns(slack, mention["ts"], turn)
        return mention["ts"]

    threads = await asyncio.gather(*(converse(n) for n in range(5)))
    for n, thread in enumerate(threads):
        history = await stored_once_answered(
            redis_server, f"slack:{slack.team_id}:{CHANNEL}:{thread}", 4
        )
        assert [m["role"] for m in history] == ["user", "assistant"] * 4
        assert all(f"Conversation {n}," in m["content"] for m in history[::2])
        assert len(bot_replies(slack, CHANNEL, thread)) == 4  # one message per answer
    answered_jobs = await answers_logged(workers, 20)
    assert len(answered_jobs) == len(set(answered_jobs)) == 20
    assert not any("(try 2)" in worker.text() for worker in workers)


async def test_a_worker_killed_mid_answer_is_replaced_and_the_thread_shows_one_answer(
    cluster, slack, redis_server
):
    await cluster.gateway()
    quick = dict(MAX_NEW_TOKENS="96", JOB_CLAIM_IDLE_S=QUICK_CLAIM_S)
    workers = await asyncio.gather(cluster.worker("w1", **quick), cluster.worker("w2", **quick))
    mention = slack.app_mention(CHANNEL, DRAGON)
    await slack.send_event(mention)
    await streaming(slack, mention)
    [dying] = [w for w in workers if "taken (try 1)" in w.text()]
    [other] = [w for w in workers if w is not dying]
    dying.kill()
    await dying.wait()
    [reply] = await answered(slack, CHANNEL, mention["ts"], timeout=180)
    assert reply["text"]
    await other.wait_log(r"job \w+ answered")
    assert "taken (try 2)" in other.text()
    history = await stored_once_answered(
        redis_server, f"slack:{slack.team_id}:{CHANNEL}:{mention['ts']}", 1
    )
    assert [m["role"] for m in history] == ["user", "assistant"]


async def test_a_gateway_killed_mid_stream_is_restarted_and_the_answer_completes_once(
    cluster, slack, redis_server
):
    first = await cluster.gateway()
    worker = await cluster.worker("w1", MAX_NEW_TOKENS="96")
    mention = slack.app_mention(CHANNEL, DRAGON)
    await slack.send_event(mention)
    await streaming(slack, mention)
    first.kill()
    await first.wait()
    await cluster.gateway()
    [reply] = await answered(slack, CHANNEL, mention["ts"], timeout=180)
    assert reply["ts"] == slack.calls_to("chat.postMessage")[0].response["ts"]  # edited, not new
    history = await stored_once_answered(
        redis_server, f"slack:{slack.team_id}:{CHANNEL}:{mention['ts']}", 1
    )
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert len(await answers_logged([worker], 1)) == 1  # the new gateway read the job running


async def test_a_job_that_always_fails_is_dead_lettered_and_the_user_gets_the_apology(
    cluster, slack, redis_server
):
    async with FakeOpenAI() as server:
        server.script += [Status(500, "the GPU fell over")] * 10
        await cluster.gateway()
        await cluster.worker(
            "w1", INFERENCE_URL=server.url, INFERENCE_RETRIES="0", JOB_MAX_DELIVERIES="3",
            JOB_CLAIM_IDLE_S=QUICK_CLAIM_S,
        )  # fmt: skip
        mention = slack.app_mention(CHANNEL, "hello")
        await slack.send_event(mention)
        [reply] = await answered(slack, CHANNEL, mention["ts"], timeout=60)
        assert len(server.requests) == 3
    assert reply["text"] == replies.failed()
    async with Redis.from_url(redis_server.url, decode_responses=True) as redis:
        [(_, dead)] = await redis.xrange(keys.DEAD_JOBS)
    assert dead["tries"] == "3"


async def test_a_gateway_is_ready_only_while_a_worker_is_alive_and_counts_them(cluster):
    """/readyz of a gateway names its workers: none alive is not ready (every turn would
    wait for its timeout), a SIGHUP leaves a worker be, and a worker stopping takes the
    gateway out of ready again.
    /metrics counts them (`threadbot_workers_alive`, a gateway's alone)."""
    port = free_port()
    up = Ops(f"http://127.0.0.1:{port}", None, None, Metrics())
    await cluster.gateway(HTTP_PORT=str(port))
    await until(up.readiness, workers_are(503, "no worker alive"))
    await until(up.samples, workers_counted(0))
    worker = await cluster.worker("w1")
    await until(up.readiness, workers_are(200, "ok"))
    await until(up.samples, workers_counted(1))
    worker.reload()  # `kill -HUP` of every container: a worker has nothing to reload
    await worker.wait_log(r"SIGHUP: a worker has no team configuration to reload")
    await until(up.readiness, workers_are(200, "ok"))
    assert await worker.stop() == 0
    await until(up.readiness, workers_are(503, "no worker alive"))
    await until(up.samples, workers_counted(0))


def workers_are(status: int, check: str) -> Callable[[tuple[int, dict]], bool]:
    """Whether a gateway's /readyz has this status and says this of its workers."""
    return lambda answer: answer[0] == status and answer[1]["checks"]["workers"] == check


def workers_counted(count: int) -> Callable[[dict], bool]:
    """Whether a gateway's /metrics counts this many workers alive."""
    return lambda samples: samples.get(("threadbot_workers_alive", frozenset())) == count


async def test_a_conversations_next_turn_reuses_its_kv_cache_on_the_same_worker(cluster, slack):
    await cluster.gateway()
    workers = await asyncio.gather(cluster.worker("w1"), cluster.worker("w2"))
    mention = slack.app_mention(CHANNEL, "Tell me about the sea.")
    await slack.send_event(mention)
    await answered_turns(slack, mention["ts"], 1)
    follow_up = slack.user_message(CHANNEL, "And the mountains?", thread_ts=mention["ts"])
    await slack.send_event(follow_up)
    await answered_turns(slack, mention["ts"], 2)
    await answers_logged(workers, 2)
    [holder] = [w for w in workers if answers_in(w)]
    [idle] = [w for w in workers if w is not holder]
    assert len(answers_in(holder)) == 2
    assert await cluster.metric(holder, "threadbot_kv_reused_tokens_total") > 0
    assert await cluster.metric(idle, "threadbot_kv_reused_tokens_total") == 0


async def test_a_start_at_a_redis_at_its_maxmemory_goes_on_and_says_storage_is_out(
    tmp_path, redis_server
):
    """The connection's write probe let it go on, with a warning; the process's lease,
    its next write, was refused (OOM) and the start ended in a traceback, exit 1: a
    supervisor's restarts were used up in seconds."""
    async with Redis.from_url(redis_server.url) as admin:
        await admin.config_set("maxmemory", 1)  # noeviction: every write is refused
    async with FakeOpenAI(answer="Paris, of course.") as server:
        env = cli_env(INFERENCE_URL=server.url, REDIS_URL=redis_server.url,
                      DATA_DIR=str(tmp_path / "data"))  # fmt: skip
        chat = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "chat", cwd=tmp_path, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(chat.communicate(b"What is the capital of France?\n"), 60)
    assert chat.returncode == 0, err.decode()
    assert replies.storage_unavailable() in out.decode()
    assert "Traceback" not in err.decode() and not server.requests


async def test_the_terminal_chat_answers_through_an_openai_compatible_server(tmp_path, redis_url):
    """`--role all` with INFERENCE_URL: no model loaded, tokens estimated, answers streamed."""
    async with FakeOpenAI(answer="Paris, of course.") as server:
        env = cli_env(
            INFERENCE_URL=server.url, INFERENCE_MODEL="other-model", REDIS_URL=redis_url,
            DATA_DIR=str(tmp_path / "data"),
        )  # fmt: skip
        chat = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "chat", "--conversation", "remote",
            cwd=tmp_path, env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(chat.communicate(b"What is the capital of France?\n"), 60)
    assert chat.returncode == 0, err.decode()
    assert "Paris, of course." in out.decode()
    [request] = server.requests
    assert request.body["model"] == "other-model"
    assert request.body["messages"][-1]["content"] == "What is the capital of France?"
    assert "Counting tokens by estimate" in err.decode()
    assert "Loading model" not in err.decode()
