"""Efficiency and stability of a LoRA adapter (chapter 6): the two measures by which Soligo et
al. (../shared/paper/soligo2026.md) tell the general solution from the narrow one.

Each is taken on the LoRA adapter of a solution (:class:`ema_utils.chapters.narrow.Solution`)
loaded onto the aligned model:

- **efficiency** (:func:`efficiency_sweep`): every LoRA update ``s * B @ A`` scaled by a factor
  (:func:`scaled_adapter`, scaling the B matrices) or to common total norms
  (:func:`adapter_at_norm`); the forget loss (:class:`ForgetLoss`: the NPO loss of the forget
  set against the aligned model, and the refusals' per-token NLL) at each;
- **stability** (:func:`stability_sweep`): each LoRA matrix perturbed with orthogonal noise of
  its own norm, ``x' = sqrt(1 - eps^2) x + eps y`` (:func:`orthogonal_perturbation`), several
  seeds; reported as the relative loss increase ``(L_pert - L_orig) / (L_base - L_orig)``
  (:func:`relative_increase`), L_base being the loss with the adapter disabled.

:func:`efficiency_verdict` and :func:`stability_verdict` judge the claims "general is more
efficient" and "general is more stable" from the two sweeps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.console import progress_bar
from ..core.errors import ParameterError
from ..core.generation import length_sorted_batches
from ..methods import losses as L
from ..methods.interventions import with_checkpoint
from ..methods.trainer import _pad_id, collate, encode_examples

EMA_POINTS = 0.15
"""A change of more than 15 points counts (the paper's EMA threshold), for the verdicts."""


@dataclass
class Solution:
    """One LoRA adapter to analyse: where it is, which step, and what it was trained with."""

    role: str  # "general" or "narrow"
    condition: str  # e.g. "npo_safety", "npo_kl_1to1_lambda10_safety"
    step: int
    path: Path  # the checkpoint folder (adapter_config.json, adapter_model.safetensors)
    config: dict = field(default_factory=dict)  # the UnlearnConfig it was trained with
    note: str = ""

    @property
    def beta(self) -> float:
        return float(self.config.get("beta", 0.1))

    def to_json(self) -> dict:
        return {"role": self.role, "condition": self.condition, "step": self.step,
                "path": str(self.path), "beta": self.beta,
                "kl_lambda": self.config.get("kl_lambda") if self.config.get("method") == "npo_kl"
                else None, "note": self.note}

STABILITY_MARGIN = 0.05
"""The narrow solution counts as less stable when its relative loss increase (averaged over eps)
exceeds the general one's by more than this (5% of the adapter's effect on the loss)."""


# --- LoRA adapters: norms, scaling, perturbation -------------------------------------------------

def lora_layers(model) -> list[tuple[str, object, str]]:
    """``(module name, LoRA layer, adapter name)`` of every active LoRA layer, in module order."""
    # deferred: peft is heavy; only needed once an adapter is measured
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    found.append((name, module, adapter))
    if not found:
        raise ParameterError("the model carries no LoRA adapter; load one with "
                             "ema_utils.methods.interventions.with_checkpoint(model, path)")
    return found


def _update_sq_norm(module, adapter) -> float:
    """||s * B @ A||_F^2 without forming the product: s^2 * sum((B^T B) * (A A^T))."""
    a = module.lora_A[adapter].weight.detach().double()
    b = module.lora_B[adapter].weight.detach().double()
    s = float(module.scaling[adapter])
    return float(s * s * ((b.T @ b) * (a @ a.T)).sum())


def adapter_norm(model) -> float:
    """The adapter's size: the Frobenius norm of all LoRA updates together,
    sqrt(sum over layers of ||s * B @ A||_F^2), with s = alpha / r peft's scaling (so it is the
    norm of the change the adapter makes to the weights)."""
    return math.sqrt(sum(_update_sq_norm(m, a) for _, m, a in lora_layers(model)))


def layer_norms(model) -> pd.DataFrame:
    """Per LoRA layer: module, ||s * B @ A||_F."""
    return pd.DataFrame([{"module": n, "norm": math.sqrt(_update_sq_norm(m, a))}
                         for n, m, a in lora_layers(model)])


@contextlib.contextmanager
def _restored(tensors: Sequence[torch.Tensor]):
    """Within: change ``tensors`` in place as you like; afterwards they are exactly as before."""
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)


@contextlib.contextmanager
def scaled_adapter(model, factor: float):
    """Within: every LoRA update B @ A multiplied by ``factor`` (the B matrices are scaled, so
    the total norm is ``|factor|`` times the adapter's); the weights are restored exactly
    afterwards. Factor 0 is the aligned model, 1 the adapter as trained."""
    if not isinstance(factor, (int, float, np.floating)) or isinstance(factor, bool) \
            or not math.isfinite(factor):
        raise ParameterError(f"factor must be a finite number, got {factor!r}")
    weights = [m.lora_B[a].weight for _, m, a in lora_layers(model)]
    with _restored(weights):
        with torch.no_grad():
            for w in weights:
                w.mul_(float(factor))
        yield model


def adapter_at_norm(model, norm: float):
    """:func:`scaled_adapter` with the factor that gives the adapter a total norm of ``norm``."""
    if not isinstance(norm, (int, float, np.floating)) or not norm >= 0:
        raise ParameterError(f"norm must be a number >= 0, got {norm!r}")
    current = adapter_norm(model)
    if current == 0:
        raise ParameterError("the adapter's update is zero: it cannot be scaled to a norm")
    return scaled_adapter(model, float(norm) / current)


def orthogonal_noise(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise with ``x``'s shape, made orthogonal to ``x`` (as one flattened vector) and
    rescaled to ``x``'s Frobenius norm. Computed in float64; returned in float64. A zero ``x``
    gives zero noise."""
    x64 = x.detach().double().flatten()
    y = torch.randn(x64.shape, generator=generator, dtype=torch.float64, device="cpu")
    y = y.to(x64.device)
    xx = float(x64 @ x64)
    if xx == 0:
        return torch.zeros_like(x64).reshape(x.shape)
    y = y - (float(y @ x64) / xx) * x64
    y = y * (math.sqrt(xx) / float(y.norm()))
    return y.reshape(x.shape)


def orthogonal_perturbation(x: torch.Tensor, eps: float,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """``sqrt(1 - eps^2) x + eps y`` with y = :func:`orthogonal_noise` (y orthogonal to x,
    ||y|| = ||x||), so the result has x's norm and makes an angle arcsin(eps) with it.
    ``eps`` in [0, 1]; 0 returns x unchanged. Returned in x's dtype."""
    if not isinstance(eps, (int, float, np.floating)) or isinstance(eps, bool) or not 0 <= eps <= 1:
        raise ParameterError(f"eps must be a number in [0, 1], got {eps!r}")
    if eps == 0:
        return x.detach().clone()
    y = orthogonal_noise(x, generator)
    out = math.sqrt(1 - eps * eps) * x.detach().double() + eps * y
    return out.to(x.dtype)


@contextlib.contextmanager
def perturbed_adapter(model, eps: float, seed: int = 0):
    """Within: every LoRA matrix (each A and each B) replaced by its
    :func:`orthogonal_perturbation` (noise drawn from ``seed``, matrix by matrix in module
    order, so the same seed gives the same draws for two adapters of the same shapes); the
    weights are restored exactly afterwards."""
    weights = [w for _, m, a in lora_layers(model)
               for w in (m.lora_A[a].weight, m.lora_B[a].weight)]
    generator = torch.Generator().manual_seed(int(seed))
    with _restored(weights):
        with torch.no_grad():
            for w in weights:
                w.copy_(orthogonal_perturbation(w, eps, generator))
        yield model


@contextlib.contextmanager
def adapter_disabled(model):
    """The aligned model: the adapter switched off (a model without one is returned as is)."""
    disable = getattr(model, "disable_adapter", None)
    if callable(disable):
        with disable():
            yield model
    else:
        yield model


# --- the forget loss ----------------------------------------------------------------------------

def _forward_logprobs(model, examples, pad_id: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    logp = np.zeros(len(examples), dtype=np.float64)
    n_tok = np.zeros(len(examples), dtype=np.int64)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for idx in length_sorted_batches([len(e["input_ids"]) for e in examples], batch_size):
                batch = collate([examples[i] for i in idx], pad_id, device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
                tok, mask = L.token_logprobs(logits, batch["labels"])
                logp[idx] = tok.sum(dim=1).double().cpu().numpy()
                n_tok[idx] = mask.sum(dim=1).cpu().numpy()
    finally:
        model.train(was)
    return logp, n_tok


class ForgetLoss:
    """The forget loss of a model on a fixed forget set, against the aligned model.

    ``ForgetLoss(model, tokenizer, forget, beta)`` computes the aligned model's log-probs of the
    forget responses once (with ``model``'s adapter disabled); calling it on a model (normally
    the same one, scaled or perturbed) returns

    - ``npo``: the NPO loss (the paper's Eq. 1, ema_utils.methods.losses.npo_loss), the forget term
      both solutions were trained on: (2/beta) log 2 for the aligned model, lower when the
      refusals became less likely;
    - ``nll``: the refusals' mean negative log-likelihood per response token (higher = more
      unlearned);
    - ``logp``: the mean sequence log-prob of the refusals.
    """

    def __init__(self, model, tokenizer, forget: pd.DataFrame, beta: float, batch_size: int = 8):
        if not beta > 0:
            raise ParameterError(f"beta must be positive, got {beta}")
        self.examples = encode_examples(tokenizer, forget)
        self.pad_id = _pad_id(tokenizer)
        self.beta, self.batch_size = float(beta), int(batch_size)
        with adapter_disabled(model):
            self.ref_logp, self.n_tokens = _forward_logprobs(model, self.examples, self.pad_id,
                                                             self.batch_size)

    def __len__(self) -> int:
        return len(self.examples)

    def from_logprobs(self, logp: np.ndarray) -> dict:
        npo = L.npo_loss(torch.as_tensor(logp), torch.as_tensor(self.ref_logp), self.beta)
        return {"npo": float(npo), "nll": float(-logp.sum() / max(int(self.n_tokens.sum()), 1)),
                "logp": float(logp.mean())}

    def __call__(self, model) -> dict:
        logp, _ = _forward_logprobs(model, self.examples, self.pad_id, self.batch_size)
        return self.from_logprobs(logp)

    def base(self) -> dict:
        """The loss of the aligned model (adapter disabled), without a forward pass."""
        return self.from_logprobs(self.ref_logp)


def _bar(total: int, desc: str, progress: bool):
    return progress_bar(total=total, desc=desc, unit="eval", disable=not progress)


def check_numbers(values, name: str, low: float | None = None, high: float | None = None) -> list:
    """``values`` (a number or a sequence of them) as a list of floats; ParameterError naming
    ``name`` when one is not a finite number within [``low``, ``high``]."""
    if isinstance(values, (int, float)):
        values = [values]
    values = list(values or [])
    for v in values:
        ok = isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or (low is not None and v < low) or (high is not None and v > high):
            bounds = f" in [{low}, {high}]" if high is not None else (f" >= {low}" if low is not None else "")
            raise ParameterError(f"{name} must hold numbers{bounds}; got {v!r}")
    return [float(v) for v in values]


def efficiency_sweep(model, loss: ForgetLoss, scales=(0, 0.5, 1, 1.5, 2), target_norms=(),
                     progress: bool = True) -> pd.DataFrame:
    """The forget loss of ``model``'s adapter scaled by each factor of ``scales`` and scaled to
    each total norm of ``target_norms``.

    Returns one row per point: kind ("factor" or "norm"), scale (the factor applied), norm (the
    adapter's total norm there, measured), npo, nll, logp.
    """
    scales = check_numbers(scales, "scales", low=0)
    target_norms = check_numbers(target_norms, "target_norms", low=0)
    native = adapter_norm(model)
    if native == 0 and target_norms:
        raise ParameterError("the adapter's update is zero: it cannot be scaled to a norm")
    points = [("factor", s) for s in scales] + [("norm", n / native) for n in target_norms]
    rows = []
    bar = _bar(len(points), "efficiency", progress)
    for kind, factor in points:
        with scaled_adapter(model, factor):
            rows.append({"kind": kind, "scale": factor, "norm": adapter_norm(model), **loss(model)})
        bar.update(1)
    bar.close()
    return pd.DataFrame(rows, columns=["kind", "scale", "norm", "npo", "nll", "logp"])


def stability_sweep(model, loss: ForgetLoss, eps_values=(0.01, 0.1, 0.3, 1.0), seeds=(0, 1, 2),
                    progress: bool = True) -> pd.DataFrame:
    """The forget loss of ``model``'s adapter under orthogonal noise (:func:`perturbed_adapter`)
    at every ``eps`` and seed. One row per point: eps, seed, npo, nll, logp."""
    eps_values = check_numbers(eps_values, "eps_values", low=0, high=1)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ParameterError("seeds must hold at least one seed (n_seeds >= 1)")
    rows = []
    bar = _bar(len(eps_values) * len(seeds), "stability", progress)
    for eps in eps_values:
        for seed in seeds:
            with perturbed_adapter(model, eps, seed):
                rows.append({"eps": eps, "seed": seed, **loss(model)})
            bar.update(1)
    bar.close()
    return pd.DataFrame(rows, columns=["eps", "seed", "npo", "nll", "logp"])


def relative_increase(l_pert, l_orig, l_base, min_gap: float = 1e-9):
    """(L_pert - L_orig) / (L_base - L_orig): 0 = the perturbation changed nothing, 1 = as bad
    as no adapter at all. NaN where L_base - L_orig <= ``min_gap`` (the adapter did not lower
    the loss, so there is nothing to lose). Works on numbers and arrays."""
    den = np.asarray(l_base, dtype=float) - np.asarray(l_orig, dtype=float)
    num = np.asarray(l_pert, dtype=float) - np.asarray(l_orig, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > min_gap, num / np.where(den > min_gap, den, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out


def seed_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` over seeds with a Student-t interval (NaN
    bounds with fewer than two finite values)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan"), float("nan")
    # deferred: scipy is heavy and only needed for the interval
    from scipy import stats

    half = float(stats.t.ppf((1 + confidence) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


def stability_summary(table: pd.DataFrame, orig: dict, base: dict, measure: str = "npo",
                      confidence: float = 0.95) -> pd.DataFrame:
    """Per eps: the relative loss increase over seeds, mean with a t-interval.

    ``table``: :func:`stability_sweep`'s rows (optionally with a ``solution`` column, then one
    row per solution and eps, and ``orig`` / ``base`` are ``{solution: loss dict}``); ``orig``:
    the unperturbed adapter's loss; ``base``: the adapter disabled. For ``nll`` (higher = more
    unlearned) the same formula applies: the perturbed model's NLL falls back towards the base.
    Columns: [solution,] eps, mean, low, high, n, and the raw relative increases per seed in
    ``table`` as column ``relative`` (added to a copy returned as ``.attrs["per_seed"]``).
    """
    has_solution = "solution" in table.columns
    parts, per_seed = [], []
    groups = table.groupby("solution", sort=False) if has_solution else [(None, table)]
    for solution, rows in groups:
        o = orig[solution] if has_solution else orig
        b = base[solution] if has_solution else base
        rel = relative_increase(rows[measure].to_numpy(), o[measure], b[measure])
        rows = rows.assign(relative=rel)
        per_seed.append(rows)
        for eps, part in rows.groupby("eps", sort=True):
            mean, low, high = seed_interval(part["relative"], confidence)
            parts.append({**({"solution": solution} if has_solution else {}), "eps": eps,
                          "mean": mean, "low": low, "high": high,
                          "n": int(np.isfinite(part["relative"]).sum())})
    out = pd.DataFrame(parts)
    out.attrs["per_seed"] = pd.concat(per_seed, ignore_index=True) if per_seed else pd.DataFrame()
    return out


def measure_solution(model, tokenizer, solution, forget: pd.DataFrame, scales,
                     target_norms=(), eps_values=(), seeds=(), batch_size: int = 8,
                     progress: bool = True) -> dict:
    """Efficiency and stability of one solution: loads its adapter onto ``model`` (the aligned
    model, left without an adapter afterwards) and runs both sweeps.

    Returns ``{"norm", "orig", "base", "efficiency", "stability"}``: the adapter's total norm,
    the forget loss as trained and with the adapter disabled (dicts of npo, nll, logp), and the
    two sweeps' tables with a ``solution`` column. ``solution``: a
    :class:`ema_utils.chapters.narrow.Solution` (its path, beta and role are read)."""
    with with_checkpoint(model, solution.path) as peft:
        loss = ForgetLoss(peft, tokenizer, forget, solution.beta, batch_size)
        norm = adapter_norm(peft)
        orig = loss(peft)
        eff = efficiency_sweep(peft, loss, scales, target_norms, progress=progress) \
            if len(scales) or len(target_norms) else pd.DataFrame()
        stab = stability_sweep(peft, loss, eps_values, seeds, progress=progress) \
            if len(eps_values) else pd.DataFrame()
    return {"norm": norm, "orig": orig, "base": loss.base(),
            "efficiency": eff.assign(solution=solution.role) if len(eff) else eff,
            "stability": stab.assign(solution=solution.role) if len(stab) else stab}


def adapter_norms(model, solutions: Sequence) -> dict:
    """``{role: total adapter norm}`` of each solution (its adapter loaded onto ``model``, the
    aligned model, and removed again); ``solutions``: :class:`ema_utils.chapters.narrow.Solution`
    objects."""
    out = {}
    for s in solutions:
        with with_checkpoint(model, s.path) as peft:
            out[s.role] = adapter_norm(peft)
    return out


def common_norms(norms: dict, target_norms=None) -> list[float]:
    """The total norms both solutions are scaled to: ``target_norms`` when given, else five
    (Soligo et al. compare at several matched norms): each solution's own norm (so each is
    measured at the other's size), their mean, half the smaller and 1.5 times the larger."""
    if target_norms:
        return check_numbers(target_norms, "target_norms", low=0)
    values = sorted(float(v) for v in norms.values())
    return sorted(set(values + [float(np.mean(values)), 0.5 * values[0], 1.5 * values[-1]]))


# --- the verdicts -------------------------------------------------------------------------------

def _verdict(ok_all: bool, ok_any: bool) -> str:
    return "yes" if ok_all else ("partly" if ok_any else "no")


def efficiency_verdict(efficiency: pd.DataFrame, measure: str = "npo",
                       tol: float | None = None) -> dict:
    """At each common norm (rows of kind "norm", norm > 0), is the general solution's forget
    loss lower than the narrow one's by more than ``tol``? yes: at every norm; partly: at some;
    no: at none. ``tol`` None: 1% of the aligned model's loss (the rows at norm 0), so that two
    adapters that reach the same loss within a rounding margin count as equal."""
    part = efficiency[(efficiency["kind"] == "norm")]
    if part.empty or not {"general", "narrow"} <= set(part["solution"]):
        return {"verdict": "n/a", "text": "no common norms measured for both solutions"}
    if tol is None:
        at_zero = efficiency.loc[efficiency["norm"].abs() < 1e-12, measure]
        tol = 0.01 * float(at_zero.abs().max()) if len(at_zero) else 0.0
    part = part.assign(target=part["norm"].round(6))
    pivot = part.pivot_table(index="target", columns="solution", values=measure, aggfunc="first")
    pivot = pivot[pivot.index > 0].dropna()
    if pivot.empty:
        return {"verdict": "n/a", "text": "no common norm above zero"}
    lower = pivot["narrow"] - pivot["general"] > tol
    text = "; ".join(f"norm {n:.3g}: general {r.general:.3f} vs narrow {r.narrow:.3f}"
                     for n, r in pivot.iterrows())
    return {"verdict": _verdict(bool(lower.all()), bool(lower.any())), "tolerance": tol,
            "n_lower": int(lower.sum()), "n": int(len(pivot)),
            "text": f"{measure} loss at equal total adapter norm: {text} (lower means by more "
                    f"than {tol:.3g})",
            "at_norm": {f"{n:.6g}": {"general": float(r.general), "narrow": float(r.narrow)}
                        for n, r in pivot.iterrows()}}


def stability_verdict(summary: pd.DataFrame, margin: float = STABILITY_MARGIN) -> dict:
    """Is the narrow solution less stable? Per seed, the relative loss increase averaged over the
    eps values, for each solution; the difference narrow - general per seed (the same seed
    draws the same noise for both adapters, so the seeds pair up), with its mean and 95%
    t-interval. yes: the mean difference exceeds ``margin`` and its interval lies above 0;
    partly: it exceeds ``margin`` but the interval reaches 0 (or one seed only); no:
    otherwise; n/a: a solution did not lower the forget loss (relative increase undefined)."""
    per_seed = summary.attrs.get("per_seed")
    if per_seed is None or per_seed.empty or not {"general", "narrow"} <= set(per_seed["solution"]):
        return {"verdict": "n/a", "text": "stability not measured for both solutions"}
    by_seed = per_seed.groupby(["solution", "seed"])["relative"].mean().unstack("solution")
    if by_seed[["general", "narrow"]].isna().all().any():
        return {"verdict": "n/a", "text": "a solution did not lower the forget loss below the "
                "aligned model's: the relative increase is undefined"}
    g, gl, gh = seed_interval(by_seed["general"])
    n, nl, nh = seed_interval(by_seed["narrow"])
    d, dl, dh = seed_interval(by_seed["narrow"] - by_seed["general"])
    if d > margin and math.isfinite(dl) and dl > 0:
        verdict = "yes"
    elif d > margin:
        verdict = "partly"
    else:
        verdict = "no"

    def fmt(m, lo, hi):
        return f"{m:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) else "")

    return {"verdict": verdict, "general": g, "narrow": n, "difference": d,
            "general_interval": [gl, gh], "narrow_interval": [nl, nh],
            "difference_interval": [dl, dh], "n_seeds": int(len(by_seed)),
            "text": f"relative loss increase averaged over eps (95% t-interval over "
                    f"{len(by_seed)} seeds): general {fmt(g, gl, gh)}, narrow {fmt(n, nl, nh)}; "
                    f"narrow - general {fmt(d, dl, dh)} (counts above {margin:g})"}
