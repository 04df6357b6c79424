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
pages. Here every request is a row with its own slot of a `SlotCache`, joining and leaving
between steps; a finished row's keys and values go to the `PrefixCache`, so the
conversation's next turn prefills only its new tokens.

Each step is one forward (`bot.ragged`) over at most `step_tokens` tokens: one for each
decoding row, and what is left of the budget for chunks of the prompts being prefilled,
shortest first, so a long prompt is prefilled chunk by chunk while the running answers keep
flowing, and a short prompt that arrives meanwhile is answered after one chunk.

Prompts come first: while one waits to be read, the running answers sit out up to
`prefill_first_steps` steps in a row (the setting `PREFILL_FIRST_STEPS`), so those steps
read prompts alone, with the whole budget. A chunk is compute-bound on a CPU, and each
answer riding along costs it a whole token's compute: on 2 cores of an AMD EPYC
(Qwen2.5-0.5B's shape, bfloat16), about 8 answers made a 104-token chunk's step about 10%
slower. Under Poisson traffic at 70% of capacity (the bench's), the p95 time to first
token came lower in 7 of 8 paired runs (by 8-34%; 11% higher in the eighth), and so did
the p95 of 16 prompts arriving at once (in all 7), at the same throughput. What it costs
the answers, a pause of two chunks (about 0.6 s there), is under the 1-1.5 s between a
stream's edits in Slack and Discord, and the third step always carries them: a long prompt
slows the answers beside it, never stops them.

Live KV memory is slots * the longest row, so admission is by tokens: a request joins only
while (rows after it joins) * (the longest row's prompt + answer, at its longest) stays
within `max_batch_tokens` (`fits`); the queue keeps the rest waiting.
A request over the whole budget by itself still runs, alone: refusing it would leave its
conversation unanswerable for good, and one row is bounded by the context window anyway.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from bot.detokenize import IncrementalDetokenizer
from bot.kv_cache import PrefixCache
from bot.metrics import Metrics
from bot.packing import decode_kernel_of
from bot.ragged import Segment, SlotCache, StepLayout
from bot.sampling import Sampler, end_token_ids
from bot.step_forward import step_forward
from bot.types import ChatMessage

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from bot.engine import Engine

logger = logging.getLogger(__name__)

MIN_PREFILL_CHUNK = 16
"""Prompts advance by at least this many tokens a step, however full the batch."""
PREFILL_FIRST_STEPS = 2
"""While prompts wait to be read, running answers sit out at most this many steps in a row:
a 200-token prompt is read in its two chunks (128 tokens, then 72) with no answer beside it.
The answers pay for it in their own time: at the bench's traffic, held to AVX2 kernels in
float32, the p95 first token came 5-33% sooner and the answers' p50 3-63% later (five
pairs); in bfloat16, 0-8% sooner and 14-23% later (two). `PREFILL_FIRST_STEPS=0` turns it
off (README, "Prompts come first")."""
UNUSABLE = "the model's output was not a number (NaN or infinity) for this conversation"
"""Why a row ends unanswered when its logits cannot be picked from (`Sampler`): an
overflow in the model on this prompt, most often in float16 or bfloat16."""
BATCH_MEMORY_SHARE = 0.4
"""The share of the free memory that the default `max_batch_tokens` gives the batch's KV
cache. Growing the slot cache copies it, so the old and new ones are briefly both alive:
half at most; of that half, a fifth is left for the forward's own tensors (a prefill
chunk's attention scores, the logits) and the allocator's slack."""


@dataclass
class Update:
    """What one step produced for one request."""

    key: object  # the request, as the queue handed it to `join`
    text: str  # text written since the last update (may be empty)
    answer: str | None = None  # the whole answer, once the request has finished
    # The prompt's length and the answer's so far (its end token not counted), in every
    # update: a request stopped before its end still has them.
    prompt_tokens: int = 0
    answer_tokens: int = 0
    failed: str | None = None  # why the request ended unanswered (its row alone)


@dataclass(eq=False)
class _Sequence:
    key: object
    conversation: str
    prompt: list[int]
    arrival: int  # joins before it
    slot: int  # its row of the slot cache
    cached: int  # tokens whose keys and values are computed: the next token's position
    max_new_tokens: int  # within the context window
    temperature: float | None  # None: the model's generation config; 0: greedy
    detokenizer: IncrementalDetokenizer  # the answer's text as it streams
    answer: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # The prompt and the answer as one tensor, for the sampler's repetition penalty:
        # written a token at a time, so that no step rebuilds a long conversation's ids.
        self._ids = torch.empty(self.reserved, dtype=torch.long)
        self._ids[: len(self.prompt)] = torch.tensor(self.prompt, dtype=torch.long)

    def add(self, token: int) -> None:
        self._ids[len(self.prompt) + len(self.answer)] = token
        self.answer.append(token)

    @property
    def ids(self) -> torch.Tensor:
        """The prompt and the answer so far (a view)."""
        return self._ids[: len(self.prompt) + len(self.answer)]

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.answer

    @property
    def counts(self) -> tuple[int, int]:
        """The prompt's length and the answer's so far, in tokens."""
        return len(self.prompt), len(self.answer)

    @property
    def reserved(self) -> int:
        """The most columns this row can come to need: its prompt and a full answer."""
        return len(self.prompt) + self.max_new_tokens

    @property
    def to_prefill(self) -> int:
        return len(self.prompt) - self.cached


@dataclass
class BatchStats:
    """Token counts since start, for the tests and the benchmark."""

    prefilled: int = 0  # prompt tokens computed
    reused: int = 0  # prompt tokens taken from a conversation's cached turn
    decoded: int = 0  # answer tokens produced


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
        prefill_first_steps: int = PREFILL_FIRST_STEPS,
        metrics: Metrics | None = None,
    ) -> None:
        """`max_batch_tokens`: the batch's KV cache at its widest, padding counted (None:
        no bound). `prefill_first_steps`: the steps in a row that running answers sit out
        while prompts wait to be read (0: none)."""
        self.engine = engine
        self.metrics = metrics if metrics is not None else Metrics()
        self.model = engine.model
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.step_tokens = step_tokens
        self.prefill_first_steps = prefill_first_steps
        self.prefix_cache = prefix_cache
        self.sampler = Sampler(self.model.generation_config, device=self.model.device)
        self.end_ids = end_token_ids(self.model.generation_config)
        self.stats = BatchStats()
        self._sequences: list[_Sequence] = []  # sequence i has slot i
        self._arrivals = itertools.count()
        self._answers_sat_out = 0  # steps in a row that read prompts alone
        layers, kv_heads, head_dim = kv_shape(self.model)
        self._cache = SlotCache(layers, kv_heads, head_dim, self.model.dtype, self.model.device)
        self._kernel = decode_kernel_of(self.model)  # its attention too (`StepLayout`)
        self._step_forward = step_forward(self.model, self._kernel)
        # The last request `fits` tokenized, so that neither `join` nor the next step's
        # `fits` (while it waits) tokenizes it again.
        self._tokenized: tuple[object, list[int]] | None = None

    def __len__(self) -> int:
        return len(self._sequences)

    @property
    def kv_tokens(self) -> int:
        """Token columns the batch's KV cache holds now: slots x width, padding included."""
        return self._cache.slots * self._cache.width

    # Joining and leaving write into the KV cache, whose tensors a step may have made:
    # inference tensors, which take writes inside inference mode alone.
    @torch.inference_mode()
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
        self.stats.reused += reused
        self.metrics.prompt_tokens.inc(len(prompt))
        self.metrics.kv_reused_tokens.inc(reused)
        sequence = _Sequence(
            key,
            conversation,
            prompt,
            next(self._arrivals),
            len(self._sequences),
            reused,
            self._answer_limit(prompt, max_new_tokens),
            temperature,
            IncrementalDetokenizer(self.engine.decode),
        )
        self._sequences.append(sequence)
        try:
            self._fit_cache()
            if kv:
                self._cache.load(sequence.slot, kv)
        except BaseException:  # e.g. out of memory: the batch goes on without this row
            self._sequences.pop()
            raise

    def fits(
        self, key: object, messages: list[ChatMessage], *, max_new_tokens: int | None = None
    ) -> bool:
        """Whether `join` would keep the batch within `max_batch_tokens` now, counting the
        padding: every row as wide as the longest could grow. An empty batch takes anything."""
        if self.max_batch_tokens is None or not self._sequences:
            return True
        prompt = self._prompt_ids(key, messages)
        widest = max(
            len(prompt) + self._answer_limit(prompt, max_new_tokens),
            *(sequence.reserved for sequence in self._sequences),
        )
        return (len(self._sequences) + 1) * widest <= self.max_batch_tokens

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

    @torch.inference_mode()
    def leave(self, key: object) -> None:
        """Stop a request now (cancelled); what it computed is kept for its conversation."""
        for sequence in self._sequences:
            if sequence.key is key:
                self._release(sequence)
                return

    @torch.inference_mode()
    def clear(self) -> None:
        """Forget every request and the batch (after a failed step left it unknown)."""
        self._sequences.clear()
        self._fit_cache()

    @torch.inference_mode()
    def step(self) -> list[Update]:
        """Advance the batch by one forward: a token for every decoding row (unless they
        sit this step out for the prompts: `_decoding`), and a chunk for the prompts."""
        decoding = self._decoding()
        chunks = self._prefill_chunks(self.step_tokens - len(decoding))
        if not decoding and not chunks:
            return []
        layout = StepLayout(
            [Segment(sequence.slot, sequence.cached, 1) for sequence in decoding],
            [Segment(sequence.slot, sequence.cached, length) for sequence, length in chunks],
            self.model.device,
            self._kernel,
        )
        tokens, sampled, kept = [], [], []  # sampled: whose next token `kept` logits pick
        for segment in layout.segments:
            sequence = self._sequences[segment.slot]
            if sequence.answer:
                tokens.append(sequence.answer[-1])
            else:
                tokens += sequence.prompt[segment.start : segment.end]
                self.stats.prefilled += segment.length
            sequence.cached = segment.end
            if sequence.answer or not sequence.to_prefill:
                sampled.append(sequence)
                kept.append(len(tokens) - 1)
        logits = self._forward(tokens, layout, kept)
        return self._advance(sampled, logits) if sampled else []

    def _decoding(self) -> list[_Sequence]:
        """The answers that take their next token this step: none while prompts wait to be
        read, unless they have sat out `prefill_first_steps` steps in a row."""
        decoding = [sequence for sequence in self._sequences if sequence.answer]
        reading = len(decoding) < len(self._sequences)
        if decoding and reading and self._answers_sat_out < self.prefill_first_steps:
            self._answers_sat_out += 1
            return []
        self._answers_sat_out = 0
        return decoding

    def _prefill_chunks(self, budget: int) -> list[tuple[_Sequence, int]]:
        """(sequence, tokens) to prefill this step: the prompts fewest chunks from their end
        first, so a short prompt arriving during a long one waits at most one chunk; among
        equals, in the order they joined (the queue's fair order)."""
        budget = max(budget, MIN_PREFILL_CHUNK)
        waiting = sorted(
            (sequence for sequence in self._sequences if not sequence.answer),
            key=lambda sequence: (-(-sequence.to_prefill // self.step_tokens), sequence.arrival),
        )
        chunks = []
        for sequence in waiting:
            if budget <= 0:
                break
            length = min(sequence.to_prefill, budget)
            chunks.append((sequence, length))
            budget -= length
        return chunks

    def _forward(self, tokens: list[int], layout: StepLayout, kept: list[int]) -> torch.Tensor:
        """The logits at the flattened positions `kept`."""
        device = self.model.device
        return self._step_forward(
            torch.tensor([tokens], device=device),
            layout,
            self._cache,
            torch.tensor(kept, dtype=torch.long, device=device),
        )

    def _advance(self, sequences: list[_Sequence], logits: torch.Tensor) -> list[Update]:
        """Choose each sequence's next token; finished ones leave the batch."""
        tokens = self.sampler(
            logits,
            [sequence.ids for sequence in sequences],
            [len(sequence.answer) for sequence in sequences],
            [sequence.temperature for sequence in sequences],
        )
        updates, finished = [], []
        generated = 0
        for sequence, token in zip(sequences, tokens, strict=True):
            if token is None:
                finished.append(sequence)
                updates.append(self._unanswerable(sequence))
                continue
            ended = token in self.end_ids
            if not ended:
                sequence.add(token)
                generated += 1
            if ended or len(sequence.answer) >= sequence.max_new_tokens:
                finished.append(sequence)
                updates.append(self._finish(sequence))
            else:
                text = sequence.detokenizer.feed(sequence.answer)
                updates.append(Update(sequence.key, text, None, *sequence.counts))
        self.stats.decoded += generated
        self.metrics.generated_tokens.inc(generated)
        for sequence in finished:
            self._release(sequence)
        return updates

    def _unanswerable(self, sequence: _Sequence) -> Update:
        """End a row whose logits were not numbers. Its keys and values hold what made them
        so: wiped, not kept for its conversation's next turn."""
        self._cache.wipe(sequence.slot)
        sequence.cached = 0
        return Update(sequence.key, "", None, *sequence.counts, failed=UNUSABLE)

    def _finish(self, sequence: _Sequence) -> Update:
        answer = self.engine.decode(sequence.answer)  # whole, once: exactly the seed's text
        return Update(sequence.key, sequence.detokenizer.rest(answer), answer, *sequence.counts)

    def _release(self, sequence: _Sequence) -> None:
        """Take a sequence out of the batch, keeping its cache for its conversation; the
        last slot's row moves into its place, so slots stay 0..rows-1."""
        if sequence.cached:
            self._keep_for_next_turn(sequence)
        last = self._sequences.pop()
        moved_in = 0
        if last is not sequence:
            self._cache.move(last.slot, sequence.slot, last.cached)
            # What it leaves behind, NaN if it is a prompt the model overflows on (found
            # at its last chunk), would be read by the next row to join that slot.
            self._cache.wipe(last.slot, 0, last.cached)
            last.slot, moved_in = sequence.slot, last.cached
            self._sequences[sequence.slot] = last
        # A row that left mid-prompt (a stop) may have left NaN past what moves in: the
        # rows that read this slot next would read it (`SlotCache.wipe`).
        self._cache.wipe(sequence.slot, moved_in, sequence.cached)
        self._fit_cache()

    def _keep_for_next_turn(self, sequence: _Sequence) -> None:
        """Keep a leaving row's keys and values for its conversation's next turn: a saving,
        skipped where copying them fails (out of memory), which must fail no other row."""
        try:
            kv = self._cache.read(sequence.slot, sequence.cached)
            self.prefix_cache.put(sequence.conversation, sequence.tokens[: sequence.cached], kv)
        except Exception:
            logger.warning("the cache of %s was not kept for its next turn",
                           sequence.conversation, exc_info=True)  # fmt: skip

    def _fit_cache(self) -> None:
        """Size the slot cache to the rows: grown to hold them, shrunk once it is more than
        twice what they need (in slots, and in width), so it neither reallocates at every
        join nor holds what is gone: rows going 4, 5, 4, 5 kept 8 slots and 4 in turn, each
        a new cache and a copy of every row, every row waiting (for Qwen2.5-0.5B, 29-39 ms
        between 16 and 32 slots 2,048 wide in bfloat16, 2 cores of an AMD EPYC)."""
        rows = len(self._sequences)
        if not rows:
            self._cache.resize(0, 0, keep=0)
            return
        width = max(sequence.reserved for sequence in self._sequences)
        slots = self._slots_for(rows, width)
        held_slots, held_width = self._cache.slots, self._cache.width
        too_small = held_slots < rows or held_width < width
        if too_small or held_slots > 2 * slots or held_width > 2 * width:
            self._cache.resize(slots, width, keep=rows)

    def _slots_for(self, rows: int, width: int) -> int:
        """Room for `rows`, rounded up to a power of two for the rows still to join, within
        `max_batch` and what `max_batch_tokens` leaves at this width."""
        slots = min(1 << (rows - 1).bit_length(), self.max_batch)
        if self.max_batch_tokens is not None:
            slots = min(slots, self.max_batch_tokens // width)
        return max(slots, rows)


def refuse_unbatchable(engine: Engine, model_name: str) -> None:
    """ModelError (naming MODEL) unless the batcher can run the model: a two-token answer
    through it, at load. Some architectures' layers use the KV cache in ways the batcher's
    does not serve (OPT, BLOOM, Falcon, GPT-NeoX, StableLM, MPT and Nemotron's attention,
    DeepSeek's latent attention): every step would fail, for every user."""
    from bot.loading import ModelError

    batcher = Batcher(engine=engine, max_batch=1, step_tokens=64, prefix_cache=PrefixCache(0))
    question = [{"role": "user", "content": "Hello"}]
    try:
        batcher.join(None, question, conversation="", max_new_tokens=2, temperature=0)
        ended = next(
            (
                update
                for _ in range(8)  # its prompt fits one step: a few are plenty
                for update in batcher.step()
                if update.answer is not None or update.failed is not None
            ),
            None,
        )
    except Exception as error:
        kind = engine.model.config.model_type
        raise ModelError(
            f"MODEL={model_name} ({kind}) cannot be served by threadbot's batcher "
            f"({type(error).__name__}: {error}); choose a model of a family it serves, "
            "such as Qwen2.5, Llama, Mistral, Gemma or Phi"
        ) from None
    if ended is None:
        raise ModelError(f"MODEL={model_name}: a two-token answer did not end at load")
    if ended.failed is not None:
        raise ModelError(
            f"MODEL={model_name} in {engine.model.dtype}: its output for a plain 'Hello' at "
            "load was not a number (NaN or infinity); try another DTYPE (float32 holds what "
            "float16 and bfloat16 overflow), or another model"
        )


def kv_shape(model: PreTrainedModel) -> tuple[int, int, int]:
    """Layers, key-value heads and head dimension of a model's attention."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def kv_bytes_per_token(model: PreTrainedModel) -> int:
    """One token's keys and values over all layers: 2 * layers * kv heads * head dim * dtype."""
    layers, kv_heads, head_dim = kv_shape(model)
    return 2 * layers * kv_heads * head_dim * model.dtype.itemsize


def default_max_batch_tokens(
    model: PreTrainedModel, *, free_bytes: int, idle_cache_bytes: int
) -> int:
    """MAX_BATCH_TOKENS when unset: the batch's share of `free_bytes` (read once the weights
    are loaded), less what the idle conversations' caches may take, in tokens."""
    usable = max(free_bytes - idle_cache_bytes, 0) * BATCH_MEMORY_SHARE
    return int(usable // kv_bytes_per_token(model))
