"""The engine: the seed's steps on a batch, streaming, cancellation, and the real offline model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SEED = json.loads((Path(__file__).parent / "data" / "seed-ids.json").read_text())
QUESTIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about tokenizers, at some length please."},
    ],
]


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


def test_batch_answers_equal_single_answers(make_engine):
    """Left padding: each conversation gets the same greedy answer batched as alone."""
    engine = make_engine(max_new_tokens=12)
    alone = [engine.generate([messages])[0] for messages in QUESTIONS]
    assert engine.generate(QUESTIONS) == alone
    assert all(alone)


def test_streamed_text_adds_up_to_the_final_answer(make_engine):
    engine = make_engine(max_new_tokens=12)
    streamed = ["", ""]

    def on_text(row: int, chunk: str) -> None:
        streamed[row] += chunk

    answers = engine.generate(QUESTIONS, on_text=on_text)
    assert streamed == answers


def test_a_stopped_row_ends_early_and_the_other_goes_on(make_engine):
    engine = make_engine(max_new_tokens=40)
    full = engine.generate(QUESTIONS)
    steps = {"count": 0}

    def stopped() -> list[bool]:
        steps["count"] += 1
        return [steps["count"] > 3, False]  # cancel row 0 after three steps

    first, second = engine.generate(QUESTIONS, stopped=stopped)
    assert len(first) < len(full[0]) and full[0].startswith(first)
    assert second == full[1]


def test_count_tokens_matches_the_encoded_prompt(make_engine):
    engine = make_engine()
    assert engine.count_tokens(SEED["messages"]) == len(SEED["input_ids"])


def test_prompt_budget_leaves_room_for_the_answer(make_engine):
    engine = make_engine(max_new_tokens=100, max_context_tokens=1000)
    assert engine.context_tokens == 1000
    assert engine.prompt_budget == 900
    assert make_engine(max_context_tokens=10**6).context_tokens == 4096  # the model's own window


@pytest.mark.slow
def test_bundled_model_knows_the_capital_of_france(bundled_engine):
    """The offline model answers a real question (no hub needed)."""
    [answer] = bundled_engine.generate(
        [[{"role": "user", "content": "What is the capital of France?"}]]
    )
    assert "paris" in answer.lower()
    assert "assistant" not in answer.lower()
