"""Sampling rows draw from the tokens `generate` would keep, with its probabilities, whether
the sampler narrows to the top-k candidates first or works on the whole vocabulary."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from bot.sampling import Sampler

VOCABULARY = 5000
DRAWS = 4000
HISTORY = [7, 11, 7, 42]  # tokens the repetition penalty pushes down


def generate_s_probabilities(config: GenerationConfig, logits: torch.Tensor) -> torch.Tensor:
    """The next-token distribution `generate` samples from: its processors, in its order."""
    processors = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(config.repetition_penalty),
        TemperatureLogitsWarper(config.temperature),
    ])  # fmt: skip
    top_k = 50 if config.top_k is None else config.top_k  # generate's own where unset
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if config.top_p < 1.0:
        processors.append(TopPLogitsWarper(config.top_p))
    if config.min_p:
        processors.append(MinPLogitsWarper(config.min_p))
    return processors(torch.tensor([HISTORY]), logits[None].clone())[0].softmax(-1)


@pytest.mark.parametrize(
    "settings",
    [
        {"top_k": 20, "top_p": 0.8},  # Qwen2.5's own: narrowed to 20 candidates
        {"top_k": 40, "top_p": 1.0, "min_p": 0.05},
        {"top_k": 0, "top_p": 0.9},  # no top-k: the whole vocabulary
        {"top_p": 0.9},  # top_k unset (Llama 3.x's config): generate's default, 50
    ],
    ids=["top-k-top-p", "top-k-min-p", "whole-vocabulary", "top-k-unset"],
)
def test_sampled_tokens_follow_generate_s_distribution(settings):
    config = GenerationConfig(do_sample=True, temperature=0.7, repetition_penalty=1.3, **settings)
    torch.manual_seed(0)
    logits = torch.randn(VOCABULARY) * 3
    logits[HISTORY] += 6  # the history's tokens would lead without the penalty
    expected = generate_s_probabilities(config, logits)
    sampler = Sampler(config, device=torch.device("cpu"))
    drawn = sampler(logits.expand(DRAWS, -1).clone(), [HISTORY] * DRAWS, [1] * DRAWS,
                    [None] * DRAWS)  # fmt: skip
    found = torch.bincount(torch.tensor(drawn), minlength=VOCABULARY) / DRAWS
    assert set(found.nonzero()[:, 0].tolist()) <= set(expected.nonzero()[:, 0].tolist())
    assert (expected > 0).sum() > 3  # a real choice, not a near-greedy one
    # 4,000 draws: a share's standard error is at most 0.008, so 0.04 is five of them.
    assert (found - expected).abs().max() < 0.04


def test_options_it_does_not_apply_are_named_in_a_warning(caplog):
    """A fine-tune's `no_repeat_ngram_size` or `stop_strings` would change its answers
    under `generate`: the sampler says it leaves them out, where it was silent."""
    with caplog.at_level(logging.WARNING, logger="bot.sampling"):
        Sampler(GenerationConfig(top_k=20, top_p=0.8, temperature=0.7, do_sample=True),
                device=torch.device("cpu"))  # fmt: skip
        assert not caplog.records  # Qwen2.5's own: all applied
        Sampler(GenerationConfig(no_repeat_ngram_size=3, stop_strings=["END"]),
                device=torch.device("cpu"))  # fmt: skip
        Sampler(GenerationConfig(do_sample=True, top_h=0.4, remove_invalid_values=True),
                device=torch.device("cpu"))  # fmt: skip
    assert [record.getMessage().split(", which")[0] for record in caplog.records] == [
        "The model's generation config sets no_repeat_ngram_size, stop_strings",
        "The model's generation config sets top_h, remove_invalid_values",
    ]


def test_a_temperature_too_small_to_divide_by_picks_greedily():
    """A persona's temperature of 1e-40 would overflow the logits (inf, then NaN) and
    fail every answer in the batch: below 1e-5 it is greedy, as in vLLM."""
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0)
    torch.manual_seed(0)
    logits = torch.randn(4, VOCABULARY) * 3
    drawn = Sampler(config, device=torch.device("cpu"))(
        logits.clone(), [HISTORY] * 4, [1] * 4, [1e-40] * 4
    )
    assert drawn == logits.argmax(-1).tolist()


def test_an_answer_too_short_to_end_samples_among_the_other_tokens():
    """Under min_new_tokens the end token is out before top-p chooses, as in `generate`:
    where the end token alone would make the top-p cut, the row still draws another,
    where every candidate was left at -inf and the draw failed the batch."""
    end = 3
    config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=0.5, min_new_tokens=2, eos_token_id=end
    )
    torch.manual_seed(0)
    logits = torch.randn(4, VOCABULARY)
    logits[:, end] = 50  # the end token holds nearly all the probability
    drawn = Sampler(config, device=torch.device("cpu"))(
        logits.clone(), [HISTORY] * 4, [0] * 4, [None] * 4
    )
    assert end not in drawn
