"""The seed's chat pipeline, synchronous: template → tokenize → generate → strip prompt → decode.

One engine owns one model and is driven from one thread (`bot.queue` runs it in an
executor); nothing here knows asyncio or a platform. The steps are split out so that
`bot.batching` can run them for many conversations at once, with `generate` unrolled.
Every prompt goes through `render`, which first puts the conversation in the strict
user/assistant alternation that some chat templates demand.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from bot.tokens import TemplateCount, context_tokens, prompt_ids, render
from bot.types import ChatMessage

if TYPE_CHECKING:
    from transformers import (
        BatchEncoding,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )
    from transformers.generation.streamers import BaseStreamer

logger = logging.getLogger(__name__)


class Engine:
    """Answers batches of conversations with one model, the seed's way."""

    def __init__(
        self,
        *,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_new_tokens: int,
        max_context_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.context_tokens = context_tokens(model.config, max_context_tokens)
        self.count_tokens = TemplateCount(tokenizer)  # the prompt's length, as the model sees it

    @property
    def prompt_budget(self) -> int:
        """Tokens a prompt may use and still leave room for a full-length answer."""
        return max(self.context_tokens - self.max_new_tokens, 1)

    def render(self, conversations: Sequence[list[ChatMessage]]) -> list[str]:
        """Step 1: each conversation through the model's chat template, ready for an answer."""
        return [render(self.tokenizer, messages) for messages in conversations]

    def encode(self, conversations: Sequence[list[ChatMessage]]) -> BatchEncoding:
        """Steps 1-2: template, then tokenize the batch (left-padded) onto the model's device;
        the template wrote the special tokens (see `bot.tokens.prompt_ids`)."""
        texts = self.render(conversations)
        return self.tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=False
        ).to(self.model.device)

    def decode_new(self, input_ids: torch.Tensor, output_ids: torch.Tensor) -> list[str]:
        """Steps 4-5: keep only the tokens after each prompt, decode without special tokens."""
        new_ids = [
            output[len(prompt) :] for prompt, output in zip(input_ids, output_ids, strict=True)
        ]
        return self.tokenizer.batch_decode(new_ids, skip_special_tokens=True)

    def prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        """Steps 1-2 for one conversation: its prompt's token ids."""
        return prompt_ids(self.tokenizer, messages)

    def decode(self, answer_ids: list[int]) -> str:
        """Step 5 for one answer's new tokens."""
        return self.tokenizer.decode(answer_ids, skip_special_tokens=True)

    def generate(
        self, conversations: Sequence[list[ChatMessage]], *, streamer: BaseStreamer | None = None
    ) -> list[str]:
        """The seed's loop itself: one `generate` call for a fixed batch of conversations.

        The service answers through `bot.batching` instead; this is the reference it is
        tested against and the baseline the benchmark measures.
        """
        inputs = self.encode(conversations)
        config = copy.deepcopy(self.model.generation_config)  # the model's own sampling defaults
        config.max_new_tokens = self.max_new_tokens
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        with torch.inference_mode():
            output_ids = self.model.generate(**inputs, generation_config=config, streamer=streamer)
        return self.decode_new(inputs.input_ids, output_ids)
