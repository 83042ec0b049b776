"""The smoke-profile book, built by `ema book --profile smoke` on the real default model."""

import json
import subprocess
import sys

import pytest

from ema_utils import CONCEPTS, book

pytestmark = pytest.mark.integration


def _ema(smoke_book, *args):
    proc = subprocess.run([sys.executable, "-m", "ema_utils.cli", *args], env=smoke_book["env"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_toc_page_has_html(smoke_book):
    html = smoke_book["html"]
    assert (html / "index.html").is_file()
    for page in book.toc_pages():
        assert (html / f"{page}.html").is_file(), f"no HTML for {page}"


def test_setup_results_show_an_aligned_model(smoke_book):
    summary = json.loads(_ema(smoke_book, "results", "setup", "--profile", "smoke", "--json"))
    aligned = summary["refusal"]["aligned"]
    assert set(aligned) == set(CONCEPTS)
    assert all(0 <= v <= 1 for v in aligned.values())
    harmful = [aligned[c] for c in ("cybersecurity", "safety", "privacy", "medical_legal",
                                    "sensitive_content")]
    # The aligned default model refuses about half of these harmful requests (0.55 on smoke by
    # the phrase judge, 2026-11-22);
    # a broken judge, template or model load would put this near zero.
    assert sum(harmful) / len(harmful) >= 0.4, aligned
    # Utility is MMLU: the smoke profile's sample of one question per subject (57), with its
    # interval and chance beside it. (This 0.5B coder model answers MMLU at chance, 0.25 on 285
    # report questions, 2026-12-06: no accuracy bar can tell a broken scorer from the model.)
    mmlu = summary["mmlu"]
    assert mmlu["set"] == "mmlu" and mmlu["n"] == 57 and mmlu["chance"] == 0.25
    assert mmlu["low"] <= mmlu["accuracy"] <= mmlu["high"] and summary["utility"] == mmlu["accuracy"]


def test_second_run_does_no_model_work(smoke_book):
    runs = json.loads(_ema(smoke_book, "run", "all", "--profile", "smoke", "--json"))
    assert runs and all(r["reused"] for r in runs), runs


def test_a_fresh_rerun_of_setup_gives_identical_metrics_and_generations(smoke_book, tmp_path):
    # Reproducibility on the default model: chapter 1 again, in a second build folder (nothing
    # cached but the de-quantized model), must give the same summary and byte-identical
    # generations as the book's own run.
    env = {**smoke_book["env"], "EMA_BUILD_DIR": str(tmp_path)}
    rerun = {**smoke_book, "env": env}
    _ema(rerun, "run", "setup", "--profile", "smoke")
    first = json.loads(_ema(smoke_book, "results", "setup", "--profile", "smoke", "--json"))
    again = json.loads(_ema(rerun, "results", "setup", "--profile", "smoke", "--json"))
    assert again == first
    fresh = sorted((tmp_path / "results" / "store").glob("generations-*.jsonl"))
    assert fresh, "the rerun generated its own responses"
    store = smoke_book["build"] / "results" / "store"
    for path in fresh:
        assert (store / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_second_model_is_kept_apart_and_compared_with_the_default(smoke_book):
    """`ema run setup --model smollm2-135m-instruct` (run before the book by the fixture) has its
    own results and executed chapter; the default model's are untouched; the book compares them."""
    second = smoke_book["second_model"]
    default = json.loads(_ema(smoke_book, "results", "setup", "--profile", "smoke", "--json"))
    other = json.loads(_ema(smoke_book, "results", "setup", "--profile", "smoke",
                            "--model", second, "--json"))
    assert default["model"] == "qwen2.5-coder-0.5b-instruct" and other["model"] == second
    assert set(other["refusal"]["aligned"]) == set(CONCEPTS)
    executed = smoke_book["build"] / "executed"
    assert "qwen2.5-coder-0.5b-instruct" in (executed / "smoke" / "01_setup.ipynb").read_text()
    assert second in (executed / f"smoke@{second}" / "01_setup.ipynb").read_text()
    import re

    html = (smoke_book["html"] / "book" / "models.html").read_text()
    page = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html))  # the text a reader sees
    assert "qwen2.5-coder-0.5b-instruct" in page and second in page
    assert f"ema run cross_domain --profile smoke --model {second}" in page


def test_pages_carry_no_build_output_and_the_terminal_gets_it(smoke_book):
    """Training progress and logs go to the terminal of `ema book`, never into a page."""
    import nbformat

    for notebook in sorted((smoke_book["build"] / "executed" / "smoke").glob("*.ipynb")):
        nb = nbformat.read(str(notebook), as_version=4)
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                assert out.get("name") != "stderr", f"{notebook.name}: stderr in the page: {out}"
                text = "".join(out.get("text", "")) + str(out.get("data", {}).get("text/plain", ""))
                assert "[ema]" not in text and "it/s]" not in text and "step/s" not in text, \
                    f"{notebook.name}: build output in the page: {text[:200]}"
    assert "unlearn (npo)" in smoke_book["log"], "the terminal shows the training progress"


def test_every_figure_fits_the_column_is_sharp_and_has_no_empty_panel(smoke_book):
    """Each chapter's figures, as the smoke profile renders them (ema_utils.core.figures)."""
    import base64

    import nbformat

    from ema_utils.core import figures

    seen = 0
    for notebook in sorted((smoke_book["build"] / "executed" / "smoke").glob("*.ipynb")):
        nb = nbformat.read(str(notebook), as_version=4)
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                if "image/png" not in out.get("data", {}):
                    continue
                seen += 1
                meta = out.get("metadata", {}).get("image/png", {})
                where = f"{notebook.name}: {cell.source[:60]!r}"
                assert "ema_figure" in meta, f"{where}: not drawn by figures.png_for_page"
                assert meta["width"] <= figures.COLUMN_INCHES * figures.DPI + 1, where
                width, _ = figures.png_size(base64.b64decode(out["data"]["image/png"]))
                assert width >= 1.9 * meta["width"], f"{where}: low resolution"
                assert meta["ema_figure"]["empty_axes"] == [], f"{where}: empty panels"
    assert seen >= 12, f"only {seen} figures in the smoke book"
