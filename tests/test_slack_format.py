"""Markdown to Slack mrkdwn: formatting converted, pings and forged links impossible."""

from __future__ import annotations

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
        ("see [the docs](https://example.com/a?b=1)", "see <https://example.com/a?b=1|the docs>"),
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


def test_code_is_escaped_but_not_reformatted():
    markdown = "run `a**b**c` then\n```python\nif a < b and **kw:\n    x = 1 & 2\n```"
    assert to_mrkdwn(markdown) == (
        "run `a**b**c` then\n```python\nif a &lt; b and **kw:\n    x = 1 &amp; 2\n```"
    )


def test_an_unclosed_code_block_still_counts_as_code():
    assert to_mrkdwn("```\n**not bold**") == "```\n**not bold**"
