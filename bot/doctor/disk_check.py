"""Free disk where the bot writes: DATA_DIR (the embedded Redis's AOF, converted models)
and the Hugging Face cache (model downloads)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from bot.config import Settings
from bot.doctor.findings import Finding, human_bytes, ok, warn

CHECK = "disk"
GiB = 2**30
# The AOF grows with every conversation, and a converted GGUF model takes about 0.5 GiB.
DATA_DIR_LOW = 1 * GiB
# Qwen2.5-0.5B takes 1 GiB; larger models take many (a 7B model about 15 GiB).
HF_CACHE_LOW = 5 * GiB


async def check_disk(
    settings: Settings, *, data_dir_low: int = DATA_DIR_LOW, hf_cache_low: int = HF_CACHE_LOW
) -> AsyncIterator[Finding]:
    from huggingface_hub.constants import HF_HUB_CACHE

    yield free_space(settings.data_dir, "DATA_DIR", data_dir_low)
    yield free_space(Path(HF_HUB_CACHE), "HF_HOME", hf_cache_low)


def free_space(path: Path, setting: str, low: int) -> Finding:
    """Free bytes on the disk that holds `path` (or will, once it is created), warned
    under `low`; `setting` is what moves it elsewhere."""
    free = shutil.disk_usage(_nearest_existing(path.expanduser().absolute())).free
    facts = f"{setting} ({path}): {human_bytes(free)} free"
    if free < low:
        return warn(
            CHECK,
            f"{facts}, under {human_bytes(low)}: free some space, or set {setting} to a "
            "folder on a larger disk",
        )
    return ok(CHECK, facts)


def _nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (the one a mkdir would write into)."""
    return next(folder for folder in (path, *path.parents) if folder.exists())
