"""Slack's files on a message (`event["files"]`) as attachments the bot can read.

Slack serves a file's `url_private_download` (or `url_private`) only with the bot token as
`Authorization: Bearer` and the app's `files:read` scope; without them it answers with its
sign-in page, an HTML 200, which must not be read as the file. An HTML file is told from
that page by its size, which the event gives.

A remote file (`is_external`: Google Drive's, or one an app added) has as its URL wherever
it lives, any host: the token goes to Slack's own hosts alone (those of its API, and their
subdomains), and such a file is named only.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from slack_sdk.web.async_client import AsyncWebClient

from adapters.attachments import Attachment

CHUNK_BYTES = 64 * 1024


class SlackDownloadRefused(Exception):
    """Slack answered a download with its sign-in page."""

    def __init__(self) -> None:
        super().__init__(
            "Slack sent its sign-in page instead of the file: does the app have the "
            "files:read scope?"
        )


def slack_attachments(files: Sequence[dict[str, Any]], client: AsyncWebClient) -> list[Attachment]:
    """The files of a message event, read from Slack at `client`'s API hosts, as its calls
    go (its token, and its proxy: slack_sdk's, from HTTPS_PROXY where none is set). A file
    Slack only refers to (Slack Connect's `check_file_info`, or one hidden by a plan's
    limits) has no URL: it is named only."""
    return [_attachment(file, client) for file in files]


def _attachment(file: dict[str, Any], client: AsyncWebClient) -> Attachment:
    url = file.get("url_private_download") or file.get("url_private")
    mimetype = file.get("mimetype") or ""
    download = None
    if url and client.token and not file.get("is_external") and _on_slack(url, client.base_url):
        download = partial(
            _download, url, client=client, html=mimetype.startswith("text/html"),
            size=file.get("size"),
        )  # fmt: skip
    name = file.get("name") or file.get("title") or ""
    return Attachment(name=name, mimetype=mimetype, size=file.get("size"), download=download)


def _on_slack(url: str, api_url: str) -> bool:
    """Whether `url` is on the API's host or a subdomain of it (files.slack.com for
    slack.com), by the same scheme and port: the bot's token goes with the request."""
    where, api = urlsplit(url), urlsplit(api_url)
    same_way = (where.scheme, where.port) == (api.scheme, api.port)
    if not where.hostname or not api.hostname or not same_way:
        return False
    return where.hostname == api.hostname or where.hostname.endswith(f".{api.hostname}")


async def _download(
    url: str, wanted: int, *, client: AsyncWebClient, html: bool, size: int | None
) -> bytes:
    """The first `wanted` bytes of a file (all of a shorter one); nothing more is read, but
    where HTML comes back for an HTML file: up to a byte past its size, to be told from the
    sign-in page by its length (files past MAX_FILE_BYTES are not downloaded)."""
    headers = {"Authorization": f"Bearer {client.token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers, proxy=client.proxy, ssl=client.ssl) as response,
    ):
        response.raise_for_status()
        page = response.content_type == "text/html"
        if page and not html:
            raise SlackDownloadRefused()
        measured = page and size is not None
        enough = max(wanted, size + 1) if measured else wanted
        data = bytearray()
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            data += chunk
            if len(data) >= enough:
                break
        if measured and len(data) != size:
            raise SlackDownloadRefused()  # HTML, but not as long as the file
        return bytes(data[:wanted])
