"""The results cache: artifacts written atomically under keys derived from what produced them.

Two levels, both content-addressed:

- a chapter run lives in ``<build>/results/<chapter>/<key>/`` where the key hashes the chapter,
  its parameters, its notebook, the library's code, the model digest, the data digest and the
  keys of the earlier chapters' runs it reads (see ema_utils.build.orchestrate.run_key);
- inside a chapter, :func:`cached` stores each expensive step (generations, adapters, metrics)
  under ``<build>/results/store/<name>-<hash of its own inputs>``, so a changed parameter
  recomputes only the steps that depend on it, and chapters share work (chapter 3 reuses the
  aligned model's generations from chapter 1 when the inputs are the same).

Every write goes to a temporary name in the same folder and is renamed into place, so a run
killed at any point leaves either the whole artifact or nothing a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import EmaError
from .paths import build_dir


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of a JSON-able object, independent of dict order."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def store_dir() -> Path:
    return build_dir() / "results" / "store"


def _tmp_sibling(path: Path, is_dir: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write text to ``path`` via a temporary file and a rename."""
    tmp = _tmp_sibling(Path(path))
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return Path(path)


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str, sort_keys=True))


def atomic_write_table(path: Path, table: pd.DataFrame) -> Path:
    """A table as JSON lines (readable by anyone, exact for strings and floats)."""
    return atomic_write_text(path, table.to_json(orient="records", lines=True, force_ascii=False))


def read_table(path: Path) -> pd.DataFrame:
    if Path(path).stat().st_size == 0:
        return pd.DataFrame()
    return pd.read_json(path, orient="records", lines=True, dtype=False)


def atomic_write_dir(path: Path, fill: Callable[[Path], None]) -> Path:
    """Create folder ``path`` by letting ``fill`` write into a temporary folder, then renaming."""
    path = Path(path)
    tmp = _tmp_sibling(path, is_dir=True)
    try:
        fill(tmp)
        (tmp / ".complete").write_text("ok")  # written last: a folder without it is unfinished
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


_KINDS = {
    "json": (".json", atomic_write_json, lambda p: json.loads(Path(p).read_text())),
    "table": (".jsonl", atomic_write_table, read_table),
}


def cached(name: str, inputs: dict, compute: Callable[[], Any], kind: str = "json",
           folder: Path | None = None):
    """Return the stored result of ``compute()`` for these ``inputs``, computing it once.

    ``kind`` is "json" (any JSON-able value), "table" (a pandas DataFrame) or "dir" (``compute``
    receives a folder to fill, e.g. a LoRA adapter, and the folder's path is returned).
    """
    folder = Path(folder) if folder else store_dir()
    key = f"{name}-{stable_hash(inputs)}"
    if kind == "dir":
        path = folder / key
        if (path / ".complete").is_file():
            return path
        atomic_write_dir(path, compute)
        atomic_write_json(folder / f"{key}.inputs.json", inputs)
        return path
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of json, table, dir; got {kind!r}")
    suffix, write, read = _KINDS[kind]
    path = folder / f"{key}{suffix}"
    if path.is_file():
        return read(path)
    value = compute()
    write(path, value)
    # Record what produced the artifact beside it, for the reproducibility page and for people.
    atomic_write_json(folder / f"{key}.inputs.json", inputs)
    return value


def writable_dir(folder: Path, env_var: str) -> Path:
    """Create ``folder`` if needed and check that a file can be written in it.

    Raises EmaError naming the folder and the environment variable that moves it, so a run
    stops before any work instead of failing at its first write.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ema-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise EmaError(
            f"cannot write to the folder {folder} ({reason}). Point {env_var} at a writable "
            f"folder, e.g. `export {env_var}=$HOME/ema-{env_var.split('_')[1].lower()}`, or "
            "free the path / fix its permissions"
        ) from None
    return folder
