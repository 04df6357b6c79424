"""A download's progress as log lines, where no terminal shows progress bars.

huggingface_hub draws its bars only on a terminal (tqdm turns itself off elsewhere), so
under Docker or systemd, whose logs are not one, a first start's download of the model
(a gigabyte, or tens for a 7B) said nothing between its first line and the model loaded:
a slow link and a stuck one looked the same. `LoggedProgress`, handed to the hub as its
progress class, logs each bar's state every `EVERY_S` seconds instead.
"""

from __future__ import annotations

import io
import logging
import sys
from typing import Any

from tqdm import tqdm

logger = logging.getLogger(__name__)

EVERY_S = 10.0
LINE = "{desc}: {n_fmt} of {total_fmt} ({percentage:.0f}%) in {elapsed}, {rate_fmt}"


class LoggedProgress(tqdm):  # type: ignore[type-arg]
    """A tqdm bar that logs a line every `EVERY_S` seconds and when it closes, and draws
    nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("name", None)  # huggingface_hub's own bars' argument, not tqdm's
        # Its file takes what tqdm still writes (a newline at its close), not stderr.
        kwargs |= {"disable": False, "mininterval": EVERY_S, "bar_format": LINE}
        kwargs |= {"file": io.StringIO()}
        self._logged = 0  # the count last logged: a refresh with no progress says nothing
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self.n and self.total and self.n != self._logged:  # not a bar just opened
            self._logged = self.n
            logger.info("%s", self.format_meter(**self.format_dict))
        return True


def progress_class() -> type[tqdm] | None:  # type: ignore[type-arg]
    """`LoggedProgress` where stderr is no terminal; None (the hub's own bars) where it is."""
    return None if sys.stderr.isatty() else LoggedProgress
