"""`QUANTIZE=int8`: every linear layer's weight, and the token embeddings, stored as int8
with one scale per row (symmetric, weight-only: activations stay in the model's dtype).

A decode step reads every weight once, so on a CPU it is bound by memory bandwidth: int8
weights are half the bytes of bfloat16 and a quarter of float32. The answers change a
little (greedy answers part from the unquantized model's after a while), which is why
this is a setting and not a default.

Why a layer of our own and not torchao's `quantize_(model, Int8WeightOnlyConfig())`:
torchao 0.18 installs beside torch 2.13 (no dependencies) and works on CPU, but its eager
weight-only linear converts the whole int8 weight to the activation dtype on every call,
then multiplies: more bytes moved than the unquantized model's (it counts on
`torch.compile` to fuse the two). torch's own `_weight_int8pack_mm` multiplies by the int8
weight in one CPU kernel. A decode step of Qwen2.5-0.5B's shape, measured on one core of
an AMD EPYC with AVX512-BF16 (ms; `benchmarks/quantization.py` measures whole answers):

| rows | bf16 | int8 (bf16), ours | torchao | fp32 | int8 (fp32), ours | torchao |
|---|---|---|---|---|---|---|
| 1 | 177 | 95 | 358 | 201 | 98 | 577 |
| 8 | 208 | 219 | 451 | 417 | 216 | 838 |
| 16 | 257 | 360 | 531 | 502 | 349 | 960 |

Those bf16 and fp32 columns are unpacked weights. Packed as the service now loads them
(`bot.packing`), they run much faster in a batch: at 2 threads, bf16 decodes 8 rows at 85
tok/s against int8's 62, while a lone row is still faster in int8 (18.4 against 14.3).

Installed, torchao is also imported by transformers with every model (two warnings about
its CUDA libraries at each start on CPU). The kernel's limits, from ATen's
`int8mm_kernel.cpp`, decide how it is used:

- Only bfloat16 rows have a vectorised x86 path (AVX512 or AVX2); float32 and float16
  fall to a scalar loop, so other models' rows are rounded to bfloat16 for it.
- It reads the whole weight again for every 4 rows, so it pays for the few rows of a
  decode step (`FUSED_MAX_ROWS`). More rows, a prefill chunk's, convert the weight once
  and use the ordinary matrix product.
- Its vector loads are aligned: the input features must be a multiple of 16, and the
  rows must start on a 32-byte boundary (a view of a prompt's last position may not), or
  the process crashes; such rows are copied first.

On CUDA torch's kernel is one thread per output, slower than cuBLAS, so there (and under
`torch.compile`, whose inductor fuses the convert-and-multiply form into an int8 kernel
of its own) every call converts and multiplies, as torchao does.
"""

from __future__ import annotations

import logging
from itertools import chain
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bot.device import return_freed_memory

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

QUANTIZED_DTYPE = torch.int8
LARGEST = 127  # symmetric: -127..127, so a row's scale is its largest magnitude / 127
SCALE_DTYPE = torch.bfloat16  # the fused kernel takes bfloat16 scales with bfloat16 rows
KERNEL_DTYPE = torch.bfloat16
FUSED_MAX_ROWS = 16
"""Rows up to which the kernel beats converting the weight: measured as above, the two
cross between 16 and 24 rows in bfloat16."""
KERNEL_FEATURES_STEP = 16  # the kernel reads 16 input features at a time
KERNEL_ALIGNMENT = 32  # bytes, for its aligned vector loads of the rows


class Int8Linear(nn.Module):
    """An `nn.Linear` whose weight is int8 (`qweight`, out x in) times a per-row `scale`.

    The weight is a buffer named `qweight`, not `weight`, so that nothing in transformers
    (tying the output layer to the embeddings, say) takes it for a float weight.
    """

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.fusable = self.in_features % KERNEL_FEATURES_STEP == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(*quantized_rows(linear.weight), bias)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if self._takes_the_kernel(rows):
            product = torch.ops.aten._weight_int8pack_mm(
                _aligned(rows.to(KERNEL_DTYPE)), self.qweight, self.scale
            ).to(x.dtype)
        else:
            product = F.linear(rows, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            product = product + self.bias
        return product.reshape(*x.shape[:-1], self.out_features)

    def _takes_the_kernel(self, rows: Tensor) -> bool:
        return (
            self.fusable
            and rows.device.type == "cpu"
            and rows.shape[0] <= FUSED_MAX_ROWS
            and not torch.compiler.is_compiling()
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """Token embeddings as int8 rows times a per-row scale, looked up and converted to
    `dtype`, then times the model's own `embed_scale` where it has one (Gemma's lookup
    multiplies by the square root of its width). A model whose output layer is tied to
    its embeddings shares these tensors with that layer's `Int8Linear`, as it shared the
    float weight."""

    def __init__(
        self, qweight: Tensor, scale: Tensor, dtype: torch.dtype, embed_scale: Tensor | None
    ) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("embed_scale", embed_scale, persistent=False)
        self.dtype = dtype

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.qweight).to(self.dtype)
        rows = rows * self.scale[ids].unsqueeze(-1).to(self.dtype)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(self.dtype)

    def extra_repr(self) -> str:
        tokens, width = self.qweight.shape
        return f"{tokens}, {width}, int8"


def quantized_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """`weight` (rows x columns) as int8 and one scale per row: round(weight / scale)."""
    weight = weight.detach().float()
    # The scale is rounded to its stored dtype before dividing by it, so that every path
    # multiplies back by exactly the scale the weight was divided by.
    tiny = torch.finfo(SCALE_DTYPE).tiny  # an all-zero row still gets a usable scale
    scale = (weight.abs().amax(dim=1) / LARGEST).clamp(min=tiny).to(SCALE_DTYPE)
    qweight = (weight / scale.float()[:, None]).round().clamp(-LARGEST, LARGEST)
    return qweight.to(QUANTIZED_DTYPE), scale


def _aligned(rows: Tensor) -> Tensor:
    """`rows`, or a copy where they do not start on the kernel's boundary: a fresh tensor
    from torch's CPU allocator is 64-byte aligned."""
    if rows.is_contiguous() and rows.data_ptr() % KERNEL_ALIGNMENT == 0:
        return rows
    return rows.clone(memory_format=torch.contiguous_format)


def quantize_int8(model: PreTrainedModel) -> None:
    """Replace, in place, every `nn.Linear` of `model` (the output layer too) by an
    `Int8Linear`, and its token embeddings by an `Int8Embedding`: tied to the output
    layer's int8 tensors where the float model tied them, else of their own."""
    quantized, tied = _quantize(model)
    return_freed_memory()  # the float weights', whose last references ended with `_quantize`
    logger.info(
        "Quantized %d linear layers and the embeddings (%s) to int8",
        quantized,
        "tied to the output layer" if tied else "their own",
    )


def _quantize(model: PreTrainedModel) -> tuple[int, bool]:
    """`quantize_int8`'s work: how many linear layers, and whether the embeddings are tied."""
    embeddings = model.get_input_embeddings()
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embeddings.weight
    layers = linear_layers(model)
    for parent, name, child in layers:
        setattr(parent, name, Int8Linear.from_linear(child))
    if tied:
        output = model.get_output_embeddings()
        table = output.qweight, output.scale
    else:
        table = quantized_rows(embeddings.weight)
    model.set_input_embeddings(
        Int8Embedding(
            *table,
            dtype=embeddings.weight.dtype,
            embed_scale=getattr(embeddings, "embed_scale", None),
        )
    )
    return len(layers), tied


def linear_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Every linear layer of `model`, as (its parent, its name there, the layer): what a
    replacement of it needs."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(module, Int8Linear | Int8Embedding) for module in model.modules())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: parameters and buffers (the int8 weights
    are buffers), each shared tensor once."""
    tensors = {id(t): t for t in chain(model.parameters(), model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
