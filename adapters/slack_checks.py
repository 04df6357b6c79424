"""`threadbot doctor`'s Slack checks: the bot token (`auth.test`), the scopes the app was
granted against what slack-app-manifest.yml asks for, and the way events arrive."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import yaml
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.config import Settings
from bot.doctor.findings import Finding, error_text, fail, ok, skip, warn

CHECK = "slack"
TIMEOUT_S = 10
MANIFEST = "slack-app-manifest.yml"
# Beside the code in a checkout; in the working directory where the code is installed.
MANIFEST_PLACES = (Path(__file__).resolve().parents[1], Path())
REFUSED_TOKEN = {"invalid_auth", "not_authed", "account_inactive", "token_revoked",
                 "token_expired", "not_allowed_token_type"}  # fmt: skip
WHERE_TOKENS_ARE = {
    "SLACK_BOT_TOKEN": "the Bot User OAuth Token (xoxb-…) under OAuth & Permissions",
    "SLACK_APP_TOKEN": "an app-level token (xapp-…) with connections:write, under Basic "
    "Information → App-Level Tokens",
}


async def check_slack(settings: Settings) -> AsyncIterator[Finding]:
    if settings.slack_bot_token is None:
        yield skip(CHECK, "not configured (SLACK_BOT_TOKEN is unset)")
        return
    client = AsyncWebClient(
        token=settings.slack_bot_token.get_secret_value(),
        base_url=settings.slack_api_url,
        timeout=TIMEOUT_S,
    )
    try:
        identity = await client.auth_test()
    except SlackApiError as error:
        yield fail(CHECK, _refusal("SLACK_BOT_TOKEN", error, settings))
        return
    except (aiohttp.ClientError, TimeoutError) as error:
        yield fail(CHECK, _unreachable(error, settings))
        return
    yield ok(
        CHECK,
        f"SLACK_BOT_TOKEN is the bot {identity['user']} ({identity['user_id']}) "
        f"in {identity['team']} ({identity['team_id']})",
    )
    yield judge_scopes(identity.headers.get("X-OAuth-Scopes"), manifest_scopes())
    yield await _event_delivery(settings, client)


def judge_scopes(header: str | None, wanted: list[str] | None) -> Finding:
    """The scopes Slack says the token has (its X-OAuth-Scopes header) against `wanted`."""
    if header is None:
        return warn(CHECK, "Slack did not say which scopes SLACK_BOT_TOKEN has (no X-OAuth-Scopes)")
    granted = {scope.strip() for scope in header.split(",") if scope.strip()}
    if wanted is None:
        return warn(
            CHECK,
            f"{MANIFEST} not found (beside the code or in the working directory), so the "
            f"scopes were not compared; the token has: {', '.join(sorted(granted))}",
        )
    if missing := [scope for scope in wanted if scope not in granted]:
        return fail(
            CHECK,
            f"the app of SLACK_BOT_TOKEN lacks the scopes {', '.join(missing)} that {MANIFEST} "
            "asks for: add them (api.slack.com/apps → your app → OAuth & Permissions, or "
            "update the app from the manifest), then reinstall the app to the workspace",
        )
    return ok(CHECK, f"all {len(wanted)} scopes {MANIFEST} asks for are granted")


def manifest_scopes() -> list[str] | None:
    """The bot scopes slack-app-manifest.yml asks for, or None where it is not found."""
    for folder in MANIFEST_PLACES:
        if (path := folder / MANIFEST).is_file():
            return list(yaml.safe_load(path.read_text())["oauth_config"]["scopes"]["bot"])
    return None


async def _event_delivery(settings: Settings, client: AsyncWebClient) -> Finding:
    """Socket Mode (its app-level token is tried) or the HTTP Events API; one is needed."""
    if settings.slack_app_token is not None:
        try:
            await client.apps_connections_open(
                app_token=settings.slack_app_token.get_secret_value()
            )
        except SlackApiError as error:
            return fail(CHECK, _refusal("SLACK_APP_TOKEN", error, settings))
        except (aiohttp.ClientError, TimeoutError) as error:
            return fail(CHECK, _unreachable(error, settings))
        return ok(CHECK, "Socket Mode: SLACK_APP_TOKEN may connect")
    if settings.slack_signing_secret is not None:
        if not settings.http_port:
            return fail(
                CHECK,
                "HTTP events are served on HTTP_PORT, which is 0: set HTTP_PORT to the port "
                "that Slack's request URL reaches",
            )
        return ok(
            CHECK,
            f"HTTP events on HTTP_PORT={settings.http_port}: Slack must reach /slack/events "
            "there (SLACK_SIGNING_SECRET is checked on the first event, not from here)",
        )
    return fail(
        CHECK,
        "no way for events to arrive: set SLACK_APP_TOKEN (Socket Mode) or "
        "SLACK_SIGNING_SECRET (HTTP events)",
    )


def _refusal(setting: str, error: SlackApiError, settings: Settings) -> str:
    code = error.response.get("error") if isinstance(error.response.data, dict) else None
    if code in REFUSED_TOKEN:
        return (
            f"Slack refused {setting} ({code}): set it to {WHERE_TOKENS_ARE[setting]} "
            "(api.slack.com/apps → your app)"
        )
    return (
        f"{setting} could not be checked at SLACK_API_URL={settings.slack_api_url} "
        f"({code or f'HTTP {error.response.status_code}'})"
    )


def _unreachable(error: BaseException, settings: Settings) -> str:
    return f"cannot reach Slack at SLACK_API_URL={settings.slack_api_url} ({error_text(error)})"
