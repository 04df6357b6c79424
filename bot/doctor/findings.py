"""What a check finds: one line each, marked ok, WARN, FAIL or skip."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.config import Settings


class Status(StrEnum):
    OK = "ok"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "skip"  # not configured, or it needs what an earlier check found missing


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of the report: `message` says what was found and, on WARN or FAIL, what
    to fix, naming the setting."""

    status: Status
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.status:<4}  {self.check}: {self.message}"


Check = Callable[["Settings"], AsyncIterator[Finding]]


def ok(check: str, message: str) -> Finding:
    return Finding(Status.OK, check, message)


def warn(check: str, message: str) -> Finding:
    return Finding(Status.WARN, check, message)


def fail(check: str, message: str) -> Finding:
    return Finding(Status.FAIL, check, message)


def skip(check: str, message: str) -> Finding:
    return Finding(Status.SKIP, check, message)


def exit_status(findings: Iterable[Finding]) -> int:
    """1 if any check failed; warnings alone leave it 0."""
    return int(any(finding.status is Status.FAIL for finding in findings))


def summary(findings: list[Finding]) -> str:
    failed = sum(finding.status is Status.FAIL for finding in findings)
    warned = sum(finding.status is Status.WARN for finding in findings)
    if not failed and not warned:
        return "all checks passed"
    return f"{failed} failed, {warned} {'warning' if warned == 1 else 'warnings'}"


UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(size: float) -> str:
    """1536 → '1.5 KiB', as an operator reads sizes."""
    exponent = 0
    while size >= 1024 and exponent < len(UNITS) - 1:
        size /= 1024
        exponent += 1
    return f"{size:.0f} B" if exponent == 0 else f"{size:.1f} {UNITS[exponent]}"


def error_text(error: BaseException) -> str:
    """An exception as one line: its type, and its message where it has one."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
