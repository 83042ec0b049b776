"""Tables as a page shows them: one formatter for every table the chapters display.

A DataFrame printed as it is shows what a reader should never have to decode: NaN and None,
counts as ``8.00``, negative zeros (``-0.000``), fractions beside percentages. :func:`tidy`
returns the same table as text: integers as integers, rates as percentages (with their
interval in one cell where the table has one), other numbers to a fixed number of decimals,
no negative zero, and a missing value as "n/a" or a reason given by the chapter.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

NA = "n/a"


def _missing(value) -> bool:
    if value is None or value is pd.NA:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _no_negative_zero(text: str) -> str:
    """"-0", "-0.0", "-0.000", "-0%" -> the same without the sign."""
    digits = text.lstrip("-").rstrip("%")
    if text.startswith("-") and digits.replace(".", "").strip("0") == "":
        return text[1:]
    return text


def format_number(value, digits: int = 3, na: str = NA) -> str:
    """One value as a page shows it: integers without decimals, other numbers with ``digits``
    decimals, no negative zero, a missing value as ``na``, booleans as yes/no, text as it is."""
    if _missing(value):
        return na
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if not isinstance(value, numbers.Real):
        return str(value)
    number = float(value)
    if math.isinf(number):
        return "∞" if number > 0 else "−∞"
    if number.is_integer():
        return _no_negative_zero(f"{int(number)}")
    if abs(number) < 0.5 * 10 ** -digits and abs(number) >= 1e-9:
        return f"{number:.2g}"  # a learning rate (3e-05) is not zero
    return _no_negative_zero(f"{number:.{digits}f}")


def format_percent(rate, low=None, high=None, digits: int = 0, na: str = NA) -> str:
    """A rate in [0, 1] as a percentage, with its interval when both ends are given:
    ``0.5, 0.15, 0.85`` -> ``"50% [15, 85]"``."""
    if _missing(rate):
        return na
    text = _no_negative_zero(f"{100 * float(rate):.{digits}f}") + "%"
    if low is not None and high is not None and not _missing(low) and not _missing(high):
        lo = _no_negative_zero(f"{100 * float(low):.{digits}f}")
        hi = _no_negative_zero(f"{100 * float(high):.{digits}f}")
        text += f" [{lo}, {hi}]"
    return text


def _integral(column: pd.Series) -> bool:
    values = [v for v in column if not _missing(v)]
    return bool(values) and all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                and float(v).is_integer() for v in values)


def tidy(table, percent: Iterable[str] = (), intervals: Mapping[str, tuple[str, str]] | None = None,
         digits: int = 3, na: str | Mapping[str, str] = NA) -> pd.DataFrame:
    """``table`` (a DataFrame or Series) as text for a page.

    - ``percent``: columns holding rates in [0, 1], shown as percentages.
    - ``intervals``: ``{column: (low column, high column)}``; the interval joins its column's
      cell ("33% [10, 50]" or "0.334 [0.100, 0.500]") and its two columns go.
    - ``digits``: decimals of the other non-integer numbers; a column whose values are all
      whole numbers shows integers.
    - ``na``: what a missing value says, for the whole table or per column (a reason such as
      "n/a: nothing was lost" is better than a bare n/a).

    Column labels read with spaces for underscores ("sensitive content"), so headers wrap.
    """
    frame = table.to_frame() if isinstance(table, pd.Series) else table.copy()
    percent, intervals = set(percent), dict(intervals or {})
    unknown = (percent | set(intervals) | {c for pair in intervals.values() for c in pair}) - set(frame.columns)
    if unknown:
        raise KeyError(f"tidy: no column(s) {sorted(map(str, unknown))} in the table; its columns: "
                       f"{[str(c) for c in frame.columns]}")
    missing_text = (lambda col: na.get(col, NA)) if isinstance(na, Mapping) else (lambda col: na)
    out: dict = {}
    dropped = {c for pair in intervals.values() for c in pair}
    for col in frame.columns:
        if col in dropped:
            continue
        values, text_na = frame[col], missing_text(col)
        low, high = intervals.get(col, (None, None))
        if col in percent:
            out[col] = [format_percent(v, frame[low].iloc[i] if low else None,
                                       frame[high].iloc[i] if high else None, na=text_na)
                        for i, v in enumerate(values)]
        elif low:
            out[col] = [text_na if _missing(v) else
                        f"{format_number(v, digits)} [{format_number(frame[low].iloc[i], digits)}, "
                        f"{format_number(frame[high].iloc[i], digits)}]"
                        for i, v in enumerate(values)]
        else:
            d = 0 if _integral(values) else digits
            out[col] = [format_number(v, d, text_na) for v in values]
    shown = pd.DataFrame(out, index=frame.index)  # tuple keys keep a MultiIndex of columns
    shown.columns.names = frame.columns.names
    # "sensitive_content" -> "sensitive content": a header can then wrap between words
    return shown.rename(columns=lambda c: c.replace("_", " ") if isinstance(c, str) else c)
