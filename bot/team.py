"""The team's rules in effect now (access, admins, personas, limits), swapped on reload.

Everything that reads a rule reads `team.settings` when it needs it, so a reload (SIGHUP or
the admin `reload` command) takes effect at the next message, with no connection dropped.
Settings that shape the process (the model, Redis, tokens) keep their start values until
a restart; a reload says which of them changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from bot.access import OPERATOR_PLATFORMS
from bot.config import ConfigError, Settings, config_file, load_settings

logger = logging.getLogger(__name__)

LIVE = frozenset({"access", "personas", "system_prompt", "max_attachment_chars",
                  "strip_reasoning", "max_input_chars", "max_pending_per_user"})  # fmt: skip
"""The settings a reload changes; the others need a restart."""


class Team:
    def __init__(self, settings: Settings, *, load: Callable[[], Settings] = load_settings) -> None:
        self.settings = settings
        self._load = load
        self._file = config_file()  # where the rules came from, if a file

    def is_admin(self, user: str, platform: str = "") -> bool:
        return user in self.settings.access.admins or platform in OPERATOR_PLATFORMS

    def reload(self) -> str:
        """Read the settings again. Raises ConfigError (the old ones stay) if they are
        invalid, or their file is gone (moved aside, not emptied); else says what
        changed."""
        if self._file is not None and config_file() is None:
            raise ConfigError(f"{self._file} is gone: the rules read from it stay in effect")
        new, self._file = self._load(), config_file()
        changed = self._changed(new)
        later = [name.upper() for name in changed if name not in LIVE]
        self.settings = self.settings.model_copy(
            update={name: getattr(new, name) for name in changed if name in LIVE}
        )
        summary = f"configuration reloaded: {', '.join(changed) or 'nothing'} changed"
        if later:
            summary += f" ({', '.join(later)} only after a restart)"
        logger.info("%s", summary)
        return summary

    def catch_up(self) -> None:
        """Reload where the settings changed since they were read, quietly where they did
        not: a `reload` command run elsewhere before this process first read the count of
        them (`bot.runtime`) is counted as seen, and would be missed."""
        try:
            if self._changed(self._load()):
                self.reload()
        except ConfigError as error:
            logger.error("configuration not reloaded; the rules read at start stay: %s", error)

    def _changed(self, new: Settings) -> list[str]:
        fields = Settings.model_fields
        return sorted(name for name in fields if getattr(new, name) != getattr(self.settings, name))
