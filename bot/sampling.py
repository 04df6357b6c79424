"""Choosing each next token the way `generate` would, for rows that are at different lengths.

The batched decoder runs its own loop over the model's forward, so it applies the model's
generation config itself: the same transformers logits processors `generate` builds, in the
same order, with each row's own history for the repetition penalty.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def end_token_ids(config: GenerationConfig) -> set[int]:
    """The tokens that end an answer."""
    eos = config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


class Sampler:
    """Picks the next token of each row from its logits: greedy, or sampled as configured."""

    def __init__(self, config: GenerationConfig, *, device: torch.device) -> None:
        self.do_sample = bool(config.do_sample)
        self.min_new_tokens = config.min_new_tokens or 0
        self.end_ids = torch.tensor(sorted(end_token_ids(config)), device=device)
        # Indexed directly: transformers' SuppressTokensLogitsProcessor runs `isin` over the
        # whole vocabulary every step (0.45 s a step for a few thousand tokens here).
        self.suppressed = torch.tensor(
            config.suppress_tokens or [], dtype=torch.long, device=device
        )
        processors = LogitsProcessorList()
        if config.repetition_penalty not in (None, 1.0):
            processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
        if self.do_sample:
            if config.temperature not in (None, 1.0):
                processors.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k:
                processors.append(TopKLogitsWarper(config.top_k))
            if config.top_p not in (None, 1.0):
                processors.append(TopPLogitsWarper(config.top_p))
            if config.min_p:
                processors.append(MinPLogitsWarper(config.min_p))
        self.processors = processors

    def __call__(
        self, logits: torch.Tensor, histories: Sequence[list[int]], answered: Sequence[int]
    ) -> list[int]:
        """One token per row; `histories` are the rows' ids so far, `answered` their answer
        lengths (an answer shorter than `min_new_tokens` may not end yet)."""
        logits = logits.float()
        logits[:, self.suppressed] = -float("inf")
        if self.processors:
            logits = self.processors(_left_filled(histories, logits.device), logits)
        short = [row for row, count in enumerate(answered) if count < self.min_new_tokens]
        if short and len(self.end_ids):
            logits[torch.tensor(short)[:, None], self.end_ids] = -float("inf")
        if self.do_sample:
            return torch.multinomial(logits.softmax(-1), 1)[:, 0].tolist()
        return logits.argmax(-1).tolist()


def _left_filled(histories: Sequence[list[int]], device: torch.device) -> torch.Tensor:
    """The rows' ids as one tensor, each shorter row filled on the left with its own first id:
    a filler that penalizes nothing the row has not already seen."""
    width = max(len(ids) for ids in histories)
    return torch.tensor([[ids[0]] * (width - len(ids)) + ids for ids in histories], device=device)
