"""Notebook hygiene: the chapter notebooks are committed clean and parameterizable.

Notebooks in notebooks/ are sources: no outputs (executed copies are build products under
_build/), the python3 kernel, and exactly one cell tagged "parameters" for papermill. Each
notebook is a chapter listed in _toc.yml, and each chapter there has its notebook.
"""

from __future__ import annotations

import re

import pytest

from ema_utils import CHAPTERS
from ema_utils.build.book import chapter_name, toc_chapters
from ema_utils.core.paths import NOTEBOOK_DIR

NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
NO_NOTEBOOKS = "no notebook in notebooks/ yet"


def _read(path):
    import nbformat

    return nbformat.read(path, as_version=4)


@pytest.mark.skipif(not NOTEBOOKS, reason=NO_NOTEBOOKS)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_no_outputs(path):
    nb = _read(path)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} carry outputs or execution counts; clear "
                       "them before committing (executed copies belong under _build/): "
                       f"jupyter nbconvert --clear-output --inplace {path}")
    assert "widgets" not in nb.metadata, f"{path.name}: saved widget state in the metadata"
    assert "papermill" not in nb.metadata, f"{path.name}: this is an executed copy (papermill " \
                                           "metadata); commit the source notebook instead"


@pytest.mark.skipif(not NOTEBOOKS, reason=NO_NOTEBOOKS)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_uses_the_python3_kernel(path):
    kernelspec = _read(path).metadata.get("kernelspec", {})
    assert kernelspec.get("name") == "python3", (
        f"{path.name}: kernelspec name is {kernelspec.get('name')!r}, not 'python3' (papermill and "
        "the book run every chapter on the python3 kernel)")


@pytest.mark.skipif(not NOTEBOOKS, reason=NO_NOTEBOOKS)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_exactly_one_parameters_cell(path):
    nb = _read(path)
    tagged = [i for i, cell in enumerate(nb.cells)
              if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, (f"{path.name}: {len(tagged)} cells tagged 'parameters' ({tagged}); "
                              "papermill needs exactly one")
    assert nb.cells[tagged[0]].cell_type == "code", f"{path.name}: the parameters cell is not code"
    injected = [i for i, cell in enumerate(nb.cells)
                if "injected-parameters" in cell.get("metadata", {}).get("tags", [])]
    assert not injected, f"{path.name}: papermill's injected-parameters cell was committed"


@pytest.mark.skipif(not NOTEBOOKS, reason=NO_NOTEBOOKS)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_parameter_line_is_read_by_papermill(path):
    # papermill reads the parameters cell line by line and silently skips a line it cannot
    # parse (an apostrophe in a comment can do it): that parameter then cannot be set by a profile
    import papermill

    cell = next(c for c in _read(path).cells if "parameters" in c.get("metadata", {}).get("tags", []))
    assigned = re.findall(r"^([A-Za-z_]\w*)\s*=", cell.source, flags=re.M)
    read = set(papermill.inspect_notebook(str(path)))
    assert not set(assigned) - read, (f"{path.name}: papermill cannot read the parameter line(s) of "
                                      f"{sorted(set(assigned) - read)}; simplify their comments")


@pytest.mark.skipif(not NOTEBOOKS, reason=NO_NOTEBOOKS)
def test_notebooks_and_table_of_contents_agree():
    names = [p.stem for p in NOTEBOOKS]
    for name in names:
        assert re.fullmatch(r"\d\d_[a-z_]+", name), f"{name}.ipynb: name it NN_chapter.ipynb"
        assert chapter_name(name) in CHAPTERS, (
            f"{name}.ipynb: '{chapter_name(name)}' is not a chapter name ({', '.join(CHAPTERS)})")
    listed = [page.split("/", 1)[1] for page in toc_chapters()]
    assert not set(names) - set(listed), (
        f"notebooks not in _toc.yml: {sorted(set(names) - set(listed))}; add a line "
        "`- file: notebooks/NN_name` under the Chapters part")
    assert not set(listed) - set(names), (
        f"_toc.yml lists chapters without a notebook: {sorted(set(listed) - set(names))}")
