"""Figures of the book. Each has a title, labelled axes and units (percent of items)."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from .. import CONCEPTS
from ..core.figures import label_points
from ..core.metrics import is_random, random_band

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
        _, ax = plt.subplots(figsize=(7.4, 3.8))
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
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, fontsize=8)  # off the bars
    plt.tight_layout()
    return ax


def ordered_concepts(values) -> list[str]:
    """Concept keys in book order, then anything else alphabetically."""
    values = list(dict.fromkeys(values))
    return [c for c in CONCEPTS if c in values] + sorted(v for v in values if v not in CONCEPTS)


def _grid(n: int, width: float = 3.7, height: float = 3.0):
    """Panels two to a row, sized so two fill the book's column (7.4 in)."""
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _finish_steps(fig, axes, title: str):
    """Whole steps on the x axes, the panels' shared legend below them (off the lines), a title."""
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=4,
                   fontsize=8, frameon=False)
    return fig


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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def kl_curves(runs, title: str = "First-token KL(aligned || trained) per concept"):
    """The paper's Fig. 2: per concept, the mean first-token KL over training (one panel a run),
    with its 95% bootstrap interval over the KL prompts as a band where the run has one."""
    fig, axes = _grid(len(runs))
    for ax, run in zip(axes, runs):
        for concept in ordered_concepts(run.kl["concept"]):
            rows = run.kl[run.kl["concept"] == concept].sort_values("step")
            line, = ax.plot(rows["step"], rows["kl"], marker="o", label=label(concept),
                            linewidth=2.5 if concept == run.concept else 1.2)
            if {"low", "high"} <= set(rows.columns) and rows["low"].notna().any():
                ax.fill_between(rows["step"], rows["low"], rows["high"], color=line.get_color(),
                                alpha=0.12, linewidth=0)
        ax.set_title(run.name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("mean KL (nats), 95% band")
    return _finish_steps(fig, axes, title)


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
    return _finish_steps(fig, axes, title)


def target_vs_rest(summaries: dict, title: str = "Narrow or general? Target vs other concepts"):
    """One curve per run: target refusal (x) against the mean refusal of the other concepts (y),
    one point per checkpoint from the aligned model (top left: the x axis is reversed, so the
    target's refusal falls to the right) onwards. A narrow solution would run right along the
    top; a general one falls along the diagonal."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, table in summaries.items():
        ax.plot(100 * table["target"], 100 * table["non_target_mean"], marker="o", label=name)
    ax.plot([0, 100], [0, 100], color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.invert_xaxis()
    ax.set_xlabel("target concept refusal (%), falling to the right")
    ax.set_ylabel("mean refusal of the other concepts (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    label_points(ax, [(100 * r.target, 100 * r.non_target_mean, str(int(r.step)))  # the steps
                      for table in summaries.values() for r in table.itertuples()])
    return fig


def ema_heatmap(matrix: pd.DataFrame, title: str = "Change in refusal after the intervention"):
    """Concept x condition heatmap of the change in points. A paired matrix (from per-item
    results) marks both rules: * the paper's (drop > 15 points), + the paired McNemar test
    (p < 0.05); EMA is a non-target cell with both. A rates-only matrix marks EMA with *."""
    # deferred: seaborn loads slowly (scipy); only the heatmaps need it
    import seaborn as sns

    table = matrix.pivot(index="condition", columns="concept", values="delta_points")
    table = table[ordered_concepts(table.columns)]
    flags = matrix.pivot(index="condition", columns="concept", values="flagged")[table.columns]
    targets = matrix.pivot(index="condition", columns="concept", values="is_target")[table.columns]
    notes = table.round(0).astype("Int64").astype(str)
    if "paper_rule" in matrix.columns:
        paper, tested = (matrix.pivot(index="condition", columns="concept", values=v)[table.columns]
                         for v in ("paper_rule", "significant"))
        notes = notes.where(~paper.astype(bool), notes + "*")
        notes = notes.where(~(tested.astype(bool) & (table < 0)), notes + "+")
        legend = ("target in parentheses; * drop > 15 points (the paper's rule), + paired test "
                  "p < 0.05 (McNemar);\nEMA = both, on a non-target concept")
    else:
        notes = notes.where(~flags.astype(bool), notes + "*")
        legend = "target in parentheses; * = EMA: drop > 15 points, intervals apart"
    notes = notes.where(~targets.astype(bool), "(" + notes + ")")
    fig, ax = plt.subplots(figsize=(9, 0.7 * len(table) + 2))
    sns.heatmap(table, annot=notes, fmt="", cmap="RdBu", center=0, vmin=-100, vmax=100, ax=ax,
                cbar_kws={"label": "change in refusal (points)"})
    ax.set_xticklabels([label(c) for c in table.columns], rotation=30, ha="right")
    ax.set_xlabel("concept")
    ax.set_ylabel("intervened model")
    ax.set_title(f"{title}\n({legend})", fontsize=10)
    fig.tight_layout()
    return fig


# --- chapter 4: retain-loss mitigation -----------------------------------------------------------

def cosine_histograms(table: pd.DataFrame, targets=None, bins: int = 30, title: str = "",
                      row_percent: float | None = None):
    """The paper's R3 figure: per target concept vector, a histogram per concept of the cosine
    between the vector and each prompt's mean-normalised hidden state at one layer.

    The histograms are drawn one above the other (one row per concept, so eight of them stay
    readable); a bar one row high holds ``row_percent`` percent of the concept's prompts (None:
    the smallest of 10, 20, 25, 50, 100 that fits the tallest bar). The black tick in each row
    is the concept's mean, written at the right.
    ``table``: id, concept, target, layer, cosine (ema_utils.chapters.concepts.state_cosines).
    """
    targets = list(dict.fromkeys(table["target"])) if targets is None else list(targets)
    layer = int(table["layer"].iloc[0])
    concepts = ordered_concepts(table["concept"])
    fig, axes = plt.subplots(1, len(targets), figsize=(7 * len(targets), 0.55 * len(concepts) + 1.8),
                             squeeze=False)
    values = table["cosine"].dropna()
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (-1.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    palette = plt.get_cmap("tab10")
    if row_percent is None:
        tallest = max((100 * np.histogram(rows.dropna(), bins=edges)[0].max() / rows.notna().sum()
                       for _, rows in table.groupby(["target", "concept"])["cosine"]
                       if rows.notna().any()), default=100)
        row_percent = next(p for p in (10, 20, 25, 50, 100) if p >= tallest - 1e-9)
    for ax, target in zip(axes[0], targets):
        part = table[table["target"] == target]
        for row, concept in enumerate(reversed(concepts)):
            cos = part.loc[part["concept"] == concept, "cosine"].dropna()
            if cos.empty:
                continue
            index = concepts.index(concept)
            color = "grey" if concept == "benign" else palette(index % 10)
            counts, _ = np.histogram(cos, bins=edges)
            heights = 100 * counts / len(cos) / row_percent * 0.95
            keep = counts > 0
            ax.bar(edges[:-1][keep], heights[keep], width=np.diff(edges)[keep], bottom=row,
                   align="edge",
                   color=color, alpha=0.75 if concept != "benign" else 0.4,
                   edgecolor="black" if concept == target else color,
                   linewidth=1.2 if concept == target else 0)
            mean = float(cos.mean())
            ax.plot([mean, mean], [row, row + 0.9], color="black", linewidth=1.2)
            ax.text(1.01, row + 0.3, f"{mean:+.2f}", transform=ax.get_yaxis_transform(),
                    fontsize=8)
        ax.axvline(0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_yticks([r + 0.3 for r in range(len(concepts))],
                      [label(c) for c in reversed(concepts)], fontsize=8)
        ax.set_ylim(0, len(concepts))
        ax.set_xlim(lo, hi)
        ax.grid(axis="y", visible=False)
        ax.set_title(f"{label(target)} vector (bold outline: its own prompts; right: means)",
                     fontsize=10)
        ax.set_xlabel("cosine similarity with the concept vector (unitless)")
        ax.set_ylabel(f"prompts of each concept (row height = {row_percent:g}% of them)")
    fig.suptitle(title or f"Cosine similarity of every concept's prompts with a concept vector "
                          f"(layer {layer})")
    fig.tight_layout(w_pad=4)
    return fig


def similarity_heatmap(matrix: pd.DataFrame, layer: int, ax=None, title: str = "",
                       annotate: bool = True, colorbar: bool = True):
    """Concept x concept cosine between concept vectors at one layer."""
    # deferred: seaborn loads slowly (scipy); only the heatmaps need it
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(6.2, 5.2))
    names = [label(c) for c in matrix.index]
    sns.heatmap(matrix.to_numpy(dtype=float), annot=annotate, fmt=".2f", cmap="RdBu_r", center=0,
                vmin=-1, vmax=1, square=True, ax=ax, xticklabels=names, yticklabels=names,
                cbar=colorbar, cbar_kws={"label": "cosine similarity (unitless)"},
                annot_kws={"fontsize": 7})
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_yticklabels(names, rotation=0, fontsize=8)
    ax.set_xlabel("concept vector")
    ax.set_ylabel("concept vector")
    ax.set_title(title or f"Similarity of concept vectors, layer {layer}")
    return ax


def similarity_grid(matrices: dict, layers, title: str = "Similarity of concept vectors by layer"):
    """A static grid of :func:`similarity_heatmap` panels for a few ``layers``."""
    layers = list(layers)
    cols = min(len(layers), 2)
    rows = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 5.2 * rows), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    for ax, layer in zip(axes.flat, layers):
        similarity_heatmap(matrices[layer], layer, ax=ax, title=f"layer {layer}")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


_METHOD_COLORS = {"pca": "#4C72B0", "diff_means": "#DD8452"}
_MEASURE_AXES = {"drop_points": "drop in refusal (points)",
                 "half_step": "step at half refusal (optimizer steps)"}
_MEASURE_TITLES = {"drop_points": "EMA as the drop at the chosen checkpoint",
                   "half_step": "EMA as the step where half the refusal was lost"}


def correlation_by_layer(table: pd.DataFrame, layer: int | None = None, n_layers: int | None = None,
                         title: str = "Does similarity to the target predict EMA? Spearman's "
                                      "rho by layer"):
    """Per run (rows) and EMA measure (columns): Spearman's rho against layer depth with its
    bootstrap interval (band), one line per kind of concept vector; the chosen layer dashed.

    ``table``: ema_utils.chapters.concepts.correlation_table. The expected sign is positive for the drop
    and negative for the step (more similar -> larger drop, earlier collapse).
    """
    runs = list(dict.fromkeys(table["run"]))
    measures = list(dict.fromkeys(table["measure"]))
    fig, axes = plt.subplots(len(runs), len(measures), figsize=(6 * len(measures), 3.6 * len(runs)),
                             squeeze=False)
    styles = {m: (c, "-" if m == "pca" else "--") for m, c in _METHOD_COLORS.items()}
    for i, run in enumerate(runs):
        for j, measure in enumerate(measures):
            ax = axes[i][j]
            part = table[(table["run"] == run) & (table["measure"] == measure)]
            for method, rows in part.groupby("method", sort=False):
                color, style = styles.get(method, ("black", "-"))
                rows = rows.sort_values("layer")
                ax.plot(rows["layer"], rows["rho"], marker="o", markersize=3, color=color,
                        linestyle=style, label=f"{method}: rho")
                ax.fill_between(rows["layer"], rows["low"], rows["high"], color=color, alpha=0.15,
                                label=f"{method}: 95% bootstrap interval")
            ax.axhline(0, color="grey", linewidth=0.8)
            _note_if_undefined(ax, part["rho"] if len(part) else pd.Series(dtype=float), "rho")
            if layer is not None:
                ax.axvline(layer, color="black", linestyle=":", linewidth=1,
                           label=f"chosen layer ({layer})")
            ax.set_ylim(-1.05, 1.05)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("layer" + (f" (of {n_layers})" if n_layers else ""))
            ax.set_ylabel("Spearman's rho (unitless)")
            target = part["target"].iloc[0] if len(part) else ""
            ax.set_title(f"{run} (target {label(target)}):\n{_MEASURE_TITLES.get(measure, measure)}",
                         fontsize=10)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _note_if_undefined(ax, values: pd.Series, what: str) -> None:
    """Say in the panel why it has no line, instead of leaving an empty frame."""
    if not values.notna().any():
        ax.text(0.5, 0.5, f"no {what}: fewer than three concepts with an\nEMA value, or all "
                "of them tied", ha="center", va="center", transform=ax.transAxes, fontsize=8)


def pvalues_by_layer(table: pd.DataFrame, layer: int | None = None, alpha: float = 0.05,
                     n_layers: int | None = None,
                     title: str = "Exact permutation p-values by layer (one-sided)"):
    """Per run and EMA measure: the raw and Holm-adjusted p-values against layer (log scale),
    with the level ``alpha`` and the smallest p-value the exact test can give."""
    runs = list(dict.fromkeys(table["run"]))
    measures = list(dict.fromkeys(table["measure"]))
    fig, axes = plt.subplots(len(runs), len(measures), figsize=(6 * len(measures), 3.4 * len(runs)),
                             squeeze=False)
    for i, run in enumerate(runs):
        for j, measure in enumerate(measures):
            ax = axes[i][j]
            part = table[(table["run"] == run) & (table["measure"] == measure)]
            for method, rows in part.groupby("method", sort=False):
                rows = rows.sort_values("layer")
                color = _METHOD_COLORS.get(method, "black")
                ax.plot(rows["layer"], rows["p"], marker="o", markersize=3, color=color,
                        label=f"{method}: p")
                ax.plot(rows["layer"], rows["p_holm"], marker="x", markersize=3, linestyle=":",
                        color=color, label=f"{method}: Holm-adjusted p")
            ax.axhline(alpha, color="red", linewidth=0.8, label=f"p = {alpha}")
            _note_if_undefined(ax, part["p"] if len(part) else pd.Series(dtype=float), "p-value")
            n = int(part["n_concepts"].max()) if len(part) and part["n_concepts"].notna().any() else 0
            if 3 <= n <= 8:
                floor = 1 / math.factorial(n)
                ax.axhline(floor, color="grey", linestyle="--", linewidth=0.8,
                           label=f"smallest possible (1/{n}!)")
            if layer is not None:
                ax.axvline(layer, color="black", linestyle=":", linewidth=1)
            ax.set_yscale("log")
            ax.set_ylim(top=1.1)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("layer" + (f" (of {n_layers})" if n_layers else ""))
            ax.set_ylabel("p-value (log scale)")
            ax.set_title(f"{run}: {_MEASURE_TITLES.get(measure, measure)}", fontsize=10)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def similarity_vs_ema(similarities: pd.DataFrame, ema: dict, correlations: pd.DataFrame | None,
                      layer: int, title: str = ""):
    """At one layer, per run and EMA measure: each non-target concept's similarity to the target
    (x) against its EMA (y), labelled, with Spearman's rho and p in the panel title.

    ``similarities``: target, concept, layer, similarity; ``ema``: run -> ema_measures table.
    """
    measures = [m for m in _MEASURE_AXES if any(m in t.columns for t in ema.values())]
    runs = list(ema)
    fig, axes = plt.subplots(max(1, len(runs)), max(1, len(measures)),
                             figsize=(3.7 * max(1, len(measures)), 3.4 * max(1, len(runs))),
                             squeeze=False)
    labels = {}  # axes -> [(x, y, text)], written once the layout is final
    for i, run in enumerate(runs):
        table = ema[run]
        target = table.loc[table["is_target"], "concept"].iloc[0]
        sims = similarities[(similarities["target"] == target) & (similarities["layer"] == layer)]
        merged = table.merge(sims[["concept", "similarity"]], on="concept")
        for j, measure in enumerate(measures):
            ax = axes[i][j]
            y = merged[measure].astype(float)
            finite = y.replace([float("inf")], float("nan"))
            top = finite.max() if finite.notna().any() else 0.0
            shown = y.where(y != float("inf"), (top if not math.isnan(top) else 0) * 1.15 + 1)
            ax.scatter(merged["similarity"], shown, color="#4C72B0")
            labels[ax] = [(x, yy, label(c) + (" (not reached)" if inf else "")) for x, yy, c, inf
                          in zip(merged["similarity"], shown, merged["concept"], y == float("inf"))
                          if not math.isnan(yy)]
            stat = ""
            if correlations is not None and len(correlations):
                row = correlations[(correlations["run"] == run) & (correlations["measure"] == measure)
                                   & (correlations["layer"] == layer)
                                   & (correlations["method"] == "pca")]
                if len(row):
                    r = row.iloc[0]
                    stat = f"\nrho = {r['rho']:+.2f}, one-sided p = {r['p']:.3f}" \
                        if not math.isnan(r["p"]) else "\nrho not defined (too few values)"
            ax.set_xlabel(f"similarity to the {label(target)} vector (cosine, unitless)")
            ax.set_ylabel(_MEASURE_AXES[measure])
            ax.set_title(f"{run}{stat}", fontsize=10)
    fig.suptitle(title or f"Similarity to the target vs measured EMA, layer {layer} "
                          "(one point per non-target concept)")
    fig.tight_layout()
    for ax, points in labels.items():
        label_points(ax, points)
    return fig


def vector_agreement(table: pd.DataFrame,
                     title: str = "Do the two kinds of concept vector agree? (PCA vs difference "
                                  "of means)"):
    """Per concept, the cosine between its PCA vector and its difference-of-means vector
    against layer. ``table``: concept, layer, cosine (ema_utils.chapters.concepts.vector_agreement)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for concept in ordered_concepts(table["concept"]):
        rows = table[table["concept"] == concept].sort_values("layer")
        ax.plot(rows["layer"], rows["cosine"], marker="o", markersize=3, label=label(concept))
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine similarity (unitless)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def refusal_direction_layers(by_layer: pd.DataFrame, cosines: pd.DataFrame,
                             layer: int | None = None, n_layers: int | None = None,
                             title: str = "The refusal direction of the aligned model, by layer"):
    """Left: the refusal direction's norm and how far the refused and complied prompts lie apart
    along it (Cohen's d), per layer. Right, one panel per kind of concept vector: the cosine
    between the refusal direction and each concept vector. The layer used for the ablation is
    dotted. ``by_layer``: layer, norm, separation (RefusalDirection.by_layer());
    ``cosines``: method, concept, layer, cosine (ema_utils.chapters.directions.concept_cosines)."""
    methods = list(dict.fromkeys(cosines["method"]))
    fig, axes = plt.subplots(1, 1 + len(methods), figsize=(5.2 * (1 + len(methods)), 4),
                             squeeze=False)
    axes = axes[0]
    rows = by_layer[by_layer["layer"] >= 1].sort_values("layer")
    ax = axes[0]
    ax.plot(rows["layer"], rows["norm"], marker="o", markersize=3, color="#4C72B0",
            label="norm (hidden-state units)")
    ax.set_ylabel("norm of mean(refused) - mean(complied)\n(hidden-state units)", color="#4C72B0")
    twin = ax.twinx()
    twin.plot(rows["layer"], rows["separation"], marker="s", markersize=3, color="#C44E52",
              linestyle="--", label="separation (Cohen's d)")
    twin.set_ylabel("separation along the direction\n(Cohen's d, unitless)", color="#C44E52")
    twin.grid(False)
    ax.set_title("size of the direction and separation", fontsize=10)
    for j, method in enumerate(methods, start=1):
        ax_m = axes[j]
        part = cosines[cosines["method"] == method]
        for concept in ordered_concepts(part["concept"]):
            r = part[part["concept"] == concept].sort_values("layer")
            ax_m.plot(r["layer"], r["cosine"], marker="o", markersize=3, label=label(concept))
        ax_m.axhline(0, color="grey", linewidth=0.8)
        ax_m.set_ylim(-1.05, 1.05)
        ax_m.set_ylabel("cosine with the concept vector (unitless)")
        ax_m.set_title(f"cosine with each concept vector:\n{_DIRECTION_METHOD_TITLES.get(method, method)}",
                       fontsize=10)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    for ax_i in axes:
        if layer is not None:
            ax_i.axvline(layer, color="black", linestyle=":", linewidth=1)
        ax_i.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_i.set_xlabel("layer" + (f" (of {n_layers})" if n_layers else ""))
    fig.suptitle(title + (f" (dotted: layer {layer}, ablated below)" if layer is not None else ""))
    fig.tight_layout()
    return fig


_DIRECTION_METHOD_TITLES = {"pca": "first principal components (the paper's)",
                            "diff_means": "differences of means vs benign"}
_CONDITION_COLORS = {"aligned": "#4C72B0", "refusal direction ablated": "#C44E52",
                     "random direction ablated": "#8C8C8C"}


def ablation_bars(rates: pd.DataFrame, pooled: pd.DataFrame | None = None,
                  title: str = "Refusal with the refusal direction projected out", ax=None):
    """Grouped bars: the aligned-behaviour rate per concept (and over all refusal-scored items
    pooled) for each condition, with 95% Wilson intervals. ``rates``: condition, concept, rate,
    low, high (ema_utils.chapters.directions.ablation_rates); ``pooled``: condition, rate, low, high."""
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 4.2))
    table = rates.copy()
    if pooled is not None and len(pooled):
        table = pd.concat([table, pooled.assign(concept="all (pooled refusal)")], ignore_index=True)
    concepts = ordered_concepts(rates["concept"]) + (
        ["all (pooled refusal)"] if pooled is not None and len(pooled) else [])
    conditions = list(dict.fromkeys(table["condition"]))
    width = 0.8 / max(len(conditions), 1)
    for j, condition in enumerate(conditions):
        rows = table[table["condition"] == condition].set_index("concept").reindex(concepts)
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(concepts))]
        pct = rows["rate"].astype(float) * 100
        err = [(pct - rows["low"].astype(float) * 100).clip(lower=0).fillna(0),
               (rows["high"].astype(float) * 100 - pct).clip(lower=0).fillna(0)]
        ax.bar(xs, pct.fillna(0), width=width, yerr=err, capsize=3,
               color=_CONDITION_COLORS.get(condition, None), label=condition)
    ax.set_xticks(range(len(concepts)), [label(c) for c in concepts], rotation=30, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("aligned behaviour (% of items)")
    ax.set_xlabel("concept")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    plt.tight_layout()
    return ax


# --- chapter 6: narrow vs general --------------------------------------------------------------

_SOLUTION_STYLE = {"general": ("o", "#C44E52"), "narrow": ("s", "#4C72B0")}


def efficiency_curves(table: pd.DataFrame, base_loss: float | None = None, measure: str = "npo",
                      title: str = "Efficiency: forget loss against adapter norm", ax=None):
    """Forget loss (y) against the total norm of the LoRA update (x), one curve per solution:
    the adapter scaled by factors (line, the trained adapter at factor 1 starred) and scaled to
    common norms (open markers). Lower at the same norm = more efficient.

    ``table``: ema_utils.chapters.stability efficiency rows (solution, kind, scale, norm, npo, nll).
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.8))
    ylabel = {"npo": "forget loss: NPO on the forget set (nats)",
              "nll": "refusal NLL per token (nats)"}.get(measure, measure)
    for solution, rows in table.groupby("solution", sort=False):
        marker, color = _SOLUTION_STYLE.get(solution, ("D", "grey"))
        factor = rows[rows["kind"] == "factor"].sort_values("norm")
        ax.plot(factor["norm"], factor[measure], marker=marker, color=color,
                label=f"{solution}: scaled x0-2")
        native = factor[(factor["scale"] - 1).abs() < 1e-9]
        if len(native):
            ax.plot(native["norm"], native[measure], marker="*", markersize=16, color=color,
                    linestyle="none", label=f"{solution}: as trained")
        common = rows[rows["kind"] == "norm"]
        if len(common):
            ax.plot(common["norm"], common[measure], marker=marker, markersize=10,
                    markerfacecolor="none", markeredgewidth=1.8, color=color, linestyle="none",
                    label=f"{solution}: at the common norms")
    if base_loss is not None:
        ax.axhline(base_loss, color="grey", linestyle=":", linewidth=1,
                   label="aligned model (adapter off)")
    ax.set_xlabel("total adapter norm ||s·B·A||_F over all LoRA layers (weight units)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    plt.tight_layout()
    return ax


def stability_curves(summary: pd.DataFrame,
                     title: str = "Stability: relative loss increase under orthogonal noise",
                     ax=None):
    """Relative forget-loss increase (L_pert - L_orig) / (L_base - L_orig) against the noise
    level eps (log scale), mean over seeds with a 95% t-interval band, one curve per solution.
    0 = unharmed, 1 = as if the adapter were removed; higher = less stable.

    ``summary``: ema_utils.chapters.stability.stability_summary (solution, eps, mean, low, high, n).
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.8))
    for solution, rows in summary.groupby("solution", sort=False):
        marker, color = _SOLUTION_STYLE.get(solution, ("D", "grey"))
        rows = rows.sort_values("eps")
        ax.plot(rows["eps"], rows["mean"], marker=marker, color=color, label=f"{solution}: mean")
        band = rows[rows["low"].notna()]
        if len(band):
            ax.fill_between(band["eps"], band["low"], band["high"], color=color, alpha=0.18,
                            label=f"{solution}: 95% interval over seeds")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.axhline(1, color="black", linewidth=0.8, linestyle=":", label="adapter removed")
    ax.set_xscale("log")
    ax.set_xlabel("noise level eps (x' = sqrt(1 - eps²)·x + eps·y, log scale)")
    ax.set_ylabel("relative loss increase\n(L_pert - L_orig) / (L_base - L_orig)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    plt.tight_layout()
    return ax


def direction_profile(profile: pd.DataFrame, layer: int | None = None,
                      title: str = "The solutions' directions by layer"):
    """Left: the norm of each solution's direction (mean activation with the adapter minus
    without) per layer; right: the cosine between the general and the narrow direction.

    ``profile``: ema_utils.chapters.steering.layer_profile (layer, norm_<role>..., cosine).
    """
    has_cos = "cosine" in profile.columns
    fig, axes = plt.subplots(1, 2 if has_cos else 1, figsize=(12 if has_cos else 6.5, 4),
                             squeeze=False)
    ax = axes[0][0]
    for col in [c for c in profile.columns if c.startswith("norm_")]:
        role = col.removeprefix("norm_")
        marker, color = _SOLUTION_STYLE.get(role, ("D", "grey"))
        ax.plot(profile["layer"], profile[col], marker=marker, markersize=4, color=color,
                label=role)
    if layer is not None:
        ax.axvline(layer, color="black", linestyle=":", linewidth=1, label=f"steering layer ({layer})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("norm of the mean activation shift\n(residual-stream units)")
    ax.set_title("direction norm (unlearned - aligned)")
    ax.legend(fontsize=8)
    if has_cos:
        ax = axes[0][1]
        ax.plot(profile["layer"], profile["cosine"], marker="o", markersize=4, color="#55A868")
        ax.axhline(0, color="grey", linewidth=0.8)
        if layer is not None:
            ax.axvline(layer, color="black", linestyle=":", linewidth=1)
        ax.set_ylim(-1.05, 1.05)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("cosine similarity (unitless)")
        ax.set_title("cosine between the general and the narrow direction")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def dose_curves(dose: pd.DataFrame, title: str = "Steering and ablating the general direction"):
    """Left: the dose curve: pooled refusal (refusal-scored items of all concepts) of the aligned
    model steered with each real direction (95% Wilson intervals) against the coefficient (a
    multiple of the residual stream's norm at the steering layer, log scale), over the band
    (lowest to highest) of the random directions at each coefficient. Right: the unlearned
    model with each real direction projected out, beside the random ablations' band (lowest to
    highest, dashed), the unlearned and the aligned model.

    ``dose``: ema_utils.chapters.steering.dose_evaluations (kind, direction, coefficient, rate,
    low, high).
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 4.6), gridspec_kw={"width_ratios": [1.3, 1]})
    level = {k: 100 * float(dose.loc[dose["kind"] == k, "rate"].iloc[0])
             for k in ("aligned", "unlearned") if (dose["kind"] == k).any()}
    real_names = [n for n in dict.fromkeys(dose.loc[~dose["direction"].map(is_random), "direction"]) if n]
    colors = dict(zip(real_names, ("#C44E52", "#4C72B0", "#55A868", "#8172B2")))
    steer = dose[dose["kind"] == "steer"]
    bands = random_band(dose)
    band = bands[bands["kind"] == "steer"].sort_values("coefficient")
    if len(band):
        left.fill_between(band["coefficient"], 100 * band["band_low"], 100 * band["band_high"],
                          color="0.85", label=f"{int(band['n_random'].max())} random directions (range)")
    for name in real_names:
        rows = steer[steer["direction"] == name].sort_values("coefficient")
        if len(rows):
            y = 100 * rows["rate"]
            left.errorbar(rows["coefficient"], y, yerr=[(y - 100 * rows["low"]).clip(lower=0),
                                                       (100 * rows["high"] - y).clip(lower=0)],
                          marker="o", capsize=3, color=colors[name], label=f"{name} direction")
    if "aligned" in level:
        left.axhline(level["aligned"], color="black", linestyle=":", linewidth=1, label="aligned model")
    coefficients = sorted(steer["coefficient"].dropna().unique())
    if coefficients and min(coefficients) > 0:
        left.set_xscale("log", base=2)
        left.set_xticks(coefficients, [f"{c:g}x" for c in coefficients])
        left.minorticks_off()
    left.set_ylim(-3, 103)
    left.set_xlabel("coefficient (x the residual norm at the layer)")
    left.set_ylabel("pooled refusal (% of items)")
    left.set_title("steering the aligned model")
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    ablate = dose[dose["kind"] == "ablate"]
    ablated_band = bands[bands["kind"] == "ablate"]
    bars = [(f"{n}\nablated", 100 * float(ablate.loc[ablate["direction"] == n, "rate"].iloc[0]),
             colors[n]) for n in real_names if (ablate["direction"] == n).any()]
    bars = [("aligned", level.get("aligned", np.nan), "black"),
            ("unlearned", level.get("unlearned", np.nan), "0.55")] + bars
    right.bar(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars], width=0.6)
    if len(ablated_band):
        low, high = 100 * ablated_band["band_low"].min(), 100 * ablated_band["band_high"].max()
        right.axhspan(low, high, color="0.85", zorder=0)
        for i, y in enumerate((low, high)):
            right.axhline(y, color="0.45", linestyle="--", linewidth=1,
                          label=f"{int(ablated_band['n_random'].sum())} random directions ablated (range)"
                          if i == 0 else None)
        right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    right.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    right.set_ylim(0, 105)
    right.set_xlabel("model")
    right.set_ylabel("pooled refusal (% of items)")
    right.set_title("projected out of the unlearned model")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
