"""Run the chapter notebooks with papermill, cache their results, and build the book.

A chapter run is keyed by (chapter, parameters, notebook, code, model digest, data digest, and
the keys of the latest finished runs of the earlier chapters it reads, ``DEPENDS_ON`` in
ema_utils.core.results). The executed notebook, its run record and its summary live in
``<build>/results/<chapter>/<key>/``; a run whose key already has a finished folder does no
model work at all. A pointer file ``<build>/results/<chapter>/<slot>.json`` names the key of
the latest run per slot (the profile, or ``<profile>@<model>`` for a ``--model`` other than the
profile's: ema_utils.core.results.run_slot), which is how later chapters and ``ema results``
find an earlier chapter's artifacts. Each slot has its own executed chapters and its own book,
so a run with another model never replaces the default model's.

While a chapter executes, what the library logs and its progress bars go to the terminal that
runs `ema run`/`ema book` (ema_utils.core.console.ProgressRelay), never into the page.

Before papermill starts, every parameter value is checked by name (:func:`validate_parameters`)
and the build folder is checked for writing, so a mistake fails in a second, not inside a
notebook. Notebooks are read from notebooks/ or from EMA_NOTEBOOK_DIR (see ema_utils.core.paths).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from .. import CHAPTERS, CONCEPTS
from ..core.cache import atomic_write_json, stable_hash, writable_dir
from ..core.console import ProgressRelay, emit
from ..core.data import data_digest
from ..core.errors import EmaError, ParameterError
from ..core.judges.registry import JUDGES
from ..core.models import (
    DTYPE_NAMES,
    MODEL_NAMES,
    REGISTRY,
    _looks_like_hub_id,
    dtype_tag,
    ensure_cached,
    model_digest,
    resolve_dtype,
)
from ..core.params import parse_literal, parse_overrides  # noqa: F401  (orchestrate.parse_overrides)
from ..core.paths import (
    NOTEBOOK_DIR,  # noqa: F401  (tests point it elsewhere)
    PROJECT_ROOT,
    build_dir,
    cache_dir,
    notebook_dir,
    sha256_file,
)
from ..core.results import (  # noqa: F401  (re-exported)
    DEPENDS_ON,
    chapter_results,
    chapter_summary,
    check_chapter,
    point_at,
    results_root,
    run_slot,
    save_summary,
    slot_options,
    upstream_keys,
)
from ..methods.checkpoints import CHECKPOINT_RULES
from ..methods.condition import parse_ratio
from ..methods.registry import METHODS
from .book import build_book

PROFILES_FILE = Path(__file__).parents[1] / "profiles.yml"
INJECTED = ("results_dir", "profile", "run_slot")  # set by the orchestrator, not in the run key
RECORDED_PACKAGES = ("torch", "transformers", "peft", "gguf", "pandas", "numpy", "scikit-learn",
                     "scipy", "statsmodels", "seaborn", "matplotlib", "papermill", "jupyter-book",
                     "myst-nb", "sphinx", "ipywidgets")


# --- profiles and parameters --------------------------------------------------------------------

def load_profiles() -> dict:
    return yaml.safe_load(PROFILES_FILE.read_text())


def profile_names() -> list[str]:
    return list(load_profiles())


def get_profile(profile: str) -> dict:
    profiles = load_profiles()
    if profile not in profiles:
        raise ParameterError(
            f"unknown profile '{profile}'; profiles (defined in {PROFILES_FILE}): "
            + ", ".join(profiles))
    return profiles[profile]


def notebook_path(chapter: str) -> Path:
    index = CHAPTERS.index(check_chapter(chapter)) + 1
    return notebook_dir() / f"{index:02d}_{chapter}.ipynb"


def available_chapters() -> list[str]:
    """Chapters whose notebook exists, in book order."""
    return [c for c in CHAPTERS if notebook_path(c).is_file()]


def notebook_parameters(chapter: str) -> dict:
    """The parameters a chapter notebook takes, with their defaults (its `parameters` cell)."""
    # deferred: papermill (and nbclient, jupyter) load slowly; only running chapters needs them
    import papermill

    path = notebook_path(chapter)
    if not path.is_file():
        raise EmaError(f"chapter '{chapter}' has no notebook yet ({path} does not exist)")
    found = papermill.inspect_notebook(str(path))
    return {name: parse_literal(info["default"]) for name, info in found.items()}


def resolve_parameters(chapter: str, profile: str, model: str | None = None,
                       overrides: dict | None = None) -> dict:
    """Notebook defaults <- profile common <- profile chapter block <- --model <- -p overrides."""
    spec = get_profile(profile)
    defaults = notebook_parameters(chapter)
    params = dict(defaults)
    layers = [("profile '%s' (common)" % profile, spec.get("common", {})),
              ("profile '%s' (%s)" % (profile, chapter), spec.get(chapter, {})),
              ("--model", {"model": model} if model else {}),
              ("-p", overrides or {})]
    allowed = sorted(k for k in defaults if k not in INJECTED)
    for where, layer in layers:
        for key, value in layer.items():
            if key not in defaults or key in INJECTED:
                raise ParameterError(
                    f"{where}: chapter '{chapter}' takes no parameter '{key}'; it takes: "
                    + ", ".join(allowed))
            params[key] = value
    for key in INJECTED:
        params.pop(key, None)
    return params


# --- checking parameter values -------------------------------------------------------------------
# A chapter's parameters are checked by name before papermill starts (so before any model is
# loaded): a wrong value fails in a second with a message naming the parameter and what it
# accepts, instead of minutes later inside a notebook cell. Names without a rule are checked
# against the type of the notebook's default (an int parameter takes an int, and so on).

DEVICES = ("cpu", "cuda", "cuda:N", "mps")
RETAIN_LOSSES = ("ce", "kl")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _as_list(v):
    if isinstance(v, str):
        return [v]
    return list(v) if isinstance(v, (list, tuple)) else None


def _check_model(v):
    if isinstance(v, str) and (v in MODEL_NAMES or Path(v).expanduser().is_dir()
                               or _looks_like_hub_id(v)):
        return None
    return (f"a registry model ({', '.join(MODEL_NAMES)}), an existing local folder with "
            "config.json, or a hub id such as Qwen/Qwen2.5-7B-Instruct")


def _check_concepts(v):
    items = _as_list(v)
    if items and all(isinstance(c, str) and c in CONCEPTS for c in items):
        return None
    unknown = [c for c in items or [] if c not in CONCEPTS]
    return ("a non-empty list of concept keys from: " + ", ".join(CONCEPTS)
            + (f" (unknown concept(s): {', '.join(map(str, unknown))})" if unknown else ""))


def _check_concept(v):
    if isinstance(v, str) and v in CONCEPTS:
        return None
    return f"one of {', '.join(CONCEPTS)} (unknown concept {v!r})"


def _method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def _check_methods(v):
    names = _method_names()
    items = _as_list(v)
    if items and all(isinstance(m, str) and m in names for m in items):
        return None
    return "a non-empty list of methods from: " + ", ".join(names)


def _check_method(v):
    names = _method_names()
    return None if isinstance(v, str) and v in names else "one of " + ", ".join(names)


def _check_adapter(v):
    folder = Path(str(v)).expanduser()
    if folder.is_dir() and any(folder.glob("adapter_model.*")):
        return None
    return "an existing adapter folder holding adapter_model.safetensors (a peft LoRA adapter)"


def _check_judge(v):
    return None if v is None or v in JUDGES else "None (the default judge) or one of " + ", ".join(JUDGES)


def _check_checkpoint_rule(v):
    return None if v in CHECKPOINT_RULES else "one of " + ", ".join(CHECKPOINT_RULES)


def _check_ratio(v):
    try:
        parse_ratio(v)
    except ParameterError:
        return "a positive number of retain examples per forget example, or 'forget:retain' such as '1:2'"
    return None


def _list_of(check, what):
    def rule(v):
        items = _as_list(v) if not isinstance(v, str) else None
        return None if items and all(check(x) is None for x in items) else what
    return rule


def _choice(options):
    return lambda v: None if v in options else "one of " + ", ".join(options)


def _int_at_least(minimum, what):
    return lambda v: None if _is_int(v) and v >= minimum else what


def _positive_number(v):
    return None if _is_number(v) and v > 0 else "a positive number"


def _non_negative_number(v):
    return None if _is_number(v) and v >= 0 else "a number >= 0"


def _fraction(v):
    return None if _is_number(v) and 0 <= v <= 1 else "a number between 0 and 1"


def _device(v):
    ok = isinstance(v, str) and re.fullmatch(r"cpu|mps|cuda(:\d+)?", v)
    return None if ok else "one of " + ", ".join(DEVICES)


_COUNT = _int_at_least(0, "an integer >= 0 (0: all)")
_POSITIVE_INT = _int_at_least(1, "an integer >= 1")


def _steps_or_none(v):
    return None if v is None or _POSITIVE_INT(v) is None else "an integer >= 1, or None (epochs decide)"


def _rule_for(name: str):
    """The check of a parameter, chosen by its name (None: only the type of its default)."""
    exact = {
        "model": _check_model, "seed": _int_at_least(0, "an integer >= 0"),
        "concepts": _check_concepts, "concept": _check_concept,
        "methods": _check_methods, "method": _check_method,
        "judge": _check_judge, "checkpoint_rule": _check_checkpoint_rule, "adapter": _check_adapter,
        "device": _device, "dtype": _choice(DTYPE_NAMES), "retain_loss": _choice(RETAIN_LOSSES),
        "retain_ratio": _check_ratio, "ratio": _check_ratio,
        "epochs": _POSITIVE_INT, "lora_r": _POSITIVE_INT, "checkpoint_every": _POSITIVE_INT,
        "grad_accum": _POSITIVE_INT, "steps": _POSITIVE_INT,
        "max_steps": _steps_or_none,
        "beta": _positive_number, "lora_alpha": _positive_number,
        "max_drop": _fraction, "target_threshold": _fraction,
        "kl_lambda": _non_negative_number, "weight_decay": _non_negative_number,
    }
    if name in exact:
        return exact[name]
    if name == "lr" or name.endswith("_lr") or name == "learning_rate":
        return _positive_number
    if name.endswith("_steps"):
        return _POSITIVE_INT
    if name.endswith(("batch_size", "max_new_tokens")):
        return _POSITIVE_INT
    if name == "n" or name.startswith("n_") or "_n_" in name or name.endswith("_candidates"):
        return _COUNT
    if name.endswith("_concepts"):
        return _check_concepts
    if name.endswith("_ratio"):
        return _check_ratio
    if name.endswith("ratios"):
        return _list_of(_check_ratio, "a non-empty list of ratios (retain examples per forget "
                                      "example: numbers > 0 or 'forget:retain' such as '1:2')")
    if name.endswith("lambdas"):
        return _list_of(_non_negative_number, "a non-empty list of numbers >= 0")
    if name.startswith("w_") or (name[:1] == "w" and name[1:].isdigit()):
        return _non_negative_number
    return None


def _type_of_default(default, v):
    if default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(v, bool) else "True or False"
    if isinstance(default, int):
        return None if _is_int(v) else "an integer"
    if isinstance(default, float):
        return None if _is_number(v) else "a number"
    if isinstance(default, str):
        return None if isinstance(v, str) else "text (quote it: -p name='...')"
    if isinstance(default, (list, tuple)):
        return None if isinstance(v, (list, tuple)) else "a list, e.g. -p name=[a, b]"
    return None


def check_parameter(name: str, value, default=None) -> str | None:
    """What ``value`` should be for parameter ``name`` if it is not allowed, else None."""
    if value is None and default is None:
        return None  # a None default means "not set" (e.g. judge=None: the default judge)
    rule = _rule_for(name)
    if rule is not None:
        return rule(value)
    return _type_of_default(default, value)


def validate_parameters(chapter: str, params: dict, defaults: dict | None = None) -> dict:
    """Check every parameter's value by name before any work; raise ParameterError listing each
    wrong one, what it accepts and what it got. Returns ``params`` with integral floats of int
    parameters made ints (``-p max_steps=1e2`` -> 100) and a local model folder made absolute."""
    if defaults is None:
        defaults = notebook_parameters(chapter)
    params = dict(params)
    problems = []
    for name, value in params.items():
        default = defaults.get(name)
        if isinstance(value, float) and value.is_integer() and _is_int(default):
            value = params[name] = int(value)
        if name == "model" and isinstance(value, str) and Path(value).expanduser().is_dir():
            # The notebook runs in its own folder: a relative path must not change meaning.
            value = params[name] = str(Path(value).expanduser().resolve())
        wanted = check_parameter(name, value, default)
        if wanted is not None:
            problems.append(f"  parameter '{name}' must be {wanted}; got {value!r}")
    if problems:
        raise ParameterError(f"chapter '{chapter}' got {len(problems)} invalid parameter value(s) "
                             "(from its profile, --model or -p):\n" + "\n".join(problems))
    return params


def slot_for(profile: str, model: str | None = None) -> str:
    """The slot a run is kept in: the profile's own for its model (or no --model), else
    ``profile@model`` (ema_utils.core.results.run_slot)."""
    own = get_profile(profile).get("common", {}).get("model")
    return run_slot(profile, None if model in (None, "", own) else model)


def run_key(chapter: str, params: dict, profile: str) -> str:
    model = params.get("model")
    # The notebook's text and the library's code are part of the key: an edited chapter or
    # library re-executes the chapter (whose inner steps still reuse their own cached artifacts).
    # So are the keys of the earlier chapters' runs it reads (DEPENDS_ON): a new run of chapter 2
    # re-executes chapter 3 instead of reusing results computed on the old one. An earlier
    # chapter without a finished run counts as None; the notebook then says what to run.
    return stable_hash({"chapter": chapter, "notebook": sha256_file(notebook_path(chapter)),
                        "code": code_digest(),
                        "parameters": params,
                        "model_digest": model_digest(model) if model else None,
                        "data_digest": data_digest(),
                        "upstream": upstream_keys(chapter, profile)}, length=12)


# --- running a chapter --------------------------------------------------------------------------

def code_digest() -> str:
    """sha256 over the library's source files (every layer's, by their path in the package)
    and the profiles."""
    h = hashlib.sha256()
    package = Path(__file__).parents[1]
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode())
        h.update(path.read_bytes())
    h.update(PROFILES_FILE.name.encode())
    h.update(PROFILES_FILE.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class ChapterRun:
    chapter: str
    profile: str
    key: str
    folder: Path
    reused: bool
    slot: str = ""

    def __post_init__(self):
        self.slot = self.slot or self.profile

    @property
    def notebook(self) -> Path:
        return self.folder / notebook_path(self.chapter).name


def executed_dir(slot: str) -> Path:
    """The executed chapters of a slot (a profile, or profile@model), as the book reads them."""
    return build_dir() / "executed" / slot


def run_chapter(chapter: str, profile: str = "cpu", model: str | None = None,
                overrides: dict | None = None, force: bool = False, log=None) -> ChapterRun:
    """Execute one chapter (or reuse its finished run) and publish it for the book."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    params = validate_parameters(chapter, resolve_parameters(chapter, profile, model, overrides))
    writable_dir(build_dir(), "EMA_BUILD_DIR")  # fail now, not at the first artifact
    slot = slot_for(profile, model)
    key = run_key(chapter, params, slot)
    folder = results_root() / chapter / key
    run = ChapterRun(chapter, profile, key, folder, reused=False, slot=slot)
    if not force and (folder / "run.json").is_file() and run.notebook.is_file():
        log(f"[ema] {chapter}: reusing finished run {key} (same parameters, model and data)")
        run.reused = True
    else:
        _execute(run, params, get_profile(profile).get("cell_timeout", 1800), log)
    _publish(run)
    return run


def _execute(run: ChapterRun, params: dict, cell_timeout: int, log) -> None:
    # deferred: papermill and nbclient load slowly; only executing a chapter needs them
    import papermill
    from nbclient.exceptions import CellTimeoutError

    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / "run.json").unlink(missing_ok=True)  # not finished until written again
    partial = run.folder / f".partial-{run.notebook.name}"
    model = params.get("model")
    if REGISTRY.get(model) is not None:
        # A first de-quantization (a minute, with its own progress bar) happens here, in the
        # terminal, not inside the chapter's first model-loading cell.
        ensure_cached(model, log=log)
    log(f"[ema] {run.chapter}: executing {notebook_path(run.chapter).name} "
        f"({slot_options(run.slot)}, key {run.key})")
    started = time.time()
    memory = PeakMemory()  # the kernel is a child process: its memory counts
    try:
        with memory, ProgressRelay(run.folder / "progress.log"):
            papermill.execute_notebook(
                str(notebook_path(run.chapter)), str(partial),
                parameters={**params, "results_dir": str(run.folder), "profile": run.profile,
                            "run_slot": run.slot},
                kernel_name="python3", execution_timeout=cell_timeout, log_output=False,
                progress_bar=False, cwd=str(notebook_path(run.chapter).parent),
                # the kernel's own start-up warning ("running over TCP without encryption", a
                # local kernel on the loopback interface) would print for every chapter
                extra_arguments=["--IPKernelApp.log_level=ERROR"],
            )
    except papermill.PapermillExecutionError as exc:
        failed = run.folder / f"failed-{run.notebook.name}"
        if partial.exists():
            os.replace(partial, failed)
        raise EmaError(
            f"chapter '{run.chapter}' failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n"
            f"The executed notebook up to the error is at {failed}") from None
    except CellTimeoutError:
        failed = run.folder / f"failed-{run.notebook.name}"
        if partial.exists():
            os.replace(partial, failed)
        raise EmaError(
            f"chapter '{run.chapter}': a cell ran longer than the profile's cell_timeout of "
            f"{cell_timeout} s (profile '{run.profile}' in {PROFILES_FILE}). On a slower or busy "
            f"machine raise cell_timeout there, or make the run smaller with -p overrides. "
            f"The notebook up to that cell is at {failed}") from None
    os.replace(partial, run.notebook)
    record = {
        "chapter": run.chapter, "profile": run.profile, "key": run.key, "parameters": params,
        "wall_s": round(time.time() - started, 1), "peak_rss_mib": memory.peak_mib,
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "packages": package_versions(),
        "machine": machine_info(), "model": params.get("model"),
        "model_digest": model_digest(params["model"]) if params.get("model") else None,
        "data_digest": data_digest(), "seed": params.get("seed"),
        "compute_dtype": dtype_tag(resolve_dtype(params.get("dtype"), params.get("device") or "cpu")),
    }
    atomic_write_json(run.folder / "run.json", record)  # written last: marks the run finished
    log(f"[ema] {run.chapter}: done in {record['wall_s']} s")


def _publish(run: ChapterRun) -> None:
    """Point the profile at this run and copy its notebook where the book build finds it."""
    out = executed_dir(run.slot)
    out.mkdir(parents=True, exist_ok=True)
    for src, dest in ((run.notebook, out / run.notebook.name),
                      (run.folder / "run.json", out / f"{run.notebook.stem}.run.json")):
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    point_at(run.chapter, run.slot, run.key, run.folder)


def tree_rss(pid: int) -> int:
    """Summed resident memory (bytes) of a process and all its descendants; 0 if it is gone."""
    # deferred: psutil is only needed while a chapter runs (machine_info treats it as optional)
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = [parent] + parent.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakMemory:
    """Context manager: samples :func:`tree_rss` of this process (and so of the notebook's
    kernel, a child) every ``interval`` seconds in a thread; ``peak_mib`` after exit."""

    def __init__(self, interval: float = 0.5, pid: int | None = None):
        self.interval, self.pid, self.peak = interval, pid or os.getpid(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak_mib(self) -> float:
        return round(self.peak / 2**20, 1)


def package_versions() -> dict:
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info() -> dict:
    try:
        # deferred: psutil is optional here (no memory figure without it)
        import psutil

        memory = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        memory = None
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.machine(), "memory_gib": memory}


# --- command line -------------------------------------------------------------------------------

def cmd_run(args) -> int:
    chapters = available_chapters() if args.chapter == "all" else [check_chapter(args.chapter)]
    get_profile(args.profile)
    overrides = parse_overrides(args.param)
    per_chapter = {}
    for chapter in chapters:
        # With 'all', an override applies to the chapters that take it; with one chapter, an
        # unknown key is an error. Either way every chapter is validated before any model loads.
        per_chapter[chapter] = overrides if args.chapter != "all" else {
            k: v for k, v in overrides.items() if k in notebook_parameters(chapter)}
        validate_parameters(chapter, resolve_parameters(chapter, args.profile, args.model,
                                                        per_chapter[chapter]))
    if args.chapter == "all":
        unused = set(overrides) - {k for ov in per_chapter.values() for k in ov}
        if unused:
            raise ParameterError(f"-p {', '.join(sorted(unused))}: no chapter takes this parameter")
    runs = [run_chapter(c, args.profile, args.model, per_chapter[c], force=args.force)
            for c in chapters]
    payload = [{"chapter": r.chapter, "key": r.key, "reused": r.reused, "notebook": str(r.notebook)}
               for r in runs]
    emit(args, payload, lambda p: "\n".join(
        f"{r['chapter']}: {'reused' if r['reused'] else 'executed'} -> {r['notebook']}" for r in p))
    return 0


def book_dir(slot: str) -> Path:
    """Where a slot's book is built (its html is under ``_build/html``)."""
    return build_dir() / "book" / slot


def cmd_book(args) -> int:
    for chapter in available_chapters():
        run_chapter(chapter, args.profile, args.model)
    slot = slot_for(args.profile, args.model)
    html = build_book(executed_dir(slot), book_dir(slot), args.profile)
    print(f"book built: {html / 'index.html'}")
    return 0


def cmd_results(args) -> int:
    get_profile(args.profile)  # an unknown profile names the known ones
    summary = chapter_summary(check_chapter(args.chapter), slot_for(args.profile, args.model))
    emit(args, summary, lambda s: json.dumps(s, indent=2, default=str))
    return 0


def cmd_clean(args) -> int:
    """Remove build products (executed notebooks, results, HTML); never sources or model cache."""
    target = build_dir()
    if target.resolve() in (PROJECT_ROOT.resolve(), Path.home().resolve(), Path("/")):
        raise EmaError(f"refusing to delete {target}: EMA_BUILD_DIR points at a source folder")
    if target.exists():
        shutil.rmtree(target)
    print(f"removed {target}")
    if args.models:
        shutil.rmtree(cache_dir() / "models", ignore_errors=True)
        print(f"removed {cache_dir() / 'models'}")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("run", help="execute chapter notebooks with papermill (cached)")
    p.add_argument("chapter", help="a chapter name or 'all': " + ", ".join(CHAPTERS))
    p.add_argument("--profile", default="cpu", help="smoke, cpu, gpu or paper (ema_utils/profiles.yml)")
    p.add_argument("--model", help="registry name, hub id or local folder (overrides the profile)")
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE",
                   help="override a notebook parameter (repeatable)")
    p.add_argument("--force", action="store_true", help="re-execute even if a finished run exists")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("book", help="run what is missing and build the HTML book")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--model", help="registry name, hub id or local folder")
    p.set_defaults(func=cmd_book)

    p = sub.add_parser("results", help="a finished chapter's key numbers")
    p.add_argument("chapter")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--model", help="the model given to `ema run --model` (default: the profile's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("clean", help="remove build products (never sources)")
    p.add_argument("--models", action="store_true", help="also delete the de-quantized model cache")
    p.set_defaults(func=cmd_clean)


MIN_AGREEMENT = 0.97
"""Per-item verdict agreement a faster path (the bf16 dtype, first-token screening) must reach
with the path it replaces (the speed issue's bar)."""


def npo_run_settings(profile: str, model: str | None = None):
    """A profile's chapter 3 eval settings and chapter 2 NPO run, validated: ``(eval parameters,
    UnlearnConfig, run_intervention's keyword arguments)``, as the checks of a faster path
    (:mod:`ema_utils.build.dtype_check`, :mod:`ema_utils.build.screening`) rerun them."""
    # deferred: the trainer imports torch, which the command line must not load to start
    from ..methods.trainer import UnlearnConfig

    evals = validate_parameters("cross_domain", resolve_parameters("cross_domain", profile, model))
    train = validate_parameters("unlearning", resolve_parameters("unlearning", profile, model))
    config = UnlearnConfig(method="npo", lr=train["npo_lr"], beta=train["beta"],
                           max_steps=train["max_steps"], batch_size=train["batch_size"],
                           lora_r=train["lora_r"], lora_alpha=train["lora_alpha"],
                           checkpoint_every=train["checkpoint_every"], seed=train["train_seeds"][0])
    run_kwargs = dict(n_forget=train["n_forget"], forget_candidates=train["forget_candidates"],
                      forget_max_new_tokens=train["forget_max_new_tokens"],
                      traj_n_per_concept=train["traj_n_per_concept"],
                      traj_max_new_tokens=train["traj_max_new_tokens"],
                      kl_n_per_concept=train["kl_n_per_concept"],
                      batch_size=train["eval_batch_size"], judge=train["judge"],
                      max_drop=train["max_drop"], target_threshold=train["target_threshold"],
                      seed=train["seed"], utility_per_subject=train["utility_per_subject"])
    return evals, config, run_kwargs
