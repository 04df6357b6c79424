"""A batcher step's forward: the model's own (`ModelForward`), or for Qwen2 and Llama the
same ops without transformers' module machinery (`LeanForward`); `step_forward` picks.

A CPU decode step of a small model is a few hundred small ops around its matrix products,
and on 2 cores the Python around those ops is a large share of the step: each layer's
forward passes through `nn.Module.__call__`, keyword plumbing, decorators and config
lookups before any arithmetic. `LeanForward` calls the same functions (the layers' own
`forward`s, the model's own `apply_rotary_pos_emb`) in the same order, from one loop: the
logits are bit-identical to the model's own forward (`tests/test_step_forward.py` holds
it to that), and a decode step loses that overhead. Measured with Qwen2.5-0.5B's shape in
bfloat16 on 2 cores of an AMD EPYC (AVX512-BF16), packed weights, alternating with the
model's forward in one process: steps of 1, 4, 8 and 16 rows took 0.94, 0.91, 0.95 and
0.93x the time.

What is left is the ops themselves: about 70 a layer, most of them a norm's eight, the
rotary embedding's sixteen and the MLP gate's two, each a dispatch of a few microseconds
against well under one for a few rows' arithmetic. Where our decode kernel runs a layer's
small ops (`DecodeKernel.fuses`: bfloat16 on a CPU with AVX512-BF16) and the layer's
products are packed as one each, `LeanForward` hands those to it, one call each, and adds
each MLP's output to the residual stream in the next norm's call. Their values are the
ops' own but for the order of a norm's float32 sum and e^x's last bits, so that a
bfloat16 value differs in its last bit now and then (`bot.decode_kernel` has the
measurements).

Only the architectures whose forward it repeats are taken, and only with no hooks on
their modules or on every module (accelerate's offloading works through them), as they
stand when the batcher is made; any other model runs its own forward, as `generate` does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn
from transformers.activations import SiLUActivation

from bot.packing import PackedPart, SharedProduct
from bot.ragged import ATTENTION, PREPARED

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from bot.decode_kernel import DecodeKernel
    from bot.ragged import SlotCache, StepLayout

LAYERS = {
    "Qwen2ForCausalLM": ("Qwen2DecoderLayer", "Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm"),
    "LlamaForCausalLM": ("LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm"),
}
"""The models whose forward `LeanForward` repeats, and the classes their layers must be:
another class (a newer transformers' rewrite, say) might compute something else."""

Products = Callable[[Tensor], Sequence[Tensor]]


def step_forward(
    model: PreTrainedModel, kernel: DecodeKernel | None = None
) -> ModelForward | LeanForward:
    """`LeanForward` where `model`'s forward is one it repeats (with `kernel`, our decode
    kernel, where it serves), else `ModelForward`."""
    return LeanForward(model, kernel) if repeats(model) else ModelForward(model)


def repeats(model: PreTrainedModel) -> bool:
    """Whether `LeanForward` repeats `model`'s forward: an architecture it knows, of the
    layer classes it knows, with no hooks."""
    classes = LAYERS.get(type(model).__name__)
    if classes is None or _global_hooks() or any(_hooked(module) for module in model.modules()):
        return False
    for layer in model.model.layers:
        parts = (layer, layer.self_attn, layer.mlp, layer.input_layernorm)
        if [type(part).__name__ for part in parts] != list(classes):
            return False
    return True


def small_ops_by(model: PreTrainedModel, kernel: DecodeKernel | None) -> bool:
    """Whether `kernel` runs the small ops of `model`'s layers in `LeanForward`: it runs
    them (`DecodeKernel.fuses`), the lean forward `repeats` the model's, and the kernel can
    read every layer's products (`_fusable`)."""
    if kernel is None or not kernel.fuses or not repeats(model):
        return False
    return all(_fusable(layer) for layer in model.model.layers[: model.config.num_hidden_layers])


class ModelForward:
    """The logits of a step laid out by a `StepLayout`, its keys and values written to a
    `SlotCache`, at the flattened positions `kept`: through the model's own forward."""

    def __init__(self, model: PreTrainedModel) -> None:
        self._model = model
        # Our steps attend through `bot.ragged`; every other forward as before (SDPA).
        model.set_attn_implementation(ATTENTION)

    def __call__(
        self, tokens: Tensor, layout: StepLayout, cache: SlotCache, kept: Tensor
    ) -> Tensor:
        """`tokens` [1, tokens]; the logits [kept, vocabulary]."""
        output = self._model(
            input_ids=tokens,
            position_ids=layout.positions[None],
            attention_mask=PREPARED,
            step_layout=layout,  # passed down to `ragged_attention`
            cache=cache,
            use_cache=True,
            logits_to_keep=kept,
        )
        return output.logits[0]


class LeanForward:
    """As `ModelForward`, computing what a Qwen2 or Llama model's forward does, in one loop.
    It takes the model's layers as they are when it is made: pack or quantize them before.
    A layer's small ops go to `kernel` where it runs them (`small_ops_by`)."""

    def __init__(self, model: PreTrainedModel, kernel: DecodeKernel | None = None) -> None:
        inner = model.model
        self._embed, self._rotary = inner.embed_tokens, inner.rotary_emb
        self._head = model.lm_head.forward
        self.kernel = kernel = kernel if small_ops_by(model, kernel) else None
        layers = inner.layers[: model.config.num_hidden_layers]
        self._layers = [_Layer(layer, kernel) for layer in layers]
        self._norm = _norm(inner.norm, kernel)

    def __call__(
        self, tokens: Tensor, layout: StepLayout, cache: SlotCache, kept: Tensor
    ) -> Tensor:
        hidden = self._embed.forward(tokens)
        rotation = self._rotary(hidden, layout.positions[None])  # cos and sin
        delta = None  # what a layer's MLP adds to `hidden`: the next norm adds it
        for layer in self._layers:
            hidden, delta = layer(hidden, delta, rotation, layout, cache)
        return self._head(self._norm(hidden, delta)[1][0, kept])


class _Layer:
    """One decoder layer's steps, as the model's own modules run them."""

    def __init__(self, layer: nn.Module, kernel: DecodeKernel | None) -> None:
        attention = layer.self_attn
        self.index, self.scaling = attention.layer_idx, attention.scaling
        self.input_norm = _norm(layer.input_layernorm, kernel)
        self.post_attention_norm = _norm(layer.post_attention_layernorm, kernel)
        self.query_key_value = _query_key_value(attention, kernel)
        self.output = attention.o_proj.forward
        self.mlp = _mlp(layer.mlp, kernel)

    def __call__(
        self, hidden: Tensor, delta: Tensor | None, rotation, layout: StepLayout, cache: SlotCache
    ) -> tuple[Tensor, Tensor]:
        """`hidden` plus `delta` through the layer: the sum after attention, and what the
        MLP adds to it."""
        hidden, normed = self.input_norm(hidden, delta)
        query, key, value = self.query_key_value(normed, rotation)
        keys, values = cache.update(key, value, self.index, {"step_layout": layout})
        attended = layout.attention(query, keys, values, self.scaling)
        attended = self.output(attended.reshape(*hidden.shape[:2], -1).contiguous())
        hidden, normed = self.post_attention_norm(hidden, attended)
        return hidden, self.mlp(normed)


Norm = Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]]


def _norm(norm: nn.Module, kernel: DecodeKernel | None) -> Norm:
    """`hidden` plus `delta` (none: as it is), and that sum through `norm`."""
    if kernel is not None:
        weight, eps = norm.weight, norm.variance_epsilon
        return lambda hidden, delta: kernel.add_norm(hidden, delta, weight, eps)
    forward = norm.forward

    def added_and_normed(hidden: Tensor, delta: Tensor | None) -> tuple[Tensor, Tensor]:
        hidden = hidden if delta is None else hidden + delta
        return hidden, forward(hidden)

    return added_and_normed


def _query_key_value(
    attention: nn.Module, kernel: DecodeKernel | None
) -> Callable[[Tensor, tuple[Tensor, Tensor]], Sequence[Tensor]]:
    """The attention's query, key and value for a normed input ([1, heads, tokens, dim]
    each), the query and key rotated by the step's (cos, sin)."""
    dim = attention.head_dim
    linears = [attention.q_proj, attention.k_proj, attention.v_proj]
    if kernel is not None:
        shared = _shared(linears)
        product, sizes = shared.product.forward, shared.sizes
        rotated = (sizes[0] + sizes[1]) // dim  # the query's heads and the key's

        def by_kernel(normed: Tensor, rotation: tuple[Tensor, Tensor]) -> Sequence[Tensor]:
            states = product(normed).contiguous()  # rotated in place
            kernel.rotate(states, *rotation, rotated)
            heads = (1, normed.shape[1], -1, dim)
            return [part.view(heads).transpose(1, 2) for part in states.split(sizes, dim=-1)]

        return by_kernel
    products = _products(linears)
    # What the attention's forward calls: its modeling module's function.
    rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb

    def as_the_model(normed: Tensor, rotation: tuple[Tensor, Tensor]) -> Sequence[Tensor]:
        heads = (1, normed.shape[1], -1, dim)
        query, key, value = (part.view(heads).transpose(1, 2) for part in products(normed))
        query, key = rotate(query, key, *rotation)
        return query, key, value

    return as_the_model


def _mlp(mlp: nn.Module, kernel: DecodeKernel | None) -> Callable[[Tensor], Tensor]:
    """What the MLP adds for a normed input."""
    down = mlp.down_proj.forward
    if kernel is not None:
        gate_up = _shared([mlp.gate_proj, mlp.up_proj]).product.forward
        return lambda normed: down(kernel.silu_mul(gate_up(normed)))
    products, activation = _products([mlp.gate_proj, mlp.up_proj]), mlp.act_fn

    def as_the_model(normed: Tensor) -> Tensor:
        gate, up = products(normed)
        return down(activation(gate) * up)

    return as_the_model


def _fusable(layer: nn.Module) -> bool:
    """Whether the kernel's small ops are this layer's: the query, key and value one
    product, the gate and up another (the kernel reads their outputs side by side), and
    the gate's activation SiLU."""
    attention, mlp = layer.self_attn, layer.mlp
    return (
        _shared([attention.q_proj, attention.k_proj, attention.v_proj]) is not None
        and _shared([mlp.gate_proj, mlp.up_proj]) is not None
        and type(mlp.act_fn) in (SiLUActivation, nn.SiLU)
    )


def _shared(linears: list[nn.Module]) -> SharedProduct | None:
    """The one product these layers are packed as, in this order, if they are."""
    shared = getattr(linears[0], "shared", None)
    parts = all(isinstance(linear, PackedPart) and linear.shared is shared for linear in linears)
    in_order = parts and [linear.index for linear in linears] == list(range(len(linears)))
    return shared if in_order and len(shared.sizes) == len(linears) else None


def _products(linears: list[nn.Module]) -> Products:
    """Each layer's output for an input: one product where they are packed as one."""
    shared = _shared(linears)
    if shared is not None:
        product, sizes = shared.product.forward, shared.sizes
        return lambda x: product(x).split(sizes, dim=-1)
    forwards = [linear.forward for linear in linears]
    return lambda x: [forward(x) for forward in forwards]


def _global_hooks() -> bool:
    """Hooks registered for every module (`register_module_forward_hook`)."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks) or hasattr(module, "_hf_hook")
