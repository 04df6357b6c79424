"""Wiring: settings in, a ready ChatService out, with everything it owns shut down after.

Order matters: Redis first (fails in a second if misconfigured), then the model (can
take a minute), then the queue that drives it. A process answers with the model loaded
here (`--role all`, the default), through workers (`--role gateway`, only a tokenizer
loaded), or takes jobs for gateways (`--role worker`); and with INFERENCE_URL set, an
OpenAI-compatible server writes the answers instead of a model loaded here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot.config import BUNDLED, DEFAULT_MODEL, Settings
from bot.device import loaded
from bot.logs import adopt_transformers
from bot.metrics import Metrics
from bot.service import ChatService
from bot.team import Team
from bot.tokens import PromptTokens, opens_reasoning, prompt_tokens_without_model
from storage.connection import Resilience, open_redis
from storage.errors import is_outage
from storage.limits import Limits
from storage.locks import ConversationLocks
from storage.reloads import TeamReloads
from storage.stats import TurnStats
from storage.store import ConversationStore
from storage.turns import TurnJournal

if TYPE_CHECKING:
    from bot.engine import Engine
    from bot.loading import ModelSource
    from bot.queue import Inference
    from bot.worker import Worker

Role = Literal["all", "gateway", "worker"]
NOT_HERE = "-"  # the build info's dtype where the weights are loaded by another process

logger = logging.getLogger(__name__)


def load_engine(settings: Settings, *, source: ModelSource | None = None) -> Engine:
    """The model named by the settings (or `source`, already resolved from them), loaded;
    torch is imported here, not at start-up."""
    from bot import loading
    from bot.batching import refuse_unbatchable
    from bot.device import use_all_cores
    from bot.engine import Engine

    adopt_transformers()  # before it logs anything of the load
    source = source or loading.resolve_source(settings)
    threads = use_all_cores()
    logger.info("Loading model %s on device %s (%d CPU threads)", source, settings.device, threads)
    model, tokenizer = loading.load(
        source,
        device=settings.device,
        dtype=settings.dtype,
        cache_dir=settings.data_dir / "models",
        quantize=settings.quantize,
        kernels=settings.kernel_folder,
    )
    engine = Engine(
        model=model,
        tokenizer=tokenizer,
        max_new_tokens=settings.max_new_tokens,
        max_context_tokens=settings.max_context_tokens,
    )
    loading.refuse_unservable(source, model.config, engine.context_tokens)
    loading.refuse_crowded_context(engine.context_tokens, settings.max_new_tokens)
    refuse_unbatchable(engine, str(source))
    logger.info(
        "Model ready: %s, %s, context %d tokens",
        model.config.model_type,
        placement(engine),
        engine.context_tokens,
    )
    return engine


@dataclass(frozen=True)
class Answering:
    """What writes a process's answers, and how its prompts are counted."""

    queue: Inference
    tokens: PromptTokens
    model_name: str  # as `status` shows it


async def _started_on(journal: TurnJournal, reloads: TeamReloads) -> int | None:
    """Take this process's lease, and read the count of reload commands (one run while
    the model loads is followed; None: read at the first resume pass). A Redis that refuses
    writes for now (at its maxmemory) is ridden out as it is once running: the resume
    passes take the lease once it takes them."""
    try:
        await journal.renew_lease()
        return await reloads.count()
    except Exception as error:
        if not is_outage(error):
            raise
        logger.warning("Redis cannot take this process's lease yet (%s); going on", error)
        return None


@asynccontextmanager
async def open_service(
    team: Team, *, metrics: Metrics | None = None, role: Role = "all"
) -> AsyncIterator[ChatService]:
    """A ChatService on Redis, answering with the model (or, as a gateway, through the
    workers), resuming pending turns for as long as it is open, counting in `metrics`; on
    exit, stops that, gives up this process's lease, stops the queue and Redis."""
    settings = team.settings
    metrics = metrics if metrics is not None else Metrics()
    async with connect_redis(settings, metrics) as redis:
        store = ConversationStore(
            redis=redis,
            max_messages=settings.history_max_messages,
            ttl_seconds=settings.history_ttl_seconds,
        )
        owner = process_id()
        journal = TurnJournal(
            redis=redis, store=store, owner=owner, lease_seconds=settings.turn_lease_s,
            shared=bool(settings.redis_url),
        )  # fmt: skip
        reloads = TeamReloads(redis=redis)
        reloads_seen = await _started_on(journal, reloads)
        team.catch_up()  # read before Redis answered: a reload run meanwhile counts as seen
        answering = (
            open_gateway(settings, redis, metrics, name=owner)
            if role == "gateway"
            else open_answering(settings, metrics)
        )
        async with answering as answers:
            service = ChatService(
                store=store,
                journal=journal,
                # A dead process's hold on a conversation lapses soon after its turns are
                # taken over; twice their lease, so a process slow to renew (a stall, a
                # hung connection) still has the conversation while it finishes.
                locks=ConversationLocks(redis=redis, lease_s=2 * settings.turn_lease_s),
                queue=answers.queue,
                count_tokens=answers.tokens.count,
                prompt_budget=answers.tokens.budget,
                prompt_opens_reasoning=answers.tokens.opens_reasoning,
                team=team,
                limits=Limits(redis=redis),
                stats=TurnStats(redis=redis),
                reloads=reloads,
                reloads_seen=reloads_seen,
                model_name=answers.model_name,
                max_attempts=settings.turn_max_attempts,
                metrics=metrics,
            )
            resuming = asyncio.create_task(service.keep_resuming(), name="resume pending turns")
            try:
                yield service
            finally:
                await service.drain(0)  # whatever still runs is left pending, never failed
                service.stop()
                await resuming
                try:
                    await journal.drop_lease()
                except RedisError:  # then the lease lapses by itself
                    logger.warning("could not give up the lease; it expires in %gs",
                                   settings.turn_lease_s)  # fmt: skip


@asynccontextmanager
async def open_worker(
    settings: Settings, *, metrics: Metrics | None = None
) -> AsyncIterator[Worker]:
    """A worker (`--role worker`) on Redis, answering jobs with the model or INFERENCE_URL;
    run it with `run()`, and `finish` it before leaving the block."""
    from bot.worker import Worker

    metrics = metrics if metrics is not None else Metrics()
    async with (
        connect_redis(settings, metrics) as redis,
        open_answering(settings, metrics) as answers,
    ):
        yield Worker(
            redis=redis,
            inference=answers.queue,
            name=process_id(),
            rows=settings.max_batch,
            claim_idle_s=settings.job_claim_idle_s,
            max_deliveries=settings.job_max_deliveries,
            metrics=metrics,
        )


@asynccontextmanager
async def open_answering(settings: Settings, metrics: Metrics) -> AsyncIterator[Answering]:
    """INFERENCE_URL's server where it is set, else the model, loaded here, behind the
    inference queue."""
    if settings.inference_url:
        from bot.openai_backend import OpenAIBackend

        tokens = await loaded(prompt_tokens_without_model, settings)
        async with OpenAIBackend.from_settings(settings, metrics=metrics) as backend:
            metrics.describe_build(
                version=version(), model=backend.model, device="remote", dtype=NOT_HERE
            )
            yield Answering(backend, tokens, f"{backend.model} at {backend.where}")
        return
    from bot import loading
    from bot.batching import Batcher
    from bot.kv_cache import PrefixCache
    from bot.queue import InferenceQueue

    source = await loaded(loading.resolve_source, settings)
    # On a thread that then ends: the engine thread's OpenMP team must be the only one.
    engine = await loaded(load_engine, settings, source=source)
    name = model_name(settings, source)
    metrics.describe_build(
        version=version(), model=name, device=str(engine.model.device), dtype=dtype_name(engine)
    )
    idle_cache_bytes = settings.kv_cache_mb * 2**20
    batcher = Batcher(
        engine=engine,
        max_batch=settings.max_batch,
        step_tokens=settings.max_step_tokens,
        prefill_first_steps=settings.prefill_first_steps,
        prefix_cache=PrefixCache(idle_cache_bytes),
        max_batch_tokens=settings.max_batch_tokens
        or batch_tokens_for_memory(engine, idle_cache_bytes),
        metrics=metrics,
    )
    queue = InferenceQueue(
        batcher=batcher,
        max_size=settings.queue_max,
        timeout=settings.request_timeout,
        metrics=metrics,
    )
    async with queue:
        tokens = PromptTokens(
            engine.count_tokens, engine.prompt_budget, opens_reasoning(engine.tokenizer)
        )
        yield Answering(queue, tokens, f"{name} ({placement(engine)})")


@asynccontextmanager
async def open_gateway(
    settings: Settings, redis: Redis, metrics: Metrics, *, name: str
) -> AsyncIterator[Answering]:
    """Answers written by workers (`--role gateway`): only the tokenizer is loaded here."""
    from bot.job_queue import JobQueue

    tokens = await loaded(prompt_tokens_without_model, settings)
    queue = JobQueue(
        redis=redis,
        gateway=name,
        max_size=settings.queue_max,
        timeout=settings.request_timeout,
        metrics=metrics,
    )
    async with queue:
        model = settings.inference_model or settings.model or DEFAULT_MODEL
        metrics.describe_build(version=version(), model=model, device="workers", dtype=NOT_HERE)
        yield Answering(queue, tokens, f"{model} on the workers")


def connect_redis(settings: Settings, metrics: Metrics) -> AbstractAsyncContextManager[Redis]:
    """Redis as the settings name it, riding out outages as they say (`open_redis`)."""
    resilience = Resilience(
        retries=settings.redis_retries,
        health_check_s=settings.redis_health_check_s,
        on_failure=lambda _error: metrics.redis_errors.inc(),
    )
    return open_redis(
        redis_url=settings.redis_url, data_dir=settings.data_dir, resilience=resilience
    )


def batch_tokens_for_memory(engine: Engine, idle_cache_bytes: int) -> int:
    """The default MAX_BATCH_TOKENS, from the memory free now that the weights are loaded."""
    from bot.batching import default_max_batch_tokens
    from bot.device import free_memory

    tokens = default_max_batch_tokens(
        engine.model,
        free_bytes=free_memory(engine.model.device),
        idle_cache_bytes=idle_cache_bytes,
    )
    logger.info("MAX_BATCH_TOKENS unset: %d, from the free memory", tokens)
    return tokens


def model_name(settings: Settings, source: ModelSource) -> str:
    """The model as `status` and the metrics name it: MODEL, else the default, or
    `bundled` where the default could not be had and the offline model stands in."""
    from bot import loading

    if settings.model:
        return settings.model
    return BUNDLED if source == loading.bundled_source() else DEFAULT_MODEL


def placement(engine: Engine) -> str:
    """Where and how the model runs: `bfloat16 on cpu`, `bfloat16 with int8 weights on cpu`,
    `bfloat16 on cpu, decode steps by threadbot's kernel` (its products), `float32 on cpu,
    decode steps by threadbot's kernel from bfloat16 copies` (`DecodeKernel.halved`),
    `bfloat16 on cpu, attention and layers' small ops by threadbot's kernel` (all but the
    products, as with AMX)."""
    import torch

    from bot.packing import decode_kernel_of, halved_bytes_saved, kernel_products
    from bot.quantize import is_quantized
    from bot.step_forward import small_ops_by

    model = engine.model
    weights = " with int8 weights" if is_quantized(model) else ""
    kernel, by_kernel = decode_kernel_of(model), ""
    if kernel_products(model):
        copies = " from bfloat16 copies" if halved_bytes_saved(model) else ""
        by_kernel = f", decode steps by threadbot's kernel{copies}"
    elif kernel is not None and kernel.dtype == torch.bfloat16:  # its build that attends
        ops = "attention and layers' small ops" if small_ops_by(model, kernel) else "attention"
        by_kernel = f", {ops} by threadbot's kernel"
    return f"{dtype_name(engine)}{weights} on {model.device}{by_kernel}"


def dtype_name(engine: Engine) -> str:
    return str(engine.model.dtype).removeprefix("torch.")


def version() -> str:
    """threadbot's installed version ("unknown" when run from a folder not installed)."""
    try:
        return metadata.version("threadbot")
    except metadata.PackageNotFoundError:
        return "unknown"


def process_id() -> str:
    """This process's name as an owner of turns: readable in Redis, unique across restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
