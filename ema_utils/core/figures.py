"""Figures as the book shows them: fitted to its text column, at twice the screen resolution.

The book's column is about 740 px wide at a 1280 px window. A figure drawn 14 inches wide at
100 dpi is shrunk by half in the page, and its 8-point labels become unreadable. So every
figure a chapter displays goes through :func:`png_for_page` (installed by
ema_utils.core.notebook.start_chapter as IPython's PNG formatter of matplotlib figures): it
brings the figure to the column's width (so labels keep their size in points), lays it out
again, draws it at 2x (sharp on high-density screens and at 2x zoom) and tells the page to show
it at the column's width. Its check of the figure (axes without data, size) travels with the
image in its metadata, where the smoke-book test reads it.
"""

from __future__ import annotations

import io
import warnings

COLUMN_INCHES = 7.4
"""The book's text column at 100 dpi (about 740 px at a 1280 px window)."""
DPI = 100
RESOLUTION = 2
"""Pixels per displayed pixel in the PNG."""
PAD_INCHES = 0.1
"""The margin savefig leaves around a figure's tight bounding box."""


def fit_to_column(fig, width: float = COLUMN_INCHES) -> float:
    """Shrink a figure wider than ``width`` inches to that width and lay it out again; returns
    the factor applied (1.0 when it already fits). The height shrinks less than the width
    (by the square root of the factor) so that panels side by side do not become strips."""
    w, h = fig.get_size_inches()
    if w <= width:
        return 1.0
    factor = width / w
    fig.set_size_inches(width, h * factor ** 0.5)
    if not fig.get_constrained_layout():
        with warnings.catch_warnings():
            # a layout matplotlib cannot solve keeps the one it has, without a warning that
            # would print into the page
            warnings.simplefilter("ignore", UserWarning)
            try:
                fig.tight_layout()
            except (ValueError, RuntimeError):
                pass
    return factor


def _has_data(ax) -> bool:
    """Whether a panel draws something: a line with a finite point, a non-empty collection
    (scatter, band, heatmap), a bar, an image, a table or a note."""
    # deferred: numpy only for this check
    import numpy as np

    for line in ax.lines:
        y = np.asarray(line.get_ydata(), dtype=float)
        if y.size and np.isfinite(y).any() and not _is_reference_line(line):
            return True
    if any(len(c.get_paths()) or len(c.get_offsets()) for c in ax.collections):
        return True
    if ax.images or ax.patches or ax.tables:
        return True
    return bool([t for t in ax.texts if t.get_text().strip()])


def _is_reference_line(line) -> bool:
    """axhline/axvline (a level, a chosen layer): drawn in axes coordinates, not data."""
    return line.get_transform().contains_branch_seperately(line.axes.transData) != (True, True)


def empty_axes(fig) -> list[str]:
    """Titles (or positions) of the visible axes that draw nothing: a panel a reader would see
    as an empty frame. Colour bars and axes turned off do not count."""
    empty = []
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible() or not ax.axison or ax.get_label() == "<colorbar>":
            continue
        if not _has_data(ax):
            empty.append(ax.get_title() or f"axes {i}")
    return empty


def png_for_page(fig) -> tuple[bytes, dict]:
    """The PNG of ``fig`` for a page and its display metadata: fitted to the column, drawn at
    ``RESOLUTION`` times the displayed size; the metadata carries ``width``/``height`` (the
    displayed size) and ``ema_figure`` (the checks: empty axes, the fitting factor)."""
    factor = fit_to_column(fig)
    for _ in range(2):
        # what sticks out of the figure (a legend beside the axes) widens the saved image: make
        # room for it inside the column (0.2 in: savefig's padding around the tight box)
        tight = fig.get_tightbbox(fig.canvas.get_renderer()).width + 2 * PAD_INCHES
        width = fig.get_size_inches()[0]
        if tight <= COLUMN_INCHES + 0.01:
            break
        factor *= fit_to_column(fig, max(width - (tight - COLUMN_INCHES), 0.5 * COLUMN_INCHES))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI * RESOLUTION, bbox_inches="tight",
                pad_inches=PAD_INCHES, facecolor="white")
    data = buffer.getvalue()
    width, height = png_size(data)
    shown = min(width / RESOLUTION, COLUMN_INCHES * DPI)  # never wider than the column
    return data, {"width": round(shown), "height": round(height * shown / width),
                  "ema_figure": {"empty_axes": empty_axes(fig), "fitted": round(factor, 3)}}


def figure_png(fig, dpi: int = 100, palette: bool = False) -> bytes:
    """A figure as PNG bytes (closed afterwards, so a notebook does not also show it).

    ``palette``: store 256 colours (about a quarter of the size; plenty for a heatmap), for
    widgets that embed many images in the page."""
    # deferred: pyplot and PIL are heavy imports, needed only where figures are drawn
    import matplotlib.pyplot as plt
    # deferred: as above
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    if not palette:
        return buffer.getvalue()
    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    out = io.BytesIO()
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(out, format="PNG",
                                                                       optimize=True)
    return out.getvalue()


_LABEL_OFFSETS = ((3, 3, "left", "bottom"), (3, -3, "left", "top"), (-3, 3, "right", "bottom"),
                  (-3, -3, "right", "top"), (3, 11, "left", "bottom"), (3, -11, "left", "top"),
                  (-3, 11, "right", "bottom"), (-3, -11, "right", "top"))


def label_points(ax, points, fontsize: float = 7) -> list:
    """Write each ``(x, y, text)`` of ``points`` beside its point so that no two labels overlap
    where it can be helped: each label takes the first of eight places around its point whose
    box is clear of the labels already written (the first place when none is). Call it once the
    axes have their final size and limits (after ``tight_layout``). Returns the annotations."""
    renderer = ax.figure.canvas.get_renderer()
    placed, annotations = [], []
    for x, y, text in points:
        for dx, dy, ha, va in _LABEL_OFFSETS:
            note = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy),
                               ha=ha, va=va, fontsize=fontsize)
            box = note.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            note.remove()
        else:
            dx, dy, ha, va = _LABEL_OFFSETS[0]
            note = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy),
                               ha=ha, va=va, fontsize=fontsize)
            box = note.get_window_extent(renderer)
        placed.append(box)
        annotations.append(note)
    return annotations


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's header."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def install_page_formatter(shell=None) -> bool:
    """Make IPython display every matplotlib figure with :func:`png_for_page`; returns False
    outside IPython (a script) and changes nothing then."""
    if shell is None:
        # deferred: IPython is there only where a notebook runs
        from IPython import get_ipython

        shell = get_ipython()
    if shell is None:
        return False
    # deferred: pyplot is a heavy import, needed only where figures are shown
    import matplotlib.pyplot as plt
    # deferred: as above
    from matplotlib.figure import Figure

    # matplotlib resolves its backend at the first figure, and the inline backend then registers
    # its own PNG formatter: make that happen now, so that ours comes after it ...
    plt.close(plt.figure())
    formatter = shell.display_formatter.formatters["image/png"]
    formatter.for_type(Figure, png_for_page)
    # ... and again before every cell, should anything (%matplotlib inline) register it again
    if not getattr(shell, "_ema_page_formatter", False):
        shell.events.register("pre_run_cell",
                              lambda *args: formatter.for_type(Figure, png_for_page))
        shell._ema_page_formatter = True
    return True
