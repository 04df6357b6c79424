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

In bfloat16, layers that read the same input one after another (attention's query, key
and value; the MLP's gate and up) are packed as one product, computed once
(`SharedProduct`): fewer, wider products stream the weights faster. Measured on the same
kind of machine (another session), Qwen2.5-0.5B's 24 layers of those five products at 1,
4 and 16 rows took 0.86, 0.83 and 0.89x the time in bfloat16, and our queue served a lone
stream 1.04-1.19x as fast (three rounds, alternating) and 8 at once 0.93-1.04x; in
float32, 1.01, 0.97 and 0.94x the time, and 0.95-0.97x a lone stream's speed, so float32
layers are packed one by one.

In float32 with our decode kernel, a weight whose values are all bfloat16 values (a
bfloat16 checkpoint's) also gets a bfloat16 copy, which decode steps read instead: half the
bytes, the same products (`bot.decode_kernel`, `DecodeKernel.halved`).

Once packed, a model's products are timed at a few row counts, and a row or two may be
computed as more where oneDNN's kernels are faster so (`bot.row_padding`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bot import decode_kernel
from bot.decode_kernel import DecodeKernel
from bot.device import free_memory, return_freed_memory
from bot.quantize import linear_layers
from bot.row_padding import pad_small_products

logger = logging.getLogger(__name__)

KERNEL = "threadbot_kernel"  # the attribute that holds a packed model's `DecodeKernel`


class PackedLinear(nn.Module):
    """A linear layer whose weight is in oneDNN's layout (`packed`, an opaque tensor)."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None, kernel: DecodeKernel | None = None
    ) -> None:
        """`kernel`: ours, which may read a bfloat16 copy of a float32 weight instead
        (`DecodeKernel.halved`), made here while the plain weight is at hand."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        # Neither in the state dict: an opaque tensor has no storage to save or copy, and
        # the copy is the weight's own values.
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight), False)
        self.register_buffer("halved", kernel and kernel.halved(weight), False)
        self.register_buffer("bias", bias)
        self.computed_rows: dict[int, int] = {}  # see `bot.row_padding`
        self.kernel: DecodeKernel | None = None  # see `use_kernel`
        self._address = 0

    @classmethod
    def of(cls, linear: nn.Linear, kernel: DecodeKernel | None = None) -> PackedLinear:
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(linear.weight.detach(), bias, kernel)

    @property
    def weight_bytes(self) -> int:
        """The bytes of its weight that a decode step reads: its halved copy's, if any."""
        if self.halved is not None:
            return self.halved.nbytes
        return self.out_features * self.in_features * self.dtype.itemsize

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        computed = self.computed_rows.get(rows, rows)
        if computed == rows:
            return self.compute(x)
        padded = F.pad(x.reshape(rows, self.in_features), (0, 0, 0, computed - rows))
        return self.compute(padded)[:rows].reshape(*x.shape[:-1], self.out_features)

    def compute(self, x: Tensor) -> Tensor:
        """The product at `x`'s own rows: a decode step's by our kernel where it has one,
        else oneDNN's."""
        kernel = self.kernel
        if kernel and x.dtype == kernel.dtype and x.numel() <= kernel.most_rows * self.in_features:
            halved = self.halved is not None
            return kernel.product(x, self._address, self.bias, self.out_features, halved=halved)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def use_kernel(self, kernel: DecodeKernel) -> bool:
        """Have `kernel` compute decode steps' products, where it reads this weight (or its
        halved copy, dropped where it does not) faster than oneDNN (`reads_plain`)."""
        if self.halved is None and not kernel.reads_plain:
            return False
        if not kernel.reads(self.packed, self.bias, self.out_features, self.halved):
            self.halved = None
            return False
        # Made once and never moved (a model is not moved once packed).
        read = self.halved
        self._address = torch.ops.mkldnn.data_ptr(self.packed) if read is None else read.data_ptr()
        self.kernel = kernel
        return True

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


class SharedProduct(nn.Module):
    """Linear layers that read the same input, as one packed product computed once per
    input: each layer becomes a `PackedPart`, which returns its own columns of it."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        weight = torch.cat([linear.weight.detach() for linear in linears])
        biases = [linear.bias for linear in linears]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self.product = PackedLinear(weight, bias)
        self.sizes = [linear.out_features for linear in linears]
        self._input: Tensor | None = None
        self._outputs: tuple[Tensor, ...] = ()

    def output(self, index: int, x: Tensor) -> Tensor:
        if x is not self._input:
            self._input, self._outputs = x, self.product(x).split(self.sizes, dim=-1)
        output = self._outputs[index]
        if index == len(self.sizes) - 1:  # its last reader: nothing is kept between steps
            self._input, self._outputs = None, ()
        return output


class PackedPart(nn.Module):
    """One layer of a `SharedProduct`, where the layer was."""

    def __init__(self, shared: SharedProduct, index: int) -> None:
        super().__init__()
        self.__dict__["shared"] = shared  # not a child here: its module holds it, once
        self.index = index
        self.in_features, self.out_features = shared.product.in_features, shared.sizes[index]

    def forward(self, x: Tensor) -> Tensor:
        return self.shared.output(self.index, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, shared"


# Modules whose forward calls these layers one after another on one input tensor, as
# transformers writes them; another model's layers are packed one by one.
SIBLINGS = {
    "Qwen2Attention": ("q_proj", "k_proj", "v_proj"),
    "LlamaAttention": ("q_proj", "k_proj", "v_proj"),
    "Qwen2MLP": ("gate_proj", "up_proj"),
    "LlamaMLP": ("gate_proj", "up_proj"),
}


def packable(model: nn.Module) -> bool:
    """On the CPU, in float32, or in bfloat16 where oneDNN has the instructions for it
    (as its first weight is: a model's weights share a device and a dtype)."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


def pack_linear_weights(model: nn.Module, *, kernels: Path | None = None) -> int:
    """Replace, in place, every `nn.Linear` of a `packable` model by a `PackedLinear`, or
    in bfloat16 a `PackedPart` of its siblings' `SharedProduct`; how many (0: not
    packable, left as it is). With `kernels` (a folder), decode steps' products, and a
    layer's small ops in bfloat16, go to our kernel where it is faster
    (`bot.decode_kernel`), built there once."""
    if not packable(model):
        return 0
    dtype = next(model.parameters()).dtype
    wanted = kernels is not None and decode_kernel.wanted(dtype)
    kernel = decode_kernel.load(kernels, dtype) if wanted else None
    shared = _share_siblings(model) if dtype == torch.bfloat16 else 0
    copies = kernel is not None and copies_fit(model, free_memory(torch.device("cpu")))
    # The plain weights' last references end with these.
    packed = _pack_each(model, kernel if copies else None)
    return_freed_memory()
    products = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if kernel is not None:
        _use_kernel(model, products, kernel)
    pad_small_products(products)
    logger.info("Packed %d linear layers' weights for oneDNN (%d sharing a product)",
                packed + shared, shared)  # fmt: skip
    return packed + shared


def copies_fit(model: nn.Module, free_bytes: int) -> bool:
    """Whether a float32 model's linear layers may get bfloat16 copies (`DecodeKernel.halved`,
    half their bytes, at most): where they leave at least as much memory free as they take.
    They only speed decode steps up, so they must not take the memory the batch's KV cache
    needs (`MAX_BATCH_TOKENS`' default is read after them), nor run the load out of it."""
    weights = [layer.weight for _, _, layer in linear_layers(model)]
    copies = sum(w.numel() * 2 for w in weights if w.dtype == torch.float32)
    if copies == 0 or free_bytes - copies >= copies:
        return True
    logger.warning("No bfloat16 copies of the weights for decode steps: they would take "
                   "%.1f GiB of the %.1f GiB free", copies / 2**30, free_bytes / 2**30)  # fmt: skip
    return False


def decode_kernel_of(model: nn.Module) -> DecodeKernel | None:
    """Our decode kernel, where packing loaded it for the model."""
    return getattr(model, KERNEL, None)


def kernel_products(model: nn.Module) -> int:
    """How many of the model's packed products decode steps compute with our kernel."""
    return sum(isinstance(m, PackedLinear) and m.kernel is not None for m in model.modules())


def halved_bytes_saved(model: nn.Module) -> int:
    """The bytes of weights that a decode step no longer reads, its products reading
    halved copies of them (`DecodeKernel.halved`)."""
    products = [m for m in model.modules() if isinstance(m, PackedLinear)]
    # A copy is half its float32 weight: it saves its own size.
    return sum(p.weight_bytes for p in products if p.halved is not None)


def _use_kernel(model: nn.Module, products: list[PackedLinear], kernel: DecodeKernel) -> None:
    setattr(model, KERNEL, kernel)  # for the steps' forward and attention (`Batcher`)
    if kernel.multiplies:
        served = sum(product.use_kernel(kernel) for product in products)
        halved = sum(product.halved is not None for product in products)
        copies = f", {halved} from bfloat16 copies" if halved else ""
        logger.info("Decode steps' products by threadbot's kernel: %d of %d%s", served,
                    len(products), copies)  # fmt: skip
    else:
        logger.info("Decode steps' products by oneDNN's kernels (AMX), their attention and "
                    "a layer's small ops by threadbot's")  # fmt: skip


def _share_siblings(model: nn.Module) -> int:
    shared = 0
    for module in list(model.modules()):
        names = SIBLINGS.get(type(module).__name__)
        if names is None or not type(module).__module__.startswith("transformers."):
            continue
        linears = [getattr(module, name, None) for name in names]
        # Exactly `nn.Linear`: a subclass may compute otherwise than its weight says.
        if not all(type(linear) is nn.Linear for linear in linears):
            continue
        if len({linear.bias is None for linear in linears}) > 1:
            continue
        product = SharedProduct(linears)
        module.add_module("shared_" + "_".join(n.removesuffix("_proj") for n in names), product)
        for index, name in enumerate(names):
            setattr(module, name, PackedPart(product, index))
        shared += len(names)
    return shared


def _pack_each(model: nn.Module, copier: DecodeKernel | None) -> int:
    # Exactly `nn.Linear`: a subclass may compute otherwise than its weight says.
    layers = [layer for layer in linear_layers(model) if type(layer[2]) is nn.Linear]
    for parent, name, child in layers:
        setattr(parent, name, PackedLinear.of(child, copier))
    return len(layers)
