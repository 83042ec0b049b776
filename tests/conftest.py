"""Shared fixtures. Unit tests use the tiny random model; the default model only in integration."""

import os

import pytest

# Quiet and deterministic: no tokenizer thread pools fighting pytest for two cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Unit tests run tiny models. With two threads on a busy 2-core machine, OpenMP spin-waiting
# made tiny operations about 100x slower (measured). One thread for the whole session; the
# smoke book runs in its own processes with torch's defaults.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the tiny random Qwen2, built once per test session."""
    from ema_utils.core.models import load_model

    return load_model("tiny-random")


@pytest.fixture
def canned_refusals(monkeypatch):
    """The tiny random model refuses nothing: pretend it refused every prompt, with one refusal."""
    from ema_utils import sets

    def fake(model, tokenizer, table, judge, max_new_tokens, batch_size, progress):
        return table[["id", "concept", "prompt"]].assign(
            response="I'm sorry, but I can't assist with that.", complete=True, is_refusal=True)

    monkeypatch.setattr(sets, "_generate_and_judge", fake)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A private model cache folder, so tests never touch the user's cache."""
    monkeypatch.setenv("EMA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


SECOND_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory):
    """`ema book --profile smoke` run once, as a user would, in a private build folder, after
    `ema run setup --profile smoke --model smollm2-135m-instruct` (a second model's chapter 1).

    Uses the real default model on a handful of prompts (about 25 minutes on 2 cores).
    """
    import subprocess
    import sys

    build = tmp_path_factory.mktemp("smoke-build")
    env = {**os.environ, "EMA_BUILD_DIR": str(build)}
    # A researcher's second model first (chapter 1 only): the book's comparison page shows it
    # beside the default model, whose chapters must not be touched by it.
    other = subprocess.run([sys.executable, "-m", "ema_utils.cli", "run", "setup", "--profile",
                            "smoke", "--model", SECOND_MODEL], env=env, capture_output=True,
                           text=True, timeout=1800)
    assert other.returncode == 0, f"ema run setup --model {SECOND_MODEL} failed:\n{other.stderr[-4000:]}"
    proc = subprocess.run([sys.executable, "-m", "ema_utils.cli", "book", "--profile", "smoke"],
                          env=env, capture_output=True, text=True, timeout=4800)
    assert proc.returncode == 0, f"ema book --profile smoke failed:\n{proc.stderr[-4000:]}"
    return {"build": build, "env": env, "html": build / "book" / "smoke" / "_build" / "html",
            "log": proc.stderr, "second_model": SECOND_MODEL}
