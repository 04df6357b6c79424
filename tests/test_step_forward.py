"""A step's forward: the lean loop for Qwen2 and Llama computes what the model's own does."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_qwen2, without_whitespace_tokens
from test_batching import QUESTIONS, run
from test_cuda import ON_A_GPU
from test_packing import DTYPES
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from bot.batching import Batcher
from bot.engine import Engine
from bot.kv_cache import PrefixCache
from bot.packing import pack_linear_weights
from bot.ragged import Segment, SlotCache, StepLayout
from bot.step_forward import LeanForward, ModelForward, step_forward

SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.2,
         "vocab_size": 300}  # fmt: skip


def tiny_llama(**config) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SHAPE, **config)).eval()


STEPS = [  # (decoding rows, prefill chunks): prompts read, then answers beside a chunk
    ([], [Segment(0, 0, 6), Segment(1, 0, 9)]),
    ([Segment(0, 6, 1), Segment(1, 9, 1)], [Segment(2, 0, 5)]),
    ([Segment(0, 7, 1), Segment(1, 10, 1)], [Segment(2, 5, 4)]),
    ([Segment(0, 8, 1), Segment(1, 11, 1), Segment(2, 9, 1)], []),
]


def run_steps(forward, model) -> tuple[list[torch.Tensor], SlotCache]:
    """Every step's logits (at each segment's last token) and the cache they leave."""
    config, dtype, device = model.config, model.dtype, model.device
    head_dim = config.hidden_size // config.num_attention_heads
    cache = SlotCache(config.num_hidden_layers, config.num_key_value_heads, head_dim, dtype, device)
    cache.resize(3, 16, keep=0)
    generator = torch.Generator().manual_seed(1)
    logits = []
    with torch.inference_mode():
        for decoding, prefilling in STEPS:
            layout = StepLayout(decoding, prefilling, device)
            tokens = torch.randint(0, 300, (1, layout.tokens), generator=generator).to(device)
            ends = torch.tensor([segment.length for segment in layout.segments]).cumsum(0) - 1
            ends = ends.to(device)
            logits.append(forward(tokens, layout, cache, ends))
    return logits, cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "packed, device",  # packing is oneDNN's, on the CPU alone
    [(False, "cpu"), (True, "cpu"), pytest.param(False, "cuda", marks=ON_A_GPU)],
    ids=["plain", "packed", "gpu"],
)
@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_the_lean_forward_computes_the_model_s_own_logits_and_cache_to_the_bit(
    qwen_tokenizer, architecture, packed, dtype, device
):
    model = tiny_qwen2(qwen_tokenizer) if architecture == "qwen2" else tiny_llama()
    model = model.to(device, dtype)
    if packed:
        assert pack_linear_weights(model)
    assert isinstance(step_forward(model), LeanForward)
    lean_logits, lean_cache = run_steps(LeanForward(model), model)
    own_logits, own_cache = run_steps(ModelForward(model), model)
    vocabulary = model.config.vocab_size
    assert [logits.shape for logits in lean_logits] == [(rows, vocabulary) for rows in (2, 3, 3, 3)]
    for lean, own in zip(lean_logits, own_logits, strict=True):
        assert torch.equal(lean, own)
    lean_kv, own_kv = lean_cache.keys + lean_cache.values, own_cache.keys + own_cache.values
    for lean, own in zip(lean_kv, own_kv, strict=True):
        assert torch.equal(lean, own)


def test_the_lean_forward_runs_the_layers_the_config_names():
    llama = tiny_llama()
    llama.config.num_hidden_layers = 1  # a model cut to its first layer
    lean_logits, _ = run_steps(LeanForward(llama), llama)
    own_logits, _ = run_steps(ModelForward(llama), llama)
    assert torch.equal(lean_logits[-1], own_logits[-1])


def test_other_models_and_hooked_ones_run_their_own_forward():
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(**SHAPE)).eval()  # the same layers, not ours
    assert type(step_forward(mistral)) is ModelForward
    llama = tiny_llama()
    llama.model.layers[1].mlp.register_forward_hook(lambda module, inputs, output: output * 2)
    assert type(step_forward(llama)) is ModelForward
    # What the hook does reaches the logits: the lean loop would have skipped it.
    logits, _ = run_steps(step_forward(llama), llama)
    hookless, _ = run_steps(LeanForward(llama), llama)
    assert not torch.equal(logits[-1], hookless[-1])
    every_module = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        assert type(step_forward(tiny_llama())) is ModelForward
    finally:
        every_module.remove()


def test_a_model_on_its_own_forward_gets_the_answers_of_generate(qwen_tokenizer):
    """Mistral's layers are Llama's under other names, so it runs its own forward, through
    `bot.ragged`'s attention, while requests join mid-answer."""
    torch.manual_seed(0)
    config = MistralConfig(**{**SHAPE, "vocab_size": len(qwen_tokenizer)}, sliding_window=None,
                           eos_token_id=qwen_tokenizer.eos_token_id,
                           pad_token_id=qwen_tokenizer.pad_token_id)  # fmt: skip
    model = without_whitespace_tokens(MistralForCausalLM(config).eval(), qwen_tokenizer)
    engine = Engine(model=model, tokenizer=qwen_tokenizer, max_new_tokens=24)
    batcher = Batcher(engine=engine, max_batch=4, step_tokens=16, prefix_cache=PrefixCache(0))
    assert type(batcher._step_forward) is ModelForward
    answers = run(batcher, {0: ("a", QUESTIONS[0]), 3: ("b", QUESTIONS[1]), 7: ("c", QUESTIONS[2])})
    assert [answers[key] for key in "abc"] == [engine.generate([m])[0] for m in QUESTIONS]
    assert all(answers.values())
