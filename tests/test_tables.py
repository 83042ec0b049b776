"""ema_utils.chapters.tables: what a page's tables show."""

import numpy as np
import pandas as pd
import pytest

from ema_utils.chapters import tables


def test_numbers_integers_negative_zeros_and_missing_values():
    assert tables.format_number(8.0) == "8" and tables.format_number(np.int64(3)) == "3"
    assert tables.format_number(-1e-13, 3) == "0.000" and tables.format_number(-0.0) == "0"
    assert tables.format_number(-0.25, 2) == "-0.25"
    assert tables.format_number(float("nan")) == "n/a" and tables.format_number(None, na="none") == "none"
    assert tables.format_number(float("inf")) == "∞" and tables.format_number("text") == "text"
    assert tables.format_number(True) == "yes" and tables.format_number(np.bool_(False)) == "no"


def test_percentages_with_intervals():
    assert tables.format_percent(0.5, 0.15, 0.85) == "50% [15, 85]"
    assert tables.format_percent(-0.001) == "0%", "no negative zero"
    assert tables.format_percent(0.25) == "25%" and tables.format_percent(None) == "n/a"


def test_tidy_formats_each_column_by_what_it_holds():
    table = pd.DataFrame({"condition": ["npo", "sft"], "rate": [0.5, np.nan], "low": [0.2, np.nan],
                          "high": [0.8, np.nan], "steps": [8.0, 16.0], "seed": [0.0, 0.0],
                          "recovery": [0.33412, -1e-15], "note": [None, "ok"]})
    shown = tables.tidy(table.set_index("condition"), percent=["rate"], intervals={"rate": ("low", "high")},
                        na={"rate": "n/a: not scored"})
    assert list(shown.columns) == ["rate", "steps", "seed", "recovery", "note"]
    assert shown.loc["npo"].tolist() == ["50% [20, 80]", "8", "0", "0.334", "n/a"]
    assert shown.loc["sft"].tolist() == ["n/a: not scored", "16", "0", "0.000", "ok"]
    text = shown.to_html()
    assert "NaN" not in text and "None" not in text and "-0.0" not in text and "8.00" not in text


def test_tidy_takes_a_series_and_names_unknown_columns():
    assert tables.tidy(pd.Series({"epochs": 2.0, "lr": 3e-5, "beta": 0.1}, name="option")) \
        .to_dict()["option"] == {"epochs": "2", "lr": "3e-05", "beta": "0.100"}
    with pytest.raises(KeyError, match="no column.*'rates'"):
        tables.tidy(pd.DataFrame({"rate": [0.1]}), percent=["rates"])


def test_tidy_keeps_a_multiindex_of_columns():
    table = pd.concat({"npo_safety": pd.DataFrame({"drop_points": [-0.0, 25.0]}, index=["a", "b"])}, axis=1)
    shown = tables.tidy(table)
    assert isinstance(shown.columns, pd.MultiIndex)
    assert shown[("npo safety", "drop points")].tolist() == ["0", "25"]
