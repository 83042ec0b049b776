"""The chapters' finished runs: where they live, which is the latest, and what they wrote.

`ema run` (ema_utils.build.orchestrate) executes a chapter into ``<build>/results/<chapter>/<key>/``
and points ``<build>/results/<chapter>/<slot>.json`` at the latest run per *slot*: the profile's
name for its own model, ``<profile>@<model>`` for a model given with ``--model`` (so a run with
another model never replaces the default model's, :func:`run_slot`). Later
chapters read an earlier chapter's artifacts through :func:`chapter_results` and
:func:`chapter_summary`; :data:`DEPENDS_ON` says which chapters each chapter reads, so that a
new run of an earlier chapter re-executes the chapters that read it (its run key is part of
theirs). This module sits low in the library: chapter analyses and notebooks read results
here without importing the build layer that runs the notebooks.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .. import CHAPTERS
from .cache import atomic_write_json
from .errors import EmaError, ParameterError
from .paths import build_dir

DEPENDS_ON: dict[str, tuple[str, ...]] = {
    "setup": (),
    "unlearning": (),
    "cross_domain": ("unlearning",),              # its runs, adapters and trajectories
    "mitigation": ("unlearning",),                # its runs and options (run_options.upstream_options)
    "entanglement": ("cross_domain", "unlearning"),  # EMA measures (concepts.load_ema_measures)
    "narrow_general": ("unlearning", "mitigation"),  # the general and narrow solutions (narrow)
}
"""Chapter -> the earlier chapters whose finished runs (same profile) it reads."""


def check_chapter(chapter: str) -> str:
    if chapter not in CHAPTERS:
        raise ParameterError(f"unknown chapter '{chapter}'; chapters: {', '.join(CHAPTERS)}")
    return chapter


def results_root() -> Path:
    return build_dir() / "results"


SLOT_SEPARATOR = "@"


def run_slot(profile: str, model: str | None = None) -> str:
    """Where a profile's runs are kept apart per model: ``profile`` for the profile's own model
    (``model`` None), else ``profile@model`` with the model made safe for a file name (a hub id's
    "/" or a folder's path become "_")."""
    if not model:
        return profile
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(model)).strip("_.")
    return f"{profile}{SLOT_SEPARATOR}{safe}"


def slot_profile(slot: str) -> str:
    """The profile of a slot (``"smoke@smollm2-135m-instruct"`` -> ``"smoke"``)."""
    return slot.partition(SLOT_SEPARATOR)[0]


def slot_options(slot: str) -> str:
    """The command-line options that select a slot: ``--profile P`` and, for another model's
    slot, ``--model M``."""
    profile, _, model = slot.partition(SLOT_SEPARATOR)
    return f"--profile {profile}" + (f" --model {model}" if model else "")


def slots_with(chapter: str, profile: str) -> list[str]:
    """The slots of ``profile`` with a finished run of ``chapter``: the profile's own model first,
    then the other models in name order."""
    folder = results_root() / check_chapter(chapter)
    found = [p.stem for p in folder.glob("*.json")
             if slot_profile(p.stem) == profile and latest_run_key(chapter, p.stem)]
    return sorted(found, key=lambda s: (s != profile, s))


def pointer_path(chapter: str, profile: str) -> Path:
    """The file naming the latest run of ``chapter`` under ``profile`` (a profile or a slot,
    :func:`run_slot`): its key and folder."""
    return results_root() / chapter / f"{profile}.json"


def point_at(chapter: str, profile: str, key: str, folder: Path) -> Path:
    """Make the run ``key`` (in ``folder``) the latest of ``chapter`` under ``profile``."""
    return atomic_write_json(pointer_path(chapter, profile), {"key": key, "folder": str(folder)})


def latest_run_key(chapter: str, profile: str) -> str | None:
    """The key of the latest finished run of ``chapter`` under ``profile``; None if there is
    none (never run, or its latest run is unfinished)."""
    pointer = pointer_path(check_chapter(chapter), profile)
    if not pointer.is_file():
        return None
    latest = json.loads(pointer.read_text())
    return latest["key"] if (Path(latest["folder"]) / "run.json").is_file() else None


def upstream_keys(chapter: str, profile: str) -> dict[str, str | None]:
    """``{earlier chapter: latest_run_key}`` for each chapter ``chapter`` reads (DEPENDS_ON)."""
    return {up: latest_run_key(up, profile) for up in DEPENDS_ON.get(check_chapter(chapter), ())}


def chapter_results(chapter: str, profile: str) -> Path:
    """The folder of the latest finished run of ``chapter`` under ``profile``."""
    check_chapter(chapter)
    pointer = pointer_path(chapter, profile)
    hint = f"run `ema run {chapter} {slot_options(profile)}` first"
    if not pointer.is_file():
        raise EmaError(f"chapter '{chapter}' has no finished run for {slot_options(profile)}: {hint}")
    folder = Path(json.loads(pointer.read_text())["folder"])
    if not (folder / "run.json").is_file():
        raise EmaError(f"the run of chapter '{chapter}' at {folder} is unfinished: {hint}")
    return folder


def chapter_summary(chapter: str, profile: str) -> dict:
    folder = chapter_results(chapter, profile)
    path = folder / "summary.json"
    if not path.is_file():
        raise EmaError(f"chapter '{chapter}' wrote no summary.json in {folder}")
    return json.loads(path.read_text())


def save_summary(results_dir, summary: dict) -> Path:
    """Called by a notebook: the chapter's key numbers, for `ema results` and later chapters."""
    return atomic_write_json(Path(results_dir) / "summary.json", summary)


def json_records(table: pd.DataFrame, digits: int = 4) -> list[dict]:
    """A table as JSON-safe records for a chapter summary: rounded, NaN as None, inf as "inf"."""
    out = []
    for record in table.round(digits).to_dict("records"):
        for key, value in record.items():
            if isinstance(value, float) and math.isnan(value):
                record[key] = None
            elif isinstance(value, float) and math.isinf(value):
                record[key] = "inf" if value > 0 else "-inf"
            elif isinstance(value, np.generic):
                record[key] = value.item()
        out.append(record)
    return out
