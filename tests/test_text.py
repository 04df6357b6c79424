"""Splitting long answers: every part fits, nothing is lost, code blocks stay whole."""

from __future__ import annotations

from adapters.text import split_message


def test_short_text_is_one_part():
    assert split_message("hello", 100) == ["hello"]


def test_parts_fit_and_keep_every_word():
    text = " ".join(f"word{i}" for i in range(500))
    parts = split_message(text, 200)
    assert len(parts) > 1
    assert all(len(part) <= 200 for part in parts)
    assert " ".join(parts).split() == text.split()


def test_paragraph_breaks_are_preferred():
    text = "a" * 60 + "\n\n" + "b" * 60
    assert split_message(text, 100) == ["a" * 60, "b" * 60]


def test_a_code_block_cut_in_two_is_closed_and_reopened():
    code = "\n".join(f"print({i})" for i in range(60))
    text = f"Here you go:\n```python\n{code}\n```\nDone."
    parts = split_message(text, 200)
    assert len(parts) > 2
    for part in parts:
        assert len(part) <= 200
        assert part.count("```") % 2 == 0  # each part opens and closes its own block
    assert all(part.startswith("```python\n") for part in parts[1:-1])
    lines = [line for part in parts for line in part.splitlines() if line.startswith("print(")]
    assert lines == code.splitlines()


def test_a_word_longer_than_the_limit_is_cut_hard():
    parts = split_message("x" * 250, 100)
    assert "".join(parts) == "x" * 250
    assert all(len(part) <= 100 for part in parts)
