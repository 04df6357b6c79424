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

from bot.config import DEFAULT_CONTEXT_TOKENS
from bot.prompt import alternating
from bot.types import ChatMessage

if TYPE_CHECKING:
    from transformers import (
        BatchEncoding,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )
    from transformers.generation.streamers import BaseStreamer

logger = logging.getLogger(__name__)


def context_tokens(config: PretrainedConfig, max_context_tokens: int | None) -> int:
    """Prompt + answer budget: MAX_CONTEXT_TOKENS (unset: its default) within the model's window."""
    window = getattr(config, "max_position_embeddings", None) or 2048
    return min(window, max_context_tokens or DEFAULT_CONTEXT_TOKENS)


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

    @property
    def prompt_budget(self) -> int:
        """Tokens a prompt may use and still leave room for a full-length answer."""
        return max(self.context_tokens - self.max_new_tokens, 1)

    def render(self, conversations: Sequence[list[ChatMessage]]) -> list[str]:
        """Step 1: each conversation through the model's chat template, ready for an answer."""
        return [
            self.tokenizer.apply_chat_template(
                alternating(messages), tokenize=False, add_generation_prompt=True
            )
            for messages in conversations
        ]

    def encode(self, conversations: Sequence[list[ChatMessage]]) -> BatchEncoding:
        """Steps 1-2: template, then tokenize the batch (left-padded) onto the model's device."""
        return self.tokenizer(self.render(conversations), return_tensors="pt", padding=True).to(
            self.model.device
        )

    def decode_new(self, input_ids: torch.Tensor, output_ids: torch.Tensor) -> list[str]:
        """Steps 4-5: keep only the tokens after each prompt, decode without special tokens."""
        new_ids = [
            output[len(prompt) :] for prompt, output in zip(input_ids, output_ids, strict=True)
        ]
        return self.tokenizer.batch_decode(new_ids, skip_special_tokens=True)

    def prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        """Steps 1-2 for one conversation: its prompt's token ids."""
        return self.tokenizer(self.render([messages])[0]).input_ids

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        """Prompt length in tokens, exactly as the model will see it."""
        return len(self.prompt_ids(messages))

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
