"""Which weights MODEL names: the bundled model, the hub fallback, and clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bot import loading
from bot.config import Settings
from bot.loading import ModelError, ModelSource


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)


def test_bundled_names_the_offline_gguf():
    source = loading.resolve_source(settings(model="bundled"))
    assert source.gguf_file == loading.BUNDLED_FILE
    assert Path(source.path, source.gguf_file).is_file()


def unreachable(repo_id: str, gguf_file: str | None = None) -> str:
    """Stands in for the hub download when the hub cannot be reached."""
    raise OSError("no network")


def test_unset_model_falls_back_to_bundled_when_the_hub_is_out_of_reach(monkeypatch, caplog):
    monkeypatch.setattr(loading, "_download", unreachable)
    with caplog.at_level(logging.WARNING, logger="bot.loading"):
        source = loading.resolve_source(settings())
    assert source == loading.bundled_source()
    [line] = [record.getMessage() for record in caplog.records]
    assert "Qwen/Qwen2.5-0.5B-Instruct" in line and "bundled" in line


def test_an_explicit_model_never_falls_back(monkeypatch):
    monkeypatch.setattr(loading, "_download", unreachable)
    with pytest.raises(ModelError, match="MODEL=someone/some-model is neither a local folder"):
        loading.resolve_source(settings(model="someone/some-model"))


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(ModelError, match=r"MODEL=.*no-such-model is not a folder"):
        loading.resolve_source(settings(model=str(tmp_path / "no-such-model")))


def test_a_folder_without_a_model_is_named(tmp_path):
    source = loading.resolve_source(settings(model=str(tmp_path)))
    with pytest.raises(ModelError, match=r"has no config\.json"):
        loading.load(source, device="cpu", dtype="auto", cache_dir=tmp_path / "models")


def test_a_missing_gguf_file_is_named(tmp_path):
    source = ModelSource(str(tmp_path), "absent.gguf")
    with pytest.raises(ModelError, match=r"MODEL_FILE=absent\.gguf is not a file"):
        loading.load(source, device="cpu", dtype="auto", cache_dir=tmp_path / "models")


@pytest.mark.slow
def test_the_converted_gguf_is_reused(bundled_engine, bundled_cache):
    """The one-time conversion leaves a plain model folder that later starts load directly."""
    [folder] = [path for path in bundled_cache.iterdir() if (path / "config.json").is_file()]
    source = loading.bundled_source()
    assert source is not None
    assert loading._converted_gguf(source, bundled_cache) == ModelSource(str(folder))


def test_the_model_is_named_as_it_was_found():
    """`status` and the build-info metric name the model that runs, not the one asked for."""
    from bot.runtime import model_name

    bundled = loading.bundled_source()
    assert bundled is not None
    assert model_name(settings(), bundled) == "bundled"  # the default could not be had
    assert model_name(settings(), ModelSource("/cache/qwen")) == loading.DEFAULT_MODEL
    assert model_name(settings(model="./qwen"), ModelSource("./qwen")) == "./qwen"
