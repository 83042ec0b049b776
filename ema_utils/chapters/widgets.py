"""Widgets for the static book. They only select among precomputed content, so they work in
the HTML without a kernel (see shared notes: Tab/Accordion and jslink are client-side)."""

from __future__ import annotations

import html

import pandas as pd

from ..core.figures import figure_png
from ..core.metrics import display_response, redact  # noqa: F401  (display_response: re-exported)
from .plots import label, ordered_concepts, similarity_heatmap


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
    # deferred: ipywidgets loads slowly; only the interactive browsers need it
    import ipywidgets as widgets

    concepts = ordered_concepts(items["concept"])
    children = [widgets.HTML(items_html(items[items["concept"] == c], max_rows)) for c in concepts]
    tabs = widgets.Tab(children=children)
    for i, concept in enumerate(concepts):
        tabs.set_title(i, label(concept))
    return tabs


def layer_browser(images: dict, description: str = "layer"):
    """A slider over precomputed PNG images, one per layer (``{layer: png bytes}``).

    The slider's ``index`` is jslinked to a Stack's ``selected_index``: both live in the
    browser, so it works in the static book without a kernel (a Python callback would not).
    """
    # deferred: ipywidgets loads slowly; only the interactive browsers need it
    import ipywidgets as widgets

    layers = sorted(images)
    if not layers:
        raise ValueError("layer_browser needs at least one image")
    pages = [widgets.Image(value=images[layer], format="png",
                           layout=widgets.Layout(max_width="640px")) for layer in layers]
    stack = widgets.Stack(children=pages, selected_index=0)
    slider = widgets.SelectionSlider(options=[str(layer) for layer in layers], value=str(layers[0]),
                                     description=description, continuous_update=True,
                                     layout=widgets.Layout(width="520px"))
    widgets.jslink((slider, "index"), (stack, "selected_index"))
    return widgets.VBox([slider, stack])


def similarity_browser(matrices_by_method: dict, titles: dict | None = None):
    """Concept-similarity heatmaps for every layer: a Tab per kind of concept vector, each with a
    layer slider (:func:`layer_browser`). ``matrices_by_method``: {method: {layer: matrix}}."""
    # deferred: ipywidgets loads slowly; only the interactive browsers need it
    import ipywidgets as widgets

    titles = titles or {}
    children, names = [], []
    for method, matrices in matrices_by_method.items():
        images = {}
        for layer, matrix in matrices.items():
            ax = similarity_heatmap(matrix, layer, title=f"{titles.get(method, method)}, layer {layer}")
            images[layer] = figure_png(ax.figure, dpi=80, palette=True)
        children.append(layer_browser(images))
        names.append(titles.get(method, method))
    tabs = widgets.Tab(children=children)
    for i, name in enumerate(names):
        tabs.set_title(i, name)
    return tabs
