"""The seed's chat pipeline, synchronous: template → tokenize → generate → strip prompt → decode.

One engine owns one model and is driven from one thread (`bot.queue` runs it in an
executor); nothing here knows asyncio or a platform. Streaming and cancellation hook into
`generate` through a streamer and a stopping criterion, leaving the seed's steps intact.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from bot.types import ChatMessage

if TYPE_CHECKING:
    from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

TextCallback = Callable[[int, str], None]
"""Called with (row, new text) as each row of a batch produces text."""

StopCheck = Callable[[], Sequence[bool]]
"""Returns, per row, whether that row's request was cancelled."""


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
        window = getattr(model.config, "max_position_embeddings", None) or 2048
        self.context_tokens = min(window, max_context_tokens or window)

    @property
    def prompt_budget(self) -> int:
        """Tokens a prompt may use and still leave room for a full-length answer."""
        return max(self.context_tokens - self.max_new_tokens, 1)

    def render(self, conversations: Sequence[list[ChatMessage]]) -> list[str]:
        """Step 1: each conversation through the model's chat template, ready for an answer."""
        return [
            self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            for messages in conversations
        ]

    def encode(self, conversations: Sequence[list[ChatMessage]]) -> BatchEncoding:
        """Steps 1-2: template, then tokenize the batch (left-padded) onto the model's device."""
        return self.tokenizer(self.render(conversations), return_tensors="pt", padding=True).to(
            self.model.device
        )

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        """Prompt length in tokens, exactly as `encode` would build it."""
        return len(self.tokenizer(self.render([messages])[0]).input_ids)

    def decode_new(self, input_ids: torch.Tensor, output_ids: torch.Tensor) -> list[str]:
        """Steps 4-5: keep only the tokens after each prompt, decode without special tokens."""
        new_ids = [
            output[len(prompt) :] for prompt, output in zip(input_ids, output_ids, strict=True)
        ]
        return self.tokenizer.batch_decode(new_ids, skip_special_tokens=True)

    def generate(
        self,
        conversations: Sequence[list[ChatMessage]],
        *,
        on_text: TextCallback | None = None,
        stopped: StopCheck | None = None,
    ) -> list[str]:
        """The answers to a batch of conversations, streaming text through `on_text`."""
        inputs = self.encode(conversations)
        config = copy.deepcopy(self.model.generation_config)  # the model's own sampling defaults
        config.max_new_tokens = self.max_new_tokens
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        streamer = _BatchTextStreamer(self, on_text) if on_text else None
        criteria = StoppingCriteriaList([_Cancelled(stopped)] if stopped else [])
        with torch.inference_mode():
            output_ids = self.model.generate(
                **inputs, generation_config=config, streamer=streamer, stopping_criteria=criteria
            )
        answers = self.decode_new(inputs.input_ids, output_ids)
        if streamer:
            streamer.flush(answers)
        return answers


class _BatchTextStreamer(BaseStreamer):
    """Turns each generate step's new token ids into text deltas, one stream per row.

    transformers' own text streamers handle a single row; here each row keeps its ids and
    the text already sent, and a row is silent once it has produced an end token.
    """

    def __init__(self, engine: Engine, on_text: TextCallback) -> None:
        self.engine = engine
        self.on_text = on_text
        self.prompt_seen = False
        self.ids: list[list[int]] = []
        self.sent: list[str] = []
        self.done: list[bool] = []
        eos = engine.model.generation_config.eos_token_id
        self.end_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first call hands over the prompt itself
            self.prompt_seen = True
            rows = value.shape[0]
            self.ids, self.sent, self.done = [[] for _ in range(rows)], [""] * rows, [False] * rows
            return
        for row, token in enumerate(value.reshape(len(self.ids), -1)[:, -1].tolist()):
            if self.done[row]:
                continue
            if token in self.end_ids:
                self.done[row] = True
                continue
            self.ids[row].append(token)
            text = self.engine.tokenizer.decode(self.ids[row], skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                self._send(row, text)

    def end(self) -> None:
        """Nothing to do: `flush` sends the remainder once the final text is decoded."""

    def flush(self, answers: list[str]) -> None:
        for row, answer in enumerate(answers):
            self._send(row, answer)

    def _send(self, row: int, text: str) -> None:
        if text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
            self.on_text(row, text[len(self.sent[row]) :])
            self.sent[row] = text


class _Cancelled(StoppingCriteria):
    """Stops each row whose request was cancelled (the others go on)."""

    def __init__(self, stopped: StopCheck) -> None:
        self.stopped = stopped

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object
    ) -> torch.Tensor:
        return torch.tensor(list(self.stopped()), dtype=torch.bool, device=input_ids.device)
