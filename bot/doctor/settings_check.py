"""The first check: the settings and the team's file, read as `threadbot run` reads them.

A bad value is reported, and the other checks still run: on the settings read again
with each bad one at its default (and unknown names or an unreadable file left out), so
one mistake hides no other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from bot.config import (
    ConfigError,
    Settings,
    SettingsInDotEnv,
    config_file,
    load_settings,
    misspelt_settings,
)
from bot.doctor.findings import Finding, fail, ok, warn

CHECK = "settings"
NO_PLATFORM = (
    "no platform is configured (SLACK_BOT_TOKEN and DISCORD_BOT_TOKEN are unset): "
    "`threadbot run` will not start but as `--role worker`; `threadbot chat` needs none"
)
SALVAGE_ROUNDS = 4
"""Each round resets what failed: a setting, then, where its default fails too, the
settings it is at odds with (MAX_CONTEXT_TOKENS' beside MAX_NEW_TOKENS); then it reads."""


class _LenientEnvironment(EnvSettingsSource):
    """The environment as the settings read it, less a setting with parts whose value is
    not JSON (`ACCESS__ADMINS=U1`): pydantic-settings refuses the whole source for it."""

    def prepare_field_value(
        self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool
    ) -> Any:
        try:
            return super().prepare_field_value(field_name, field, value, value_is_complex)
        except ValueError:
            return None  # read as unset


class _LenientDotEnv(_LenientEnvironment, SettingsInDotEnv):
    """`.env` as the settings read it, less the same."""


class _Lenient(Settings):
    """The settings without the objections already reported: unknown names are ignored,
    a setting with parts that is not JSON is unset, and an unreadable team file is left out."""

    model_config = SettingsConfigDict(extra="ignore")
    dotenv_source = _LenientDotEnv

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environment = _LenientEnvironment(settings_cls)
        try:
            return super().settings_customise_sources(
                settings_cls, init_settings, environment, dotenv_settings, file_secret_settings
            )
        except (yaml.YAMLError, OSError, ConfigError):
            return init_settings, environment, dotenv_settings, file_secret_settings


def read_settings() -> tuple[Settings | None, list[Finding]]:
    """The settings to check the rest with (None if nothing usable could be read), and one
    line per problem with them (or one ok line), then one per likely typo in the
    environment's names."""
    typos = [warn(CHECK, line) for line in misspelt_settings()]
    try:
        settings = load_settings()
    except ConfigError as error:
        salvaged = _salvaged()
        after = (
            "the checks below go on without it"
            if salvaged is not None
            else "nothing else can be checked"
        )
        failed = [fail(CHECK, f"{problem} ({after})") for problem in str(error).splitlines()]
        return salvaged, failed + _platforms(salvaged) + typos
    return settings, [
        ok(CHECK, f"read from {', '.join(_sources())}"),
        *_platforms(settings),
        *typos,
    ]


def _platforms(settings: Settings | None) -> list[Finding]:
    """A warning where the settings name no platform for `threadbot run` to serve."""
    if settings is None or settings.slack_bot_token or settings.discord_bot_token:
        return []
    return [warn(CHECK, NO_PLATFORM)]


def _salvaged() -> Settings | None:
    defaults: dict[str, Any] = {}
    for _ in range(SALVAGE_ROUNDS):
        try:
            return _Lenient(**defaults)
        except (UnicodeDecodeError, OSError, SettingsError):
            return None  # `.env` cannot be read
        except ValidationError as error:
            bad = set()
            for problem in error.errors():
                name = str(problem["loc"][0]) if problem["loc"] else ""
                bad |= set(problem.get("ctx", {}).get("beside", ())) if name in defaults else {name}
            if not bad or "" in bad or bad <= defaults.keys():
                return None  # a problem no setting's default fixes
            defaults |= {
                name: Settings.model_fields[name].get_default(call_default_factory=True)
                for name in bad
            }
    return None


def _sources() -> list[str]:
    sources = ["the environment"]
    if Path(".env").is_file():
        sources.append(".env")
    if (path := config_file()) is not None:
        sources.append(str(path))
    return sources
