"""Linear weights packed for oneDNN at load: the same products, the same answers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import answer_alone, tiny_qwen2
from test_batching import QUESTIONS, run

from bot import row_padding
from bot.batching import Batcher
from bot.engine import Engine
from bot.kv_cache import PrefixCache
from bot.packing import (
    SIBLINGS,
    PackedLinear,
    PackedPart,
    SharedProduct,
    pack_linear_weights,
    packable,
)
from bot.quantize import weight_bytes
from bot.row_padding import fastest_rows

BF16 = pytest.param(
    torch.bfloat16,
    id="bfloat16",
    marks=pytest.mark.skipif(
        not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bfloat16 in oneDNN here"
    ),
)
DTYPES = [pytest.param(torch.float32, id="float32"), BF16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_a_packed_layer_computes_what_the_plain_one_does(dtype, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=bias).to(dtype)
    packed = PackedLinear.of(linear)
    for rows in ([1, 1], [3, 5], [1, 130]):  # a decode step, a batch, a prefill chunk
        x = torch.randn(*rows, 96, dtype=dtype)
        expected = F.linear(x, linear.weight, linear.bias)
        if dtype == torch.bfloat16:  # the same oneDNN kernel: to the bit
            assert torch.equal(packed(x), expected)
        else:  # MKL's float32 product against oneDNN's: the last bits differ
            torch.testing.assert_close(packed(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layers_sharing_a_product_compute_what_each_did_and_keep_nothing(dtype):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(96, size, dtype=dtype) for size in (64, 16, 16)]
    shared = SharedProduct(layers)
    parts = [PackedPart(shared, index) for index in range(3)]
    for rows in ([1, 1], [3, 5], [1, 130]):
        x = torch.randn(*rows, 96, dtype=dtype)
        for part, layer in zip(parts, layers, strict=True):
            expected = F.linear(x, layer.weight, layer.bias)
            torch.testing.assert_close(part(x), expected, rtol=1e-5, atol=1e-5)
        assert shared._input is None  # the step's input is not held after its last reader


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_or_two_computed_at_more_rows_get_what_a_batch_gives_them(dtype):
    """Padded with zeros to 4 rows, as `bot.row_padding` may choose: each real row gets
    what the same product gives it beside other rows, in the input's own shape."""
    torch.manual_seed(0)
    packed = PackedLinear.of(torch.nn.Linear(96, 40).to(dtype))
    batch = torch.randn(4, 96, dtype=dtype)
    beside_others = packed.compute(batch)
    packed.computed_rows = {1: 4, 2: 4}
    computed = []
    compute = packed.compute
    packed.compute = lambda x: computed.append(len(x)) or compute(x)
    for rows in (1, 2):
        x = batch[:rows].reshape(1, rows, 96)  # a decode step: [1, tokens, in]
        assert torch.equal(packed(x), beside_others[:rows].reshape(1, rows, 40))
    assert torch.equal(packed(batch[:3]), compute(batch[:3]))  # 3 rows: as they are
    assert computed == [4, 4, 3]


def test_a_row_count_is_computed_at_a_larger_one_only_where_that_took_clearly_less():
    # As measured on an AVX512-BF16 EPYC (bfloat16), and held to AVX2's kernels (float32).
    assert fastest_rows({1: 40.9, 2: 43.8, 3: 35.4, 4: 33.7}) == {1: 4, 2: 4}
    assert fastest_rows({1: 27.7, 2: 28.4, 3: 30.0, 4: 31.9}) == {}
    assert fastest_rows({1: 30.0, 2: 20.0, 3: 29.0, 4: 19.5}) == {1: 4, 3: 4}  # 2: within
    # An AMX Xeon's 46.9, 45.7, 45.5, 45.4 ms, measured with a lone row's time 10% high
    # (a load-time measurement's noise): not worth a pad and a slice on every product.
    assert fastest_rows({1: 50.0, 2: 45.7, 3: 45.5, 4: 45.4}) == {}


def packed_tiny(tokenizer, dtype) -> torch.nn.Module:
    model = tiny_qwen2(tokenizer).to(dtype)
    assert packable(model)
    pack_linear_weights(model)
    return model


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_linear_layer_is_packed_and_a_tied_output_layer_gets_its_own_copy(
    qwen_tokenizer, dtype
):
    plain = tiny_qwen2(qwen_tokenizer).to(dtype)
    model = tiny_qwen2(qwen_tokenizer).to(dtype)
    linear = [name for name, m in plain.named_modules() if isinstance(m, torch.nn.Linear)]
    assert pack_linear_weights(model) == len(linear)
    modules = dict(model.named_modules())
    assert linear and all(isinstance(modules[name], PackedLinear | PackedPart) for name in linear)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    # In bfloat16, query, key and value share one product, and so do gate and up.
    for layer in model.model.layers:
        for module in (layer.self_attn, layer.mlp):
            parts = [getattr(module, name) for name in SIBLINGS[type(module).__name__]]
            if dtype == torch.float32:
                assert all(isinstance(part, PackedLinear) for part in parts)
            else:
                assert all(isinstance(part, PackedPart) for part in parts)
                assert len({id(part.shared) for part in parts}) == 1
    # The embeddings stay readable for lookups; the output layer packs a copy of them.
    assert torch.equal(model.get_input_embeddings().weight, plain.get_input_embeddings().weight)
    table = plain.get_input_embeddings().weight
    assert weight_bytes(model) == weight_bytes(plain) + table.numel() * table.element_size()
    assert not any(name.endswith("packed") for name in model.state_dict())


def test_a_model_oneDNN_cannot_pack_is_left_as_it_is(qwen_tokenizer):
    model = tiny_qwen2(qwen_tokenizer).half()  # no float16 products in oneDNN here
    assert not packable(model)
    assert pack_linear_weights(model) == 0
    assert any(type(m) is torch.nn.Linear for m in model.modules())
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_batcher_on_packed_weights_gives_the_answers_of_generate(qwen_tokenizer, dtype):
    model = packed_tiny(qwen_tokenizer, dtype)
    engine = Engine(model=model, tokenizer=qwen_tokenizer, max_new_tokens=16)
    batcher = Batcher(engine=engine, max_batch=4, step_tokens=16, prefix_cache=PrefixCache(0))
    seed = engine.generate(QUESTIONS)
    assert all(seed)
    assert [answer_alone(batcher, messages) for messages in QUESTIONS] == seed
    answers = run(batcher, {0: ("a", QUESTIONS[0]), 3: ("b", QUESTIONS[1]), 7: ("c", QUESTIONS[2])})
    assert [answers[key] for key in "abc"] == seed


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_products_are_measured_at_load_and_padded_where_faster(
    qwen_tokenizer, dtype, monkeypatch
):
    """A model too small to stream from memory is not measured (the tiny test models, so
    their products stay as they are); past it, the rows that `fastest_rows` picks are padded
    in every product, and the batcher still gives the answers of `generate`."""
    assert packed_tiny(qwen_tokenizer, dtype).model.layers[0].mlp.down_proj.computed_rows == {}
    monkeypatch.setattr(row_padding, "MEASURED_BYTES", 1)
    measured = []
    times = {1: 4.0, 2: 5.0, 3: 3.0, 4: 3.0}
    monkeypatch.setattr(
        row_padding, "_pass_times", lambda products: measured.append(products) or times
    )
    model = packed_tiny(qwen_tokenizer, dtype)
    products = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(measured) == 1 and measured[0] == products[:1]  # the first reaching the bytes
    assert all(product.computed_rows == {1: 3, 2: 3} for product in products)
    engine = Engine(model=model, tokenizer=qwen_tokenizer, max_new_tokens=16)
    batcher = Batcher(engine=engine, max_batch=4, step_tokens=16, prefix_cache=PrefixCache(0))
    seed = engine.generate(QUESTIONS)
    assert [answer_alone(batcher, messages) for messages in QUESTIONS] == seed
    answers = run(batcher, {0: ("a", QUESTIONS[0]), 3: ("b", QUESTIONS[1])})
    assert [answers[key] for key in "ab"] == seed[:2]


@pytest.mark.parametrize("dtype", [BF16])
def test_packed_bfloat16_weights_answer_as_the_plain_model_does(qwen_tokenizer, dtype):
    plain = Engine(model=tiny_qwen2(qwen_tokenizer).to(dtype), tokenizer=qwen_tokenizer,
                   max_new_tokens=16)  # fmt: skip
    packed = Engine(model=packed_tiny(qwen_tokenizer, dtype), tokenizer=qwen_tokenizer,
                    max_new_tokens=16)  # fmt: skip
    assert packed.generate(QUESTIONS) == plain.generate(QUESTIONS)


def test_the_service_s_loader_packs_the_bundled_model(bundled_engine):
    modules = list(bundled_engine.model.modules())
    assert any(isinstance(module, PackedLinear) for module in modules)
    assert not any(type(module) is torch.nn.Linear for module in modules)
    assert bundled_engine.generate([[{"role": "user", "content": "Say hello."}]])[0]


RESIDENT_AFTER_PACKING = """
import torch
from torch import nn
from bot.packing import pack_linear_weights

def resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(32)])  # 128 MiB
before = resident()
pack_linear_weights(model)
print(resident() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads /proc (Linux)")
def test_packing_gives_the_plain_weights_memory_back(tmp_path):
    """glibc keeps freed heap memory; unless it is handed back, the process holds both
    copies. The threshold setting makes glibc keep every tensor on its heap, as it comes
    to once a long-running process has freed large tensors."""
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**30)}
    result = subprocess.run(
        [sys.executable, "-c", RESIDENT_AFTER_PACKING],
        capture_output=True, text=True, env=environment, timeout=120, check=True,
    )  # fmt: skip
    grown = int(result.stdout.split()[-1])
    assert grown < 0.25 * 128 * 2**20  # not both copies: well under the weights' 128 MiB
