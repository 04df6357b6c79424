"""Trim reuse: one long conversation that outgrows its token budget, answered turn by turn
the way the service answers it, counting the turns whose prompt comes mostly from the cache.

Each turn does what `ChatService` does, with a list for the stored history instead of
Redis: the user's message joins the history, `bot.prompt.fit` builds the prompt within
the budget, the messages it cuts leave the history for good (a trim, which the user is
told of), our queue answers with its batcher's `PrefixCache`, and the answer joins the
history. Trimming with hysteresis keeps the prompt's front stable between trims, so most
turns prefill only their new message. The answers come back as text, so they must be a
real model's (`benchmarks.serving.conversing`) for their KV cache to be reusable."""

from __future__ import annotations

import asyncio

from benchmarks.workload import Plan, answered, make_batcher, say, user_message
from bot.engine import Engine
from bot.prompt import fit

REUSING = 0.8
"""A turn counts as reusing once this share of its prompt came from the cache."""


def trim_reuse(engine: Engine, model: str, plan: Plan) -> dict:
    """The turns of one conversation answered by `engine` (`model` names it)."""
    answer_tokens = plan.trim_answer_tokens
    # The same model with a context that this conversation outgrows: its prompt budget is
    # `trim_budget`, as the service's would be (MAX_CONTEXT_TOKENS less the answer).
    conversation = Engine(
        model=engine.model,
        tokenizer=engine.tokenizer,
        max_new_tokens=answer_tokens,
        max_context_tokens=plan.trim_budget + answer_tokens,
    )
    batcher = make_batcher(conversation, plan)
    say(
        f"trim reuse: one conversation of {plan.trim_turns} turns, budget "
        f"{conversation.prompt_budget} tokens ..."
    )
    history: list[dict] = []
    turns = []
    for turn in range(plan.trim_turns):
        history.append(user_message(plan.trim_turn_tokens, 3000 + turn))
        fitted = asyncio.run(
            fit(
                [],  # SYSTEM_PROMPT unset: the chat template's own
                history,
                count_tokens=conversation.count_tokens,
                budget=conversation.prompt_budget,
            )
        )
        del history[: fitted.cut]
        reused_before = batcher.stats.reused
        _, (generation,) = asyncio.run(answered(batcher, [("alice", "trim", fitted.messages)]))
        turns.append({
            "prompt_tokens": generation.prompt_tokens,
            "reused": batcher.stats.reused - reused_before,
            "dropped": fitted.dropped,
        })  # fmt: skip
        if answer := generation.text.strip():  # the service stores no empty answer
            history.append({"role": "assistant", "content": answer})
        if (turn + 1) % 10 == 0:
            say(f"  trim reuse: {turn + 1}/{plan.trim_turns} turns")
    first_trim = next((i for i, turn in enumerate(turns) if turn["dropped"]), len(turns))
    return {
        "model": model,
        "turns": len(turns),
        "budget": conversation.prompt_budget,
        "turn_tokens": plan.trim_turn_tokens,
        "answer_tokens": answer_tokens,
        "reusing": _reusing(turns),
        "share": _reusing(turns) / len(turns),
        "trims": sum(turn["dropped"] > 0 for turn in turns),
        # From the first trim on: what trimming keeps, apart from the short first turns
        # (whose new message is most of their prompt).
        "since_first_trim": {
            "turns": len(turns) - first_trim,
            "reusing": _reusing(turns[first_trim:]),
        },
        "by_turn": turns,
    }


def _reusing(turns: list[dict]) -> int:
    return sum(turn["reused"] >= REUSING * turn["prompt_tokens"] for turn in turns)
