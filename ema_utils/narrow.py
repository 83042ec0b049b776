"""Narrow vs general (chapter 6): the second paper's lens on refusal unlearning.

Soligo et al. (../shared/paper/soligo2026.md) argue that narrow fine-tuning generalises
because the *general* solution is easier to find than the *narrow* one: it is **more
efficient** (a lower training loss at the same parameter norm) and **more stable** (its loss
rises less under random perturbations of the same size). In the unlearning setting of the main
paper (../shared/paper/mushtaq2026.md):

- the **general** solution is chapter 2's plain NPO run on Safety (refusal falls everywhere: EMA),
  at the checkpoint chapter 4 scored (:func:`general_solution`);
- the **narrow** solution is chapter 4's NPO + KL run (KL to the aligned model on the other
  concepts' prompts), at the lambda whose mean non-target refusal is closest to the aligned
  model's (:func:`choose_kl_lambda`, :func:`narrow_solution`).

Nothing is trained here: both adapters are read from the earlier chapters' results (a missing
one raises :class:`~ema_utils.errors.EmaError` naming the ``ema run`` command that makes it).

Measurements, each on the LoRA adapter of a solution loaded onto the aligned model:

- **efficiency** (:func:`efficiency_sweep`): every LoRA update ``s * B @ A`` scaled by a factor
  (:func:`scaled_adapter`, scaling the B matrices) or to common total norms
  (:func:`adapter_at_norm`); the forget loss (:class:`ForgetLoss`: the NPO loss of the forget
  set against the aligned model, and the refusals' per-token NLL) at each;
- **stability** (:func:`stability_sweep`): each LoRA matrix perturbed with orthogonal noise of
  its own norm, ``x' = sqrt(1 - eps^2) x + eps y`` (:func:`orthogonal_perturbation`), several
  seeds; reported as the relative loss increase ``(L_pert - L_orig) / (L_base - L_orig)``
  (:func:`relative_increase`), L_base being the loss with the adapter disabled;
- **directions** (:func:`solution_direction`, :func:`direction_evaluations`): the difference of
  mean activations between the unlearned model (adapter on) and the aligned one (adapter off),
  its norm per layer, steering the aligned model with it and projecting it out of the unlearned
  model, with a random direction of equal norm as the control (``ema_utils.directions``).

:func:`claims` puts the verdicts in one table: does "general is more efficient and more stable"
hold for refusal unlearning on this model?
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import CONCEPTS, trainer
from .errors import EmaError, ParameterError
from .results import chapter_results, chapter_summary
from .sets import build_forget_set
from .trainer import _pad_id, collate, encode_examples

TARGET = "safety"
"""The intervention of both solutions: the paper's containment experiment is on Safety."""

EMA_POINTS = 0.15
"""A change of more than 15 points counts (the paper's EMA threshold), for the verdicts."""
MIN_GAP = 0.10
"""Ablation recovery is not judged when unlearning took less than this off the mean refusal."""
RECOVERY_YES = 0.5
"""Ablating the direction must bring back at least half the lost refusal for a "yes"."""
RANDOM_MARGIN = 0.25
"""... and at least this much more (as a fraction of the lost refusal) than a random direction."""
STABILITY_MARGIN = 0.05
"""The narrow solution counts as less stable when its relative loss increase (averaged over eps)
exceeds the general one's by more than this (5% of the adapter's effect on the loss)."""


# --- the two solutions ------------------------------------------------------------------------

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


def _command(chapter: str, profile: str) -> str:
    return f"ema run {chapter} --profile {profile}"


def _chapter_folder(chapter: str, profile: str) -> Path:
    try:
        return chapter_results(chapter, profile)
    except EmaError as exc:
        raise EmaError(f"chapter 6 reads chapter '{chapter}' and does not retrain it: {exc}. "
                       f"Run `{_command(chapter, profile)}` first") from None


def _run_parameters(chapter: str, profile: str) -> dict:
    path = _chapter_folder(chapter, profile) / "run.json"
    return json.loads(path.read_text()).get("parameters", {})


def _unlearning_summaries(profile: str) -> dict:
    from .interventions import load_run_summaries

    folder = _chapter_folder("unlearning", profile)
    try:
        return load_run_summaries(folder)
    except ParameterError:
        raise EmaError(f"{folder} has no interventions.json (the unlearning chapter did not "
                       f"finish); run `{_command('unlearning', profile)}`") from None


def _checkpoint_rule(profile: str) -> str:
    """The rule chapter 4 scored its checkpoints by (so both solutions are the models it
    scored); "utility" (the paper's) when chapter 4 did not record one."""
    try:
        return str(_run_parameters("mitigation", profile).get("checkpoint_rule") or "utility")
    except EmaError:
        return "utility"


def general_solution(profile: str, target: str = TARGET, rule: str | None = None) -> Solution:
    """Chapter 2's plain NPO run on ``target`` at its chosen checkpoint (``rule``: None takes
    chapter 4's checkpoint rule, so the step is the one chapter 4 compared against)."""
    from .interventions import chosen_step

    summaries = _unlearning_summaries(profile)
    name = f"npo_{target}"
    if name not in summaries:
        raise EmaError(f"chapter 2 (profile {profile}) has no '{name}' run (it has "
                       f"{', '.join(sorted(summaries)) or 'none'}); run `{_command('unlearning', profile)}"
                       f" -p concepts=[{target}] -p methods=[npo]` (or with more concepts/methods)")
    summary = summaries[name]
    rule = rule or _checkpoint_rule(profile)
    step = chosen_step(summary, rule)
    path = Path(summary["folder"]) / f"checkpoint-{step:05d}"
    if not (path / ".complete").is_file():
        raise EmaError(f"{name}: checkpoint {path} is missing from the results cache; run "
                       f"`{_command('unlearning', profile)} --force`")
    return Solution(role="general", condition=name, step=step, path=path,
                    config=(summary.get("settings") or {}).get("config") or {},
                    note=f"chapter 2's plain NPO run, checkpoint by the '{rule}' rule")


def kl_candidates(mitigation_summary: dict, target: str = TARGET) -> pd.DataFrame:
    """Chapter 4's KL runs on ``target`` and how far each kept the other concepts from the
    aligned model.

    ``mitigation_summary``: chapter 4's summary.json (``{"refusal": {CONDITION: {KEY: rate}}}``).
    Columns: condition, kl_lambda, ratio, target_rate, non_target_mean (mean refusal over the
    concepts other than ``target``), aligned_non_target, gap (non_target_mean - aligned's),
    aligned_target. Sorted by lambda.
    """
    from .report import condition_details

    refusal = (mitigation_summary or {}).get("refusal") or {}
    if "aligned" not in refusal:
        raise EmaError("chapter 4's summary has no 'aligned' refusal rates; re-run the "
                       "mitigation chapter (`ema run mitigation --profile P`)")
    aligned = refusal["aligned"]
    others = [c for c in CONCEPTS if c != target and c in aligned]
    a_nt = float(np.mean([aligned[c] for c in others]))
    rows = []
    for condition, rates in refusal.items():
        d = condition_details(condition)
        if d["method"] != "npo_kl" or d["target"] != target:
            continue
        nt = float(np.mean([rates[c] for c in others if c in rates]))
        rows.append({"condition": condition, "kl_lambda": d["kl_lambda"], "ratio": d["ratio"],
                     "target_rate": float(rates.get(target, np.nan)), "non_target_mean": nt,
                     "aligned_non_target": a_nt, "gap": nt - a_nt,
                     "aligned_target": float(aligned.get(target, np.nan))})
    columns = ["condition", "kl_lambda", "ratio", "target_rate", "non_target_mean",
               "aligned_non_target", "gap", "aligned_target"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values("kl_lambda", kind="stable").reset_index(drop=True)


def choose_kl_lambda(mitigation_summary: dict, target: str = TARGET,
                     kl_lambda: float | None = None) -> dict:
    """The narrow solution's lambda: **the KL run whose mean non-target refusal is closest to the
    aligned model's** (smallest ``|gap|``); ties go to the lower target refusal (more
    unlearning), then to the smaller lambda. With ``kl_lambda`` given, that run is taken.

    Returns the chosen row of :func:`kl_candidates` as a dict, plus ``rule`` (a sentence).
    Raises EmaError when chapter 4 trained no KL run on ``target``.
    """
    table = kl_candidates(mitigation_summary, target)
    if table.empty:
        raise EmaError(f"chapter 4 has no KL run (npo_kl) on {target}: run `ema run mitigation "
                       f"--profile P -p kl_lambdas=[1.0, 10.0]` with {target} in concepts")
    if kl_lambda is not None:
        match = table[np.isclose(table["kl_lambda"].astype(float), float(kl_lambda))]
        if match.empty:
            raise ParameterError(f"kl_lambda={kl_lambda}: chapter 4 trained the KL variant at "
                                 f"lambda {', '.join(f'{x:g}' for x in table['kl_lambda'])} only")
        row = match.iloc[0].to_dict()
        rule = f"lambda {kl_lambda:g} as asked (kl_lambda parameter)"
    else:
        ranked = table.assign(_abs=table["gap"].abs().round(9)).sort_values(
            ["_abs", "target_rate", "kl_lambda"], kind="stable")
        row = ranked.iloc[0].drop(labels="_abs").to_dict()
        rule = ("the lambda whose mean non-target refusal is closest to the aligned model's "
                "(ties: lower target refusal, then smaller lambda)")
    return {**row, "rule": rule}


def _ratio_or_one(ratio) -> float:
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        return 1.0
    return ratio if math.isfinite(ratio) and ratio > 0 else 1.0


@contextlib.contextmanager
def _no_training(command: str):
    """Within: any call to ema_utils.trainer.unlearn raises EmaError naming ``command``.

    The narrow run is fetched by replaying chapter 4's (cached) call; if its adapter is not in
    the results cache, that call would train it: this guard makes that an error instead.
    """
    original = trainer.unlearn

    def refuse(*args, **kwargs):
        raise EmaError("chapter 6 does not train: the KL run it analyses is not in the results "
                       f"cache (chapter 4 did not train it with these settings); run `{command}`")

    trainer.unlearn = refuse
    try:
        yield
    finally:
        trainer.unlearn = original


def narrow_solution(model, tokenizer, model_id: str, profile: str, target: str = TARGET,
                    kl_lambda: float | None = None, rule: str | None = None,
                    progress: bool = False) -> tuple[Solution, dict]:
    """Chapter 4's NPO + KL run on ``target`` at the lambda :func:`choose_kl_lambda` picks.

    Its adapter is found by replaying chapter 4's plan for that one run with chapter 2's
    options (everything comes from the results cache: forget and retain sets, training,
    checkpoint scores); nothing is trained (an uncached run raises EmaError). Returns the
    solution and the choice (the row of :func:`kl_candidates` and the rule).
    """
    from . import mitigation
    from .interventions import chosen_step

    _chapter_folder("mitigation", profile)  # a clear error when chapter 4 never ran
    try:
        msum = chapter_summary("mitigation", profile)
    except EmaError as exc:
        raise EmaError(f"{exc}; run `{_command('mitigation', profile)}`") from None
    choice = choose_kl_lambda(msum, target, kl_lambda)
    params = _run_parameters("mitigation", profile)
    trained_on = params.get("model")
    if trained_on and model_id.split(":")[0] != trained_on:
        raise EmaError(f"chapter 4 (profile {profile}) ran on {trained_on}, this chapter on "
                       f"{model_id.split(':')[0]}; use the same model (--model) for both")
    upstream = _chapter_folder("unlearning", profile)
    summaries = _unlearning_summaries(profile)
    options = mitigation.upstream_options(upstream)
    plan = mitigation.augmented_plan(summaries, [target], retain_ratios=[], sft_retain_ratios=[],
                                     kl_lambdas=[float(choice["kl_lambda"])],
                                     kl_ratio=_ratio_or_one(choice.get("ratio")),
                                     w1=float(params.get("w1", 1.0)), model_id=model_id)
    with _no_training(_command("mitigation", profile)):
        runs = mitigation.train_augmented(model, tokenizer, model_id, plan, options,
                                          methods=["npo_kl"], progress=progress)
    run = runs.get(choice["condition"])
    if run is None:
        raise EmaError(f"rebuilding chapter 4's plan gave {sorted(runs)}, not "
                       f"{choice['condition']}; re-run `{_command('mitigation', profile)}`")
    rule = rule or str(params.get("checkpoint_rule") or "utility")
    step = chosen_step(run.summary(), rule)
    scored = (msum.get("steps") or {}).get(choice["condition"])
    note = f"chapter 4's NPO + KL run, lambda {choice['kl_lambda']:g}, checkpoint by the '{rule}' rule"
    if scored is not None and int(scored) != step:
        note += f" (chapter 4 scored step {scored})"
    solution = Solution(role="narrow", condition=choice["condition"], step=step,
                        path=run.folder / f"checkpoint-{step:05d}",
                        config=run.settings.get("config") or {}, note=note)
    return solution, choice


def forget_examples(model, tokenizer, model_id: str, profile: str, n: int = 0, seed: int = 0,
                    target: str = TARGET, progress: bool = False) -> pd.DataFrame:
    """The forget set both solutions were trained on (rebuilt as chapter 2 built it, from the
    cache), or ``n`` of its rows chosen by a seeded hash of the id (0: all).

    Columns: id, concept, prompt, response, complete.
    """
    from .data import load_prompts
    from .evaluate import sample_items
    from .mitigation import upstream_options

    options = upstream_options(_chapter_folder("unlearning", profile))
    prompts = load_prompts(target, split="train")
    prompts = sample_items(prompts[prompts["scorer"] == "refusal"], options["forget_candidates"],
                           options["seed"])
    forget = build_forget_set(model, tokenizer, prompts,
                              max_new_tokens=options["forget_max_new_tokens"],
                              batch_size=options["batch_size"],
                              limit=options["n_forget"] or None, seed=options["seed"],
                              model_id=model_id, progress=progress)
    if forget.empty:
        raise EmaError(f"the forget set of {target} is empty: the model refused none of the "
                       "train prompts chapter 2 tried")
    return sample_items(forget, n, seed).reset_index(drop=True)


def solutions_table(solutions: Sequence[Solution], mitigation_summary: dict | None = None,
                    target: str = TARGET) -> pd.DataFrame:
    """One row per solution: condition, step, lambda, and (from chapter 4's scores, when given)
    target refusal and mean non-target refusal, beside the aligned model's."""
    rows = []
    refusal = (mitigation_summary or {}).get("refusal") or {}
    for s in solutions:
        row = {"solution": s.role, "condition": s.condition, "step": s.step,
               "kl_lambda": s.to_json()["kl_lambda"], "beta": s.beta}
        rates = refusal.get(s.condition)
        if rates:
            others = [c for c in CONCEPTS if c != target and c in rates]
            row.update(target_refusal=rates.get(target),
                       non_target_mean=float(np.mean([rates[c] for c in others])))
        rows.append(row)
    if "aligned" in refusal:
        rates = refusal["aligned"]
        others = [c for c in CONCEPTS if c != target and c in rates]
        rows.insert(0, {"solution": "aligned", "condition": "aligned", "step": 0,
                        "target_refusal": rates.get(target),
                        "non_target_mean": float(np.mean([rates[c] for c in others]))})
    return pd.DataFrame(rows).set_index("solution")


# --- LoRA adapters: norms, scaling, perturbation -------------------------------------------------

def lora_layers(model) -> list[tuple[str, object, str]]:
    """``(module name, LoRA layer, adapter name)`` of every active LoRA layer, in module order."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    found.append((name, module, adapter))
    if not found:
        raise ParameterError("the model carries no LoRA adapter; load one with "
                             "ema_utils.interventions.with_checkpoint(model, path)")
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
    from . import losses as L
    from .generation import length_sorted_batches

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

    - ``npo``: the NPO loss (the paper's Eq. 1, ema_utils.losses.npo_loss), the forget term
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
        from . import losses as L

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
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="eval", file=sys.stderr, disable=not progress)


def _check_numbers(values, name: str, low: float | None = None, high: float | None = None) -> list:
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
    scales = _check_numbers(scales, "scales", low=0)
    target_norms = _check_numbers(target_norms, "target_norms", low=0)
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
    eps_values = _check_numbers(eps_values, "eps_values", low=0, high=1)
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


def measure_solution(model, tokenizer, solution: Solution, forget: pd.DataFrame, scales,
                     target_norms=(), eps_values=(), seeds=(), batch_size: int = 8,
                     progress: bool = True) -> dict:
    """Efficiency and stability of one solution: loads its adapter onto ``model`` (the aligned
    model, left without an adapter afterwards) and runs both sweeps.

    Returns ``{"norm", "orig", "base", "efficiency", "stability"}``: the adapter's total norm,
    the forget loss as trained and with the adapter disabled (dicts of npo, nll, logp), and the
    two sweeps' tables with a ``solution`` column."""
    from .interventions import with_checkpoint

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


def adapter_norms(model, solutions: Sequence[Solution]) -> dict:
    """``{role: total adapter norm}`` of each solution (its adapter loaded onto ``model``, the
    aligned model, and removed again)."""
    from .interventions import with_checkpoint

    out = {}
    for s in solutions:
        with with_checkpoint(model, s.path) as peft:
            out[s.role] = adapter_norm(peft)
    return out


def common_norms(norms: dict, target_norms=None) -> list[float]:
    """The total norms both solutions are scaled to: ``target_norms`` when given, else each
    solution's own norm and their mean (so each is measured at the other's size)."""
    if target_norms:
        return _check_numbers(target_norms, "target_norms", low=0)
    values = sorted(float(v) for v in norms.values())
    return sorted(set(values + [float(np.mean(values))]))


# --- directions ---------------------------------------------------------------------------------

def direction_prompts(n_prompts: int = 140, seed: int = 0, split: str = "train") -> pd.DataFrame:
    """About ``n_prompts`` (0: all) refusal-scored prompts spread evenly over the concepts that have them
    (train split: never the items refusal is measured on; see
    :func:`ema_utils.directions.direction_prompts`). Columns: id, concept, prompt."""
    from . import directions as D

    if not isinstance(n_prompts, (int, np.integer)) or isinstance(n_prompts, bool) or n_prompts < 0:
        raise ParameterError(f"n_prompts must be 0 (all) or a positive integer, got {n_prompts!r}")
    return D.direction_prompts(int(n_prompts), seed=seed, split=split)


def solution_direction(model, tokenizer, model_id: str, solution: Solution, prompts: pd.DataFrame,
                       batch_size: int = 8, progress: bool = True) -> np.ndarray:
    """The solution's direction per layer: mean activations with its adapter on minus with it
    off (the aligned model), on ``prompts`` (:func:`ema_utils.directions.mean_activations` twice,
    through ``adapter_diff_direction``): an array (n_layers + 1, hidden), float64. Cached by the
    adapter's digest, the prompts and the dtype."""
    from . import directions
    from .cache import cached, stable_hash
    from .interventions import checkpoint_model_id, with_checkpoint

    inputs = {"model": checkpoint_model_id(model_id, solution.condition, solution.path),
              "prompts": stable_hash(prompts[["id", "prompt"]].values.tolist()),
              "dtype": str(next(model.parameters()).dtype), "version": 1}

    def fill(folder: Path):
        with with_checkpoint(model, solution.path) as peft:
            diff = directions.adapter_diff_direction(peft, tokenizer, prompts, batch_size=batch_size,
                                                     progress=progress)
        np.save(folder / "direction.npy", np.asarray(diff, dtype=np.float64))

    folder = cached("solution-direction", inputs, fill, kind="dir")
    return np.load(folder / "direction.npy")


def layer_profile(directions_by_role: dict) -> pd.DataFrame:
    """Per layer (1..L; 0, the embeddings, is unchanged by LoRA) the norm of each direction and,
    with two or more, the cosine between the first two. Columns: layer, norm_<role>...,
    cosine."""
    from . import directions as D

    roles = list(directions_by_role)
    first = np.asarray(directions_by_role[roles[0]])
    table = pd.DataFrame({"layer": np.arange(first.shape[0])})
    for role in roles:
        table[f"norm_{role}"] = np.linalg.norm(np.asarray(directions_by_role[role]), axis=1)
    if len(roles) >= 2:
        table["cosine"] = np.asarray(D.cosine_by_layer(first, np.asarray(
            directions_by_role[roles[1]])), dtype=float)
    return table[table["layer"] >= 1].reset_index(drop=True)


def steer_layer(n_layers: int, fraction: float = 0.5) -> int:
    """The layer to steer at: round(fraction * n_layers), within 1..n_layers (Soligo et al.
    steer mid-depth: layer 24 of 48)."""
    if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ParameterError(f"steer_layer_fraction must be in [0, 1], got {fraction!r}")
    return int(min(n_layers, max(1, round(fraction * n_layers))))


def direction_evaluations(model, tokenizer, model_id: str, solution: Solution,
                          direction: np.ndarray, layer: int, scales=(1.0, 4.0), seed: int = 0,
                          n_per_concept: int = 10, max_new_tokens: int = 24, batch_size: int = 8,
                          judge: str | None = None, progress: bool = True) -> dict:
    """Refusal on all seven concepts under the direction's interventions: ``{condition:
    Evaluation}`` for

    - ``aligned``; ``steer +<s>x`` / ``random +<s>x``: the aligned model with ``s`` times the
      direction at ``layer`` (at its own norm there), or a random direction of the same norm,
      added to that layer's output (:func:`ema_utils.directions.add_direction`);
    - ``unlearned``: the solution itself; ``ablate direction`` / ``ablate random``: the solution
      with the direction at ``layer`` (unit length), or the random one, projected out of every
      layer (:func:`ema_utils.directions.ablate_direction`, layers=None).

    Each condition has its own cache identity (``model_id`` or the checkpoint's, plus the
    operation, the vector's digest, the layer and the scale), so generations are reused only
    for the same model under the same operation. Over-refusal and utility are not scored.
    """
    from . import directions as D
    from .evaluate import evaluate
    from .interventions import checkpoint_model_id, with_checkpoint

    scales = _check_numbers(scales, "steer_scales")
    direction = np.asarray(direction, dtype=np.float64)
    vec = direction[layer] if direction.ndim == 2 else direction
    if not np.isfinite(vec).all() or float(np.linalg.norm(vec)) == 0:
        raise ParameterError(f"the direction at layer {layer} is zero or not finite: nothing to "
                             "steer with (did the adapter change the model?)")
    random_vec = D.random_direction_like(vec, seed)
    vectors = {"direction": vec, "random": random_vec}
    kwargs = dict(n_per_concept=n_per_concept, judge=judge, max_new_tokens=max_new_tokens,
                  batch_size=batch_size, seed=seed, over_refusal=False, utility=False,
                  progress=progress)
    out = {"aligned": evaluate(model, tokenizer, model_id, **kwargs)}
    for scale in scales:
        for label, name in (("steer", "direction"), ("random", "random")):
            v = vectors[name]
            steer_id = f"{model_id}+add-{name}:{D.direction_digest(v)}@{layer}x{scale:g}"
            with D.add_direction(model, v, layer, scale):
                out[f"{label} +{scale:g}x"] = evaluate(model, tokenizer, steer_id, **kwargs)
    with with_checkpoint(model, solution.path, merged=True) as peft:
        unlearned_id = checkpoint_model_id(model_id, solution.condition, solution.path)
        out["unlearned"] = evaluate(peft, tokenizer, unlearned_id, **kwargs)
        for name, v in vectors.items():
            with D.ablate_direction(peft, v, layers=None):
                out[f"ablate {name}"] = evaluate(
                    peft, tokenizer, D.ablation_model_id(unlearned_id, v, None, name), **kwargs)
    return out


def direction_effects(evaluations: dict) -> pd.DataFrame:
    """One row per condition: the rate per concept (aligned behaviour, as chapter 3), the
    refusal rate over the refusal-scored items of all concepts pooled (``pooled``, with its
    Wilson interval ``low``/``high`` and ``n``; :func:`ema_utils.directions.pooled_refusal`)
    and its change from the aligned model in points."""
    from .directions import pooled_refusal

    pooled = pooled_refusal(evaluations).set_index("condition")
    aligned = float(pooled.loc["aligned", "rate"]) if "aligned" in pooled.index else np.nan
    rows = []
    for condition, ev in evaluations.items():
        row = {"condition": condition}
        row.update({r.concept: float(r.rate) for r in ev.rates.itertuples()})
        p = pooled.loc[condition]
        row.update(pooled=float(p["rate"]), low=float(p["low"]), high=float(p["high"]),
                   n=int(p["n"]), change_points=100 * (float(p["rate"]) - aligned))
        rows.append(row)
    return pd.DataFrame(rows).set_index("condition")


# --- the claims ---------------------------------------------------------------------------------

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


def steering_verdict(effects: pd.DataFrame, threshold: float = EMA_POINTS) -> dict:
    """Does adding the general direction to the aligned model lower refusal over all concepts,
    more than a random direction of the same norm? Judged at the steering scale with the
    largest drop: yes when it lowers the pooled rate by more than ``threshold`` beyond the
    random direction's change; partly when it lowers it more than random does, by less; no
    otherwise."""
    if "aligned" not in effects.index:
        return {"verdict": "n/a", "text": "no aligned evaluation"}
    a = float(effects.loc["aligned", "pooled"])
    steer = [c for c in effects.index if c.startswith("steer +")]
    if not steer:
        return {"verdict": "n/a", "text": "no steering evaluated"}
    best = min(steer, key=lambda c: float(effects.loc[c, "pooled"]))
    rand = best.replace("steer", "random", 1)
    s = float(effects.loc[best, "pooled"])
    r = float(effects.loc[rand, "pooled"]) if rand in effects.index else a
    margin = (a - s) - (a - r)
    verdict = "yes" if (a - s) > threshold and margin > threshold else (
        "partly" if margin > 0 and s < a else "no")
    return {"verdict": verdict, "condition": best, "aligned": a, "steered": s, "random": r,
            "text": f"pooled refusal, all concepts: aligned {100 * a:.0f}%, {best} {100 * s:.0f}%, "
                    f"{rand} {100 * r:.0f}%"}


def ablation_verdict(effects: pd.DataFrame, min_gap: float = MIN_GAP) -> dict:
    """Does projecting the direction out of the unlearned model bring refusal back? The
    recovered fraction (ablated - unlearned) / (aligned - unlearned) of the pooled rate: yes
    when it is at least 0.5 and exceeds the random direction's by 0.25; partly when it is above
    zero and above random's; no otherwise; n/a when unlearning lowered the pooled rate by less
    than ``min_gap``."""
    need = {"aligned", "unlearned", "ablate direction"}
    if not need <= set(effects.index):
        return {"verdict": "n/a", "text": "ablation not evaluated"}
    a, u, d = (float(effects.loc[c, "pooled"]) for c in ("aligned", "unlearned",
                                                                "ablate direction"))
    r = float(effects.loc["ablate random", "pooled"]) if "ablate random" in effects.index else u
    if a - u < min_gap:
        return {"verdict": "n/a", "aligned": a, "unlearned": u,
                "text": f"unlearning lowered the pooled refusal by only {100 * (a - u):.0f} points "
                        f"({100 * a:.0f}% -> {100 * u:.0f}%): nothing to restore"}
    rec, rec_r = (d - u) / (a - u), (r - u) / (a - u)
    verdict = "yes" if rec >= RECOVERY_YES and rec - rec_r >= RANDOM_MARGIN else (
        "partly" if rec > 0 and rec > rec_r else "no")
    return {"verdict": verdict, "recovered": rec, "recovered_random": rec_r,
            "text": f"pooled refusal, all concepts: aligned {100 * a:.0f}%, unlearned {100 * u:.0f}%, "
                    f"direction ablated {100 * d:.0f}% (recovered {rec:.2f}), random ablated "
                    f"{100 * r:.0f}% ({rec_r:.2f})"}


def narrow_verdict(choice: dict, general_rates: dict | None = None,
                   threshold: float = EMA_POINTS) -> dict:
    """Is the KL run a narrow solution? yes: the target fell by more than ``threshold`` while the
    mean non-target refusal stayed within ``threshold`` of the aligned model's; partly: the
    target fell and the others fell less than under the general solution; no otherwise."""
    target_drop = choice["aligned_target"] - choice["target_rate"]
    nt_drop = -choice["gap"]
    text = (f"{choice['condition']}: target {100 * choice['aligned_target']:.0f}% -> "
            f"{100 * choice['target_rate']:.0f}%, other concepts {100 * choice['aligned_non_target']:.0f}%"
            f" -> {100 * choice['non_target_mean']:.0f}%")
    general_nt_drop = None
    if general_rates:
        others = [c for c in CONCEPTS if c != TARGET and c in general_rates]
        general_nt = float(np.mean([general_rates[c] for c in others]))
        general_nt_drop = choice["aligned_non_target"] - general_nt
        text += (f" (plain NPO: target {100 * general_rates.get(TARGET, float('nan')):.0f}%, others "
                 f"{100 * general_nt:.0f}%)")
    if target_drop > threshold and nt_drop < threshold:
        verdict = "yes"
    elif target_drop > threshold and general_nt_drop is not None and nt_drop < general_nt_drop:
        verdict = "partly"
    else:
        verdict = "no"
    return {"verdict": verdict, "target_drop": target_drop, "non_target_drop": nt_drop,
            "text": text}


CLAIMS = {
    "narrow": ("A KL penalty to the aligned model on other-domain text finds a narrow solution "
               "(target falls, the rest stays)",
               "narrow misalignment learned only with the KL term (lambda 1e5 with LoRA)"),
    "efficiency": ("The general solution is more efficient: lower training (forget) loss at the "
                   "same adapter norm",
                   "general reaches lower loss at every common norm (adapters rescaled 0-2x)"),
    "stability": ("The general solution is more stable: its loss rises less under orthogonal "
                  "noise of the same size",
                  "narrow degrades faster (relative loss increase vs eps)"),
    "steering": ("Adding the general direction induces the behaviour (refusal falls on all "
                 "concepts); a random direction of equal norm does not",
                 "adding the mean-diff direction induces misalignment; random does not"),
    "ablation": ("Projecting the direction out of the unlearned model restores the behaviour; "
                 "a random direction does not",
                 "projecting it out removes most of the misalignment"),
    "drift": ("Removing the KL term mid-training drifts the narrow solution back to the general one",
              "reported for narrow fine-tuning"),
}


def claims(verdicts: dict) -> pd.DataFrame:
    """The claims table: claim, the second paper's finding, this run's numbers, holds here.

    ``verdicts``: key of :data:`CLAIMS` -> a verdict dict (``verdict``, ``text``); a missing key
    is listed as "not tested" (e.g. the optional drift experiment)."""
    rows = []
    for key, (claim, paper) in CLAIMS.items():
        v = verdicts.get(key)
        rows.append({"claim": claim, "Soligo et al. 2026": paper,
                     "this run": v["text"] if v else "not run in this chapter",
                     "holds here": v["verdict"] if v else "not tested"})
    return pd.DataFrame(rows)


def overall_line(verdicts: dict, model: str) -> str:
    """One Markdown sentence: does "general is more efficient and more stable" hold?"""
    e = (verdicts.get("efficiency") or {}).get("verdict", "n/a")
    s = (verdicts.get("stability") or {}).get("verdict", "n/a")
    if e == "yes" and s == "yes":
        answer = "**holds**"
    elif "n/a" in (e, s):
        answer = "**cannot be fully judged**"
    elif e == "no" and s == "no":
        answer = "**does not hold**"
    else:
        answer = "**holds in part**"
    return (f"\"General is more efficient and more stable\" {answer} for refusal unlearning on "
            f"{model}: efficiency {e}, stability {s}.")


def _num(x, digits: int = 5):
    if x is None:
        return None
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return round(float(x), digits) if math.isfinite(x) else None
    return x


def records(table: pd.DataFrame, digits: int = 5) -> list[dict]:
    """A table as JSON-safe records (NaN -> None, numbers rounded)."""
    return [{k: _num(v, digits) for k, v in row.items()} for row in table.to_dict("records")]


def summary_json(solutions: Sequence[Solution], choice: dict, measures: dict,
                 efficiency: pd.DataFrame, stability: pd.DataFrame, profile_table: pd.DataFrame,
                 layer: int, effects: pd.DataFrame, verdicts: dict, claims_table: pd.DataFrame,
                 overall: str) -> dict:
    """The chapter's summary.json (``ema results narrow_general``)."""
    def clean(d):
        if isinstance(d, dict):
            return {k: clean(v) for k, v in d.items()}
        if isinstance(d, (list, tuple)):
            return [clean(v) for v in d]
        return _num(d)

    refusal = {c: {k: _num(v) for k, v in row.items() if k in CONCEPTS or k == "pooled"}
               for c, row in effects.to_dict("index").items()} if len(effects) else {}
    return clean({
        "solutions": {s.role: s.to_json() for s in solutions},
        "kl_choice": {k: v for k, v in choice.items()},
        "adapter_norm": {r: m["norm"] for r, m in measures.items()},
        "forget_loss": {r: {"orig": m["orig"], "base": m["base"]} for r, m in measures.items()},
        "efficiency": records(efficiency),
        "stability": records(stability),
        "direction": {"layer": layer, "profile": records(profile_table)},
        "refusal": refusal,
        "verdicts": verdicts,
        "claims": records(claims_table),
        "overall": overall,
    })
