"""Splitting long answers: every part fits, nothing is lost, code blocks stay whole."""

from __future__ import annotations

import random

import pytest

from adapters.text import split_message


def test_short_text_is_one_part():
    assert split_message("hello", 100) == ["hello"]


def test_parts_fit_and_keep_every_word():
    text = " ".join(f"word{i}" for i in range(500))
    parts = split_message(text, 200)
    assert len(parts) > 1
    assert all(len(part) <= 200 for part in parts)
    assert " ".join(parts).split() == text.split()


def test_a_word_break_inside_a_link_label_moves_before_the_link():
    """Discord sends Markdown as it is: a long paragraph cut at its last space, inside
    `[the docs page](…)`, left neither part a link."""
    link = "[the docs page](https://e.example/x)"
    text = "word " * 395 + link + " and more" * 20
    parts = split_message(text, 2000)
    assert len(parts) == 2 and parts[1].startswith(link)
    assert " ".join(parts).split() == text.split()
    # With no word break to move, a `[` leaves a hard cut where it was: at the window's end.
    unbroken = "a" * 150 + "[" + "b" * 100
    assert split_message(unbroken, 200) == [unbroken[:188], unbroken[188:]]


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


def test_the_line_a_part_starts_with_keeps_its_indentation():
    """Every leading space of the next part was stripped: a nested bullet moved to the top
    level, and a line of indented code stopped being code."""
    text = "Steps:\n\n1. First, a step whose words fill the line up\n    - nested detail one\n"
    first, second = split_message(text + "    - nested detail two", 70)
    assert first == "Steps:\n\n1. First, a step whose words fill the line up"
    assert second == "    - nested detail one\n    - nested detail two"


def test_a_word_longer_than_the_limit_is_cut_hard():
    parts = split_message("x" * 250, 100)
    assert "".join(parts) == "x" * 250
    assert all(len(part) <= 100 for part in parts)


@pytest.mark.parametrize("shift", range(6))
def test_a_hard_cut_keeps_an_escape_whole(shift):
    """Slack's text comes escaped (`&amp;`, `&lt;`, `&gt;`): a long line with no break to
    cut at is cut before an escape, never inside it."""
    text = "x" * shift + "a&lt;b&amp;&amp;c&gt;d" * 40
    parts = split_message(text, 100)
    assert "".join(parts) == text
    assert all(len(part) <= 100 for part in parts)
    for part in parts:
        assert part.count("&") == part.count(";")  # each escape whole


@pytest.mark.parametrize(
    "character",
    [
        "🇺🇸",
        "👨\u200d👩\u200d👧\u200d👦",
        "👍🏽",
        "e\u0301",
        "❤\ufe0f",
        "🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f",
    ],
    ids=["flag", "family", "skin tone", "accent", "emoji presentation", "England"],
)
@pytest.mark.parametrize("shift", range(4))
def test_a_hard_cut_keeps_each_character_as_a_reader_sees_it_whole(character, shift):
    """A long run with no break to cut at (emoji, say) is cut between the characters a
    reader sees, each made of several code points: a flag cut in two showed other flags
    (🇺🇸🇫🇷 as 🇷🇺 and loose letters), a family as its members."""
    text = "x" * shift + character * 300
    parts = split_message(text, 100)
    assert "".join(parts) == text
    assert all(len(part) <= 100 for part in parts)
    assert all(part.lstrip("x").count(character) * len(character) == len(part.lstrip("x"))
               for part in parts)  # fmt: skip


def test_a_fence_line_longer_than_a_part_still_ends():
    """A one-line block whose line runs past a part: reopening its line in the next part
    left as much as before (this looped for good, on the event loop)."""
    text = "```" + "print('hello') " * 70 + "\n" + "y " * 600
    parts = split_message(text, 600)
    assert all(len(part) <= 600 for part in parts)
    assert "".join(parts).count("y") == 600


def test_a_block_opened_and_closed_on_one_line_is_not_reopened():
    text = "```pip install threadbot``` first,\n" + "then " * 60
    parts = split_message(text, 120)
    assert len(parts) > 2
    assert parts[0].count("```") == 2
    assert not any("```" in part for part in parts[1:])


def test_an_indented_block_is_closed_and_reopened_with_its_indent():
    code = "\n".join(f"     print({i})" for i in range(30))
    text = f"1. Install:\n   ```python\n{code}\n   ```\n2. Done."
    parts = split_message(text, 200)
    assert len(parts) > 2
    assert all(part.endswith("\n   ```") for part in parts[:-1])
    assert all(part.startswith("   ```python\n") for part in parts[1:])


@pytest.mark.parametrize("seed", range(40))
def test_any_text_splits_into_parts_that_fit_and_keep_every_word(seed):
    """Random text of words, fences (open, closed, one-line, indented, long) and breaks."""
    pieces = ["word", "```", "```py", "  ```sh", "```y```", "`", "\n", "\n\n", " ", "z" * 90]
    rng = random.Random(seed)
    text = "".join(rng.choice(pieces) + rng.choice([" ", "\n"]) for _ in range(400))
    limit = rng.choice([40, 100, 333])
    parts = split_message(text, limit)
    assert all(len(part) <= limit for part in parts)
    words = "wordz"  # the fences' languages (reopened in later parts) have other letters
    assert [c for c in "".join(parts) if c in words] == [c for c in text if c in words]
