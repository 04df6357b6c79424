"""`threadbot doctor`'s Discord checks: the bot token (`GET /users/@me`) and whether the
application may receive message content (its flags, from `GET /applications/@me`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from bot.config import Settings
from bot.doctor.findings import Finding, error_text, fail, ok, skip

CHECK = "discord"
TIMEOUT_S = 10
# Discord asks every bot to say who it is, in the form `DiscordBot (URL or name, version)`.
USER_AGENT = "DiscordBot (threadbot doctor, 1)"
# GATEWAY_MESSAGE_CONTENT (verified apps) or GATEWAY_MESSAGE_CONTENT_LIMITED (the others):
# either means the Message Content intent is on.
MESSAGE_CONTENT_FLAGS = 1 << 18 | 1 << 19
INTENT_HELP = (
    "the Message Content intent is off for the application of DISCORD_BOT_TOKEN, so the "
    "gateway refuses the bot (close code 4014): developer portal → your application → Bot "
    "→ Privileged Gateway Intents → turn on Message Content Intent"
)


class Refused(Exception):
    """Discord answered a request with an error status; the message is the finding."""


async def check_discord(settings: Settings) -> AsyncIterator[Finding]:
    if settings.discord_bot_token is None:
        yield skip(CHECK, "not configured (DISCORD_BOT_TOKEN is unset)")
        return
    headers = {
        "Authorization": f"Bot {settings.discord_bot_token.get_secret_value()}",
        "User-Agent": USER_AGENT,
    }
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    base = settings.discord_api_url.rstrip("/")
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        try:
            me = await _get(session, base, "/users/@me")
            yield ok(CHECK, f"DISCORD_BOT_TOKEN is the bot {me['username']} (id {me['id']})")
            application = await _get(session, base, "/applications/@me")
        except Refused as refused:
            yield fail(CHECK, str(refused))
            return
        except (aiohttp.ClientError, TimeoutError) as error:
            yield fail(
                CHECK,
                f"cannot reach Discord at DISCORD_API_URL={settings.discord_api_url} "
                f"({error_text(error)})",
            )
            return
    if application.get("flags", 0) & MESSAGE_CONTENT_FLAGS:
        yield ok(CHECK, f"the Message Content intent is on for {application['name']}")
    else:
        yield fail(CHECK, INTENT_HELP)


async def _get(session: aiohttp.ClientSession, base: str, path: str) -> dict[str, Any]:
    async with session.get(base + path) as response:
        if response.status == 401:
            raise Refused(
                "Discord refused DISCORD_BOT_TOKEN (401 Unauthorized): set it to the bot's "
                "token (developer portal → your application → Bot → Reset Token)"
            )
        if response.status != 200:
            raise Refused(
                f"GET {path} at DISCORD_API_URL answered HTTP {response.status}: "
                "check DISCORD_API_URL and DISCORD_BOT_TOKEN"
            )
        return await response.json()
