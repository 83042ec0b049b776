"""The plan of augmented runs (chapter 4, and chapter 6's KL run): chapter 2's plain run of the
same concept with the method changed to an augmented one and its loss weights set, trained by
the same intervention on the same forget data.

The weights a method takes come from its registry entry (loss part -> config field): w1 sets
``w_forget``, w2 ``w_retain``, w3 ``w_sft`` and lambda ``kl_lambda``, for the methods whose loss
has that part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from .. import CONCEPTS
from ..core.errors import ParameterError
from .condition import Condition, parse_ratio, try_condition
from .interventions import run_intervention
from .registry import METHODS, augmented_methods
from .trainer import UnlearnConfig


def plain_config(summary: dict):
    """The UnlearnConfig of a chapter-2 run, from its summary's settings["config"]."""
    config = (summary.get("settings") or {}).get("config")
    if not config:
        raise ParameterError(f"run '{summary.get('name')}' has no settings['config'] in its "
                             "summary; re-run the unlearning chapter")
    return UnlearnConfig.from_params(config)


@dataclass
class PlannedRun:
    """One augmented run: its condition (a Condition: the name is the value), target, method
    family and config."""

    condition: Condition
    concept: str
    family: str  # "npo" or "sft": which forget data run_intervention builds
    config: object  # UnlearnConfig
    ratio: float
    base: Condition  # the plain run (chapter 2), e.g. npo_safety


def _positive(name: str, w) -> float:
    if not isinstance(w, (int, float)) or isinstance(w, bool) or not w > 0 or not math.isfinite(w):
        raise ParameterError(f"parameter '{name}' must be a positive number (a loss weight), got {w!r}")
    return float(w)


def seed_runs(summaries: dict, base: Condition) -> list[Condition]:
    """The plain run ``base`` and its other training seeds' runs that chapter 2 trained
    ("npo_safety", "npo_seed1_safety", ...), in seed order (the plain name first)."""
    others = sorted((c for c in map(try_condition, summaries) if c is not None and c.train_seed
                     is not None and c.replace(train_seed=None) == base), key=lambda c: c.train_seed)
    return [base] + others


def augmented_plan(summaries: dict, concepts, retain_ratios=(1, 2, 3), sft_retain_ratios=(1,),
                   kl_lambdas=(1.0,), kl_ratio=1, w1: float = 1.0, w2: float = 1.0,
                   w3: float = 1.0, retain_weights=None, kl_concepts=None,
                   model_id: str | None = None) -> list[PlannedRun]:
    """The augmented runs to train, each with the plain run's config and the method changed.

    ``summaries``: chapter 2's run summaries (interventions.load_run_summaries). For each target
    in ``concepts``: npo_retain at every ratio of ``retain_ratios`` and every retain weight of
    ``retain_weights`` (None: ``[w2]``; from npo_<target>'s config), sft_retain at every ratio
    of ``sft_retain_ratios`` (retain weight ``w2``; from sft_<target>'s), npo_kl at every
    lambda of ``kl_lambdas`` with ``kl_ratio`` on the targets in ``kl_concepts`` (None: every
    target of ``concepts``). Empty lists leave a variant out. Every run is
    planned once per training seed chapter 2 trained its plain run with (npo_seed1_safety ->
    npo_retain_1to1_seed1_safety, from that run's config), so every arm has the plain runs'
    spread over seeds. A retain weight other than 1 is part of the name ("_w10").

    Why a retain-weight sweep: NPO works on the *summed* log-probability of a response, the
    retain term is a token-*mean* cross-entropy, so at equal weights the NPO gradient is larger
    by about the response length (~20 tokens); a sweep finds where the retain term starts to
    matter instead of judging containment at one weight that may be too small to act.

    Everything is validated here, before any model loads; with ``model_id`` the plain runs must
    have been trained on that model (else the comparison would mix two models).
    """
    w1, w2, w3 = (_positive(name, w) for name, w in (("w1", w1), ("w2", w2), ("w3", w3)))
    if retain_weights is None:
        retain_weights = [w2]
    if isinstance(retain_weights, (int, float)):
        retain_weights = [retain_weights]
    retain_weights = [_positive("retain_weights", w) for w in retain_weights]
    if isinstance(concepts, str):
        concepts = [concepts]
    kl_concepts = list(concepts) if kl_concepts is None else (
        [kl_concepts] if isinstance(kl_concepts, str) else list(kl_concepts))
    stray = [c for c in kl_concepts if c not in concepts]
    if stray:
        raise ParameterError(f"kl_concepts {stray} are not among the targets {list(concepts)}: "
                             "the KL variant is trained on targets of this chapter only")
    plan = []
    for concept in concepts:
        if concept not in CONCEPTS:
            raise ParameterError(f"unknown concept '{concept}'; concepts: {', '.join(CONCEPTS)}")
        variants = ([("npo_retain", r, None, w) for r in retain_ratios for w in retain_weights]
                    + [("sft_retain", r, None, w2) for r in sft_retain_ratios]
                    + [("npo_kl", kl_ratio, lam, None) for lam in kl_lambdas
                       if concept in kl_concepts])
        for method, ratio, lam, weight in variants:
            family = METHODS[method].base
            base = Condition(family, concept)
            if base not in summaries:
                raise ParameterError(
                    f"chapter 2 has no '{base}' run to compare {method} with (it has "
                    f"{', '.join(sorted(summaries)) or 'none'}); run `ema run unlearning` with "
                    f"{concept} in concepts and {family} in methods, or drop {method} here")
            trained_on = (summaries[base].get("settings") or {}).get("model")
            if model_id is not None and trained_on not in (None, model_id):
                raise ParameterError(
                    f"chapter 2's '{base}' was trained on {trained_on}, not {model_id}; run "
                    "the unlearning chapter with the same --model as this chapter")
            ratio = parse_ratio(ratio)
            if lam is not None and (not isinstance(lam, (int, float)) or isinstance(lam, bool)
                                    or not lam > 0):
                raise ParameterError(f"kl_lambdas must hold positive numbers, got {lam!r}")
            # the method's own weights (registry: loss part -> config field), set from w1/w2/w3/lambda
            values = {"w_forget": w1, "w_retain": weight, "w_sft": w3, "kl_lambda": lam}
            changes = {field: float(values[field]) for field in METHODS[method].weights.values()}
            condition = Condition(method, concept, retain_ratio=ratio, kl_lambda=lam,
                                  retain_weight=None if weight in (None, 1.0) else weight)
            for seeded_base in seed_runs(summaries, base):
                config = plain_config(summaries[seeded_base]).replace(method=method, **changes)
                plan.append(PlannedRun(condition=condition.replace(train_seed=seeded_base.train_seed),
                                       concept=concept, family=family, config=config,
                                       ratio=ratio, base=seeded_base))
    names = [p.condition for p in plan]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ParameterError(f"the same run is planned twice: {dup}; remove the repeated ratio, "
                             "retain weight or lambda from the parameters")
    return plan


def plan_table(plan: list[PlannedRun]) -> pd.DataFrame:
    """The plan as a table: condition, base run, method, ratio, the loss weights and the
    training seed."""
    rows = []
    for p in plan:
        c = p.config
        rows.append({"condition": p.condition, "compared with": p.base, "method": c.method,
                     "forget:retain": f"1:{p.ratio:g}", "loss": " + ".join(
                         f"{w:g}*{part}" for part, w in c.loss_weights().items()),
                     "lr": c.lr, "steps": c.max_steps or f"{c.epochs} epochs",
                     "lora": f"r{c.lora_r}" if c.lora else "full", "training seed": c.seed})
    return pd.DataFrame(rows).set_index("condition")


def train_augmented(model, tokenizer, model_id: str, plan: list[PlannedRun], options: dict,
                    methods=None, progress: bool = True) -> dict:
    """Train (or take from the cache) the planned runs: ``{condition: InterventionRun}``.

    ``options``: run_intervention's data and scoring options, normally chapter 2's
    (:func:`ema_utils.chapters.run_options.upstream_options`), so the forget set, the trajectory
    and the checkpoint rule are those of the plain runs. ``methods`` (e.g. ["npo_retain"]) trains only those methods'
    runs, so a chapter can spread long training over several cells (each cell has a time
    limit); None trains every run of the plan.
    """
    if isinstance(methods, str):
        methods = [methods]
    unknown = sorted(set(methods or ()) - set(augmented_methods()))
    if unknown:
        raise ParameterError(f"unknown augmented method(s) {unknown}; methods: "
                             f"{', '.join(augmented_methods())}")
    runs = {}
    for p in plan:
        if methods is not None and p.config.method not in methods:
            continue
        run = run_intervention(model, tokenizer, model_id, p.concept, p.family, p.config,
                               retain_ratio=p.ratio, progress=progress, **options)
        run.name = p.condition
        run.settings["retain_ratio"] = p.ratio
        run.settings["base"] = p.base
        runs[p.condition] = run
    return runs
