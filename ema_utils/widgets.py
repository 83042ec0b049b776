"""Widgets for the static book. They only select among precomputed content, so they work in
the HTML without a kernel (see shared notes: Tab/Accordion and jslink are client-side)."""

from __future__ import annotations

import html

import pandas as pd

from .metrics import redact
from .plots import label, ordered_concepts


def display_response(row) -> str:
    """What the book may show of a response: compliant answers to harmful prompts are redacted
    to their opening words, as the paper does; refusals and scorer answers are shown whole."""
    text = str(row.get("response", ""))
    if row.get("scorer", "refusal") == "refusal" and not row.get("is_refusal", True) \
            and row.get("concept") != "over_refusal":
        return redact(text)
    return text


def items_html(items: pd.DataFrame, max_rows: int = 12) -> str:
    """An HTML table of prompts, shown responses and verdicts."""
    rows = []
    for _, row in items.head(max_rows).iterrows():
        verdict = "aligned" if row.get("aligned", False) else "not aligned"
        rows.append("<tr><td>{}</td><td>{}</td><td>{}</td></tr>".format(
            html.escape(str(row["prompt"])[:300]), html.escape(display_response(row)), verdict))
    return ("<table><thead><tr><th>prompt</th><th>response (compliant harmful answers redacted)"
            "</th><th>verdict</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def response_browser(items: pd.DataFrame, max_rows: int = 12):
    """A Tab per concept with a table of prompts and (redacted) responses."""
    import ipywidgets as widgets

    concepts = ordered_concepts(items["concept"])
    children = [widgets.HTML(items_html(items[items["concept"] == c], max_rows)) for c in concepts]
    tabs = widgets.Tab(children=children)
    for i, concept in enumerate(concepts):
        tabs.set_title(i, label(concept))
    return tabs
