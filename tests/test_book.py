"""The book build (ema_utils.build.book): staging, the reproducibility page, jupyter-book, offline JS.

The slow tests build the real _config.yml, _toc.yml and book/ once (about a minute on 2 cores)
from fake executed chapters: a tiny notebook with a matplotlib figure and ipywidgets, executed
by papermill so that the widget state is saved the way `ema run` saves it. test_browser.py
opens the same build in Chromium.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from ema_utils import book
from ema_utils.core.errors import EmaError
from ema_utils.core.paths import PROJECT_ROOT

PROFILE = "smoke"
FAKE_PACKAGES = {"torch": "2.13.0+cpu", "transformers": "5.23.0", "jupyter-book": "1.0.4.post1",
                 "fake-package-for-tests": "9.8.7"}

FAKE_NOTEBOOK_CELLS = [
    ("markdown", "# {title}\n\nA fake chapter for the book tests: a figure and linked widgets.", []),
    ("code", "n_points = 5\nseed = 0", ["parameters", "hide-input"]),
    ("code",
     "import matplotlib.pyplot as plt\n"
     "fig, ax = plt.subplots(figsize=(4, 3))\n"
     "ax.plot(range(n_points), [i * i for i in range(n_points)], marker='o')\n"
     "ax.set_title('A fake figure')\nax.set_xlabel('step')\nax.set_ylabel('loss (nats)')\n"
     "plt.show()", []),
    ("code",
     "import ipywidgets as widgets\n"
     "concept = widgets.Dropdown(options=['safety', 'cybersecurity', 'bias'], description='Concept')\n"
     "index = widgets.IntSlider(min=0, max=2, description='Index')\n"
     "widgets.jslink((concept, 'index'), (index, 'value'))\n"
     "tabs = widgets.Tab(children=[widgets.HTML('<b>first pane</b>'), widgets.HTML('second pane')])\n"
     "tabs.titles = ('One', 'Two')\n"
     "button = widgets.Button(description='Icon', icon='check')  # needs the Font Awesome fonts\n"
     "widgets.VBox([concept, index, tabs, button])", []),
]


def make_source_notebook(path: Path, title: str) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, source, tags in FAKE_NOTEBOOK_CELLS:
        cell = (nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell)(
            source.format(title=title) if kind == "markdown" else source)
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def execute_fake(source: Path, out: Path, parameters: dict) -> Path:
    import papermill

    papermill.execute_notebook(str(source), str(out), parameters=parameters, kernel_name="python3",
                               progress_bar=False, log_output=False, cwd=str(out.parent))
    return out


def fake_record(page: str, wall_s: float = 12.5) -> dict:
    return {
        "chapter": book.chapter_name(page), "profile": PROFILE,
        "parameters": {"n_points": 4, "seed": 0}, "wall_s": wall_s,
        "started": "2026-01-02T03:04:05+00:00", "python": "3.11.2",
        "packages": FAKE_PACKAGES,
        "machine": {"cpu_count": 2, "platform": "Linux-test-x86_64", "memory_gib": 7.8},
        "model": "tiny-random", "model_digest": "tiny-random-seed0-v1", "data_digest": "d1a7a0d1e5",
        "seed": 0,
    }


def make_root(dest: Path) -> Path:
    """A copy of the book's sources (config, toc, book/), with data/README.md (a stub if absent)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (book.CONFIG_FILE, book.TOC_FILE):
        shutil.copy2(PROJECT_ROOT / name, dest / name)
    shutil.copytree(PROJECT_ROOT / book.BOOK_DIR, dest / book.BOOK_DIR)
    (dest / "data").mkdir()
    readme = PROJECT_ROOT / book.DATA_CARD_SOURCE
    if readme.is_file():
        shutil.copy2(readme, dest / book.DATA_CARD_SOURCE)
    else:
        (dest / book.DATA_CARD_SOURCE).write_text(
            "# The data\n\nA stub data card written by the tests.\n\n## Sets\n\n- one set\n")
    return dest


def make_executed(root: Path, executed: Path) -> Path:
    """Execute the fake notebook once and place a copy (with a run record) for every chapter."""
    executed.mkdir(parents=True, exist_ok=True)
    import nbformat

    chapters = book.toc_chapters(root)
    source = make_source_notebook(executed.parent / "fake_source.ipynb", "Fake chapter")
    template = execute_fake(source, executed.parent / "fake_executed.ipynb", {"n_points": 4})
    for page in chapters:
        name = Path(page).name
        nb = nbformat.read(template, as_version=4)
        nb.cells[0].source = nb.cells[0].source.replace("Fake chapter", f"Fake {name}")
        nbformat.write(nb, executed / f"{name}.ipynb")
        (executed / f"{name}{book.RUN_RECORD_SUFFIX}").write_text(json.dumps(fake_record(page)))
    return executed


_BUILT: dict = {}


def built_book(tmp_path_factory) -> dict:
    """Build the fake book once per session (shared with test_browser.py)."""
    if "html" not in _BUILT:
        base = tmp_path_factory.mktemp("book")
        root = make_root(base / "root")
        executed = make_executed(root, base / "executed" / PROFILE)
        start = time.perf_counter()
        html = book.build_book(executed, base / "out", PROFILE, root=root)
        _BUILT.update(html=html, root=root, executed=executed, out=base / "out",
                      build_s=time.perf_counter() - start)
    return _BUILT


@pytest.fixture(scope="module")
def fake_book(tmp_path_factory):
    return built_book(tmp_path_factory)


# --- fast tests: no build -----------------------------------------------------------------------

def test_toc_lists_the_narrative_pages_and_chapters():
    pages = book.toc_pages()
    assert pages[0] == "book/intro"
    for page in ("book/paper_in_brief", "book/reproducibility", "book/data_card", "book/references"):
        assert page in pages
        assert (PROJECT_ROOT / f"{page}.md").is_file()
    chapters = book.toc_chapters()
    assert chapters and chapters[0] == "notebooks/01_setup"
    assert book.chapter_name(chapters[0]) == "setup"


def test_config_renders_executed_notebooks_offline():
    config = yaml.safe_load((PROJECT_ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    assert config["only_build_toc_files"] is True
    for key in ("binderhub_url", "jupyterhub_url", "colab_url", "deepnote_url"):
        assert not config["launch_buttons"].get(key)
    assert config["launch_buttons"].get("thebe") is False
    sphinx = config["sphinx"]["config"]
    assert "html_static_path" not in sphinx, "vendored JS under a static path renders widgets twice"
    assert sphinx["html_extra_path"] == ["book/_extra"]
    static = PROJECT_ROOT / "book" / "_extra" / "_static"
    scripts = [path for path in sphinx["nb_ipywidgets_js"] if path]
    assert scripts == ["widgets/require.js", "widgets/embed-amd.js"]
    for path in scripts + [sphinx["mathjax_path"]]:
        assert "://" not in path and (static / path).is_file(), path
    inline = sphinx["nb_ipywidgets_js"][""]["body"]
    assert "require.config" in inline and "libembed-amd" in inline


def test_vendored_files_match_the_hashes_in_licenses():
    static = PROJECT_ROOT / "book" / "_extra" / "_static"
    listed = dict(re.findall(r"^- `([^`]+)`: `([0-9a-f]{64})`$",
                             (static / "LICENSES.md").read_text(), re.MULTILINE))
    files = [p for p in listed if not p.endswith(".tgz")]
    assert "widgets/embed-amd.js" in files and "widgets/require.js" in files
    for rel in files:
        assert hashlib.sha256((static / rel).read_bytes()).hexdigest() == listed[rel], rel
    assert len(list((static / "widgets" / "fonts").glob("*.woff2"))) == 3


def test_missing_chapter_names_the_command(tmp_path):
    root = make_root(tmp_path / "root")
    (tmp_path / "executed").mkdir()
    with pytest.raises(EmaError) as info:
        book.build_book(tmp_path / "executed", tmp_path / "out", "cpu", root=root)
    message = str(info.value)
    assert "ema run setup --profile cpu" in message
    assert "01_setup.ipynb" in message


def test_missing_run_record_and_wrong_profile_are_refused(tmp_path):
    import nbformat

    root = make_root(tmp_path / "root")
    executed = tmp_path / "executed"
    executed.mkdir()
    for page in book.toc_chapters(root):
        make_source_notebook(executed / f"{Path(page).name}.ipynb", "Unexecuted")
    with pytest.raises(EmaError, match="no run record.*ema run setup --profile smoke"):
        book.stage_book(executed, tmp_path / "stage", PROFILE, root=root)
    for page in book.toc_chapters(root):
        record = fake_record(page) | {"profile": "cpu"}
        (executed / f"{Path(page).name}.run.json").write_text(json.dumps(record))
    with pytest.raises(EmaError, match="profile 'cpu'.*ema run setup --profile smoke"):
        book.stage_book(executed, tmp_path / "stage", PROFILE, root=root)
    # A notebook that failed half-way must not reach the book.
    first = executed / "01_setup.ipynb"
    nb = nbformat.read(first, as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("error", ename="ValueError", evalue="boom",
                                                  traceback=["Traceback"])]
    nbformat.write(nb, first)
    (executed / "01_setup.run.json").write_text(json.dumps(fake_record("notebooks/01_setup")))
    with pytest.raises(EmaError, match="error output.*ValueError"):
        book.stage_book(executed, tmp_path / "stage", PROFILE, root=root)


def test_missing_data_card_source_is_explained(tmp_path):
    root = make_root(tmp_path / "root")
    (root / book.DATA_CARD_SOURCE).unlink()
    executed = tmp_path / "executed"
    executed.mkdir()
    for page in book.toc_chapters(root):
        make_source_notebook(executed / f"{Path(page).name}.ipynb", "x")
        (executed / f"{Path(page).name}.run.json").write_text(json.dumps(fake_record(page)))
    with pytest.raises(EmaError, match="data/README.md"):
        book.stage_book(executed, tmp_path / "stage", PROFILE, root=root)


def test_stage_folds_parameters_and_renders_records(tmp_path):
    import nbformat

    root = make_root(tmp_path / "root")
    executed = tmp_path / "executed" / PROFILE
    executed.mkdir(parents=True)
    for page in book.toc_chapters(root):
        nb_path = make_source_notebook(executed / f"{Path(page).name}.ipynb", "x")
        nb = nbformat.read(nb_path, as_version=4)
        injected = nbformat.v4.new_code_cell("n_points = 4", metadata={"tags": ["injected-parameters"]})
        nb.cells.insert(2, injected)
        nbformat.write(nb, nb_path)
        (executed / f"{Path(page).name}.run.json").write_text(json.dumps(fake_record(page, 3725)))
    stage = tmp_path / "stage"
    # The parent folder (<build>/executed) is accepted too.
    staged = book.stage_book(tmp_path / "executed", stage, PROFILE, root=root, built="BUILD-TIME")
    nb = nbformat.read(stage / "notebooks" / "01_setup.ipynb", as_version=4)
    tagged = [c.metadata.get("tags", []) for c in nb.cells if c.cell_type == "code"]
    # One parameters cell on the page: papermill's (the values used), folded and labelled; the
    # notebook's defaults cell is left out of the page.
    assert "remove-cell" in tagged[0] and "hide-input" not in tagged[0]
    assert "hide-input" in tagged[1]
    assert nb.cells[2].metadata["mystnb"]["code_prompt_show"] == book.PARAMETERS_PROMPT
    assert tagged[2] == []
    page = (stage / "book" / "reproducibility.md").read_text()
    assert "ema:run-records" not in page and "BUILD-TIME" in page
    assert "`fake-package-for-tests` | `9.8.7`" in page
    assert "1 h 02 min" in page and "`ema run setup --profile smoke --model tiny-random`" in page
    assert '"n_points": 4' in page
    assert (stage / "data" / "README.md").is_file()
    assert (stage / "book" / "_extra" / "_static" / "widgets" / "embed-amd.js").is_file()
    assert set(staged["records"]) == set(book.toc_chapters(root))
    # Re-staging leaves unchanged files alone (Sphinx then rebuilds only what changed).
    mtime = (stage / "book" / "intro.md").stat().st_mtime_ns
    book.stage_book(executed, stage, PROFILE, root=root, built="BUILD-TIME")
    assert (stage / "book" / "intro.md").stat().st_mtime_ns == mtime


def test_files_linked_from_the_data_card_are_staged_where_the_links_resolve(tmp_path):
    root = make_root(tmp_path / "root")
    (root / "data" / "README.md").write_text(
        "# Data\n\nThe [schema](schema.csv), the [intro](../book/intro.md), [a site](https://x.org).\n")
    (root / "data" / "schema.csv").write_text("a,b\n")
    executed = tmp_path / "executed"
    executed.mkdir()
    for page in book.toc_chapters(root):
        make_source_notebook(executed / f"{Path(page).name}.ipynb", "x")
        (executed / f"{Path(page).name}.run.json").write_text(json.dumps(fake_record(page)))
    book.stage_book(executed, tmp_path / "stage", PROFILE, root=root)
    # The data card includes data/README.md from book/, so its links resolve from book/.
    assert (tmp_path / "stage" / "data" / "schema.csv").is_file()
    assert (tmp_path / "stage" / "book" / "schema.csv").is_file()


def test_package_versions_that_differ_between_chapters_are_shown_per_chapter():
    a = fake_record("notebooks/01_setup")
    b = fake_record("notebooks/02_unlearning") | {"packages": {"torch": "2.14.0"}}
    text = book.render_run_records({"notebooks/01_setup": a, "notebooks/02_unlearning": b}, PROFILE)
    assert "`2.13.0+cpu` (setup); `2.14.0` (unlearning)" in text


# --- slow tests: one real build -----------------------------------------------------------------

@pytest.mark.slow
def test_every_toc_page_has_html(fake_book):
    html = fake_book["html"]
    for page in book.toc_pages(fake_book["root"]):
        assert (html / f"{page}.html").is_file(), page
    assert (html / "index.html").is_file()
    print(f"book build took {fake_book['build_s']:.1f} s")


def visible_text(html: str) -> str:
    """The text of an HTML page, tags removed (inline code is split into spans)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html))


@pytest.mark.slow
def test_reproducibility_page_shows_the_run_records(fake_book):
    text = visible_text((fake_book["html"] / "book" / "reproducibility.html").read_text())
    assert "fake-package-for-tests" in text and "9.8.7" in text
    assert "tiny-random-seed0-v1" in text and "Linux-test-x86_64" in text
    assert "ema run setup --profile smoke" in text


@pytest.mark.slow
def test_chapter_pages_load_no_cdn_and_ship_the_vendored_widget_js(fake_book):
    html = fake_book["html"]
    assert (html / "_static" / "widgets" / "embed-amd.js").is_file()
    assert (html / "_static" / "widgets" / "require.js").is_file()
    assert len(list((html / "_static" / "widgets" / "fonts").glob("*.woff2"))) == 3
    for page in book.toc_chapters(fake_book["root"]):
        text = (html / f"{page}.html").read_text()
        scripts = book.page_scripts(text)
        assert not [s for s in scripts if "cdnjs" in s or "jsdelivr" in s], scripts
        widget_js = [s for s in scripts if "_static/widgets/" in s]
        assert [Path(s.split("?")[0]).name for s in widget_js] == ["require.js", "embed-amd.js"]
        assert book.WIDGET_STATE_MIME in text
        assert "require.config" in text
        assert "<img" in text  # the figure
        # One parameters cell renders, folded under its label.
        assert text.count("tag_hide-input") == 1 and book.PARAMETERS_PROMPT in text
    # Pages without widgets do not load the widget JavaScript; the vendored JS is not global.
    intro = (html / "book" / "intro.html").read_text()
    assert "_static/widgets/" not in intro
    brief = (html / "book" / "paper_in_brief.html").read_text()
    assert not [s for s in book.page_scripts(brief) if "cdn" in s]
    assert "_static/mathjax/tex-chtml-full.js" in brief


@pytest.mark.slow
def test_the_download_button_offers_the_notebook(fake_book):
    text = (fake_book["html"] / "notebooks" / "01_setup.html").read_text()
    assert "_sources/notebooks/01_setup.ipynb" in text
    assert (fake_book["html"] / "_sources" / "notebooks" / "01_setup.ipynb").is_file()
    for launcher in ("mybinder", "colab.research", "thebe-launch"):
        assert launcher not in text


@pytest.mark.slow
def test_rebuilding_is_incremental_and_still_complete(fake_book):
    start = time.perf_counter()
    html = book.build_book(fake_book["executed"], fake_book["out"], PROFILE, root=fake_book["root"])
    rebuild_s = time.perf_counter() - start
    assert html == fake_book["html"]
    log = re.sub(r"\x1b\[[0-9;]*m", "", (fake_book["out"] / "build.log").read_text())
    # At most the reproducibility page (its build time may have changed) is read again.
    assert re.search(r"updating environment: 0 added, [01] changed, 0 removed", log), log[-2000:]
    print(f"first build {fake_book['build_s']:.1f} s, rebuild {rebuild_s:.1f} s")


@pytest.mark.slow
def test_a_warning_fails_the_build_and_shows_the_log_tail(tmp_path):
    root = make_root(tmp_path / "root")
    with open(root / "book" / "intro.md", "a") as f:
        f.write("\nA citation that does not exist {cite:p}`no_such_key_2099`.\n")
    executed = tmp_path / "executed"
    executed.mkdir()
    for page in book.toc_chapters(root):
        make_source_notebook(executed / f"{Path(page).name}.ipynb", "Unexecuted")
        (executed / f"{Path(page).name}.run.json").write_text(json.dumps(fake_record(page)))
    with pytest.raises(EmaError) as info:
        book.build_book(executed, tmp_path / "out", PROFILE, root=root)
    message = str(info.value)
    assert "jupyter-book build failed" in message and "no_such_key_2099" in message
    assert (tmp_path / "out" / "build.log").is_file()


def test_the_data_card_has_one_title(fake_book):
    # data/README.md opens with its own "# Data card": the page includes it from line 2
    text = (fake_book["html"] / "book" / "data_card.html").read_text()
    # (the theme prints each page's title once more, in a print-only header without a link)
    assert len(re.findall(r"<h[12][^>]*>\s*Data card<a class=\"headerlink\"", text)) == 1, \
        "the data card's title repeats"
    assert "Sources and licenses" in text


def test_each_page_declares_thebes_settings_once(fake_book):
    # sphinx-thebe writes the same inline script twice; the second const declaration is a
    # JavaScript error on every page, so the build removes the copy.
    for page in book.toc_pages():
        html = (fake_book["html"] / f"{page}.html").read_text()
        assert html.count("const THEBE_JS_URL") == 1, page


def test_drop_repeated_inline_scripts_keeps_the_first_copy(tmp_path):
    page = tmp_path / "p.html"
    page.write_text("<head>\n  <script>const A = 1</script>\n  <script src='x.js'></script>\n"
                    "  <script>const A = 1</script>\n  <script>const B = 2</script>\n</head>")
    assert book.drop_repeated_inline_scripts(tmp_path) == 1
    text = page.read_text()
    assert text.count("const A = 1") == 1 and "const B = 2" in text and "x.js" in text
    assert book.drop_repeated_inline_scripts(tmp_path) == 0


def test_every_page_links_the_books_stylesheet(fake_book):
    html = fake_book["html"]
    assert (html / "_static" / "ema.css").is_file()
    for page in book.toc_pages():
        assert "_static/ema.css" in (html / f"{page}.html").read_text(), page


def test_bibliography_labels_match_the_author_year_citations(fake_book):
    text = (fake_book["html"] / "book" / "references.html").read_text()
    # the paper's entry, labelled as the text cites it, not pybtex's alpha label ([MAS+26])
    assert "Mushtaq et al. 2026" in text
    assert not re.search(r"\[[A-Z][A-Za-z]{1,3}\+?\d{2}\]", text), "alpha-style labels remain"


def test_the_reproducibility_page_shows_this_machines_last_bench_run():
    template = f"# R\n{book.RECORDS_BEGIN}\n{book.RECORDS_END}\n{book.BENCH_BEGIN}\nPLACEHOLDER\n{book.BENCH_END}\n"
    report = {"date": "2026-12-06T20:00:00+00:00", "model": "qwen2.5-coder-0.5b-instruct",
              "machine": {"cpu_model": "AMD EPYC", "usable_cores": 2, "memory_gib": 23.5},
              "packages": {"torch": "2.13.0"}, "compute_dtype": "bfloat16",
              "ratios": {"load_speedup": {"value": 24.1, "target": 10, "comparison": ">=",
                                          "met": True, "what": "cold load over cached"},
                         "eval_speedup": {"value": None, "target": 20, "comparison": ">=",
                                          "met": None, "what": "batched over naive"}}}
    page = book.render_reproducibility(template, {}, "cpu", bench_report=report)
    assert "`ema bench` on 2026-12-06" in page and "| load speedup | 24.1 | >= 10: met |" in page
    assert "| eval speedup | not measured | >= 20: not measured |" in page and "PLACEHOLDER" not in page
    assert "No `ema bench` report" in book.render_reproducibility(template, {}, "cpu")


def test_bench_result_reads_the_last_full_bench_run(tmp_path, monkeypatch):
    from ema_utils.core.paths import bench_report_file

    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path))
    assert book.bench_result() is None
    bench_report_file().parent.mkdir(parents=True)
    bench_report_file().write_text('{"date": "2026-12-06"}')
    assert book.bench_result() == {"date": "2026-12-06"}
    assert bench_report_file() == tmp_path / "results" / "bench" / "last.json"


def test_format_figure_gives_three_significant_digits_or_says_not_measured():
    assert book.format_figure(None) == "not measured"
    assert book.format_figure(0.35123) == "0.351" and book.format_figure(1234.5) == "1,234"
