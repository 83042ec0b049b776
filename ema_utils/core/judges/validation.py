"""How far the offline response judges agree with hand labels.

:func:`validate_judges` scores the phrase and learned judges on the labelled set (the learned
judge by stratified cross-validation) and, when present, on the held-out sample of the chapters'
own outputs (:func:`heldout_agreement`, with bootstrap intervals of Cohen's kappa from
:func:`kappa_interval`). :func:`agreement_table` and :func:`accuracy_by_category` lay the results
out for chapter 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ParameterError
from ..paths import sha256_file
from .ensemble import ENSEMBLE_RULE, ENSEMBLE_RULES, ensemble_verdicts
from .labels import CONFIRM_PATH, DRAW_PATH, HELDOUT_PATH, LABELS_PATH, load_draw, load_labels
from .learned import (
    LEARNED_TRAIN,
    LearnedJudge,
    cross_validated_learned,
    cross_validated_on_part,
    training_labels,
)
from .phrase import PhraseJudge
from .registry import DEFAULT_JUDGE, RESPONSE_JUDGES


def agreement(y_true, y_pred) -> dict:
    """accuracy, precision, recall (refusal = positive), Cohen's kappa and n, rounded to 4 places."""
    # deferred: sklearn is slow to import and only needed when agreement is measured
    from sklearn.metrics import (
        accuracy_score,
        cohen_kappa_score,
        precision_score,
        recall_score,
    )

    y_true = np.asarray(y_true, dtype=bool)
    y_pred = np.asarray(y_pred, dtype=bool)
    kappa = cohen_kappa_score(y_true, y_pred) if len(set(y_true) | set(y_pred)) > 1 else 1.0
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "precision": round(float(precision_score(y_true, y_pred, zero_division=0)), 4),
        "recall": round(float(recall_score(y_true, y_pred, zero_division=0)), 4),
        "kappa": round(float(0.0 if np.isnan(kappa) else kappa), 4),
        "n": int(len(y_true)),
    }


def _binary_kappa(a, b, axis=-1):
    """Cohen's kappa of two 0/1 arrays along ``axis`` (vectorised for scipy's bootstrap)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    observed = (a == b).mean(axis=axis)
    pa, pb = a.mean(axis=axis), b.mean(axis=axis)
    chance = pa * pb + (1 - pa) * (1 - pb)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(chance < 1, (observed - chance) / (1 - chance), 1.0)


def kappa_interval(y_true, y_pred, confidence: float = 0.95, n_resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of Cohen's kappa, resampling items (pairs) with replacement."""
    # deferred: scipy.stats is slow to import and only needed for the interval
    from scipy.stats import bootstrap

    y_true = np.asarray(y_true, dtype=bool)
    y_pred = np.asarray(y_pred, dtype=bool)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) < 2:
        raise ParameterError("kappa_interval needs two 1-d label arrays of one length, at least 2 items")
    res = bootstrap((y_true, y_pred), _binary_kappa, paired=True, vectorized=True,
                    n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                    random_state=np.random.default_rng(seed))
    return round(float(res.confidence_interval.low), 4), round(float(res.confidence_interval.high), 4)


def validation_predictions(labels_path=None, judges: Sequence[str] = RESPONSE_JUDGES,
                           n_splits: int = 5, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """The labelled set with one bool column per judge (``pred_<name>``; learned: out-of-fold).

    Group it by ``category`` to see where each judge errs.
    """
    labels_path = Path(labels_path) if labels_path else LABELS_PATH
    labels = load_labels(labels_path)
    table = labels.copy()
    for name in judges:
        if name == "phrase":
            pred = PhraseJudge().judge(labels["prompt"], labels["response"])
        elif name == "learned":
            pred = cross_validated_learned(labels, labels_path, n_splits=n_splits, seed=seed,
                                           progress=progress)
        else:
            raise ParameterError(f"validate scores the offline response judges {RESPONSE_JUDGES}, "
                                 f"not {name!r}")
        table[f"pred_{name}"] = np.asarray(pred, dtype=bool)
    return table


def validate_judges(labels_path=None, judges: Sequence[str] = RESPONSE_JUDGES, n_splits: int = 5,
                    seed: int = 0, progress: bool = True, heldout_path=None, draw_path=None,
                    extra: dict | None = None, confirm_path=None) -> dict:
    """Agreement of each offline response judge with the hand labels, and the default judge.

    Returns ``{"default": NAME, "judges": {NAME: {"accuracy", "precision", "recall", "kappa",
    "n"}}}``; the learned judge is scored by stratified ``n_splits``-fold cross-validation
    (every item predicted by a model that never saw it). ``by_category`` gives each judge's
    accuracy per label category (e.g. ``unlearned_opening``, the reason for
    :data:`DEFAULT_JUDGE`); ``best_kappa`` names the judge with the highest overall kappa.
    ``heldout`` (when the file exists) is :func:`heldout_agreement` on ``heldout_path``
    (default :data:`HELDOUT_PATH`): the judges on the chapters' own outputs. ``draw`` is
    :func:`draw_agreement` on ``draw_path`` and ``confirmation`` :func:`confirmation_agreement`
    on ``confirm_path`` (defaults :data:`DRAW_PATH`, :data:`CONFIRM_PATH`), each when its file exists.
    """
    table = validation_predictions(labels_path, judges, n_splits, seed, progress)
    results = {name: agreement(table["is_refusal"], table[f"pred_{name}"]) for name in judges}
    out = {"default": DEFAULT_JUDGE, "best_kappa": max(results, key=lambda k: results[k]["kappa"]),
           "judges": results}
    if "category" in table:
        per = accuracy_by_category(table, judges)
        out["by_category"] = {name: {str(c): round(float(v), 4) for c, v in per[name].items()}
                              for name in judges}
    heldout_path = Path(heldout_path) if heldout_path else HELDOUT_PATH
    if heldout_path.is_file():
        out["heldout"] = heldout_agreement(heldout_path, labels_path, judges, progress)
    draw_path = Path(draw_path) if draw_path else DRAW_PATH
    if draw_path.is_file():
        out["draw"] = draw_agreement(draw_path, extra=extra, progress=progress)
    confirm_path = Path(confirm_path) if confirm_path else CONFIRM_PATH
    if confirm_path.is_file():
        out["confirmation"] = confirmation_agreement(confirm_path, extra=extra, progress=progress)
    return out


DRAW_CANDIDATES = ("phrase", "learned", "learned_labels_only", *ENSEMBLE_RULES)
"""The offline candidates the protocol compares on the draw (a small-model judge joins them
through ``extra``, as it needs a model)."""


def draw_agreement(path=None, candidates: Sequence[str] = DRAW_CANDIDATES, extra: dict | None = None,
                   progress: bool = True) -> dict:
    """The protocol's figures: every candidate on the draw's ``dev`` part (where the choice is
    made) and on its ``test`` part (scored once per candidate, reported with bootstrap intervals
    per source and prompt kind), and whether the default judge meets the targets on ``test``.

    Returns ``{"n": {"dev", "test"}, "dev": part_agreement, "test": part_agreement, "default":
    DEFAULT_JUDGE, "targets": meets_targets of the default on test}``.
    """
    parts = {}
    for part in ("dev", "test"):
        table = draw_predictions(path, part, candidates, extra=extra, progress=progress)
        names = [c for c in candidates] + list(extra or {})
        parts[part] = part_agreement(table, names, part)
    return {"n": {p: parts[p]["n"] for p in parts}, **parts, "default": DEFAULT_JUDGE,
            "chosen_on_dev": choose_on_dev(parts["dev"]), "targets": _default_targets(parts["test"])}


def confirmation_agreement(path=None, candidates: Sequence[str] = DRAW_CANDIDATES,
                           extra: dict | None = None, progress: bool = True) -> dict:
    """Every candidate on the confirmation draw (:data:`CONFIRM_PATH`: texts drawn after the
    default was chosen, never labelled before, all in the ``test`` part), scored once, with
    bootstrap intervals per source and prompt kind, and whether the default meets the targets.

    Returns ``{"n", "test": part_agreement, "default": DEFAULT_JUDGE, "targets"}``, the shape
    :func:`draw_agreement` gives its test part (so :func:`group_table` and
    :func:`targets_sentence` read either). Its test part is also grouped ``by_certainty``:
    ``clear`` items (neither annotator unsure) apart from ``unsure`` ones, to show where the
    errors lie; the targets are checked on every item, never on the clear ones alone.
    """
    path = Path(path) if path else CONFIRM_PATH
    table = draw_predictions(path, "test", candidates, extra=extra, progress=progress)
    unsure = table["unsure"].fillna(False).astype(bool) if "unsure" in table else False
    table["certainty"] = np.where(unsure, "unsure", "clear")
    names = list(candidates) + list(extra or {})
    test = part_agreement(table, names, "test", groups=("source", "prompt_kind", "certainty"))
    return {"n": test["n"], "test": test, "default": DEFAULT_JUDGE, "targets": _default_targets(test)}


def _default_targets(part: dict) -> dict | None:
    """:func:`meets_targets` of the default judge on a scored part (None: not among its judges)."""
    default = draw_name(DEFAULT_JUDGE)
    return meets_targets(part, default) if default in part["judges"] else None


def choose_on_dev(dev: dict) -> str:
    """The protocol's rule for the default judge, applied to the draw's ``dev`` part (a
    :func:`part_agreement` result): the highest kappa overall; a tie (to 0.005) goes to the
    candidate with the fewest errors in its worst source group, then to the simpler judge (the
    order of ``dev["judges"]``: phrase before learned before ensembles). The test part plays no
    part in it."""
    names = list(dev["judges"])
    best = max(dev["judges"][n]["kappa"] for n in names)
    tied = [n for n in names if dev["judges"][n]["kappa"] >= best - 0.005]

    def worst_group_error(name: str) -> float:
        return max(1 - m["accuracy"] for m in dev["by_source"][name].values())

    return min(tied, key=lambda n: (worst_group_error(n), names.index(n)))


def draw_name(judge: str) -> str:
    """A judge's column in the draw's tables: its name, or for ``ensemble`` the rule it uses."""
    return ENSEMBLE_RULE if judge == "ensemble" else judge


def heldout_agreement(heldout_path=None, labels_path=None, judges: Sequence[str] = RESPONSE_JUDGES,
                      progress: bool = True) -> dict:
    """Each offline response judge against hand labels it never saw (:data:`HELDOUT_PATH`).

    The learned judge is the default fit on the whole labelled set (``labels_path``), the one
    the chapters use. Returns ``{"n", "judges": {NAME: agreement}, "by_group": {NAME: {"aligned":
    agreement, "changed": agreement}}, "annotators": agreement of the two annotators' own labels,
    given before they settled their disagreements into ``is_refusal``}`` (the last only where the
    file has ``first_annotator`` and ``second_annotator``; it is the ceiling a judge can be held
    to). Each judge's ``kappa_ci`` is a 95% bootstrap interval over items
    (:func:`kappa_interval`). "agreement" is :func:`agreement`'s dict. ``changed`` covers every
    unlearned, steered or ablated model; items whose ``model`` is "aligned" come from the aligned
    default model.
    """
    heldout_path = Path(heldout_path) if heldout_path else HELDOUT_PATH
    table = load_labels(heldout_path)
    y = table["is_refusal"].to_numpy(dtype=bool)
    aligned = (table["model"] == "aligned").to_numpy() if "model" in table else np.zeros(len(y), bool)
    out = {"n": int(len(y)), "judges": {}, "by_group": {}}
    for name in judges:
        if name == "phrase":
            pred = PhraseJudge().judge(table["prompt"], table["response"])
        elif name == "learned":
            pred = LearnedJudge.default(labels_path, progress=progress).judge(
                table["prompt"], table["response"])
        else:
            raise ParameterError(f"the held-out check scores the offline response judges "
                                 f"{RESPONSE_JUDGES}, not {name!r}")
        pred = np.asarray(pred, dtype=bool)
        out["judges"][name] = {**agreement(y, pred), "kappa_ci": kappa_interval(y, pred)}
        out["by_group"][name] = {group: agreement(y[mask], pred[mask])
                                 for group, mask in (("aligned", aligned), ("changed", ~aligned))
                                 if mask.any()}
    if {"first_annotator", "second_annotator"} <= set(table.columns):
        out["annotators"] = agreement(table["first_annotator"].astype(bool),
                                      table["second_annotator"].astype(bool))
    return out


AGREEMENT_FORMAT = {"accuracy": "{:.3f}", "precision": "{:.3f}", "recall": "{:.3f}",
                    "kappa": "{:.3f}", "n": "{:.0f}"}
"""How chapter 1 prints :func:`agreement_table` (``table.style.format(AGREEMENT_FORMAT)``)."""


def agreement_table(by_judge: dict) -> pd.DataFrame:
    """One row per judge (in :data:`RESPONSE_JUDGES` order, then any others) of
    ``{NAME: agreement}`` as :func:`validate_judges` or :func:`heldout_agreement` give it:
    accuracy, precision, recall, kappa, then "kappa 95% CI" as text where a ``kappa_ci`` is
    given, and n."""
    names = [n for n in RESPONSE_JUDGES if n in by_judge] + [n for n in by_judge if n not in RESPONSE_JUDGES]
    table = pd.DataFrame({name: by_judge[name] for name in names}).T
    columns = ["accuracy", "precision", "recall", "kappa", "n"]
    if "kappa_ci" in table:
        table["kappa 95% CI"] = [f"[{low:.2f}, {high:.2f}]" for low, high in table["kappa_ci"]]
        columns.insert(4, "kappa 95% CI")
    return table[columns]


def accuracy_by_category(predictions: pd.DataFrame, judges: Sequence[str] = RESPONSE_JUDGES
                         ) -> pd.DataFrame:
    """Share judged correctly per label category (rows) and judge (columns), plus ``n``.

    ``predictions`` is :func:`validation_predictions`' table (``is_refusal``, ``category`` and a
    ``pred_<judge>`` column per judge)."""
    correct = {name: (predictions[f"pred_{name}"] == predictions["is_refusal"])
               .groupby(predictions["category"]).mean() for name in judges}
    return pd.DataFrame(correct).assign(n=predictions.groupby("category").size())


MIN_GROUP = 20
"""A source group's kappa is held to its target only with at least this many items (the issue's
rule); smaller groups are reported, not judged."""


def error_shares(y_true, y_pred) -> dict:
    """The two kinds of error as shares of all items: ``false_refusal`` (judged a refusal, labelled
    not) and ``missed_refusal`` (labelled a refusal, judged not)."""
    y_true, y_pred = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    n = max(len(y_true), 1)
    return {"false_refusal": round(float((y_pred & ~y_true).sum() / n), 4),
            "missed_refusal": round(float((~y_pred & y_true).sum() / n), 4)}


def part_agreement(table: pd.DataFrame, names: Sequence[str], part: str | None = None,
                   groups: Sequence[str] = ("source", "prompt_kind"), seed: int = 0) -> dict:
    """Each judge's agreement on one part of a labelled draw, overall and per group.

    ``table`` has ``is_refusal``, ``split``, the ``groups`` columns and a ``pred_<name>`` column
    per judge in ``names``; ``part`` picks rows by ``split`` (None: all). Returns ``{"part", "n",
    "judges": {NAME: agreement + kappa_ci + error shares}, "by_<group>": {NAME: {VALUE: agreement
    + error shares + n_refusals (+ kappa_ci where n >= 2)}}}``. Intervals are 95% bootstraps over items.
    """
    rows = table if part is None else table[table["split"] == part]
    if rows.empty:
        raise ParameterError(f"no items in part {part!r}; parts: {sorted(set(table['split']))}")
    y = rows["is_refusal"].to_numpy(dtype=bool)
    out = {"part": part or "all", "n": int(len(rows)), "judges": {}}
    for name in names:
        pred = rows[f"pred_{name}"].to_numpy(dtype=bool)
        out["judges"][name] = {**agreement(y, pred), "kappa_ci": kappa_interval(y, pred, seed=seed),
                               **error_shares(y, pred)}
    for group in groups:
        per = {}
        for name in names:
            per[name] = {}
            for value, sub in rows.groupby(group, sort=False):
                yt, yp = sub["is_refusal"].to_numpy(dtype=bool), sub[f"pred_{name}"].to_numpy(dtype=bool)
                entry = {**agreement(yt, yp), **error_shares(yt, yp), "n_refusals": int(yt.sum())}
                if len(sub) >= 2:
                    entry["kappa_ci"] = kappa_interval(yt, yp, seed=seed)
                per[name][str(value)] = entry
        out[f"by_{group}"] = per
    return out


def meets_targets(part: dict, name: str, overall: float = 0.90, per_group: float = 0.85,
                  max_error: float = 0.05, group: str = "source") -> dict:
    """Whether judge ``name`` meets the instrument's targets on a :func:`part_agreement` result:
    kappa >= ``overall``; kappa >= ``per_group`` in every group of at least :data:`MIN_GROUP`
    items; no kind of error above ``max_error`` of its group. Returns the checks and ``met``.

    A group whose labels hold a single class has an undefined kappa (sklearn gives 0 or 1);
    there only the error shares are checked."""
    groups = part[f"by_{group}"][name]
    kappa_ok = {g: (m["kappa"] >= per_group) if 0 < m["n_refusals"] < m["n"] else True
                for g, m in groups.items() if m["n"] >= MIN_GROUP}
    errors_ok = {g: max(m["false_refusal"], m["missed_refusal"]) <= max_error for g, m in groups.items()}
    checks = {"overall_kappa": part["judges"][name]["kappa"] >= overall,
              "group_kappa": all(kappa_ok.values()), "group_errors": all(errors_ok.values())}
    return {**checks, "met": all(checks.values()),
            "failing_groups": sorted({g for g, ok in kappa_ok.items() if not ok} |
                                     {g for g, ok in errors_ok.items() if not ok})}



def draw_predictions(path=None, part: str = "test", judges: Sequence[str] = RESPONSE_JUDGES,
                     extra: dict | None = None, progress: bool = True) -> pd.DataFrame:
    """The draw's ``part`` with one ``pred_<name>`` column per judge (and ``proba_learned``).

    ``learned`` is the default learned judge; on the ``dev`` part, which it is fitted on, its
    predictions are out-of-fold (:func:`cross_validated_on_part`: each dev fold predicted by a
    judge fitted on the labels and the other dev folds), so no judge is scored on items it saw.
    ``learned_labels_only`` is the judge fitted on the project's labels alone (the default until
    the draw). ``extra`` maps more names to judges (e.g. a :class:`RubricModelJudge`).
    """
    path = Path(path) if path else DRAW_PATH
    table = load_draw(path, part)
    prompts, responses = table["prompt"].tolist(), table["response"].tolist()
    known = ("phrase", "learned", "learned_labels_only", *ENSEMBLE_RULES)
    unknown = [name for name in judges if name not in known]
    if unknown:
        raise ParameterError(f"unknown judge {unknown[0]!r} for the draw; judges: {', '.join(known)} "
                             "(or pass extra=)")
    if {"learned", *ENSEMBLE_RULES} & set(judges):
        table["proba_learned"] = _learned_proba_on_part(table, path, part, progress)
    preds = {}
    for name in judges:
        if name == "phrase":
            preds[name] = PhraseJudge().judge(prompts, responses)
        elif name == "learned":
            preds[name] = table["proba_learned"] >= 0.5
        elif name == "learned_labels_only":
            preds[name] = LearnedJudge.default(LABELS_PATH, progress=progress).judge(prompts, responses)
        else:
            preds[name] = ensemble_verdicts(name, prompts, responses, table["proba_learned"].to_numpy())
    for name, judge in (extra or {}).items():
        preds[name] = judge.judge(prompts, responses)
    for name, pred in preds.items():
        table[f"pred_{name}"] = np.asarray(pred, dtype=bool)
    return table


def _learned_proba_on_part(table: pd.DataFrame, path: Path, part: str, progress: bool) -> np.ndarray:
    """The default learned judge's refusal probabilities on a draw part: out-of-fold where the
    judge is fitted on that very part (:data:`LEARNED_TRAIN`), directly otherwise."""
    others = tuple((p, q) for p, q in LEARNED_TRAIN if not (Path(p) == path and q == part))
    if len(others) == len(LEARNED_TRAIN):
        return LearnedJudge.default(progress=progress).predict_proba(table["prompt"].tolist(),
                                                                     table["response"].tolist())
    base, digest = training_labels(others)
    return cross_validated_on_part(base, digest, table, sha256_file(path) + part, progress=progress)


def group_table(part: dict, names: Sequence[str] | None = None, group: str = "source") -> pd.DataFrame:
    """One row per group value of a :func:`part_agreement` result, one column per judge: its
    kappa with the 95% interval ("0.93 [0.84, 1.00]"; "n/a" where the group's labels hold one
    class, so kappa is undefined, with the accuracy instead), plus the group's ``n`` and
    ``refusals`` (items labelled refusals)."""
    per = part[f"by_{group}"]
    names = list(names or per)
    values = list(next(iter(per.values())))
    rows = []
    for value in values:
        first = per[names[0]][value]
        row = {group: value, "n": first["n"], "refusals": first["n_refusals"]}
        for name in names:
            m = per[name][value]
            if 0 < m["n_refusals"] < m["n"]:
                low, high = m.get("kappa_ci", (float("nan"), float("nan")))
                row[name] = f"{m['kappa']:.2f} [{low:.2f}, {high:.2f}]"
            else:
                row[name] = f"n/a (accuracy {m['accuracy']:.2f})"
        rows.append(row)
    return pd.DataFrame(rows).set_index(group)


def targets_sentence(protocol: dict, where: str = "the test part") -> str:
    """Chapter 1's verdict on :func:`draw_agreement`'s (or :func:`confirmation_agreement`'s)
    ``targets``, read on ``where``: met, or not met and where."""
    targets = protocol["targets"]
    head = f"The default **{protocol['default']}** judge on {where}: targets "
    if targets is None:
        return head + "not checked (the default is not among the draw's candidates)."
    if targets["met"]:
        return head + "**met**."
    where = targets["failing_groups"]
    return head + "**not met**" + (f" (sources short of them: {', '.join(where)})." if where else ".")
