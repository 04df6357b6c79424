"""The engine: the seed's steps, token budgets, and the real offline model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SEED = json.loads((Path(__file__).parent / "data" / "seed-ids.json").read_text())


def test_seed_messages_tokenize_to_the_seed_table(make_engine):
    """Template + tokenize turns the seed's messages into exactly its 39 input ids."""
    inputs = make_engine().encode([SEED["messages"]])
    assert inputs.input_ids[0].tolist() == SEED["input_ids"]
    assert len(SEED["input_ids"]) == 39


def test_strip_and_decode_gives_the_answer_alone(make_engine):
    """Keeping only the tokens after the prompt and decoding them yields just the answer."""
    import torch

    engine = make_engine()
    prompt = torch.tensor([SEED["input_ids"]])
    output = torch.tensor([SEED["full_output_ids"]])
    [answer] = engine.decode_new(prompt, output)
    assert answer.startswith("Large language models (LLMs) are artificial intelligence systems")
    assert answer.endswith("is required.")
    for prompt_text in ("system\n", "user\n", "assistant\n", "You are Qwen", "Give me a short"):
        assert prompt_text not in answer


def test_count_tokens_matches_the_encoded_prompt(make_engine):
    engine = make_engine()
    assert engine.count_tokens(SEED["messages"]) == len(SEED["input_ids"])


def test_prompt_budget_leaves_room_for_the_answer(make_engine):
    engine = make_engine(max_new_tokens=100, max_context_tokens=1000)
    assert engine.context_tokens == 1000
    assert engine.prompt_budget == 900
    assert make_engine(max_context_tokens=10**6).context_tokens == 4096  # the model's own window


@pytest.mark.parametrize(("window", "default"), [(32768, 8192), (4096, 4096)])
def test_the_default_context_is_8192_tokens_or_the_smaller_window(window: int, default: int):
    """Unset MAX_CONTEXT_TOKENS bounds a long thread's KV cache, not the model's 32k."""
    from transformers import Qwen2Config

    from bot.tokens import context_tokens

    assert context_tokens(Qwen2Config(max_position_embeddings=window), None) == default


@pytest.mark.slow
def test_bundled_model_knows_the_capital_of_france(bundled_engine):
    """The offline model answers a real question (no hub needed)."""
    [answer] = bundled_engine.generate(
        [[{"role": "user", "content": "What is the capital of France?"}]]
    )
    assert "paris" in answer.lower()
    assert "assistant" not in answer.lower()
