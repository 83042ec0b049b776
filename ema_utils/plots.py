"""Figures of the book. Each has a title, labelled axes and units (percent of items)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

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
    """The mitigation trade-off, one point per augmented model (method and ratio or lambda):
    target refusal (x, should stay low; 95% Wilson interval) against the mean recovered
    fraction of the non-target concepts (y, should be high; 95% bootstrap interval). The
    aligned model (star, recovery 1) and the plain unlearned models (crosses, recovery 0)
    mark the two ends.

    ``summary``: ema_utils.mitigation.recovery(...).summary (one target).
    """
    from .mitigation import METHOD_LABELS, condition_label
    from .report import condition_parts

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
        base_colors = {"npo": "#1f3b66", "sft": "#8c4a1c"}
        for base, rows in summary.groupby("base", sort=False):
            family = condition_parts(base)[0]
            ax.plot([100 * rows["unlearned_target"].iloc[0]], [0], marker="X", markersize=10,
                    linestyle="none", color=base_colors.get(family, "grey"),
                    label=f"plain unlearned ({base})")
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

def figure_png(fig, dpi: int = 100, palette: bool = False) -> bytes:
    """A figure as PNG bytes (closed afterwards, so a notebook does not also show it).

    ``palette``: store 256 colours (about a quarter of the size; plenty for a heatmap), for
    widgets that embed many images in the page."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    if not palette:
        return buffer.getvalue()
    from PIL import Image

    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    out = io.BytesIO()
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(out, format="PNG",
                                                                       optimize=True)
    return out.getvalue()


def cosine_histograms(table: pd.DataFrame, targets=None, bins: int = 30, title: str = "",
                      row_percent: float | None = None):
    """The paper's R3 figure: per target concept vector, a histogram per concept of the cosine
    between the vector and each prompt's mean-normalised hidden state at one layer.

    The histograms are drawn one above the other (one row per concept, so eight of them stay
    readable); a bar one row high holds ``row_percent`` percent of the concept's prompts (None:
    the smallest of 10, 20, 25, 50, 100 that fits the tallest bar). The black tick in each row
    is the concept's mean, written at the right.
    ``table``: id, concept, target, layer, cosine (ema_utils.concepts.state_cosines).
    """
    import numpy as np

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

    ``table``: ema_utils.concepts.correlation_table. The expected sign is positive for the drop
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


def pvalues_by_layer(table: pd.DataFrame, layer: int | None = None, alpha: float = 0.05,
                     n_layers: int | None = None,
                     title: str = "Exact permutation p-values by layer (one-sided)"):
    """Per run and EMA measure: the raw and Holm-adjusted p-values against layer (log scale),
    with the level ``alpha`` and the smallest p-value the exact test can give."""
    import math

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
    import math

    measures = [m for m in _MEASURE_AXES if any(m in t.columns for t in ema.values())]
    runs = list(ema)
    fig, axes = plt.subplots(max(1, len(runs)), max(1, len(measures)),
                             figsize=(5.5 * max(1, len(measures)), 4 * max(1, len(runs))),
                             squeeze=False)
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
            for x, yy, c, inf in zip(merged["similarity"], shown, merged["concept"],
                                     y == float("inf")):
                if not math.isnan(yy):
                    ax.annotate(label(c) + (" (not reached)" if inf else ""), (x, yy), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
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
    return fig


def vector_agreement(table: pd.DataFrame,
                     title: str = "Do the two kinds of concept vector agree? (PCA vs difference "
                                  "of means)"):
    """Per concept, the cosine between its PCA vector and its difference-of-means vector
    against layer. ``table``: concept, layer, cosine (ema_utils.concepts.vector_agreement)."""
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
