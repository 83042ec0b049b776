"""Shared fixtures. Unit tests use the tiny random model; the default model only in integration."""

import os

import pytest

# Quiet and deterministic: no tokenizer thread pools fighting pytest for two cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the tiny random Qwen2, built once per test session."""
    from ema_utils.models import load_model

    return load_model("tiny-random")


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A private model cache folder, so tests never touch the user's cache."""
    monkeypatch.setenv("EMA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"
