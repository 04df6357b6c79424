"""The model: found where MODEL says, its size on disk, and that it loads (in the dtype
and on the device the bot would use) and generates one token. With INFERENCE_URL there is
no model here: the server must list one and write a token of an answer, and
INFERENCE_TOKENIZER, where set, must load."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from bot.config import DEFAULT_MODEL, Settings
from bot.device import loaded
from bot.doctor.findings import Finding, error_text, fail, human_bytes, ok, skip, warn

if TYPE_CHECKING:
    from bot.engine import Engine
    from bot.loading import ModelSource

FOUND, GENERATES, TOKENIZER = "model", "generation", "tokenizer"
PROMPT = [{"role": "user", "content": "Hello"}]


async def check_model(settings: Settings) -> AsyncIterator[Finding]:
    from bot.loading import ModelError, bundled_source, resolve_source

    if settings.inference_url:
        yield await loaded(_check_tokenizer, settings)
        async for finding in _check_server(settings):
            yield finding
        return
    try:
        source = await loaded(resolve_source, settings)
    except ModelError as error:
        yield fail(FOUND, str(error))
        yield skip(GENERATES, "no model to load")
        return
    size = await asyncio.to_thread(size_on_disk, source)
    facts = f"MODEL={settings.model or '(unset)'}: {source}, {human_bytes(size)} on disk"
    if settings.model is None and source == bundled_source():
        yield warn(
            FOUND,
            f"{facts}: {DEFAULT_MODEL} is neither cached nor downloadable, so the bot would "
            "answer with the small bundled model; allow the Hugging Face hub, or set MODEL",
        )
    else:
        yield ok(FOUND, facts)
    yield await loaded(_generate_one_token, settings, source)


async def _check_server(settings: Settings) -> AsyncIterator[Finding]:
    """Ask the server what it serves, then for one token, once each (no retries)."""
    from bot.loading import ModelError
    from bot.openai_backend import InferenceUnavailable, OpenAIBackend

    once = settings.model_copy(update={"inference_retries": 0})
    async with contextlib.AsyncExitStack() as stack:
        try:
            backend = await stack.enter_async_context(OpenAIBackend.from_settings(once))
        except ModelError as error:  # out of reach, no model listed, its window too small
            yield fail(FOUND, str(error))
            yield skip(GENERATES, "no server to ask")
            return
        yield ok(FOUND, f"INFERENCE_URL={backend.where} serves {backend.model}")
        started = time.perf_counter()
        generation = backend.submit(PROMPT, user="doctor", conversation="doctor", max_new_tokens=1)
        try:
            async for _ in generation:
                pass
        except Exception as error:  # the server's own words, or why it did not answer
            said = str(error) if isinstance(error, InferenceUnavailable) else error_text(error)
            yield fail(GENERATES, f"{backend.model} at INFERENCE_URL: {said}")
            return
        took = time.perf_counter() - started
        yield ok(GENERATES, f"{backend.model} at INFERENCE_URL: 1 token in {took:.2f} s")


def _check_tokenizer(settings: Settings) -> Finding:
    """The history's tokens can be counted as the bot counts them: INFERENCE_TOKENIZER
    loads, or unset, the estimate; and MAX_NEW_TOKENS leaves prompts room either way."""
    from bot.loading import ModelError
    from bot.tokens import prompt_tokens_without_model

    try:
        tokens = prompt_tokens_without_model(settings)
    except ModelError as error:
        return fail(TOKENIZER, str(error))
    budget = f"prompts take {tokens.budget} tokens"
    if name := settings.inference_tokenizer:
        return ok(TOKENIZER, f"INFERENCE_TOKENIZER={name}: loaded; {budget}")
    return ok(TOKENIZER, f"INFERENCE_TOKENIZER unset: counted by estimate; {budget}")


def size_on_disk(source: ModelSource) -> int:
    """Bytes of the GGUF file, or of every file in the model's folder (hub snapshots are
    links into the cache's blobs: their targets are counted)."""
    path = Path(source.path)
    if source.gguf_file:
        return (path / source.gguf_file).stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _generate_one_token(settings: Settings, source: ModelSource) -> Finding:
    """Load the model as `threadbot run` does, then time one token of an answer."""
    from bot.loading import ModelError
    from bot.runtime import load_engine, placement

    started = time.perf_counter()
    try:
        engine = load_engine(settings, source=source)  # refuses what `run` refuses
    except ModelError as error:
        return fail(GENERATES, str(error))
    except (RuntimeError, AssertionError, ValueError) as error:  # torch on the wrong device
        return fail(
            GENERATES,
            f"the model does not load with DEVICE={settings.device} and DTYPE={settings.dtype} "
            f"({error}); set DEVICE and DTYPE to what this machine has (or auto)",
        )
    loaded = time.perf_counter() - started
    took = _timed_token(engine)
    return ok(
        GENERATES,
        f"{placement(engine)}: loaded in {loaded:.1f} s, 1 token in {took:.2f} s",
    )


def _timed_token(engine: Engine) -> float:
    engine.max_new_tokens = 1  # an answer of one token
    started = time.perf_counter()
    engine.generate([PROMPT])
    return time.perf_counter() - started
