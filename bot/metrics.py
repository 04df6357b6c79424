"""Every threadbot metric, in one registry object that is passed to whoever counts.

Counted where the outcome is decided: the service counts turns and their latency, the
queue its waiting requests and batch rows, the batcher tokens, the Redis client its
failed calls; the connected platforms and the pending turns are read when scraped
(`bot.health`). The registry is the object's own, never prometheus-client's global one,
so each process (and each test) counts alone. No label carries a user, channel or
message id: the labels are the platform's name, the outcome and the build.
"""

from __future__ import annotations

from typing import Literal, get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

Outcome = Literal["answered", "failed", "busy", "denied", "rate_limited", "too_long", "empty"]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)

# Seconds; a CPU answers in tens of seconds, a GPU in one or two.
FIRST_TOKEN_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
ANSWER_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
# The Redis hop between gateways and workers: milliseconds, unless a job waits for a row.
HOP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The Prometheus metrics of one process (see the README's "Health and metrics")."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.turns = Counter(
            "threadbot_turns",
            "Messages given a final outcome (commands not counted)",
            ["platform", "outcome"],
            registry=registry,
        )
        self.queue_waiting = Gauge(
            "threadbot_queue_waiting",
            "Requests waiting for a place in the running batch (on a gateway: jobs it sent "
            "that no worker has taken yet)",
            registry=registry,
        )
        self.batch_rows = Gauge(
            "threadbot_batch_rows",
            "Answers being generated in the running batch",
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "threadbot_time_to_first_token_seconds",
            "From a message's acceptance to the first token of its answer",
            buckets=FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.answer_seconds = Histogram(
            "threadbot_answer_seconds",
            "From a message's acceptance to its whole answer shown and stored",
            buckets=ANSWER_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "threadbot_prompt_tokens",
            "Prompt tokens given to the model (those reused from the KV cache included)",
            registry=registry,
        )
        self.generated_tokens = Counter(
            "threadbot_generated_tokens", "Answer tokens the model generated", registry=registry
        )
        self.kv_reused_tokens = Counter(
            "threadbot_kv_reused_tokens",
            "Prompt tokens taken from a conversation's cached keys and values, not computed",
            registry=registry,
        )
        self.redis_errors = Counter(
            "threadbot_redis_errors",
            "Redis calls that failed to connect or timed out (each retry counts)",
            registry=registry,
        )
        self.platform_connected = Gauge(
            "threadbot_platform_connected",
            "1 while the platform is connected (Socket Mode, gateway, or HTTP events served)",
            ["platform"],
            registry=registry,
        )
        self.loading = Gauge(
            "threadbot_loading",
            "1 while the process starts: the model downloads and loads (or the answering "
            "server is being reached); 0 once it serves",
            registry=registry,
        )
        self.pending_turns = Gauge(
            "threadbot_pending_turns",
            "Messages of this process's platforms accepted and not yet answered, by every "
            "process sharing the Redis",
            registry=registry,
        )
        self.workers_alive = Gauge(  # registered by a gateway alone (`expect_workers`)
            "threadbot_workers_alive",
            "Inference workers whose heartbeat has not lapsed, as a gateway sees them",
            registry=None,
        )
        self.job_wait = Histogram(  # registered by a worker alone (`expect_jobs`)
            "threadbot_job_wait_seconds",
            "From a gateway sending a job to this worker taking it (first tries): the hop to "
            "the worker, and any wait for a free row",
            buckets=HOP_BUCKETS,
            registry=None,
        )
        self.chunk_delay = Histogram(  # registered by a gateway alone (`expect_workers`)
            "threadbot_chunk_delay_seconds",
            "From a worker writing a piece of an answer to this gateway reading it: the hop back",
            buckets=HOP_BUCKETS,
            registry=None,
        )
        self.build = Info(
            "threadbot_build", "The version, model, device and dtype running", registry=registry
        )

    def expect_platform(self, platform: str) -> None:
        """Show a configured platform's series from the start (at 0), so that rates and
        alerts see them before its first turn."""
        for outcome in OUTCOMES:
            self.turns.labels(platform, outcome)
        self.platform_connected.labels(platform).set(0)

    def expect_workers(self) -> None:
        """Serve the live workers' gauge and the hop back from them: a gateway's only, as
        only a gateway has workers (elsewhere a 0 would read as an outage)."""
        self.registry.register(self.workers_alive)
        self.registry.register(self.chunk_delay)

    def expect_jobs(self) -> None:
        """Serve the jobs' wait: a worker's only, as only a worker takes jobs; and not the
        pending turns, which a worker does not journal (a 0 there would read as none)."""
        self.registry.register(self.job_wait)
        self.registry.unregister(self.pending_turns)

    def count_turn(self, platform: str, outcome: Outcome) -> None:
        self.turns.labels(platform, outcome).inc()

    def describe_build(self, *, version: str, model: str, device: str, dtype: str) -> None:
        self.build.info({"version": version, "model": model, "device": device, "dtype": dtype})

    def render(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
