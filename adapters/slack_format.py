"""Model output (Markdown) to Slack text that can never ping anyone or forge a link:
mrkdwn for messages (`text`), Markdown for native streams (`markdown_text`).

Slack reads `<...>` as mentions (`<@U1>`, `<!channel>`) and links (`<url|label>`), so every
`&`, `<` and `>` the model wrote is escaped first; the only links in the result are the
ones built here from Markdown links. Those never carry a label: a link shows its own URL,
and a label that says something else is kept as text beside it, so no text (the model's
or one injected into its prompt) can show one address and link another.
"""

from __future__ import annotations

import re

MESSAGE_LIMIT = 3900  # Slack truncates at 40,000 but advises ~4,000 for readability
MARKDOWN_LIMIT = 12000  # what one `markdown_text` may hold
CODE = re.compile(r"(```.*?(?:```|\Z)|`[^`\n]+`)", re.DOTALL)
LANGUAGE = re.compile(r"(?<=\A```)[\w+#.-]{1,20}(?=\n)")  # a code block's, which mrkdwn shows
# A character of a link's URL, or balanced parentheses one level deep (`…/wiki/Foo_(bar)`),
# which CommonMark allows in a URL too.
URL_PART = r"(?:[^\s()|]|\([^\s()|]*\))"
LINK = re.compile(rf"\[([^\]\n]+)\]\((https?://{URL_PART}+)\)")
SCHEME = re.compile(r"^(?:https?://|mailto:)", re.IGNORECASE)
# `**x**` or `__x__`. As in CommonMark, `__` is never bold inside a word (`snake_case__name`,
# `a__b__c`); nor around an all-lowercase or all-uppercase name, which can't be told from
# Python's or C's (`__init__`, `__FILE__`).
BOLD = re.compile(
    r"\*\*(?=\S)(.+?)(?<=\S)\*\*"
    r"|(?<!\w)__(?!(?:[a-z][a-z0-9_]*|[A-Z][A-Z0-9_]*)__(?!\w))(?=\S)(.+?)(?<=\S)__(?!\w)"
)
BOLD_ITALIC = re.compile(r"\*\*\*(?=\S)(.+?)(?<=\S)\*\*\*")
ITALIC = re.compile(r"(?<![*\w])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![*\w])")
STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)  # `## C#` keeps its #
BULLET = re.compile(r"^([ \t]*)[-*+][ \t]+", re.MULTILINE)
# In Markdown, also every other link form: each `](` left over from LINK, and each `]:`,
# which ends a reference definition (`[1]: https://…`, in a list item or with its label
# over two lines too) that would give `[label][1]` a hidden address.
LINK_OR_BRACKETS = re.compile(rf"{LINK.pattern}|\]\(")
LABEL_AT_MOST = 100  # a `[` with no `]` this far after it opens no link label: its text streams
# The start of a Markdown link still being written: `[label`, `[label]`, `[label](http…`
# (its `](` made text until the link is whole).
LINK_BEING_WRITTEN = re.compile(
    rf"\[[^\]\n]{{0,{LABEL_AT_MOST}}}(?:\](?:\\?\({URL_PART}*(?:\([^\s()|]*)?)?)?\Z"
)
BOLD_MARK = "\x00"  # stands in for Slack's `*` until single-star italics are converted
CODE_MARK = "\x01"  # stands in for each code span while the prose around it is converted
LINK_MARK = "\x02"  # stands in for each link's address, which is never formatted


def escape(text: str) -> str:
    """Slack's three control characters, escaped as its docs require."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_mrkdwn(markdown: str) -> str:
    """Slack mrkdwn for a Markdown answer; code is escaped but otherwise left alone.

    The prose is converted as one text, each code span a mark, so that bold can enclose
    code and a line is a heading or bullet even with code in it. Links are built in each
    piece alone first: a code span's `|` inside one would give it a label."""
    pieces = CODE.split(markdown)
    addresses: list[str] = []

    def link(match: re.Match[str]) -> str:
        addresses.append(f"<{match[2]}>")
        return labelled(*match.groups(), link=LINK_MARK)

    prose = CODE_MARK.join(LINK.sub(link, escape(_unmarked(p))) for p in pieces[::2])
    # Formatted with its links' addresses out of it: `?q=*:*` is no italic.
    prose = _between(_prose(prose).split(LINK_MARK), addresses)
    code = [escape(LANGUAGE.sub("", piece)) for piece in pieces[1::2]]
    return _between(prose.split(CODE_MARK), code)


def to_markdown(markdown: str) -> str:
    """Markdown for Slack's `markdown_text`, which Slack renders itself: escaped, links
    rewritten to show their address as `to_mrkdwn` does, any other link form made text."""
    pieces = CODE.split(markdown)
    return "".join(
        escape(piece) if index % 2 else _markdown_prose(escape(piece))
        for index, piece in enumerate(pieces)
    )


def settled(markdown: str) -> int:
    """How much of a partial `to_markdown` text stays as it is whatever comes next: all of
    it but a link still being written (completed, it is rewritten), and inline code still
    being written (closed, its text is no longer escaped as prose's: `]:` stays `]:`)."""
    ends = [len(markdown)]
    if being_written := LINK_BEING_WRITTEN.search(markdown):
        ends.append(being_written.start())
    # Complete code spans, and a code block to the end, are split out: a backtick left in
    # the last line of the prose after them may open a span its line will close.
    prose = CODE.split(markdown)[-1]
    if (tick := prose.find("`", prose.rfind("\n") + 1)) != -1:
        ends.append(len(markdown) - len(prose) + tick)
    return min(ends)


def _between(parts: list[str], fillings: list[str]) -> str:
    """`parts` joined, each gap filled with the next of `fillings` (one fewer than parts)."""
    return "".join(part + filling for part, filling in zip(parts, [*fillings, ""], strict=True))


def _unmarked(text: str) -> str:
    """Model text without the marks used here, which would be taken for what they stand in for."""
    return text.replace(BOLD_MARK, "").replace(CODE_MARK, "").replace(LINK_MARK, "")


def _prose(text: str) -> str:
    text = HEADING.sub(_heading, text)
    text = BULLET.sub(r"\1• ", text)
    # `***x***` first: as bold, then italic, its markers would cross (`*_x*_`).
    text = BOLD_ITALIC.sub(rf"{BOLD_MARK}_\1_{BOLD_MARK}", text)
    text = BOLD.sub(rf"{BOLD_MARK}\1\2{BOLD_MARK}", text)
    text = ITALIC.sub(r"_\1_", text)
    text = STRIKE.sub(r"~\1~", text)
    return text.replace(BOLD_MARK, "*")


def _heading(match: re.Match[str]) -> str:
    """A heading as one bold line: bold inside it would end the line's bold early."""
    return BOLD_MARK + BOLD.sub(r"\1\2", match[1]) + BOLD_MARK


def _markdown_prose(text: str) -> str:
    text = text.replace("]:", r"]\:")
    return LINK_OR_BRACKETS.sub(lambda m: _markdown_link(m) if m[1] else r"]\(", text)


def _markdown_link(match: re.Match[str]) -> str:
    return labelled(*match.groups(), link=f"[{match[2]}]({match[2]})")


def labelled(label: str, url: str, *, link: str) -> str:
    """A link that shows its own URL, after the label if the label says more."""
    if _bare(label) == _bare(url):
        return link
    return f"{label} ({link})"


def _bare(url: str) -> str:
    """A URL as people write it: without its scheme or a trailing slash."""
    return SCHEME.sub("", url).rstrip("/")
