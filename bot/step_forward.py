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

Only the architectures whose forward it repeats are taken, and only with no hooks on
their modules or on every module (accelerate's offloading works through them), as they
stand when the batcher is made; any other model runs its own forward, as `generate` does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

from bot.packing import PackedPart
from bot.ragged import ATTENTION, PREPARED

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from bot.ragged import SlotCache, StepLayout

LAYERS = {
    "Qwen2ForCausalLM": ("Qwen2DecoderLayer", "Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm"),
    "LlamaForCausalLM": ("LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm"),
}
"""The models whose forward `LeanForward` repeats, and the classes their layers must be:
another class (a newer transformers' rewrite, say) might compute something else."""

Products = Callable[[Tensor], Sequence[Tensor]]


def step_forward(model: PreTrainedModel) -> ModelForward | LeanForward:
    """`LeanForward` where `model`'s forward is one it repeats, else `ModelForward`."""
    classes = LAYERS.get(type(model).__name__)
    if classes is None or _global_hooks() or any(_hooked(module) for module in model.modules()):
        return ModelForward(model)
    for layer in model.model.layers:
        parts = (layer, layer.self_attn, layer.mlp, layer.input_layernorm)
        if [type(part).__name__ for part in parts] != list(classes):
            return ModelForward(model)
    return LeanForward(model)


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
    It takes the model's layers as they are when it is made: pack or quantize them before."""

    def __init__(self, model: PreTrainedModel) -> None:
        inner = model.model
        self._embed, self._rotary, self._norm = (
            inner.embed_tokens,
            inner.rotary_emb,
            inner.norm.forward,
        )
        self._head = model.lm_head.forward
        self._layers = [_Layer(layer) for layer in inner.layers[: model.config.num_hidden_layers]]

    def __call__(
        self, tokens: Tensor, layout: StepLayout, cache: SlotCache, kept: Tensor
    ) -> Tensor:
        hidden = self._embed.forward(tokens)
        rotation = self._rotary(hidden, layout.positions[None])  # cos and sin
        for layer in self._layers:
            hidden = layer(hidden, rotation, layout, cache)
        return self._head(self._norm(hidden)[0, kept])


class _Layer:
    """One decoder layer's steps, as the model's own modules run them."""

    def __init__(self, layer: nn.Module) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.index, self.head_dim = attention.layer_idx, attention.head_dim
        self.scaling = attention.scaling
        self.input_norm = layer.input_layernorm.forward
        self.post_attention_norm = layer.post_attention_layernorm.forward
        # What the attention's forward calls: its modeling module's function.
        self.rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        self.query_key_value = _products([attention.q_proj, attention.k_proj, attention.v_proj])
        self.output = attention.o_proj.forward
        self.gate_up = _products([mlp.gate_proj, mlp.up_proj])
        self.down, self.activation = mlp.down_proj.forward, mlp.act_fn

    def __call__(self, hidden: Tensor, rotation, layout: StepLayout, cache: SlotCache) -> Tensor:
        heads = (1, hidden.shape[1], -1, self.head_dim)
        query, key, value = (
            states.view(heads).transpose(1, 2)
            for states in self.query_key_value(self.input_norm(hidden))
        )
        query, key = self.rotate(query, key, *rotation)
        keys, values = cache.update(key, value, self.index, {"step_layout": layout})
        attended = layout.attention(query, keys, values, self.scaling)
        hidden = hidden + self.output(attended.reshape(*hidden.shape[:2], -1).contiguous())
        gate, up = self.gate_up(self.post_attention_norm(hidden))
        return hidden + self.down(self.activation(gate) * up)


def _products(linears: list[nn.Module]) -> Products:
    """Each layer's output for an input: one product where they are packed as one."""
    shared = getattr(linears[0], "shared", None)
    parts = all(isinstance(linear, PackedPart) and linear.shared is shared for linear in linears)
    if parts and len(shared.sizes) == len(linears):
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
