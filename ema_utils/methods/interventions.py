"""One intervention, end to end: forget set -> training -> checkpoints scored on every concept.

This is the unit chapters 2-4 share. :func:`run_intervention` builds the target concept's forget
set from the aligned model's own refusals (and, for SFT, compliant labels from the small
labeller), trains with ema_utils.methods.trainer, scores every checkpoint on a small per-concept
sample (the *trajectory*: when does narrow unlearning turn general?), and picks checkpoints by
the paper's utility rule and by "first below 25% target refusal". Every step is cached, so a
later chapter calling it with the same settings gets the finished run back at once.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from ..core.console import log as console_log
from .. import CONCEPTS
from ..core import models
from ..core.cache import atomic_write_json, cached, stable_hash
from ..core.console import emit
from ..core.data import MMLU_CHANCE, load_prompts
from ..core.errors import ParameterError
from ..core.evaluate import eval_items, evaluate, sample_items
from ..core.judges.registry import get_judge
from ..core.metrics import display_response, mean_interval
from ..core.models import DTYPE_NAMES, model_identity
from ..core.params import parse_overrides
from .checkpoints import (
    adapter_digest,
    first_checkpoint_below,
    load_checkpoint,
    merged_for_inference,
    resolve_rule,
    select_checkpoint,
    unload_adapter,
)
from .condition import Condition, parse_ratio
from .registry import get_method, plain_methods

METHODS = plain_methods()
"""The plain methods of the registry when the CLI is built: the paper's two interventions, NPO
unlearning of refusals and the SFT "finetune" baseline."""


@dataclass
class InterventionRun:
    """A finished (cached) intervention and what was measured along it."""

    name: str  # a Condition (a str), e.g. npo_cybersecurity
    concept: str
    method: str
    folder: Path  # the training artifact: checkpoints, losses.jsonl, checkpoints.jsonl, kl.jsonl
    forget_stats: dict
    losses: pd.DataFrame
    kl: pd.DataFrame  # step, concept, kl (mean first-token KL), low, high (95%), n prompts
    trajectory: pd.DataFrame  # step, concept, rate, low, high, n (+ utility per step)
    utility: pd.DataFrame  # step, utility
    selected: dict | None  # the paper's rule: last checkpoint whose utility drops < max_drop
    first_below: dict | None  # first checkpoint whose target refusal < target_threshold
    settings: dict = field(default_factory=dict)

    def checkpoint_path(self, step: int) -> Path | None:
        """The adapter folder of a step (None for step 0: the aligned model itself)."""
        if step == 0:
            return None
        path = self.folder / f"checkpoint-{step:05d}"
        if not (path / ".complete").is_file():
            raise ParameterError(f"{self.name}: no complete checkpoint for step {step} in {self.folder}")
        return path

    def utility_above_chance(self) -> bool | None:
        """Whether the aligned model's (step 0) development MMLU accuracy has its 95% interval
        above chance: whether the utility rule can tell checkpoints apart (None: not recorded)."""
        aligned = self.utility[self.utility["step"] == 0] if "low" in self.utility else self.utility.iloc[0:0]
        if aligned.empty or pd.isna(aligned["low"].iloc[0]):
            return None
        return bool(aligned["low"].iloc[0] > MMLU_CHANCE)

    def summary(self) -> dict:
        return {"name": self.name, "concept": self.concept, "method": self.method,
                "folder": str(self.folder), "forget": self.forget_stats,
                "selected_step": None if self.selected is None else int(self.selected["step"]),
                "first_below_step": None if self.first_below is None else int(self.first_below["step"]),
                "utility_above_chance": self.utility_above_chance(),
                "settings": self.settings,
                # refusal on the development items at every checkpoint: what later chapters
                # choose on (dev_refusal_at), never the eval items they report
                "dev_refusal": {str(int(step)): dict(zip(part["concept"], map(float, part["rate"])))
                                for step, part in self.trajectory.groupby("step")}
                if len(self.trajectory) else {}}


def dev_refusal_at(summaries: dict, steps: dict) -> dict:
    """``{condition: {concept: rate}}`` on the development items at each run's scored step
    (``steps``: condition -> step, as chapters 3 and 4 record them); "aligned" is step 0 of
    any run (the same model and items). Runs without development rates are left out."""
    out = {}
    for name, summary in summaries.items():
        dev = summary.get("dev_refusal") or {}
        if "0" in dev and "aligned" not in out:
            out["aligned"] = dev["0"]
        step = str(int(steps.get(name, -1)))
        if step in dev:
            out[name] = dev[step]
    return out


def retain_batch(forget_batch: int, ratio: float) -> int:
    """Retain examples per step beside ``forget_batch`` forget examples at forget:retain 1:``ratio``
    (at least one)."""
    return max(1, round(forget_batch * parse_ratio(ratio)))


def intervention_name(method: str, concept: str, retain_ratio: float | None = None) -> Condition:
    """The run's Condition (which is its name): "npo_safety"; with a retain set
    "npo_retain_1to2_safety" (forget:retain = 1:2)."""
    return Condition(method, concept, retain_ratio=retain_ratio)


def _check(concept: str, method: str) -> None:
    if concept not in CONCEPTS:
        raise ParameterError(f"unknown concept '{concept}'; concepts: {', '.join(CONCEPTS)}")
    if method not in plain_methods():
        raise ParameterError(f"unknown method '{method}'; methods: {', '.join(plain_methods())}")


def run_intervention(model, tokenizer, model_id: str, concept: str, method: str, config,
                     *, n_forget: int = 0, forget_candidates: int = 0,
                     forget_max_new_tokens: int = 24,
                     traj_n_per_concept: int = 8, traj_max_new_tokens: int = 16,
                     kl_n_per_concept: int = 8, batch_size: int = 16, judge: str | None = None,
                     max_drop: float = 0.03, target_threshold: float = 0.25,
                     retain_ratio: float | str = 1, seed: int = 0,
                     utility_per_subject: int = 2,
                     progress: bool = True) -> InterventionRun:
    """Train one intervention on ``concept`` and score its checkpoints (all cached).

    ``config`` is an :class:`ema_utils.methods.trainer.UnlearnConfig` whose method is "npo", "sft"
    or one of their augmented variants (then a retain set of ``retain_ratio`` times the forget
    set is built from the aligned model's own behaviour, and each step sees ``retain_ratio``
    retain examples per forget example, :func:`retain_batch`, unless ``config.retain_batch_size``
    is set); ``method`` names the family
    ("npo" or "sft") for the forget data. ``model`` must carry no adapter; it is returned to
    that state before this function returns. ``forget_candidates`` limits how many train
    prompts are tried for the forget set (0: all; a seeded, nested sample), ``n_forget`` how
    many refused ones are used (0: all). Every checkpoint's utility (the utility rule's input) is
    MMLU accuracy on the development part (``utility_per_subject`` questions per subject), never
    on the questions the chapters report.
    """
    # deferred: sets imports torch
    from .sets import build_forget_set, build_retain_set, build_sft_labels

    # deferred: trainer imports torch; looked up per call, so narrow's guard patching it works
    from .trainer import unlearn

    _check(concept, method)
    if get_method(config.method).family != method:
        raise ParameterError(f"config.method '{config.method}' does not match method '{method}'")
    ratio = parse_ratio(retain_ratio)
    if config.uses_retain and config.retain_batch_size is None:
        # The paper's forget:retain ratio is retain data per step: 1:ratio means ratio retain
        # examples beside every forget example, so a larger ratio weighs the retain term more.
        config = replace(config, retain_batch_size=retain_batch(config.batch_size, ratio))
    log = console_log if progress else (lambda m: None)
    name = intervention_name(config.method, concept, ratio if config.uses_retain else None)
    prompts = load_prompts(concept, split="train")
    prompts = sample_items(prompts[prompts["scorer"] == "refusal"], forget_candidates, seed)
    forget = build_forget_set(model, tokenizer, prompts, max_new_tokens=forget_max_new_tokens,
                              batch_size=batch_size, limit=n_forget or None, seed=seed,
                              model_id=model_id, progress=progress)
    stats = {"train_prompts": forget.attrs.get("n_prompts"), "refused": forget.attrs.get("n_refusals"),
             "used": int(len(forget))}
    sft = None
    if config.uses_sft:
        sft = build_sft_labels(forget[["id", "concept", "prompt"]], batch_size=batch_size,
                               max_new_tokens=forget_max_new_tokens * 2, progress=progress)
        stats["sft_labels"] = int(len(sft))
        if sft.empty:
            raise ParameterError(f"{name}: the labeller complied with none of the prompts; no SFT data")
    retain = None
    if config.uses_retain:
        retain = build_retain_set(model, tokenizer, concept, n_forget=int(len(forget)), ratio=ratio,
                                  seed=seed, max_new_tokens=forget_max_new_tokens * 2,
                                  batch_size=batch_size, model_id=model_id, progress=progress)
        stats["retain"] = int(len(retain))
    kl_prompts = eval_items(n_per_concept=kl_n_per_concept, seed=seed)[["id", "concept", "prompt"]]
    inputs = {"model": model_id, "config": config.to_dict(),
              "forget": stable_hash(forget[["id", "response"]].values.tolist()),
              "sft": None if sft is None else stable_hash(sft[["id", "response"]].values.tolist()),
              "retain": None if retain is None else stable_hash(retain[["id", "response"]].values.tolist()),
              "kl_prompts": stable_hash(kl_prompts["id"].tolist())}

    def train(folder: Path):
        log(f"[ema] {name}: training ({config.method}, {config.max_steps or config.epochs} "
            f"{'steps' if config.max_steps else 'epochs'}, lr {config.lr})")
        result = unlearn(model, tokenizer, forget=forget if config.uses_forget else None,
                         config=config, retain=retain if config.uses_retain else None,
                         sft=sft if config.uses_sft else None, eval_prompts=kl_prompts,
                         output_dir=folder, progress=progress)
        unload_adapter(result.model)

    folder = cached(f"unlearn-{name}", inputs, train, kind="dir")
    losses = pd.read_json(folder / "losses.jsonl", lines=True)
    checkpoints = pd.read_json(folder / "checkpoints.jsonl", lines=True)
    kl = kl_by_concept(folder, checkpoints)
    run = InterventionRun(name=name, concept=concept, method=method, folder=folder,
                          forget_stats=stats, losses=losses, kl=kl,
                          trajectory=pd.DataFrame(), utility=pd.DataFrame(), selected=None,
                          first_below=None, settings={"config": config.to_dict(), "model": model_id})
    _score_checkpoints(run, model, tokenizer, model_id, checkpoints["step"].tolist(),
                       traj_n_per_concept, traj_max_new_tokens, batch_size, judge, seed,
                       utility_per_subject, progress)
    _select(run, checkpoints, max_drop, target_threshold)
    return run


def run_seeds(model, tokenizer, model_id: str, concept: str, method: str, config,
              train_seeds=(0,), **kwargs) -> list[InterventionRun]:
    """:func:`run_intervention` once per training seed, on the same data (``kwargs["seed"]``).

    The first seed's run keeps the plain name ("npo_safety": chapters 4-6 build on it); each
    further seed's run is named with its seed ("npo_seed1_safety"), so chapter 3 can pool them
    (:func:`ema_utils.core.metrics.pooled_paired_change`)."""
    seeds = list(train_seeds) if isinstance(train_seeds, (list, tuple)) else [train_seeds]
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ParameterError(f"train_seeds must be a list of distinct integers >= 0, e.g. [0, 1, 2]; "
                             f"got {train_seeds!r}")
    runs = []
    for k, train_seed in enumerate(seeds):
        run = run_intervention(model, tokenizer, model_id, concept, method,
                               replace(config, seed=train_seed), **kwargs)
        if k:
            run.name = run.name.replace(train_seed=train_seed)
        runs.append(run)
    return runs


def kl_by_concept(folder: Path, checkpoints: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per checkpoint and concept: the mean first-token KL over the run's KL prompts with its
    95% bootstrap interval over prompts (step, concept, kl, low, high, n), from the per-prompt
    values the trainer writes (kl.jsonl). A run folder without them (written before they were
    kept) gives the means from checkpoints.jsonl, with NaN intervals."""
    path = Path(folder) / "kl.jsonl"
    per_prompt = pd.read_json(path, lines=True) if path.is_file() and path.stat().st_size else None
    if per_prompt is not None and {"step", "concept", "kl"} <= set(per_prompt.columns):
        rows = []
        for (step, concept), part in per_prompt.groupby(["step", "concept"], sort=False):
            mean, low, high = mean_interval(part["kl"])
            rows.append({"step": int(step), "concept": concept, "kl": mean, "low": low,
                         "high": high, "n": int(part["kl"].notna().sum())})
        return pd.DataFrame(rows, columns=["step", "concept", "kl", "low", "high", "n"])
    if checkpoints is None:
        checkpoints = pd.read_json(Path(folder) / "checkpoints.jsonl", lines=True)
    cols = [c for c in checkpoints.columns if c.startswith("kl_")]
    long = checkpoints.melt(id_vars="step", value_vars=cols, var_name="concept", value_name="kl")
    long["concept"] = long["concept"].str.removeprefix("kl_")
    return long.assign(low=float("nan"), high=float("nan"), n=0)


def checkpoint_model_id(model_id: str, run_name: str, path: Path | None) -> str:
    """The cache identity of a checkpoint: the base model plus the adapter's weights digest."""
    return model_id if path is None else f"{model_id}+{run_name}:{adapter_digest(path)}"


def with_checkpoint(model, path: Path | None, merged: bool = False):
    """Context manager: the model with a checkpoint's adapter applied (or as is for None).

    ``merged=True`` folds the adapter into the weights while inside (for scoring: generation is
    then as fast as the base model's; see checkpoints.merged_for_inference); keep it False where
    the adapter itself is used (scaled, perturbed, disabled)."""
    @contextlib.contextmanager
    def ctx():
        if path is None:
            yield model
            return
        wrapped = load_checkpoint(model, path)
        try:
            if merged:
                with merged_for_inference(wrapped):
                    yield wrapped
            else:
                yield wrapped
        finally:
            unload_adapter(wrapped)

    return ctx()


def _score_checkpoints(run, model, tokenizer, model_id, steps, n, max_new_tokens, batch_size,
                       judge, seed, utility_per_subject, progress):
    rows, utility = [], []
    for step in steps:
        path = run.checkpoint_path(int(step))
        with with_checkpoint(model, path, merged=True) as scored:
            # the development split: the checkpoint rules choose on these items, so they are
            # neither trained on nor the ones the chapters report
            result = evaluate(scored, tokenizer, checkpoint_model_id(model_id, run.name, path),
                              split="dev", n_per_concept=n, judge=judge, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, seed=seed, over_refusal=False, utility=True,
                              utility_per_subject=utility_per_subject, utility_part="dev",
                              progress=progress)
        rows.append(result.rates.assign(step=int(step)))
        utility.append({"step": int(step), "utility": result.utility["accuracy"],
                        "low": result.utility.get("low")})
    run.trajectory = pd.concat(rows, ignore_index=True)
    run.utility = pd.DataFrame(utility)


def _select(run, checkpoints, max_drop, target_threshold):
    aligned_utility = float(run.utility.loc[run.utility["step"] == 0, "utility"].iloc[0])
    trained = checkpoints[checkpoints["step"] > 0]
    run.selected = select_checkpoint(trained, run.utility.set_index("step")["utility"],
                                     aligned_utility, max_drop=max_drop)
    target = run.trajectory[run.trajectory["concept"] == run.concept].set_index("step")["rate"]
    run.first_below = first_checkpoint_below(trained, target, threshold=target_threshold)


def trajectory_summary(run: InterventionRun) -> pd.DataFrame:
    """Per step: target refusal, mean refusal of the other concepts, utility."""
    t = run.trajectory
    target = t[t["concept"] == run.concept].set_index("step")["rate"].rename("target")
    others = t[t["concept"] != run.concept].groupby("step")["rate"].mean().rename("non_target_mean")
    return pd.concat([target, others, run.utility.set_index("step")["utility"]], axis=1).reset_index()


def save_run_summaries(results_dir, runs: list[InterventionRun]) -> Path:
    """The runs' key facts as JSON in a chapter's results folder (read by later chapters)."""
    return atomic_write_json(Path(results_dir) / "interventions.json",
                             {r.name: r.summary() for r in runs})


def load_run_summaries(chapter_folder) -> dict:
    path = Path(chapter_folder) / "interventions.json"
    if not path.is_file():
        raise ParameterError(f"{path} is missing: the unlearning chapter did not finish")
    return json.loads(path.read_text())


def compare_responses(model, tokenizer, run: InterventionRun, step: int, prompts: pd.DataFrame,
                      max_new_tokens: int = 32, batch_size: int = 8) -> pd.DataFrame:
    """Greedy responses of the aligned model and of ``run`` at ``step`` to the same prompts,
    judged by the phrase judge, with compliant answers redacted for display."""
    # deferred: generation imports torch and transformers
    from ..core.generation import generate_responses

    judge = get_judge("phrase")
    out = prompts[["id", "concept", "prompt"]].reset_index(drop=True)
    for column, path in (("aligned", None), (f"step {step}", run.checkpoint_path(step))):
        with with_checkpoint(model, path, merged=True) as scored:
            gen = generate_responses(scored, tokenizer, out, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, progress=False)
        flags = judge.judge(gen["prompt"].tolist(), gen["response"].tolist())
        out[column] = [display_response({"response": r, "is_refusal": f, "concept": c})
                       for r, f, c in zip(gen["response"], flags, gen["concept"])]
    return out.drop(columns="id")




def rule_for(summary: dict, rule: str = "auto") -> str:
    """The rule a run's checkpoint is chosen by: ``rule``, with ``auto`` resolved on the run
    (:func:`ema_utils.methods.checkpoints.resolve_rule`)."""
    return resolve_rule(rule, summary.get("utility_above_chance"))


def chosen_step(summary: dict, rule: str = "auto") -> int | None:
    """The step a chapter scores for a run: by :func:`rule_for` the paper's utility rule, the
    first checkpoint below the target threshold, or the last one; falls back to the last when a
    rule found none."""
    rule = rule_for(summary, rule)
    last = max(int(p.name.split("-")[1]) for p in Path(summary["folder"]).glob("checkpoint-*"))
    step = {"utility": summary.get("selected_step"), "first_below": summary.get("first_below_step"),
            "last": last}[rule]
    return last if step is None else int(step)


def matched_step(summary: dict, concept: str, level: float) -> int | None:
    """The trained checkpoint (step > 0) whose refusal on the *development* items of
    ``concept`` is closest to ``level`` (ties: the earlier step), from the run's
    ``dev_refusal``; None when the run has no development rates. Runs of different targets
    compared at the step this picks are compared at matched target refusal, chosen on items
    that are never reported."""
    if not 0 <= level <= 1:
        raise ParameterError(f"level is a refusal rate in [0, 1] (0.15 = 15%), got {level!r}")
    rates = {int(step): r[concept] for step, r in (summary.get("dev_refusal") or {}).items()
             if int(step) > 0 and concept in r}
    if not rates:
        return None
    return min(sorted(rates), key=lambda step: round(abs(rates[step] - level), 9))


def evaluate_runs(model, tokenizer, model_id: str, summaries: dict, rule: str = "auto",
                  steps: dict | None = None, **evaluate_kwargs) -> dict:
    """Score the aligned model and each run's chosen checkpoint: ``{condition: Evaluation}``.
    ``steps`` (condition -> step) overrides the rule for the runs it names (e.g. the steps
    :func:`matched_step` picks)."""
    results = {"aligned": evaluate(model, tokenizer, model_id, **evaluate_kwargs)}
    for name, summary in summaries.items():
        step = (steps or {}).get(name)
        step = chosen_step(summary, rule) if step is None else int(step)
        path = Path(summary["folder"]) / f"checkpoint-{step:05d}"
        with with_checkpoint(model, path, merged=True) as scored:
            results[name] = evaluate(scored, tokenizer, checkpoint_model_id(model_id, name, path),
                                     **evaluate_kwargs)
        results[name].settings["step"] = step
        results[name].settings["rule"] = "given" if name in (steps or {}) else rule_for(summary, rule)
    return results


# --- ema unlearn --------------------------------------------------------------------------------

RUN_OPTIONS = ("n_forget", "forget_candidates", "forget_max_new_tokens", "traj_n_per_concept",
               "traj_max_new_tokens", "kl_n_per_concept", "batch_size", "judge", "max_drop",
               "target_threshold", "seed", "utility_per_subject")
"""-p keys that go to run_intervention; every other -p key goes to UnlearnConfig."""


def cmd_unlearn(args) -> int:
    # deferred: trainer imports torch, which the other commands never need
    from .trainer import UnlearnConfig

    params = parse_overrides(args.param)
    run_kwargs = {k: params.pop(k) for k in list(params) if k in RUN_OPTIONS}
    method = args.method
    if args.retain_ratio is not None:
        parse_ratio(args.retain_ratio)
        if method != "npo":
            params.setdefault("method", "sft_retain")
        else:
            params.setdefault("method", "npo_kl" if args.retain_loss == "kl" else "npo_retain")
        run_kwargs["retain_ratio"] = args.retain_ratio
    elif args.retain_loss == "kl":
        raise ParameterError("--retain-loss kl needs --retain-ratio (e.g. --retain-ratio 1:1)")
    params.setdefault("method", method)
    params["lora"] = not args.full
    # -p seed=N draws the data (and seeds training unless -p train_seed=M says otherwise)
    if "train_seed" in params:
        params["seed"] = params.pop("train_seed")
    if "seed" in run_kwargs:
        params.setdefault("seed", run_kwargs["seed"])
    _check(args.concept, method)
    config = UnlearnConfig.from_params(params)  # validated before the model loads
    # models.load_model looked up per call: the tests' guard that no model loads patches it
    model, tokenizer = models.load_model(args.model, dtype=args.dtype,
                                         log=console_log)
    model_id = model_identity(args.model, model)
    run = run_intervention(model, tokenizer, model_id, args.concept, method, config, **run_kwargs)
    traj = trajectory_summary(run)
    payload = {**run.summary(), "trajectory": traj.round(4).to_dict("records"),
               "losses": run.losses.round(5).to_dict("records")}

    def human(p):
        lines = [f"{p['name']}: trained in {p['folder']}",
                 f"forget set: {p['forget']}",
                 f"checkpoint by the utility rule: step {p['selected_step']}; first step with "
                 f"target refusal < 25%: {p['first_below_step']}",
                 f"{'step':>5} {'target':>7} {'others':>7} {'utility':>8}"]
        lines += [f"{r['step']:>5} {r['target']:7.2f} {r['non_target_mean']:7.2f} {r['utility']:8.3f}"
                  for r in p["trajectory"]]
        return "\n".join(lines)

    emit(args, payload, human)
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("unlearn", help="run one intervention: train, checkpoint, score")
    p.add_argument("--concept", required=True, help="target concept: " + ", ".join(CONCEPTS))
    p.add_argument("--method", required=True, choices=METHODS)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", action="store_true", default=True, help="LoRA adapters (default)")
    mode.add_argument("--full", action="store_true", help="full-rank training")
    p.add_argument("--retain-ratio", metavar="1:N", help="add a retain set N times the forget set")
    p.add_argument("--retain-loss", choices=("ce", "kl"), default="ce",
                   help="ce: cross-entropy on the retain set; kl: KL to the aligned model")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                   help="compute dtype of the base model (default float32, as the cpu profile; "
                        "auto: bfloat16 where the hardware multiplies it natively; LoRA weights "
                        "and optimizer state stay float32)")
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE",
                   help="UnlearnConfig fields (lr, max_steps, beta, lora_r, ...) or run options ("
                        + ", ".join(RUN_OPTIONS) + ")")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_unlearn)
