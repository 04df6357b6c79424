"""Model output (Markdown) to Slack mrkdwn that can never ping anyone or forge a link.

Slack reads `<...>` as mentions (`<@U1>`, `<!channel>`) and links (`<url|label>`), so every
`&`, `<` and `>` the model wrote is escaped first; the only links in the result are the
ones built here from Markdown links. Those never carry a label: a link shows its own URL,
and a label that says something else is kept as text beside it, so no text (the model's
or one injected into its prompt) can show one address and link another.
"""

from __future__ import annotations

import re

CODE = re.compile(r"(```.*?(?:```|\Z)|`[^`\n]+`)", re.DOTALL)
LINK = re.compile(r"\[([^\]\n]+)\]\((https?://[^\s)|]+)\)")
SCHEME = re.compile(r"^https?://", re.IGNORECASE)
BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__")
ITALIC = re.compile(r"(?<![*\w])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![*\w])")
STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
BULLET = re.compile(r"^([ \t]*)[-*+][ \t]+", re.MULTILINE)
BOLD_MARK = "\x00"  # stands in for Slack's `*` until single-star italics are converted


def escape(text: str) -> str:
    """Slack's three control characters, escaped as its docs require."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_mrkdwn(markdown: str) -> str:
    """Slack mrkdwn for a Markdown answer; code is escaped but otherwise left alone."""
    pieces = CODE.split(markdown)
    return "".join(
        escape(piece) if index % 2 else _prose(escape(piece)) for index, piece in enumerate(pieces)
    )


def _prose(text: str) -> str:
    text = LINK.sub(_link, text)
    text = HEADING.sub(rf"{BOLD_MARK}\1{BOLD_MARK}", text)
    text = BULLET.sub(r"\1• ", text)
    text = BOLD.sub(lambda m: f"{BOLD_MARK}{m.group(1) or m.group(2)}{BOLD_MARK}", text)
    text = ITALIC.sub(r"_\1_", text)
    text = STRIKE.sub(r"~\1~", text)
    return text.replace(BOLD_MARK, "*")


def _link(match: re.Match[str]) -> str:
    """`<url>`, which Slack shows as the URL itself, after the label if it says more."""
    label, url = match.groups()
    if _bare(label) == _bare(url):
        return f"<{url}>"
    return f"{label} (<{url}>)"


def _bare(url: str) -> str:
    """A URL as people write it: without its scheme or a trailing slash."""
    return SCHEME.sub("", url).rstrip("/")
