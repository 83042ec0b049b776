"""Refusal unlearning (NPO), the SFT baseline, and their retain-augmented and KL variants.

The paper's recipe (../shared/paper/mushtaq2026.md, sections Unlearning and Containment):

1. **Data.** :func:`build_forget_set` runs the aligned model on the target concept's train
   prompts and keeps the prompts it refuses, with its own refusal as the response (the paper's
   D_R). :func:`build_sft_labels` has a weakly aligned small model write compliant answers to
   the same prompts (the "finetune" baseline's labels, made at run time, never stored in data/).
   :func:`build_retain_set` collects the aligned model's refusals on the *other* concepts, in
   equal proportion, plus its answers to benign instructions (the containment retain set D_T).
   All three return tables with ``id, concept, prompt, response`` (and ``complete``, see
   :func:`encode_examples`), so any of them can be fed to :func:`unlearn` or inspected.
2. **Training.** :func:`unlearn` with an :class:`UnlearnConfig` runs one method:

   ============ ===================================================================
   method        loss per step
   ============ ===================================================================
   npo           w_forget * NPO(forget)                        (the paper's Eq. 1)
   sft           w_sft * CE(sft labels)                        (the "finetune" baseline)
   npo_retain    w_forget * NPO(forget) + w_retain * CE(retain)
   sft_retain    w_retain * CE(retain) + w_sft * CE(sft labels)
   npo_kl        w_forget * NPO(forget) + kl_lambda * KL(P_ref || P_theta) on retain
   ============ ===================================================================

   The losses themselves are pure functions in :mod:`ema_utils.losses`.
3. **Checkpoints.** Every ``checkpoint_every`` steps (and at step 0) the adapter is saved and
   the first-token KL to the aligned model is measured per concept (the paper's Fig. 2);
   :func:`select_checkpoint` applies the paper's utility rule to the saved checkpoints.

The reference model pi_ref of NPO and of the KL term is the aligned model. With LoRA it is the
same network with the adapter switched off (``model.disable_adapter()``): no second copy of the
weights. With full-rank training it is the caller's model itself, left untouched, while a deep
copy is trained.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import sys
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

from . import CONCEPTS
from . import losses as L
from .cache import atomic_write_dir, atomic_write_json, atomic_write_table, cached, stable_hash
from .errors import ParameterError
from .generation import encode_chats, generate_responses, length_sorted_batches
from .judges import score_responses

METHODS = ("npo", "sft", "npo_retain", "sft_retain", "npo_kl")
"""The training objectives :func:`unlearn` knows (see the module's table)."""

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""LoRA on every attention and MLP projection (Qwen2, Llama and Mistral names), as in the pilot."""

METHOD_PARTS: dict[str, dict[str, str]] = {
    "npo": {"npo": "w_forget"},
    "sft": {"sft_ce": "w_sft"},
    "npo_retain": {"npo": "w_forget", "retain_ce": "w_retain"},
    "sft_retain": {"retain_ce": "w_retain", "sft_ce": "w_sft"},
    "npo_kl": {"npo": "w_forget", "kl": "kl_lambda"},
}
"""Per method: loss part -> the config field holding its weight."""

KL_POSITIONS = ("response", "all")


# --- configuration ------------------------------------------------------------------------------

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
            bad("method", f"one of {', '.join(METHODS)}")
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
        for part, weight in METHOD_PARTS[self.method].items():
            if getattr(self, weight) == 0:
                bad(weight, f"> 0 for method {self.method!r} (it weighs the {part} loss)")

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def uses_forget(self) -> bool:
        return "npo" in METHOD_PARTS[self.method]

    @property
    def uses_sft(self) -> bool:
        return "sft_ce" in METHOD_PARTS[self.method]

    @property
    def uses_retain(self) -> bool:
        return any(p in METHOD_PARTS[self.method] for p in ("retain_ce", "kl"))

    def loss_weights(self) -> dict[str, float]:
        """``{part: weight}`` of this method's objective (the input of losses.combine)."""
        return {part: float(getattr(self, w)) for part, w in METHOD_PARTS[self.method].items()}

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


# --- examples and batches -----------------------------------------------------------------------

def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn: ``<|im_end|>`` in ChatML models, else EOS.

    Training targets end with it so the model learns where a response stops, exactly the token
    at which generation (ema_utils.generation) stops.
    """
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        return int(vocab["<|im_end|>"])
    if tokenizer.eos_token_id is None:
        raise ParameterError("the tokenizer has neither <|im_end|> nor an eos token; set "
                             "tokenizer.eos_token")
    return int(tokenizer.eos_token_id)


def complete_flags(tokenizer, responses: Sequence[str], max_new_tokens: int) -> list[bool]:
    """Whether each generated response ended by itself (not cut at ``max_new_tokens``).

    generate_responses returns text only, so this re-tokenizes it: a response at least
    ``max_new_tokens - 1`` tokens long may have been cut (re-tokenizing the stripped text can
    lose a token), and counts as incomplete. On the safe side: an answer cut mid-sentence must
    not get an end-of-turn token appended, or retain training would teach the model to stop
    mid-sentence.
    """
    if not len(responses):
        return []
    lengths = [len(ids) for ids in tokenizer(list(responses), add_special_tokens=False)["input_ids"]]
    return [n < max_new_tokens - 1 for n in lengths]


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


# --- training data --------------------------------------------------------------------------------

def _prompt_table(prompts, name: str = "prompts") -> pd.DataFrame:
    if isinstance(prompts, pd.DataFrame):
        if "prompt" not in prompts.columns:
            raise ParameterError(f"{name} lacks a 'prompt' column")
        table = prompts.copy()
        if "scorer" in table.columns:
            # BBQ and ToxiGen rows are scored by their answers, not by refusal: they have no
            # refusal to unlearn or retain.
            table = table[table["scorer"].fillna("refusal") == "refusal"]
    else:
        prompts = [str(p) for p in prompts]
        table = pd.DataFrame({"prompt": prompts})
    if "id" not in table.columns:
        table["id"] = [f"p{i}" for i in range(len(table))]
    if "concept" not in table.columns:
        table["concept"] = ""
    if table["id"].duplicated().any():
        raise ParameterError(f"{name}: ids must be unique; duplicated: "
                             f"{sorted(table['id'][table['id'].duplicated()].astype(str))[:5]}")
    return table[["id", "concept", "prompt"]].reset_index(drop=True)


def _items_hash(table: pd.DataFrame) -> str:
    return stable_hash(table["id"].astype(str).tolist() + table["prompt"].tolist())


def _judge_digest(judge: str) -> str:
    from .judges import judge_fingerprint

    return judge_fingerprint(judge)


def _generate_and_judge(model, tokenizer, table, judge, max_new_tokens, batch_size, progress):
    """The table with ``response``, ``complete`` and ``is_refusal`` (greedy, chat template)."""
    if table.empty:
        return table.assign(response=pd.Series(dtype=str), complete=pd.Series(dtype=bool),
                            is_refusal=pd.Series(dtype=bool))
    generated = generate_responses(model, tokenizer, table[["id", "concept", "prompt"]],
                                   max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   progress=progress)
    judged = score_responses(generated, judge=judge)
    judged["complete"] = complete_flags(tokenizer, judged["response"].tolist(), max_new_tokens)
    return judged.reset_index(drop=True)


def _maybe_cached(name: str, key: str | None, inputs: dict, compute: Callable[[], pd.DataFrame]):
    """Cache a table under ``name`` when the caller named the model (``key``); else compute."""
    if key is None:
        return compute()
    return cached(name, {"model": key, **inputs}, compute, kind="table")


def _hash_order(table: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Rows in a seeded order that does not depend on the table's order (sha256 of seed:id)."""
    rank = table["id"].map(lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return table.assign(_rank=rank).sort_values("_rank", kind="stable").drop(
        columns="_rank").reset_index(drop=True)


def build_forget_set(model, tokenizer, prompts_table: pd.DataFrame, judge: str = "phrase",
                     max_new_tokens: int = 64, batch_size: int = 16, limit: int | None = None,
                     seed: int = 0, model_id: str | None = None,
                     progress: bool = True) -> pd.DataFrame:
    """The paper's D_R: the target concept's prompts the aligned model refuses, with its refusal.

    ``prompts_table``: id, concept, prompt (e.g. ``load_prompts("cybersecurity", split="train")``;
    rows whose ``scorer`` is not "refusal" are dropped). Greedy responses are judged by
    ``judge``; only refusals are kept. ``limit`` keeps at most that many, chosen by a seeded
    hash of the id (a superset when it grows). With ``model_id`` (a name that identifies the
    weights) the judged generations are cached as an artifact.

    Returns id, concept, prompt, response, complete; ``.attrs`` holds ``n_prompts`` and
    ``n_refusals`` (before ``limit``) for the chapter's statistics.
    """
    table = _prompt_table(prompts_table, "prompts_table")
    inputs = {"items": _items_hash(table), "judge": judge, "fingerprint": _judge_digest(judge),
              "max_new_tokens": max_new_tokens}
    judged = _maybe_cached("forget_set", model_id, inputs, lambda: _generate_and_judge(
        model, tokenizer, table, judge, max_new_tokens, batch_size, progress))
    refused = judged[judged["is_refusal"].astype(bool)].drop(columns="is_refusal")
    if limit is not None:
        if limit < 1:
            raise ParameterError(f"limit must be at least 1 or None, got {limit}")
        keep = set(_hash_order(refused, seed)["id"].head(limit))
        refused = refused[refused["id"].isin(keep)]
    refused = refused.reset_index(drop=True)
    refused.attrs = {"n_prompts": int(len(judged)), "n_refusals": int(judged["is_refusal"].sum())}
    if refused.empty:
        warnings.warn(f"build_forget_set: the model refused none of the {len(judged)} prompts; "
                      "the forget set is empty", stacklevel=2)
    return refused


def build_sft_labels(prompts, labeller="smollm2-135m-instruct", judge: str = "phrase",
                     max_new_tokens: int = 64, batch_size: int = 16, labeller_id: str | None = None,
                     cache: bool = True, progress: bool = True) -> pd.DataFrame:
    """Compliant labels for the SFT baseline: a weakly aligned model's answers to ``prompts``.

    The paper used SmolLM; the default is the registry's smollm2-135m-instruct (loaded only
    when the labels are not cached yet). ``labeller`` is a registry name, a local path or hub
    id, or an already loaded ``(model, tokenizer)`` (cached only with ``labeller_id``). Answers
    the ``judge`` calls refusals are dropped: the baseline trains on compliance. The labels are
    an artifact of the results cache, never a file in data/ (no harmful completion is stored as
    data).

    Returns id, concept, prompt, response, complete; ``.attrs``: ``n_prompts``, ``n_labels``.
    """
    from .models import model_digest

    table = _prompt_table(prompts)
    if isinstance(labeller, str):
        key = f"{labeller}:{model_digest(labeller)}" if cache else None
    elif isinstance(labeller, (tuple, list)) and len(labeller) == 2:
        key = labeller_id if cache else None
    else:
        raise ParameterError("labeller must be a model name or a (model, tokenizer) pair, got "
                             f"{type(labeller).__name__}")

    def compute():
        if isinstance(labeller, str):
            from .models import load_model

            lm, lt = load_model(labeller, log=lambda m: print(m, file=sys.stderr))
        else:
            lm, lt = labeller
        return _generate_and_judge(lm, lt, table, judge, max_new_tokens, batch_size, progress)

    inputs = {"items": _items_hash(table), "judge": judge, "fingerprint": _judge_digest(judge),
              "max_new_tokens": max_new_tokens}
    judged = _maybe_cached("sft_labels", key, inputs, compute)
    keep = ~judged["is_refusal"].astype(bool) & (judged["response"].fillna("").str.strip() != "")
    out = judged[keep].drop(columns="is_refusal").reset_index(drop=True)
    out.attrs = {"n_prompts": int(len(judged)), "n_labels": int(len(out))}
    return out


def parse_ratio(ratio) -> float:
    """Retain examples per forget example: 2, 2.0 or "1:2" -> 2.0 (the CLI's --retain-ratio)."""
    value = ratio
    if isinstance(ratio, str):
        parts = ratio.split(":")
        try:
            value = float(parts[1]) / float(parts[0]) if len(parts) == 2 else float(parts[0])
        except (ValueError, ZeroDivisionError):
            value = None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 \
            or not math.isfinite(value):
        raise ParameterError(f"ratio must be a positive number or 'forget:retain' such as '1:2'; "
                             f"got {ratio!r}")
    return float(value)


def _equal_split(total: int, names: Sequence[str]) -> dict[str, int]:
    base, extra = divmod(total, len(names))
    return {c: base + (1 if i < extra else 0) for i, c in enumerate(names)}


def build_retain_set(model, tokenizer, target_concept: str, n_forget: int, ratio=1, seed: int = 0,
                     benign_fraction: float = 0.5, prompts: pd.DataFrame | None = None,
                     benign: pd.DataFrame | None = None, judge: str = "phrase",
                     max_new_tokens: int = 64, batch_size: int = 16, model_id: str | None = None,
                     progress: bool = True) -> pd.DataFrame:
    """The paper's retain set D_T: ``ratio * n_forget`` examples of behaviour to keep.

    - Refusals: the aligned model's refusals on train prompts of every concept except
      ``target_concept``, the same number per concept (concepts without refusal-scored prompts,
      such as bias, whose items are multiple choice, are skipped). Prompts are tried in a
      seeded order and generated in chunks only until each concept's quota is met. A concept
      that runs out of refusals gives its shortfall to the others, equally.
    - Benign: ``benign_fraction`` of the set (not stated in the paper; a parameter) from the
      benign train instructions, with the aligned model's own answers (kept whatever they say:
      the point is to keep the model as it was).

    Only train-split prompts are used (rows with another ``split`` raise), so recovery measured
    on eval prompts is never memorisation. ``prompts`` / ``benign`` replace the project's sets.
    Returns id, concept ("benign" for benign rows), kind ("refusal" or "benign"), prompt,
    response, complete; ``.attrs``: ``requested`` and ``per_concept`` counts. The set is
    smaller than requested (with a warning) only when the data run out.
    """
    from .data import load_prompts, load_set

    ratio = parse_ratio(ratio)
    if not isinstance(n_forget, (int, np.integer)) or n_forget < 1:
        raise ParameterError(f"n_forget must be a positive integer (the forget set's size), got "
                             f"{n_forget!r}")
    if not 0 <= benign_fraction <= 1:
        raise ParameterError(f"benign_fraction must be in [0, 1], got {benign_fraction}")
    requested = int(round(ratio * n_forget))
    if prompts is None:
        prompts = load_prompts(split="train")
    if benign is None:
        benign = load_set("benign", split="train")
    for name, t in (("prompts", prompts), ("benign", benign)):
        if "split" in t.columns and (t["split"] != "train").any():
            raise ParameterError(f"{name} holds rows of split "
                                 f"{sorted(set(t['split']) - {'train'})}; the retain set takes "
                                 "train prompts only (eval prompts measure recovery)")
    pool = _prompt_table(prompts)
    known = set(pool["concept"])
    if target_concept not in known | set(CONCEPTS):
        raise ParameterError(f"target_concept {target_concept!r} is not a concept of the prompts; "
                             f"concepts: {', '.join(sorted(known))}")
    others = [c for c in CONCEPTS if c in known and c != target_concept] + sorted(
        known - set(CONCEPTS) - {target_concept})
    if not others:
        raise ParameterError("no non-target concept has refusal-scored prompts to retain")
    benign_pool = _prompt_table(benign, "benign").assign(concept="benign")
    n_benign = min(int(round(benign_fraction * requested)), len(benign_pool))
    n_refusal = requested - n_benign  # a benign shortfall is made up with refusals

    inputs = {"items": _items_hash(pool), "benign": _items_hash(benign_pool),
              "target": target_concept, "requested": requested, "n_benign": n_benign,
              "seed": seed, "judge": judge, "fingerprint": _judge_digest(judge),
              "max_new_tokens": max_new_tokens}
    # batch_size is not in the key: prompts are generated in contiguous chunks of one seeded
    # order and the first refusals in that order are kept, whatever the chunk size.

    def compute():
        pools = {c: _hash_order(pool[pool["concept"] == c], seed) for c in others}
        order = list(_hash_order(pd.DataFrame({"id": others}), seed)["id"])
        kept = _collect_refusals(model, tokenizer, pools, order, n_refusal, judge,
                                 max_new_tokens, batch_size, progress)
        chosen = _hash_order(benign_pool, seed).head(n_benign)
        answered = _generate_and_judge(model, tokenizer, chosen, judge, max_new_tokens,
                                       batch_size, progress).drop(columns="is_refusal")
        parts = [kept.assign(kind="refusal"), answered.assign(kind="benign")]
        table = pd.concat(parts, ignore_index=True)
        return table[["id", "concept", "kind", "prompt", "response", "complete"]]

    table = _maybe_cached("retain_set", model_id, inputs, compute)
    table.attrs = {"requested": requested,
                   "per_concept": {str(k): int(v) for k, v in table["concept"].value_counts().items()}}
    if len(table) < requested:
        warnings.warn(f"build_retain_set: only {len(table)} of the requested {requested} examples "
                      "(the non-target concepts ran out of refusals); the ratio is lower than asked",
                      stacklevel=2)
    return table


def _collect_refusals(model, tokenizer, pools: dict[str, pd.DataFrame], order: Sequence[str],
                      total: int, judge, max_new_tokens, batch_size, progress) -> pd.DataFrame:
    """``total`` refusals spread equally over ``order``'s concepts (water-filling on shortfall)."""
    kept: dict[str, list[dict]] = {c: [] for c in order}
    pos = {c: 0 for c in order}

    def fill(c, want):
        # Generate in chunks: twice the missing count (about half the prompts of a concept are
        # refused), so a small retain set costs a few generations, not the whole pool.
        while len(kept[c]) < want and pos[c] < len(pools[c]):
            size = max(batch_size, 2 * (want - len(kept[c])))
            chunk = pools[c].iloc[pos[c]:pos[c] + size]
            pos[c] += len(chunk)
            judged = _generate_and_judge(model, tokenizer, chunk, judge, max_new_tokens,
                                         batch_size, progress)
            kept[c].extend(judged[judged["is_refusal"].astype(bool)].drop(
                columns="is_refusal").to_dict("records"))

    targets = _equal_split(total, order)
    exhausted: set[str] = set()
    while True:
        for c in order:
            if c not in exhausted:
                fill(c, targets[c])
        short = [c for c in order if c not in exhausted and len(kept[c]) < targets[c]]
        deficit = sum(targets[c] - len(kept[c]) for c in short)
        for c in short:
            targets[c] = len(kept[c])
            exhausted.add(c)
        open_ = [c for c in order if c not in exhausted
                 and (pos[c] < len(pools[c]) or len(kept[c]) > targets[c])]
        if deficit == 0 or not open_:
            break
        for c, extra in _equal_split(deficit, open_).items():
            targets[c] += extra
    rows = [r for c in order for r in kept[c][:targets[c]]]
    columns = ["id", "concept", "prompt", "response", "complete"]
    return pd.DataFrame(rows, columns=columns) if rows else pd.DataFrame(columns=columns)


# --- models: LoRA, reference, checkpoints ---------------------------------------------------------

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
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def unload_adapter(model):
    """The base model with the adapter's layers removed (not merged): the aligned model again.

    With LoRA, :func:`unlearn` and :func:`load_checkpoint` inject the adapter into the model
    they are given; call this on ``result.model`` before training or loading another adapter
    on the same base.
    """
    if not has_adapter(model):
        return model
    return model.unload()


def _trainable_copy(model):
    """The copy full-rank training updates (a function of its own so tests can check that LoRA
    training never makes one)."""
    trained = copy.deepcopy(model)
    # The trained weights and AdamW's state stay float32 even when the model computes in a
    # half dtype: bf16 weights cannot take updates of lr-sized steps (8 bits of mantissa).
    if next(trained.parameters()).dtype in (torch.bfloat16, torch.float16):
        trained.float()
    trained.requires_grad_(True)
    return trained


def save_checkpoint(model, folder, tokenizer=None) -> Path:
    """Save an adapter (peft) or a full model into ``folder``, atomically.

    The folder appears complete (with a ``.complete`` marker) or not at all: an interrupted
    save leaves nothing a later run would load.
    """
    from peft import PeftModel

    def fill(tmp: Path):
        if isinstance(model, PeftModel):
            model.save_pretrained(str(tmp))
        else:
            if tokenizer is None:
                raise ParameterError("saving a full-rank checkpoint needs the tokenizer")
            from .models import save_plain

            save_plain(model, tokenizer, tmp)

    return atomic_write_dir(Path(folder), fill)


def _weights_file(path: Path) -> Path:
    for name in ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin"):
        if (path / name).is_file():
            return path / name
    raise ParameterError(f"{path}: no adapter_model.safetensors or model.safetensors; not a "
                         "checkpoint folder written by ema_utils.unlearning")


def adapter_digest(path, length: int = 16) -> str:
    """sha256 (first ``length`` hex digits) of a checkpoint's weights file, for cache keys."""
    from .paths import sha256_file

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
        from peft import PeftModel

        if base_model is None:
            raise ParameterError(f"{path} is a LoRA adapter: pass the base model it was trained on")
        if has_adapter(base_model):
            raise ParameterError("base_model already carries an adapter; call "
                                 "unload_adapter(model) first or load a fresh model")
        with _quiet_peft():
            model = PeftModel.from_pretrained(base_model, str(path), is_trainable=is_trainable)
        return model if is_trainable else model.eval()
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if base_model is not None:
        kwargs["dtype"] = next(base_model.parameters()).dtype
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False, **kwargs)
    if base_model is not None:
        model.to(_device_of(base_model))
    return model.eval()


# --- training -----------------------------------------------------------------------------------

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


class _Trainer:
    """One run's state: the trained model, its reference, data, optimizer and records."""

    def __init__(self, model, tokenizer, config: UnlearnConfig, forget, retain, sft, eval_prompts,
                 output_dir: Path, progress: bool):
        self.config, self.tokenizer, self.progress = config, tokenizer, progress
        self.output_dir = output_dir
        self.pad_id = _pad_id(tokenizer)
        self.device = _device_of(model)
        self.forget = encode_examples(tokenizer, forget) if config.uses_forget else None
        self.retain = encode_examples(tokenizer, retain) if config.uses_retain else None
        self.sft = encode_examples(tokenizer, sft) if config.uses_sft else None
        self.eval_prompts = eval_prompts
        if config.lora:
            self.model = self._wrap_lora(model)
            self.ref_model = None
            self.reference = "adapter_disabled"
        else:
            # The caller's model stays the aligned reference; a copy is trained (two copies in
            # memory either way, and the caller keeps an untouched aligned model).
            self.ref_model = model
            self.ref_model.eval()
            self.model = _trainable_copy(model)
            self.reference = "frozen_copy"
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr,
                                           weight_decay=config.weight_decay)

    def _wrap_lora(self, model):
        from peft import LoraConfig, get_peft_model

        c = self.config
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

    @contextlib.contextmanager
    def reference_model(self):
        """The aligned model, for no-grad forward passes, in eval mode."""
        if self.ref_model is not None:
            with torch.no_grad():
                yield self.ref_model
        else:
            with self.model.disable_adapter(), torch.no_grad(), _eval_mode(self.model):
                yield self.model

    # -- the pieces of one step ------------------------------------------------------------------

    def _batch(self, examples, idx):
        return collate([examples[i] for i in idx], self.pad_id, self.device)

    def micro_step(self, forget_idx, retain_idx, sft_idx) -> tuple[dict, dict]:
        """The loss parts of one micro-batch (with graph) and the forget log-prob (without)."""
        c, parts, extra = self.config, {}, {}
        if c.uses_forget:
            batch = self._batch(self.forget, forget_idx)
            logp = L.sequence_logprob(*_response_logits(self.model, batch))
            parts["npo"] = L.npo_loss(logp, self.ref_logp[forget_idx].to(logp), c.beta)
            extra["forget_logp"] = logp.detach().mean()
        if c.uses_sft:
            batch = self._batch(self.sft, sft_idx)
            parts["sft_ce"] = L.response_cross_entropy(*_response_logits(self.model, batch))
        if c.uses_retain:
            batch = self._batch(self.retain, retain_idx)
            if c.method == "npo_kl":
                # Full-width logits: the KL's mask may cover every position (kl_positions "all").
                logits = _logits(self.model, batch)
                with self.reference_model() as ref:
                    ref_logits = _logits(ref, batch)
                mask = (L.response_positions(batch["labels"]) if c.kl_positions == "response"
                        else batch["attention_mask"].bool())
                parts["kl"] = L.token_kl(ref_logits, logits, mask)
            else:
                parts["retain_ce"] = L.response_cross_entropy(*_response_logits(self.model, batch))
        return parts, extra

    def first_token_logp(self, model) -> np.ndarray:
        from .judges import first_token_distribution

        return first_token_distribution(model, self.tokenizer, self.eval_prompts["prompt"].tolist(),
                                        batch_size=self.config.eval_batch_size, log=True,
                                        progress=False)

    def checkpoint(self, step: int) -> dict:
        """Save the model (if asked) and measure the first-token KL to the aligned model."""
        from .judges import first_token_kl

        row: dict[str, Any] = {"step": step, "path": None}
        if self.config.save_checkpoints:
            folder = self.output_dir / f"checkpoint-{step:05d}"
            save_checkpoint(self.model, folder, self.tokenizer)
            row["path"] = str(folder)
        if self.eval_prompts is not None:
            kl = first_token_kl(self.ref_first, self.first_token_logp(self.model), log=True)
            per_prompt = self.eval_prompts[["id", "concept"]].assign(step=step, kl=kl)
            self.kl_rows.append(per_prompt[["step", "id", "concept", "kl"]])
            for concept, value in per_prompt.groupby("concept", sort=False)["kl"].mean().items():
                row[f"kl_{concept}"] = float(value)
        return row

    def write_records(self, losses, checkpoints, kl) -> None:
        atomic_write_table(self.output_dir / "losses.jsonl", losses)
        atomic_write_table(self.output_dir / "checkpoints.jsonl", checkpoints)
        atomic_write_table(self.output_dir / "kl.jsonl", kl)
        atomic_write_json(self.output_dir / "config.json", self.config.to_dict())

    # -- the loop --------------------------------------------------------------------------------

    def total_steps(self) -> int:
        c = self.config
        if c.max_steps is not None:
            return c.max_steps
        n = len(self.forget if c.uses_forget else self.sft)
        return c.epochs * math.ceil(math.ceil(n / c.batch_size) / c.grad_accum)

    def run(self, callback) -> UnlearnResult:
        from tqdm.auto import tqdm

        c = self.config
        if c.uses_forget:
            # pi_ref(y|x) of the forget set never changes: computed once, not every step.
            with self.reference_model() as ref:
                self.ref_logp = _sequence_logprobs(ref, self.forget, self.pad_id, c.eval_batch_size)
        self.kl_rows: list[pd.DataFrame] = []
        if self.eval_prompts is not None:
            with self.reference_model() as ref:
                self.ref_first = self.first_token_logp(ref)
        cyclers = {
            "forget": _Cycler(len(self.forget), c.batch_size, c.seed) if c.uses_forget else None,
            "sft": _Cycler(len(self.sft), c.batch_size, c.seed + 2) if c.uses_sft else None,
            "retain": _Cycler(len(self.retain), c.retain_batch_size or c.batch_size, c.seed + 1)
            if c.uses_retain else None,
        }
        weights = c.loss_weights()
        total = self.total_steps()
        loss_rows, ckpt_rows = [], [self.checkpoint(0)]
        self.model.train()
        bar = tqdm(total=total, desc=f"unlearn ({c.method})", unit="step", file=sys.stderr,
                   disable=not self.progress)
        stopped, step = False, 0
        try:
            for step in range(1, total + 1):
                start = time.perf_counter()
                sums: dict[str, float] = {}
                for _ in range(c.grad_accum):
                    idx = {k: (cy.next() if cy else None) for k, cy in cyclers.items()}
                    parts, extra = self.micro_step(idx["forget"], idx["retain"], idx["sft"])
                    loss = L.combine(parts, weights)
                    (loss / c.grad_accum).backward()
                    for k, v in {"total": loss, **parts, **extra}.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) / c.grad_accum
                if c.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                record = {"step": step, **sums, "seconds": time.perf_counter() - start}
                loss_rows.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{sums['total']:.4f}")
                ckpt = None
                if step % c.checkpoint_every == 0 or step == total:
                    ckpt = self.checkpoint(step)
                    ckpt_rows.append(ckpt)
                    self.model.train()
                    self.write_records(*self._tables(loss_rows, ckpt_rows))
                if callback is not None and callback(step, {"losses": record, "checkpoint": ckpt,
                                                            "model": self.model}):
                    stopped = True
                    if ckpt is None:
                        ckpt_rows.append(self.checkpoint(step))
                    break
        finally:
            bar.close()
            self.model.eval()
        losses, checkpoints, kl = self._tables(loss_rows, ckpt_rows)
        self.write_records(losses, checkpoints, kl)
        return UnlearnResult(model=self.model, losses=losses, checkpoints=checkpoints, kl=kl,
                             config=c, output_dir=self.output_dir, reference=self.reference,
                             seconds_per_step=float(losses["seconds"].mean()) if len(losses)
                             else float("nan"), stopped_early=stopped)

    def _tables(self, loss_rows, ckpt_rows):
        losses = pd.DataFrame(loss_rows)
        checkpoints = pd.DataFrame(ckpt_rows)
        kl = (pd.concat(self.kl_rows, ignore_index=True) if self.kl_rows
              else pd.DataFrame(columns=["step", "id", "concept", "kl"]))
        return losses, checkpoints, kl


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch for the run without disturbing the caller's random state afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def unlearn(model, tokenizer, forget: pd.DataFrame | None = None, config: UnlearnConfig | None = None,
            retain: pd.DataFrame | None = None, sft: pd.DataFrame | None = None,
            eval_prompts: pd.DataFrame | None = None,
            callback: Callable[[int, dict], bool | None] | None = None, *,
            output_dir=None, progress: bool = True) -> UnlearnResult:
    """Train ``model`` with ``config.method`` and return losses, checkpoints and the model.

    - ``forget``: id, prompt, response (:func:`build_forget_set`), for the npo methods;
    - ``sft``: compliant labels (:func:`build_sft_labels`), for the sft methods;
    - ``retain``: :func:`build_retain_set`, for npo_retain, sft_retain and npo_kl;
    - ``eval_prompts``: id, concept, prompt; at every checkpoint the mean first-token
      KL(aligned || current) per concept is recorded (the paper's Fig. 2). The aligned
      model's first-token distributions are kept in memory: n x vocab x 4 bytes (0.6 MB per
      prompt with the default model's 151,936 tokens);
    - ``callback(step, info)`` runs after every optimizer step (``info``: losses, checkpoint
      row or None, model); returning True stops training after a final checkpoint;
    - ``output_dir``: where checkpoints (``checkpoint-NNNNN/``) and the tables (losses.jsonl,
      checkpoints.jsonl, kl.jsonl, config.json) go; a new temporary folder when None.

    With LoRA the adapter is injected into ``model`` itself (``result.model`` wraps it; use
    :func:`unload_adapter` to get the aligned model back before another run). Full-rank
    training trains a copy and leaves ``model`` as it was. The same seed gives the same
    losses on the same machine; the caller's random state is left as it was.
    """
    config = config if config is not None else UnlearnConfig()
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
            warnings.warn(f"unlearn: {name} is not used by method {config.method!r}; ignored",
                          stacklevel=2)
    if eval_prompts is not None:
        missing = [col for col in ("id", "concept", "prompt") if col not in eval_prompts.columns]
        if missing:
            raise ParameterError(f"eval_prompts lacks column(s) {missing}; it needs id, concept, prompt")
        eval_prompts = eval_prompts.reset_index(drop=True)
    if has_adapter(model):
        raise ParameterError("the model already carries an adapter (from an earlier unlearn or "
                             "load_checkpoint); call unload_adapter(model) first or load a fresh "
                             "model")
    output_dir = Path(output_dir) if output_dir is not None else Path(
        tempfile.mkdtemp(prefix=f"ema-unlearn-{config.method}-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    with _seeded(config.seed, _device_of(model)):
        trainer = _Trainer(model, tokenizer, config, forget, retain, sft, eval_prompts,
                           output_dir, progress)
        return trainer.run(callback)


# --- checkpoint selection -----------------------------------------------------------------------

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
