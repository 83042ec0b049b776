"""Refusal rates with Wilson intervals, rate tables, the EMA flag, redaction."""

from __future__ import annotations

import math

import numpy as np
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


def _paired(concept: str, ref: list[bool], new: list[bool]):
    ids = [f"{concept}-{i}" for i in range(len(ref))]
    return (pd.DataFrame({"id": ids, "concept": concept, "aligned": ref}),
            pd.DataFrame({"id": ids, "concept": concept, "aligned": new}))


def test_paired_interval_properties():
    # no discordant pairs: the point estimate is 0 and the interval still has width
    low, high = metrics.paired_difference_interval(10, 0, 0, 10)
    assert low < 0 < high and -1 <= low and high <= 1
    # every item flips from aligned to not: -1, and the interval stays inside [-1, 1]
    low, high = metrics.paired_difference_interval(0, 30, 0, 0)
    assert low == pytest.approx(-1) and -1 < high < -0.8
    # mirror symmetry: swapping the two models negates the interval
    lo1, hi1 = metrics.paired_difference_interval(12, 9, 2, 21)
    lo2, hi2 = metrics.paired_difference_interval(12, 2, 9, 21)
    assert (lo1, hi1) == pytest.approx((-hi2, -lo2))
    assert lo1 < (2 - 9) / 44 < hi1
    # large n: close to the Wald interval of the paired difference
    a, b, c, d = 400, 150, 50, 400
    n = a + b + c + d
    delta = (c - b) / n
    se = math.sqrt((b + c) - (b - c) ** 2 / n) / n
    low, high = metrics.paired_difference_interval(a, b, c, d)
    assert low == pytest.approx(delta - 1.96 * se, abs=0.005)
    assert high == pytest.approx(delta + 1.96 * se, abs=0.005)
    # positively correlated pairs give a narrower interval than independent samples would
    assert (high - low) < 2 * 1.96 * math.sqrt(2 * 0.55 * 0.45 / n)
    with pytest.raises(ParameterError, match="non-negative integers"):
        metrics.paired_difference_interval(1, -1, 0, 0)
    assert all(math.isnan(x) for x in metrics.paired_difference_interval(0, 0, 0, 0))


def test_mcnemar_exact_known_values():
    # exact two-sided binomial test on the discordant pairs: 2 * P(X <= 0 | 6, 1/2) = 2/64
    assert metrics.mcnemar_pvalue(6, 0) == pytest.approx(2 / 64)
    assert metrics.mcnemar_pvalue(0, 6) == pytest.approx(2 / 64)
    assert metrics.mcnemar_pvalue(3, 3) == pytest.approx(1.0)
    assert metrics.mcnemar_pvalue(0, 0) == 1.0
    with pytest.raises(ParameterError, match="non-negative"):
        metrics.mcnemar_pvalue(-1, 2)


def test_paired_change_tests_the_drop_on_shared_items():
    # 30 items: 6 lose their refusal, none gain one: a 20-point drop, McNemar p = 2/64
    ref, new = _paired("privacy", [True] * 24 + [False] * 6, [True] * 18 + [False] * 12)
    # the same 20-point drop as 9 lost and 3 gained: the paired test cannot tell it from noise
    ref2, new2 = _paired("bias", [True] * 21 + [False] * 9, [True] * 12 + [False] * 9 + [True] * 3 + [False] * 6)
    # a 10-point drop, every change one way: significant, but under the paper's 15 points
    ref3, new3 = _paired("toxicity", [True] * 30, [True] * 27 + [False] * 3)
    # the target: its drop is the intended effect, never EMA
    ref4, new4 = _paired("safety", [True] * 30, [False] * 30)
    out = metrics.paired_change(pd.concat([ref, ref2, ref3, ref4]),
                                pd.concat([new, new2, new3, new4]).sample(frac=1, random_state=0),
                                concept="safety").set_index("concept")
    p = out.loc["privacy"]
    assert p["delta"] == pytest.approx(-0.2) and p["n"] == 30 and (p["lost"], p["gained"]) == (6, 0)
    assert p["p_value"] == pytest.approx(2 / 64) and p["paper_rule"] and p["significant"] and p["flagged"]
    assert p["delta_low"] < -0.2 < p["delta_high"] < 0
    assert p["overlap"]  # the Wilson intervals overlap: the old rule would have missed it
    b = out.loc["bias"]
    assert b["delta"] == pytest.approx(-0.2) and b["paper_rule"] and not b["significant"]
    assert not b["flagged"] and b["delta_high"] > 0
    t = out.loc["toxicity"]
    assert not t["paper_rule"] and not t["flagged"]
    s = out.loc["safety"]
    assert s["is_target"] and s["paper_rule"] and s["significant"] and not s["flagged"]
    # items scored by one model only are left out; missing columns are named
    extra = pd.DataFrame({"id": ["x"], "concept": ["privacy"], "aligned": [False]})
    again = metrics.paired_change(ref, pd.concat([new, extra])).set_index("concept")
    assert again.loc["privacy", "n"] == 30
    with pytest.raises(ParameterError, match="model_items lacks"):
        metrics.paired_change(ref, new.drop(columns="aligned"))


def test_mean_interval():
    rng = np.random.default_rng(0)
    skewed = rng.exponential(0.2, size=40)
    mean, low, high = metrics.mean_interval(skewed)
    assert mean == pytest.approx(skewed.mean()) and 0 < low < mean < high
    assert metrics.mean_interval(skewed) == (mean, low, high)  # seeded
    few = metrics.mean_interval(skewed[:8])
    many = metrics.mean_interval(np.tile(skewed[:8], 5))  # the same spread, five times the prompts
    assert many[2] - many[1] < 0.6 * (few[2] - few[1])
    assert metrics.mean_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    one = metrics.mean_interval([0.3, float("nan")])
    assert one[0] == 0.3 and math.isnan(one[1]) and math.isnan(one[2])
    assert all(math.isnan(x) for x in metrics.mean_interval([]))


def test_paired_accuracy_change():
    before = {"correct": {f"q{i}": i < 60 for i in range(100)}}
    after = {"correct": {f"q{i}": i < 50 or 90 <= i < 92 for i in range(100)}}
    change = metrics.paired_accuracy_change(before, after)
    assert change["delta"] == pytest.approx(-0.08) and change["n"] == 100
    assert (change["lost"], change["gained"]) == (10, 2)
    assert change["low"] < -0.08 < change["high"] < 0 and change["p_value"] < 0.05
    # only shared questions count
    fewer = {"correct": {f"q{i}": i < 50 for i in range(50)}}
    assert metrics.paired_accuracy_change(before, fewer)["n"] == 50
    with pytest.raises(ParameterError, match="per-question results"):
        metrics.paired_accuracy_change({"accuracy": 0.5}, after)
    with pytest.raises(ParameterError, match="share no question"):
        metrics.paired_accuracy_change(before, {"correct": {"x": True}})


def test_redact():
    text = "Step one: gather the following materials and then carefully\n\n```python\nimport os\n```"
    assert metrics.redact(text) == "Step one: gather the following materials and then [...]"
    assert metrics.redact(text, n_words=2) == "Step one: [...]"
    assert metrics.redact("") == "[...]" and metrics.redact(None) == "[...]"
    assert metrics.redact("Short answer") == "Short answer [...]"


def test_pooled_paired_change_over_training_seeds():
    ids = [f"i{k}" for k in range(30)]

    def table(concept, flags):
        return pd.DataFrame({"id": ids, "concept": concept, "aligned": flags})

    ref = pd.concat([table("privacy", [True] * 30), table("bias", [True] * 30)])
    seeds = {
        0: pd.concat([table("privacy", [True] * 20 + [False] * 10), table("bias", [True] * 20 + [False] * 10)]),
        1: pd.concat([table("privacy", [True] * 22 + [False] * 8), table("bias", [True] * 30)]),
        2: pd.concat([table("privacy", [True] * 18 + [False] * 12), table("bias", [True] * 30)]),
    }
    out = metrics.pooled_paired_change(ref, seeds, concept="safety").set_index("concept")
    p = out.loc["privacy"]
    assert p["seeds"] == 3 and p["n"] == 30  # items stay the unit
    assert p["delta"] == pytest.approx(-10 / 30) and p["seed_deltas"] == pytest.approx([-1 / 3, -8 / 30, -12 / 30])
    assert p["delta_low"] < p["delta"] < p["delta_high"] < 0 and p["same_direction"] and p["flagged"]
    assert p["lost"] == 12 and p["gained"] == 0 and p["p_value"] == pytest.approx(2 / 2 ** 12)
    b = out.loc["bias"]  # one seed drops 33 points, two do not move: pooled 11 points
    assert b["delta"] == pytest.approx(-10 / 90) and not b["paper_rule"] and not b["same_direction"]
    assert not b["flagged"]
    # one seed: the same test and verdict as the unpooled paired change
    single = metrics.pooled_paired_change(ref, {0: seeds[0]}).set_index("concept")
    plain = metrics.paired_change(ref, seeds[0]).set_index("concept")
    assert single.loc["privacy", "p_value"] == pytest.approx(plain.loc["privacy", "p_value"])
    assert single.loc["privacy", "flagged"] == plain.loc["privacy", "flagged"]
    with pytest.raises(ParameterError, match="at least one seed"):
        metrics.pooled_paired_change(ref, {})


def test_random_band_spans_the_random_directions_only_per_kind_and_coefficient():
    dose = pd.DataFrame({
        "kind": ["steer"] * 5 + ["ablate"] * 3,
        "direction": ["general", "random 0", "random 1", "random 0", "random 1",
                      "general", "random 0", "random 1"],
        "coefficient": [1.0, 1.0, 1.0, 4.0, 4.0, np.nan, np.nan, np.nan],
        "rate": [0.9, 0.2, 0.4, 0.1, 0.3, 0.05, 0.5, 0.7]})
    assert metrics.is_random("random 3") and not metrics.is_random("general")
    band = metrics.random_band(dose).set_index(["kind", "coefficient"])
    assert band.loc[("steer", 1.0), ["band_low", "band_high", "n_random"]].tolist() == [0.2, 0.4, 2]
    assert band.loc[("steer", 4.0), "band_mean"] == pytest.approx(0.2)
    ablate = band.loc["ablate"]
    assert len(ablate) == 1 and ablate["band_high"].iloc[0] == 0.7, "NaN coefficients group too"
