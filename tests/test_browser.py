"""Open the built book in headless Chromium: titles, figures, no errors, widgets that render offline.

By default the book is the fake one that test_book.py builds (one fake executed notebook per
chapter). Set EMA_BOOK_HTML to the html folder of a real build (`ema book --profile smoke`) to
check that instead. Screenshots go to $EMA_ARTIFACTS (or the pytest temporary folder).

Needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver).
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import threading
from pathlib import Path

import pytest

from ema_utils import book
from ema_utils.core.paths import PROJECT_ROOT

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WIDGET_SELECTOR = ".jupyter-widgets, [class*='widget-']"
ERROR_TEXT = re.compile(r"Traceback \(most recent call last\)|\b[A-Z]\w*Error\b")
# Console messages that are not errors of the page: the pydata theme logs a reset of the (empty)
# stored light/dark mode in a fresh profile; the book has no favicon. (sphinx-thebe's duplicate
# THEBE_JS_URL declaration is an error; ema_utils.build.book removes it, so it is not listed.)
KNOWN_CONSOLE_NOISE = ("Got invalid theme mode", "favicon.ico")
VIEWPORT_WIDTH = 1280
# A progress bar left in a page: tqdm's widget (an ipywidgets progress) or its text ("45%|###|").
PROGRESS_SELECTOR = ".widget-progress, .jupyter-widgets progress"
PROGRESS_TEXT = re.compile(r"\d+%\|.*\|\s*\d+/\d+")

# Elements that stick out of the article at the viewport's width, unless a container that
# scrolls sideways (myst-nb's output areas, a styled table wrapper) holds them.
_CUT_ELEMENTS_JS = """
const main = document.querySelector('article') || document.querySelector('main');
if (!main) { return []; }
const right = main.getBoundingClientRect().right + 2;
function scrolls(el) {
  for (let a = el.parentElement; a && a !== main.parentElement; a = a.parentElement) {
    const ox = getComputedStyle(a).overflowX;
    if (ox === 'auto' || ox === 'scroll') { return true; }
  }
  return false;
}
return Array.from(main.querySelectorAll('table, img, svg, pre'))
  .filter(el => el.getBoundingClientRect().width > 0)
  .filter(el => el.getBoundingClientRect().right > right && !scrolls(el))
  .map(el => el.tagName + ' ' + Math.round(el.getBoundingClientRect().width) + 'px: '
       + (el.textContent || el.getAttribute('src') || '').trim().slice(0, 60));
"""


def _console_errors(drv) -> list[str]:
    """SEVERE browser-console messages since the last call, known noise left out."""
    return [e["message"] for e in drv.get_log("browser")
            if e["level"] == "SEVERE" and not any(n in e["message"] for n in KNOWN_CONSOLE_NOISE)]


@pytest.fixture(scope="module", params=["fake", pytest.param("smoke", marks=pytest.mark.integration)])
def book_html(request, tmp_path_factory):
    """``(html folder, folder with its _toc.yml)``: $EMA_BOOK_HTML, the fake book, or the real
    smoke-profile book that `ema book --profile smoke` builds (conftest's smoke_book)."""
    if request.param == "smoke":
        html = request.getfixturevalue("smoke_book")["html"]
        return html, html.parent.parent / "source"
    env = os.environ.get("EMA_BOOK_HTML")
    if env:
        html = Path(env).expanduser().resolve()
        if not (html / "index.html").is_file():
            pytest.fail(f"EMA_BOOK_HTML={env} holds no index.html; build the book first "
                        "(ema book --profile smoke) and point at its _build/html folder.")
        source = html.parent.parent / "source"  # ema_utils.build.book stages the sources there
        return html, source if (source / book.TOC_FILE).is_file() else PROJECT_ROOT
    import test_book  # the same build as test_book.py's, built once per session

    built = test_book.built_book(tmp_path_factory)
    return built["html"], built["root"]


class _RecordingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the book and remembers every request that failed (a missing font, a script)."""

    failures: list

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def send_error(self, code, *args, **kwargs):
        if self.path != "/favicon.ico":  # the browser asks for it on its own; the book has none
            self.failures.append((int(code), self.path))
        super().send_error(code, *args, **kwargs)


@pytest.fixture(scope="module")
def server(book_html):
    html, _ = book_html
    failures: list = []
    handler = functools.partial(type("Handler", (_RecordingHandler,), {"failures": failures}),
                                directory=str(html))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", failures
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if not CHROMEDRIVER.is_file() or not CHROMIUM.is_file():
        pytest.skip(f"{CHROMEDRIVER} or {CHROMIUM} is missing: install Debian's chromium and "
                    "chromium-driver (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", f"--window-size={VIEWPORT_WIDTH},1800",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    env = os.environ.get("EMA_ARTIFACTS")
    folder = Path(env) / "screenshots" if env else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wait_for_widgets(drv, timeout: float = 30):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def rendered(d):
        found = [e for e in d.find_elements(By.CSS_SELECTOR, WIDGET_SELECTOR) if e.is_displayed()]
        return found or False

    return WebDriverWait(drv, timeout).until(rendered)


def _visible_title(drv) -> str:
    """The text of the first visible top-level heading of the page's article."""
    from selenium.webdriver.common.by import By

    for heading in drv.find_elements(By.CSS_SELECTOR, "article h1, main h1"):
        if heading.is_displayed() and heading.text.strip():
            return heading.text.strip()
    return ""


def _check_page(drv, url: str, shot: Path, expect_widgets: bool) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _console_errors(drv)  # drop what earlier pages logged
    drv.get(url)
    WebDriverWait(drv, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    widgets = _wait_for_widgets(drv) if expect_widgets else []
    drv.save_screenshot(str(shot))
    title = _visible_title(drv)
    images = drv.execute_script(
        "return Array.from(document.querySelectorAll('article img, main img'))"
        ".filter(i => i.complete && i.naturalWidth > 0).length")
    outputs = [e.text for e in drv.find_elements(By.CSS_SELECTOR, ".cell_output")]
    tracebacks = drv.find_elements(By.CSS_SELECTOR, ".cell_output .traceback, .output.traceback")
    progress = [e.get_attribute("class") for e in drv.find_elements(By.CSS_SELECTOR, PROGRESS_SELECTOR)]
    progress += [o[:80] for o in outputs if PROGRESS_TEXT.search(o)]
    return {"title": title, "doc_title": drv.title, "images": images, "widgets": widgets,
            "errors": [o for o in outputs if ERROR_TEXT.search(o)] + [t.text for t in tracebacks],
            "console": _console_errors(drv), "progress": progress, **_layout(drv)}


def _layout(drv) -> dict:
    """How wide the page is against the viewport, and what sticks out of the article."""
    return {"page_width": drv.execute_script("return document.documentElement.scrollWidth"),
            "viewport": drv.execute_script("return document.documentElement.clientWidth"),
            "cut": drv.execute_script(_CUT_ELEMENTS_JS)}


def test_every_chapter_renders_with_title_figures_and_widgets(book_html, server, driver, artifacts):
    html, toc_root = book_html
    base, failures = server
    chapters = book.toc_chapters(toc_root)
    assert chapters, "the table of contents lists no chapter"
    for page in chapters:
        shot = artifacts / (page.replace("/", "_") + ".png")
        has_widgets = book.WIDGET_STATE_MIME in (html / f"{page}.html").read_text()
        result = _check_page(driver, f"{base}/{page}.html", shot, expect_widgets=has_widgets)
        assert result["title"], f"{page}: no visible title"
        assert result["doc_title"], f"{page}: empty <title>"
        assert result["images"] >= 1, f"{page}: no figure rendered"
        assert not result["errors"], f"{page}: error output shown: {result['errors'][:2]}"
        assert not result["console"], f"{page}: JavaScript errors: {result['console'][:3]}"
        assert not result["progress"], f"{page}: a progress bar in the page: {result['progress'][:3]}"
        assert result["page_width"] <= result["viewport"], \
            f"{page}: the page is {result['page_width']} px wide in a {result['viewport']} px viewport"
        assert not result["cut"], f"{page}: cut at the page's edge: {result['cut'][:3]}"
        if has_widgets:
            assert all(w.size["height"] > 0 and w.size["width"] > 0 for w in result["widgets"][:5])
        assert shot.is_file() and shot.stat().st_size > 10_000
    # The setup chapter must show a widget (the acceptance check).
    setup = (html / "notebooks" / "01_setup.html").read_text()
    assert book.WIDGET_STATE_MIME in setup, "the setup chapter saved no widget state"
    assert not failures, f"requests that failed (missing files): {failures}"


def test_narrative_pages_render_with_math(book_html, server, driver, artifacts):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    html, toc_root = book_html
    base, failures = server
    for page in [p for p in book.toc_pages(toc_root) if not p.startswith("notebooks/")]:
        _console_errors(driver)
        driver.get(f"{base}/{page}.html")
        assert _visible_title(driver), page
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "Traceback" not in body, page
        assert not _console_errors(driver), page
        layout = _layout(driver)
        assert layout["page_width"] <= layout["viewport"] and not layout["cut"], (page, layout)
        driver.save_screenshot(str(artifacts / (page.replace("/", "_") + ".png")))
    driver.get(f"{base}/book/paper_in_brief.html")
    # MathJax (vendored) typesets the formulas: no network needed.
    WebDriverWait(driver, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "mjx-container"))
    assert not failures, f"requests that failed (missing files): {failures}"


def test_fake_widgets_respond_and_load_their_icon_font_offline(request, book_html, server, driver,
                                                              artifacts):
    """Client-side links work without a kernel, over http and over file://."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    if os.environ.get("EMA_BOOK_HTML") or request.node.callspec.params["book_html"] != "fake":
        pytest.skip("checks the fake chapter's own widgets")
    html, _ = book_html
    base, failures = server
    for url in (f"{base}/notebooks/01_setup.html", (html / "notebooks" / "01_setup.html").as_uri()):
        driver.get(url)
        _wait_for_widgets(driver)
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".widget-dropdown select"))
        select = Select(driver.find_element(By.CSS_SELECTOR, ".widget-dropdown select"))
        select.select_by_index(2)
        WebDriverWait(driver, 10).until(lambda d: d.find_element(
            By.CSS_SELECTOR, ".widget-slider .widget-readout").text.strip() == "2")
        tabs = driver.find_elements(By.CSS_SELECTOR, ".jupyter-widgets .lm-TabBar-tab")
        assert [t.text for t in tabs][:2] == ["One", "Two"]
        # Each widget renders once (vendored JS added twice would duplicate them).
        assert len(driver.find_elements(By.CSS_SELECTOR, ".widget-dropdown")) == 1
        WebDriverWait(driver, 15).until(lambda d: d.execute_script(
            "return Array.from(document.fonts).some("
            "f => f.family.includes('Font Awesome') && f.status === 'loaded')"))
    driver.save_screenshot(str(artifacts / "fake_widgets_after_click.png"))
    assert not failures, f"requests that failed (missing files): {failures}"


def test_the_page_checks_catch_a_progress_bar_a_wide_page_and_a_cut_table(driver, tmp_path, artifacts):
    """The checks above can fail: a page with tqdm's text bar, a table cut at the article's
    edge and a page wider than the viewport is caught on each count; a wide table inside a
    container that scrolls sideways is not."""
    wide_table = "<table><tr>" + "".join(f"<td>column {i} value</td>" for i in range(40)) + "</tr></table>"
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<html><head><title>bad</title></head><body><main><article style='width:800px'>"
        "<h1>Bad page</h1><div class='cell_output'><pre>unlearn (npo):  45%|####5     | 9/20 "
        "[00:03&lt;00:04]</pre></div>" + wide_table + "</article></main></body></html>")
    result = _check_page(driver, bad.as_uri(), artifacts / "bad_page.png", expect_widgets=False)
    assert result["progress"] and result["cut"] and result["page_width"] > result["viewport"]
    good = tmp_path / "good.html"
    good.write_text(
        "<html><head><title>good</title></head><body><main><article style='width:800px'>"
        "<h1>Good page</h1><div style='overflow-x:auto'>" + wide_table + "</div>"
        "</article></main></body></html>")
    result = _check_page(driver, good.as_uri(), artifacts / "good_page.png", expect_widgets=False)
    assert not result["progress"] and not result["cut"]
    assert result["page_width"] <= result["viewport"]
