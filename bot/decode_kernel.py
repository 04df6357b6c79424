"""Decode steps by our own kernels (`decode_kernel.c`): the matrix products, reading the
weights oneDNN packed faster than oneDNN's own kernels do, and (in bfloat16) the decoding
rows' attention and every step's small ops of a layer.

A decode step is a few rows times every weight of the model, so its speed is how fast the
products read the weights from memory. On 2 cores of an AMD EPYC with AVX512-BF16 (no AMX),
oneDNN's bfloat16 kernels read Qwen2.5-0.5B's packed weights at 20-29 GB/s for 1 to 8 rows,
while the memory gives 35-58 GB/s to a plain sum. Read in the order they lie, each line of 64
outputs' weights multiplied into every row at once, they stream at up to 50 GB/s: the 24
layers' and the output layer's products took 0.52-0.73x oneDNN's time at 1 to 8 rows, and
0.80-0.91x at 12 to 32 (alternating, medians of 8 rounds; prompts' chunks of many rows stay
oneDNN's). On a CPU with AMX, oneDNN's kernels already read the weights at the memory's
speed (21 of 23 GB/s measured), and its tiles multiply many rows faster, so it keeps them
(it packs bfloat16 weights for those tiles too, a layout the kernel does not read); the
kernel's attention and small ops (below) serve there all the same.

In float32 (on CPUs without AVX512-BF16, where `DTYPE=auto` picks it), oneDNN packs a
weight as blocks of 64 outputs too, each `in` lines of 64 outputs, and a plain C loop built
for AVX2 streams it the same way, each line read once for up to 4 rows. Measured on an AMD
EPYC with AVX512, Qwen2.5-0.5B's 24 layers' and output layer's products (no AVX2-only
machine was at hand): with oneDNN held to AVX2's kernels (`ONEDNN_MAX_CPU_ISA=AVX2`), they
took 0.60, 0.58, 0.61, 0.71 and 1.03x oneDNN's time at 1, 2, 4, 8 and 16 rows (so up to 8
go to it); with AVX512's, 0.69, 0.61, 0.77 and 1.03x at 1, 2, 4 and 8 (a line read for
two rows at a time had taken 1.06x at 4). On 2 cores of an Intel Xeon (AVX512-BF16 and
AMX), though, where oneDNN's float32 kernels are the AVX512 ones of the Xeons that
`DTYPE=auto` gives float32 (Skylake to Ice Lake, without AVX512-BF16), they took 1.09,
0.98, 1.19 and 1.45x its time at 1, 2, 4 and 8 rows (alternating, medians of 30 rounds),
and whole streams 1.01x (alone) and 0.94x (4 at once) as fast: so on a CPU with AVX512 the
kernel reads no float32 weight as it is (`reads_plain`), only the bfloat16 copies below.

Most models are published in bfloat16 (Qwen2.5 is), so loaded in float32 their weights
hold bfloat16 values: half of each weight's bytes are zeros. For such a weight (`halved`)
the kernel reads a bfloat16 copy in the same layout, each line widened exactly, once, for
up to 4 rows: the float32 products to the bit, from half the bytes. The same products took
0.57, 0.54, 0.59, 0.78 and 0.89x the float32 reading's time at 1, 2, 4, 8 and 16 rows
(held to AVX2: 0.34, 0.32, 0.36, 0.55 and 0.91x oneDNN's; with AVX512's kernels 0.35,
0.33, 0.57 and 0.80x at 1, 2, 4 and 8). Whole float32 streams of 64 tokens (three rounds,
alternating, medians), held to AVX2: a lone stream 1.51x as fast as with the float32
reading and 2.16x as with oneDNN's products, 4 at once 1.23 and 1.69x; with AVX512's,
1.32 and 1.64x alone, 1.17 and 1.33x for 4 (the float32 reading itself 1.24 and 1.14x
oneDNN's). On the Intel Xeon, against oneDNN's AVX512 kernels: products 0.63, 0.65, 0.97
and 1.03x its time at 1, 2, 4 and 8 rows, streams 1.44x alone and 1.04x for 4. The copies
cost memory: half the linear layers' float32 bytes again (0.94 GB
for Qwen2.5-0.5B), since prompts' chunks stay oneDNN's, on the float32 weights: they are
made only where they leave as much memory free as they take (`bot.packing.copies_fit`).

The decoding rows' attention (`attention`, as `bot.ragged`'s steps call it) reads each
row's keys and values where they lie in the slot cache, with no copy, its scores exact
products of bfloat16 summed in float32 (`vdpbf16ps`), 16 keys at a time, and its softmax
and sums in float32, as SDPA's and our float32 matmuls' are. Qwen2.5-0.5B's 24 layers took
0.55, 1.6 and 5.9 ms at 1, 4 and 16 rows of ~270 keys against 1.9, 4.4 and 12.3 ms by the
matmuls, and whole decode steps 0.96, 0.89 and 0.87x the time (alternating, medians of 8
rounds). On 2 cores of an Intel Xeon with AMX, where SDPA attends faster than those
matmuls, the kernel took 0.50, 0.46 and 0.46x SDPA's time at 1, 4 and 16 rows of 250-300
keys, 0.70x for a lone row of 4,000 and 0.56x for 15 short rows beside one of 3,900 (24
layers, alternating, medians of 20-30 rounds). It serves bfloat16 heads of a size in 32s;
soft-capped scores (Gemma 2) do not.

A layer's small ops (`add_norm`, `rotate`, `silu_mul`, as `bot.step_forward`'s lean forward
calls them, in every step): the residual sum and RMS norm, the query's and key's rotary
embedding, and the MLP's SiLU gate, one call each where the model's own forward runs 8, 16
and 2 torch ops, each a dispatch of a few microseconds on 2 cores against well under one for
a few rows' arithmetic. They compute what those ops do, rounding to bfloat16 where they
round: the rotary embedding to the bit, the norm and the gate but for the order of the
norm's float32 sum and e^x's last bits (an output differs in its last bit now and then, as
a product's does), so a greedy answer may part from the ops' own where two tokens are
within a rounding (on the bundled SmolLM2, 5 of 6 answers alike through 64 tokens, the
sixth from its first). Measured with Qwen2.5-0.5B's shape on 2 cores of an Intel Xeon with
AMX (a busy host: a lone step 87-110 ms), 300 steps alternating with the ops' own in one
process: decode steps of 1, 4 and 16 rows took 0.93-0.95, 0.92-0.93 and 0.92x the time
(the first decile to the median), and the prompts' chunks before them 0.72-0.89x. On 2
cores of an AMD EPYC with AVX512-BF16, the kernel's products and attention beside them,
150 steps each way: 0.91-0.93, 0.90-0.91 and 0.90-0.92x at 1, 4 and 16 rows, the prompts'
chunks 0.92-0.94x. They serve on every CPU with AVX512-BF16; with AMX, they and the
attention are what the kernel serves.

The kernels are C, built once at load with the machine's C compiler (`CC`, else `cc`) into
the folder given (DATA_DIR/kernels), one build per dtype (`BUILDS`: AVX512-BF16's
instructions, or AVX2's), each named by a hash of its source and flags, and called
through ctypes, which lets go of the GIL; their OpenMP threads are torch's (the same
`libgomp`, as many as torch uses; with gcc, as `cc` is on Linux: clang's `-fopenmp` would
bring LLVM's runtime beside it). No compiler, or a build that fails: oneDNN's products
and torch's attention, as before, and one line in the log. Each packed product is checked
against oneDNN's own before it is handed to the kernel (`reads`): its size, and three rows'
product.

The sums are the same in float32 as oneDNN's, in another order: a product's outputs differ
from oneDNN's in the last bit of bfloat16 now and then (0-0.2% of them, measured), as a
row's do between a lone step and a batch.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from bot.device import cpu_has
from bot.loading import first_line

logger = logging.getLogger(__name__)

POINTER = ctypes.c_void_p

SOURCE = Path(__file__).with_name("decode_kernel.c")
PREBUILT = SOURCE.parent
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp")
BUILDS = {
    torch.bfloat16: ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"),
    torch.float32: ("-mavx2", "-mfma"),
}
"""Each dtype's build: its instructions (decode_kernel.c builds what they allow)."""
BUILD_TIMEOUT_S = 120
MOST_DIM = 256  # the largest attention head `decode_attention` takes (decode_kernel.c)
MOST_ROWS = {torch.bfloat16: 32, torch.float32: 8}
"""The most rows a product is computed by the kernel, where it was measured faster: in
bfloat16 every decode step of `MAX_BATCH`'s default (more is a prompt's chunk, which
oneDNN's blocked products serve better); in float32, up to 8 (16 took 1.03-1.11x
oneDNN's)."""


def wanted(dtype: torch.dtype) -> bool:
    """Whether this CPU is one where the kernel for `dtype` was measured faster (above): in
    bfloat16, any with AVX512-BF16 (with AMX, for its attention and a layer's small ops);
    in float32, any with AVX2."""
    if dtype == torch.bfloat16:
        return cpu_has("avx512_bf16")
    return dtype == torch.float32 and cpu_has("avx2")


class DecodeKernel:
    """The kernel built for `dtype`: `product` computes a few rows against a packed
    weight; in bfloat16 `attention` attends decoding rows, and `add_norm`, `rotate` and
    `silu_mul` run a layer's small ops, in every step."""

    def __init__(self, path: Path, dtype: torch.dtype) -> None:
        self.library, self.dtype, self.most_rows = path, dtype, MOST_ROWS[dtype]
        library = ctypes.CDLL(str(path))
        bfloat16 = dtype == torch.bfloat16
        # float32's takes one more argument: whether the weight is a `halved` copy.
        self._product = _function(
            library.decode_product if bfloat16 else library.decode_product_f32,
            [POINTER] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int] * (1 if bfloat16 else 2),
        )
        # Where AMX multiplies, oneDNN's products are the faster (and it lays bfloat16
        # weights out for AMX's tiles): there the kernel attends and runs the layers' small
        # ops, and leaves the products to oneDNN.
        self.multiplies = not (bfloat16 and cpu_has("amx_tile"))
        # Float32 weights as they are: with AVX512, oneDNN's kernels read them the faster
        # (above), and ours reads their bfloat16 copies alone.
        self.reads_plain = bfloat16 or not cpu_has("avx512")
        self._attention = self._add_norm = self._rotary = self._silu_mul = None
        if bfloat16:
            self._attention = _function(
                library.decode_attention,
                [POINTER] * 6 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int],
                ctypes.c_int,
            )
            self._add_norm = _function(
                library.layer_add_norm,
                [POINTER] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int],
            )
            self._rotary = _function(
                library.layer_rotary, [POINTER] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int]
            )
            self._silu_mul = _function(
                library.layer_silu_mul, [POINTER] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]
            )

    @property
    def fuses(self) -> bool:
        """Whether it runs a layer's small ops (`add_norm`, `rotate`, `silu_mul`): the
        bfloat16 build does."""
        return self._add_norm is not None

    def add_norm(
        self, hidden: Tensor, delta: Tensor | None, weight: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        """`hidden` plus `delta` (none: as it is), and that sum's RMS norm times `weight`,
        as Qwen2's and Llama's RMSNorm computes it; the sum is written over `hidden`'s own
        values, which the caller owns."""
        hidden = hidden.contiguous()
        normed = torch.empty_like(hidden)
        added = None if delta is None else delta.contiguous().data_ptr()
        self._add_norm(hidden.data_ptr(), added, weight.data_ptr(), normed.data_ptr(),
                       hidden.numel() // hidden.shape[-1], hidden.shape[-1], eps,
                       torch.get_num_threads())  # fmt: skip
        return hidden, normed

    def rotate(self, states: Tensor, cos: Tensor, sin: Tensor, heads: int) -> None:
        """Rotate, in place, the first `heads` heads of each token's `states` ([1, tokens,
        width], contiguous; heads as wide as `cos`) by the rotary embedding's `cos` and
        `sin` ([1, tokens, head_dim]), as Qwen2's and Llama's `apply_rotary_pos_emb`."""
        cos, sin = cos.contiguous(), sin.contiguous()
        tokens, width = states.shape[-2:]
        self._rotary(states.data_ptr(), cos.data_ptr(), sin.data_ptr(), tokens, heads, width,
                     cos.shape[-1], torch.get_num_threads())  # fmt: skip

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        """`silu(gate) * up` from the MLP's gate and up side by side ([..., 2 * inner])."""
        gate_up = gate_up.contiguous()
        inner = gate_up.shape[-1] // 2
        out = gate_up.new_empty(*gate_up.shape[:-1], inner)
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * inner),
                       inner, torch.get_num_threads())  # fmt: skip
        return out

    def product(
        self, x: Tensor, weight: int, bias: Tensor | None, out_features: int, *,
        halved: bool = False,
    ) -> Tensor:  # fmt: skip
        """`x` [..., in] (of the kernel's dtype) times the packed weight at address `weight`
        (in float32, a `halved` copy where said), plus `bias`."""
        x = x.contiguous()
        y = x.new_empty(*x.shape[:-1], out_features)
        rows = x.numel() // x.shape[-1]
        address = None if bias is None else bias.data_ptr()
        arguments = [weight, x.data_ptr(), address, y.data_ptr(), rows, out_features, x.shape[-1]]
        if self.dtype == torch.float32:
            arguments.append(halved)
        self._product(*arguments, torch.get_num_threads())
        return y

    def halved(self, weight: Tensor) -> Tensor | None:
        """In float32, a copy of `weight` ([out, in]) in bfloat16, laid out as oneDNN packs
        float32 weights, for `product` to read half the bytes: where every value of it is a
        bfloat16 value (a bfloat16 checkpoint's, loaded in float32), so the products are
        the same; else None."""
        out_features, in_features = weight.shape
        if self.dtype != torch.float32 or out_features % 64:
            return None
        narrowed = exactly_bfloat16(weight)
        if narrowed is None:
            return None
        return narrowed.view(-1, 64, in_features).transpose(1, 2).contiguous()

    def attention(
        self, query: Tensor, keys: Tensor, values: Tensor, slots: Tensor, lengths: Tensor,
        scale: float,
    ) -> Tensor:  # fmt: skip
        """Decoding rows' attention: `query` [rows, heads, dim] against the first
        `lengths[r]` keys and values of slot `slots[r]` in the cache ([slots, kv_heads,
        width, dim]); [rows, heads, dim]. The cache is read where it lies, not copied."""
        query = query.contiguous()
        rows, heads, dim = query.shape
        out = torch.empty_like(query)
        failed = self._attention(
            query.data_ptr(), keys.data_ptr(), values.data_ptr(), slots.data_ptr(),
            lengths.data_ptr(), out.data_ptr(), rows, heads, keys.shape[1], keys.shape[2], dim,
            scale, torch.get_num_threads(),
        )  # fmt: skip
        if failed:
            raise MemoryError("the decode kernel's attention ran out of memory")
        return out

    def attends(
        self, query: Tensor, keys: Tensor, values: Tensor, softcap: float | None
    ) -> bool:  # fmt: skip
        """Whether `attention` serves these: bfloat16 on the CPU, a cache read where it
        lies, heads of a size in 32s (up to 256), and no soft-capped scores."""
        heads, dim = query.shape[1], query.shape[-1]  # [1, heads, tokens, dim]
        return (
            self._attention is not None
            and softcap is None
            and query.dtype == keys.dtype == values.dtype == torch.bfloat16
            and keys.device.type == "cpu"
            and keys.shape == values.shape
            and keys.shape[-1] == dim
            and keys.is_contiguous()
            and values.is_contiguous()
            and dim % 32 == 0
            and dim <= MOST_DIM
            and heads % keys.shape[1] == 0
        )

    def reads(
        self, packed: Tensor, bias: Tensor | None, out_features: int, halved: Tensor | None
    ) -> bool:
        """Whether this packed weight (or its `halved` copy, which `product` would read
        instead) lies as the kernel reads it: its dtype and size, and three random rows'
        product against oneDNN's, within the dtype's rounding."""
        in_features, size = packed.shape[1], self.dtype.itemsize
        if packed.dtype != self.dtype:
            return False
        if torch.ops.mkldnn._nbytes(packed) != out_features * in_features * size:
            # Padded (outputs not in 64s, inputs not in pairs): not read as laid out; and
            # the kernel, which reads exactly this many bytes, must not read past the end.
            return False
        rows = torch.Generator().manual_seed(0)  # not the global one, which sampling uses
        x = torch.randn(3, in_features, dtype=self.dtype, generator=rows)
        expected = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        if halved is None:
            ours = self.product(x, torch.ops.mkldnn.data_ptr(packed), bias, out_features)
        else:
            ours = self.product(x, halved.data_ptr(), bias, out_features, halved=True)
        within = 2**-6 if self.dtype == torch.bfloat16 else 1e-4
        return torch.allclose(ours.float(), expected.float(), rtol=within, atol=within)


def exactly_bfloat16(tensor: Tensor) -> Tensor | None:
    """A float32 tensor in bfloat16, where that holds every value of it exactly (a bfloat16
    checkpoint's, loaded in float32); else None."""
    if tensor.dtype != torch.float32:
        return None
    narrowed = tensor.to(torch.bfloat16)
    return narrowed if torch.equal(narrowed.float(), tensor) else None


def _function(function, argtypes: list, restype=None):
    """A ctypes function of the library, told its arguments' and its result's types."""
    function.argtypes, function.restype = argtypes, restype
    return function


def load(folder: Path, dtype: torch.dtype) -> DecodeKernel | None:
    """The kernel for `dtype`: built beside its source already (`python -m
    bot.decode_kernel`, as an image without a compiler ships it), else built into `folder`
    if it is not there yet; None where it cannot be."""
    prebuilt = library_path(PREBUILT, dtype)
    if prebuilt.is_file():
        with contextlib.suppress(OSError):  # broken: the one in `folder` serves instead
            return DecodeKernel(prebuilt, dtype)
    library = library_path(folder, dtype)
    if library.is_file():
        try:
            return DecodeKernel(library, dtype)
        except OSError as error:  # a broken file (a disk's fault): built again below
            logger.warning("%s did not load (%s): building it again", library, error)
    compiler = os.environ.get("CC") or shutil.which("cc")
    if compiler is None:
        logger.info("No C compiler (cc): decode steps use oneDNN's products")
        return None
    try:
        _build(compiler, library, BUILDS[dtype])
        return DecodeKernel(library, dtype)
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("Decode steps use oneDNN's products: the kernel did not build: %s",
                       _gist(error))  # fmt: skip
        return None


def library_path(folder: Path, dtype: torch.dtype) -> Path:
    """The kernel's file for `dtype` in `folder`, named by its source and flags: a new
    version builds anew."""
    built_from = " ".join(FLAGS + BUILDS[dtype]).encode() + SOURCE.read_bytes()
    return folder / f"decode_kernel-{hashlib.sha256(built_from).hexdigest()[:16]}.so"


def _build(compiler: str, library: Path, instructions: tuple[str, ...]) -> None:
    """Compile the kernel to `library`: written aside and renamed into place, so that a
    process loading it never sees half a file (processes starting together build it each)."""
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as building:
        built = Path(building, library.name)
        subprocess.run(
            [compiler, *FLAGS, *instructions, str(SOURCE), "-o", str(built)],
            check=True,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        built.replace(library)
    logger.info("Built the decode kernel: %s", library)
    current = {library_path(library.parent, dtype) for dtype in BUILDS}
    for older in library.parent.glob("decode_kernel-*.so"):  # an earlier version's: not needed
        if older not in current:
            older.unlink(missing_ok=True)  # (a process that loaded it keeps it)


def _gist(error: OSError | subprocess.SubprocessError) -> str:
    """What went wrong: the compiler's first error where it said one."""
    said = getattr(error, "stderr", None) or ""
    errors = [line for line in said.splitlines() if "error" in line]
    return errors[0] if errors else first_line(error)


if __name__ == "__main__":  # the Dockerfile's builder: its runtime has no compiler
    logging.basicConfig(level=logging.INFO)
    if platform.machine() != "x86_64":
        logger.info("Not an x86-64 machine: no decode kernel to build")
        raise SystemExit(0)
    raise SystemExit(0 if all(load(PREBUILT, dtype) for dtype in BUILDS) else 1)
