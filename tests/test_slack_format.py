"""Markdown to Slack mrkdwn, and to the Markdown of native streams: pings and forged
links impossible in both; a streamed text only ever grows."""

from __future__ import annotations

import re

import pytest

from adapters.slack_format import settled, to_markdown, to_mrkdwn


@pytest.mark.parametrize(
    ("markdown", "mrkdwn"),
    [
        ("**bold** and *italic*", "*bold* and _italic_"),
        ("**bold** and _italic_", "*bold* and _italic_"),
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
    ("markdown", "mrkdwn"),
    [
        pytest.param("snake_case_name and __init__", "snake_case_name and __init__", id="names"),
        pytest.param("`__init__` of __main__, obj.__dict__, __init__.py",
                     "`__init__` of __main__, obj.__dict__, __init__.py", id="python-names"),
        pytest.param("__FILE__:__LINE__ and __DEV__", "__FILE__:__LINE__ and __DEV__",
                     id="c-names"),
        pytest.param("snake_case__names, a__b__c and x__Y__",
                     "snake_case__names, a__b__c and x__Y__", id="intraword-double-underscores"),
        pytest.param("__Bold__ and _italic_", "*Bold* and _italic_", id="underscore-bold"),
        pytest.param("__two words__, (__Note:__) and `__x y__`",
                     "*two words*, (*Note:*) and `__x y__`", id="underscore-bold-not-in-code"),
        pytest.param("## __Usage__: run `make`", "*Usage: run `make`*",
                     id="heading-with-underscore-bold"),
        pytest.param("### Step 1: **Install**", "*Step 1: Install*", id="heading-with-bold"),
        pytest.param("## F# or C#\n## Setup ##", "*F# or C#*\n*Setup*", id="heading-ending-in-#"),
        pytest.param("## **Usage**: run `make`", "*Usage: run `make`*", id="heading-with-code"),
        pytest.param("**Run `npm install`** first", "*Run `npm install`* first", id="bold-code"),
        pytest.param("***both*** or **bold**", "*_both_* or *bold*", id="bold-italic"),
    ],
)  # fmt: skip
def test_names_headings_and_nested_emphasis_convert_cleanly(markdown, mrkdwn):
    """`__x__` is bold as in CommonMark, never inside a word nor around a lowercase name
    (`__init__`, which can't be told from Python's); a heading is one bold line; bold can
    enclose code; `***x***` nests rather than crossing its markers."""
    assert to_mrkdwn(markdown) == mrkdwn


def test_marks_in_the_model_text_cannot_move_code():
    """The characters that stand in for code and bold while converting are dropped from the
    model's text, so each code span comes back where it was."""
    assert to_mrkdwn("a \x01 `b` \x00c \x02`d`") == "a  `b` c `d`"


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
        ("[Foo](https://w.example/wiki/Foo_(bar)) (see)",  # parentheses in the URL: kept
         "Foo (<https://w.example/wiki/Foo_(bar)>) (see)"),
        # An address is never formatted: `*:*` became `_:_`, another query.
        ("[Solr query](http://localhost:8983/solr/select?q=*:*)",
         "Solr query (<http://localhost:8983/solr/select?q=*:*>)"),
        ("*see [x](https://e.example/~~a~~/**b**)* and `{c}`",
         "_see x (<https://e.example/~~a~~/**b**>)_ and `{c}`"),
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
    """mrkdwn knows no language after a fence: it would show as the block's first line."""
    markdown = "run `a**b**c` then\n```python\nif a < b and **kw:\n    x = 1 & 2\n```"
    assert to_mrkdwn(markdown) == (
        "run `a**b**c` then\n```\nif a &lt; b and **kw:\n    x = 1 &amp; 2\n```"
    )
    assert to_mrkdwn("```print(1)```") == "```print(1)```"  # code, no language


def test_an_unclosed_code_block_still_counts_as_code():
    assert to_mrkdwn("```\n**not bold**") == "```\n**not bold**"


@pytest.mark.parametrize(
    ("markdown", "shown"),
    [
        ("**bold**, *italic*, # Title", "**bold**, *italic*, # Title"),
        ("hey <!channel> and <@U0ALICE>", "hey &lt;!channel&gt; and &lt;@U0ALICE&gt;"),
        ("[docs](https://e.example/a)", "docs ([https://e.example/a](https://e.example/a))"),
        ("[Foo](https://w.example/Foo_(bar))",
         "Foo ([https://w.example/Foo_(bar)](https://w.example/Foo_(bar)))"),
        ("[https://e.example](https://e.example/)", "[https://e.example/](https://e.example/)"),
        ("[bank](https://evil.example \"title\")", "[bank]\\(https://evil.example \"title\")"),
        ("[bank](mailto:evil@example.com)", "[bank]\\(mailto:evil@example.com)"),
        ("[bank][1]\n[1]: https://evil.example", "[bank][1]\n[1]\\: https://evil.example"),
        ("[bank][1]\n- [1]: https://evil.example", "[bank][1]\n- [1]\\: https://evil.example"),
        ("[bank][a b]\n[a\nb]: https://evil.example", "[bank][a b]\n[a\nb]\\: https://evil.example"),
        ("`[a](https://a.example)` & <b>", "`[a](https://a.example)` &amp; &lt;b&gt;"),
    ],
)  # fmt: skip
def test_markdown_for_streams_is_escaped_and_shows_every_link_address(markdown, shown):
    """Slack renders the Markdown itself; every link that renders shows where it goes, and
    every other link form (titles, other schemes, references) stays text."""
    assert to_markdown(markdown) == shown


@pytest.mark.parametrize(
    "answer",
    [
        "See [the docs](https://docs.example/x) and [a] note, [t](https://t.example 'x'), "
        "```py\n[z](https://q.example)\n``` then [w](https://w.example/Foo_(bar)) "
        "and [end](https://end.example)",
        # Inline code whose text prose would escape (`]:`, `](`), closed a moment later.
        "Try `for item in items[1:]:` or `x[0](y)`, then `` ` `` and [end](https://end.example)",
    ],
    ids=["links", "inline code"],
)
def test_a_streamed_text_only_grows_as_the_answer_is_written(answer):
    """What `settled` lets through of each partial text is a prefix of the next one's, and
    of the final text: a link is held back until it is whole (and rewritten), and inline
    code until it is closed (and no longer escaped as prose)."""
    streamed = ""
    for length in range(len(answer) + 1):
        partial = to_markdown(answer[:length])
        now = partial[: settled(partial)]
        assert now.startswith(streamed), answer[:length]
        streamed = now
    assert to_markdown(answer).startswith(streamed)
    assert to_markdown(answer).endswith("end ([https://end.example](https://end.example))")


def test_a_bracket_that_opens_no_link_holds_back_only_a_link_labels_length():
    """ "[0, 10)" is no link: its line streams on once it runs past what a label holds."""
    shown = to_markdown("The interval [0, 10) is " + "long " * 40)
    assert settled(shown) == len(shown)
    assert settled(to_markdown("The interval [0, 10) is short")) == len("The interval ")


@pytest.mark.parametrize(
    ("partial", "held"),
    [("see [do", "[do"), ("see [docs]", "[docs]"), ("see [docs](https://e.exa", "[docs]\\(https://e.exa"),
     ("see [docs] now", ""), ("a [b\nc", ""), ("done", "")],
)  # fmt: skip
def test_only_a_link_being_written_is_held_back(partial, held):
    shown = to_markdown(partial)
    assert shown[settled(shown) :] == held
