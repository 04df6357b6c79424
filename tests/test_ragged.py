"""One step's flattened tokens: each attends to its own row's keys, up to its own position."""

from __future__ import annotations

import pytest
import torch
from test_cuda import ON_A_GPU

from bot import ragged
from bot.ragged import Segment, SlotCache, StepLayout

HEADS, KV_HEADS, DIM, WIDTH = 4, 2, 8, 300


def reference(query, keys, values, segments):
    """Per token, plain softmax attention over its slot's positions 0..its own."""
    groups, dim = query.shape[1] // keys.shape[1], query.shape[-1]
    outputs, token = [], 0
    for segment in segments:
        for position in range(segment.start, segment.end):
            q = query[0, :, token]  # [heads, dim]
            k = keys[segment.slot, :, : position + 1].repeat_interleave(groups, 0)
            v = values[segment.slot, :, : position + 1].repeat_interleave(groups, 0)
            weights = torch.softmax((q[:, None] * k).sum(-1) / dim**0.5, -1)  # [heads, pos]
            outputs.append((weights[..., None] * v).sum(1))
            token += 1
    return torch.stack(outputs)[None]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_A_GPU)])
def test_decoding_rows_and_prefill_chunks_attend_like_separate_sequences(device):
    torch.manual_seed(0)
    decoding = [Segment(0, 9, 1), Segment(2, 250, 1), Segment(3, 12, 1), Segment(5, 30, 1)]
    prefilling = [Segment(1, 0, 7), Segment(4, 40, 16)]  # a first chunk, a later one
    layout = StepLayout(decoding, prefilling, torch.device(device))
    keys, values = torch.randn(2, 6, KV_HEADS, WIDTH, DIM).to(device).unbind()
    query = torch.randn(1, HEADS, layout.tokens, DIM).to(device)
    got = layout.attention(query, keys, values, DIM**-0.5)
    assert got.shape == (1, layout.tokens, HEADS, DIM)
    torch.testing.assert_close(got, reference(query, keys, values, layout.segments))


def test_a_few_decoding_rows_of_a_bfloat16_model_attend_at_float32_precision(monkeypatch):
    """Through our two matmuls (a CPU without AMX), their scores are not rounded to
    bfloat16 on the way (the output is, once)."""
    monkeypatch.setattr(ragged, "SDPA_DECODES", False)
    torch.manual_seed(0)
    layout = StepLayout(
        [Segment(slot, 200 + 7 * slot, 1) for slot in range(3)], [], torch.device("cpu")
    )
    keys, values = (torch.randn(2, 3, KV_HEADS, WIDTH, DIM) * 2).bfloat16().unbind()
    query = (torch.randn(1, HEADS, layout.tokens, DIM) * 2).bfloat16()
    got = layout.attention(query, keys, values, DIM**-0.5)
    exact = reference(query.float(), keys.float(), values.float(), layout.segments)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), exact.bfloat16().float(), rtol=0, atol=2**-9)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_on_a_cpu_with_amx_bfloat16_decoding_rows_attend_through_sdpa(monkeypatch, softcap):
    """SDPA's answer, within a bfloat16 step of the exact one; soft-capped scores (which
    SDPA has no option for) still through the two matmuls."""
    monkeypatch.setattr(ragged, "SDPA_DECODES", True)
    calls, sdpa = [], ragged._sdpa
    monkeypatch.setattr(ragged, "_sdpa", lambda *args: calls.append(args) or sdpa(*args))
    torch.manual_seed(0)
    decoding = [Segment(0, 9, 1), Segment(1, 12, 1), Segment(2, 250, 1)]  # two groups
    layout = StepLayout(decoding, [], torch.device("cpu"))
    keys, values = (torch.randn(2, 3, KV_HEADS, WIDTH, DIM) * 2).bfloat16().unbind()
    query = (torch.randn(1, HEADS, layout.tokens, DIM) * 2).bfloat16()
    got = layout.attention(query, keys, values, DIM**-0.5, softcap)
    assert len(calls) == (2 if softcap is None else 0)
    if softcap is None:
        exact = reference(query.float(), keys.float(), values.float(), layout.segments)
        torch.testing.assert_close(got.float(), exact, rtol=2**-7, atol=2**-6)


def test_a_long_row_gets_its_own_attention_call_and_the_short_rows_stay_narrow():
    short = [Segment(slot, 300 + slot, 1) for slot in range(15)]
    layout = StepLayout([*short, Segment(15, 4000, 1)], [], torch.device("cpu"))
    assert [len(group.segments) for group in layout._decode_groups] == [15, 1]
    assert [group.width for group in layout._decode_groups] == [315, 4001]


def test_the_cache_stores_each_token_at_its_slot_and_position():
    cache = SlotCache(layers=1, kv_heads=KV_HEADS, head_dim=DIM, dtype=torch.float32, device="cpu")
    cache.resize(3, 20, keep=0)
    layout = StepLayout([Segment(2, 5, 1)], [Segment(0, 3, 4)], torch.device("cpu"))
    new_keys, new_values = torch.randn(2, 1, KV_HEADS, 5, DIM).unbind()
    keys, values = cache.update(new_keys, new_values, 0, {"step_layout": layout})
    torch.testing.assert_close(keys[2, :, 5], new_keys[0, :, 0])
    torch.testing.assert_close(values[0, :, 3:7], new_values[0, :, 1:])
    assert keys[1].abs().sum() == 0 and keys[0, :, :3].abs().sum() == 0
    cache.move(2, 1, length=6)
    torch.testing.assert_close(cache.read(1, 6)[0][0][0], keys[2, :, :6])
    cache.resize(2, 30, keep=2)  # grows the width, keeps what the first two slots hold
    torch.testing.assert_close(cache.keys[0][1, :, :6], keys[2, :, :6])
