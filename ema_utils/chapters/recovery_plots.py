"""The figures of chapter 4 (retain-loss mitigation): recovery per concept and the trade-off
between keeping the target low and bringing the other concepts back."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from ..methods.condition import condition_label, try_condition
from ..methods.registry import METHODS, method_label, method_style
from .plots import label, ordered_concepts


def recovery_by_concept(per_concept: pd.DataFrame, title: str = "", ax=None):
    """Per concept, the recovered fraction of each augmented model with its 95% bootstrap
    interval: 0 = as low as the plain unlearned model, 1 = back to the aligned model.

    ``per_concept``: ema_utils.chapters.mitigation.recovery(...).per_concept (one target). Skipped
    concepts (aligned and unlearned too close to measure a recovery) are shaded and say so.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 4.5))
    concepts = ordered_concepts(per_concept["concept"])
    conditions = list(dict.fromkeys(per_concept["condition"]))
    width = 0.8 / max(len(conditions), 1)
    targets = set(per_concept.loc[per_concept["is_target"].astype(bool), "concept"])
    skipped = per_concept.groupby("concept")["skipped"].all()
    for i, concept in enumerate(concepts):
        if skipped.get(concept, False):
            ax.axvspan(i - 0.45, i + 0.45, color="0.92", zorder=0)
            ax.text(i, 0.5, "skipped:\nnothing lost", ha="center", va="center", fontsize=8,
                    color="0.4")
    palette = plt.get_cmap("tab10")
    for j, condition in enumerate(conditions):
        rows = per_concept[per_concept["condition"] == condition].set_index("concept")
        rows = rows.reindex(concepts)
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(concepts))]
        y = rows["recovery"].astype(float)
        err = [(y - rows["low"].astype(float)).clip(lower=0).fillna(0),
               (rows["high"].astype(float) - y).clip(lower=0).fillna(0)]
        ax.errorbar(xs, y, yerr=err, fmt="o", capsize=3, color=palette(j % 10),
                    label=condition_label(condition))
    ax.axhline(0, color="grey", linewidth=1, linestyle="--")
    ax.axhline(1, color="black", linewidth=1, linestyle=":")
    ax.set_xticks(range(len(concepts)),
                  [label(c) + (" (target)" if c in targets else "") for c in concepts],
                  rotation=30, ha="right")
    ax.set_xlim(-0.6, len(concepts) - 0.4)
    ax.set_xlabel("concept")
    ax.set_ylabel("recovered fraction\n(0 = unlearned, 1 = aligned)")
    ax.set_title(title or "Recovered refusal per concept (95% paired bootstrap intervals)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    plt.tight_layout()
    return ax


def recovery_tradeoff(summary: pd.DataFrame, title: str = "", ax=None):
    """The mitigation trade-off, one point per augmented model (method and ratio, retain weight
    or lambda, training seed): target refusal (x, should stay low; 95% Wilson interval) against
    the mean recovered fraction of the non-target concepts (y, should be high; 95% bootstrap
    interval). A retain-weight sweep (one method and ratio at several weights) is joined by a
    line in weight order: the trade-off curve. The aligned model (star, recovery 1) and the
    plain unlearned models (crosses, recovery 0) mark the two ends.

    ``summary``: ema_utils.chapters.mitigation.recovery(...).summary (one target).
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 5.5))
    shown = set()
    for r in summary.itertuples():
        marker, color = method_style(r.method)
        x, y = 100 * r.target_rate, r.mean_recovery
        xerr = [[max(x - 100 * r.target_low, 0)], [max(100 * r.target_high - x, 0)]]
        yerr = None if pd.isna(r.low) or pd.isna(y) else [[max(y - r.low, 0)], [max(r.high - y, 0)]]
        name = method_label(r.method)
        ax.errorbar([x], [y if not pd.isna(y) else float("nan")], xerr=xerr, yerr=yerr,
                    fmt=marker, color=color, capsize=3, markersize=8,
                    label=None if name in shown else name)
        shown.add(name)
        if not pd.isna(y):
            ax.annotate(condition_label(r.condition).replace(name, "").strip() or name, (x, y),
                        textcoords="offset points", xytext=(6, 4), fontsize=8)
    if len(summary):
        aligned = summary["aligned_target"].dropna()
        if len(aligned):
            ax.plot([100 * aligned.iloc[0]], [1], marker="*", markersize=14, color="black",
                    linestyle="none", label="aligned model")
        for base, rows in summary.groupby("base", sort=False):
            family = getattr(try_condition(base), "method", None)
            ax.plot([100 * rows["unlearned_target"].iloc[0]], [0], marker="X", markersize=10,
                    linestyle="none", color=method_style(family)[1] if family in METHODS else "grey",
                    label=f"plain unlearned ({base})")
    _join_weight_sweeps(ax, summary)
    ax.axhline(0, color="grey", linewidth=1, linestyle="--")
    ax.axhline(1, color="black", linewidth=1, linestyle=":")
    if summary["mean_recovery"].isna().all() if len(summary) else True:
        ax.text(0.5, 0.5, "no non-target concept lost refusal:\nno recovery to measure",
                transform=ax.transAxes, ha="center", va="center", color="0.4")
    ax.set_xlim(-3, 103)
    ax.set_xlabel("target concept refusal (% of items), should stay low")
    ax.set_ylabel("mean recovered fraction, non-target concepts\n(0 = unlearned, 1 = aligned)")
    ax.set_title(title or "Mitigation trade-off: target stays low, others recover")
    ax.text(0.02, 0.98, "goal: top left", transform=ax.transAxes, ha="left", va="top",
            fontsize=8, color="0.3")
    ax.legend(fontsize=8, loc="best")
    plt.tight_layout()
    return ax


# --- chapter 5: concept entanglement -----------------------------------------------------------


def _join_weight_sweeps(ax, summary: pd.DataFrame) -> None:
    """A line through the first training seed's arms of each method and ratio that differ only
    in their retain weight (1 when unset), in weight order."""
    if not len(summary) or "retain_weight" not in summary:
        return
    arms = summary[summary["kl_lambda"].isna() & summary["train_seed"].isna()
                   & summary["mean_recovery"].notna()]
    arms = arms.assign(weight=arms["retain_weight"].astype(float).fillna(1.0))
    for (method, _), rows in arms.groupby(["method", "ratio"], sort=False):
        if rows["weight"].nunique() > 1:
            rows = rows.sort_values("weight")
            ax.plot(100 * rows["target_rate"], rows["mean_recovery"], "-", linewidth=1,
                    color=method_style(method)[1], alpha=0.6, zorder=1)
