"""Runs the checks in order, printing each line as it is found (loading a model takes a
while), and turns a check that raises into a FAIL line of its own."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import TextIO

from bot.config import Settings
from bot.doctor.disk_check import check_disk
from bot.doctor.findings import Check, Finding, error_text, exit_status, fail, skip, summary
from bot.doctor.model_check import check_model
from bot.doctor.redis_check import check_redis
from bot.doctor.settings_check import read_settings

logger = logging.getLogger(__name__)


def default_checks() -> list[tuple[str, Check]]:
    """Each check after the settings, by the name its lines start with when it cannot run."""
    from adapters.discord_checks import check_discord
    from adapters.slack_checks import check_slack

    return [
        ("redis", check_redis),
        ("model", check_model),
        ("slack", check_slack),
        ("discord", check_discord),
        ("disk", check_disk),
    ]


async def run_doctor(*, out: TextIO, checks: Sequence[tuple[str, Check]] | None = None) -> int:
    """Check the deployment the settings describe (with `checks`, default: all); print a
    line per finding and a summary to `out`; return the exit status (1 if any failed)."""
    findings: list[Finding] = []

    def show(finding: Finding) -> None:
        findings.append(finding)
        print(finding, file=out, flush=True)

    settings, read = _settings()
    for finding in read:
        show(finding)
    for name, check in default_checks() if checks is None else checks:
        async for finding in _guarded(name, check, settings):
            show(finding)
    print(summary(findings), file=out, flush=True)
    return exit_status(findings)


def _settings() -> tuple[Settings | None, list[Finding]]:
    try:
        return read_settings()
    except Exception as error:  # beyond what load_settings explains (an unreadable .env)
        logger.debug("reading the settings raised", exc_info=True)
        return None, [fail("settings", f"could not be read: {error_text(error)}")]


async def _guarded(name: str, check: Check, settings: Settings | None) -> AsyncIterator[Finding]:
    """The check's findings; a check that raises ends with a FAIL line saying what."""
    if settings is None:
        yield skip(name, "the settings could not be read")
        return
    try:
        async for finding in check(settings):
            yield finding
    except Exception as error:
        logger.debug("the %s check raised", name, exc_info=True)
        yield fail(name, f"the check itself failed: {error_text(error)}")
