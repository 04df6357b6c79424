"""A batcher step's forward: the model's own (`ModelForward`), or for Qwen2 and Llama the
same ops without transformers' module machinery (`LeanForward`); `step_forward` picks.

A CPU decode step of a small model is a few hundred small ops around its matrix products,
and on 2 cores the Python around those ops is a large share of the step: each layer's
forward passes through `nn.Module.__call__`, keyword plumbing, decorators and config
lookups before any arithmetic. `LeanForward` runs the same ops, in the same order, on the
same modules' weights, from one loop: the logits are bit-identical to the model's own
forward (`tests/test_step_forward.py` holds it to that), and a decode step loses that
overhead. Measured with Qwen2.5-0.5B's shape in bfloat16 on 2 cores of an AMD EPYC
(AVX512-BF16), packed weights, alternating with the model's forward in one process: a
lone row's step took 0.89x the time, 4 rows 0.95x, 16 rows the same.

Only the architectures whose forward it repeats are taken, and only with no hooks on
their modules or on every module (accelerate's offloading works through them), as they
stand when the batcher is made; any other model runs its own forward, as `generate` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
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
        self._embed, self._rotary, self._norm = inner.embed_tokens, inner.rotary_emb, inner.norm
        self._head = model.lm_head.forward
        self._layers = [_Layer(layer) for layer in inner.layers[: model.config.num_hidden_layers]]

    def __call__(
        self, tokens: Tensor, layout: StepLayout, cache: SlotCache, kept: Tensor
    ) -> Tensor:
        hidden = self._embed.forward(tokens)
        cos, sin = self._rotary(hidden, layout.positions[None])
        rotation = cos.unsqueeze(1), sin.unsqueeze(1)
        for layer in self._layers:
            hidden = layer(hidden, rotation, layout, cache)
        return self._head(_rms_norm(self._norm, hidden)[0, kept])


class _Layer:
    """One decoder layer's steps, as the model's own modules run them."""

    def __init__(self, layer: nn.Module) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.index, self.head_dim = attention.layer_idx, attention.head_dim
        self.scaling = attention.scaling
        self.input_norm = layer.input_layernorm
        self.post_attention_norm = layer.post_attention_layernorm
        self.query_key_value = _products([attention.q_proj, attention.k_proj, attention.v_proj])
        self.output = attention.o_proj.forward
        self.gate_up = _products([mlp.gate_proj, mlp.up_proj])
        self.down, self.activation = mlp.down_proj.forward, mlp.act_fn

    def __call__(self, hidden: Tensor, rotation, layout: StepLayout, cache: SlotCache) -> Tensor:
        heads = (1, hidden.shape[1], -1, self.head_dim)
        query, key, value = (
            states.view(heads).transpose(1, 2)
            for states in self.query_key_value(_rms_norm(self.input_norm, hidden))
        )
        query, key = _rotate(query, *rotation), _rotate(key, *rotation)
        keys, values = cache.update(key, value, self.index, {"step_layout": layout})
        attended = layout.attention(query, keys, values, self.scaling)
        hidden = hidden + self.output(attended.reshape(*hidden.shape[:2], -1).contiguous())
        gate, up = self.gate_up(_rms_norm(self.post_attention_norm, hidden))
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


def _rms_norm(norm: nn.Module, hidden: Tensor) -> Tensor:
    """`Qwen2RMSNorm` and `LlamaRMSNorm`, step for step."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * hidden.to(dtype)


def _rotate(states: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding, as transformers' `apply_rotary_pos_emb`."""
    half = states.shape[-1] // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return (states * cos) + (rotated * sin)


def _global_hooks() -> bool:
    """Hooks registered for every module (`register_module_forward_hook`)."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks) or hasattr(module, "_hf_hook")
