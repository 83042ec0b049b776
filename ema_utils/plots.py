"""Figures of the book. Each has a title, labelled axes and units (percent of items)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from . import CONCEPTS

CONCEPT_LABELS = {"cybersecurity": "Cybersecurity", "safety": "Safety", "toxicity": "Toxicity",
                  "bias": "Bias", "sensitive_content": "Sensitive content",
                  "medical_legal": "Medical/Legal", "privacy": "Privacy",
                  "over_refusal": "Over-refusal (safe prompts)"}


def label(concept: str) -> str:
    return CONCEPT_LABELS.get(concept, concept)


def refusal_profile(rates: pd.DataFrame, paper: pd.DataFrame | None = None, title: str = "",
                    ax=None):
    """Bars of the aligned-behaviour rate per concept with 95% Wilson intervals.

    ``rates``: concept, rate, low, high (fractions). ``paper``: optional concept, model, value
    (percent) rows, drawn as markers beside the bars for comparison.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4))
    rates = rates.reset_index(drop=True)
    x = range(len(rates))
    pct = rates["rate"] * 100
    err = [pct - rates["low"] * 100, rates["high"] * 100 - pct]
    ax.bar(x, pct, yerr=err, capsize=4, color="#4C72B0", label="this run (95% Wilson interval)")
    if paper is not None and len(paper):
        markers = iter("oD^s")
        for model, rows in paper.groupby("model", sort=False):
            values = rows.set_index("concept")["value"].reindex(rates["concept"])
            ax.plot(list(x), values.tolist(), linestyle="none", marker=next(markers, "o"),
                    markersize=7, label=f"paper: {model}")
    ax.set_xticks(list(x), [label(c) for c in rates["concept"]], rotation=30, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("aligned behaviour (% of items)")
    ax.set_xlabel("concept")
    ax.set_title(title or "Refusal profile")
    ax.legend(loc="lower right", fontsize=8)
    plt.tight_layout()
    return ax


def ordered_concepts(values) -> list[str]:
    """Concept keys in book order, then anything else alphabetically."""
    values = list(dict.fromkeys(values))
    return [c for c in CONCEPTS if c in values] + sorted(v for v in values if v not in CONCEPTS)


def _grid(n: int, width: float = 5.0, height: float = 3.4):
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def training_curves(runs, title: str = "Training loss per step"):
    """One panel per intervention: its loss parts against the optimizer step."""
    fig, axes = _grid(len(runs))
    for ax, run in zip(axes, runs):
        parts = [c for c in ("npo", "sft_ce", "retain_ce", "kl") if c in run.losses.columns]
        for part in parts:
            ax.plot(run.losses["step"], run.losses[part], marker=".", label=part)
        ax.set_title(run.name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats)")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def kl_curves(runs, title: str = "First-token KL(aligned || trained) per concept"):
    """The paper's Fig. 2: per concept, the mean first-token KL over training (one panel a run)."""
    fig, axes = _grid(len(runs))
    for ax, run in zip(axes, runs):
        for concept in ordered_concepts(run.kl["concept"]):
            rows = run.kl[run.kl["concept"] == concept]
            ax.plot(rows["step"], rows["kl"], marker="o", label=label(concept),
                    linewidth=2.5 if concept == run.concept else 1.2)
        ax.set_title(run.name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("mean KL (nats)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def refusal_trajectories(runs, title: str = "Refusal along training, per concept"):
    """Per run, each concept's aligned-behaviour rate at every checkpoint (target in bold)."""
    fig, axes = _grid(len(runs))
    for ax, run in zip(axes, runs):
        t = run.trajectory
        for concept in ordered_concepts(t["concept"]):
            rows = t[t["concept"] == concept]
            ax.plot(rows["step"], 100 * rows["rate"], marker="o", label=label(concept),
                    linewidth=3 if concept == run.concept else 1.2)
        ax.axhline(25, color="grey", linestyle=":", linewidth=1)
        ax.set_ylim(-3, 103)
        ax.set_title(run.name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("refusal (% of items)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def target_vs_rest(summaries: dict, title: str = "Narrow or general? Target vs other concepts"):
    """One curve per run: target refusal (x) against the mean refusal of the other concepts (y),
    one point per checkpoint from the aligned model (top right) onwards. A narrow solution
    would run left along the top; a general one falls along the diagonal."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, table in summaries.items():
        ax.plot(100 * table["target"], 100 * table["non_target_mean"], marker="o", label=name)
        for row in table.itertuples():
            ax.annotate(str(row.step), (100 * row.target, 100 * row.non_target_mean), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.plot([0, 100], [0, 100], color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.invert_xaxis()
    ax.set_xlabel("target concept refusal (%), falling to the right")
    ax.set_ylabel("mean refusal of the other concepts (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def ema_heatmap(matrix: pd.DataFrame, title: str = "Change in refusal after the intervention"):
    """Concept x condition heatmap of the change in points; EMA-flagged cells marked with *."""
    import seaborn as sns

    table = matrix.pivot(index="condition", columns="concept", values="delta_points")
    table = table[ordered_concepts(table.columns)]
    flags = matrix.pivot(index="condition", columns="concept", values="flagged")[table.columns]
    targets = matrix.pivot(index="condition", columns="concept", values="is_target")[table.columns]
    notes = table.round(0).astype("Int64").astype(str)
    notes = notes.where(~flags.astype(bool), notes + "*")
    notes = notes.where(~targets.astype(bool), "(" + notes + ")")
    fig, ax = plt.subplots(figsize=(9, 0.7 * len(table) + 2))
    sns.heatmap(table, annot=notes, fmt="", cmap="RdBu", center=0, vmin=-100, vmax=100, ax=ax,
                cbar_kws={"label": "change in refusal (points)"})
    ax.set_xticklabels([label(c) for c in table.columns], rotation=30, ha="right")
    ax.set_xlabel("concept")
    ax.set_ylabel("intervened model")
    ax.set_title(title + "\n(target in parentheses; * = EMA: drop > 15 points, intervals apart)")
    fig.tight_layout()
    return fig


# --- chapter 4: retain-loss mitigation -----------------------------------------------------------

_METHOD_STYLE = {"npo_retain": ("o", "#4C72B0"), "sft_retain": ("s", "#DD8452"),
                 "npo_kl": ("^", "#55A868")}


def recovery_by_concept(per_concept: pd.DataFrame, title: str = "", ax=None):
    """Per concept, the recovered fraction of each augmented model with its 95% bootstrap
    interval: 0 = as low as the plain unlearned model, 1 = back to the aligned model.

    ``per_concept``: ema_utils.mitigation.recovery(...).per_concept (one target). Skipped
    concepts (aligned and unlearned too close to measure a recovery) are shaded and say so.
    """
    from .mitigation import condition_label

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 4.5))
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
    ax.set_ylabel("recovered fraction (0 = unlearned, 1 = aligned)")
    ax.set_title(title or "Recovered refusal per concept (95% paired bootstrap intervals)")
    ax.legend(fontsize=8, loc="best")
    plt.tight_layout()
    return ax


def recovery_tradeoff(summary: pd.DataFrame, title: str = "", ax=None):
    """The mitigation trade-off, one point per augmented model (method and ratio or lambda):
    target refusal (x, should stay low; 95% Wilson interval) against the mean recovered
    fraction of the non-target concepts (y, should be high; 95% bootstrap interval). The
    aligned model (star, recovery 1) and the plain unlearned models (crosses, recovery 0)
    mark the two ends.

    ``summary``: ema_utils.mitigation.recovery(...).summary (one target).
    """
    from .mitigation import METHOD_LABELS, condition_label

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 5.5))
    shown = set()
    for r in summary.itertuples():
        marker, color = _METHOD_STYLE.get(r.method, ("D", "#8172B3"))
        x, y = 100 * r.target_rate, r.mean_recovery
        xerr = [[max(x - 100 * r.target_low, 0)], [max(100 * r.target_high - x, 0)]]
        yerr = None if pd.isna(r.low) or pd.isna(y) else [[max(y - r.low, 0)], [max(r.high - y, 0)]]
        name = METHOD_LABELS.get(r.method, r.method)
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
            ax.plot([100 * rows["unlearned_target"].iloc[0]], [0], marker="X", markersize=10,
                    linestyle="none", color="grey")
            ax.annotate(f"{base} (unlearned)", (100 * rows["unlearned_target"].iloc[0], 0),
                        textcoords="offset points", xytext=(6, -12), fontsize=8, color="grey")
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
    ax.legend(fontsize=8, loc="lower right")
    plt.tight_layout()
    return ax
