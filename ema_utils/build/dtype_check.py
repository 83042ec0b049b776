"""Does the fast compute dtype change the science? bf16 against fp32 on a profile's own items.

``dtype: auto`` computes in bfloat16 where the hardware multiplies it natively (about 2x faster
evaluation here, :func:`ema_utils.core.models.resolve_dtype`). This check decides whether a profile
may use it, on the verdicts the book prints, with the profile's own settings (chapter 3's
eval items, chapter 2's NPO run):

1. the aligned model, every concept's eval items and the over-refusal items, generated and
   judged in both dtypes: per-item agreement of the verdict and each concept's rate against the
   other dtype's Wilson interval;
2. one unlearned adapter (NPO on ``concept``, trained in the fast dtype as the chapters train
   it) at two checkpoints, the first one (refusals half-way down) and the one chapter 3
   reports (its ``checkpoint_rule``), scored with the base model in both dtypes;
3. the same NPO run trained again in float32: the target concept's refusal trajectory, the
   first checkpoint under the target threshold and the selected checkpoint, in both dtypes.
   Everything of that run is float32, its forget set too (the aligned model's own refusals,
   generated in float32), so it compares the two pipelines end to end, not the dtype alone.

The check passes (``holds``) when every per-item agreement is at least ``min_agreement``, every
rate lies inside the other dtype's 95% interval, and both trainings pick the same checkpoints.
Every generation and training run goes through the results cache, keyed by dtype
(:func:`ema_utils.core.models.model_identity`), so the fast half is free after a book build and a
second check is free altogether. ``ema bench --dtype-check --profile cpu`` runs it; the book's
reproducibility page shows the last result of its profile.
"""

from __future__ import annotations

import gc
import time

import pandas as pd

from ..core.cache import atomic_write_json
from ..core.console import tagged_log
from ..core.errors import EmaError
from ..core.evaluate import evaluate
from ..core.metrics import rate_table
from ..core.models import dtype_tag, load_model, model_identity, resolve_dtype
from ..core.paths import dtype_check_file
from ..methods.interventions import (
    checkpoint_model_id,
    chosen_step,
    run_intervention,
    with_checkpoint,
)
from .book import render_markdown  # noqa: F401  (re-exported: `ema bench --dtype-check` prints it)
from .orchestrate import MIN_AGREEMENT, npo_run_settings



_log = tagged_log("[ema dtype-check]")


def _inside(x: float, low: float, high: float) -> bool:
    # Wilson bounds of 0/n and n/n come out a rounding error off 0 and 1.
    return bool(low - 1e-9 <= x <= high + 1e-9)


def compare_items(fast: pd.DataFrame, reference: pd.DataFrame) -> dict:
    """Per-item agreement of two scored item tables (columns id, concept, aligned) and each
    concept's rate with its Wilson interval in both, with whether each rate lies inside the
    other's interval."""
    keys = ["concept", "id"]
    merged = fast[keys + ["aligned"]].merge(reference[keys + ["aligned"]], on=keys,
                                            suffixes=("_fast", "_ref"), validate="one_to_one")
    if len(merged) != len(fast) or len(merged) != len(reference):
        raise EmaError(f"compare_items: the two evaluations scored different items "
                       f"({len(fast)} and {len(reference)}, {len(merged)} shared)")
    same = merged["aligned_fast"].astype(bool) == merged["aligned_ref"].astype(bool)
    a = rate_table(merged.rename(columns={"aligned_fast": "flag"}), by="concept", flag="flag")
    b = rate_table(merged.rename(columns={"aligned_ref": "flag"}), by="concept", flag="flag")
    rows = []
    for fa, fb in zip(a.itertuples(), b.set_index("concept").loc[a["concept"]].itertuples()):
        rows.append({"concept": fa.concept, "n": int(fa.n), "fast": float(fa.rate),
                     "fast_low": float(fa.low), "fast_high": float(fa.high),
                     "reference": float(fb.rate), "reference_low": float(fb.low),
                     "reference_high": float(fb.high),
                     "agreement": float(same[merged["concept"] == fa.concept].mean()),
                     "within": _inside(fa.rate, fb.low, fb.high) and _inside(fb.rate, fa.low, fa.high)})
    return {"items": int(len(merged)), "agreed": int(same.sum()),
            "agreement": float(same.mean()) if len(merged) else None,
            "rates": rows, "all_within": all(r["within"] for r in rows)}


def compare_trajectories(fast, reference, concept: str) -> dict:
    """The target concept's refusal along two runs of the same training in two dtypes, and the
    checkpoints each run's rules pick (first under the threshold; the utility rule)."""
    def target(run):
        t = run.trajectory
        return t[t["concept"] == concept].set_index("step")[["rate", "low", "high"]]

    a, b = target(fast), target(reference)
    steps = []
    for step in a.index.intersection(b.index):
        ra, rb = a.loc[step], b.loc[step]
        steps.append({"step": int(step), "fast": float(ra["rate"]), "reference": float(rb["rate"]),
                      "within": _inside(ra["rate"], rb["low"], rb["high"])
                      and _inside(rb["rate"], ra["low"], ra["high"])})

    def step_of(row):
        return None if row is None else int(row["step"])

    first = {"fast": step_of(fast.first_below), "reference": step_of(reference.first_below)}
    selected = {"fast": step_of(fast.selected), "reference": step_of(reference.selected)}
    return {"concept": concept, "steps": steps, "first_below": first, "selected": selected,
            "same_checkpoints": first["fast"] == first["reference"]
            and selected["fast"] == selected["reference"],
            "all_within": all(s["within"] for s in steps),
            "seconds_per_step": {"fast": float(fast.losses["seconds"].median()),
                                 "reference": float(reference.losses["seconds"].median())}}


def check_compute_dtype(profile: str = "cpu", model: str | None = None,
                        concept: str = "cybersecurity", reference: str = "float32",
                        progress: bool = True, save: bool = True) -> dict:
    """Run the three comparisons of the module docstring; return (and keep) the report."""
    started = time.time()
    evals, config, run_kwargs = npo_run_settings(profile, model)
    model = evals["model"]
    # the fast dtype is what "auto" picks here, whatever the profile itself computes in
    fast_dtype = resolve_dtype("auto", evals["device"], log=_log)
    ref_dtype = resolve_dtype(reference)
    report = {"profile": profile, "model": model, "concept": concept,
              "fast": dtype_tag(fast_dtype), "reference": dtype_tag(ref_dtype),
              "min_agreement": MIN_AGREEMENT, "items_per_concept": evals["n_eval_per_concept"]}
    if fast_dtype == ref_dtype:
        report.update(skipped=f"the profile computes in {dtype_tag(ref_dtype)} here: nothing to "
                              "compare", holds=None)
        return report
    eval_kwargs = dict(n_per_concept=evals["n_eval_per_concept"], judge=evals["judge"],
                       max_new_tokens=evals["max_new_tokens"], batch_size=evals["batch_size"],
                       seed=evals["seed"], over_refusal=True, utility=False, progress=progress)
    scored: dict = {}
    runs: dict = {}
    steps: list[int] = []
    for dtype in (fast_dtype, ref_dtype):
        tag = dtype_tag(dtype)
        _log(f"{model} in {tag}: the aligned model on every concept")
        lm, tokenizer = load_model(model, device=evals["device"], dtype=dtype, log=_log)
        model_id = model_identity(model, lm)
        scored[("aligned", tag)] = evaluate(lm, tokenizer, model_id, **eval_kwargs).items
        _log(f"{model} in {tag}: NPO on {concept} ({config.max_steps} steps)")
        run = run_intervention(lm, tokenizer, model_id, concept, "npo", config,
                               progress=progress, **run_kwargs)
        runs[tag] = run
        if not steps:  # the adapter is the fast run's, as the chapters train it
            chosen = chosen_step(run.summary(), rule=evals["checkpoint_rule"])
            first = int(run.trajectory.loc[run.trajectory["step"] > 0, "step"].min())
            steps = sorted({first, int(chosen)})
        fast_run = runs[dtype_tag(fast_dtype)]
        for step in steps:
            path = fast_run.checkpoint_path(step)
            _log(f"{model} in {tag}: {fast_run.name} step {step} on every concept")
            with with_checkpoint(lm, path, merged=True) as adapted:
                scored[(f"{fast_run.name} step {step}", tag)] = evaluate(
                    adapted, tokenizer, checkpoint_model_id(model_id, fast_run.name, path),
                    **eval_kwargs).items
        del lm, tokenizer
        gc.collect()
    fast_tag, ref_tag = report["fast"], report["reference"]
    names = list(dict.fromkeys(name for name, _ in scored))
    report["evaluations"] = [{"model": name, **compare_items(scored[(name, fast_tag)],
                                                             scored[(name, ref_tag)])}
                             for name in names]
    report["trajectory"] = compare_trajectories(runs[fast_tag], runs[ref_tag], concept)
    report["holds"] = bool(all(e["agreement"] >= MIN_AGREEMENT and e["all_within"]
                               for e in report["evaluations"])
                           and report["trajectory"]["same_checkpoints"]
                           and report["trajectory"]["all_within"])
    report["wall_s"] = round(time.time() - started, 1)
    if save:
        path = dtype_check_file(profile)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, report)
    return report
