"""What an answered turn reports: its latency observed, its count, and one INFO log line.

The line names the platform and a short hash of the conversation (never the message
text), the tokens in and out, the queue wait, the time to the first token and the whole
time; in JSON logs the same values are fields of their own. Times run from the
message's acceptance, so they are what the user waited, a restart in between included.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

from bot.metrics import Metrics
from storage.turns import PendingTurn

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Generated:
    """How this process generated an answer."""

    prompt_tokens: int
    answer_tokens: int
    queue_wait: float  # seconds waiting for a place in the batch
    first_token_at: float  # time.time() of the answer's first text


def conversation_tag(conversation: str) -> str:
    """A short, stable stand-in for a conversation key, to follow it through the logs
    without naming its workspace, channel or thread."""
    return hashlib.sha256(conversation.encode()).hexdigest()[:10]


def report_answered(metrics: Metrics, pending: PendingTurn, generated: Generated | None) -> None:
    """Count an answered turn and log its line; `generated` is None for an answer saved
    before a restart and delivered now."""
    platform = pending.turn.conversation.platform
    total = time.time() - pending.accepted_at
    metrics.count_turn(platform, "answered")
    metrics.answer_seconds.observe(total)
    fields: dict[str, object] = {
        "platform": platform,
        "conversation": conversation_tag(pending.conversation),
        "total_s": round(total, 3),
    }
    if generated is None:
        logger.info(
            "answered turn %s (attempt %d): %s conversation %s, an answer saved before a "
            "restart, total %.2fs",
            pending.id, pending.attempts, platform, fields["conversation"], total,
            extra=fields,
        )  # fmt: skip
        return
    first_token = generated.first_token_at - pending.accepted_at
    metrics.time_to_first_token.observe(first_token)
    fields |= {
        "prompt_tokens": generated.prompt_tokens,
        "answer_tokens": generated.answer_tokens,
        "queue_wait_s": round(generated.queue_wait, 3),
        "first_token_s": round(first_token, 3),
    }
    logger.info(
        "answered turn %s (attempt %d): %s conversation %s, %d tokens in, %d out, "
        "queue wait %.2fs, first token %.2fs, total %.2fs",
        pending.id, pending.attempts, platform, fields["conversation"],
        generated.prompt_tokens, generated.answer_tokens, generated.queue_wait, first_token,
        total, extra=fields,
    )  # fmt: skip
