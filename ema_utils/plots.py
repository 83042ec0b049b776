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
