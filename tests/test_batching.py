"""Continuous batching: the same tokens as the seed's `generate`, however requests come and go;
chunked prefill; each conversation's KV cache reused on its next turn."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import answer_alone, overflowing_qwen2, tiny_qwen2, without_whitespace_tokens

from bot.batching import PREFILL_FIRST_STEPS, UNUSABLE, Batcher, Update
from bot.engine import Engine
from bot.kv_cache import PrefixCache
from bot.loading import ModelSource, refuse_unservable
from bot.sampling import Sampler

LONG = "Tell me everything about tokenizers and byte pair encoding, " * 6
QUESTIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [{"role": "user", "content": LONG}],  # longer than a step's token budget: chunked
]


def run(batcher, joins: dict[int, tuple[str, list[dict]]], limit: int = 500) -> dict[str, str]:
    """Step the batcher, joining each request at its step number; the answers by key."""
    return {key: update.answer for key, update in run_to_the_end(batcher, joins, limit).items()}


def run_to_the_end(
    batcher,
    joins: dict[int, tuple[str, list[dict]]],
    limit: int = 500,
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Update]:
    """Step the batcher, joining each request at its step number with its `options`;
    each request's last update (its answer and token counts), by key."""
    finished: dict[str, Update] = {}
    streamed: dict[str, str] = {}
    for step in range(limit):
        if step in joins:
            key, messages = joins[step]
            batcher.join(key, messages, conversation=key, **(options or {}).get(key, {}))
        if not len(batcher) and step > max(joins):
            break
        for update in batcher.step():
            streamed[update.key] = streamed.get(update.key, "") + update.text
            if update.answer is not None:
                finished[update.key] = update
    # the stream adds up to the answer
    assert all(streamed[key] == update.answer for key, update in finished.items())
    return finished


def finish_one_of_three(batcher) -> None:
    """Three answers, the third of one token: it ends inside a step, where the KV cache
    shrinks to fit the two left (its tensors made there)."""
    for key, limit in (("a", 8), ("b", 8), ("c", 1)):
        batcher.join(key, QUESTIONS[0], conversation=key, max_new_tokens=limit)
    assert finished(batcher)["c"] is not None


def finished(batcher, limit: int = 500) -> dict[object, str]:
    """Step until a request ends; the answers that ended in that step, by key."""
    for _ in range(limit):
        if answers := {u.key: u.answer for u in batcher.step() if u.answer is not None}:
            return answers
    raise AssertionError("no answer ended")


def test_a_request_stopped_after_the_cache_shrank_in_a_step_leaves_the_rest_answering(
    make_batcher,
):
    batcher = make_batcher(max_new_tokens=8)
    finish_one_of_three(batcher)
    batcher.leave("a")  # Stop: the queue calls it between steps
    assert finished(batcher) == {"b": answer_alone(batcher, QUESTIONS[0], max_new_tokens=8)}


def test_rows_going_up_and_down_across_a_power_of_two_keep_their_cache(make_batcher, monkeypatch):
    """Four rows, a fifth joining and leaving again and again: the cache went from 4 slots
    to 8 and back each time, a new one with every row copied into it, every row waiting."""
    from bot.ragged import SlotCache

    batcher, resized = make_batcher(max_batch=8), []
    resize = SlotCache.resize

    def counted(cache: SlotCache, slots: int, width: int, *, keep: int) -> None:
        resized.append(slots)
        resize(cache, slots, width, keep=keep)

    monkeypatch.setattr(SlotCache, "resize", counted)
    for key in "abcd":
        batcher.join(key, QUESTIONS[0], conversation=key)
    batcher.step()
    for n in range(5):
        key = f"x{n}"  # (a request is known by its key object)
        batcher.join(key, QUESTIONS[0], conversation=key)
        batcher.step()
        batcher.leave(key)
        batcher.step()
    assert resized.count(8) == 1 and resized[-1] == 8


def test_a_next_turn_joins_from_its_cache_after_the_cache_shrank_in_a_step(make_batcher):
    """A long prompt's one-token answer ends inside a step: the cache narrows there, and
    keeps its slots for the three rows left; the next turn of another conversation is read
    into the fourth from its own cache."""
    batcher = make_batcher(max_new_tokens=60)
    batcher.join("x", QUESTIONS[0], conversation="x", max_new_tokens=4)
    first = finished(batcher)["x"]
    for key in "abc":
        batcher.join(key, QUESTIONS[0], conversation=key)
    long = [{"role": "user", "content": "tell me about tokenizers " * 40}]
    batcher.join("long", long, conversation="long", max_new_tokens=1)
    assert finished(batcher) == {"long": answer_alone(batcher, long, max_new_tokens=1)}
    reused = batcher.stats.reused
    second = [*QUESTIONS[0], {"role": "assistant", "content": first}]
    second.append({"role": "user", "content": "and?"})
    batcher.join("x", second, conversation="x", max_new_tokens=4)
    assert batcher.stats.reused > reused  # the first turn's cache, read into the batch
    assert finished(batcher) == {"x": answer_alone(batcher, second, max_new_tokens=4)}


def test_a_request_alone_gets_the_seed_generate_answer(make_batcher):
    """Our loop over the forward (prefill in chunks, then decode) = `generate`, greedy, fp32."""
    batcher = make_batcher(step_tokens=16, max_new_tokens=10)
    assert len(batcher.engine.prompt_ids(QUESTIONS[2])) > 16
    seed = batcher.engine.generate(QUESTIONS)
    assert [answer_alone(batcher, messages) for messages in QUESTIONS] == seed
    assert all(seed)


def test_requests_joining_mid_answer_get_the_same_tokens_as_alone(make_batcher):
    batcher = make_batcher(step_tokens=16, max_new_tokens=24)
    alone = [answer_alone(batcher, messages) for messages in QUESTIONS]
    answers = run(batcher, {0: ("a", QUESTIONS[0]), 3: ("b", QUESTIONS[1]), 7: ("c", QUESTIONS[2])})
    assert [answers[key] for key in "abc"] == alone
    assert len(batcher) == 0


def test_a_cache_that_cannot_be_kept_fails_no_answer(make_batcher, monkeypatch):
    """Keeping a finished row's cache for its next turn ran out of memory: the step raised,
    and the queue failed every row of the batch, the finished one's answer included."""
    batcher = make_batcher(step_tokens=16, max_new_tokens=24)
    alone = [answer_alone(batcher, messages) for messages in QUESTIONS[:2]]

    def out_of_memory(*args: Any) -> None:
        raise torch.OutOfMemoryError("CPU out of memory")

    monkeypatch.setattr(batcher.prefix_cache, "put", out_of_memory)
    options = {"a": {"max_new_tokens": 6}}  # ends first, while "b" goes on
    answers = run_to_the_end(
        batcher, {0: ("a", QUESTIONS[0]), 1: ("b", QUESTIONS[1])}, options=options
    )
    assert answers["a"].answer == answer_alone(batcher, QUESTIONS[0], max_new_tokens=6)
    assert answers["b"].answer == alone[1]
    assert len(batcher) == 0


@pytest.mark.parametrize("sit_out", [PREFILL_FIRST_STEPS, 0])
def test_running_answers_keep_flowing_while_a_long_prompt_prefills(make_batcher, sit_out):
    """Prompts come first: the running answers sit out `prefill_first_steps` steps in a row
    while a prompt is read with the whole step, then ride along with its next chunk (at 0,
    with every chunk)."""
    batcher = make_batcher(step_tokens=32, max_new_tokens=40, prefill_first_steps=sit_out)
    batcher.join("short", QUESTIONS[0], conversation="short")
    batcher.step()  # "short" has its first token and is decoding
    batcher.join("long", [{"role": "user", "content": LONG * 2}], conversation="long")
    keys_per_step, read_per_step = [], []
    for _ in range(12):
        read = batcher.stats.prefilled
        keys_per_step.append([update.key for update in batcher.step()])
        read_per_step.append(batcher.stats.prefilled - read)
    prefill_steps = next(step for step, keys in enumerate(keys_per_step) if "long" in keys)
    assert prefill_steps >= 4  # its prompt took several chunks
    rounds = [[]] * sit_out + [["short"]]  # the prompt went first, and "short" went on
    assert keys_per_step[:prefill_steps] == (rounds * prefill_steps)[:prefill_steps]
    # the whole budget while "short" sits out; all but its token while it rides along
    assert read_per_step[: sit_out + 1] == [32] * sit_out + [31]


def test_the_next_turn_prefills_only_its_new_tokens(make_batcher):
    batcher = make_batcher(max_new_tokens=12)
    first = [{"role": "user", "content": "hello there"}]
    answer = run(batcher, {0: ("c1", first)})["c1"]
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "ok"}]
    before = batcher.stats.prefilled
    again = run(batcher, {0: ("c1", second)})["c1"]
    computed = batcher.stats.prefilled - before
    prompt = len(batcher.engine.prompt_ids(second))
    assert batcher.stats.reused > len(batcher.engine.prompt_ids(first))  # and the answer's
    assert computed == prompt - batcher.stats.reused < prompt / 2
    assert again == answer_alone(batcher, second)  # a full prefill gives the same answer


def test_a_changed_history_reuses_only_what_still_matches(make_batcher):
    batcher = make_batcher(max_new_tokens=8)
    system = {"role": "system", "content": "You answer in one word."}
    old = [system, {"role": "user", "content": "first question"}]
    answer = run(batcher, {0: ("c1", old)})["c1"]
    trimmed = [system, {"role": "user", "content": "another question entirely"}]
    assert answer is not None
    again = run(batcher, {0: ("c1", trimmed)})["c1"]
    shared = len(batcher.engine.prompt_ids([system]))
    assert 0 < batcher.stats.reused <= shared + 4  # the system prompt, no more
    assert again == answer_alone(batcher, trimmed)


def test_a_request_that_leaves_keeps_its_computed_prompt(make_batcher):
    batcher = make_batcher(max_new_tokens=40)
    batcher.join("k", QUESTIONS[1], conversation="k")
    for _ in range(3):
        batcher.step()
    batcher.leave("k")
    assert len(batcher) == 0 and len(batcher.prefix_cache) == 1
    run(batcher, {0: ("k", QUESTIONS[1])})
    assert batcher.stats.reused == len(batcher.engine.prompt_ids(QUESTIONS[1])) - 1


def test_the_prefix_cache_drops_the_least_recently_used_beyond_its_budget():
    def kv(tokens: int) -> list:
        return [(torch.zeros(1, 2, tokens, 8), torch.zeros(1, 2, tokens, 8))]  # 128 B a token

    cache = PrefixCache(max_bytes=128 * 25)
    for name in ("a", "b", "c"):
        cache.put(name, list(range(10)), kv(10))
    assert len(cache) == 2 and cache.size == 128 * 20  # "a" went
    assert cache.take("a", list(range(12))) == (None, 0)
    reused_kv, reused = cache.take("b", [*range(6), 99, 98])
    assert reused == 6 and reused_kv[0][0].shape[2] == 6
    cache.put("huge", list(range(30)), kv(30))  # larger than the whole budget: not kept
    assert len(cache) == 1 and cache.size == 128 * 10


def test_answers_stop_at_the_context_window(make_batcher):
    batcher = make_batcher(max_new_tokens=200, max_context_tokens=64)
    update = run_to_the_end(batcher, {0: ("k", QUESTIONS[1])})["k"]
    assert update.prompt_tokens == len(batcher.engine.prompt_ids(QUESTIONS[1])) < 64
    assert 0 < update.answer_tokens <= 64 - update.prompt_tokens


def test_repetition_penalty_and_sampling_settings_match_generate(tiny_model, qwen_tokenizer):
    """The model's own generation config is applied as `generate` applies it (top_k=1
    makes sampling deterministic)."""
    model = copy.deepcopy(tiny_model)
    model.generation_config.update(
        repetition_penalty=1.8, do_sample=True, top_k=1, temperature=0.7, top_p=0.9
    )
    engine = Engine(model=model, tokenizer=qwen_tokenizer, max_new_tokens=10)
    batcher = Batcher(engine=engine, max_batch=2, step_tokens=64, prefix_cache=PrefixCache(0))
    assert answer_alone(batcher, QUESTIONS[1]) == engine.generate([QUESTIONS[1]])[0]


@pytest.mark.parametrize("answered, can_end", [(1, False), (3, True)])
def test_an_answer_shorter_than_min_new_tokens_cannot_end(tiny_model, answered, can_end):
    config = copy.deepcopy(tiny_model.generation_config)
    config.min_new_tokens = 3
    sampler = Sampler(config, device=torch.device("cpu"))
    logits = torch.zeros(1, tiny_model.config.vocab_size)
    logits[0, config.eos_token_id] = 10.0
    [token] = sampler(logits, [[1, 2]], [answered], [None])
    assert (token == config.eos_token_id) == can_end


def test_a_greedy_row_beside_sampling_rows_gets_the_greedy_answer_of_generate(
    tiny_model, qwen_tokenizer
):
    """Temperature 0 makes one row greedy (repetition penalty still applied, as `generate`
    does) in a batch whose model samples; its tokens are what it gets alone."""
    model = copy.deepcopy(tiny_model)
    model.generation_config.update(repetition_penalty=1.3)
    engine = Engine(model=model, tokenizer=qwen_tokenizer, max_new_tokens=12)
    [greedy] = engine.generate([QUESTIONS[1]])  # the seed's own loop, greedy
    model.generation_config.update(do_sample=True, temperature=1.5, top_k=0)
    batcher = Batcher(engine=engine, max_batch=4, step_tokens=64, prefix_cache=PrefixCache(0))
    torch.manual_seed(0)
    finished = run_to_the_end(
        batcher,
        {0: ("sampled", QUESTIONS[1]), 1: ("greedy", QUESTIONS[1]), 2: ("hot", QUESTIONS[0])},
        options={"greedy": {"temperature": 0}, "hot": {"temperature": 2.0}},
    )
    assert finished["greedy"].answer == greedy
    assert finished["sampled"].answer != greedy  # the row beside it really sampled
    assert answer_alone(batcher, QUESTIONS[1], temperature=0) == greedy


def test_a_temperature_on_a_greedy_model_samples_that_row_only(make_batcher):
    batcher = make_batcher(max_new_tokens=12)  # the tiny model's config is greedy
    greedy = answer_alone(batcher, QUESTIONS[1])
    torch.manual_seed(0)
    finished = run_to_the_end(
        batcher,
        {0: ("default", QUESTIONS[1]), 1: ("sampled", QUESTIONS[1])},
        options={"sampled": {"temperature": 1.0}},
    )
    assert finished["default"].answer == greedy
    assert finished["sampled"].answer != greedy


def test_a_row_stops_at_its_own_max_new_tokens_while_another_goes_on(make_batcher, make_engine):
    batcher = make_batcher(max_new_tokens=20)
    finished = run_to_the_end(
        batcher,
        {0: ("short", QUESTIONS[0]), 1: ("long", QUESTIONS[1])},
        options={"short": {"max_new_tokens": 3}},
    )
    short, long = finished["short"], finished["long"]
    assert short.answer_tokens == 3
    assert [short.answer] == make_engine(max_new_tokens=3).generate([QUESTIONS[0]])
    assert long.answer_tokens == 20
    assert [long.answer] == make_engine(max_new_tokens=20).generate([QUESTIONS[1]])
    assert short.prompt_tokens == len(batcher.engine.prompt_ids(QUESTIONS[0]))
    assert long.prompt_tokens == len(batcher.engine.prompt_ids(QUESTIONS[1]))


def test_greedy_rows_take_no_draws_from_the_sampling_rows(tiny_model):
    """Every sampling row draws in one call whatever rows sit between them, so the
    sampling rows of a mixed batch draw what they would draw without the greedy ones."""
    config = copy.deepcopy(tiny_model.generation_config)
    config.update(do_sample=True, temperature=0.9)
    sampler = Sampler(config, device=torch.device("cpu"))
    torch.manual_seed(3)
    logits = torch.randn(3, tiny_model.config.vocab_size)
    logits[1, 42] = 100.0  # the greedy row's clear favourite
    histories = [[1, 2], [3], [4, 5, 6]]
    torch.manual_seed(1)
    mixed = sampler(logits.clone(), histories, [5, 5, 5], [None, 0, None])
    torch.manual_seed(1)
    without = sampler(logits[[0, 2]].clone(), histories[::2], [5, 5], [None, None])
    assert mixed[1] == 42
    assert [mixed[0], mixed[2]] == without


def test_a_sliding_window_no_row_outgrows_gets_the_answers_of_generate(qwen_tokenizer):
    """A window as long as the context (Qwen2 with `use_sliding_window` on its upper
    layer) is admitted, and served exactly while requests join mid-answer."""
    model = tiny_qwen2(
        qwen_tokenizer, use_sliding_window=True, sliding_window=4096, max_window_layers=1
    )
    engine = Engine(model=model, tokenizer=qwen_tokenizer, max_new_tokens=24)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    refuse_unservable(ModelSource("tiny"), model.config, engine.context_tokens)
    batcher = Batcher(engine=engine, max_batch=4, step_tokens=16, prefix_cache=PrefixCache(0))
    answers = run(batcher, {0: ("a", QUESTIONS[0]), 3: ("b", QUESTIONS[1]), 7: ("c", QUESTIONS[2])})
    assert [answers[key] for key in "abc"] == [engine.generate([m])[0] for m in QUESTIONS]


def test_gemma2s_capped_attention_scores_get_the_answers_of_generate(qwen_tokenizer):
    """Gemma 2 soft-caps its attention scores (tanh(s / cap) * cap) before the softmax,
    which SDPA has no option for: its answers are those of its own eager attention, as
    requests join mid-answer, where the cap was dropped and the answers changed."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(qwen_tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=4096, sliding_window=4096, query_pre_attn_scalar=8,
        attn_logit_softcapping=1.0,  # (50 in Gemma 2) small, so that it changes the answers
        initializer_range=0.2, eos_token_id=qwen_tokenizer.eos_token_id,
        pad_token_id=qwen_tokenizer.pad_token_id,
    )  # fmt: skip
    model = without_whitespace_tokens(Gemma2ForCausalLM(config).eval(), qwen_tokenizer)
    engine = Engine(model=model, tokenizer=qwen_tokenizer, max_new_tokens=24)
    refuse_unservable(ModelSource("tiny"), model.config, engine.context_tokens)
    generated = [engine.generate([m])[0] for m in QUESTIONS]  # eager: the batcher's is ours
    batcher = Batcher(engine=engine, max_batch=4, step_tokens=16, prefix_cache=PrefixCache(0))
    answers = run(batcher, {0: ("a", QUESTIONS[0]), 3: ("b", QUESTIONS[1]), 7: ("c", QUESTIONS[2])})
    assert [answers[key] for key in "abc"] == generated


def test_admission_counts_every_row_as_wide_as_the_longest(make_batcher):
    """A short request beside a long one costs the long one's width: its tokens plus the
    padding. An empty batch takes any request, even one over the whole budget."""
    batcher = make_batcher(max_new_tokens=8)
    short, long = QUESTIONS[0], QUESTIONS[2]
    short_row = len(batcher.engine.prompt_ids(short)) + 8
    long_row = len(batcher.engine.prompt_ids(long)) + 8
    batcher.max_batch_tokens = long_row + short_row  # their tokens fit, not the padding
    assert batcher.fits("long", long)
    batcher.join("long", long, conversation="long")
    assert not batcher.fits("short", short)
    assert not batcher.fits("short", short, max_new_tokens=1)  # still padded to the long one
    batcher.max_batch_tokens = 2 * long_row
    assert batcher.fits("short", short)
    batcher.clear()
    batcher.max_batch_tokens = 1
    assert batcher.fits("long", long)


def test_the_default_batch_budget_is_the_free_memory_share_over_kv_bytes_per_token(
    make_batcher,
):
    from bot.batching import BATCH_MEMORY_SHARE, default_max_batch_tokens, kv_bytes_per_token

    model = make_batcher().model
    # The tiny model: 2 layers * 2 kv heads * head dim 32/4 = 8, keys and values, float32.
    assert kv_bytes_per_token(model) == 2 * 2 * 2 * 8 * 4 == 256
    free, idle = 11 * 2**20, 2**20
    tokens = default_max_batch_tokens(model, free_bytes=free, idle_cache_bytes=idle)
    assert tokens == int((free - idle) * BATCH_MEMORY_SHARE / 256) == 16384
    assert default_max_batch_tokens(model, free_bytes=idle, idle_cache_bytes=2 * idle) == 0


def test_a_short_prompt_arriving_during_a_long_prefill_waits_one_chunk(make_batcher):
    """Prompts are prefilled nearest-to-done first: a short one that arrives while a long
    one is in chunks gets its first token after its own prefill, not after the long one's."""
    batcher = make_batcher(step_tokens=32, max_new_tokens=8)
    long = [{"role": "user", "content": LONG * 3}]
    long_prompt = len(batcher.engine.prompt_ids(long))
    short_prompt = len(batcher.engine.prompt_ids(QUESTIONS[0]))
    assert long_prompt > 3 * 32 and short_prompt < 32
    batcher.join("long", long, conversation="long")
    batcher.step()
    batcher.join("short", QUESTIONS[0], conversation="short")
    assert [update.key for update in batcher.step()] == ["short"]
    finished = []
    for _ in range(50):  # and the long one went on meanwhile, to its answer
        finished += [update.key for update in batcher.step() if update.answer is not None]
        if not len(batcher):
            break
    assert sorted(finished) == ["long", "short"]
    assert batcher.stats.prefilled == long_prompt + short_prompt


def test_the_batch_cache_follows_its_rows_within_the_budget(make_batcher):
    """The slot cache grows as rows join, never past `max_batch_tokens` (rows x widest),
    and gives the memory back when the long row leaves and when the batch empties."""
    batcher = make_batcher(max_new_tokens=40)
    long = [{"role": "user", "content": LONG * 3}]
    short_row = len(batcher.engine.prompt_ids(QUESTIONS[0])) + 40
    long_row = len(batcher.engine.prompt_ids(long)) + 4
    assert long_row > 2 * short_row
    batcher.max_batch_tokens = 3 * long_row
    for key in ("a", "b"):
        batcher.join(key, QUESTIONS[0], conversation=key)
    batcher.join("long", long, conversation="long", max_new_tokens=4)
    assert batcher.kv_tokens == 3 * long_row
    for _ in range(50):
        finished = [update.key for update in batcher.step() if update.answer is not None]
        assert batcher.kv_tokens <= batcher.max_batch_tokens
        if finished:
            break
    assert finished == ["long"] and len(batcher) == 2
    assert batcher.kv_tokens == 2 * short_row  # the long row's width is gone
    for _ in range(100):
        if not len(batcher):
            break
        batcher.step()
    assert batcher.kv_tokens == 0


def test_prompts_of_about_the_same_length_are_read_in_the_order_they_joined(make_batcher):
    """Nearest-to-done first is counted in chunks, so the queue's fair order stands between
    prompts a few tokens apart."""
    batcher = make_batcher(step_tokens=16, max_new_tokens=4)
    first = [{"role": "user", "content": "hi there, how are you"}]
    second = [{"role": "user", "content": "hi"}]
    lengths = [len(batcher.engine.prompt_ids(messages)) for messages in (first, second)]
    assert lengths[0] > lengths[1] and -(-lengths[0] // 16) == -(-lengths[1] // 16)
    batcher.join("first", first, conversation="first")
    batcher.join("second", second, conversation="second")
    keys = []
    for _ in range(20):
        keys += [update.key for update in batcher.step()]
        if keys:
            break
    assert keys == ["first"]


def test_a_join_out_of_memory_leaves_the_batch_as_it_was(make_batcher, monkeypatch):
    """The cache cannot grow for a new row (its values' allocation fails, its keys' went
    through): the join fails, and the running row goes on to its own answer."""
    batcher = make_batcher(max_new_tokens=12)
    alone = answer_alone(batcher, QUESTIONS[1])
    batcher.join("running", QUESTIONS[1], conversation="running")
    batcher.step()
    held = batcher.kv_tokens
    layers, allocations, zeros = len(batcher._cache.keys), [], torch.zeros

    def allocate(*args, **kwargs):
        allocations.append(args)
        if len(allocations) > layers:
            raise RuntimeError("DefaultCPUAllocator: not enough memory")
        return zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", allocate)
    with pytest.raises(RuntimeError, match="not enough memory"):
        batcher.join("new", QUESTIONS[0], conversation="new")
    monkeypatch.undo()
    assert len(batcher) == 1 and batcher.kv_tokens == held
    batcher.join("later", QUESTIONS[0], conversation="later")
    answers = {}
    for _ in range(100):
        answers |= {u.key: u.answer for u in batcher.step() if u.answer is not None}
        if not len(batcher):
            break
    assert answers == {"running": alone, "later": answer_alone(batcher, QUESTIONS[0])}


def zebra_batcher(qwen_tokenizer, kv_cache_bytes: int = 0) -> Batcher:
    """Four rows on a model whose output is NaN wherever " zebra" was read (as a float16
    overflow leaves a hidden state)."""
    return Batcher(
        engine=Engine(
            model=overflowing_qwen2(qwen_tokenizer, " zebra"),
            tokenizer=qwen_tokenizer,
            max_new_tokens=30,
        ),
        max_batch=4,
        step_tokens=64,
        prefix_cache=PrefixCache(kv_cache_bytes),
    )


def test_a_row_stopped_mid_prompt_leaves_no_nan_for_the_row_moved_into_its_slot(
    qwen_tokenizer,
):
    """A prompt the model overflows on in its first chunk, stopped before its last: the
    NaN keys it wrote past the end of the row moved into its slot are not read by that
    row beside a longer one, whose answer failed as "not a number"."""
    batcher = zebra_batcher(qwen_tokenizer)
    questions = {
        "long": [{"role": "user", "content": LONG}],
        "poisoned": [{"role": "user", "content": "A zebra. " + LONG * 3}],  # slot 1
        "short": QUESTIONS[0],
        "moved": QUESTIONS[1],  # slot 3, then 1
    }
    for key, messages in questions.items():
        batcher.join(key, messages, conversation=key)
    poisoned = next(row for row in batcher._sequences if row.key == "poisoned")
    moved_length = len(batcher.engine.prompt_ids(questions["moved"]))
    ended: dict[str, Update] = {}
    for _ in range(200):
        if poisoned.cached > moved_length + 30 and poisoned in batcher._sequences:
            batcher.leave("poisoned")  # its NaN reach past all "moved" will write
        for update in batcher.step():
            if update.answer is not None or update.failed is not None:
                ended[update.key] = update
        if not len(batcher):
            break
    assert {key: update.answer for key, update in ended.items()} == {
        key: answer_alone(batcher, questions[key]) for key in ("long", "short", "moved")
    }


def test_a_row_moved_mid_prompt_leaves_no_nan_in_the_slot_it_moved_from(qwen_tokenizer):
    """A prompt the model overflows on, in the last slot midway through its prompt, moves
    into the slot of a row that was stopped: the NaN keys it wrote stay behind in its old
    slot, where the next row to join read them beside a longer row and failed as "not a
    number" on a question it answers alone."""
    batcher = zebra_batcher(qwen_tokenizer)
    questions = {
        "long": [{"role": "user", "content": LONG}],
        "short": QUESTIONS[0],  # slot 1, stopped
        "other": QUESTIONS[1],
        "poisoned": [{"role": "user", "content": "A zebra. " + LONG * 4}],  # slot 3, then 1
    }
    for key, messages in questions.items():
        batcher.join(key, messages, conversation=key)
    poisoned = batcher._sequences[-1]
    ended: dict[str, Update] = {}
    joined = False
    for _ in range(300):
        if poisoned.cached > 60 and not joined:
            batcher.leave("short")
            batcher.join("new", QUESTIONS[0], conversation="new")  # into slot 3
            joined = True
        for update in batcher.step():
            if update.answer is not None or update.failed is not None:
                ended[update.key] = update
        if not len(batcher):
            break
    assert joined and ended["new"].failed is None
    assert ended["new"].answer == answer_alone(batcher, QUESTIONS[0])


def test_a_row_whose_logits_are_not_numbers_ends_alone_and_leaves_its_slot_clean(
    qwen_tokenizer,
):
    """A prompt the model overflows on (one of its tokens' embedding is NaN, as a float16
    overflow leaves a hidden state) ends unanswered, saying why, where `multinomial` failed
    the whole batch. The answers beside it are what they are alone, the one moved into its
    slot included, which reads that slot past its own end (beside a longer row)."""
    *_, poison = qwen_tokenizer.encode(" zebra")
    batcher = zebra_batcher(qwen_tokenizer, kv_cache_bytes=16 * 2**20)
    questions = {
        "long": [{"role": "user", "content": LONG}],
        "poisoned": [{"role": "user", "content": LONG + " zebra"}],  # slot 1
        "short": QUESTIONS[0],
        "moved": QUESTIONS[1],  # slot 3, then 1: 4 slots are kept for 3 rows
    }
    for key, messages in questions.items():
        assert key == "poisoned" or poison not in batcher.engine.prompt_ids(messages)
        batcher.join(key, messages, conversation=key)
    ended: dict[str, Update] = {}
    for _ in range(200):
        for update in batcher.step():
            if update.answer is not None or update.failed is not None:
                ended[update.key] = update
        if not len(batcher):
            break
    assert ended.pop("poisoned").failed == UNUSABLE
    assert {key: update.answer for key, update in ended.items()} == {
        key: answer_alone(batcher, questions[key]) for key in ("long", "short", "moved")
    }
    kept, _ = batcher.prefix_cache.take(
        "poisoned", batcher.engine.prompt_ids(questions["poisoned"])
    )
    assert kept is None  # its NaN keys and values are not kept for its next turn
