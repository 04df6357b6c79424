"""On a CUDA GPU the batcher runs in bfloat16 and still gives `generate`'s greedy tokens,
alone and with requests joining mid-answer. Skipped where torch sees no GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_qwen2
from test_batching import QUESTIONS, run

from bot.batching import Batcher
from bot.engine import Engine
from bot.kv_cache import PrefixCache

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_the_batcher_in_bfloat16_on_a_gpu_gives_the_greedy_tokens_of_generate(qwen_tokenizer):
    model = tiny_qwen2(qwen_tokenizer).to("cuda", torch.bfloat16)
    engine = Engine(model=model, tokenizer=qwen_tokenizer, max_new_tokens=24)
    batcher = Batcher(engine=engine, max_batch=4, step_tokens=16, prefix_cache=PrefixCache(2**24))
    answers = run(batcher, {0: ("a", QUESTIONS[0]), 3: ("b", QUESTIONS[1]), 7: ("c", QUESTIONS[2])})
    assert [answers[key] for key in "abc"] == [engine.generate([m])[0] for m in QUESTIONS]
