"""Where the project keeps its files: the source tree, the data, and the caches.

The model cache defaults to ~/.cache/ema-companion so that a fresh clone reuses de-quantized
models; set EMA_CACHE_DIR to move it. Build products (executed notebooks, results, HTML) live
in the project under _build/ unless EMA_BUILD_DIR says otherwise. The chapter notebooks are
read from notebooks/ unless EMA_NOTEBOOK_DIR names another folder (with the same
NN_<chapter>.ipynb names: for edited copies of the chapters, and for the tests, which run
stand-in notebooks in a subprocess).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # ema_utils/core/paths.py -> the project
DATA_DIR = PROJECT_ROOT / "data"
NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"


def cache_dir() -> Path:
    """The model cache folder (EMA_CACHE_DIR, default ~/.cache/ema-companion)."""
    env = os.environ.get("EMA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ema-companion"


def build_dir() -> Path:
    """Build products: executed notebooks, the results cache and the HTML (EMA_BUILD_DIR)."""
    env = os.environ.get("EMA_BUILD_DIR")
    return Path(env).expanduser() if env else PROJECT_ROOT / "_build"


def notebook_dir() -> Path:
    """The folder of the chapter notebooks (EMA_NOTEBOOK_DIR, default notebooks/)."""
    env = os.environ.get("EMA_NOTEBOOK_DIR")
    return Path(env).expanduser() if env else NOTEBOOK_DIR


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks so a 2 GB file needs no 2 GB of memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dtype_check_file(profile: str) -> Path:
    """Where `ema bench --dtype-check --profile P` keeps its last report (the book reads it)."""
    return build_dir() / "results" / "dtype_check" / f"{profile}.json"


def bench_report_file() -> Path:
    """Where `ema bench` keeps its last full report (the book's reproducibility page reads it)."""
    return build_dir() / "results" / "bench" / "last.json"
