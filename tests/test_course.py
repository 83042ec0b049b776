"""`ema course build`: a student edition without solutions and an instructor edition with
them, outputs stripped, parameters cell kept; the student edition's checks report the blanks
without stopping the notebook, and the instructor edition's pass."""

from __future__ import annotations

import contextlib
import io
import json
import re

import nbformat
import numpy as np
import pandas as pd
import pytest

from ema_utils import exercises
from ema_utils.cli import main
from ema_utils.core.paths import NOTEBOOK_DIR

NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def _tags(cell):
    return cell.metadata.get("tags", [])


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    out = tmp_path_factory.mktemp("course")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["course", "build", "--out", str(out), "--json"]) == 0
    return out, json.loads(stdout.getvalue())


def test_both_editions_are_built(course):
    out, result = course
    for edition in ("student", "instructor"):
        names = sorted(p.name for p in (out / edition).glob("*.ipynb"))
        assert names == [p.name for p in NOTEBOOKS], edition
    assert sum(result["exercises"].values()) == len(exercises.exercise_ids())


def test_student_edition_has_no_solution_and_instructor_edition_does(course):
    out, _ = course
    for path in NOTEBOOKS:
        student = nbformat.read(out / "student" / path.name, as_version=4)
        teacher = nbformat.read(out / "instructor" / path.name, as_version=4)
        assert not [c for c in student.cells if "solution" in _tags(c)], path.name
        assert not any("# Reference solution" in c.source for c in student.cells)
        n = len(exercises.exercise_ids(path.stem[3:]))
        assert sum("solution" in _tags(c) for c in teacher.cells) == n
        assert sum("exercise" in _tags(c) for c in student.cells) == n
        assert sum("check" in _tags(c) for c in student.cells) == n
        assert sum("exercise-mode" in _tags(c) for c in student.cells) == 1
        assert not any("exercise-mode" in _tags(c) for c in teacher.cells)


def test_editions_are_clean_and_parameterised(course):
    import papermill

    out, _ = course
    for edition in ("student", "instructor"):
        for path in NOTEBOOKS:
            target = out / edition / path.name
            nb = nbformat.read(target, as_version=4)
            assert [i for i, c in enumerate(nb.cells) if "parameters" in _tags(c)] != []
            assert sum("parameters" in _tags(c) for c in nb.cells) == 1
            assert all(not c.get("outputs") and c.get("execution_count") is None
                       for c in nb.cells if c.cell_type == "code")
            assert nb.metadata["kernelspec"]["name"] == "python3"
            assert papermill.inspect_notebook(str(target)) == papermill.inspect_notebook(str(path))
            # everything before the exercises is the chapter, unchanged
            source = nbformat.read(path, as_version=4)
            first = next(i for i, c in enumerate(source.cells) if "exercise-intro" in _tags(c))
            assert [c.source for c in nb.cells[:first]] == [c.source for c in source.cells[:first]]


def _exercise_section(nb):
    start = next(i for i, c in enumerate(nb.cells) if "exercise-intro" in _tags(c))
    return [c for c in nb.cells[start:] if c.cell_type == "code"]


def _exec_section(nb):
    """Run the edition's exercise section in-process, with the chapter variables it reads."""
    ns = {"matrix": exercises.example_matrix(), "pd": pd, "np": np, "display": lambda *a, **k: None}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            for cell in _exercise_section(nb):
                exec(compile(cell.source, "<cell>", "exec"), ns)
    finally:
        exercises.set_mode("instructor")
    return out.getvalue()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_student_edition_runs_through_and_reports_every_blank(course, path):
    out, _ = course
    printed = _exec_section(nbformat.read(out / "student" / path.name, as_version=4))
    n = len(exercises.exercise_ids(path.stem[3:]))
    assert printed.count(exercises.NOT_YET) == n, printed
    assert printed.count("fill in") == n
    assert exercises.CORRECT not in printed


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_instructor_edition_checks_pass(course, path):
    out, _ = course
    printed = _exec_section(nbformat.read(out / "instructor" / path.name, as_version=4))
    n = len(exercises.exercise_ids(path.stem[3:]))
    assert printed.count(exercises.CORRECT) == n, printed
    assert exercises.NOT_YET not in printed


def test_teaching_page_is_in_the_book():
    from ema_utils.build.book import toc_pages
    from ema_utils.core.paths import PROJECT_ROOT

    assert "book/teaching" in toc_pages()
    text = (PROJECT_ROOT / "book" / "teaching.md").read_text()
    assert text.count("\n# ") + text.startswith("# ") == 1
    for chapter in [p.stem for p in NOTEBOOKS]:
        assert f"notebooks/{chapter}" in text, chapter
    assert "{doc}`reproducibility`" in text
    # The timing table: one row per chapter, each cell a time or an honest "not measured yet".
    rows = [line for line in text.splitlines() if line.startswith("| ") and "min" in line]
    assert len(rows) == len(NOTEBOOKS), rows
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(re.fullmatch(r"(under |about )?[\d.]+ (min|s)|not measured yet", c) for c in cells[1:]), row
