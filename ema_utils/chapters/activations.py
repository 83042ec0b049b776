"""Hidden states at the last prompt token, every layer: the prompts chapter 5 reads them from,
the forward pass that reads them, their cached container and its mean normalisation.

:mod:`ema_utils.chapters.concepts` turns them into concept vectors; :mod:`ema_utils.chapters.directions` into
refusal directions. Choices made here (the paper does not state them):

- **Token position.** The prompt goes through the chat template with the generation prompt
  (``add_generation_prompt=True``), and the state is read at its last token: the end of
  "<|im_start|>assistant\\n" for Qwen. That is the position from which the model emits its first
  response token, where a refusal is decided ("I'm sorry..."): the same position as the
  first-token refusal score and the first-token KL of chapters 1-2. Because that token is the
  same template token for every prompt, what differs between prompts is the model's reading of
  the prompt, not the identity of the token. (Hence layer 0, the token embedding, is identical
  for every prompt and is left out of every analysis.) ``hidden_states[L]`` (the last layer) is
  read after the final norm, as transformers returns it; the others are the residual stream.
- **Which prompts.** The items chapter 3 scores (refusal prompts; BBQ's ambiguous multiple-choice
  prompt for Bias; the ToxiGen agree/disagree probe for Toxicity), from the TRAIN split, so the
  vectors are never fit on the items the EMA is measured on. Benign prompts (the project's
  benign set, train split) serve only for the difference-of-means vectors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.console import progress_bar
from .. import CONCEPTS
from ..core.cache import cached, stable_hash
from ..core.data import load_set
from ..core.errors import ParameterError
from ..core.evaluate import eval_items, sample_items

BENIGN = "benign"
POSITION = ("last prompt token of the chat-templated prompt with the generation prompt "
            "(add_generation_prompt=True)")


# --- the prompts -------------------------------------------------------------------------------

def concept_prompts(concepts: Iterable[str] = CONCEPTS, n_per_concept: int = 200, seed: int = 0,
                    split: str = "train", benign: bool = True, data_dir=None) -> pd.DataFrame:
    """Up to ``n_per_concept`` prompts per concept (0: all) from ``split``: the items chapter 3
    scores (refusal prompts, ambiguous BBQ items, toxic ToxiGen statements as probes), plus as
    many benign prompts (concept "benign") when ``benign``. Columns: id, concept, prompt."""
    concepts = tuple(concepts)
    unknown = [c for c in concepts if c not in CONCEPTS]
    if unknown:
        raise ParameterError(f"unknown concept(s) {unknown}; concepts: {', '.join(CONCEPTS)}")
    if n_per_concept is None or n_per_concept < 0:
        raise ParameterError(f"n_per_concept must be 0 (all) or positive, got {n_per_concept}")
    table = eval_items(concepts, split=split, n_per_concept=n_per_concept, seed=seed,
                       data_dir=data_dir)[["id", "concept", "prompt"]]
    parts = [table]
    if benign:
        safe = load_set("benign", split=split, data_dir=data_dir).assign(concept=BENIGN)
        parts.append(sample_items(safe, n_per_concept, seed)[["id", "concept", "prompt"]])
    return pd.concat(parts, ignore_index=True)


# --- hidden states -----------------------------------------------------------------------------

def _decoder(model):
    """The model's transformer without the LM head (no vocabulary-sized logits to compute)."""
    get = getattr(model, "get_decoder", None)
    try:
        decoder = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        decoder = None
    return decoder if decoder is not None else model


def hidden_states(model, tokenizer, prompts, batch_size: int = 8, system: str | None = None,
                  progress: bool = True) -> np.ndarray:
    """Hidden states at the last prompt token, every layer: an array (n, n_layers + 1, hidden).

    Index 0 is the token embedding, index L the output of layer L (the last one after the final
    norm). Prompts go through the chat template with the generation prompt; batches are sorted
    by length and padded on the left with matching position ids, so the last column is every
    prompt's last token and batching does not change the states.
    """
    # deferred: torch loads only when states are computed
    import torch

    # deferred: generation imports torch
    from ..core.generation import encode_chats, left_pad, length_sorted_batches

    if batch_size < 1:
        raise ParameterError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(prompts, pd.DataFrame):
        prompts = prompts["prompt"].tolist()
    prompts = list(prompts)
    if not prompts:
        raise ParameterError("no prompts to read hidden states from")
    encoded = encode_chats(tokenizer, prompts, system)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    decoder = _decoder(model)
    out = None
    bar = progress_bar(total=len(prompts), desc="hidden states", unit="prompt",
                       disable=not progress)
    with torch.inference_mode():
        for batch in length_sorted_batches([len(e) for e in encoded], batch_size):
            input_ids, mask = left_pad([encoded[i] for i in batch], pad_id, device)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            result = decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                             output_hidden_states=True, use_cache=False)
            last = torch.stack([h[:, -1, :] for h in result.hidden_states], dim=1)
            last = last.float().cpu().numpy()
            if out is None:
                out = np.zeros((len(prompts),) + last.shape[1:], dtype=np.float32)
            out[batch] = last
            bar.update(len(batch))
    bar.close()
    return out


def answer_token_means(model, tokenizer, table: pd.DataFrame, batch_size: int = 8,
                       progress: bool = True) -> np.ndarray:
    """The mean hidden state over the *answer* tokens, every layer: (n_layers + 1, hidden),
    float64. ``table`` has columns prompt and response (and ``complete``); each response is
    teacher-forced after its chat-templated prompt and every response token's state counts
    once (long answers weigh more). The reading Soligo et al. use for their directions, beside
    :func:`hidden_states`' single last prompt token. Empty responses are left out."""
    # deferred: torch loads only when states are computed
    import torch

    # deferred: the trainer imports torch and peft
    from ..methods.trainer import collate, encode_examples

    if batch_size < 1:
        raise ParameterError(f"batch_size must be at least 1, got {batch_size}")
    table = table[table["response"].fillna("").astype(str).str.strip() != ""]
    if table.empty:
        raise ParameterError("no non-empty responses to read answer-token states from")
    examples = encode_examples(tokenizer, table)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    decoder = _decoder(model)
    total, count = None, 0
    bar = progress_bar(total=len(examples), desc="answer states", unit="answer",
                       disable=not progress)
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad_id, device)
            result = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True, use_cache=False)
            # labels mark the answer tokens (-100 on the prompt and the padding)
            answer = (batch["labels"] != -100).float()
            sums = torch.stack([(h.float() * answer[..., None]).sum(dim=(0, 1))
                                for h in result.hidden_states])
            total = sums if total is None else total + sums
            count += int(answer.sum())
            bar.update(len(batch["input_ids"]))
    bar.close()
    return (total / count).double().cpu().numpy()


@dataclass
class HiddenStates:
    """Hidden states of a set of prompts (``states[i]`` belongs to ``items.iloc[i]``)."""

    states: np.ndarray  # (n, n_layers + 1, hidden), float32
    items: pd.DataFrame  # id, concept, prompt
    model_id: str = ""
    folder: Path | None = None

    @property
    def n_layers(self) -> int:
        return self.states.shape[1] - 1

    @property
    def labels(self) -> np.ndarray:
        return self.items["concept"].to_numpy()

    @property
    def concepts(self) -> list[str]:
        """The concepts present (book order), benign prompts excluded."""
        present = set(self.labels)
        return [c for c in CONCEPTS if c in present] + sorted(
            c for c in present if c not in CONCEPTS and c != BENIGN)

    def layers(self) -> list[int]:
        """The layers analysed: 1..L (layer 0, the embedding of the same token, is left out)."""
        return list(range(1, self.n_layers + 1))

    def normalised(self, layer: int) -> np.ndarray:
        """States at ``layer`` minus the balanced mean of the concepts' states (float64)."""
        return mean_normalise(self.states[:, layer, :], self.labels, self.concepts)[0]

    def counts(self) -> pd.Series:
        return self.items["concept"].value_counts().reindex(self.concepts + (
            [BENIGN] if BENIGN in set(self.labels) else []))


def collect_hidden_states(model, tokenizer, model_id: str, items: pd.DataFrame,
                          batch_size: int = 8, system: str | None = None,
                          progress: bool = True) -> HiddenStates:
    """:func:`hidden_states` of ``items`` (id, concept, prompt), cached as an artifact.

    The artifact (a folder with states.npy and items.jsonl) is keyed by ``model_id``, the
    model's dtype, the prompt ids and texts and the token position, so a second call with the
    same model and prompts reads it back without a forward pass.
    """
    missing = {"id", "concept", "prompt"} - set(items.columns)
    if missing:
        raise ParameterError(f"items lack column(s) {sorted(missing)}; they need id, concept, prompt")
    items = items[["id", "concept", "prompt"]].reset_index(drop=True)
    dtype = str(next(model.parameters()).dtype)
    inputs = {"model": model_id, "dtype": dtype, "position": POSITION, "system": system,
              "prompts": stable_hash(items[["id", "concept", "prompt"]].values.tolist()),
              "version": 1}

    def fill(folder: Path):
        states = hidden_states(model, tokenizer, items["prompt"].tolist(), batch_size=batch_size,
                               system=system, progress=progress)
        np.save(folder / "states.npy", states)
        items.to_json(folder / "items.jsonl", orient="records", lines=True, force_ascii=False)
        (folder / "meta.json").write_text(json.dumps(
            {"model": model_id, "dtype": dtype, "position": POSITION, "shape": list(states.shape),
             "layer_0": "token embedding", "layer_L": "after the final norm"}, indent=2))

    folder = cached("hidden-states", inputs, fill, kind="dir")
    states = np.load(folder / "states.npy")
    stored = pd.read_json(folder / "items.jsonl", orient="records", lines=True, dtype=False)
    return HiddenStates(states=states, items=stored, model_id=model_id, folder=folder)


# --- mean normalisation ------------------------------------------------------------------------

def _concept_order(labels, concepts=None) -> list[str]:
    present = set(labels)
    if concepts is None:
        concepts = [c for c in CONCEPTS if c in present] + sorted(
            c for c in present if c not in CONCEPTS and c != BENIGN)
    return list(concepts)


def mean_normalise(states: np.ndarray, labels: Sequence[str], concepts=None,
                   balanced: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(states - mean, mean)``, the mean taken over the concepts' rows (benign ones excluded):
    the mean of the concept means when ``balanced``, else the mean over all those rows.
    ``states`` is (n, hidden) or (n, layers, hidden); the mean is per layer."""
    labels = np.asarray(labels)
    concepts = _concept_order(labels, concepts)
    x = np.asarray(states, dtype=np.float64)
    if balanced:
        mean = np.mean([x[labels == c].mean(axis=0) for c in concepts], axis=0)
    else:
        mean = x[np.isin(labels, concepts)].mean(axis=0)
    return x - mean, mean


__all__ = ["BENIGN", "POSITION", "concept_prompts", "hidden_states", "HiddenStates",
           "collect_hidden_states", "mean_normalise"]
