"""Build the companion book from executed notebooks.

``ema book`` (ema_utils.build.orchestrate) executes the chapter notebooks with papermill into
``<build>/executed/<profile>/NN_name.ipynb``, each with a run record ``NN_name.run.json`` beside
it, and then calls :func:`build_book`, which

1. stages a book source folder: ``_config.yml``, ``_toc.yml``, ``book/`` (with the vendored
   JavaScript in ``book/_extra``), ``data/README.md`` for the data card, and the executed
   notebooks as ``notebooks/NN_name.ipynb`` (parameters cells tagged to render folded);
2. renders ``book/reproducibility.md`` from the run records;
3. runs ``jupyter-book build`` with warnings as errors (execution is off in ``_config.yml``: the
   book shows papermill's outputs and never re-executes);
4. checks that every page in ``_toc.yml`` produced an HTML file and that no chapter page loads
   JavaScript from a CDN, and returns the HTML folder.

Any failure raises :class:`~ema_utils.core.errors.EmaError` with what to do about it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml

from ..core.errors import EmaError
from ..core.models import REGISTRY
from ..core.paths import PROJECT_ROOT, bench_report_file, dtype_check_file
from .compare import MODELS_PAGE, render_models_page

CONFIG_FILE = "_config.yml"
TOC_FILE = "_toc.yml"
BOOK_DIR = "book"
CSS_DIR = "_css"  # book/_css/*.css: the book's own stylesheets
NOTEBOOK_DIR = "notebooks"
DATA_CARD_SOURCE = "data/README.md"
DATA_CARD_PAGE = "book/data_card"
REPRODUCIBILITY_PAGE = "book/reproducibility"
RUN_RECORD_SUFFIX = ".run.json"
RECORDS_BEGIN = "<!-- ema:run-records:begin -->"
RECORDS_END = "<!-- ema:run-records:end -->"
DTYPE_BEGIN = "<!-- ema:dtype-check:begin -->"
DTYPE_END = "<!-- ema:dtype-check:end -->"
BENCH_BEGIN = "<!-- ema:bench:begin -->"
BENCH_END = "<!-- ema:bench:end -->"

FOLD_TAG = "hide-input"
"""The myst-nb cell tag that renders a cell's source folded (outputs stay visible)."""
"""Cells that hold a chapter's parameters: the notebook's own and the one papermill injects."""

CDN_HOSTS = ("cdnjs.cloudflare.com", "cdn.jsdelivr.net", "unpkg.com")
WIDGET_STATE_MIME = "application/vnd.jupyter.widget-state+json"
VENDORED_WIDGET_JS = ("_static/widgets/require.js", "_static/widgets/embed-amd.js")

RUN_RECORD_KEYS = ("chapter", "profile", "parameters", "wall_s", "started", "python", "packages",
                   "machine", "model", "model_digest", "data_digest", "seed")

_LOG_TAIL_LINES = 40


# --- the table of contents ----------------------------------------------------------------------

def read_toc(root: Path = PROJECT_ROOT) -> dict:
    """The parsed ``_toc.yml`` of ``root``."""
    path = Path(root) / TOC_FILE
    if not path.is_file():
        raise EmaError(f"{path} is missing: the book's table of contents (format jb-book).")
    try:
        toc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise EmaError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(toc, dict) or toc.get("format") != "jb-book" or "root" not in toc:
        raise EmaError(f"{path} must be a jb-book table of contents with a 'root' entry.")
    return toc


def toc_pages(root: Path = PROJECT_ROOT) -> list[str]:
    """Every page of ``_toc.yml`` (document names without suffix), root first, in book order."""
    toc = read_toc(root)
    pages = [_strip_suffix(toc["root"])]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                pages.append(_strip_suffix(entry["file"]))
            walk(entry.get("sections"))

    for part in toc.get("parts") or []:
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return pages


def toc_chapters(root: Path = PROJECT_ROOT) -> list[str]:
    """The notebook pages of ``_toc.yml`` (``notebooks/NN_name``), in book order."""
    return [p for p in toc_pages(root) if p.startswith(NOTEBOOK_DIR + "/")]


def chapter_name(page: str) -> str:
    """``notebooks/01_setup`` (or ``01_setup.ipynb``) -> ``setup``: the name ``ema run`` takes."""
    stem = Path(page).name
    if stem.endswith(".ipynb"):
        stem = stem[: -len(".ipynb")]
    return re.sub(r"^\d+_", "", stem)


def run_command(chapter: str, profile: str) -> str:
    """The command that executes a chapter for a profile."""
    return f"ema run {chapter} --profile {profile}"


def _strip_suffix(name: str) -> str:
    for suffix in (".md", ".ipynb"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --- executed notebooks and run records ---------------------------------------------------------

def find_executed(executed_dir: Path, chapters: list[str], profile: str) -> dict[str, Path]:
    """Map each chapter page to its executed notebook; raise naming the commands for missing ones."""
    executed_dir = Path(executed_dir)
    found, missing = {}, []
    for page in chapters:
        path = executed_dir / (Path(page).name + ".ipynb")
        if path.is_file():
            found[page] = path
        else:
            missing.append(page)
    if missing:
        lines = "\n".join(f"  {run_command(chapter_name(p), profile)}    # -> {Path(p).name}.ipynb"
                          for p in missing)
        raise EmaError(
            f"The book lists {len(missing)} chapter(s) that have not been executed for profile "
            f"'{profile}' (looked in {executed_dir}). Run:\n{lines}\n"
            f"or `ema book --profile {profile}`, which runs what is missing."
        )
    return found


def load_run_record(notebook: Path, profile: str) -> dict:
    """The run record beside an executed notebook, checked against the profile being built."""
    notebook = Path(notebook)
    path = notebook.with_name(notebook.name[: -len(".ipynb")] + RUN_RECORD_SUFFIX)
    chapter = chapter_name(notebook.name)
    if not path.is_file():
        raise EmaError(
            f"{notebook} has no run record ({path.name}); the reproducibility page needs one per "
            f"chapter. Re-run the chapter with `{run_command(chapter, profile)}`, which writes it."
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EmaError(f"The run record {path} is not valid JSON ({exc}); re-run "
                       f"`{run_command(chapter, profile)}`.") from exc
    if not isinstance(record, dict):
        raise EmaError(f"The run record {path} must hold a JSON object.")
    if record.get("profile") not in (None, profile):
        raise EmaError(
            f"{notebook.name} was executed with profile '{record['profile']}', but the book is "
            f"being built for profile '{profile}'. Run `{run_command(chapter, profile)}`."
        )
    return record


def check_no_errors(notebook) -> None:
    """Raise if an executed notebook holds an error output (the book must not show tracebacks)."""
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []) or []:
            if output.get("output_type") == "error":
                name = f"{output.get('ename', 'Error')}: {output.get('evalue', '')}"
                raise EmaError(f"cell {index} holds an error output ({name}); fix the cause and "
                               "re-run the chapter.")


PARAMETERS_PROMPT = "Show the parameters of this run"
HIDE_TAG = "remove-cell"


def fold_parameters(notebook) -> int:
    """One labelled, folded parameters cell per page: papermill's injected cell (the values the
    run used) is folded under "Show the parameters of this run"; the notebook's own defaults cell
    is left out of the page when an injected cell follows it (the downloaded notebook keeps
    both). Returns how many parameters cells the page shows (1, or 0 without any)."""
    cells = [c for c in notebook.cells if c.cell_type == "code"]
    tags_of = [c.get("metadata", {}).get("tags", []) for c in cells]
    injected = [c for c, tags in zip(cells, tags_of) if "injected-parameters" in tags]
    defaults = [c for c, tags in zip(cells, tags_of) if "parameters" in tags]
    shown = injected[:1] or defaults[:1]
    for cell in injected[1:] + (defaults if injected else defaults[1:]):
        tags = cell.setdefault("metadata", {}).get("tags", [])
        cell["metadata"]["tags"] = [t for t in tags if t != FOLD_TAG] + [HIDE_TAG]
    for cell in shown:
        tags = cell.setdefault("metadata", {}).get("tags", [])
        if FOLD_TAG not in tags:
            cell["metadata"]["tags"] = list(tags) + [FOLD_TAG]
        cell["metadata"].setdefault("mystnb", {})["code_prompt_show"] = PARAMETERS_PROMPT
    return len(shown)


# --- the reproducibility page -------------------------------------------------------------------

def _md(value) -> str:
    """A value for a Markdown table cell, as inline code."""
    text = str(value).replace("|", "\\|").replace("\n", " ").replace("`", "'")
    return f"`{text}`"


def _text(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def format_seconds(seconds) -> str:
    """12.3 s, 4 min 05 s, 1 h 02 min."""
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return "not recorded"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(round(s % 60)):02d} s"
    return f"{int(s // 3600)} h {int(round(s % 3600 / 60)):02d} min"


def _pinned_sha256(model: str) -> str:
    """The pinned sha256 of a registry model's weights file, or how it is verified."""
    if model == "none":
        return "no model"
    if model not in REGISTRY:
        return "not pinned (a hub id or local folder)"
    entry = REGISTRY[model]
    if entry is None:
        return "built in code from a seed"
    if entry.sha256:
        return f"`{entry.sha256}`"
    return "verified by the package's pinned hash (requirements-assets.txt)"


def render_run_records(records: dict[str, dict], profile: str, built: str | None = None) -> str:
    """Markdown for the reproducibility page from ``{chapter page: run record}`` in book order."""
    built = built or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out: list[str] = []
    total = sum(float(r.get("wall_s") or 0) for r in records.values())
    out += ["## This build", "",
            f"- Profile: `{profile}`",
            f"- Book built: {built}, with jupyter-book `{_jupyter_book_version()}`",
            f"- Chapters: {len(records)}, total wall time {format_seconds(total)}", ""]

    peak = max((float(r["peak_rss_mib"]) for r in records.values() if r.get("peak_rss_mib")),
               default=None)
    if peak is not None:
        out[-1:-1] = [f"- Peak memory of any chapter: {peak / 1024:.1f} GiB"]
    out += ["## Chapters", "",
            "| chapter | started | wall time | peak memory | compute dtype | model | seed "
            "| re-run with |",
            "|---|---|---|---|---|---|---|---|"]
    for page, r in records.items():
        chapter = r.get("chapter") or chapter_name(page)
        command = run_command(chapter, profile)
        if r.get("model"):  # the profile's model may change later: pin it
            command += f" --model {r['model']}"
        mem = r.get("peak_rss_mib")
        out.append(f"| {_text(Path(page).name)} | {_text(r.get('started', 'not recorded'))} "
                   f"| {format_seconds(r.get('wall_s'))} "
                   f"| {'n/a' if not mem else f'{float(mem) / 1024:.1f} GiB'} "
                   f"| {_text(r.get('compute_dtype', 'not recorded'))} | {_md(r.get('model', '?'))} "
                   f"| {_md(r.get('seed', '?'))} | {_md(command)} |")
    out.append("")

    out += ["## Models and data", "",
            "The digests key the results cache: a changed model or data set gives a new key and "
            "a fresh computation.", "",
            "| chapter | model | model digest | pinned sha256 of the weights | data digest |",
            "|---|---|---|---|---|"]
    for page, r in records.items():
        model = r.get("model") or "none"
        out.append(f"| {_text(Path(page).name)} | {_md(model)} | {_md(r.get('model_digest', '?'))} "
                   f"| {_pinned_sha256(model)} | {_md(r.get('data_digest', '?'))} |")
    out.append("")

    out += ["## Parameters", "",
            "The values each chapter ran with, as papermill injected them (the folded "
            "parameters cell at the top of each chapter shows the same). Override any of them "
            "with `-p key=value`.", ""]
    for page, r in records.items():
        chapter = r.get("chapter") or chapter_name(page)
        params = r.get("parameters") or {}
        out += [f"**{_text(chapter)}** ({_text(Path(page).name)})", ""]
        if params:
            out += ["```json", json.dumps(params, indent=2, sort_keys=True, default=str), "```", ""]
        else:
            out += ["No parameters recorded.", ""]

    out += ["## Machine and Python", "",
            "| chapter | Python | platform | CPU cores | memory (GiB) |",
            "|---|---|---|---|---|"]
    for page, r in records.items():
        m = r.get("machine") or {}
        out.append(f"| {_text(Path(page).name)} | {_md(r.get('python', '?'))} "
                   f"| {_md(m.get('platform', '?'))} | {_text(m.get('cpu_count', '?'))} "
                   f"| {_text(m.get('memory_gib', '?'))} |")
    out.append("")

    versions: dict[str, dict[str, list[str]]] = {}
    for page, r in records.items():
        for name, version in (r.get("packages") or {}).items():
            version = "not installed" if version is None else str(version)
            versions.setdefault(name, {}).setdefault(version, []).append(chapter_name(page))
    out += ["## Package versions", ""]
    if versions:
        out += ["| package | version |", "|---|---|"]
        for name in sorted(versions, key=str.lower):
            by_version = versions[name]
            if len(by_version) == 1:
                cell = _md(next(iter(by_version)))
            else:  # chapters ran in different environments: say which ran with which
                cell = "; ".join(f"{_md(v)} ({', '.join(chs)})" for v, chs in by_version.items())
            out.append(f"| {_md(name)} | {cell} |")
    else:
        out.append("No package versions recorded.")
    out.append("")
    return "\n".join(out)


def _replace_block(template: str, begin: str, end: str, body: str, what: str) -> str:
    start, stop = template.find(begin), template.find(end)
    if start < 0 or stop < start:
        raise EmaError(f"{BOOK_DIR}/reproducibility.md lacks the markers {begin} ... {end} where "
                       f"{what} go; restore them.")
    return template[:start] + body + template[stop + len(end):]


def render_dtype_check(report: dict | None, profile: str) -> str:
    """The compute-dtype section: the profile's last check, or how to run it."""
    if report is None:
        return (f"*Not checked for this build: run `ema bench --dtype-check --profile {profile}` "
                "and rebuild the book to show it here.*\n")
    return render_markdown(report)


def render_reproducibility(template: str, records: dict[str, dict], profile: str,
                           built: str | None = None, dtype_report: dict | None = None,
                           bench_report: dict | None = None) -> str:
    """Fill the page template's run-records block, its compute-dtype block and its bench block."""
    page = _replace_block(template, RECORDS_BEGIN, RECORDS_END,
                          render_run_records(records, profile, built), "the run records")
    if DTYPE_BEGIN in template:
        page = _replace_block(page, DTYPE_BEGIN, DTYPE_END,
                              render_dtype_check(dtype_report, profile), "the dtype check")
    if BENCH_BEGIN in template:
        page = _replace_block(page, BENCH_BEGIN, BENCH_END, render_bench(bench_report),
                              "the bench figures")
    return page


def render_bench(report: dict | None) -> str:
    """The reproducibility page's performance section: the last full `ema bench` run's ratios
    against their targets, with its date and machine (or how to run it)."""
    if report is None:
        return ("*No `ema bench` report on this machine: run `ema bench` (about 15 minutes) and "
                "rebuild the book to show its figures here.*\n")
    m = report["machine"]
    lines = [f"`ema bench` on {report['date'][:10]}: {report['model']} on {m.get('cpu_model')} "
             f"({m.get('usable_cores')} cores, {m.get('memory_gib')} GiB), torch "
             f"{report['packages'].get('torch')}, compute dtype {report.get('compute_dtype')}. "
             "Ratios are taken within that one run; the run records above are this build's.", "",
             "| ratio | value | target | what it compares |", "|---|---:|---|---|"]
    for name, r in report["ratios"].items():
        target = "" if "target" not in r else (
            f"{r['comparison']} {r['target']:g}: "
            + {True: "met", False: "**not met**", None: "not measured"}[r["met"]])
        lines.append(f"| {name.replace('_', ' ')} | {format_figure(r['value'])} | {target} | {r['what']} |")
    return "\n".join(lines) + "\n"


def format_figure(value) -> str:
    """A bench figure for text and tables: three significant digits, "not measured" for None."""
    return "not measured" if value is None else (f"{value:.3g}" if abs(value) < 100
                                                 else f"{value:,.0f}")


def bench_result() -> dict | None:
    """The last full `ema bench` report in the results cache, or None."""
    path = bench_report_file()
    return json.loads(path.read_text()) if path.is_file() else None



def dtype_check_result(profile: str) -> dict | None:
    """The last `ema bench --dtype-check` report of ``profile`` in the results cache, or None."""
    path = dtype_check_file(profile)
    return json.loads(path.read_text()) if path.is_file() else None


def _jupyter_book_version() -> str:
    try:
        return metadata.version("jupyter-book")
    except Exception:  # pragma: no cover
        return "unknown"


# --- staging ------------------------------------------------------------------------------------

def _sync(files: dict[str, bytes | Path], stage: Path) -> None:
    """Make ``stage`` hold exactly ``files`` (relative path -> bytes or source file).

    Unchanged files keep their modification time, so Sphinx rebuilds only the pages that changed.
    """
    stage.mkdir(parents=True, exist_ok=True)
    for rel, src in files.items():
        dest = stage / rel
        data = src.read_bytes() if isinstance(src, Path) else src
        if dest.is_file() and dest.read_bytes() == data:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    wanted = {stage / rel for rel in files}
    for path in sorted(stage.rglob("*"), reverse=True):
        if path.is_file() and path not in wanted:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _data_card_files(root: Path) -> dict[str, Path]:
    """data/README.md plus the files inside data/ that it links to with relative links.

    The data card page (book/data_card.md) includes data/README.md, and MyST resolves the links
    of an included file from the *including* page's folder, book/. data/ and book/ sit at the
    same depth, so ``../x`` links work as they are; a linked file inside data/ is staged under
    book/ as well, where the link then finds it (and the book offers it as a download).
    """
    readme = root / DATA_CARD_SOURCE
    if not readme.is_file():
        raise EmaError(f"The table of contents lists the data card ({DATA_CARD_PAGE}), which "
                       f"includes {DATA_CARD_SOURCE}, but {readme} does not exist. Write it, or "
                       f"remove the line `- file: {DATA_CARD_PAGE}` from {TOC_FILE}.")
    files = {DATA_CARD_SOURCE: readme}
    text = readme.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith(("/", "mailto:")):
            continue
        path = (readme.parent / target).resolve()
        data_dir = (root / "data").resolve()
        if path.is_file() and data_dir in path.parents:
            files[str(path.relative_to(root.resolve()))] = path
            mirror = f"{BOOK_DIR}/{path.relative_to(data_dir).as_posix()}"
            if not (root / mirror).exists():
                files[mirror] = path
    return files


def stage_book(executed_dir: Path, stage_dir: Path, profile: str,
               root: Path = PROJECT_ROOT, built: str | None = None) -> dict:
    """Stage a book source folder in ``stage_dir``; returns ``{"pages", "chapters", "records"}``."""
    # deferred: nbformat loads slowly; only staging the book reads notebooks
    import nbformat

    root, stage_dir = Path(root), Path(stage_dir)
    executed_dir = _resolve_executed_dir(Path(executed_dir), profile)
    pages = toc_pages(root)
    chapters = [p for p in pages if p.startswith(NOTEBOOK_DIR + "/")]
    executed = find_executed(executed_dir, chapters, profile)

    files: dict[str, bytes | Path] = {TOC_FILE: root / TOC_FILE}
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise EmaError(f"{config_path} is missing: the book's configuration.")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    if profile == "smoke":
        config.setdefault("html", {})["announcement"] = (
            "Built with the smoke profile: tiny runs that only check the pipeline; "
            "the numbers mean nothing. Build with --profile cpu for results.")
    files[CONFIG_FILE] = yaml.safe_dump(config, sort_keys=False, allow_unicode=True).encode()

    book_src = root / BOOK_DIR
    for path in sorted(book_src.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files[str(path.relative_to(root))] = path
    for css in sorted((book_src / CSS_DIR).glob("*.css")):
        # Jupyter Book links every stylesheet under the source's _static/ from every page
        files[f"_static/{css.name}"] = css
    for page in pages:
        if page.startswith(BOOK_DIR + "/") and not (root / (page + ".md")).is_file() \
                and not (root / (page + ".ipynb")).is_file():
            raise EmaError(f"{TOC_FILE} lists the page '{page}', but neither {page}.md nor "
                           f"{page}.ipynb exists under {root}.")
    if DATA_CARD_PAGE in pages:
        files.update(_data_card_files(root))

    records: dict[str, dict] = {}
    for page in chapters:
        path = executed[page]
        try:
            notebook = nbformat.read(path, as_version=4)
        except Exception as exc:
            raise EmaError(f"{path} is not a readable notebook ({exc}); re-run "
                           f"`{run_command(chapter_name(page), profile)}`.") from exc
        try:
            check_no_errors(notebook)
        except EmaError as exc:
            raise EmaError(f"{path}: {exc} Command: `{run_command(chapter_name(page), profile)}`.") \
                from None
        fold_parameters(notebook)
        files[page + ".ipynb"] = nbformat.writes(notebook).encode()
        records[page] = load_run_record(path, profile)

    if MODELS_PAGE in pages:
        template = (root / (MODELS_PAGE + ".md")).read_text(encoding="utf-8")
        files[MODELS_PAGE + ".md"] = render_models_page(template, profile).encode()
    if REPRODUCIBILITY_PAGE in pages:
        template = (root / (REPRODUCIBILITY_PAGE + ".md")).read_text(encoding="utf-8")
        files[REPRODUCIBILITY_PAGE + ".md"] = render_reproducibility(
            template, records, profile, built, dtype_check_result(profile), bench_result()).encode()

    _sync(files, stage_dir)
    listed = {Path(p).name for p in chapters}
    unlisted = sorted(p.stem for p in executed_dir.glob("*.ipynb") if p.stem not in listed)
    return {"pages": pages, "chapters": chapters, "records": records, "unlisted": unlisted}


def _resolve_executed_dir(executed_dir: Path, profile: str) -> Path:
    """Accept ``<build>/executed/<profile>`` or its parent ``<build>/executed``."""
    if not any(executed_dir.glob("*.ipynb")) and (executed_dir / profile).is_dir():
        return executed_dir / profile
    return executed_dir


# --- building -----------------------------------------------------------------------------------

def jupyter_book_executable() -> Path:
    """The ``jupyter-book`` of the running Python's environment."""
    exe = Path(sys.executable).parent / ("jupyter-book.exe" if os.name == "nt" else "jupyter-book")
    if not exe.is_file():
        raise EmaError(f"jupyter-book is not installed in this environment ({exe} is missing). "
                       "Install it with: pip install 'jupyter-book>=1.0.4.post1,<2'")
    return exe


def build_command(stage_dir: Path, out_dir: Path) -> list[str]:
    """``jupyter-book build`` with warnings as errors, nit-picky references, every warning shown."""
    return [str(jupyter_book_executable()), "build", str(stage_dir), "--path-output", str(out_dir),
            "-W", "-n", "--keep-going"]


def build_book(executed_dir: Path, out_dir: Path, profile: str, *, root: Path = PROJECT_ROOT,
               timeout: float = 1800, log=None) -> Path:
    """Stage, render and build the book; return the HTML folder (``out_dir/_build/html``).

    ``executed_dir`` holds the executed ``NN_name.ipynb`` and ``NN_name.run.json`` of ``profile``.
    The staged sources go to ``out_dir/source``, the full build log to ``out_dir/build.log``.
    Raises EmaError (with the log's tail) when a chapter is missing, the build fails or warns, or
    a page of the table of contents has no HTML.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out_dir = Path(out_dir).resolve()
    stage_dir = out_dir / "source"
    staged = stage_book(executed_dir, stage_dir, profile, root=root)
    for name in staged["unlisted"]:
        log(f"[ema] {name}.ipynb was executed but is not in {TOC_FILE}; to show it, add the line "
            f"`- file: {NOTEBOOK_DIR}/{name}` under the Chapters part")
    command = build_command(stage_dir, out_dir)
    log_path = out_dir / "build.log"
    log(f"[ema] building the book ({len(staged['pages'])} pages, profile {profile}) -> {out_dir}")
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as handle:
        try:
            proc = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=timeout, cwd=stage_dir)
        except subprocess.TimeoutExpired:
            raise EmaError(f"jupyter-book build did not finish within {timeout:.0f} s; "
                           f"see {log_path}.\n{_tail(log_path)}") from None
    elapsed = time.perf_counter() - start
    log_path.write_text("\n".join(_log_lines(log_path)) + "\n", encoding="utf-8")  # no colours
    if proc.returncode != 0:
        problems = _problems(log_path)
        raise EmaError(
            f"jupyter-book build failed (exit {proc.returncode}; warnings count as errors).\n"
            + (f"--- warnings and errors ---\n{problems}\n" if problems else "")
            + f"--- last lines of the log ---\n{_tail(log_path, 15)}\n"
            f"Full log: {log_path}\nCommand: {' '.join(command)}\n"
            f"Files under {stage_dir} are staged copies: fix the page under {Path(root) / BOOK_DIR} "
            f"or re-run the chapter, not the copy.")
    html_dir = out_dir / "_build" / "html"
    drop_repeated_inline_scripts(html_dir)
    check_html(html_dir, staged["pages"])
    check_offline(html_dir, staged["chapters"])
    log(f"[ema] book built in {elapsed:.0f} s: {html_dir / 'index.html'}")
    return html_dir


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _log_lines(path: Path) -> list[str]:
    try:
        return _ANSI.sub("", path.read_text(encoding="utf-8", errors="replace")).splitlines()
    except OSError:
        return ["(no log)"]


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(_log_lines(path)[-lines:])


def _problems(path: Path, limit: int = 20) -> str:
    """The WARNING / ERROR lines of a Sphinx log (they can be far above its tail)."""
    found = [line for line in _log_lines(path)
             if re.search(r"\b(WARNING|ERROR|CRITICAL|SEVERE)\b|Traceback|Exception", line)]
    more = f"\n... and {len(found) - limit} more" if len(found) > limit else ""
    return "\n".join(found[:limit]) + more


def check_html(html_dir: Path, pages: list[str]) -> None:
    """Raise unless every page of the table of contents produced ``<page>.html``."""
    missing = [p for p in pages if not (Path(html_dir) / (p + ".html")).is_file()]
    if missing:
        raise EmaError(f"The build finished but produced no HTML for {', '.join(missing)} "
                       f"(looked in {html_dir}); see build.log beside it.")


_INLINE_SCRIPT = re.compile(r"[ \t]*<script>[^<]*</script>\n?")


def drop_repeated_inline_scripts(html_dir: Path) -> int:
    """Remove the second copy of an identical inline ``<script>`` from every HTML page; return
    how many were removed. sphinx-thebe (loaded by Jupyter Book even with Thebe off) writes its
    ``const THEBE_JS_URL = ...`` script twice into every page, and the browser then logs
    "Identifier 'THEBE_JS_URL' has already been declared" on each page."""
    removed = 0
    for path in Path(html_dir).rglob("*.html"):
        html = path.read_text(encoding="utf-8")
        seen: set[str] = set()

        def once(match):
            nonlocal removed
            body = match.group(0).strip()
            if body in seen:
                removed += 1
                return ""
            seen.add(body)
            return match.group(0)

        cleaned = _INLINE_SCRIPT.sub(once, html)
        if cleaned != html:
            path.write_text(cleaned, encoding="utf-8")
    return removed


_SCRIPT_SRC = re.compile(r"<script\b[^>]*\bsrc=\"([^\"]+)\"", re.IGNORECASE)


def page_scripts(html: str) -> list[str]:
    """The ``src`` of every ``<script>`` in an HTML page."""
    return _SCRIPT_SRC.findall(html)


def check_offline(html_dir: Path, chapters: list[str]) -> None:
    """Raise if a chapter page loads a script from a CDN or its widgets lack the vendored JS."""
    html_dir = Path(html_dir)
    problems = []
    for page in chapters:
        html = (html_dir / (page + ".html")).read_text(encoding="utf-8", errors="replace")
        remote = [s for s in page_scripts(html) if any(h in s for h in CDN_HOSTS)]
        if remote:
            problems.append(f"{page}.html loads {', '.join(remote)}")
        if WIDGET_STATE_MIME in html:
            for rel in VENDORED_WIDGET_JS:
                if not (html_dir / rel).is_file():
                    problems.append(f"{page}.html has widgets but {rel} is missing from the HTML")
    if problems:
        raise EmaError("The book would not render offline: " + "; ".join(problems) + ". Check "
                       "sphinx.config.nb_ipywidgets_js, html_extra_path and mathjax_path in "
                       f"{CONFIG_FILE} and the files under book/_extra/_static.")


# --- the compute-dtype check's section of the reproducibility page ----------------------------

def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def render_markdown(report: dict) -> str:
    """The reproducibility page's section: agreement per evaluation, rates, the trajectory."""
    fast, ref = report["fast"], report["reference"]
    if report.get("skipped"):
        return f"The compute-dtype check was skipped: {report['skipped']}.\n"
    verdict = "holds" if report["holds"] else "does NOT hold"
    lines = [f"Checked with `ema bench --dtype-check --profile {report['profile']}` "
             f"({report['model']}, {report['items_per_concept']} eval items per concept; "
             f"{report.get('wall_s', 0) / 60:.0f} min). The claim \"{fast} gives the same verdicts "
             f"as {ref}\" **{verdict}**: per-item agreement at least "
             f"{_pct(report['min_agreement'])}, every rate inside the other dtype's 95% Wilson "
             "interval, and the same checkpoints chosen by both trainings.", "",
             "| model | items | same verdict | rates inside the other's interval |",
             "|---|---:|---:|---|"]
    for e in report["evaluations"]:
        outside = [r["concept"] for r in e["rates"] if not r["within"]]
        lines.append(f"| {e['model']} | {e['items']} | {e['agreed']} ({_pct(e['agreement'])}) | "
                     + ("all" if not outside else "all but " + ", ".join(outside)) + " |")
    t = report["trajectory"]
    lines += ["", f"NPO on {t['concept']}, trained once in each dtype: target refusal by step.", "",
              "| step | " + " | ".join(str(s["step"]) for s in t["steps"]) + " |",
              "|---|" + "---:|" * len(t["steps"]),
              f"| {fast} | " + " | ".join(_pct(s["fast"]) for s in t["steps"]) + " |",
              f"| {ref} | " + " | ".join(_pct(s["reference"]) for s in t["steps"]) + " |", "",
              f"First checkpoint under the target threshold: step {t['first_below']['fast']} "
              f"({fast}) and {t['first_below']['reference']} ({ref}); the utility rule's "
              f"checkpoint: step {t['selected']['fast']} ({fast}) and {t['selected']['reference']} "
              f"({ref}). Median step time: {t['seconds_per_step']['fast']:.1f} s ({fast}), "
              f"{t['seconds_per_step']['reference']:.1f} s ({ref})."]
    return "\n".join(lines) + "\n"
