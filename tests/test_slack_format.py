"""Markdown to Slack mrkdwn: formatting converted, pings and forged links impossible."""

from __future__ import annotations

import re

import pytest

from adapters.slack_format import to_mrkdwn


@pytest.mark.parametrize(
    ("markdown", "mrkdwn"),
    [
        ("**bold** and *italic*", "*bold* and _italic_"),
        ("__bold__ and _italic_", "*bold* and _italic_"),
        ("~~gone~~", "~gone~"),
        ("# Title\ntext", "*Title*\ntext"),
        ("- one\n- two", "• one\n• two"),
        ("see [the docs](https://example.com/a?b=1)", "see the docs (<https://example.com/a?b=1>)"),
        ("2 * 3 * 4 = 24", "2 * 3 * 4 = 24"),
    ],
)
def test_markdown_becomes_mrkdwn(markdown, mrkdwn):
    assert to_mrkdwn(markdown) == mrkdwn


@pytest.mark.parametrize(
    "attack", ["<!channel>", "<!here>", "<!everyone>", "<@U0ALICE>", "<#C0001>", "<!subteam^S1>"]
)
def test_model_output_cannot_ping(attack):
    out = to_mrkdwn(f"hey {attack} look")
    assert "<" not in out and ">" not in out
    assert out == f"hey {attack.replace('<', '&lt;').replace('>', '&gt;')} look"


def test_model_output_cannot_forge_a_slack_link():
    out = to_mrkdwn("click <https://evil.example|your bank>")
    assert out == "click &lt;https://evil.example|your bank&gt;"


@pytest.mark.parametrize(
    ("markdown", "mrkdwn"),
    [
        ("[click here](https://evil.example/x)", "click here (<https://evil.example/x>)"),
        ("[https://bank.example](https://evil.example)", "https://bank.example (<https://evil.example>)"),
        ("[bank.example/login](https://evil.example)", "bank.example/login (<https://evil.example>)"),
        ("[https://bank.example](https://bank.example.evil.example)",
         "https://bank.example (<https://bank.example.evil.example>)"),
        ("[a & b](https://e.example/?a=1&b=2)", "a &amp; b (<https://e.example/?a=1&amp;b=2>)"),
        ("[**bold** label](https://e.example)", "*bold* label (<https://e.example>)"),
    ],
)  # fmt: skip
def test_a_link_shows_its_real_url_beside_a_label_that_differs(markdown, mrkdwn):
    assert to_mrkdwn(markdown) == mrkdwn


@pytest.mark.parametrize(
    "label", ["https://example.com/a", "http://example.com/a", "example.com/a", "example.com/a/"]
)
def test_a_label_that_is_the_url_leaves_a_plain_link(label):
    assert to_mrkdwn(f"see [{label}](https://example.com/a)") == "see <https://example.com/a>"


@pytest.mark.parametrize(
    "markdown",
    [
        "[click here](https://evil.example/x)",
        "[https://bank.example](https://evil.example)",
        "[x|y](https://evil.example)",
        "[[a](https://a.example)](https://b.example)",
        "[<https://bank.example|bank>](https://evil.example)",
        "**[see](https://evil.example/a)** and [https://a.example](https://a.example)",
    ],
)
def test_every_link_built_shows_the_address_it_opens(markdown):
    """Slack shows a label only after `|`: no link in the result has one."""
    links = re.findall(r"<([^<>]*)>", to_mrkdwn(markdown))
    assert links
    assert all("|" not in link and link.startswith("https://") for link in links)


def test_code_is_escaped_but_not_reformatted():
    markdown = "run `a**b**c` then\n```python\nif a < b and **kw:\n    x = 1 & 2\n```"
    assert to_mrkdwn(markdown) == (
        "run `a**b**c` then\n```python\nif a &lt; b and **kw:\n    x = 1 &amp; 2\n```"
    )


def test_an_unclosed_code_block_still_counts_as_code():
    assert to_mrkdwn("```\n**not bold**") == "```\n**not bold**"
