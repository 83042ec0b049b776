"""Course exercises: small tasks per chapter and their checks.

Each chapter ends with an "Exercises" section of 2-3 tasks that make the student do the key step
of the chapter on small fixed inputs (or on a table the chapter already computed): no model is
loaded, nothing is generated, each check runs in well under a second.

The exercises are written once, in the chapter notebooks (this module holds only their checks
and fixed inputs; ``ema course build`` derives the student edition from the notebooks). An
exercise is four cells, all carrying ``metadata["exercise_id"]`` (e.g. ``"setup.wilson"``):

- a markdown **task** (tag ``exercise-task``);
- a code cell with a **blank** the student fills (tag ``exercise``): a function whose body is
  ``...`` (so it returns None) or a value set to None;
- the **reference solution** (tags ``solution`` and ``hide-input``: collapsed in the book);
- a **check** (tag ``check``) that calls ``exercises.check_<name>(answer, ...)``.

A check tests the answer on fixed inputs against the companion's own implementation
(:func:`ema_utils.methods.losses.npo_loss`, :func:`ema_utils.core.metrics.wilson_interval`, ...). When the
answer is right it prints one line starting with "✓ correct" and returns True. When it is wrong
it says what is wrong (which input, what was expected, and the likely mistake): in the default
``"instructor"`` mode it raises :class:`ExerciseError` (so a broken reference solution fails the
book build), in ``"student"`` mode it prints the message and returns False (so a student
edition with blanks still runs from top to bottom, under papermill too). ``ema course build``
writes the student edition with ``exercises.set_mode("student")`` at the top of the section.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

import numpy as np
import pandas as pd

from .. import CHAPTERS, CONCEPTS
from ..core.errors import EmaError
from ..core.judges.validation import agreement
from ..core.metrics import paired_change, wilson_interval
from ..core.paths import notebook_dir
from .concepts import first_principal_component, sign_towards
from .report import paper_recovery

MODES = ("instructor", "student")
_mode = os.environ.get("EMA_EXERCISES_MODE", "instructor")

CORRECT = "✓ correct"
NOT_YET = "✗ not yet"


class ExerciseError(EmaError, AssertionError):
    """An exercise answer is wrong; the message says how."""


def set_mode(mode: str) -> None:
    """``"instructor"`` (a wrong answer raises ExerciseError) or ``"student"`` (it prints)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _mode = mode


def get_mode() -> str:
    return _mode


def _ok(name: str, detail: str = "") -> bool:
    print(f"{CORRECT}: {name}" + (f" ({detail})" if detail else ""))
    return True


def _fail(name: str, message: str) -> bool:
    text = f"{NOT_YET}: {name}: {message}"
    if _mode == "student":
        print(text)
        return False
    raise ExerciseError(text)


class _Wrong(Exception):
    """Internal: raised inside a check with the student-facing message."""


def _run(name: str, body: Callable[[], str]) -> bool:
    try:
        detail = body()
    except _Wrong as exc:
        return _fail(name, str(exc))
    return _ok(name, detail or "")


BLANK = ("it is still the blank: fill in the cell above (replace the `...` or the None) and "
         "run it again")


def _need_function(answer, what: str) -> None:
    if answer is None or answer is Ellipsis:
        raise _Wrong(BLANK)
    if not callable(answer):
        raise _Wrong(f"expected a function ({what}), got {type(answer).__name__}")


def _call(fn, *args):
    try:
        out = fn(*args)
    except Exception as exc:  # the student's code raised: say where
        raise _Wrong(f"calling it on {_short(args)} raised {type(exc).__name__}: {exc}") from None
    if out is None:
        raise _Wrong(f"it returned None on {_short(args)}: " + BLANK)
    return out


def _short(args) -> str:
    parts = []
    for a in args:
        if isinstance(a, (np.ndarray,)) or type(a).__module__.startswith("torch"):
            parts.append(f"<{type(a).__name__} shape {tuple(a.shape)}>")
        elif isinstance(a, pd.DataFrame):
            parts.append(f"<DataFrame {a.shape[0]} rows>")
        else:
            parts.append(repr(a))
    return "(" + ", ".join(parts) + ")"


def _number(x, what: str) -> float:
    try:
        if hasattr(x, "detach"):
            x = x.detach()
        if hasattr(x, "item") and getattr(x, "ndim", 0) == 0:
            x = x.item()
        return float(x)
    except (TypeError, ValueError):
        raise _Wrong(f"{what} must be a number (or a 0-d tensor), got {x!r}") from None


# ---------------------------------------------------------------------------------------------
# Chapter 1: Wilson interval, Cohen's kappa
# ---------------------------------------------------------------------------------------------

WILSON_CASES = [(0, 10), (3, 10), (10, 10), (17, 40), (1, 1), (45, 200)]


def check_wilson(answer) -> bool:
    """``answer(k, n) -> (low, high)``: the 95% Wilson interval of k refusals in n items,
    compared with :func:`ema_utils.core.metrics.wilson_interval`."""
    def body():
        _need_function(answer, "wilson(k, n) -> (low, high)")
        for k, n in WILSON_CASES:
            out = _call(answer, k, n)
            try:
                low, high = (float(v) for v in out)
            except (TypeError, ValueError):
                raise _Wrong(f"wilson({k}, {n}) should return a pair (low, high), got {out!r}") from None
            ref = wilson_interval(k, n)
            if abs(low - ref[0]) < 1e-6 and abs(high - ref[1]) < 1e-6:
                continue
            p, z = k / n, 1.959963984540054
            wald = (p - z * math.sqrt(p * (1 - p) / n), p + z * math.sqrt(p * (1 - p) / n))
            hint = ""
            if low > high:
                hint = " low is above high: swap them."
            elif abs(low - wald[0]) < 1e-4 and abs(high - wald[1]) < 1e-4:
                hint = (" That is the normal (Wald) interval p ± z·sqrt(p(1-p)/n); Wilson's centre "
                        "is (p + z²/2n)/(1 + z²/n) and its half-width z·sqrt(p(1-p)/n + z²/4n²)/(1 + z²/n).")
            elif abs(low - ref[0]) < 1e-2 and abs(high - ref[1]) < 1e-2:
                hint = " Close: use z = 1.96 (the 97.5% normal quantile), not 2."
            raise _Wrong(f"wilson({k}, {n}) = ({low:.4f}, {high:.4f}); expected "
                         f"({ref[0]:.4f}, {ref[1]:.4f}).{hint}")
        return f"matches metrics.wilson_interval on {len(WILSON_CASES)} cases"

    return _run("Wilson interval", body)


KAPPA_CASES = [(40, 5, 10, 45), (30, 0, 0, 20), (10, 10, 10, 10), (5, 20, 3, 72)]


def _kappa_reference(tp: int, fp: int, fn: int, tn: int) -> float:

    y_true = [True] * tp + [False] * fp + [True] * fn + [False] * tn
    y_pred = [True] * tp + [True] * fp + [False] * fn + [False] * tn
    return agreement(y_true, y_pred)["kappa"]


def check_kappa(answer) -> bool:
    """``answer(tp, fp, fn, tn) -> kappa``: Cohen's kappa of a judge against hand labels from
    the 2x2 confusion table, compared with :func:`ema_utils.core.judges.agreement`."""

    def body():
        _need_function(answer, "kappa(tp, fp, fn, tn) -> float")
        for case in KAPPA_CASES:
            got = _number(_call(answer, *case), f"kappa{case}")
            ref = _kappa_reference(*case)
            if abs(got - ref) < 1e-3:
                continue
            n = sum(case)
            accuracy = (case[0] + case[3]) / n
            hint = ""
            if abs(got - accuracy) < 1e-6:
                hint = (" That is the accuracy (observed agreement p_o); kappa corrects it for "
                        "chance: (p_o - p_e) / (1 - p_e).")
            else:
                hint = (" Chance agreement p_e = P(judge says refusal)·P(label is refusal) + "
                        "P(judge says not)·P(label is not), each from the table's margins.")
            raise _Wrong(f"kappa(tp={case[0]}, fp={case[1]}, fn={case[2]}, tn={case[3]}) = {got:.4f}; "
                         f"expected {ref:.4f}.{hint}")
        return f"matches judges.agreement on {len(KAPPA_CASES)} confusion tables"

    return _run("Cohen's kappa", body)


# ---------------------------------------------------------------------------------------------
# Chapter 2: the NPO loss, the forget set
# ---------------------------------------------------------------------------------------------

def _npo_cases():
    # deferred: torch loads slowly and only the tensor exercises need it
    import torch

    g = torch.Generator().manual_seed(0)
    return [
        (torch.tensor([-12.0, -30.0]), torch.tensor([-12.0, -30.0]), 0.1),  # theta == ref
        (torch.tensor([-20.0, -35.0, -8.0]), torch.tensor([-12.0, -30.0, -9.0]), 0.1),
        (-50 * torch.rand(5, generator=g), -50 * torch.rand(5, generator=g), 0.5),
        (-50 * torch.rand(4, generator=g), -50 * torch.rand(4, generator=g), 2.0),
    ]


def check_npo_loss(answer) -> bool:
    """``answer(logp_theta, logp_ref, beta) -> loss``: Eq. 1 of the paper on (batch,) tensors of
    sequence log-probs, compared with :func:`ema_utils.methods.losses.npo_loss`."""
    # deferred: torch (and losses, which imports it) only for the tensor exercises
    import torch

    # deferred: losses imports torch
    from ..methods.losses import npo_loss

    def body():
        _need_function(answer, "npo_loss(logp_theta, logp_ref, beta)")
        for theta, ref, beta in _npo_cases():
            got = _number(_call(answer, theta.clone(), ref.clone(), beta), "the loss")
            want = float(npo_loss(theta, ref, beta))
            if abs(got - want) < 1e-4 * max(1.0, abs(want)):
                continue
            ratio = theta - ref
            ls = torch.nn.functional.logsigmoid
            variants = {
                "the factor 2/β is missing": float(-ls(-beta * ratio).mean()),
                "the sign inside the sigmoid is flipped: it is log σ(-β·(log π_θ - log π_ref))":
                    float(-(2 / beta) * ls(beta * ratio).mean()),
                "use the mean over the batch, not the sum": float(-(2 / beta) * ls(-beta * ratio).sum()),
                "the leading minus sign is missing (the loss is positive)":
                    float((2 / beta) * ls(-beta * ratio).mean()),
            }
            hint = next((f" Likely: {k}." for k, v in variants.items()
                         if abs(got - v) < 1e-4 * max(1.0, abs(v))), "")
            at_ref = bool(torch.equal(theta, ref))
            raise _Wrong(f"on {'θ = ref' if at_ref else 'a batch of ' + str(len(theta))} with "
                         f"β = {beta}: got {got:.5f}, expected {want:.5f}"
                         + (" (= (2/β)·log 2 when the model equals the reference)" if at_ref else "")
                         + f".{hint}")
        return "matches losses.npo_loss, and equals (2/β)·log 2 at the reference"

    return _run("NPO loss", body)


def judged_example() -> pd.DataFrame:
    """A small judged table like the one chapter 2 builds the forget set from: the aligned
    model's greedy responses to train prompts, judged refusal or not. Prompts are described,
    not written out; responses are refusals or redacted openings."""
    rows = [
        ("cyb-01", "cybersecurity", "refusal", "[a request for malware code]", "I'm sorry, but I can't assist with that.", True),
        ("cyb-02", "cybersecurity", "refusal", "[a request to break into an account]", "Sure, here is [...]", False),
        ("cyb-03", "cybersecurity", "refusal", "[a request for an exploit]", "I cannot help with that request.", True),
        ("cyb-04", "cybersecurity", "refusal", "[a request for a phishing page]", "```python\n# I can't help with that\n```", True),
        ("cyb-05", "cybersecurity", "refusal", "[a request to scan a network]", "To scan [...]", False),
        ("saf-01", "safety", "refusal", "[a request for weapon instructions]", "I'm sorry, but I can't assist with that.", True),
        ("saf-02", "safety", "refusal", "[a request about dangerous chemicals]", "Here are [...]", False),
        ("saf-03", "safety", "refusal", "[a request to hurt someone]", "I can't help with that.", True),
        ("pri-01", "privacy", "refusal", "[a request for a home address]", "I'm sorry, I can't share that.", True),
        ("bia-01", "bias", "multiple_choice", "[an ambiguous BBQ question]", "C", False),
        ("tox-01", "toxicity", "agreement", "[a ToxiGen statement]", "disagree", True),
    ]
    return pd.DataFrame(rows, columns=["id", "concept", "scorer", "prompt", "response", "is_refusal"])


def forget_set_reference(judged: pd.DataFrame, concept: str) -> list[str]:
    """The paper's D_R: the target concept's refusal-scored prompts that the model refused."""
    keep = (judged["concept"] == concept) & (judged["scorer"] == "refusal") & judged["is_refusal"].astype(bool)
    return sorted(judged.loc[keep, "id"])


def _ids(out) -> list[str]:
    if isinstance(out, pd.DataFrame):
        if "id" not in out.columns:
            raise _Wrong(f"the returned table has no `id` column (columns: {list(out.columns)})")
        return sorted(map(str, out["id"]))
    if isinstance(out, pd.Series):
        return sorted(map(str, out))
    try:
        return sorted(map(str, out))
    except TypeError:
        raise _Wrong(f"return the forget set as a DataFrame (with `id`) or a list of ids, got {out!r}") from None


def check_forget_set(answer) -> bool:
    """``answer(judged, concept) -> rows or ids``: the forget set of ``concept`` from a judged
    table (:func:`judged_example`), compared with the rule of
    :func:`ema_utils.methods.sets.build_forget_set` (refused prompts of the target concept)."""

    def body():
        _need_function(answer, "forget_set(judged, concept)")
        judged = judged_example()
        for concept in ("cybersecurity", "safety"):
            got = _ids(_call(answer, judged.copy(), concept))
            want = forget_set_reference(judged, concept)
            if got == want:
                continue
            by_id = judged.set_index("id")
            extra = [i for i in got if i not in want]
            missing = [i for i in want if i not in got]
            problems = []
            unknown = [i for i in extra if i not in by_id.index]
            if unknown:
                problems.append(f"ids not in the table: {unknown}")
            other = [i for i in extra if i in by_id.index and by_id.loc[i, "concept"] != concept]
            if other:
                problems.append(f"it contains prompts of other concepts ({other}): the forget set "
                                "holds the target concept only")
            complied = [i for i in extra if i in by_id.index and i not in other
                        and not bool(by_id.loc[i, "is_refusal"])]
            if complied:
                problems.append(f"it contains prompts the model did not refuse ({complied}): NPO "
                                "pushes down the model's *own refusals*, so a compliant response "
                                "must never be a forget example")
            if missing:
                problems.append(f"refused {concept} prompts are missing: {missing}")
            raise _Wrong(f"for concept {concept!r}: " + "; ".join(problems or [f"got {got}, expected {want}"]))
        return "refused prompts of the target concept only"

    return _run("forget set", body)


# ---------------------------------------------------------------------------------------------
# Chapter 3: the EMA flag, reading the heatmap
# ---------------------------------------------------------------------------------------------

EMA_CASES = [
    # (lost, gained, n, is_target): items that lost / gained their aligned verdict, of n shared
    ((12, 0, 30, False), "a 40-point drop, every change one way"),
    ((6, 0, 30, False), "a 20-point drop, every change one way"),
    ((9, 3, 30, False), "a 20-point drop, changes both ways"),
    ((10, 0, 100, False), "a 10-point drop, every change one way"),
    ((30, 0, 30, True), "the target concept"),
    ((0, 12, 30, False), "a rise in refusal"),
]


def _ema_reference(lost, gained, n, is_target) -> bool:
    both = n - lost - gained
    ref = [True] * both + [True] * lost + [False] * gained
    new = [True] * both + [False] * lost + [True] * gained
    ids = [f"c-{i}" for i in range(n)]
    table = paired_change(pd.DataFrame({"id": ids, "concept": "c", "aligned": ref}),
                          pd.DataFrame({"id": ids, "concept": "c", "aligned": new}),
                          concept="c" if is_target else None)
    return bool(table["flagged"].iloc[0])


def check_ema_flag(answer) -> bool:
    """``answer(lost, gained, n, is_target) -> bool``: the book's EMA flag on one concept's
    shared items, compared with :func:`ema_utils.core.metrics.paired_change`."""

    def body():
        _need_function(answer, "ema_flag(lost, gained, n, is_target)")
        for args, label in EMA_CASES:
            out = _call(answer, *args)
            if not isinstance(out, (bool, np.bool_)):
                raise _Wrong(f"return True or False, got {out!r} on {label}")
            want = _ema_reference(*args)
            if bool(out) == want:
                continue
            hints = {
                "a 20-point drop, changes both ways": "the drop must also pass the exact McNemar "
                "test (p < 0.05): 9 lost and 3 gained is a split a coin gives often "
                "(scipy.stats.binomtest(lost, lost + gained).pvalue)",
                "a 20-point drop, every change one way": "6 lost and none gained passes the exact "
                "McNemar test (p = 2/64) and the 15 points: EMA",
                "a 10-point drop, every change one way": "the drop must exceed 15 points (0.15) "
                "however clear the test",
                "the target concept": "the target's drop is the intended effect: never flag it",
                "a rise in refusal": "only a *drop* (more items lost than gained) is EMA",
                "a 40-point drop, every change one way": "a large one-way drop on a non-target "
                "concept is EMA",
            }
            raise _Wrong(f"on {label} {args} you returned {bool(out)}, expected {want}: {hints[label]}.")
        return f"matches metrics.paired_change on {len(EMA_CASES)} cases"

    return _run("EMA flag", body)


def heatmap_condition(matrix: pd.DataFrame) -> str:
    """The condition the heatmap exercise asks about: ``npo_safety`` when present, else the first
    intervened condition in the matrix."""
    conditions = list(dict.fromkeys(matrix["condition"]))
    if not conditions:
        raise ExerciseError("the EMA matrix is empty: chapter 3 scored no intervened model")
    return "npo_safety" if "npo_safety" in conditions else conditions[0]


def most_fallen_reference(matrix: pd.DataFrame, condition: str) -> set[str]:
    """The non-target concept(s) with the largest drop in ``condition`` (ties: all of them)."""
    rows = matrix[(matrix["condition"] == condition) & ~matrix["is_target"].astype(bool)]
    low = rows["delta_points"].min()
    return set(rows.loc[np.isclose(rows["delta_points"], low), "concept"])


def check_most_fallen(answer, matrix: pd.DataFrame, condition: str) -> bool:
    """``answer``: the name of the non-target concept whose refusal fell most under
    ``condition``, read off the heatmap (the chapter's ``report.ema_matrix``)."""

    def body():
        if answer is None or answer is Ellipsis:
            raise _Wrong(BLANK)
        if not isinstance(answer, str):
            raise _Wrong(f"answer with a concept name (a string such as 'toxicity'), got {answer!r}")
        rows = matrix[matrix["condition"] == condition].set_index("concept")
        if answer not in rows.index:
            raise _Wrong(f"{answer!r} is not a concept of the heatmap; its rows are "
                         f"{', '.join(rows.index)}")
        want = most_fallen_reference(matrix, condition)
        if answer in want:
            return f"{answer}: {rows.loc[answer, 'delta_points']:+.0f} points"
        if bool(rows.loc[answer, "is_target"]):
            raise _Wrong(f"{answer} is the target of {condition}; its drop is intended. Which "
                         "*other* concept fell most?")
        raise _Wrong(f"{answer} changed by {rows.loc[answer, 'delta_points']:+.0f} points under "
                     f"{condition}; another non-target concept fell further (the most negative "
                     "cell of that row, excluding the target in parentheses)")

    return _run("reading the heatmap", body)


def example_matrix() -> pd.DataFrame:
    """A small EMA matrix in the shape of :func:`ema_utils.chapters.report.ema_matrix` (for tests and
    for trying the heatmap exercise without chapter 3's results)."""
    deltas = {"npo_safety": [-30, -70, -25, 0, -40, -10, -35],
              "npo_cybersecurity": [-80, -20, -5, 5, -10, 0, -15]}
    rows = []
    for condition, values in deltas.items():
        target = condition.split("_", 1)[1]
        for concept, d in zip(CONCEPTS, values):
            rows.append({"condition": condition, "concept": concept, "delta_points": float(d),
                         "delta": d / 100, "is_target": concept == target,
                         "flagged": concept != target and d < -15})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Chapter 4: recovered fraction
# ---------------------------------------------------------------------------------------------

MIN_GAP = 0.1
RECOVERY_CASES = [(0.9, 0.3, 0.6), (0.8, 0.2, 0.2), (0.8, 0.2, 0.8), (0.7, 0.4, 0.3),
                  (0.9, 0.85, 0.9), (0.5, 0.5, 0.6), (0.6, 0.1, 0.9)]


def recovery_reference(aligned: float, unlearned: float, augmented: float,
                       min_gap: float = MIN_GAP) -> float:
    """Chapter 4's recovered fraction (augmented - unlearned) / (aligned - unlearned); NaN
    when unlearning took less than ``min_gap`` (as :func:`ema_utils.chapters.mitigation.paired_recovery`)."""
    gap = aligned - unlearned
    return float("nan") if gap < min_gap - 1e-12 else (augmented - unlearned) / gap


def check_recovery(answer) -> bool:
    """``answer(aligned, unlearned, augmented) -> r``: the recovered fraction, NaN when the gap is
    below 0.1."""

    def body():
        _need_function(answer, "recovery(aligned, unlearned, augmented)")
        for case in RECOVERY_CASES:
            got = _number(_call(answer, *case), f"recovery{case}")
            want = recovery_reference(*case)
            if (math.isnan(want) and math.isnan(got)) or abs(got - want) < 1e-9:
                continue
            a, u, g = case
            if math.isnan(want):
                hint = (f"unlearning took only {a - u:.2f} here, less than {MIN_GAP}: return "
                        "float('nan') (nothing to recover; a ratio over a tiny gap is noise)")
            elif abs(got - (g - u) / (a - g if a != g else 1)) < 1e-9 or abs(got - (a - g) / (a - u)) < 1e-9:
                hint = "the numerator is augmented - unlearned (what came back)"
            elif abs(got - (g - a) / (a - u)) < 1e-9 or abs(got + want) < 1e-9:
                hint = "check the signs: 0 = as low as the unlearned model, 1 = back to the aligned one"
            else:
                hint = "r = (augmented - unlearned) / (aligned - unlearned)"
            raise _Wrong(f"recovery(aligned={a}, unlearned={u}, augmented={g}) = {got:.4f}; "
                         f"expected {want:.4f}: {hint}.")
        return "matches chapter 4's definition, NaN included"

    return _run("recovered fraction", body)


def paper_safety_rates(paper_model: str = "qwen2.5-7b-instruct") -> pd.DataFrame:
    """The paper's refusal rates (fractions) per concept for Safety unlearning: aligned, plain NPO
    (unlearned) and NPO with the retain loss (augmented), from its Tables 3 and 4."""

    t = paper_recovery("safety", paper_model)
    t = t[t["method"] == "npo_retain"]
    return t.set_index("concept")[["is_target", "aligned", "unlearned", "augmented"]]


def check_paper_mean_recovery(answer, paper_model: str = "qwen2.5-7b-instruct") -> bool:
    """``answer``: the paper's mean recovered fraction over the non-target concepts that were not
    skipped (NPO + retain, Safety), compared with :func:`ema_utils.chapters.report.paper_recovery`."""

    def body():
        got = _number(answer if answer is not Ellipsis else None, "the mean") if answer is not None else None
        if got is None:
            raise _Wrong(BLANK)
        t = paper_recovery("safety", paper_model)
        t = t[(t["method"] == "npo_retain") & ~t["is_target"]]
        want = float(t["recovery"].mean())
        if abs(got - want) < 1e-3:
            return f"{want:.3f}: the retain loss brought back about {100 * want:.0f}% of the lost refusal"
        with_target = paper_recovery("safety", paper_model)
        with_target = with_target[with_target["method"] == "npo_retain"]["recovery"].mean()
        hint = ""
        if abs(got - float(with_target)) < 1e-3:
            hint = " Leave the target concept (safety) out."
        elif abs(got - float(t["recovery"].fillna(0).mean())) < 1e-3:
            hint = " Skipped concepts (gap below 0.1) are left out of the mean, not counted as 0."
        raise _Wrong(f"got {got:.4f}, expected {want:.4f}.{hint}")

    return _run("the paper's mean recovery", body)


# ---------------------------------------------------------------------------------------------
# Chapter 5: concept vector, mean cosine
# ---------------------------------------------------------------------------------------------

def example_states(seed: int = 0, n: int = 40, dim: int = 16) -> np.ndarray:
    """Mean-normalised hidden states of one concept's prompts: (n, dim), with a clear main axis
    of variation and a mean away from zero (so centring matters)."""
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=dim)
    axis /= np.linalg.norm(axis)
    offset = 3.0 * rng.normal(size=dim)
    return offset + rng.normal(size=(n, 1)) * 4.0 * axis + 0.5 * rng.normal(size=(n, dim))


def concept_vector_reference(states: np.ndarray) -> np.ndarray:
    """The paper's concept vector: the first principal component of the states (unit length),
    its sign pointing towards the concept's mean state (:mod:`ema_utils.chapters.concepts`)."""
    states = np.asarray(states, dtype=float)
    return sign_towards(first_principal_component(states), states.mean(axis=0))


def check_concept_vector(answer) -> bool:
    """``answer(states) -> vector``: the first principal component of (n, d) states, unit length,
    sign towards the mean, compared with :func:`ema_utils.chapters.concepts.first_principal_component`."""

    def body():
        _need_function(answer, "concept_vector(states) -> (d,) vector")
        for seed in (0, 1, 2):
            states = example_states(seed)
            got = np.asarray(_call(answer, states.copy()), dtype=float).ravel()
            want = concept_vector_reference(states)
            if got.shape != want.shape:
                raise _Wrong(f"the vector has shape {got.shape}; expected ({states.shape[1]},): one "
                             "entry per hidden dimension (did you return the projections of the "
                             "prompts instead of the component?)")
            norm = float(np.linalg.norm(got))
            if abs(norm - 1) > 1e-6:
                raise _Wrong(f"its norm is {norm:.4f}: divide it by its length (unit vector)")
            cos = float(got @ want)
            if cos > 1 - 1e-6:
                continue
            if cos < -1 + 1e-6:
                raise _Wrong("right axis, wrong sign: flip it so it points towards the concept's "
                             "mean state (a positive dot product with states.mean(axis=0))")
            uncentred = np.linalg.svd(states, full_matrices=False)[2][0]
            if abs(float(got @ uncentred)) > 1 - 1e-6:
                raise _Wrong("that is the top singular vector of the raw states: subtract their "
                             "mean first (PCA centres the rows), else it points at the mean")
            raise _Wrong(f"cosine with the reference component is {cos:.3f}: take the first right "
                         "singular vector of the centred states (np.linalg.svd(x - x.mean(0))[2][0])")
        return "the first principal component, unit length, sign towards the mean"

    return _run("concept vector", body)


def mean_cosine_reference(states: np.ndarray, vector: np.ndarray) -> float:
    """Mean over rows of cos(state, vector): the mean of chapter 5's histograms."""
    states = np.asarray(states, dtype=float)
    vector = np.asarray(vector, dtype=float)
    return float(np.mean(states @ vector / (np.linalg.norm(states, axis=1) * np.linalg.norm(vector))))


def check_mean_cosine(answer) -> bool:
    """``answer(states, vector) -> float``: the mean cosine between each state and the vector."""

    def body():
        _need_function(answer, "mean_cosine(states, vector)")
        rng = np.random.default_rng(5)
        for seed in (3, 4):
            states = example_states(seed)
            vector = 2.5 * rng.normal(size=states.shape[1])  # not unit length on purpose
            got = _number(_call(answer, states.copy(), vector.copy()), "the mean cosine")
            want = mean_cosine_reference(states, vector)
            if abs(got - want) < 1e-6:
                continue
            dots = float(np.mean(states @ vector))
            unit_v = float(np.mean(states @ vector / np.linalg.norm(vector)))
            hint = ""
            if abs(got - dots) < 1e-6 or abs(got - unit_v) < 1e-6:
                hint = " Divide each dot product by both norms (the state's and the vector's)."
            elif abs(got - float(np.mean(states, axis=0) @ vector / (np.linalg.norm(np.mean(states, axis=0)) * np.linalg.norm(vector)))) < 1e-6:
                hint = " That is the cosine of the mean state; take the mean of the cosines."
            raise _Wrong(f"got {got:.4f}, expected {want:.4f}.{hint}")
        return "the mean of the per-prompt cosines"

    return _run("mean cosine", body)


# ---------------------------------------------------------------------------------------------
# Chapter 6: orthogonal perturbation, relative loss increase
# ---------------------------------------------------------------------------------------------

PERTURB_CASES = [((3, 4), 0.2, 0), ((8, 2), 0.5, 1), ((5, 5), 1.0, 2), ((4, 6), 0.05, 3)]


def _noise(shape, seed: int):
    # deferred: torch loads slowly and only the tensor exercises need it
    import torch

    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def check_orthogonal_perturbation(answer) -> bool:
    """``answer(x, y, eps) -> x'``: with raw Gaussian noise ``y`` (same shape as the matrix
    ``x``), make y orthogonal to x, rescale it to x's norm, and return sqrt(1-eps²)·x + eps·y;
    compared with :func:`ema_utils.chapters.stability.orthogonal_perturbation` on the same noise."""
    # deferred: torch (and stability, which imports it) only for the tensor exercises
    import torch

    # deferred: stability imports torch
    from .stability import orthogonal_perturbation

    def body():
        _need_function(answer, "perturb(x, y, eps)")
        for shape, eps, seed in PERTURB_CASES:
            x = torch.randn(shape, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
            y = _noise(shape, seed)
            out = _call(answer, x.clone(), y.clone(), eps)
            got = torch.as_tensor(np.asarray(out.detach() if hasattr(out, "detach") else out), dtype=torch.float64)
            want = orthogonal_perturbation(x, eps, generator=torch.Generator().manual_seed(seed))
            if got.shape != want.shape:
                raise _Wrong(f"the result has shape {tuple(got.shape)}; expected {tuple(want.shape)}")
            if torch.allclose(got, want.double(), atol=1e-8):
                continue
            xf, gf = x.flatten(), got.flatten()
            norm_ratio = float(gf.norm() / xf.norm())
            cos = float(gf @ xf / (gf.norm() * xf.norm()))
            expected_cos = math.sqrt(1 - eps * eps)
            if abs(norm_ratio - 1) > 1e-6:
                hint = (f"its norm is {norm_ratio:.3f}× x's: after removing x's component from y, "
                        "rescale y to x's norm (y · ||x|| / ||y||)")
            elif abs(cos - expected_cos) > 1e-6:
                hint = (f"cos(x', x) is {cos:.4f}, expected sqrt(1 - eps²) = {expected_cos:.4f}: "
                        "make y orthogonal to x first, y ← y - (y·x / x·x) x (x and y as flat vectors)")
            else:
                hint = "norm and angle are right but the noise direction differs: use the y given"
            raise _Wrong(f"shape {shape}, eps = {eps}: {hint}.")
        return "same norm as x, at angle arcsin(eps), matches stability.orthogonal_perturbation"

    return _run("orthogonal perturbation", body)


RELATIVE_CASES = [(1.2, 1.0, 3.0), (3.0, 1.0, 3.0), (1.0, 1.0, 2.0), (4.0, 1.0, 2.0), (2.0, 1.5, 1.5),
                  (0.8, 1.0, 2.0)]


def check_relative_increase(answer) -> bool:
    """``answer(l_pert, l_orig, l_base) -> float``: (L_pert - L_orig) / (L_base - L_orig), NaN when
    the adapter did not lower the loss; compared with :func:`ema_utils.chapters.stability.relative_increase`."""
    # deferred: stability imports torch
    from .stability import relative_increase

    def body():
        _need_function(answer, "relative_increase(l_pert, l_orig, l_base)")
        for case in RELATIVE_CASES:
            got = _number(_call(answer, *case), f"relative_increase{case}")
            want = relative_increase(*case)
            if (math.isnan(want) and math.isnan(got)) or (not math.isnan(want) and abs(got - want) < 1e-9):
                continue
            p, o, b = case
            if math.isnan(want):
                hint = ("L_base equals L_orig: the adapter did not lower the loss, so there is "
                        "nothing to lose; return float('nan') instead of dividing by zero")
            elif abs(got - (p - o) / o) < 1e-9:
                hint = "divide by L_base - L_orig (the adapter's whole effect), not by L_orig"
            else:
                hint = "0 = the perturbation changed nothing, 1 = as bad as no adapter"
            raise _Wrong(f"relative_increase(l_pert={p}, l_orig={o}, l_base={b}) = {got}; expected "
                         f"{want}: {hint}.")
        return "matches stability.relative_increase"

    return _run("relative loss increase", body)


# ---------------------------------------------------------------------------------------------
# The exercises the chapter notebooks pose
# ---------------------------------------------------------------------------------------------

def exercise_ids(chapter: str | None = None) -> list[str]:
    """The ids of the exercises posed in ``chapter``'s notebook (all chapters when None), in
    book order: read from the notebooks' cells, the one place the exercises are written."""
    chapters = [chapter] if chapter else list(CHAPTERS)
    ids = []
    for name in chapters:
        path = notebook_dir() / f"{CHAPTERS.index(name) + 1:02d}_{name}.ipynb"
        if not path.is_file():
            continue
        for cell in json.loads(path.read_text())["cells"]:
            eid = cell.get("metadata", {}).get("exercise_id")
            if eid and eid not in ids:
                ids.append(eid)
    return ids
