"""One forward for a whole step: every row's tokens flattened into one sequence.

A step's tokens are the next token of each decoding row and a chunk of each prefilling
prompt, side by side in one `[1, tokens]` input, so the weights are read once per step
whatever the mix (the linear layers see one matrix of tokens). Only attention needs to know
whose token is whose: `ragged_attention` runs it per segment, against that row's own keys.

Keys and values live in a `SlotCache`: per layer one tensor `[slots, kv_heads, width,
head_dim]`, a slot per row, each row writing at its own positions. Attention reads only the
columns a row has filled: decoding rows of similar length share one call (their keys cut to
the longest of them), so a 4,000-token conversation costs the short rows beside it little
more than its own attention.

Measured with Qwen2.5-0.5B's shape in bfloat16 on an AMD EPYC (AVX512-BF16), one thread
(the second core was busy): 15 rows of ~265 tokens decode a step in 485 ms, and 535 ms
(1.10x) with a ~3,900-token row beside them. The design before this one, one left-padded
cache for the whole batch, took 384 and 1,543 ms (4.0x): every short row attended over the
long row's width, and every join or leave copied the whole cache (`torch.cat`). Without a
long row the two are within 6% (311 against 293 ms a step, another run); what this one
pays is copying each group's keys out of the wider slot cache for the matmul. Where the
model has our decode kernel (`bot.decode_kernel`: a CPU with AVX512-BF16, in bfloat16),
decoding rows attend through it instead, reading their keys where they lie.

The other fair ways, and why not: grouping rows by length into a forward per group reads
the weights once per group, and a decode step here is ~75% weight-bound matrix products,
so two groups would cost nearly two steps. Paged KV (fixed blocks, a table per row) saves
the memory that slots reserve for each row's longest answer, but attention would then
gather each row's pages every layer of every step, with no paged-attention kernel for the
CPU in torch; admission by tokens (`Batcher.fits`) already bounds the slots' memory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from bot.device import cpu_has
from bot.kv_cache import KV

if TYPE_CHECKING:
    from bot.decode_kernel import DecodeKernel

ATTENTION = "threadbot_ragged"
GROUP_SPREAD = 2
"""Decoding rows share an attention call while the longest is within this factor of the
shortest (plus `GROUP_SLACK` columns): the padding this costs stays below one extra call."""
GROUP_SLACK = 128
FLOAT32_ATTENTION_ROWS = 8
"""Decoding groups of up to this many rows attend in float32 on the CPU. Measured with
Qwen2.5-0.5B's attention shape in bfloat16 on 2 cores of an AMD EPYC (AVX512-BF16), 24
layers of 250-290 keys: 1, 4 and 8 rows took 2.6, 5.2 and 11.5 ms a step against 4.3, 8.8
and 12.8 in bfloat16; 16 rows 16.7 against 14.4, where copying their keys costs more.
Whole decode steps of the packed model, alternating 12 times in one process on that
machine: 1, 4 and 8 rows took 0.91, 0.93 and 0.93x the time (medians of the pairs)."""
SDPA_DECODES = cpu_has("amx_tile")
"""A bfloat16 model's decoding rows attend through SDPA on a CPU with AMX, and through our
two matmuls elsewhere, where our decode kernel does not attend (no C compiler to build it,
or DECODE_KERNEL=off): which is faster differs by CPU, and not by a few percent. On 2 cores
of an Intel Xeon with AMX, SDPA took 20, 57 and 210 us against 43, 78 and 337 for 1, 4 and
16 rows of 264 keys (Qwen2.5-0.5B's heads), and 171 against 780 us for a lone row of 4,000,
and whole decode steps of the packed model (alternating in one process, two runs) took
0.98 and 0.94-0.96x the time at 1 and 16 rows. On an AMD EPYC with AVX512-BF16 and no
AMX, where the two matmuls were chosen, SDPA took 13.7 ms against 1.7 for 15 rows of 300
keys. (Timing the two at load was tried: a few hundred microseconds, in a process with a
model loaded, came out the other way round as often as not.)"""


@dataclass
class Segment:
    """Consecutive tokens of one row in a step: positions `start` to `start + length`."""

    slot: int
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


class StepLayout:
    """Where each of a step's flattened tokens belongs: decoding rows (one token each,
    first, grouped by length) then prefill chunks. Built once per step, read by every layer."""

    def __init__(
        self,
        decoding: list[Segment],
        prefilling: list[Segment],
        device: torch.device,
        kernel: DecodeKernel | None = None,
    ):
        """`kernel`: our decode kernel, where the model's products have it; the decoding
        rows attend through it where it serves (`DecodeKernel.attends`)."""
        groups = _length_groups(decoding)
        self.segments = [segment for group in groups for segment in group] + prefilling
        self.tokens = sum(segment.length for segment in self.segments)
        self._kernel = kernel
        self._decode_groups = [_DecodeGroup(group, device) for group in groups]
        self._prefills = [(segment, _causal_mask(segment, device)) for segment in prefilling]
        self.slots = torch.tensor(
            [s.slot for s in self.segments for _ in range(s.length)], device=device
        )
        self.positions = torch.tensor(
            [p for s in self.segments for p in range(s.start, s.end)], device=device
        )

    def attention(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        scaling: float | None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """`query` [1, heads, tokens, dim] against the slots' keys and values; the output
        [1, tokens, heads, dim], each token attending to its own row's positions up to its own.
        `softcap`: the scores are soft-capped first (`_capped`)."""
        outputs, offset = [], 0
        kernel = self._kernel
        if kernel is not None and not kernel.attends(query, keys, values, softcap):
            kernel = None
        for group in self._decode_groups:
            rows = len(group.segments)
            q = query[0, :, offset : offset + rows].transpose(0, 1)  # [rows, heads, dim]
            if kernel is not None:  # the rows' own keys, where they lie in the cache
                scale = scaling or q.shape[-1] ** -0.5
                outputs.append(kernel.attention(q, keys, values, *group.slots_and_ends, scale))
            else:
                k, v = group.take(keys), group.take(values)
                outputs.append(_decode(q, k, v, group.mask, scaling, softcap))
            offset += rows
        prefill = _sdpa if softcap is None else partial(_capped_prefill, softcap=softcap)
        for segment, mask in self._prefills:
            q = query[:, :, offset : offset + segment.length]
            k = keys[segment.slot, None, :, : segment.end]
            v = values[segment.slot, None, :, : segment.end]
            outputs.append(prefill(q, k, v, mask, scaling)[0].transpose(0, 1))  # [len, heads, dim]
            offset += segment.length
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)).unsqueeze(0)


class _DecodeGroup:
    def __init__(self, segments: list[Segment], device: torch.device):
        self.segments = segments
        ends = [segment.end for segment in segments]
        self.width = max(ends)
        slots = [segment.slot for segment in segments]
        # Consecutive slots are a view of the cache; others are gathered (a copy).
        self._rows: slice | torch.Tensor = slice(slots[0], slots[-1] + 1)
        if slots != list(range(slots[0], slots[-1] + 1)):
            self._rows = torch.tensor(slots, device=device)
        self.mask: torch.Tensor | None = None  # None: every row fills the width (a lone row)
        if min(ends) < self.width:
            lengths = torch.tensor(ends, device=device)
            self.mask = (torch.arange(self.width, device=device) < lengths[:, None])[:, None, None]

    def take(self, cache: torch.Tensor) -> torch.Tensor:
        return cache[self._rows, :, : self.width]

    @functools.cached_property
    def slots_and_ends(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's slot and how many of its positions are filled, for our kernel."""
        return (
            torch.tensor([segment.slot for segment in self.segments]),
            torch.tensor([segment.end for segment in self.segments]),
        )


def _length_groups(decoding: list[Segment]) -> list[list[Segment]]:
    groups: list[list[Segment]] = []
    for segment in sorted(decoding, key=lambda segment: (segment.end, segment.slot)):
        shortest = groups[-1][0].end if groups else 0
        if not groups or segment.end > GROUP_SPREAD * shortest + GROUP_SLACK:
            groups.append([])
        groups[-1].append(segment)
    for group in groups:  # by slot, so that a run of slots is one view
        group.sort(key=lambda segment: segment.slot)
    return groups


def _causal_mask(segment: Segment, device: torch.device) -> torch.Tensor:
    """Query i (at position start + i) sees the row's keys up to its own position."""
    columns = torch.arange(segment.end, device=device)
    rows = torch.arange(segment.start, segment.end, device=device)
    return columns[None, :] <= rows[:, None]


def _decode(q, k, v, mask, scaling, softcap=None) -> torch.Tensor:
    """Decoding rows' attention (as `_decode_attention` takes it), by SDPA where it is the
    faster (`SDPA_DECODES`) and the scores are not soft-capped."""
    if SDPA_DECODES and softcap is None and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return _sdpa(q[:, :, None], k, v, mask, scaling)[:, :, 0]  # a query of one token a row
    return _decode_attention(q, k, v, mask, scaling, softcap)


def _decode_attention(q, k, v, mask, scaling, softcap=None) -> torch.Tensor:
    """One query per row ([rows, heads, dim]) against its keys ([rows, kv_heads, width, dim]),
    as two matmuls with the query heads of each key head side by side. On a CPU without AMX
    this is 1.5-8x faster than `scaled_dot_product_attention`, whose flash kernel is built
    for long queries there (measured on 2 cores, 15 rows of 300 keys: 1.7 against 13.7 ms in
    bfloat16, 0.9 against 1.3 in float32); prefill chunks still use it."""
    rows, heads, dim = q.shape
    kv_heads = k.shape[1]
    compute = _attention_dtype(q, rows)
    grouped = q.reshape(rows, kv_heads, heads // kv_heads, dim).to(compute)
    scores = torch.matmul(grouped, k.to(compute).transpose(-1, -2)) * (scaling or dim**-0.5)
    scores = _capped(scores, softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(-1, dtype=torch.float32).to(compute)  # as SDPA, in float32
    return torch.matmul(weights, v.to(compute)).reshape(rows, heads, dim).to(q.dtype)


def _attention_dtype(q: torch.Tensor, rows: int) -> torch.dtype:
    """float32 for a few rows of a half-precision model on the CPU: there oneDNN's bfloat16
    matmuls are slow at these small shapes (a lone row against 264 keys: 138 us a call,
    66 in float32, its copy of the keys included), while the copy grows with the rows (see
    `FLOAT32_ATTENTION_ROWS`); SDPA keeps its scores in float32 too. Elsewhere, and for
    more rows, the model's own dtype."""
    if q.device.type == "cpu" and rows <= FLOAT32_ATTENTION_ROWS:
        return torch.float32
    return q.dtype


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Scores soft-capped to (-softcap, softcap), as Gemma 2's attention does before its
    mask and softmax; as they are without a cap."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def _capped_prefill(q, k, v, mask, scaling, softcap: float) -> torch.Tensor:
    """SDPA's attention for a prefill chunk, its scores soft-capped, which SDPA has no
    option for: as transformers' eager attention computes it."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scaling or q.shape[-1] ** -0.5)
    scores = _capped(scores, softcap).masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)


def _sdpa(q, k, v, mask, scaling) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scaling, enable_gqa=k.shape[1] != q.shape[1]
    )


PREPARED = torch.ones(1, 1, 1, 1, dtype=torch.bool)
"""The attention mask our steps pass: transformers takes a 4-D mask as prepared and builds
none of its own; `ragged_attention` ignores it and follows the step's layout."""


def ragged_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The model's attention for a step laid out by `StepLayout` (the model's keyword
    `step_layout`, which transformers passes down to here); any other forward (`generate`,
    say) gets transformers' own SDPA attention."""
    layout = kwargs.pop("step_layout", None)
    if layout is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
    return layout.attention(query, key, value, scaling, kwargs.get("softcap")), None


AttentionInterface.register(ATTENTION, ragged_attention)
# Masks as for SDPA, for the forwards that are not ours (our steps pass a `StepLayout`).
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


class SlotCache:
    """The running rows' keys and values, a slot per row; `update` is what the model's
    attention layers call to store a step's new keys and values."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype, device) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._shape = (layers, kv_heads, head_dim)
        self._dtype, self._device = dtype, device

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def width(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def resize(self, slots: int, width: int, keep: int) -> None:
        """Reallocate to `slots` x `width`, keeping the first `keep` slots' contents. All of
        it is allocated before anything changes: out of memory, the cache stays as it was."""
        layers, kv_heads, head_dim = self._shape
        shape = (slots, kv_heads, width, head_dim)
        keys, values = (
            [torch.zeros(shape, dtype=self._dtype, device=self._device) for _ in range(layers)]
            if slots
            else []
            for _ in range(2)
        )
        keep, columns = min(keep, slots, self.slots), min(width, self.width)
        if keep:
            for new, previous in zip(keys + values, self.keys + self.values, strict=True):
                new[:keep, :, :columns] = previous[:keep, :, :columns]
        self.keys, self.values = keys, values

    def load(self, slot: int, kv: KV) -> None:
        """Put a conversation's cached keys and values at the start of `slot`."""
        for layer, (keys, values) in enumerate(kv):
            length = keys.shape[2]
            self.keys[layer][slot, :, :length] = keys[0]
            self.values[layer][slot, :, :length] = values[0]

    def read(self, slot: int, length: int) -> KV:
        """A slot's first `length` positions, as views (`PrefixCache.put` copies them)."""
        return [
            (keys[slot, None, :, :length], values[slot, None, :, :length])
            for keys, values in zip(self.keys, self.values, strict=True)
        ]

    def move(self, source: int, target: int, length: int) -> None:
        for store in (self.keys, self.values):
            for layer in store:
                layer[target, :, :length] = layer[source, :, :length]

    def wipe(self, slot: int, start: int = 0, end: int | None = None) -> None:
        """Zero a slot's positions from `start` to `end` (all of them by default): a row
        reads its slot past its own end (times a zero weight), so NaN left there would
        become the next row's."""
        for store in (self.keys, self.values):
            for layer in store:
                layer[slot, :, start:end].zero_()

    def update(self, key_states, value_states, layer_idx: int, kwargs: dict):
        """Write the step's keys and values ([1, kv_heads, tokens, dim]) at each token's
        slot and position (from the forward's `step_layout`, which the attention layers
        pass on); return the whole layer for `ragged_attention` to read."""
        layout: StepLayout = kwargs["step_layout"]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if len(layout.segments) == 1:  # one row: a plain copy, cheaper than scattering
            segment = layout.segments[0]
            keys[segment.slot, :, segment.start : segment.end] = key_states[0]
            values[segment.slot, :, segment.start : segment.end] = value_states[0]
        else:
            keys[layout.slots, :, layout.positions] = key_states[0].transpose(0, 1)
            values[layout.slots, :, layout.positions] = value_states[0].transpose(0, 1)
        return keys, values
