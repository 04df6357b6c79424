"""On a CUDA GPU, the batcher's exactness tests again: the same tests as `test_batching`'s,
collected here once more with this module's `tiny_model`, which lives on the GPU. In
bfloat16, as `DEVICE=cuda` serves; in float32 too, so that a failure tells a bug from
rounding. Skipped where torch sees no GPU; run them with `pytest -m cuda` on one."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_qwen2

# Collected here again (pytest collects the test functions a module holds): their fixtures
# resolve in this module, so `make_batcher` and `make_engine` build on the GPU model below.
from test_batching import (  # noqa: F401
    QUESTIONS,
    test_a_greedy_row_beside_sampling_rows_gets_the_greedy_answer_of_generate,
    test_a_next_turn_joins_from_its_cache_after_the_cache_shrank_in_a_step,
    test_a_request_alone_gets_the_seed_generate_answer,
    test_a_request_stopped_after_the_cache_shrank_in_a_step_leaves_the_rest_answering,
    test_a_row_stops_at_its_own_max_new_tokens_while_another_goes_on,
    test_a_short_prompt_arriving_during_a_long_prefill_waits_one_chunk,
    test_a_temperature_on_a_greedy_model_samples_that_row_only,
    test_answers_stop_at_the_context_window,
    test_repetition_penalty_and_sampling_settings_match_generate,
    test_requests_joining_mid_answer_get_the_same_tokens_as_alone,
    test_running_answers_keep_flowing_while_a_long_prompt_prefills,
)

from bot.batching import BATCH_MEMORY_SHARE, kv_bytes_per_token
from bot.config import Settings
from bot.metrics import Metrics
from bot.runtime import open_answering

ON_A_GPU = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

pytestmark = ON_A_GPU


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def tiny_model(qwen_tokenizer, request):
    return tiny_qwen2(qwen_tokenizer).to("cuda", getattr(torch, request.param))


NEAR_TIES_IN_BFLOAT16 = {
    "test_a_greedy_row_beside_sampling_rows_gets_the_greedy_answer_of_generate": (
        "generate's 12th token leads the next by 2 bfloat16 steps (5.219 against 5.156, "
        "after the repetition penalty); in a batch of three, other kernels round it the "
        "other way on an H200. Exact in float32."
    ),
}
"""Answers that bfloat16's rounding may change in a batch: greedy picks a token whose lead
is a step or two of bfloat16, and a batch's matrix products sum in another order than a
lone row's (vLLM's batch invariance is the same question). These may fail, not others."""


@pytest.fixture(autouse=True)
def near_ties(request, tiny_model):
    reason = NEAR_TIES_IN_BFLOAT16.get(request.node.originalname)
    if reason and tiny_model.dtype == torch.bfloat16:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=False))


def test_the_tiny_model_these_tests_get_is_on_the_gpu(make_batcher):
    assert make_batcher().model.device.type == "cuda"


async def test_device_cuda_serves_the_model_from_the_gpu_in_bfloat16(tmp_path, qwen_tokenizer):
    """DEVICE=cuda as a process that answers puts itself together: the model folder loaded
    onto the GPU in bfloat16 (DTYPE=auto), the batch's budget taken from the GPU's free
    memory, and an answer through the inference queue that is `generate`'s own."""
    folder = tmp_path / "model"
    tiny_qwen2(qwen_tokenizer).save_pretrained(folder)
    qwen_tokenizer.save_pretrained(folder)
    settings = Settings(
        _env_file=None, model=str(folder), device="cuda", data_dir=tmp_path, max_new_tokens=16
    )
    async with open_answering(settings, Metrics()) as answering:
        batcher = answering.queue.batcher
        model = batcher.model
        assert (model.device.type, model.dtype) == ("cuda", torch.bfloat16)
        free, _total = torch.cuda.mem_get_info(model.device)
        budget = batcher.max_batch_tokens * kv_bytes_per_token(model)
        assert free * BATCH_MEMORY_SHARE / 2 < budget <= free * BATCH_MEMORY_SHARE
        chunks = answering.queue.submit(QUESTIONS[1], user="u", conversation="c")
        answer = "".join([chunk async for chunk in chunks])
    assert answer and answer == batcher.engine.generate([QUESTIONS[1]])[0]
