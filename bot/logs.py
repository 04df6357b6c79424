"""Logging, as the entry point sets it up: our loggers at LOG_LEVEL, libraries at WARNING,
everything on stderr (stdout is the conversation), as text or as one JSON object a line.

Warnings, uncaught errors in threads and errors Python can only report
(`sys.unraisablehook`) go through logging, and so does transformers (which has a handler
of its own; `adopt_transformers` sends its records to ours): everything on stderr takes
one form. In JSON mode every line must parse, so the progress bars of huggingface_hub,
transformers and tqdm, which draw with carriage returns, are turned off.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from datetime import UTC, datetime
from typing import Any, Literal

OUR_LOGGERS = ("bot", "adapters", "storage")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Read by huggingface_hub (and through it transformers) and by tqdm when first imported.
NO_PROGRESS_BARS = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
# What every LogRecord has; anything else on a record came from `extra=` and is a field.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

logger = logging.getLogger(__name__)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the
    record's `extra` fields, and the traceback, if any, as one string."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: Literal["text", "json"] = "text") -> None:
    """Our loggers at `level`, libraries at WARNING, on stderr in `log_format`."""
    if log_format == "json":
        os.environ.update(NO_PROGRESS_BARS)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_error
    sys.unraisablehook = _log_unraisable


def adopt_transformers() -> None:
    """Send transformers' records (its own handler writes `[transformers] …` lines) to ours,
    in our format; call once transformers is to be imported anyway."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()


def _log_thread_error(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread else "a thread"
    logger.critical("uncaught error in %s", name,
                    exc_info=(args.exc_type, args.exc_value, args.exc_traceback))  # fmt: skip


def _log_unraisable(unraisable: Any) -> None:
    # `Exception ignored in: …` that Python would print itself (e.g. in a finalizer).
    logger.error(
        "%s: %r",
        unraisable.err_msg or "Exception ignored in",
        unraisable.object,
        exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
    )
