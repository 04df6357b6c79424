"""QUANTIZE=int8: int8 weights in place of every linear layer, a model that still runs
the batcher's forward, answers close to the unquantized model's, and the setting."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import answer_alone, tiny_qwen2
from pydantic import ValidationError
from transformers import DynamicCache, GemmaConfig, GemmaForCausalLM

from bot.batching import Batcher
from bot.config import Settings
from bot.engine import Engine
from bot.kv_cache import PrefixCache
from bot.quantize import FUSED_MAX_ROWS, Int8Linear, is_quantized, quantize_int8, weight_bytes
from bot.team import Team

REPO = Path(__file__).resolve().parents[1]

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "How do I reverse a list in Python?",
]


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def models(request, qwen_tokenizer):
    """The tiny model in a dtype, and its int8 copy."""
    model = tiny_qwen2(qwen_tokenizer).to(request.param)
    quantized = copy.deepcopy(model)
    quantize_int8(quantized)
    return model, quantized


def chat_batch(tokenizer, questions: list[str]) -> dict:
    conversations = [[{"role": "user", "content": question}] for question in questions]
    return tokenizer.apply_chat_template(
        conversations, add_generation_prompt=True, padding=True, return_dict=True,
        return_tensors="pt",
    )  # fmt: skip


def test_every_linear_layer_and_the_embeddings_are_stored_in_int8(models):
    model, quantized = models
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    replaced = dict(quantized.named_modules())
    assert linear and all(isinstance(replaced[name], Int8Linear) for name in linear)
    assert all(replaced[name].qweight.dtype == torch.int8 for name in linear)
    assert not any(isinstance(m, torch.nn.Linear | torch.nn.Embedding) for m in quantized.modules())
    assert is_quantized(quantized) and not is_quantized(model)
    # Tied in float, tied in int8: one table serves the lookup and the output layer.
    assert quantized.get_input_embeddings().qweight is quantized.get_output_embeddings().qweight
    weights = sum(p.numel() for p in model.parameters())
    assert weight_bytes(quantized) < 1.1 * weights  # a byte a weight, and the scales
    assert quantized.dtype == model.dtype  # the activations' dtype, as the batcher reads it


def test_logits_stay_close_to_the_unquantized_models(models, qwen_tokenizer):
    model, quantized = models
    batch = chat_batch(qwen_tokenizer, QUESTIONS)
    real = batch["attention_mask"].bool()
    with torch.inference_mode():
        expected = model(**batch).logits.float()[real]
        found = quantized(**batch).logits.float()[real]
    correlation = torch.corrcoef(torch.stack([expected.flatten(), found.flatten()]))[0, 1]
    assert correlation > 0.999
    assert (expected.argmax(-1) == found.argmax(-1)).float().mean() >= 0.9


def test_an_embedding_that_scales_its_lookup_keeps_its_scale():
    """Gemma's embeddings multiply each lookup by the square root of their width (16
    here): without it every embedding was 16 times too small, and the answers garbage."""
    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64,
    )).eval()  # fmt: skip
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.inference_mode():
        expected = model(ids).logits
        quantize_int8(model)
        found = model(ids).logits
    assert ((found - expected).norm() / expected.norm()) < 0.05


def test_greedy_answers_mostly_agree(models, qwen_tokenizer):
    model, quantized = models
    batch = chat_batch(qwen_tokenizer, QUESTIONS)
    options = {"max_new_tokens": 12, "do_sample": False}
    with torch.inference_mode():
        expected = model.generate(**batch, **options)[:, batch["input_ids"].shape[1] :]
        found = quantized.generate(**batch, **options)[:, batch["input_ids"].shape[1] :]
    assert (expected == found).float().mean() >= 0.7


def test_the_batchers_forward_runs_on_a_cache(models, qwen_tokenizer):
    """Prefill with a DynamicCache, then decode steps of one token a row: the forward the
    batcher runs, through the converted weight (many rows) and the kernel (few)."""
    model, quantized = models
    batch = chat_batch(qwen_tokenizer, QUESTIONS[:2])
    assert batch["input_ids"].numel() > FUSED_MAX_ROWS  # the prefill takes the other path
    decoded = torch.tensor(qwen_tokenizer.encode(" the sky is")).expand(2, -1)  # both rows
    masks = [batch["attention_mask"]]
    for _ in range(decoded.shape[1]):
        masks.append(torch.cat([masks[-1], torch.ones_like(masks[-1][:, :1])], dim=1))
    steps = list(zip([batch["input_ids"], *decoded.split(1, dim=1)], masks, strict=True))
    logits = {}
    with torch.inference_mode():
        for name, network in (("float", model), ("int8", quantized)):
            cache = DynamicCache(config=network.config)
            found = [
                network(
                    input_ids=ids, attention_mask=mask, cache=cache, use_cache=True,
                    logits_to_keep=1,
                ).logits[:, -1].float()
                for ids, mask in steps
            ]  # fmt: skip
            logits[name] = torch.stack(found)
    assert logits["int8"].shape == (len(steps), 2, model.config.vocab_size)
    # int8's rounding moves a logit by a few percent of the largest; a wrong scale, layout
    # or cache moves them all.
    scale = logits["float"].abs().max()
    torch.testing.assert_close(logits["int8"] / scale, logits["float"] / scale, atol=0.1, rtol=0)


def test_the_batcher_answers_with_a_quantized_model_as_generate_does(qwen_tokenizer):
    """The batcher's one flattened forward a step (a prompt's chunk through the converted
    weight, decoding rows through the kernel) gives the answers `generate` gives."""
    model = tiny_qwen2(qwen_tokenizer)
    quantize_int8(model)
    batcher = Batcher(
        engine=Engine(model=model, tokenizer=qwen_tokenizer, max_new_tokens=10),
        max_batch=4,
        step_tokens=64,
        prefix_cache=PrefixCache(0),
    )
    questions = [[{"role": "user", "content": question}] for question in QUESTIONS]
    expected = [batcher.engine.generate([messages])[0] for messages in questions]
    assert [answer_alone(batcher, messages) for messages in questions] == expected
    assert all(expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_and_the_converted_weight_compute_the_same(dtype):
    """A decode step's few rows take the fused kernel; a prefill chunk's many take the
    converted weight: both are the same product, up to rounding in bfloat16."""
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 48).to(dtype))
    rows = torch.randn(2 * FUSED_MAX_ROWS, 64, dtype=dtype)
    reference = rows.float() @ (layer.qweight.float() * layer.scale.float()[:, None]).T
    reference += layer.bias.float()
    few = torch.cat([layer(part) for part in rows.split(FUSED_MAX_ROWS)])
    many = layer(rows)
    scale = reference.abs().max()
    torch.testing.assert_close(few.float() / scale, reference / scale, atol=0.02, rtol=0)
    torch.testing.assert_close(many.float() / scale, reference / scale, atol=0.02, rtol=0)


def test_rows_off_the_kernels_alignment_are_copied_not_crashed_on():
    """The kernel's aligned loads would fault on rows that start mid-buffer (a view of a
    prompt's last position can); a crash here takes the test process down."""
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(32, 16, bias=False).bfloat16())
    buffer = torch.randn(1 + 3 * 32, dtype=torch.bfloat16)
    rows = buffer[1:].view(3, 32)  # contiguous, 2 bytes past an aligned start
    assert rows.is_contiguous() and rows.data_ptr() % 32
    torch.testing.assert_close(layer(rows), layer(rows.clone()))
    strided = torch.randn(3, 64, dtype=torch.bfloat16)[:, ::2]
    torch.testing.assert_close(layer(strided), layer(strided.contiguous()))


def test_an_odd_width_layer_is_quantized_but_never_given_to_the_kernel():
    layer = Int8Linear.from_linear(torch.nn.Linear(24, 8).bfloat16())
    assert not layer.fusable  # the kernel reads 16 features at a time
    rows = torch.randn(1, 24, dtype=torch.bfloat16)
    expected = rows.float() @ (layer.qweight.float() * layer.scale.float()[:, None]).T
    torch.testing.assert_close(layer(rows).float(), expected + layer.bias.float(), atol=0.05,
                               rtol=0.02)  # fmt: skip


def test_the_setting_parses(monkeypatch):
    assert Settings(_env_file=None).quantize == "none"
    monkeypatch.setenv("QUANTIZE", "INT8")
    assert Settings(_env_file=None).quantize == "int8"
    monkeypatch.setenv("QUANTIZE", "int4")
    with pytest.raises(ValidationError, match="quantize"):
        Settings(_env_file=None)


def test_a_reload_says_quantize_takes_a_restart():
    team = Team(Settings(_env_file=None), load=lambda: Settings(_env_file=None, quantize="int8"))
    assert "QUANTIZE only after a restart" in team.reload()
    assert team.settings.quantize == "none"


def test_quantize_int8_loads_a_quantized_engine(tmp_path, qwen_tokenizer, caplog):
    """QUANTIZE=int8 from the settings to the model the batcher gets, said at start."""
    from bot.runtime import load_engine, placement

    tiny_qwen2(qwen_tokenizer).save_pretrained(tmp_path)
    qwen_tokenizer.save_pretrained(tmp_path)
    settings = Settings(
        _env_file=None, model=str(tmp_path), dtype="float32", quantize="int8", max_new_tokens=4
    )
    with caplog.at_level(logging.INFO, logger="bot.runtime"):
        engine = load_engine(settings)
    assert is_quantized(engine.model)
    assert placement(engine) == "float32 with int8 weights on cpu"
    assert any("float32 with int8 weights on cpu" in r.getMessage() for r in caplog.records)
    assert engine.generate([[{"role": "user", "content": "Hello"}]])[0]


# --- The benchmark ------------------------------------------------------------------------

TINY_SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


def run_comparison(tokenizer, **options) -> dict:
    from benchmarks.quantization import BATCH, compare

    prompts = [[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]
               for i in range(BATCH)]  # fmt: skip
    shape = TINY_SHAPE | {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id}
    return compare(shape, tokenizer, prompts, 4, say=lambda _: None, **options)


def check_variants(result: dict, agreement_key: str) -> None:
    from benchmarks.quantization import REFERENCE, VARIANTS

    rows = result["variants"]
    assert list(rows) == [name for name, _, _ in VARIANTS]
    assert rows[REFERENCE][agreement_key] == {"tokens": 1.0, "answers": 1.0}
    for row in rows.values():
        assert row["lone_tok_s"] > 0 and row["batch_tok_s"] > 0
        assert 0 <= row[agreement_key]["tokens"] <= 1 and 0 <= row[agreement_key]["answers"] <= 1
    assert rows["int8, float32"]["weight_bytes"] < rows["bfloat16"]["weight_bytes"]
    assert rows["bfloat16"]["weight_bytes"] < rows["float32"]["weight_bytes"]


def test_the_benchmark_compares_every_variant(qwen_tokenizer):
    from benchmarks.quantization import table

    result = run_comparison(qwen_tokenizer, bundled_cache=None)
    check_variants(result, "agreement")
    markdown = table(result).splitlines()
    assert len(markdown) == 2 + len(result["variants"])
    assert markdown[4].startswith("| int8, float32 |") and "not measured" in markdown[4]


@pytest.mark.slow
def test_the_benchmark_measures_agreement_on_the_real_model(qwen_tokenizer, bundled_cache):
    result = run_comparison(qwen_tokenizer, real_questions=["What is 2 + 2?"],
                            bundled_cache=bundled_cache)  # fmt: skip
    check_variants(result, "real_agreement")


RESIDENT_AFTER_QUANTIZING = """
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from bot.quantize import quantize_int8, weight_bytes

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

config = Qwen2Config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, vocab_size=32000)
model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
before, float_bytes = resident(), weight_bytes(model)
quantize_int8(model)
print(before - resident(), float_bytes - weight_bytes(model))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc (Linux)")
def test_quantizing_hands_the_float_weights_memory_back():
    """In a process of its own (its memory as a fresh start's): the float weights' memory
    was kept by the allocator, so QUANTIZE=int8 left the process bigger than before."""
    result = subprocess.run(
        [sys.executable, "-c", RESIDENT_AFTER_QUANTIZING], cwd=REPO, capture_output=True,
        text=True, timeout=120, check=True,
    )  # fmt: skip
    returned, saved = map(int, result.stdout.split())
    assert returned > saved / 2, (returned, saved)
