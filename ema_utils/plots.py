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
