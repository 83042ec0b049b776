"""The data sets of the unlearning chapters: forget set, retain set and SFT labels.

The paper's recipe (../shared/paper/mushtaq2026.md, sections Unlearning and Containment):
:func:`build_forget_set` runs the aligned model on the target concept's train prompts and keeps
the prompts it refuses, with its own refusal as the response (the paper's D_R).
:func:`build_sft_labels` has a weakly aligned small model write compliant answers to the same
prompts (the "finetune" baseline's labels, made at run time, never stored in data/).
:func:`build_retain_set` collects the aligned model's refusals on the *other* concepts, in equal
proportion, plus its answers to benign instructions (the containment retain set D_T).

All three return tables with ``id, concept, prompt, response`` and ``complete`` (whether the
response ended by itself, see :func:`complete_flags`), so any of them can be fed to
:func:`ema_utils.methods.trainer.unlearn` or inspected. With a model name, the judged generations are
artifacts of the results cache (ema_utils.core.cache).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from ..core.console import log as console_log
from .. import CONCEPTS
from ..core.cache import cached, stable_hash
from ..core.data import load_prompts, load_set
from ..core.errors import ParameterError
from ..core.generation import generate_responses
from ..core.judges.registry import judge_fingerprint, score_responses
from ..core.models import load_model, model_digest
from .condition import parse_ratio  # noqa: F401  (one definition; sets' callers read it here)


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
            lm, lt = load_model(labeller, log=console_log)
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


def _equal_split(total: int, names: Sequence[str]) -> dict[str, int]:
    base, extra = divmod(total, len(names))
    return {c: base + (1 if i < extra else 0) for i, c in enumerate(names)}


def build_retain_set(model, tokenizer, concept: str, n_forget: int, ratio=1, seed: int = 0,
                     benign_fraction: float = 0.5, prompts: pd.DataFrame | None = None,
                     benign: pd.DataFrame | None = None, judge: str = "phrase",
                     max_new_tokens: int = 64, batch_size: int = 16, model_id: str | None = None,
                     progress: bool = True) -> pd.DataFrame:
    """The paper's retain set D_T: ``ratio * n_forget`` examples of behaviour to keep.

    - Refusals: the aligned model's refusals on train prompts of every concept except
      ``concept``, the same number per concept (concepts without refusal-scored prompts,
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
    if concept not in known | set(CONCEPTS):
        raise ParameterError(f"concept {concept!r} is not a concept of the prompts; "
                             f"concepts: {', '.join(sorted(known))}")
    others = [c for c in CONCEPTS if c in known and c != concept] + sorted(
        known - set(CONCEPTS) - {concept})
    if not others:
        raise ParameterError("no non-target concept has refusal-scored prompts to retain")
    benign_pool = _prompt_table(benign, "benign").assign(concept="benign")
    n_benign = min(int(round(benign_fraction * requested)), len(benign_pool))
    n_refusal = requested - n_benign  # a benign shortfall is made up with refusals

    inputs = {"items": _items_hash(pool), "benign": _items_hash(benign_pool),
              "target": concept, "requested": requested, "n_benign": n_benign,
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

