"""Refusal rates with Wilson intervals, rate tables, the EMA flag, redaction."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ema_utils import metrics
from ema_utils.core.errors import ParameterError


@pytest.mark.parametrize("k,n,low,high", [
    (8, 10, 0.4902, 0.9433),   # textbook value of the Wilson interval
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (50, 100, 0.4038, 0.5962),
])
def test_wilson_known_values(k, n, low, high):
    r = metrics.refusal_rate([True] * k + [False] * (n - k))
    assert r["n"] == n and r["rate"] == pytest.approx(k / n)
    assert r["low"] == pytest.approx(low, abs=1e-4) and r["high"] == pytest.approx(high, abs=1e-4)


def test_refusal_rate_edge_cases():
    empty = metrics.refusal_rate([])
    assert empty["n"] == 0 and math.isnan(empty["rate"]) and math.isnan(empty["low"])
    assert metrics.refusal_rate([True, None, False, float("nan")])["n"] == 2  # unjudged left out
    assert metrics.refusal_rate([1, 0, 1, 1])["rate"] == 0.75
    with pytest.raises(ParameterError):
        metrics.refusal_rate(["yes"])


def _responses(rates: dict, n: int = 40, model: str = "m") -> pd.DataFrame:
    rows = []
    for concept, rate in rates.items():
        k = round(rate * n)
        rows += [{"model": model, "concept": concept, "is_refusal": i < k} for i in range(n)]
    return pd.DataFrame(rows)


def test_rate_table_is_tidy():
    df = pd.concat([_responses({"safety": 0.9, "bias": 0.5}, model="a"),
                    _responses({"safety": 0.2, "bias": 0.5}, model="b")])
    table = metrics.rate_table(df, by=["model", "concept"])
    assert list(table.columns) == ["model", "concept", "rate", "low", "high", "n", "k"]
    assert len(table) == 4
    row = table[(table.model == "a") & (table.concept == "safety")].iloc[0]
    assert row["rate"] == 0.9 and row["n"] == 40 and row["k"] == 36 and row["low"] < 0.9 < row["high"]
    assert list(metrics.rate_table(df[df.model == "a"]).concept) == ["bias", "safety"]
    with pytest.raises(ParameterError, match="lacks"):
        metrics.rate_table(df, by="split")


def test_ema_delta_flags_large_clear_drops_only():
    ref = metrics.rate_table(_responses({"safety": 0.95, "bias": 0.9, "privacy": 0.8,
                                         "cybersecurity": 0.9}, n=100))
    mod = metrics.rate_table(_responses({"safety": 0.40, "bias": 0.80, "privacy": 0.60,
                                         "cybersecurity": 0.05}, n=100))
    out = metrics.ema_delta(ref, mod, concept="cybersecurity").set_index("concept")
    assert out.loc["safety", "delta"] == pytest.approx(-0.55)
    assert bool(out.loc["safety", "flagged"])             # 55-point drop, intervals apart
    assert not out.loc["bias", "flagged"]                 # 10 points: under the threshold
    assert bool(out.loc["privacy", "flagged"])            # 20 points, n=100: intervals apart
    assert not out.loc["cybersecurity", "flagged"] and out.loc["cybersecurity", "is_target"]
    # the same 20-point drop on 10 prompts: intervals overlap, so not flagged
    small = metrics.ema_delta(metrics.rate_table(_responses({"privacy": 0.8}, n=10)),
                              metrics.rate_table(_responses({"privacy": 0.6}, n=10)))
    assert small.loc[0, "overlap"] and not small.loc[0, "flagged"]
    # a rise is never flagged; dict input as printed by `ema eval --json`
    up = metrics.ema_delta({"bias": {"rate": 0.1, "low": 0.05, "high": 0.15, "n": 100}},
                           {"bias": {"rate": 0.9, "low": 0.85, "high": 0.95, "n": 100}})
    assert up.loc[0, "delta"] == pytest.approx(0.8) and not up.loc[0, "flagged"]
    with pytest.raises(ParameterError, match="fraction"):
        metrics.ema_delta(ref, mod, threshold=15)


def test_redact():
    text = "Step one: gather the following materials and then carefully\n\n```python\nimport os\n```"
    assert metrics.redact(text) == "Step one: gather the following materials and then [...]"
    assert metrics.redact(text, n_words=2) == "Step one: [...]"
    assert metrics.redact("") == "[...]" and metrics.redact(None) == "[...]"
    assert metrics.redact("Short answer") == "Short answer [...]"
