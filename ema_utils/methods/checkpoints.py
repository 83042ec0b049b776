"""Checkpoints of an unlearning run: adapter I/O, digests, and the paper's checkpoint rule.

:func:`ema_utils.methods.trainer.unlearn` saves a checkpoint every ``checkpoint_every`` steps (and at
step 0) with :func:`save_checkpoint`; :func:`load_checkpoint` puts one back on the aligned model
and :func:`unload_adapter` takes it off again; :func:`adapter_digest` names a checkpoint in cache
keys; :func:`merged_for_inference` folds an adapter into the weights for fast scoring.
:func:`select_checkpoint` applies the paper's utility rule to the saved checkpoints and
:func:`first_checkpoint_below` finds the first one that reached the unlearning goal.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from ..core.cache import atomic_write_dir
from ..core.errors import ParameterError
from ..core.models import contiguous_output_head, float32_output_head, save_plain
from ..core.paths import sha256_file

# --- models: LoRA adapters and checkpoint folders ----------------------------------------------

@contextlib.contextmanager
def _quiet_peft():
    """peft 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing`` when it wraps a
    model: a FutureWarning per call that says nothing about the user's run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        yield


@contextlib.contextmanager
def merged_for_inference(model):
    """Inside: the LoRA adapter folded into the base weights; after: the exact base weights back.

    Why: an unmerged adapter adds about eight small operations to every adapted linear layer
    (168 of them in the default model), and on 2 cores they cost about 1.3x in scoring time.
    Only a float32 base is merged: a bfloat16 weight is already a bf16 number, so adding a LoRA
    delta smaller than half its spacing and rounding gives the same weight back, and most of
    the adapter's effect would vanish (measured: the NPO-Cybersecurity checkpoint of the cpu
    profile, merged into bf16, refused 23% of Bias items; in float32, 3%). A half-precision
    base keeps the adapter unmerged
    (its branch runs in float32). On exit the saved originals are put back: peft's unmerge
    would subtract and leave rounding error in the aligned model. For scoring only: nothing may
    train or disable the adapter inside.
    """
    # deferred: peft and torch are heavy imports, needed only once a model carries an adapter
    import torch
    from peft.tuners.lora import LoraLayer

    saved = []
    try:
        for module in model.modules():
            if not isinstance(module, LoraLayer) or module.merged:
                continue
            if module.get_base_layer().weight.dtype not in (torch.float32, torch.float64):
                continue
            active = [a for a in module.active_adapters if a in module.lora_A]
            if not active:
                continue
            weight = module.get_base_layer().weight
            saved.append((module, weight.data))
            delta = sum(module.get_delta_weight(a).float() for a in active)
            weight.data = (weight.data.float() + delta).to(weight.dtype)
            module.merged_adapters = list(active)  # the layer's forward now skips the adapter
        yield model
    finally:
        for module, data in saved:
            module.get_base_layer().weight.data = data
            module.merged_adapters = []


def has_adapter(model) -> bool:
    """True when ``model`` already carries LoRA (or other peft) layers."""
    # deferred: peft is a heavy import, needed only once a model carries an adapter
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def unload_adapter(model):
    """The base model with the adapter's layers removed (not merged): the aligned model again.

    With LoRA, :func:`ema_utils.methods.trainer.unlearn` and :func:`load_checkpoint` inject the
    adapter into the model they are given; call this on ``result.model`` before training or
    loading another adapter on the same base.
    """
    if not has_adapter(model):
        return model
    return model.unload()


def save_checkpoint(model, folder, tokenizer=None) -> Path:
    """Save an adapter (peft) or a full model into ``folder``, atomically.

    The folder appears complete (with a ``.complete`` marker) or not at all: an interrupted
    save leaves nothing a later run would load.
    """
    # deferred: peft is a heavy import, needed only once a model carries an adapter
    from peft import PeftModel

    def fill(tmp: Path):
        if isinstance(model, PeftModel):
            model.save_pretrained(str(tmp))
        else:
            if tokenizer is None:
                raise ParameterError("saving a full-rank checkpoint needs the tokenizer")
            save_plain(model, tokenizer, tmp)

    return atomic_write_dir(Path(folder), fill)


def _weights_file(path: Path) -> Path:
    for name in ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin"):
        if (path / name).is_file():
            return path / name
    raise ParameterError(f"{path}: no adapter_model.safetensors or model.safetensors; not a "
                         "checkpoint folder written by ema_utils.methods.checkpoints.save_checkpoint")


def adapter_digest(path, length: int = 16) -> str:
    """sha256 (first ``length`` hex digits) of a checkpoint's weights file, for cache keys."""
    return sha256_file(_weights_file(Path(path)))[:length]


def load_checkpoint(base_model, path, is_trainable: bool = False):
    """A saved checkpoint as a model: the adapter on ``base_model``, or the full-rank weights.

    An adapter is injected into ``base_model`` (call :func:`unload_adapter` on the result to
    get the base back). A full-rank checkpoint is loaded on its own, on ``base_model``'s device
    and dtype when one is given.
    """
    path = Path(path)
    if not (path / ".complete").is_file():
        raise ParameterError(f"{path} is not a complete checkpoint (no .complete marker): it does "
                             "not exist or its save was interrupted")
    if (path / "adapter_config.json").is_file():
        # deferred: peft is a heavy import, needed only once a model carries an adapter
        from peft import PeftModel

        if base_model is None:
            raise ParameterError(f"{path} is a LoRA adapter: pass the base model it was trained on")
        if has_adapter(base_model):
            raise ParameterError("base_model already carries an adapter; call "
                                 "unload_adapter(model) first or load a fresh model")
        with _quiet_peft():
            model = PeftModel.from_pretrained(base_model, str(path), is_trainable=is_trainable)
        return model if is_trainable else model.eval()
    # deferred: transformers is a heavy import, needed only for a full-rank checkpoint
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if base_model is not None:
        kwargs["dtype"] = next(base_model.parameters()).dtype
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False, **kwargs)
    if base_model is not None:
        model.to(next(base_model.parameters()).device)
    float32_output_head(model)  # in a half dtype, computes as models.load_model's base does
    contiguous_output_head(model)
    return model.eval()


# --- checkpoint selection -----------------------------------------------------------------------

CHECKPOINT_RULES = ("auto", "utility", "first_below", "last")
"""How a chapter picks the checkpoint it scores (interventions.chosen_step): ``auto`` (the
default: the paper's utility rule where the aligned model's development MMLU accuracy lies above
chance, else first-below, :func:`resolve_rule`), the paper's utility rule, the first checkpoint
below the target threshold, or the last one."""


def resolve_rule(rule: str, utility_above_chance: bool | None) -> str:
    """The rule ``rule`` stands for on a run: ``auto`` is ``utility`` when the aligned model's
    development MMLU interval lies above chance (``utility_above_chance``; None, unknown, for a
    run recorded before it was kept, keeps the paper's rule), and ``first_below`` when it does
    not: a model answering at chance has no utility to lose, so "utility dropped less than 3
    points" passes or fails by the noise of the sample and its choice says nothing. Any other
    rule is itself. Raises ParameterError for an unknown rule."""
    if rule not in CHECKPOINT_RULES:
        raise ParameterError(f"checkpoint rule '{rule}' unknown; rules: {', '.join(CHECKPOINT_RULES)}")
    if rule != "auto":
        return rule
    return "first_below" if utility_above_chance is False else "utility"


def _utility_map(utility_by_step) -> dict[int, float]:
    if isinstance(utility_by_step, pd.DataFrame):
        if not {"step", "utility"} <= set(utility_by_step.columns):
            raise ParameterError("utility_by_step as a table needs columns step and utility")
        return {int(s): float(u) for s, u in zip(utility_by_step["step"], utility_by_step["utility"])}
    if isinstance(utility_by_step, (pd.Series, Mapping)):
        return {int(s): float(u) for s, u in dict(utility_by_step).items()}
    raise ParameterError("utility_by_step must be {step: utility}, a Series indexed by step, or "
                         "a table with step and utility")


def _checkpoint_rows(checkpoints) -> list[dict]:
    rows = checkpoints.to_dict("records") if isinstance(checkpoints, pd.DataFrame) else list(checkpoints)
    if any("step" not in r for r in rows):
        raise ParameterError("every checkpoint needs a 'step'")
    return sorted(rows, key=lambda r: r["step"])


def select_checkpoint(checkpoints, utility_by_step, aligned_utility: float,
                      max_drop: float = 0.03) -> dict | None:
    """The paper's rule: the LAST checkpoint whose utility drops less than ``max_drop``.

    "Drops less than 3%" is read as absolute points of accuracy: ``aligned_utility - utility <
    max_drop`` with utilities as fractions (0.03 = 3 points; the paper's MMLU numbers are
    percentages, so a 3% relative drop would be about 1.8 points at 60% and would differ only
    slightly). A rise in utility is acceptable. Checkpoints without a utility are skipped.
    "Last" is literal: a late checkpoint that passes is chosen even after an earlier one
    failed. Returns the checkpoint's row with ``utility`` and ``drop`` added, or None when no
    checkpoint passes.
    """
    if max_drop < 0:
        raise ParameterError(f"max_drop must be >= 0, got {max_drop}")
    utility = _utility_map(utility_by_step)
    values = list(utility.values()) + [aligned_utility]
    if max(values) > 1 and max_drop < 1:
        raise ParameterError(f"the utilities look like percentages (up to {max(values)}) but "
                             f"max_drop={max_drop} is a fraction; pass utilities as fractions "
                             "(0-1) or max_drop in points (e.g. 3)")
    if max(values) <= 1 and max_drop >= 1:
        raise ParameterError(f"the utilities are fractions (0-1) but max_drop={max_drop} would "
                             "accept any drop; give max_drop as a fraction (0.03 = 3 points)")
    chosen = None
    for row in _checkpoint_rows(checkpoints):
        u = utility.get(int(row["step"]))
        if u is None or (isinstance(u, float) and math.isnan(u)):
            continue
        drop = aligned_utility - u
        if drop < max_drop:
            chosen = {**row, "utility": u, "drop": drop}
    return chosen


def first_checkpoint_below(checkpoints, value_by_step, threshold: float = 0.25) -> dict | None:
    """The FIRST checkpoint whose value (e.g. target refusal) is below ``threshold``, or None.

    The second choice the chapters show beside the utility rule: when did unlearning first
    reach its goal (target refusal under 25%)?
    """
    values = _utility_map(value_by_step)
    for row in _checkpoint_rows(checkpoints):
        v = values.get(int(row["step"]))
        if v is not None and v < threshold:
            return {**row, "value": v}
    return None
