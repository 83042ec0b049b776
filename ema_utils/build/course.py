"""`ema course build`: student and instructor editions of the chapter notebooks.

- **instructor** edition: every cell of every chapter (reference solutions included), outputs
  stripped: what the book renders, to run in class or to prepare from.
- **student** edition: the same notebooks without the cells tagged ``solution``; the blanks
  (tag ``exercise``) stay, and a cell ``exercises.set_mode("student")`` is inserted before the
  first exercise, so a check on a blank prints what is wrong instead of raising: the edition runs
  from top to bottom (under papermill too) and the student sees every check's message.

Both keep the ``parameters`` cell, so ``papermill NB OUT -p ...`` (or the values of a profile,
e.g. ``ema_utils.build.orchestrate.resolve_parameters(chapter, "smoke")``) runs them as the chapters.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from ..core.errors import EmaError
from ..core.paths import build_dir, notebook_dir

EDITIONS = ("student", "instructor")
MODE_SOURCE = 'exercises.set_mode("student")  # a check on a blank prints what is wrong'


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def strip_outputs(nb) -> None:
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)


def make_edition(nb, edition: str):
    """A copy of ``nb`` as the ``edition`` (student or instructor), outputs stripped."""
    # deferred: nbformat loads slowly; `ema --help` imports this module (CLI_MODULES)
    from nbformat.v4 import new_code_cell

    if edition not in EDITIONS:
        raise EmaError(f"edition must be one of {', '.join(EDITIONS)}; got {edition!r}")
    nb = copy.deepcopy(nb)
    strip_outputs(nb)
    if edition == "student":
        nb.cells = [c for c in nb.cells if "solution" not in _tags(c)]
        setup = [i for i, c in enumerate(nb.cells) if "exercise-setup" in _tags(c)]
        if setup:
            mode = new_code_cell(MODE_SOURCE)
            mode.metadata["tags"] = ["exercise-mode"]
            nb.cells.insert(setup[0] + 1, mode)
    nb.metadata["ema_edition"] = edition
    return nb


def build_course(out: Path | None = None, notebooks: list[Path] | None = None) -> dict:
    """Write both editions of every chapter notebook under ``out``/{student,instructor}.
    Returns {"out": ..., "editions": {edition: [paths]}, "exercises": {notebook: n}}."""
    # deferred: nbformat loads slowly; `ema --help` imports this module (CLI_MODULES)
    import nbformat

    out = Path(out) if out else build_dir() / "course"
    folder = notebook_dir()
    notebooks = sorted(notebooks or folder.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise EmaError(f"no chapter notebook in {folder}")
    written = {e: [] for e in EDITIONS}
    counts = {}
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        params = [c for c in nb.cells if "parameters" in _tags(c)]
        if len(params) != 1:
            raise EmaError(f"{path}: {len(params)} cells tagged 'parameters'; papermill needs exactly one")
        counts[path.name] = sum("exercise" in _tags(c) for c in nb.cells)
        for edition in EDITIONS:
            target = out / edition / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".ipynb.tmp")
            nbformat.write(make_edition(nb, edition), tmp)
            tmp.replace(target)  # atomic: never a half-written notebook
            written[edition].append(str(target))
    return {"out": str(out), "editions": written, "exercises": counts}


def cmd_course(args) -> int:
    if args.course_command == "build":
        result = build_course(Path(args.out) if args.out else None)
        if args.json:
            json.dump(result, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            n = sum(result["exercises"].values())
            for edition, paths in result["editions"].items():
                print(f"{edition}: {len(paths)} notebooks in {Path(result['out']) / edition}")
            print(f"{n} exercises; the student edition has no solution cells")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("course", help="course mode: student and instructor editions")
    csub = p.add_subparsers(dest="course_command", required=True, metavar="ACTION")
    b = csub.add_parser("build", help="write student (no solutions) and instructor editions")
    b.add_argument("--out", metavar="DIR", help="output folder (default _build/course)")
    b.add_argument("--json", action="store_true", help="print one JSON document")
    b.set_defaults(func=cmd_course)
