"""Course exercises: every check passes on its reference solution and fails, with a helpful
message, on the blank and on a plausible wrong answer.

The exercise cells are taken from the chapter notebooks themselves (blank, solution and check
cells, found by their tags and ``exercise_id``) and executed in-process with the fixed inputs
they need; whole notebooks are never run here (they need the real model).
"""

from __future__ import annotations

import contextlib
import io
import time

import nbformat
import numpy as np
import pandas as pd
import pytest

from ema_utils import CHAPTERS, exercises
from ema_utils.core.paths import NOTEBOOK_DIR

NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def _cells():
    """exercise_id -> {"blank", "solution", "check", "task"} sources, from the notebooks."""
    found = {}
    for path in NOTEBOOKS:
        for cell in nbformat.read(path, as_version=4).cells:
            eid = cell.metadata.get("exercise_id")
            if not eid:
                continue
            tags = cell.metadata.get("tags", [])
            kind = ("solution" if "solution" in tags else "blank" if "exercise" in tags
                    else "check" if "check" in tags else "task" if "exercise-task" in tags else None)
            found.setdefault(eid, {})[kind] = cell.source
    return found


CELLS = _cells()
IDS = exercises.exercise_ids()


def _namespace():
    """The fixed inputs the exercise cells read: the chapter's own variables (an EMA matrix
    like chapter 3's) and what the chapter notebook imported."""
    return {"exercises": exercises, "matrix": exercises.example_matrix(), "pd": pd, "np": np,
            "display": lambda *a, **k: None}


def _run(eid, parts, mode="instructor"):
    ns = _namespace()
    exercises.set_mode(mode)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            for part in parts:
                exec(compile(CELLS[eid][part], f"<{eid}:{part}>", "exec"), ns)
    finally:
        exercises.set_mode("instructor")
    return out.getvalue()


def test_every_exercise_is_in_its_notebook():
    assert set(CELLS) == set(IDS) and len(IDS) == len(set(IDS))
    for eid in IDS:
        assert set(CELLS[eid]) == {"task", "blank", "solution", "check"}, eid
    for chapter in CHAPTERS:
        assert 2 <= len(exercises.exercise_ids(chapter)) <= 3, chapter
        assert all(eid.startswith(chapter + ".") for eid in exercises.exercise_ids(chapter))


def test_exercise_cells_are_written_only_in_the_notebooks():
    """One source: the module holds the checks, the notebooks the cells (the student edition is
    built from the notebooks). No blank, solution or task is copied into the library."""
    from ema_utils.core.paths import PROJECT_ROOT

    library = "\n".join(p.read_text() for p in sorted((PROJECT_ROOT / "ema_utils").rglob("*.py")))
    assert not hasattr(exercises, "EXERCISES")
    for eid, parts in CELLS.items():
        for kind in ("task", "blank", "solution"):
            lines = [line for line in parts[kind].splitlines() if len(line.strip()) > 40]
            copied = [line for line in lines if line.strip() in library]
            assert not copied, f"{eid} {kind} is written in ema_utils too: {copied[:1]}"


def test_every_check_is_posed_and_every_posed_check_exists():
    """The notebooks' check cells and the module's checks agree: each check cell calls a check
    of ema_utils.chapters.exercises, and each check of the module is called by one exercise."""
    import re

    called = {}
    for eid, parts in CELLS.items():
        names = re.findall(r"exercises\.(check_\w+)\(", parts["check"])
        assert len(names) == 1, f"{eid}: its check cell must call one exercises.check_*"
        called.setdefault(names[0], []).append(eid)
    defined = {n for n in dir(exercises) if n.startswith("check_") and callable(getattr(exercises, n))}
    assert set(called) == defined, (sorted(set(called) - defined), sorted(defined - set(called)))
    assert all(len(eids) == 1 for eids in called.values()), called


def test_solution_cells_fold_in_the_book():
    for path in NOTEBOOKS:
        for cell in nbformat.read(path, as_version=4).cells:
            tags = cell.metadata.get("tags", [])
            if "solution" in tags:
                assert "hide-input" in tags, path.name
            if "exercise" in tags:
                assert "solution" not in tags


@pytest.mark.parametrize("eid", IDS)
def test_reference_solution_passes(eid):
    start = time.perf_counter()
    printed = _run(eid, ["blank", "solution", "check"])
    assert exercises.CORRECT in printed, printed
    assert exercises.NOT_YET not in printed
    assert time.perf_counter() - start < 2.0, f"{eid} is not cheap"


@pytest.mark.parametrize("eid", IDS)
def test_blank_fails_with_a_helpful_message(eid):
    with pytest.raises(exercises.ExerciseError) as err:
        _run(eid, ["blank", "check"])
    assert "fill in" in str(err.value), str(err.value)


@pytest.mark.parametrize("eid", IDS)
def test_blank_in_student_mode_prints_and_continues(eid):
    printed = _run(eid, ["blank", "check"], mode="student")
    assert exercises.NOT_YET in printed and "fill in" in printed, printed


# A plausible wrong answer per exercise, and words the message must contain.
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy.stats import binomtest  # noqa: E402


def _wald(k, n):
    p = k / n
    h = 1.959963984540054 * (p * (1 - p) / n) ** 0.5
    return p - h, p + h


def _svd_uncentred(states):
    v = np.linalg.svd(states, full_matrices=False)[2][0]
    return -v if v @ states.mean(0) < 0 else v


def _pc_wrong_sign(states):
    return -exercises.concept_vector_reference(states)


def _perturb_not_orthogonal(x, y, eps):
    y = y * x.norm() / y.norm()
    return (1 - eps ** 2) ** 0.5 * x + eps * y


def _mcnemar(lost, gained):
    return binomtest(lost, lost + gained).pvalue if lost + gained else 1.0


WRONG = [
    (exercises.check_wilson, _wald, "Wald"),
    (exercises.check_kappa, lambda tp, fp, fn, tn: (tp + tn) / (tp + fp + fn + tn), "accuracy"),
    (exercises.check_npo_loss, lambda t, r, b: -F.logsigmoid(-b * (t - r)).mean(), "2/β"),
    (exercises.check_npo_loss, lambda t, r, b: -(2 / b) * F.logsigmoid(b * (t - r)).mean(), "sign"),
    (exercises.check_forget_set, lambda j, c: j[j.concept == c], "did not refuse"),
    (exercises.check_forget_set, lambda j, c: j[j.is_refusal], "other concepts"),
    (exercises.check_ema_flag, lambda lo, g, n, t: (lo - g) / n > 0.15 and not t, "McNemar"),
    (exercises.check_ema_flag, lambda lo, g, n, t: (lo - g) / n > 0.05 and _mcnemar(lo, g) < 0.05 and not t, "15 points"),
    (exercises.check_ema_flag, lambda lo, g, n, t: (lo - g) / n > 0.15 and _mcnemar(lo, g) < 0.05, "target"),
    (exercises.check_ema_flag, lambda lo, g, n, t: abs(lo - g) / n > 0.15 and _mcnemar(lo, g) < 0.05 and not t, "drop"),
    (exercises.check_recovery, lambda a, u, g: (g - u) / (a - u) if a != u else 0.0, "nan"),
    (exercises.check_recovery, lambda a, u, g: (a - g) / (a - u) if a - u >= 0.1 else float("nan"), "numerator"),
    (exercises.check_concept_vector, _svd_uncentred, "mean"),
    (exercises.check_concept_vector, _pc_wrong_sign, "sign"),
    (exercises.check_concept_vector, lambda s: 3 * exercises.concept_vector_reference(s), "norm"),
    (exercises.check_mean_cosine, lambda s, v: float(np.mean(s @ v)), "norms"),
    (exercises.check_orthogonal_perturbation, _perturb_not_orthogonal, "orthogonal"),
    (exercises.check_relative_increase, lambda p, o, b: (p - o) / o, "L_base - L_orig"),
    (exercises.check_relative_increase, lambda p, o, b: (p - o) / (b - o) if b != o else 0.0, "nan"),
]


@pytest.mark.parametrize("check,wrong,words", WRONG, ids=[f"{c.__name__}-{w}" for c, _, w in WRONG])
def test_plausible_wrong_answer_fails_helpfully(check, wrong, words):
    with pytest.raises(exercises.ExerciseError) as err:
        check(wrong)
    assert words.lower() in str(err.value).lower(), str(err.value)


def test_value_answers_fail_helpfully():
    matrix = exercises.example_matrix()
    with pytest.raises(exercises.ExerciseError, match="target"):
        exercises.check_most_fallen("safety", matrix, "npo_safety")
    with pytest.raises(exercises.ExerciseError, match="fell further"):
        exercises.check_most_fallen("bias", matrix, "npo_safety")
    with pytest.raises(exercises.ExerciseError, match="not a concept"):
        exercises.check_most_fallen("weather", matrix, "npo_safety")
    assert exercises.check_most_fallen("sensitive_content", matrix, "npo_safety") is True
    with pytest.raises(exercises.ExerciseError, match="target"):
        wrong = exercises.paper_safety_rates()
        values = [exercises.recovery_reference(r.aligned, r.unlearned, r.augmented) for r in wrong.itertuples()]
        exercises.check_paper_mean_recovery(pd.Series(values).mean())


def test_a_check_that_raises_in_the_answer_says_where():
    def broken(k, n):
        return 1 / 0

    with pytest.raises(exercises.ExerciseError, match="ZeroDivisionError"):
        exercises.check_wilson(broken)


def test_heatmap_exercise_on_the_real_matrix_shape():
    """The heatmap exercise reads chapter 3's report.ema_matrix; its columns are the ones the
    check and the solution use."""
    from ema_utils import report

    src = open(report.__file__).read()
    for column in ("delta_points", "condition"):
        assert column in src
