"""ema_utils.core.figures: figures fitted to the book's column, sharp, and checked for empty panels."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from ema_utils.core import figures  # noqa: E402


def test_a_wide_figure_is_fitted_to_the_column_and_drawn_at_twice_its_size():
    fig, axes = plt.subplots(1, 2, figsize=(14, 4))
    for ax in axes:
        ax.plot([0, 1, 2], [1, 0, 1])
    data, meta = figures.png_for_page(fig)
    assert fig.get_size_inches()[0] == pytest.approx(figures.COLUMN_INCHES)
    assert fig.get_size_inches()[1] > 4 * figures.COLUMN_INCHES / 14, "the height shrinks less"
    width, height = figures.png_size(data)
    assert meta["width"] <= figures.COLUMN_INCHES * figures.DPI + 1
    assert width == pytest.approx(meta["width"] * figures.RESOLUTION, abs=2)
    assert meta["ema_figure"] == {"empty_axes": [], "fitted": pytest.approx(7.4 / 14, abs=1e-3)}
    plt.close(fig)


def test_a_narrow_figure_keeps_its_size_and_empty_panels_are_named():
    fig, axes = plt.subplots(1, 3, figsize=(6, 3))
    axes[0].bar(["a", "b"], [1, 2])
    axes[1].set_title("nothing here")
    axes[2].axis("off")  # a grid's unused cell, turned off: not a panel
    assert figures.fit_to_column(fig) == 1.0
    assert figures.empty_axes(fig) == ["nothing here"]
    plt.close(fig)


def test_the_formatter_is_what_ipython_uses_for_figures():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    assert figures.install_page_formatter(shell)
    fig, ax = plt.subplots(figsize=(12, 3))
    ax.plot([1, 2], [3, 4])
    data, meta = shell.display_formatter.format(fig)
    assert meta["image/png"]["width"] <= 741 and "ema_figure" in meta["image/png"]
    plt.close(fig)


def test_png_size_refuses_what_is_not_a_png():
    with pytest.raises(ValueError, match="not a PNG"):
        figures.png_size(b"GIF89a....")


def test_a_panel_with_only_reference_lines_or_nan_data_is_empty():
    fig, axes = plt.subplots(1, 3, figsize=(6, 3))
    axes[0].plot([1, 2], [float("nan")] * 2)
    axes[0].axhline(0.05)
    axes[0].set_title("nan only")
    axes[1].axvline(3)
    axes[1].set_title("reference only")
    axes[2].plot([4], [0.2], marker="o")  # one point is data
    assert figures.empty_axes(fig) == ["nan only", "reference only"]
    plt.close(fig)


def test_figure_png_closes_the_figure_and_a_palette_makes_it_smaller():
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.imshow([[i * j for i in range(50)] for j in range(50)])
    full = figures.figure_png(fig)
    assert not plt.fignum_exists(fig.number)
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.imshow([[i * j for i in range(50)] for j in range(50)])
    small = figures.figure_png(fig, palette=True)
    assert figures.png_size(full) == figures.png_size(small) and len(small) < len(full)


def test_a_layer_plot_without_any_rho_says_why_instead_of_an_empty_frame():
    import pandas as pd

    from ema_utils.chapters import plots

    table = pd.DataFrame({"run": ["npo_safety"] * 2, "measure": ["drop_points"] * 2,
                          "method": ["pca"] * 2, "layer": [4, 8], "rho": [float("nan")] * 2,
                          "low": [float("nan")] * 2, "high": [float("nan")] * 2,
                          "target": ["safety"] * 2, "p": [float("nan")] * 2,
                          "p_holm": [float("nan")] * 2, "n_concepts": [2, 2]})
    for draw in (plots.correlation_by_layer, plots.pvalues_by_layer):
        fig = draw(table, layer=4)
        assert figures.empty_axes(fig) == [], draw.__name__
        assert any("fewer than three concepts" in t.get_text() for t in fig.axes[0].texts)
        plt.close(fig)


def test_a_legend_beside_the_axes_still_fits_the_column():
    fig, ax = plt.subplots(figsize=(7.4, 3.8))
    ax.bar(range(7), range(7), label="this run (95% Wilson interval)")
    ax.plot(range(7), range(7), "o", label="paper: Qwen2.5-7B-Instruct")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    data, meta = figures.png_for_page(fig)
    assert meta["width"] <= figures.COLUMN_INCHES * figures.DPI
    assert figures.png_size(data)[0] <= figures.COLUMN_INCHES * figures.DPI * figures.RESOLUTION + 2
    plt.close(fig)


def test_labels_of_crowded_points_do_not_overlap():
    fig, ax = plt.subplots(figsize=(4, 3))
    xs, ys = [0.50, 0.51, 0.52, 0.50, 0.9], [0.50, 0.505, 0.51, 0.49, 0.1]
    ax.scatter(xs, ys)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    notes = figures.label_points(ax, zip(xs, ys, ["safety", "toxicity", "bias", "privacy", "alone"]))
    assert figures.label_points(ax, []) == []
    renderer = fig.canvas.get_renderer()
    boxes = [n.get_window_extent(renderer) for n in notes]
    clashes = [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert not clashes, clashes
    assert [n.get_text() for n in notes][-1] == "alone"
    plt.close(fig)


def test_fitting_a_figure_tight_layout_cannot_solve_prints_no_warning(recwarn):
    fig, axes = plt.subplots(1, 8, figsize=(20, 2))
    for ax in axes:  # (checked: tight_layout warns "Tight layout not applied" on this figure)
        ax.plot([0, 1], [0, 1])
        ax.set_ylabel("a very long label that cannot fit in a narrow panel at all, really long")
        ax.set_yticks([0, 1], ["a very long tick label here", "another very long tick label"])
    figures.fit_to_column(fig)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    plt.close(fig)
