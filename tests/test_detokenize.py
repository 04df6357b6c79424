"""Incremental detokenization with the real Qwen2.5 tokenizer: the streamed chunks add up
to the whole answer's decode, each token costs a bounded decode, and a decode that
rewrites text already shown does not stop the stream."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_batching import QUESTIONS, run_to_the_end

from bot.detokenize import MAX_HELD, IncrementalDetokenizer

# Characters of 2-4 UTF-8 bytes that Qwen's byte-level BPE splits across tokens.
MULTI_BYTE = "Hello 世界 👋🏽 café — 𠜎𠝹 🇯🇵 ok"


def stream(detokenizer: IncrementalDetokenizer, answer: list[int]) -> list[str]:
    """The chunks of `answer`, fed a token at a time as the batcher feeds it."""
    return [detokenizer.feed(answer[: length + 1]) for length in range(len(answer))]


def counting(decode: Callable[[list[int]], str], sizes: list[int]) -> Callable[[list[int]], str]:
    """`decode`, noting how many ids each call is given in `sizes`."""

    def counted(ids: list[int]) -> str:
        sizes.append(len(ids))
        return decode(ids)

    return counted


@pytest.fixture
def decode(qwen_tokenizer) -> Callable[[list[int]], str]:
    """The engine's decode: special tokens skipped."""
    return lambda ids: qwen_tokenizer.decode(ids, skip_special_tokens=True)


def test_chunks_add_up_to_the_whole_decode_across_split_characters_and_special_tokens(
    qwen_tokenizer, decode
):
    ids = qwen_tokenizer(MULTI_BYTE).input_ids
    assert any("\ufffd" in decode([token]) for token in ids)  # characters are split
    special = qwen_tokenizer.convert_tokens_to_ids("<|im_start|>")
    split = next(i for i, token in enumerate(ids) if decode([token]).endswith("\ufffd")) + 1
    # a special token inside a split character, and a run longer than the detokenizer holds
    answer = [special, *ids[:split], special, *ids[split:-1], *[special] * 20, ids[-1]]
    sizes: list[int] = []
    detokenizer = IncrementalDetokenizer(counting(decode, sizes))
    chunks = stream(detokenizer, answer)
    final = decode(answer)
    assert final == MULTI_BYTE
    assert "".join(chunks) == final
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert detokenizer.rest(final) == ""
    assert max(sizes) <= 2 * MAX_HELD  # the run of special tokens was not held whole


def test_the_stream_holds_back_a_character_until_its_last_byte(qwen_tokenizer, decode):
    ids = qwen_tokenizer(" 👋").input_ids
    assert len(ids) > 1
    chunks = stream(IncrementalDetokenizer(decode), ids)
    assert chunks == [""] * (len(ids) - 1) + [" 👋"]


def test_a_character_begun_after_a_long_run_of_special_tokens_is_not_shown_broken(
    qwen_tokenizer, decode
):
    """The run of special tokens is let out at MAX_HELD ids, and the character's first
    byte with it: that byte is kept back until its character is whole."""
    special = qwen_tokenizer.convert_tokens_to_ids("<|im_start|>")
    character = qwen_tokenizer("𠜎 ok").input_ids  # its 4 bytes in 3 tokens
    answer = [special] * (MAX_HELD - 1) + character
    chunks = stream(IncrementalDetokenizer(decode), answer)
    assert "".join(chunks) == decode(answer) == "𠜎 ok"
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_a_character_split_by_a_run_of_special_tokens_is_not_shown_broken(qwen_tokenizer, decode):
    """The character's first byte, then more special tokens than MAX_HELD less a few:
    the text is let out without that byte, which waits for the rest of its character."""
    special = qwen_tokenizer.convert_tokens_to_ids("<|im_start|>")
    ids = qwen_tokenizer("ok 𠝹 ok").input_ids
    split = next(i for i, token in enumerate(ids) if decode([token]).endswith("\ufffd")) + 1
    answer = ids[:split] + [special] * (MAX_HELD - 2) + ids[split:]
    chunks = stream(IncrementalDetokenizer(decode), answer)
    assert "".join(chunks) == decode(answer) == "ok 𠝹 ok"
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_each_token_decodes_a_bounded_window_however_long_the_answer(qwen_tokenizer, decode):
    answer = qwen_tokenizer(MULTI_BYTE * 40).input_ids
    sizes: list[int] = []
    chunks = stream(IncrementalDetokenizer(counting(decode, sizes)), answer)
    assert "".join(chunks) == decode(answer)
    assert max(sizes) <= 2 * MAX_HELD
    assert len(sizes) <= 2 * len(answer)


def test_a_run_of_broken_characters_is_let_out_in_a_bounded_window(qwen_tokenizer, decode):
    """Malformed output, each token a character's first byte that no byte completes: let
    out at MAX_HELD ids, where the whole run was kept back (nothing streamed), and each
    token decoded a window that grew with the answer."""
    lead_byte = qwen_tokenizer.convert_tokens_to_ids("ä")  # byte 0xE4, as byte-level BPE writes it
    answer = [lead_byte] * 40
    sizes: list[int] = []
    detokenizer = IncrementalDetokenizer(counting(decode, sizes))
    chunks = stream(detokenizer, answer)
    assert max(sizes) <= 2 * MAX_HELD + 1
    assert len("".join(chunks)) >= len(answer) - MAX_HELD
    assert "".join(chunks) + detokenizer.rest(decode(answer)) == decode(answer)


def test_a_decode_that_rewrites_shown_text_does_not_stop_the_stream(qwen_tokenizer):
    """WordPiece tokenizers' clean-up joins " ." into "." once the dot comes: the text
    already shown ("Hello ") is no prefix of the next decode; the answer streams on."""

    def cleaned_up(ids: list[int]) -> str:
        return qwen_tokenizer.decode(ids, skip_special_tokens=True).replace(" .", ".")

    answer = [qwen_tokenizer(piece).input_ids[0] for piece in ["Hello", " ", ".", " more", " text"]]
    detokenizer = IncrementalDetokenizer(cleaned_up)
    chunks = stream(detokenizer, answer)
    assert chunks[:2] == ["Hello", " "]
    assert chunks[3:] == [" more", " text"]
    final = cleaned_up(answer)
    assert final == "Hello. more text"
    # as many characters streamed as the answer has: the final text replaces them
    assert detokenizer.rest(final) == ""


def test_the_batcher_streams_each_token_with_a_bounded_decode(make_batcher, monkeypatch):
    """Only the finished answer is decoded whole (the seed's text); the stream of every
    token before it costs a window of ids, not the answer so far."""
    batcher = make_batcher(max_new_tokens=48)
    sizes: list[int] = []
    monkeypatch.setattr(batcher.engine, "decode", counting(batcher.engine.decode, sizes))
    # run_to_the_end checks that the streamed chunks add up to the answer
    finished = run_to_the_end(batcher, {0: ("k", QUESTIONS[1])})["k"]
    assert finished.answer_tokens == 48
    *streaming, whole = sizes
    assert whole == 48
    assert max(streaming) <= 2 * MAX_HELD
    assert len(streaming) <= 2 * 48
