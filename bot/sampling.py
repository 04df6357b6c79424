"""Choosing each next token the way `generate` would, for rows that are at different lengths.

The batched decoder runs its own loop over the model's forward, so it applies the model's
generation config itself: the same transformers logits processors `generate` builds, in the
same order, with each row's own history for the repetition penalty.

A row may set its own temperature: it then picks as `generate` would with the model's
config and that temperature (0: greedy). Rows that pick alike are processed together, and
every sampling row draws in one `multinomial` call, so a greedy row's tokens never depend
on its neighbours.

With `top_k` set (Qwen2.5's config says 20), a sampling row can only draw one of its k
likeliest tokens, so top-p, min-p and the draw itself run on those k candidates rather
than the whole vocabulary. That is the same distribution as `generate`'s, but it is far
cheaper: over Qwen's 151,936 tokens, top-p's sort and `multinomial`'s one random number a
token cost 117 ms a step for 16 rows on 2 cores of an AMD EPYC, nearly the model's own
134 ms; on the candidates the whole sampler takes 11 ms (18 ms with 4,000-token
histories, 1.9 ms for a lone row). The draws are not the ones `generate` would make from
the same seed, and where several tokens tie for k-th place, `generate` keeps them all and
this keeps k of them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

logger = logging.getLogger(__name__)

NOT_APPLIED = (
    "no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "min_length", "typical_p",
    "forced_bos_token_id", "forced_eos_token_id", "begin_suppress_tokens", "epsilon_cutoff",
    "eta_cutoff", "exponential_decay_length_penalty", "stop_strings", "renormalize_logits",
    "num_beams", "penalty_alpha", "guidance_scale", "top_h", "remove_invalid_values",
    "watermarking_config",
)  # fmt: skip
"""Generation-config options that `generate` applies and this sampler does not."""

SAMPLED_FROM = 1e-5
"""The least temperature sampled with (as in vLLM): below it, picks are greedy, as at 0;
dividing logits by less overflows float32 (inf, then NaN for the whole batch)."""


def end_token_ids(config: GenerationConfig) -> set[int]:
    """The tokens that end an answer."""
    eos = config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def as_generate_reads(config: GenerationConfig) -> GenerationConfig:
    """A model's generation config with what it leaves unset filled in as `generate` fills
    it, from transformers' defaults: a model that samples without naming `top_k` (Llama
    3.x's config, a GGUF's) draws from the top 50, not from the whole vocabulary."""
    complete = copy.deepcopy(config)
    complete.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    return complete


def not_applied(config: GenerationConfig) -> list[str]:
    """The options of a completed config (`as_generate_reads`) in `NOT_APPLIED` that it
    sets to anything but what `generate` does by default."""
    default = as_generate_reads(GenerationConfig())
    return [
        name
        for name in NOT_APPLIED
        if getattr(config, name, None) not in (None, getattr(default, name, None))
    ]


@dataclass(frozen=True)
class _Strategy:
    """How rows with one generation config pick: their processors over the whole
    vocabulary, then argmax, or a draw (`_Candidates` narrowing it first)."""

    do_sample: bool
    processors: LogitsProcessorList

    @classmethod
    def of(cls, config: GenerationConfig) -> _Strategy:
        processors = LogitsProcessorList()
        if config.repetition_penalty not in (None, 1.0):
            processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
        if config.do_sample:
            if config.temperature not in (None, 1.0):
                processors.append(TemperatureLogitsWarper(config.temperature))
            if not config.top_k:  # no candidates: the rest run over the whole vocabulary
                processors.extend(_Candidates.narrowing(config))
        return cls(bool(config.do_sample), processors)


@dataclass(frozen=True)
class _Candidates:
    """The `top_k` tokens a sampling row may draw from, and the warpers `generate` runs
    after top-k (top-p, min-p), run on them alone; `top_k` 0: the whole vocabulary."""

    top_k: int
    processors: LogitsProcessorList

    @classmethod
    def of(cls, config: GenerationConfig) -> _Candidates:
        if not config.top_k:
            return cls(0, LogitsProcessorList())
        return cls(config.top_k, cls.narrowing(config))

    @staticmethod
    def narrowing(config: GenerationConfig) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if config.top_p not in (None, 1.0):
            processors.append(TopPLogitsWarper(config.top_p))
        if config.min_p:
            processors.append(MinPLogitsWarper(config.min_p))
        return processors

    def draw(self, logits: torch.Tensor) -> list[int]:
        """One token per row of `logits` (rows x vocabulary, temperature applied)."""
        if not self.top_k:
            return torch.multinomial(logits.softmax(-1), 1)[:, 0].tolist()
        scores, tokens = logits.topk(min(self.top_k, logits.shape[-1]))
        scores = self.processors(None, scores)  # top-p and min-p read the scores only
        choice = torch.multinomial(scores.softmax(-1), 1)
        return tokens.gather(1, choice)[:, 0].tolist()


class Sampler:
    """Picks the next token of each row from its logits: greedy, or sampled as configured."""

    def __init__(self, config: GenerationConfig, *, device: torch.device) -> None:
        config = as_generate_reads(config)
        if unapplied := not_applied(config):
            logger.warning(
                "The model's generation config sets %s, which threadbot does not apply: "
                "its answers will differ from generate's",
                ", ".join(unapplied),
            )
        self.config = config
        self.min_new_tokens = config.min_new_tokens or 0
        self.end_ids = torch.tensor(sorted(end_token_ids(config)), device=device)
        # Indexed directly: transformers' SuppressTokensLogitsProcessor runs `isin` over the
        # whole vocabulary every step (0.45 s a step for a few thousand tokens here).
        self.suppressed = torch.tensor(
            config.suppress_tokens or [], dtype=torch.long, device=device
        )
        self._default = _Strategy.of(config)
        self._candidates = _Candidates.of(config)  # every row's temperature keeps top_k

    def _strategy(self, temperature: float | None) -> _Strategy:
        """How a row with this temperature picks (None: as the model's config says)."""
        if temperature is None:
            return self._default
        config = copy.copy(self.config)
        config.do_sample = temperature >= SAMPLED_FROM
        if config.do_sample:
            config.temperature = float(temperature)
        return _Strategy.of(config)

    def __call__(
        self,
        logits: torch.Tensor,
        histories: Sequence[Tensor | list[int]],
        answered: Sequence[int],
        temperatures: Sequence[float | None],
    ) -> list[int | None]:
        """One token per row; `histories` are the rows' ids so far (1-D tensors or lists),
        `answered` their answer lengths (an answer shorter than `min_new_tokens` may not end
        yet), `temperatures` their own temperatures (None: the model's config; 0: greedy).

        A row whose logits hold no number to pick by (NaN or infinity from an overflow in
        the model, or every token ruled out) gets None, and the other rows their tokens:
        `multinomial` would fail the whole batch on that one row."""
        logits = logits.float()
        logits[:, self.suppressed] = -float("inf")
        # Before the processors, as in `generate`: top-p then chooses among the tokens that
        # a row too short to end may take.
        short = [row for row, count in enumerate(answered) if count < self.min_new_tokens]
        if short and len(self.end_ids):
            logits[torch.tensor(short)[:, None], self.end_ids] = -float("inf")
        by_temperature: dict[float | None, list[int]] = {}
        for row, temperature in enumerate(temperatures):
            by_temperature.setdefault(temperature, []).append(row)
        groups = [(self._strategy(t), rows) for t, rows in by_temperature.items()]
        every = len(temperatures)  # a group or selection of every row is the whole tensor
        for strategy, rows in groups:
            if strategy.processors:
                ids = _left_filled([histories[row] for row in rows], logits.device)
                if len(rows) == every:
                    logits = strategy.processors(ids, logits)
                else:
                    index = torch.tensor(rows, device=logits.device)
                    logits[index] = strategy.processors(ids, logits[index])
        # One pass for the greedy pick and the check (max's index is argmax's, the first of
        # equals; its value is NaN where a row holds one).
        best, picked = logits.max(-1)
        tokens: list[int | None] = picked.tolist()
        for row in (~best.isfinite()).nonzero()[:, 0].tolist():
            tokens[row] = None
        sampling = [
            row
            for strategy, rows in groups
            if strategy.do_sample
            for row in rows
            if tokens[row] is not None
        ]
        if sampling:
            sampling.sort()  # rows draw in batch order, as one `generate` batch would
            if len(sampling) < every:
                logits = logits[torch.tensor(sampling, device=logits.device)]
            drawn = self._candidates.draw(logits)
            for row, token in zip(sampling, drawn, strict=True):
                tokens[row] = token
        return tokens


def _left_filled(histories: Sequence[Tensor | list[int]], device: torch.device) -> Tensor:
    """The rows' ids as one tensor, each shorter row filled on the left with its own first id:
    a filler that penalizes nothing the row has not already seen."""
    rows = [torch.as_tensor(ids, dtype=torch.long) for ids in histories]
    width = max(len(ids) for ids in rows)
    filled = torch.empty(len(rows), width, dtype=torch.long)
    for row, ids in zip(filled, rows, strict=True):
        row[: width - len(ids)] = ids[0]
        row[width - len(ids) :] = ids
    return filled.to(device)
