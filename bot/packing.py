"""Linear layers' weights packed once, at load, into oneDNN's blocked layout (CPU).

A CPU decode step is a handful of rows times every weight of the model, so its speed is
how fast the matrix products stream the weights. `F.linear` takes a plain `[out, in]`
weight; reordered once into the blocked layout that oneDNN's kernels read, the same
products stream it much faster. Measured on 2 cores of an AMD EPYC with
AVX512-BF16, the 24 layers of Qwen2.5-0.5B's shape (the weights from memory, not cache):

| rows | bf16 plain | bf16 packed | fp32 plain | fp32 packed |
|---|---|---|---|---|
| 1 | 60 ms | 42 (1.43x) | 122 | 70 (1.75x) |
| 4 | 62 | 32 (1.90x) | 244 | 104 (2.34x) |
| 16 | 84 | 56 (1.51x) | 226 | 156 (1.45x) |
| 128 | 289 | 337 (0.86x) | 851 | 609 (1.40x) |

In bfloat16 the packed product is bit-identical to `F.linear` (both are oneDNN's kernel);
in float32 `F.linear` is MKL's, and the two differ in the last bits. A 128-row prefill
chunk is a little slower packed in bfloat16; decode steps, which are most steps, gain
far more. Float16, and bfloat16 without the CPU instructions for it, stay as they are.

The weight is kept packed only (an opaque tensor that nothing else can read), so a model
whose output layer is tied to its token embeddings keeps the embeddings as they were and
gets a packed copy for the output layer: Qwen2.5-0.5B's 136 M-parameter table twice.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging

import torch
from torch import Tensor, nn

from bot.quantize import linear_layers

logger = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    """An `nn.Linear` whose weight is in oneDNN's layout (`packed`, an opaque tensor)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        # Not in the state dict: an opaque tensor has no storage to save or copy.
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight), False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def packable(model: nn.Module) -> bool:
    """On the CPU, in float32, or in bfloat16 where oneDNN has the instructions for it
    (as its first weight is: a model's weights share a device and a dtype)."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


def pack_linear_weights(model: nn.Module) -> int:
    """Replace, in place, every `nn.Linear` of a `packable` model by a `PackedLinear`; how
    many (0: not packable, left as it is)."""
    if not packable(model):
        return 0
    packed = _pack_each(model)  # the plain weights' last references end with it
    return_freed_memory()
    logger.info("Packed %d linear layers' weights for oneDNN", packed)
    return packed


def _pack_each(model: nn.Module) -> int:
    # Exactly `nn.Linear`: a subclass may compute otherwise than its weight says.
    layers = [layer for layer in linear_layers(model) if type(layer[2]) is nn.Linear]
    for parent, name, child in layers:
        setattr(parent, name, PackedLinear(child))
    return len(layers)


def return_freed_memory() -> None:
    """Hand the plain weights' freed memory back to the system. glibc keeps freed heap
    memory for reuse, so the process would go on holding both copies' worth (measured:
    2.18 GiB resident for Qwen2.5-0.5B in bfloat16, 1.52 once returned), and the memory
    left for the batch (`MAX_BATCH_TOKENS`' default) would look that much smaller.
    Elsewhere (macOS, musl) there is no `malloc_trim`, and nothing to do here."""
    gc.collect()
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)
