"""Continuous batching: conversations join and leave one running batch between decode steps.

This is the seed's pipeline with `generate` unrolled so that many requests share it:
template → tokenize → prefill the prompt → decode token by token → keep the new tokens →
decode to text (as it streams, a few tokens at a time: `bot.detokenize`; once the answer
ends, whole). The batch lives on the engine thread; `bot.queue` drives it.

Why our own loop over the model's forward rather than `generate` or transformers'
continuous-batching manager: `generate` runs a fixed batch to its end, so a new request
would wait for the longest answer in it. The manager (`generate_batch`, transformers 5.24)
runs on CPU and gives the same greedy tokens, but measured on 2 cores with Qwen2.5-0.5B's
shape (8 prompts of 200 tokens, 32 new tokens, fp32) it was no faster than one static
`generate` (3.8-6.9 against 4.7-11.6 tok/s in total, "sdpa"; its paged "eager" path was
slower still), it ignores `min_new_tokens`, and it shares cache only in whole 256-token
pages. Here every sequence is a row of one left-padded `DynamicCache`; rows are added
(padding the shorter side on the left) and removed between steps, and a finished row's
keys and values go to the `PrefixCache`, so the conversation's next turn prefills only
its new tokens.

Each step does at most `step_tokens` tokens of work: one token for each decoding row, and
what is left of the budget for the next chunk of one joining prompt, so a long prompt is
prefilled in chunks while the running answers keep flowing. With no answer running, a
prompt is prefilled whole (one forward is cheaper than several).

Live KV memory is rows * the longest row (padding included), so admission is by tokens:
a request joins only while (rows after it joins) * (the longest row's prompt + answer, at
its longest) stays within `max_batch_tokens` (`fits`); the queue keeps the rest waiting.
A request over the whole budget by itself still runs, alone: refusing it would leave its
conversation unanswerable for good, and one row is bounded by the context window anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from bot.detokenize import IncrementalDetokenizer
from bot.kv_cache import KV, PrefixCache
from bot.metrics import Metrics
from bot.sampling import Sampler, end_token_ids
from bot.types import ChatMessage

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from bot.engine import Engine

MIN_PREFILL_CHUNK = 16
"""A joining prompt advances by at least this many tokens a step, however full the batch."""
BATCH_MEMORY_SHARE = 0.4
"""The share of the free memory that the default `max_batch_tokens` gives the batch's KV
cache. Joining a row copies the whole cache (`torch.cat`), so the old and new ones are
briefly both alive: half at most; of that half, a fifth is left for the forward's own
tensors (a prefill chunk's attention scores, the logits) and the allocator's slack."""


@dataclass
class Update:
    """What one step produced for one request."""

    key: object  # the request, as the queue handed it to `join`
    text: str  # text written since the last update (may be empty)
    answer: str | None = None  # the whole answer, once the request has finished
    # Set with `answer`: the prompt's length and the answer's (its end token not counted).
    prompt_tokens: int = 0
    answer_tokens: int = 0


@dataclass(eq=False)
class _Sequence:
    key: object
    conversation: str
    prompt: list[int]
    cache: DynamicCache  # its own while prefilling, then the batch's
    cached: int  # tokens whose keys and values are computed: the next token's position
    max_new_tokens: int  # within the context window
    temperature: float | None  # None: the model's generation config; 0: greedy
    detokenizer: IncrementalDetokenizer  # the answer's text as it streams
    answer: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.answer

    @property
    def reserved(self) -> int:
        """The most columns this row can come to need: its prompt and a full answer."""
        return len(self.prompt) + self.max_new_tokens


@dataclass
class BatchStats:
    """Token counts since start, for tests, logs and the benchmark."""

    prefilled: int = 0  # prompt tokens computed
    reused: int = 0  # prompt tokens taken from a conversation's cached turn
    decoded: int = 0  # answer tokens produced
    steps: int = 0


class Batcher:
    """One running batch over an `Engine`'s model; driven from a single thread. Counts
    the prompt, reused and generated tokens in `metrics`."""

    def __init__(
        self,
        *,
        engine: Engine,
        max_batch: int,
        step_tokens: int,
        prefix_cache: PrefixCache,
        max_batch_tokens: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """`max_batch_tokens`: the batch's KV cache at its widest, padding counted (None:
        no bound)."""
        self.engine = engine
        self.metrics = metrics if metrics is not None else Metrics()
        self.model = engine.model
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.step_tokens = step_tokens
        self.prefix_cache = prefix_cache
        self.sampler = Sampler(self.model.generation_config, device=self.model.device)
        self.end_ids = end_token_ids(self.model.generation_config)
        self.stats = BatchStats()
        self._joining: list[_Sequence] = []  # prefilling, in arrival order
        self._rows: list[_Sequence] = []  # decoding: row i of the batch cache
        self._batch: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, columns]: 1 where a row has a token
        # The last request `fits` tokenized, so that neither `join` nor the next step's
        # `fits` (while it waits) tokenizes it again.
        self._tokenized: tuple[object, list[int]] | None = None

    def __len__(self) -> int:
        return len(self._joining) + len(self._rows)

    def join(
        self,
        key: object,
        messages: list[ChatMessage],
        *,
        conversation: str,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> None:
        """Start answering `messages`; its updates carry `key`. The answer stops after
        `max_new_tokens` (None: the engine's) or at the context window, and picks tokens
        with `temperature` (None: the model's generation config; 0: greedy)."""
        prompt = self._prompt_ids(key, messages)
        self._tokenized = None
        kv, reused = self.prefix_cache.take(conversation, prompt)
        # Full-attention layers always: the batch's rows are joined and cut column by column,
        # which a config's sliding layers (dropping keys, counting their own length) would
        # break; `loading.refuse_unservable` admits only windows that no row outgrows.
        cache = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()
        self.stats.reused += reused
        self.metrics.prompt_tokens.inc(len(prompt))
        self.metrics.kv_reused_tokens.inc(reused)
        sequence = _Sequence(
            key,
            conversation,
            prompt,
            cache,
            reused,
            self._answer_limit(prompt, max_new_tokens),
            temperature,
            IncrementalDetokenizer(self.engine.decode),
        )
        self._joining.append(sequence)

    def fits(
        self, key: object, messages: list[ChatMessage], *, max_new_tokens: int | None = None
    ) -> bool:
        """Whether `join` would keep the batch within `max_batch_tokens` now, counting the
        padding: every row as wide as the longest could grow. An empty batch takes anything."""
        sequences = self._joining + self._rows
        if self.max_batch_tokens is None or not sequences:
            return True
        prompt = self._prompt_ids(key, messages)
        widest = max(
            len(prompt) + self._answer_limit(prompt, max_new_tokens),
            *(sequence.reserved for sequence in sequences),
        )
        return (len(sequences) + 1) * widest <= self.max_batch_tokens

    def _prompt_ids(self, key: object, messages: list[ChatMessage]) -> list[int]:
        if self._tokenized is None or self._tokenized[0] is not key:
            self._tokenized = key, self.engine.prompt_ids(messages)
        return self._tokenized[1]

    def _answer_limit(self, prompt: list[int], max_new_tokens: int | None) -> int:
        """New tokens an answer may have: `max_new_tokens` (None: the engine's), within
        what the context window leaves after `prompt`."""
        if max_new_tokens is None:
            max_new_tokens = self.engine.max_new_tokens
        return max(min(max_new_tokens, self.engine.context_tokens - len(prompt)), 1)

    def leave(self, key: object) -> None:
        """Stop a request now (cancelled); what it computed is kept for its conversation."""
        for sequence in self._joining:
            if sequence.key is key:
                self._joining.remove(sequence)
                self._keep(sequence, _layers(sequence.cache))
                return
        self._drop_rows([sequence for sequence in self._rows if sequence.key is key])

    def clear(self) -> None:
        """Forget every request and the batch (after a failed step left it unknown)."""
        self._joining.clear()
        self._rows.clear()
        self._batch = self._mask = None

    @torch.inference_mode()
    def step(self) -> list[Update]:
        """Advance every request by one step: a prefill chunk for the next joining prompt,
        and one token for every decoding row."""
        self.stats.steps += 1
        updates = []
        if self._joining:
            joining = self._joining[0]
            if self._rows:
                budget = max(self.step_tokens - len(self._rows), MIN_PREFILL_CHUNK)
            else:  # no answer is waiting on this step: the whole prompt at once
                budget = len(joining.prompt)
            updates += self._prefill(joining, budget)
        if self._rows:
            updates += self._decode()
        return updates

    def _prefill(self, sequence: _Sequence, budget: int) -> list[Update]:
        start = sequence.cached
        end = min(len(sequence.prompt), start + budget)
        logits = self._forward(
            torch.tensor([sequence.prompt[start:end]]),
            cache=sequence.cache,
            position_ids=torch.arange(start, end)[None],
            attention_mask=None,
        )
        sequence.cached = end
        self.stats.prefilled += end - start
        if end < len(sequence.prompt):
            return []
        self._joining.remove(sequence)
        self._add_row(sequence)
        return self._advance([sequence], logits)

    def _decode(self) -> list[Update]:
        rows = self._rows
        assert self._batch is not None and self._mask is not None
        self._mask = F.pad(self._mask, (0, 1), value=1)
        logits = self._forward(
            torch.tensor([[sequence.answer[-1]] for sequence in rows]),
            cache=self._batch,
            position_ids=torch.tensor([[sequence.cached] for sequence in rows]),
            attention_mask=self._mask,
        )
        for sequence in rows:
            sequence.cached += 1
        return self._advance(list(rows), logits)

    def _forward(self, input_ids: torch.Tensor, **inputs: object) -> torch.Tensor:
        """The last position's logits of each row."""
        device = self.model.device
        inputs = {
            name: value.to(device) if isinstance(value, torch.Tensor) else value
            for name, value in inputs.items()
        }
        output = self.model(
            input_ids=input_ids.to(device), use_cache=True, logits_to_keep=1, **inputs
        )
        return output.logits[:, -1]

    def _advance(self, sequences: list[_Sequence], logits: torch.Tensor) -> list[Update]:
        """Choose each sequence's next token; finished ones leave the batch."""
        tokens = self.sampler(
            logits,
            [sequence.tokens for sequence in sequences],
            [len(sequence.answer) for sequence in sequences],
            [sequence.temperature for sequence in sequences],
        )
        updates, finished = [], []
        generated = 0
        for sequence, token in zip(sequences, tokens, strict=True):
            ended = token in self.end_ids
            if not ended:
                sequence.answer.append(token)
                generated += 1
            if ended or len(sequence.answer) >= sequence.max_new_tokens:
                finished.append(sequence)
                updates.append(self._finish(sequence))
            else:
                updates.append(Update(sequence.key, sequence.detokenizer.feed(sequence.answer)))
        self.stats.decoded += generated
        self.metrics.generated_tokens.inc(generated)
        self._drop_rows(finished)
        return updates

    def _finish(self, sequence: _Sequence) -> Update:
        answer = self.engine.decode(sequence.answer)  # whole, once: exactly the seed's text
        return Update(
            sequence.key,
            sequence.detokenizer.rest(answer),
            answer,
            prompt_tokens=len(sequence.prompt),
            answer_tokens=len(sequence.answer),
        )

    def _add_row(self, sequence: _Sequence) -> None:
        """Append a prefilled sequence to the batch, left-padding whichever side is shorter."""
        layers = _layers(sequence.cache)
        mask = torch.ones(1, sequence.cached, dtype=torch.long, device=self.model.device)
        if self._batch is None or self._mask is None:
            self._batch, self._mask = sequence.cache, mask
        else:
            width = max(self._mask.shape[1], sequence.cached)
            for layer, (keys, values) in zip(self._batch.layers, layers, strict=True):
                layer.keys = torch.cat([_pad_left(layer.keys, width), _pad_left(keys, width)])
                layer.values = torch.cat([_pad_left(layer.values, width), _pad_left(values, width)])
            self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(mask, width)])
        sequence.cache = self._batch
        self._rows.append(sequence)

    def _drop_rows(self, leaving: list[_Sequence]) -> None:
        """Remove rows from the batch, keeping each one's cache for its conversation."""
        if not leaving or self._batch is None or self._mask is None:
            return
        layers = _layers(self._batch)
        for sequence in leaving:
            row, length = self._rows.index(sequence), sequence.cached
            self._keep(
                sequence,
                [(k[row, None, :, -length:], v[row, None, :, -length:]) for k, v in layers],
            )
        kept = [row for row, sequence in enumerate(self._rows) if sequence not in leaving]
        self._rows = [self._rows[row] for row in kept]
        if not kept:
            self._batch = self._mask = None
            return
        index = torch.tensor(kept, device=self._mask.device)
        mask = self._mask[index]
        first = int(mask.any(0).nonzero()[0])  # columns that are padding in every row go
        self._mask = mask[:, first:]
        for layer in self._batch.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]

    def _keep(self, sequence: _Sequence, kv: KV) -> None:
        if sequence.cached:
            self.prefix_cache.put(sequence.conversation, sequence.tokens[: sequence.cached], kv)


def _layers(cache: DynamicCache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers if layer.is_initialized]


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the token dimension (the last of a mask, the third of keys and values)."""
    missing = width - (tensor.shape[1] if tensor.dim() == 2 else tensor.shape[2])
    if not missing:
        return tensor
    padding = (missing, 0) if tensor.dim() == 2 else (0, 0, missing, 0)
    return F.pad(tensor, padding)


def kv_bytes_per_token(model: PreTrainedModel) -> int:
    """One token's keys and values over all layers: 2 * layers * kv heads * head dim * dtype."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize


def free_memory(device: torch.device) -> int:
    """Bytes free now where the model lives: the GPU's, else the machine's (Linux counts
    only free pages; systems without that figure, like macOS, give all physical memory)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    pages = "SC_AVPHYS_PAGES" if "SC_AVPHYS_PAGES" in os.sysconf_names else "SC_PHYS_PAGES"
    return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")


def default_max_batch_tokens(
    model: PreTrainedModel, *, free_bytes: int, idle_cache_bytes: int
) -> int:
    """MAX_BATCH_TOKENS when unset: the batch's share of `free_bytes` (read once the weights
    are loaded), less what the idle conversations' caches may take, in tokens."""
    usable = max(free_bytes - idle_cache_bytes, 0) * BATCH_MEMORY_SHARE
    return int(usable // kv_bytes_per_token(model))
