"""Could a checkpoint's refusal be read from its first token instead of its generated answer?

Scoring a training run's checkpoints is most of chapter 2's cost: every checkpoint generates
the profile's ``traj_max_new_tokens`` per item (16 on cpu) and judges them. The first-token refusal score
(:class:`ema_utils.core.judges.FirstTokenJudge`: the probability of a refusal opening at the
first response position) needs one forward pass and no generation. The speed issue allows
screening checkpoints with it only *where it agrees with the generated verdict*. This check
measures that agreement on a profile's own NPO run (chapter 2's settings, its development
items, the checkpoints the run keeps), item by item:

- the share of items where "score >= ``threshold``" gives the generated verdict, against the
  same bar as the dtype check (:data:`ema_utils.build.orchestrate.MIN_AGREEMENT`);
- the AUC of the score against the verdict (how well it ranks, whatever the threshold) and the
  best threshold's agreement on these same items (reported, never used: it is fitted on them);
- each checkpoint's refusal rate both ways, the quantity a trajectory plots.

The run and its generations come from the results cache, so after a book build only the
first-token passes are new. ``ema bench --screening --profile P`` runs it.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from ..core.console import tagged_log
from ..core.errors import ParameterError
from ..core.evaluate import evaluate
from ..core.judges import FirstTokenJudge
from ..core.models import dtype_tag, load_model, model_identity, resolve_dtype
from ..methods.interventions import checkpoint_model_id, run_intervention, with_checkpoint
from .orchestrate import MIN_AGREEMENT, npo_run_settings, resolve_parameters



_log = tagged_log("[ema screening]")


def screening_agreement(items: pd.DataFrame, threshold: float = 0.5) -> dict:
    """Agreement of the first-token score with the generated verdict.

    ``items`` has one row per (checkpoint, item): ``step``, ``is_refusal`` (the generated
    verdict) and ``first_token`` (the score in [0, 1]). Returns the agreement at ``threshold``,
    the AUC (None where the verdicts hold one class), the best threshold on these items with its
    agreement, and per step the refusal rate both ways.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ParameterError(f"threshold must be in [0, 1], got {threshold}")
    missing = {"step", "is_refusal", "first_token"} - set(items.columns)
    if missing:
        raise ParameterError(f"screening items lack column(s) {sorted(missing)}")
    if items.empty:
        raise ParameterError("no items to compare: the run has no scored checkpoints")
    verdict = items["is_refusal"].astype(bool).to_numpy()
    score = items["first_token"].astype(float).to_numpy()
    agree = float(((score >= threshold) == verdict).mean())
    both = 0 < verdict.sum() < len(verdict)
    # every split of the scores, including "nothing is a refusal" (above the highest score)
    candidates = np.unique(np.concatenate([score, [threshold, np.inf]]))
    best = max(candidates, key=lambda t: (((score >= t) == verdict).mean(), -abs(t - threshold)))
    by_step = (items.assign(screened=score >= threshold, generated=verdict)
               .groupby("step")[["generated", "screened"]].mean().reset_index())
    return {"items": int(len(items)), "threshold": threshold, "agreement": agree,
            "auc": float(roc_auc_score(verdict, score)) if both else None,
            "best_threshold": float(best),
            "best_agreement": float(((score >= best) == verdict).mean()),
            "by_step": [{"step": int(r.step), "generated": float(r.generated),
                         "screened": float(r.screened)} for r in by_step.itertuples()],
            "min_agreement": MIN_AGREEMENT, "usable": agree >= MIN_AGREEMENT}


def check_screening(profile: str = "cpu", model: str | None = None,
                    concept: str = "cybersecurity", threshold: float = 0.5,
                    progress: bool = True) -> dict:
    """Train (or reuse) the profile's NPO run on ``concept`` in the profile's dtype, score each
    checkpoint's development items by generation (cached) and by the first-token score, and
    compare them (:func:`screening_agreement`)."""
    started = time.time()
    _, config, run_kwargs = npo_run_settings(profile, model)
    train = resolve_parameters("unlearning", profile, model)
    dtype = resolve_dtype(train.get("dtype"), train.get("device") or "cpu", log=_log)
    lm, tokenizer = load_model(train["model"], device=train.get("device"), dtype=dtype, log=_log)
    model_id = model_identity(train["model"], lm)
    _log(f"{train['model']} in {dtype_tag(dtype)}: NPO on {concept} ({config.max_steps} steps)")
    run = run_intervention(lm, tokenizer, model_id, concept, "npo", config, progress=progress,
                           **run_kwargs)
    rows = []
    for step in sorted(int(s) for s in run.trajectory["step"].unique()):
        path = run.checkpoint_path(step)
        with with_checkpoint(lm, path, merged=True) as scored:
            # the same call as the run's own checkpoint scoring, so its generations are reused
            items = evaluate(scored, tokenizer, checkpoint_model_id(model_id, run.name, path),
                             split="dev", n_per_concept=run_kwargs["traj_n_per_concept"],
                             judge=run_kwargs["judge"],
                             max_new_tokens=run_kwargs["traj_max_new_tokens"],
                             batch_size=run_kwargs["batch_size"], seed=run_kwargs["seed"],
                             over_refusal=False, utility=False, progress=progress).items
            items = items[items["scorer"] == "refusal"]
            judge = FirstTokenJudge(scored, tokenizer, batch_size=run_kwargs["batch_size"],
                                    progress=False)
            rows.append(items.assign(step=step, first_token=judge.scores(items["prompt"].tolist())))
    report = {"profile": profile, "model": train["model"], "concept": concept,
              "dtype": dtype_tag(dtype), "run": run.name,
              **screening_agreement(pd.concat(rows, ignore_index=True), threshold)}
    report["wall_s"] = round(time.time() - started, 1)
    return report


def render_markdown(report: dict) -> str:
    """The check as a few lines: the agreement against the bar, and the rates per step."""
    auc = "n/a" if report["auc"] is None else f"{report['auc']:.3f}"
    lines = [f"First-token screening of {report['run']} ({report['profile']} profile, "
             f"{report['dtype']}): {report['items']} checkpoint items; agreement with the generated "
             f"verdict {report['agreement']:.1%} at threshold {report['threshold']:g} (bar "
             f"{report['min_agreement']:.0%}: {'usable' if report['usable'] else 'NOT usable'}); "
             f"AUC {auc}; best threshold on these items {report['best_threshold']:.2f} "
             f"({report['best_agreement']:.1%}, fitted here, not used).",
             "", "| step | refusal, generated | refusal, first token |", "|---|---|---|"]
    lines += [f"| {r['step']} | {r['generated']:.0%} | {r['screened']:.0%} |"
              for r in report["by_step"]]
    return "\n".join(lines)
