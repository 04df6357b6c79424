"""Our decode kernel: built once, the products oneDNN's packed weights give, used for a few
rows only, and oneDNN's products wherever it is not."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_qwen2
from test_batching import QUESTIONS, run
from test_ragged import reference
from test_step_forward import STEPS, run_steps, tiny_llama
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)

from bot import decode_kernel, packing
from bot.batching import Batcher
from bot.decode_kernel import MOST_ROWS, DecodeKernel
from bot.device import cpu_has
from bot.engine import Engine
from bot.kv_cache import PrefixCache
from bot.packing import PackedLinear, decode_kernel_of, pack_linear_weights
from bot.quantize import linear_layers
from bot.ragged import Segment, StepLayout
from bot.runtime import placement
from bot.step_forward import LeanForward, ModelForward, step_forward

BF16 = pytest.param(
    torch.bfloat16,
    id="bfloat16",
    marks=pytest.mark.skipif(not cpu_has("avx512_bf16"), reason="a CPU without AVX512-BF16"),
)
F32 = pytest.param(
    torch.float32,
    id="float32",
    marks=pytest.mark.skipif(not cpu_has("avx2"), reason="a CPU without AVX2"),
)


@pytest.fixture(scope="module", params=[BF16, F32])
def kernel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The kernel for each dtype this CPU can run it in (whether or not it is the faster
    there: `wanted`), reading float32 weights as they are too, as on a CPU without AVX512
    (`reads_plain`): each of its paths, on any CPU."""
    built = decode_kernel.load(tmp_path_factory.mktemp("kernels"), request.param)
    if built is None:
        pytest.skip("no C compiler here to build the kernel with")
    built.reads_plain = True
    return built


@pytest.fixture
def bf16_kernel(kernel: DecodeKernel) -> DecodeKernel:
    if kernel.dtype != torch.bfloat16:
        pytest.skip("attention and a layer's small ops are the bfloat16 kernel's")
    return kernel


@pytest.fixture
def f32_kernel(kernel: DecodeKernel) -> DecodeKernel:
    if kernel.dtype != torch.float32:
        pytest.skip("halved copies are the float32 kernel's")
    return kernel


@pytest.fixture
def multiplying(kernel: DecodeKernel) -> DecodeKernel:
    """The kernel, where it computes products: on a CPU with AMX, oneDNN lays bfloat16
    weights out for its tiles, which the kernel does not read (`test_with_amx_...`)."""
    if not kernel.multiplies:
        pytest.skip("a CPU with AMX: the bfloat16 kernel runs a layer's small ops alone")
    return kernel


def packed_layer(out_features: int, in_features: int, *, bias: bool, dtype) -> PackedLinear:
    torch.manual_seed(out_features + in_features)
    linear = torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    return PackedLinear.of(linear)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", [(64, 96), (1152, 896), (896, 4864)], ids=str)
@pytest.mark.usefixtures("multiplying")
def test_the_kernel_gives_what_onednn_gives(kernel, shape, bias):
    """Every row count a decode step may have (in bfloat16, 8 at a time and the rest): the
    same sums in another order, so an output differs in its last bit now and then."""
    layer = packed_layer(*shape, bias=bias, dtype=kernel.dtype)
    assert layer.use_kernel(kernel)
    for rows in (1, 2, 3, 7, 8, 9, 17, MOST_ROWS[kernel.dtype]):
        x = torch.randn(1, rows, shape[1], dtype=kernel.dtype)
        ours = layer(x)
        expected = torch.ops.mkldnn._linear_pointwise(x, layer.packed, layer.bias, "none", [], "")
        assert ours.shape == expected.shape == (1, rows, shape[0])
        if kernel.dtype == torch.bfloat16:
            torch.testing.assert_close(ours, expected, rtol=2**-7, atol=2**-7)
            assert (ours != expected).float().mean() < 0.01
        else:
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", [(64, 96), (1152, 896), (896, 4864)], ids=str)
def test_a_float32_weight_of_bfloat16_values_is_read_from_a_bfloat16_copy(f32_kernel, shape, bias):
    """As a bfloat16 checkpoint's weights are, loaded in float32: the copy holds the same
    values in half the bytes, and the products are the float32 weight's to the bit (the
    same sums in the same order)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(shape[1], shape[0], bias=bias).to(torch.bfloat16).float()
    halved, whole = PackedLinear.of(linear, f32_kernel), PackedLinear.of(linear)
    assert halved.use_kernel(f32_kernel) and whole.use_kernel(f32_kernel)
    assert halved.halved is not None and whole.halved is None
    assert halved.weight_bytes == whole.weight_bytes // 2
    for rows in (1, 2, 3, MOST_ROWS[torch.float32]):
        x = torch.randn(1, rows, shape[1])
        assert torch.equal(halved(x), whole(x))


def test_a_weight_of_other_values_or_dtype_gets_no_copy(kernel):
    """A float32 weight with a value bfloat16 does not hold (a float32 fine-tune's), one of
    outputs not in 64s, and any bfloat16 weight, which is read as it is."""
    torch.manual_seed(0)
    exact = torch.nn.Linear(64, 128).to(torch.bfloat16).float()
    finer = torch.nn.Linear(64, 128)
    with torch.no_grad():
        finer.weight.copy_(exact.weight)
        finer.weight[5, 7] = 1 / 3  # between two bfloat16 values
    narrow = torch.nn.Linear(64, 40).to(torch.bfloat16).float()
    bfloat16 = torch.nn.Linear(64, 128, dtype=torch.bfloat16)
    for linear in (finer, narrow, bfloat16):
        assert PackedLinear.of(linear, kernel).halved is None
    expected = kernel.dtype == torch.float32
    assert (PackedLinear.of(exact, kernel).halved is not None) == expected


@pytest.mark.usefixtures("multiplying")
def test_a_decode_step_goes_to_the_kernel_and_a_prompts_chunk_to_onednn(kernel, monkeypatch):
    layer = packed_layer(128, 64, bias=True, dtype=kernel.dtype)
    assert layer.use_kernel(kernel)
    rows_computed: list[int] = []
    product = kernel.product
    monkeypatch.setattr(
        kernel,
        "product",
        lambda x, *rest, **named: rows_computed.append(x.shape[1]) or product(x, *rest, **named),
    )
    most = MOST_ROWS[kernel.dtype]
    for rows in (1, most, most + 1, 128):
        x = torch.randn(1, rows, 64, dtype=kernel.dtype)
        torch.testing.assert_close(layer(x), F.linear(x, *_plain(layer)), rtol=2**-6, atol=2**-6)
    assert rows_computed == [1, most]


@pytest.mark.usefixtures("multiplying")
def test_an_input_of_another_dtype_never_reaches_the_kernel(kernel, monkeypatch):
    """Under autocast, say: the kernel would read and write its own dtype's bytes, past
    the ends of the tensors; oneDNN takes it, or refuses it."""
    layer = packed_layer(128, 64, bias=False, dtype=kernel.dtype)
    assert layer.use_kernel(kernel)
    monkeypatch.setattr(kernel, "product", lambda *a: pytest.fail("the kernel took it"))
    other = torch.float32 if kernel.dtype == torch.bfloat16 else torch.bfloat16
    with contextlib.suppress(RuntimeError):  # oneDNN's refusal of mixed dtypes
        layer(torch.randn(1, 1, 64, dtype=other))


def _plain(layer: PackedLinear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight as `F.linear` takes it, rebuilt from its seed."""
    torch.manual_seed(layer.out_features + layer.in_features)
    linear = torch.nn.Linear(layer.in_features, layer.out_features, dtype=layer.dtype)
    return linear.weight, linear.bias


@pytest.mark.parametrize("shape", [(40, 96), (64, 95)], ids=["out-not-64s", "odd-in"])
def test_a_weight_oneDNN_lays_out_otherwise_stays_with_onednn(kernel, shape):
    layer = packed_layer(*shape, bias=False, dtype=kernel.dtype)
    assert not layer.use_kernel(kernel)
    assert layer.kernel is None


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_a_model_packed_with_the_kernel_steps_as_with_onednn(
    qwen_tokenizer, tmp_path, caplog, monkeypatch, dtype
):
    """The products whose weights it reads go to the kernel (those of outputs in 64s: a
    tied output layer of the tokenizer's 151,665 tokens stays with oneDNN), and a step's
    logits are oneDNN's within the dtype's rounding. (In each dtype this CPU can run the
    kernel in, wherever it is the faster: `wanted`. With AMX, no product goes to it.)"""
    monkeypatch.setattr(decode_kernel, "wanted", lambda wanted: wanted == dtype)
    shape = {"hidden_size": 64, "intermediate_size": 128}
    with_kernel, without = (tiny_qwen2(qwen_tokenizer, **shape).to(dtype) for _ in range(2))
    with caplog.at_level(logging.INFO, logger="bot.packing"):
        pack_linear_weights(with_kernel, kernels=tmp_path)
    pack_linear_weights(without)
    kernel = decode_kernel_of(with_kernel)
    if kernel is None:
        pytest.skip("no C compiler here to build the kernel with")
    products = [m for m in with_kernel.modules() if isinstance(m, PackedLinear)]
    served = [m.kernel is not None for m in products]
    if kernel.multiplies:  # in float32 with AVX512, none: their weights are float32's own
        expected = [m.out_features % 64 == 0 and kernel.reads_plain for m in products]
        assert served == expected and not served[-1]
        assert f"by threadbot's kernel: {sum(served)} of {len(products)}" in caplog.text
    else:
        assert not any(served) and "by oneDNN's kernels (AMX)" in caplog.text
    tokens = torch.tensor([[9707, 11, 1879]])
    with torch.no_grad():
        ours, expected = (model(tokens).logits for model in (with_kernel, without))
    within = 0.05 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(ours, expected, rtol=within, atol=within)


@pytest.mark.skipif(not cpu_has("avx2"), reason="a CPU without AVX2")
def test_a_float32_model_of_bfloat16_values_reads_halved_copies(
    qwen_tokenizer, tmp_path, caplog, monkeypatch
):
    """As a bfloat16 checkpoint (Qwen2.5's) loaded in float32: every product the kernel
    computes reads a bfloat16 copy of its weight, and a step's logits are the float32
    weights' own within float32's rounding."""
    monkeypatch.setattr(decode_kernel, "wanted", lambda wanted: wanted == torch.float32)
    shape = {"hidden_size": 64, "intermediate_size": 128}
    with_kernel, without = (
        tiny_qwen2(qwen_tokenizer, **shape).to(torch.bfloat16).float() for _ in range(2)
    )
    with caplog.at_level(logging.INFO, logger="bot.packing"):
        pack_linear_weights(with_kernel, kernels=tmp_path)
    pack_linear_weights(without)
    if decode_kernel_of(with_kernel) is None:
        pytest.skip("no C compiler here to build the kernel with")
    products = [m for m in with_kernel.modules() if isinstance(m, PackedLinear)]
    halved = [m.halved is not None for m in products]
    assert halved == [m.kernel is not None for m in products] and sum(halved) > 1
    assert f"{sum(halved)} from bfloat16 copies" in caplog.text
    engine = Engine(model=with_kernel, tokenizer=qwen_tokenizer, max_new_tokens=4)
    assert (
        placement(engine)
        == "float32 on cpu, decode steps by threadbot's kernel from bfloat16 copies"
    )
    tokens = torch.tensor([[9707, 11, 1879]])
    with torch.no_grad():
        ours, expected = (model(tokens).logits for model in (with_kernel, without))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not cpu_has("avx2"), reason="a CPU without AVX2")
@pytest.mark.parametrize(("spare", "made"), [(0, True), (-1, False)])
def test_the_bfloat16_copies_are_made_where_they_leave_as_much_memory_free(
    qwen_tokenizer, tmp_path, caplog, monkeypatch, spare, made
):
    """Copies take half the float32 linear weights' bytes again: on a machine with less
    free than twice that, the load makes none (and says so), rather than leave the batch
    no memory or run out of it."""
    monkeypatch.setattr(decode_kernel, "wanted", lambda wanted: wanted == torch.float32)
    model = tiny_qwen2(qwen_tokenizer, hidden_size=64, intermediate_size=128)
    model = model.to(torch.bfloat16).float()
    copies = sum(layer.weight.numel() * 2 for _, _, layer in linear_layers(model))
    monkeypatch.setattr(packing, "free_memory", lambda device: 2 * copies + spare)
    with caplog.at_level(logging.WARNING, logger="bot.packing"):
        pack_linear_weights(model, kernels=tmp_path)
    if decode_kernel_of(model) is None:
        pytest.skip("no C compiler here to build the kernel with")
    halved = sum(m.halved is not None for m in model.modules() if isinstance(m, PackedLinear))
    assert (halved > 1) == made
    assert ("No bfloat16 copies" in caplog.text) == (not made)


def test_the_kernel_serves_where_it_was_measured_faster(kernel):
    """bfloat16 on AVX512-BF16, its products without AMX alone; float32 on AVX2."""
    assert decode_kernel.wanted(torch.bfloat16) == cpu_has("avx512_bf16")
    assert decode_kernel.wanted(torch.float32) == cpu_has("avx2")
    assert not decode_kernel.wanted(torch.float16)
    bf16 = kernel.dtype == torch.bfloat16
    assert kernel.multiplies == (not bf16 or not cpu_has("amx_tile"))
    assert kernel.fuses == bf16


@pytest.mark.skipif(not cpu_has("avx512"), reason="a CPU without AVX512")
def test_with_avx512_the_float32_kernel_reads_bfloat16_copies_alone(tmp_path):
    """oneDNN's AVX512 kernels read a float32 weight faster than ours there; ours reads
    its bfloat16 copy faster than they read the weight."""
    kernel = decode_kernel.load(tmp_path, torch.float32)
    if kernel is None:
        pytest.skip("no C compiler here to build the kernel with")
    assert not kernel.reads_plain
    torch.manual_seed(0)
    plain, rounded = (torch.nn.Linear(896, 1152) for _ in range(2))
    rounded.to(torch.bfloat16).float()
    assert not PackedLinear.of(plain, kernel).use_kernel(kernel)
    assert PackedLinear.of(rounded, kernel).use_kernel(kernel)


@pytest.mark.skipif(not cpu_has("amx_tile"), reason="a CPU without AMX")
def test_with_amx_the_kernel_reads_no_bfloat16_weight_onednn_packed(bf16_kernel):
    """oneDNN lays bfloat16 weights out for AMX's tiles there: the products stay its own."""
    for shape in [(64, 96), (1152, 896), (896, 4864)]:
        assert not packed_layer(*shape, bias=False, dtype=torch.bfloat16).use_kernel(bf16_kernel)


def test_the_kernel_is_built_once_and_loaded_after(tmp_path, monkeypatch, caplog):
    """An earlier version's build in the folder goes once this one is built."""
    (tmp_path / "decode_kernel-0123456789abcdef.so").write_bytes(b"an earlier version")
    with caplog.at_level(logging.INFO, logger="bot.decode_kernel"):
        assert decode_kernel.load(tmp_path, torch.float32) is not None or pytest.skip(
            "no C compiler here"
        )
    [library] = tmp_path.iterdir()
    assert "Built the decode kernel" in caplog.text
    monkeypatch.setenv("CC", str(tmp_path / "no-compiler"))  # a second build would fail
    loaded = decode_kernel.load(tmp_path, torch.float32)
    assert loaded is not None and loaded.library == library


def test_without_a_compiler_onednn_serves_and_the_log_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with caplog.at_level(logging.INFO, logger="bot.decode_kernel"):
        assert decode_kernel.load(tmp_path / "kernels", torch.float32) is None
    assert "No C compiler (cc): decode steps use oneDNN's products" in caplog.text


def test_a_failed_build_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, caplog):
    compiler = tmp_path / "cc"
    said = "cc: error: unrecognized option -mavx512bf16"
    script = f"echo 'In file included from x.c' >&2\necho '{said}' >&2\nexit 1\n"
    compiler.write_text(f"#!/bin/sh\n{script}")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    with caplog.at_level(logging.INFO, logger="bot.decode_kernel"):
        assert decode_kernel.load(tmp_path / "kernels", torch.float32) is None
    [line] = caplog.messages
    assert line.endswith(f"the kernel did not build: {said}")
    assert not any((tmp_path / "kernels").iterdir())


def test_a_broken_library_is_built_again(tmp_path, caplog):
    """A file a disk's fault left broken: each start would otherwise do without it."""
    library = decode_kernel.library_path(tmp_path, torch.float32)
    library.write_bytes(b"\x7fELF cut short")
    with caplog.at_level(logging.WARNING, logger="bot.decode_kernel"):
        rebuilt = decode_kernel.load(tmp_path, torch.float32)
    assert "did not load" in caplog.text and "building it again" in caplog.text
    assert rebuilt is not None or pytest.skip("no C compiler here")
    assert rebuilt.library == library and library.stat().st_size > 1000


def test_a_kernel_built_beside_its_source_serves_without_a_compiler(tmp_path, monkeypatch):
    """As the Docker image ships it: built in its builder, whose runtime has no compiler."""
    shipped = tmp_path / "package"
    built = decode_kernel.load(shipped, torch.float32)
    if built is None:
        pytest.skip("no C compiler here")
    monkeypatch.setattr(decode_kernel, "PREBUILT", shipped)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    loaded = decode_kernel.load(tmp_path / "data" / "kernels", torch.float32)
    assert loaded is not None and loaded.library == built.library
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"), [(14, 2, 64), (9, 3, 64), (4, 4, 128)], ids=str
)
def test_decoding_rows_attend_through_the_kernel_as_through_float32(
    bf16_kernel, heads, kv_heads, dim
):
    """Qwen2.5-0.5B's heads, SmolLM2's, and no grouping: each decoding row against its own
    slot's keys, where they lie in the cache, its scores and sums in float32 (the output
    rounded to bfloat16 once); a prompt's chunk beside them as before."""
    kernel = bf16_kernel
    torch.manual_seed(0)
    decoding = [Segment(0, 9, 1), Segment(3, 250, 1), Segment(2, 12, 1), Segment(5, 30, 1)]
    decoding.append(Segment(4, 47, 1))  # keys in whole tiles of 16
    layout = StepLayout(decoding, [Segment(1, 0, 7)], torch.device("cpu"), kernel)
    keys, values = (torch.randn(2, 6, kv_heads, 300, dim) * 2).bfloat16().unbind()
    query = (torch.randn(1, heads, layout.tokens, dim) * 2).bfloat16()
    attended: list[int] = []
    attention = kernel.attention
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            kernel, "attention", lambda q, *a: attended.append(len(q)) or attention(q, *a)
        )
        got = layout.attention(query, keys, values, dim**-0.5)
    assert sorted(attended) == [1, 4]  # the long row's group, and the four short rows'
    rows = len(decoding)
    exact = reference(query.float(), keys.float(), values.float(), layout.segments)
    torch.testing.assert_close(
        got[:, :rows].float(), exact[:, :rows].bfloat16().float(), rtol=0, atol=2**-8
    )
    torch.testing.assert_close(got[:, rows:].float(), exact[:, rows:], rtol=2**-6, atol=2**-5)


@pytest.mark.parametrize("unserved", [None, "softcap", "float32", "strided values"])
def test_what_the_kernel_does_not_attend_goes_as_before(bf16_kernel, unserved):
    """Soft-capped scores (Gemma 2), a model not in bfloat16, and values it could not read
    where they lie; beside the case it takes (None)."""
    kernel = bf16_kernel
    dtype = torch.float32 if unserved == "float32" else torch.bfloat16
    keys, values = torch.randn(2, 2, 2, 64, 32, dtype=dtype).unbind()
    if unserved == "strided values":
        values = torch.randn(2, 2, 32, 64, dtype=dtype).transpose(-1, -2)
    query = torch.randn(1, 4, 1, 32, dtype=dtype)
    layout = StepLayout([Segment(1, 20, 1)], [], torch.device("cpu"), kernel)
    attended: list[int] = []
    attention = kernel.attention
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernel, "attention", lambda q, *a: attended.append(1) or attention(q, *a))
        softcap = 30.0 if unserved == "softcap" else None
        assert layout.attention(query, keys, values, 0.25, softcap).shape == (1, 1, 4, 32)
    assert attended == ([1] if unserved is None else [])


def mostly_equal(ours: torch.Tensor, expected: torch.Tensor) -> None:
    """bfloat16 values a float32 sum in another order may round otherwise now and then:
    within a rounding, and the same in all but a few."""
    torch.testing.assert_close(ours, expected, rtol=2**-7, atol=2**-7)
    assert (ours != expected).float().mean() < 0.01


@pytest.mark.parametrize(("rows", "dim"), [(1, 896), (3, 72), (40, 896)], ids=str)
def test_a_layer_s_norm_adds_and_normalizes_as_the_model_s(bf16_kernel, rows, dim):
    """Qwen2's RMSNorm of `hidden + delta`, the sum written over `hidden`: 40 rows on two
    threads, a width not in 16s, and a first row small enough that the epsilon counts."""
    torch.manual_seed(rows)
    norm = Qwen2RMSNorm(dim, eps=1e-6).to(torch.bfloat16)
    norm.weight.data = torch.randn(dim).bfloat16()
    hidden, delta = (torch.randn(2, 1, rows, dim) * 3).unbind()
    hidden[0, 0], delta[0, 0] = hidden[0, 0] * 1e-3, delta[0, 0] * 1e-3
    hidden, delta = hidden.bfloat16(), delta.bfloat16()
    summed, normed = bf16_kernel.add_norm(hidden.clone(), delta, norm.weight, 1e-6)
    assert torch.equal(summed, hidden + delta)
    mostly_equal(normed, norm(hidden + delta))
    alone, normed = bf16_kernel.add_norm(hidden.clone(), None, norm.weight, 1e-6)
    assert torch.equal(alone, hidden)
    mostly_equal(normed, norm(hidden))


@pytest.mark.parametrize(("tokens", "dim"), [(1, 64), (5, 128), (2, 40)], ids=str)
def test_a_layer_s_rotary_embedding_is_the_model_s_to_the_bit(bf16_kernel, tokens, dim):
    """The query's and key's heads rotated in place, as `apply_rotary_pos_emb` rotates
    them; the value's left as they are. Heads of 40: halves not in 16s."""
    torch.manual_seed(tokens)
    heads, kv_heads = 4, 2
    states = torch.randn(1, tokens, (heads + 2 * kv_heads) * dim).bfloat16()
    positions = torch.arange(7, 7 + tokens)[None]
    config = Qwen2Config(hidden_size=heads * dim, num_attention_heads=heads)
    cos, sin = Qwen2RotaryEmbedding(config)(states, positions)
    shape = (1, tokens, -1, dim)
    query, key, value = (
        part.view(shape).transpose(1, 2)
        for part in states.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    )
    expected = (*apply_rotary_pos_emb(query, key, cos, sin), value.clone())
    bf16_kernel.rotate(states, cos, sin, heads + kv_heads)
    for ours, theirs in zip((query, key, value), expected, strict=True):
        assert torch.equal(ours, theirs)


def test_a_layer_s_gate_is_the_model_s(bf16_kernel):
    """silu(gate) * up, from the two side by side, at every bfloat16 gate (infinities and
    NaNs among them) times a random up: as torch computes it, but that results below
    float32's smallest normal number come out 0 (the conversion to bfloat16 flushes them)."""
    torch.manual_seed(0)
    every = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gate, up = every.view(1, 16, -1), torch.randn(1, 16, 2**12).bfloat16()
    ours, expected = bf16_kernel.silu_mul(torch.cat([gate, up], -1)), F.silu(gate) * up
    assert torch.equal(ours.isnan(), expected.isnan())
    tiny = expected.float().abs() <= torch.finfo(torch.float32).tiny
    assert torch.all((ours[tiny] == 0) | (ours[tiny] == expected[tiny]))
    normal = ~tiny & ~expected.isnan()
    mostly_equal(ours[normal], expected[normal])


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_a_packed_model_steps_with_the_kernel_s_small_ops_as_with_its_own(
    bf16_kernel, qwen_tokenizer, architecture, monkeypatch
):
    """The lean forward hands a layer's norms, rotary embedding and gate to the kernel
    where its products are packed as one each: every step's logits and keys and values
    within bfloat16's rounding of the model's own forward."""
    model = tiny_qwen2(qwen_tokenizer) if architecture == "qwen2" else tiny_llama()
    model = model.to(torch.bfloat16)
    pack_linear_weights(model)
    fused = LeanForward(model, bf16_kernel)
    assert fused.kernel is bf16_kernel
    calls: list[str] = []
    for name in ("add_norm", "rotate", "silu_mul"):
        function = getattr(bf16_kernel, name)
        monkeypatch.setattr(
            bf16_kernel, name, lambda *a, f=function, n=name: calls.append(n) or f(*a)
        )
    fused_logits, fused_cache = run_steps(fused, model)
    own_logits, own_cache = run_steps(ModelForward(model), model)
    layers = model.config.num_hidden_layers
    assert calls.count("add_norm") == len(STEPS) * (2 * layers + 1)
    assert calls.count("rotate") == calls.count("silu_mul") == len(STEPS) * layers
    for ours, theirs in zip(fused_logits, own_logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.05)
    fused_kv, own_kv = fused_cache.keys + fused_cache.values, own_cache.keys + own_cache.values
    for ours, theirs in zip(fused_kv, own_kv, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.05)


def test_layers_the_kernel_cannot_read_keep_the_model_s_small_ops(bf16_kernel, qwen_tokenizer):
    """Products not packed as one (unpacked weights), or a gate other than SiLU."""
    plain = tiny_qwen2(qwen_tokenizer).to(torch.bfloat16)
    assert LeanForward(plain, bf16_kernel).kernel is None
    gelu = tiny_qwen2(qwen_tokenizer, hidden_act="gelu").to(torch.bfloat16)
    pack_linear_weights(gelu)
    assert LeanForward(gelu, bf16_kernel).kernel is None
    assert step_forward(gelu, bf16_kernel).kernel is None


@pytest.mark.skipif(not cpu_has("avx512_bf16"), reason="a CPU without AVX512-BF16")
def test_a_batcher_s_every_step_goes_through_the_kernel_s_small_ops_and_attention(
    qwen_tokenizer, tmp_path, monkeypatch
):
    """A model packed as the service loads it (the kernel built into `kernels`), its heads
    32 wide: every step's small ops, and its decoding rows' attention, AMX or not."""
    model = tiny_qwen2(qwen_tokenizer, hidden_size=128, intermediate_size=256)
    model = model.to(torch.bfloat16)
    pack_linear_weights(model, kernels=tmp_path)
    kernel = decode_kernel_of(model)
    if kernel is None:
        pytest.skip("no C compiler here to build the kernel with")
    steps, rotated, attended = [], [], []
    rotate, attention = kernel.rotate, kernel.attention
    monkeypatch.setattr(kernel, "rotate", lambda *a: rotated.append(1) or rotate(*a))
    monkeypatch.setattr(kernel, "attention", lambda *a: attended.append(1) or attention(*a))
    engine = Engine(model=model, tokenizer=qwen_tokenizer, max_new_tokens=8)
    batcher = Batcher(engine=engine, max_batch=4, step_tokens=16, prefix_cache=PrefixCache(0))
    step = batcher.step
    monkeypatch.setattr(batcher, "step", lambda: steps.append(1) or step())
    answers = run(batcher, {0: ("a", QUESTIONS[0]), 1: ("b", QUESTIONS[1])})
    assert all(answers.values()) and len(steps) >= 8
    layers = model.config.num_hidden_layers
    assert len(rotated) == len(steps) * layers
    assert len(attended) >= 7 * layers and len(attended) % layers == 0  # the decode steps
