"""The rank-correlation test of chapter 5: Spearman's rho across concepts, its exact permutation
p-value, Holm's correction across layers and a bootstrap percentile interval, layer by layer.

Plain statistics on arrays and tables: :func:`ema_utils.chapters.concepts.correlation_table` feeds it the
similarities to the target (observed and bootstrapped) and the EMA measured in chapters 2-3.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..core.errors import ParameterError


def _ranks(values: np.ndarray) -> np.ndarray:
    # deferred: scipy.stats is slow to import; only the rank test needs it
    from scipy.stats import rankdata

    return rankdata(values, axis=-1)


def spearman_permutation(x: Sequence[float], y: Sequence[float], alternative: str = "greater",
                         n_perm: int = 20000, seed: int = 0) -> tuple[float, float]:
    """``(rho, p)``: Spearman's rho of ``x`` and ``y`` (scipy.stats.spearmanr) and its
    permutation p-value, exact over all n! orderings of ``y`` when n <= 8, else from ``n_perm``
    random ones. ``alternative``: "greater" (p = share of orderings with rho >= the observed),
    "less", or "two-sided" (|rho| >= |observed|). NaN pairs are dropped; fewer than three
    pairs, or a constant variable, give ``(nan, nan)``. Ties get average ranks (the exact test
    then permutes the tied values too, which is the correct conditional test)."""
    # deferred: scipy.stats is slow to import; only the rank test needs it
    from scipy.stats import spearmanr

    if alternative not in ("greater", "less", "two-sided"):
        raise ParameterError(f"alternative must be greater, less or two-sided, got {alternative!r}")
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = len(x)
    if n < 3 or np.unique(x).size < 2 or np.unique(y).size < 2:
        return float("nan"), float("nan")
    rho = float(spearmanr(x, y).statistic)
    rx, ry = _ranks(x), _ranks(y)
    if n <= 8:
        perms = np.array(list(itertools.permutations(range(n))))
    else:
        rng = np.random.default_rng(seed)
        perms = np.array([rng.permutation(n) for _ in range(n_perm)])
    rp = ry[perms]
    cx = rx - rx.mean()
    cp = rp - rp.mean(axis=1, keepdims=True)
    null = (cp @ cx) / (np.linalg.norm(cp, axis=1) * np.linalg.norm(cx))
    tol = 1e-12
    if alternative == "greater":
        p = np.mean(null >= rho - tol)
    elif alternative == "less":
        p = np.mean(null <= rho + tol)
    else:
        p = np.mean(np.abs(null) >= abs(rho) - tol)
    if n > 8:  # a random sample of orderings: never report p = 0
        p = (p * len(perms) + 1) / (len(perms) + 1)
    return rho, float(p)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment (NaN entries stay NaN and are not counted)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out


def correlation_by_layer(observed: pd.DataFrame, boot: np.ndarray | None, ema: pd.Series,
                         alternative: str = "greater", ci: float = 0.95) -> pd.DataFrame:
    """Per layer: Spearman's rho between similarity and EMA across concepts, its bootstrap
    percentile interval and its exact permutation p-value (raw and Holm-adjusted over layers).

    ``observed``: layers x concepts (similarities); ``boot``: (layers, n_boot, concepts) in the
    same order, or None; ``ema``: one value per concept (NaN: not measured, left out).
    """
    ema = ema.reindex(observed.columns).astype(float)
    rows = []
    for li, layer in enumerate(observed.index):
        rho, p = spearman_permutation(observed.loc[layer].to_numpy(), ema.to_numpy(), alternative)
        low = high = float("nan")
        if boot is not None:
            rhos = [_rho(b, ema.to_numpy()) for b in boot[li]]
            rhos = np.array([r for r in rhos if not math.isnan(r)])
            if len(rhos):
                low, high = np.quantile(rhos, [(1 - ci) / 2, 1 - (1 - ci) / 2])
        rows.append({"layer": int(layer), "rho": rho, "low": float(low), "high": float(high),
                     "p": p, "n_concepts": int((~ema.isna()).sum()), "alternative": alternative})
    table = pd.DataFrame(rows)
    table["p_holm"] = holm(table["p"].to_numpy())
    return table


def _rho(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.unique(x).size < 2 or np.unique(y).size < 2:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


__all__ = ["spearman_permutation", "holm", "correlation_by_layer"]
