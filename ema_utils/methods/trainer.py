"""The training loop of the unlearning chapters: :class:`UnlearnConfig` and :func:`unlearn`.

Read it top to bottom, like nanoGPT's train.py: :func:`unlearn` is one run in one function
(config -> data -> model and adapter -> optimizer -> the loop of steps -> save), and the small
helpers it calls follow it. It trains one method of the registry (:mod:`ema_utils.methods.registry`,
``ema methods``: npo, sft, npo_retain, sft_retain, npo_kl; each a small loss function over one
step's batches and the config fields that weigh its parts) on the tables of
:mod:`ema_utils.methods.sets`. The losses themselves are pure functions in
:mod:`ema_utils.methods.losses`. Every ``checkpoint_every`` steps (and at step 0) the adapter is
saved (:mod:`ema_utils.methods.checkpoints`, which also holds the paper's checkpoint rule) and
the first-token KL to the aligned model is measured per concept (the paper's Fig. 2).

The reference model pi_ref of NPO and of the KL term is the aligned model. With LoRA it is the
same network with the adapter switched off (``model.disable_adapter()``): no second copy of the
weights. With full-rank training it is the caller's model itself, left untouched, while a deep
copy is trained.
"""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core.console import progress_bar
from ..core.cache import atomic_write_json, atomic_write_table
from ..core.errors import ParameterError
from ..core.generation import encode_chats, length_sorted_batches
from ..core.judges.first_token import first_token_distribution, first_token_kl
from ..core.models import retie_output_head
from . import losses as L
from .checkpoints import _quiet_peft, has_adapter, save_checkpoint
from .registry import METHODS, Step, get_method

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""LoRA on every attention and MLP projection (Qwen2, Llama and Mistral names), as in the pilot."""

KL_POSITIONS = ("response", "all")


# --- configuration -------------------------------------------------------------------------------

@dataclass(frozen=True)
class UnlearnConfig:
    """Every setting of one unlearning run. Invalid values raise ParameterError naming the field.

    Defaults follow the pilot on the default model (../shared/notes/pilot-unlearning.md: LoRA r16,
    alpha 16 on all projections, AdamW, batch 4, beta 0.1, lr 3e-5 for a graded effect); the
    paper does not state beta or its final settings (its grid: rank 128-512 with alpha = rank,
    lr 5e-5 or 1e-5, 5 or 10 epochs, batch 8-32).
    """

    method: str = "npo"
    beta: float = 0.1  # NPO inverse temperature (not stated in the paper; 0.1 as in Zhang et al.)
    lr: float = 3e-5
    epochs: int = 1  # passes over the primary set (forget, or sft labels); ignored with max_steps
    max_steps: int | None = None  # optimizer steps; None: epochs decide
    batch_size: int = 4
    grad_accum: int = 1  # micro-batches per optimizer step
    lora: bool = True  # False: full-rank training of every weight
    lora_r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = TARGET_MODULES
    w_forget: float = 1.0  # w1: NPO on the forget set
    w_retain: float = 1.0  # w2: CE on the retain set
    w_sft: float = 1.0  # w3: CE on the compliant labels
    kl_lambda: float = 1.0  # lambda of the KL variant (the second paper used 1e5 with LoRA)
    kl_positions: str = "response"  # KL over "response" tokens of the retain set, or "all" tokens
    retain_batch_size: int | None = None  # None: batch_size (one retain example per forget one)
    weight_decay: float = 0.01  # torch's AdamW default
    max_grad_norm: float | None = None  # None: no clipping
    checkpoint_every: int = 5  # steps between checkpoints (step 0 and the last step always)
    save_checkpoints: bool = True  # False: checkpoints only measure the KL, nothing is written
    eval_batch_size: int = 8  # batch size of the first-token KL and reference log-probs
    seed: int = 0

    def __post_init__(self):
        def bad(name, allowed):
            raise ParameterError(f"UnlearnConfig.{name} must be {allowed}; got "
                                 f"{getattr(self, name)!r}")

        def number(name, positive=False, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or (v <= 0 if positive else v < 0):
                bad(name, ("a positive number" if positive else "a number >= 0")
                    + (" or None" if allow_none else ""))

        def integer(name, minimum, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < minimum:
                bad(name, f"an integer >= {minimum}" + (" or None" if allow_none else ""))

        if self.method not in METHODS:
            bad("method", f"one of {', '.join(METHODS)} (the method registry; `ema methods`)")
        number("beta", positive=True)
        number("lr", positive=True)
        integer("epochs", 1)
        integer("max_steps", 1, allow_none=True)
        integer("batch_size", 1)
        integer("grad_accum", 1)
        if not isinstance(self.lora, bool):
            bad("lora", "True or False")
        integer("lora_r", 1)
        number("lora_alpha", positive=True)
        v = self.lora_dropout
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
            bad("lora_dropout", "a number in [0, 1)")
        modules = self.target_modules
        if isinstance(modules, str):
            modules = tuple(m.strip() for m in modules.split(",") if m.strip())
        modules = tuple(modules) if isinstance(modules, (list, tuple)) else modules
        if not isinstance(modules, tuple) or not modules or not all(
                isinstance(m, str) and m for m in modules):
            bad("target_modules", "a non-empty list of module names such as "
                                  + ", ".join(TARGET_MODULES))
        object.__setattr__(self, "target_modules", modules)
        for name in ("w_forget", "w_retain", "w_sft", "kl_lambda", "weight_decay"):
            number(name)
        if self.kl_positions not in KL_POSITIONS:
            bad("kl_positions", f"one of {', '.join(KL_POSITIONS)}")
        integer("retain_batch_size", 1, allow_none=True)
        number("max_grad_norm", positive=True, allow_none=True)
        integer("checkpoint_every", 1)
        if not isinstance(self.save_checkpoints, bool):
            bad("save_checkpoints", "True or False")
        integer("eval_batch_size", 1)
        integer("seed", 0)
        for part, weight in METHODS[self.method].weights.items():
            if not hasattr(self, weight):
                raise ParameterError(f"method {self.method!r} weighs its {part} loss by "
                                     f"UnlearnConfig.{weight}, which does not exist")
            if getattr(self, weight) == 0:
                bad(weight, f"> 0 for method {self.method!r} (it weighs the {part} loss)")

    # -- helpers ----------------------------------------------------------------------------------

    @property
    def uses_forget(self) -> bool:
        return "forget" in METHODS[self.method].data

    @property
    def uses_sft(self) -> bool:
        return "sft" in METHODS[self.method].data

    @property
    def uses_retain(self) -> bool:
        return "retain" in METHODS[self.method].data

    def loss_weights(self) -> dict[str, float]:
        """``{part: weight}`` of this method's objective (the input of losses.combine)."""
        return {part: float(getattr(self, w)) for part, w in METHODS[self.method].weights.items()}

    def to_dict(self) -> dict:
        """A JSON-able dict (for cache keys and the run record)."""
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None, **overrides) -> "UnlearnConfig":
        """Build from a dict such as a profile block or ``-p key=value`` pairs.

        String values are converted to the field's type ("1e-4" -> 1e-4, "false" -> False,
        "none" -> None, "q_proj,v_proj" -> a tuple); unknown keys raise ParameterError listing
        the known ones.
        """
        params = {**(params or {}), **overrides}
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ParameterError(f"unknown UnlearnConfig parameter(s) {unknown}; known: "
                                 f"{', '.join(known)}")
        return cls(**{k: _coerce(k, v, known[k].default) for k, v in params.items()})

    def replace(self, **changes) -> "UnlearnConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


_OPTIONAL_INT = {"max_steps", "retain_batch_size"}
_OPTIONAL_FLOAT = {"max_grad_norm"}


def _coerce(name: str, value, default):
    if not isinstance(value, str):
        return value
    text = value.strip()
    if name in _OPTIONAL_INT | _OPTIONAL_FLOAT and text.lower() in ("none", "null", ""):
        return None
    try:
        if isinstance(default, bool):
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if name in _OPTIONAL_INT or (isinstance(default, int) and not isinstance(default, bool)):
            as_float = float(text)
            return int(as_float) if as_float.is_integer() else as_float  # 1e3 -> 1000
        if name in _OPTIONAL_FLOAT or isinstance(default, float):
            return float(text)
    except ValueError:
        raise ParameterError(f"UnlearnConfig.{name}: cannot read {value!r} as a "
                             f"{type(default).__name__ if default is not None else 'number'}") from None
    return text  # method, kl_positions, target_modules (split in __post_init__)



# --- the result ----------------------------------------------------------------------------------

@dataclass
class UnlearnResult:
    """What :func:`unlearn` returns.

    - ``model``: the trained model (a PeftModel with LoRA; ``with result.model.disable_adapter():``
      gives the aligned model back);
    - ``losses``: one row per optimizer step: step, total, each loss part (npo, retain_ce,
      sft_ce, kl), forget_logp (mean log pi(y|x) of the forget batch), seconds;
    - ``checkpoints``: step, path (None when not saved), and ``kl_<concept>``: mean first-token
      KL(aligned || model) over ``eval_prompts`` of that concept (nats);
    - ``kl``: the same per prompt (step, id, concept, kl), for intervals;
    - ``reference``: "adapter_disabled" (LoRA) or "frozen_copy" (full rank).
    """

    model: Any
    losses: pd.DataFrame
    checkpoints: pd.DataFrame
    kl: pd.DataFrame
    config: UnlearnConfig
    output_dir: Path
    reference: str
    seconds_per_step: float = float("nan")
    stopped_early: bool = False


# --- the training run ----------------------------------------------------------------------------

def unlearn(model, tokenizer, forget: pd.DataFrame | None = None, config: UnlearnConfig | None = None,
            retain: pd.DataFrame | None = None, sft: pd.DataFrame | None = None,
            eval_prompts: pd.DataFrame | None = None,
            callback: Callable[[int, dict], bool | None] | None = None, *,
            output_dir=None, progress: bool = True) -> UnlearnResult:
    """Train ``model`` with ``config.method`` and return losses, checkpoints and the model.

    - ``forget``: id, prompt, response (:func:`ema_utils.methods.sets.build_forget_set`), for the npo
      methods;
    - ``sft``: compliant labels (:func:`ema_utils.methods.sets.build_sft_labels`), for the sft methods;
    - ``retain``: :func:`ema_utils.methods.sets.build_retain_set`, for npo_retain, sft_retain and npo_kl;
    - ``eval_prompts``: id, concept, prompt; at every checkpoint the mean first-token
      KL(aligned || current) per concept is recorded (the paper's Fig. 2). The aligned
      model's first-token distributions are kept in memory: n x vocab x 4 bytes (0.6 MB per
      prompt with the default model's 151,936 tokens);
    - ``callback(step, info)`` runs after every optimizer step (``info``: losses, checkpoint
      row or None, model); returning True stops training after a final checkpoint;
    - ``output_dir``: where checkpoints (``checkpoint-NNNNN/``) and the tables (losses.jsonl,
      checkpoints.jsonl, kl.jsonl, config.json) go; a new temporary folder when None.

    With LoRA the adapter is injected into ``model`` itself (``result.model`` wraps it; use
    :func:`ema_utils.methods.checkpoints.unload_adapter` to get the aligned model back before another
    run). Full-rank training trains a copy and leaves ``model`` as it was. The same seed gives
    the same losses on the same machine; the caller's random state is left as it was.
    """
    # -- config and inputs: all checked before the model is touched -------------------------------
    c = config if config is not None else UnlearnConfig()
    eval_prompts = _check_inputs(c, model, forget, retain, sft, eval_prompts)
    output_dir = Path(output_dir) if output_dir is not None else Path(
        tempfile.mkdtemp(prefix=f"ema-unlearn-{c.method}-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    device = _device_of(model)
    # Everything below draws from torch's global RNG (LoRA's initialisation, dropout) seeded
    # with c.seed; the caller's random state is restored afterwards.
    with _seeded(c.seed, device):
        # -- data: token ids and labels of each set the method trains on --------------------------
        pad_id = _pad_id(tokenizer)
        data = {"forget": encode_examples(tokenizer, forget) if c.uses_forget else None,
                "retain": encode_examples(tokenizer, retain) if c.uses_retain else None,
                "sft": encode_examples(tokenizer, sft) if c.uses_sft else None}

        # -- model: a LoRA adapter on the model itself, or a full-rank copy -----------------------
        if c.lora:
            model, ref_model, reference_kind = _wrap_lora(model, c), None, "adapter_disabled"
        else:
            # The caller's model stays the aligned reference; a copy is trained (two copies in
            # memory either way, and the caller keeps an untouched aligned model).
            ref_model = model
            ref_model.eval()
            model, reference_kind = _trainable_copy(model), "frozen_copy"

        def reference():
            """The aligned model pi_ref, for no-grad forward passes, in eval mode."""
            return _reference(model, ref_model)

        # -- optimizer: AdamW on the trainable weights (the adapter's, or all of the copy's) ------
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)

        # -- what the reference contributes, computed once ----------------------------------------
        ref_logp = None
        if c.uses_forget:
            # pi_ref(y|x) of the forget set never changes: computed once, not every step.
            with reference() as ref:
                ref_logp = _sequence_logprobs(ref, data["forget"], pad_id, c.eval_batch_size)
        kl_rows: list[pd.DataFrame] = []
        ref_first = None
        if eval_prompts is not None:
            with reference() as ref:
                ref_first = _first_token_logp(ref, tokenizer, eval_prompts, c.eval_batch_size)

        def checkpoint(step: int) -> dict:
            """Save the model (if asked) and measure the first-token KL to the aligned model."""
            row: dict[str, Any] = {"step": step, "path": None}
            if c.save_checkpoints:
                folder = output_dir / f"checkpoint-{step:05d}"
                save_checkpoint(model, folder, tokenizer)
                row["path"] = str(folder)
            if eval_prompts is not None:
                current = _first_token_logp(model, tokenizer, eval_prompts, c.eval_batch_size)
                kl = first_token_kl(ref_first, current, log=True)
                per_prompt = eval_prompts[["id", "concept"]].assign(step=step, kl=kl)
                kl_rows.append(per_prompt[["step", "id", "concept", "kl"]])
                means = per_prompt.groupby("concept", sort=False)["kl"].mean()
                for concept, value in means.items():
                    row[f"kl_{concept}"] = float(value)
            return row

        # -- the loop of optimizer steps ----------------------------------------------------------
        # Seeded streams of example indices, one per set, independent of torch's global RNG.
        cyclers = {
            "forget": _Cycler(len(data["forget"]), c.batch_size, c.seed) if c.uses_forget else None,
            "sft": _Cycler(len(data["sft"]), c.batch_size, c.seed + 2) if c.uses_sft else None,
            "retain": _Cycler(len(data["retain"]), c.retain_batch_size or c.batch_size, c.seed + 1)
            if c.uses_retain else None,
        }
        method, weights = get_method(c.method), c.loss_weights()
        total = _total_steps(c, len(data["forget"] if c.uses_forget else data["sft"]))
        loss_rows, ckpt_rows = [], [checkpoint(0)]
        model.train()
        bar = progress_bar(total=total, desc=f"unlearn ({c.method})", unit="step",
                           disable=not progress)
        stopped, step = False, 0
        try:
            for step in range(1, total + 1):
                start = time.perf_counter()
                sums: dict[str, float] = {}
                for _ in range(c.grad_accum):
                    # the micro-batch: the next examples of each set (forget, sft, retain)
                    idx = {k: cy.next() for k, cy in cyclers.items() if cy is not None}
                    batches = {k: collate([data[k][i] for i in ids], pad_id, device)
                               for k, ids in idx.items()}
                    # the method's loss parts (e.g. npo, retain_ce), their weighted sum, backward
                    step_input = Step(model=model, config=c, batches=batches,
                                      ref_logp=ref_logp[idx["forget"]] if c.uses_forget else None,
                                      reference=reference, logits=_logits,
                                      response_logits=_response_logits)
                    parts = method.loss(step_input)
                    extra = step_input.extra
                    loss = L.combine(parts, weights)
                    (loss / c.grad_accum).backward()
                    for k, v in {"total": loss, **parts, **extra}.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) / c.grad_accum
                # the optimizer step
                if c.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                # log
                record = {"step": step, **sums, "seconds": time.perf_counter() - start}
                loss_rows.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{sums['total']:.4f}")
                # checkpoint (every checkpoint_every steps and the last), tables rewritten
                ckpt = None
                if step % c.checkpoint_every == 0 or step == total:
                    ckpt = checkpoint(step)
                    ckpt_rows.append(ckpt)
                    model.train()
                    _write_records(output_dir, c, *_tables(loss_rows, ckpt_rows, kl_rows))
                if callback is not None and callback(step, {"losses": record, "checkpoint": ckpt,
                                                            "model": model}):
                    stopped = True
                    if ckpt is None:
                        ckpt_rows.append(checkpoint(step))
                    break
        finally:
            bar.close()
            model.eval()

        # -- save: the final tables ---------------------------------------------------------------
        losses, checkpoints, kl = _tables(loss_rows, ckpt_rows, kl_rows)
        _write_records(output_dir, c, losses, checkpoints, kl)
        return UnlearnResult(model=model, losses=losses, checkpoints=checkpoints, kl=kl,
                             config=c, output_dir=output_dir, reference=reference_kind,
                             seconds_per_step=float(losses["seconds"].mean()) if len(losses)
                             else float("nan"), stopped_early=stopped)


# --- the run's helpers ---------------------------------------------------------------------------

def _check_inputs(config, model, forget, retain, sft, eval_prompts) -> pd.DataFrame | None:
    """Refuse a wrong config, missing data or a model that already carries an adapter; returns
    ``eval_prompts`` re-indexed."""
    if not isinstance(config, UnlearnConfig):
        raise ParameterError(f"config must be an UnlearnConfig, got {type(config).__name__}")
    needs = {"forget": config.uses_forget, "retain": config.uses_retain, "sft": config.uses_sft}
    given = {"forget": forget, "retain": retain, "sft": sft}
    hint = {"forget": "build_forget_set", "retain": "build_retain_set", "sft": "build_sft_labels"}
    for name, needed in needs.items():
        if needed and given[name] is None:
            raise ParameterError(f"method {config.method!r} needs {name}=...: build it with "
                                 f"{hint[name]}(...)")
        if needed:
            _check_pairs(given[name], name)
        elif given[name] is not None:
            # stacklevel 3: the warning points at unlearn's caller
            warnings.warn(f"unlearn: {name} is not used by method {config.method!r}; ignored",
                          stacklevel=3)
    if eval_prompts is not None:
        missing = [col for col in ("id", "concept", "prompt") if col not in eval_prompts.columns]
        if missing:
            raise ParameterError(f"eval_prompts lacks column(s) {missing}; it needs id, concept, prompt")
        eval_prompts = eval_prompts.reset_index(drop=True)
    if has_adapter(model):
        raise ParameterError("the model already carries an adapter (from an earlier unlearn or "
                             "load_checkpoint); call unload_adapter(model) first or load a fresh "
                             "model")
    return eval_prompts


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch for the run without disturbing the caller's random state afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _wrap_lora(model, c: UnlearnConfig):
    """``model`` with a fresh LoRA adapter injected (its initialisation draws from torch's RNG)."""
    # deferred: peft is a heavy import, needed only when a LoRA run starts
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                      target_modules=list(c.target_modules), bias="none",
                      task_type="CAUSAL_LM")
    try:
        with _quiet_peft():
            return get_peft_model(model, lora)
    except ValueError as exc:
        raise ParameterError(f"UnlearnConfig.target_modules {list(c.target_modules)} do not "
                             f"match the model's layers ({exc}); name its linear layers, "
                             "e.g. q_proj, v_proj") from exc


def _trainable_copy(model):
    """The copy full-rank training updates (a function of its own so tests can check that LoRA
    training never makes one)."""
    trained = copy.deepcopy(model)
    # The trained weights and AdamW's state stay float32 even when the model computes in a
    # half dtype: bf16 weights cannot take updates of lr-sized steps (8 bits of mantissa).
    if next(trained.parameters()).dtype in (torch.bfloat16, torch.float16):
        trained.float()
    # A half model's head is an untied float32 copy (models.float32_output_head): tied again,
    # the copy trains the one shared matrix a float32 model trains.
    retie_output_head(trained)
    trained.requires_grad_(True)
    return trained


@contextlib.contextmanager
def _reference(model, ref_model):
    """The aligned model, for no-grad forward passes, in eval mode: ``ref_model`` (full rank) or
    ``model`` with its adapter disabled (LoRA)."""
    if ref_model is not None:
        with torch.no_grad():
            yield ref_model
    else:
        with model.disable_adapter(), torch.no_grad(), _eval_mode(model):
            yield model


def _first_token_logp(model, tokenizer, eval_prompts: pd.DataFrame, batch_size: int) -> np.ndarray:
    return first_token_distribution(model, tokenizer, eval_prompts["prompt"].tolist(),
                                    batch_size=batch_size, log=True, progress=False)


class _Cycler:
    """Batches of indices over ``n`` examples, reshuffled every epoch by a seeded generator."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.queue: list[int] = []

    def next(self) -> list[int]:
        if not self.queue:
            self.queue = torch.randperm(self.n, generator=self.generator).tolist()
        batch, self.queue = self.queue[:self.batch_size], self.queue[self.batch_size:]
        return batch


def _total_steps(c: UnlearnConfig, n_primary: int) -> int:
    """Optimizer steps of the run: ``max_steps``, or ``epochs`` passes over the primary set
    (forget, or sft labels) of ``n_primary`` examples."""
    if c.max_steps is not None:
        return c.max_steps
    return c.epochs * math.ceil(math.ceil(n_primary / c.batch_size) / c.grad_accum)


def _tables(loss_rows, ckpt_rows, kl_rows):
    losses = pd.DataFrame(loss_rows)
    checkpoints = pd.DataFrame(ckpt_rows)
    kl = (pd.concat(kl_rows, ignore_index=True) if kl_rows
          else pd.DataFrame(columns=["step", "id", "concept", "kl"]))
    return losses, checkpoints, kl


def _write_records(output_dir: Path, config: UnlearnConfig, losses, checkpoints, kl) -> None:
    atomic_write_table(output_dir / "losses.jsonl", losses)
    atomic_write_table(output_dir / "checkpoints.jsonl", checkpoints)
    atomic_write_table(output_dir / "kl.jsonl", kl)
    atomic_write_json(output_dir / "config.json", config.to_dict())


# --- examples and batches ------------------------------------------------------------------------

def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn: ``<|im_end|>`` in ChatML models, else EOS.

    Training targets end with it so the model learns where a response stops, exactly the token
    at which generation (ema_utils.core.generation) stops.
    """
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        return int(vocab["<|im_end|>"])
    if tokenizer.eos_token_id is None:
        raise ParameterError("the tokenizer has neither <|im_end|> nor an eos token; set "
                             "tokenizer.eos_token")
    return int(tokenizer.eos_token_id)



def _check_pairs(table, name: str) -> pd.DataFrame:
    if not isinstance(table, pd.DataFrame):
        raise ParameterError(f"{name} must be a table (pandas DataFrame) with columns prompt and "
                             f"response, got {type(table).__name__}")
    missing = [c for c in ("prompt", "response") if c not in table.columns]
    if missing:
        raise ParameterError(f"{name} lacks column(s) {missing}; it needs prompt and response "
                             "(build it with build_forget_set, build_sft_labels or build_retain_set)")
    if table.empty:
        raise ParameterError(f"{name} is empty: nothing to train on")
    return table.reset_index(drop=True)


def encode_examples(tokenizer, table: pd.DataFrame, system: str | None = None) -> list[dict]:
    """Token ids and labels of each (prompt, response) row, ready for :func:`collate`.

    ``input_ids`` = chat-templated prompt (as generation sees it) + response tokens + the
    end-of-turn token; ``labels`` = the same with the prompt set to -100, so losses read only
    the response. A row with ``complete`` False (cut at the generation limit) gets no
    end-of-turn token: the response did not end there.
    """
    table = _check_pairs(table, "the table")
    prompt_ids = encode_chats(tokenizer, table["prompt"].astype(str).tolist(), system)
    responses = table["response"].fillna("").astype(str).tolist()
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    complete = table["complete"].tolist() if "complete" in table.columns else [True] * len(table)
    eot = end_of_turn_id(tokenizer)
    examples = []
    for i, (p, r, done) in enumerate(zip(prompt_ids, response_ids, complete)):
        r = list(r) + ([eot] if done is not False else [])
        if not r:
            rid = table["id"].iloc[i] if "id" in table.columns else i
            raise ParameterError(f"row {rid!r} has an empty, incomplete response: no token to "
                                 "train on; drop it")
        examples.append({"input_ids": list(p) + r, "labels": [L.IGNORE_INDEX] * len(p) + r})
    return examples


def collate(examples: Sequence[dict], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels``, RIGHT-padded to the longest example.

    Right padding for training: every sequence keeps positions 0..L-1 and, the attention being
    causal, never sees the pads behind it, so an example's log-probabilities do not depend on
    what it is batched with (no position-id bookkeeping, unlike left-padded generation). Pads
    carry label -100 and mask 0.
    """
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), L.IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for row, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[row, :k] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[row, :k] = torch.tensor(e["labels"], dtype=torch.long)
        mask[row, :k] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
            "labels": labels.to(device)}


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 use_cache=False).logits


def _response_logits(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` cut to the positions from the first one that predicts a response token.

    The vocabulary projection is the largest tensor of a step ((batch, seq, 151936) floats for
    Qwen, kept for the backward pass), and the prompt's positions (the chat template's system
    prefix alone is about 30 tokens) never enter a response loss; ``logits_to_keep`` computes it
    for the kept positions only. Both come back sliced alike, so the losses' internal shift holds.
    """
    labels = batch["labels"]
    counted = (labels != L.IGNORE_INDEX).any(dim=0).nonzero()
    start = max(int(counted[0]) - 1, 0) if len(counted) else 0
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False, logits_to_keep=labels.shape[1] - start).logits
    return logits, labels[:, start:]


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def _sequence_logprobs(model, examples: Sequence[dict], pad_id: int, batch_size: int) -> torch.Tensor:
    out = torch.empty(len(examples), dtype=torch.float64)
    device = _device_of(model)
    with torch.no_grad(), _eval_mode(model):
        for idx in length_sorted_batches([len(e["input_ids"]) for e in examples], batch_size):
            batch = collate([examples[i] for i in idx], pad_id, device)
            out[idx] = L.sequence_logprob(*_response_logits(model, batch)).double().cpu()
    return out


def response_logprobs(model, tokenizer, table: pd.DataFrame, batch_size: int = 8) -> np.ndarray:
    """log pi(y|x) of each row's response given its prompt (summed over response tokens).

    The quantity NPO pushes down on the forget set and CE pushes up on the retain set: compare
    it before and after training to see what an intervention did to the training data.
    """
    examples = encode_examples(tokenizer, table)
    return _sequence_logprobs(model, examples, _pad_id(tokenizer), batch_size).numpy()

