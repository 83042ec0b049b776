"""Concept entanglement (the paper's R3): concept vectors per layer and whether they predict EMA.

The paper (Mushtaq et al. 2026) reads the hidden state at the last prompt token of 200 prompts per
concept, at every layer; mean-normalises them; takes the first principal component of each
concept's states as its *concept vector* (RepE-style); and shows, for one layer (5 of 32) of one
model, histograms of the cosine between the Safety (or Cybersecurity) vector and every concept's
prompts. It links that overlap to where EMA appeared, qualitatively. This module reproduces that
and adds the quantitative test the paper did not run: across the six non-target concepts, the
Spearman correlation between similarity to the target and the EMA measured in chapters 2-3, at
every layer, with a bootstrap interval and an exact permutation p-value.

Choices made here (the paper does not state them):

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
- **Mean normalisation.** Per layer, the mean over the concepts' prompts is subtracted from every
  state. The mean is *balanced* (the mean of the seven concept means): the same as the mean over
  all prompts when every concept has the same number of prompts (the paper's 200 each), while
  with this project's unequal train splits it keeps the largest set (BBQ) from defining "zero".
- **PCA.** sklearn's PCA of one concept's normalised states (``center="concept"``, the default:
  sklearn re-centres on the concept's own mean, so the vector is the main axis along which the
  concept's prompts vary) or an uncentred SVD of the normalised states (``center="global"``: the
  concept's offset from the global mean counts as variance too). The sign of a principal
  component is arbitrary; it is fixed so that the vector points towards the concept's mean.
- **Bootstrap.** With six non-target concepts a bootstrap over concepts is degenerate (most
  resamples hold three or four distinct concepts, and the concepts are the paper's fixed seven,
  not a sample). The randomness that matters is which prompts stand for each concept, so the
  interval resamples prompts *within* each concept and recomputes the global mean, the concept
  vectors and the similarities, keeping the measured EMA fixed. It therefore does not include the
  sampling error of the EMA measurements themselves (see chapter 3's Wilson intervals).
- **Permutation p-value.** Exact: the Spearman coefficient for every one of the n! orderings of
  the EMA values (720 for six concepts), one-sided in the hypothesised direction (more similar
  to the target -> larger drop / earlier collapse). With six concepts the smallest possible
  p-value is 1/720. Across layers, Holm's correction is reported beside the raw p-values.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import CONCEPTS
from .errors import EmaError, ParameterError

PAPER_LAYER_FRACTION = 5 / 32
"""The paper's layer: 5 of Mistral-7B's 32."""

BENIGN = "benign"
POSITION = ("last prompt token of the chat-templated prompt with the generation prompt "
            "(add_generation_prompt=True)")

MEASURES = {"drop_points": "greater", "half_step": "less"}
"""The two EMA measures and the direction in which "more similar -> more EMA" lies: a larger
drop in refusal at the chosen checkpoint (points), an earlier step at which the concept lost half
its refusal along training (optimizer steps)."""

MEASURE_LABELS = {"drop_points": "drop in refusal at the chosen checkpoint (points)",
                  "half_step": "step at which half the refusal was lost (optimizer steps)"}
METHOD_LABELS = {"pca": "first principal component (the paper's)",
                 "diff_means": "difference of means vs benign prompts"}


# --- prompts and hidden states -------------------------------------------------------------------

def paper_layer(n_layers: int, fraction: float = PAPER_LAYER_FRACTION) -> int:
    """The layer at the paper's relative depth: round(fraction * n_layers), at least 1 (layer 0
    is the token embedding, the same for every prompt at this position) and at most n_layers."""
    if not 0 <= fraction <= 1:
        raise ParameterError(f"layer_fraction must be between 0 and 1, got {fraction}")
    return int(min(n_layers, max(1, round(fraction * n_layers))))


def choose_layer(n_layers: int, layer: int | None = None,
                 fraction: float = PAPER_LAYER_FRACTION) -> int:
    """``layer`` when given (checked: 1..n_layers), else :func:`paper_layer`."""
    if layer is None:
        return paper_layer(n_layers, fraction)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
            or not 1 <= layer <= n_layers:
        raise ParameterError(f"layer must be None or an integer from 1 to {n_layers} (this model's "
                             f"number of layers; 0 is the token embedding), got {layer!r}")
    return int(layer)


def concept_prompts(concepts: Iterable[str] = CONCEPTS, n_per_concept: int = 200, seed: int = 0,
                    split: str = "train", benign: bool = True, data_dir=None) -> pd.DataFrame:
    """Up to ``n_per_concept`` prompts per concept (0: all) from ``split``: the items chapter 3
    scores (refusal prompts, ambiguous BBQ items, toxic ToxiGen statements as probes), plus as
    many benign prompts (concept "benign") when ``benign``. Columns: id, concept, prompt."""
    from .data import load_set
    from .evaluate import eval_items, sample_items

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
    import torch
    from tqdm import tqdm

    from .generation import encode_chats, left_pad, length_sorted_batches

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
    bar = tqdm(total=len(prompts), desc="hidden states", unit="prompt", disable=not progress,
               file=sys.stderr)
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
    from .cache import cached, stable_hash

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


# --- normalisation and concept vectors ---------------------------------------------------------

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


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else np.zeros_like(v)


def sign_towards(vector: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """``vector`` or ``-vector``, whichever has a non-negative dot product with ``direction``."""
    return -vector if float(np.dot(vector, direction)) < 0 else vector


def first_principal_component(x: np.ndarray, center: bool = True) -> np.ndarray:
    """The first principal direction (unit length, arbitrary sign) of the rows of ``x``:
    sklearn's PCA (centred on the rows' mean) or, with ``center=False``, the top right singular
    vector of ``x`` as it is. Rows without any spread give the zero vector."""
    from sklearn.decomposition import PCA

    x = np.asarray(x, dtype=np.float64)
    y = x - x.mean(axis=0) if center else x
    if len(x) < 2 or not np.any(np.abs(y) > 1e-12 * max(1.0, float(np.abs(x).max()))):
        return np.zeros(x.shape[1])
    if center:
        return _unit(PCA(n_components=1, svd_solver="full").fit(x).components_[0])
    return _unit(np.linalg.svd(x, full_matrices=False)[2][0])


def _top_direction(y: np.ndarray) -> np.ndarray:
    """Top right singular vector of ``y`` via the smaller Gram matrix (fast; used in the
    bootstrap, where it replaces sklearn's PCA: the same direction up to sign)."""
    if len(y) <= y.shape[1]:
        _, vecs = np.linalg.eigh(y @ y.T)
        v = y.T @ vecs[:, -1]
    else:
        _, vecs = np.linalg.eigh(y.T @ y)
        v = vecs[:, -1]
    return _unit(v)


@dataclass
class ConceptVectors:
    """One unit vector per concept and layer: ``vectors[i, layer]`` for ``concepts[i]``."""

    method: str  # "pca" or "diff_means"
    concepts: list[str]
    layers: list[int]  # the layers computed (others are zero)
    vectors: np.ndarray  # (n_concepts, n_layers + 1, hidden)
    center: str = "concept"
    settings: dict = field(default_factory=dict)

    def at(self, layer: int) -> np.ndarray:
        if layer not in self.layers:
            raise ParameterError(f"layer {layer} was not computed; layers: {self.layers}")
        return self.vectors[:, layer, :]

    def get(self, concept: str, layer: int) -> np.ndarray:
        if concept not in self.concepts:
            raise ParameterError(f"no vector for concept '{concept}'; concepts: {self.concepts}")
        return self.at(layer)[self.concepts.index(concept)]


def _vector(x, labels, concept, mean, method, center, benign=BENIGN):
    """One concept's unit vector at one layer from un-normalised rows ``x`` and global ``mean``."""
    rows = x[labels == concept]
    if method == "diff_means":
        base = x[labels == benign]
        if not len(base):
            raise ParameterError("difference-of-means vectors need benign prompts (concept "
                                 f"'{benign}'); build the items with concept_prompts(benign=True)")
        return _unit(rows.mean(axis=0) - base.mean(axis=0))
    if center == "concept":  # sklearn re-centres on the concept's mean
        v = first_principal_component(rows - mean, center=True)
    else:
        v = first_principal_component(rows - mean, center=False)
    return sign_towards(v, rows.mean(axis=0) - mean)


def _check_method(method: str, center: str) -> None:
    if method not in METHOD_LABELS:
        raise ParameterError(f"method must be one of {', '.join(METHOD_LABELS)}, got {method!r}")
    if center not in ("concept", "global"):
        raise ParameterError(f"center must be 'concept' or 'global', got {center!r}")


def concept_vectors(hs: HiddenStates, method: str = "pca", center: str = "concept",
                    layers: Iterable[int] | None = None) -> ConceptVectors:
    """Every concept's vector at every layer (default 1..L).

    ``method="pca"``: the first principal component of the concept's mean-normalised states,
    sign-fixed towards the concept's mean (see the module notes for ``center``).
    ``method="diff_means"``: the concept's mean state minus the benign prompts' mean state.
    """
    from threadpoolctl import threadpool_limits

    _check_method(method, center)
    layers = hs.layers() if layers is None else sorted(int(l) for l in layers)
    concepts, labels = hs.concepts, hs.labels
    out = np.zeros((len(concepts), hs.n_layers + 1, hs.states.shape[2]))
    # Many small SVDs: BLAS threads cost more than they save (and the cores may be shared).
    with threadpool_limits(limits=1):
        for layer in layers:
            x = hs.states[:, layer, :].astype(np.float64)
            _, mean = mean_normalise(x, labels, concepts)
            for i, concept in enumerate(concepts):
                out[i, layer] = _vector(x, labels, concept, mean, method, center)
    return ConceptVectors(method=method, concepts=concepts, layers=layers, vectors=out,
                          center=center)


# --- similarities ------------------------------------------------------------------------------

def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of ``a`` (n, d) or (d,) with ``b`` (d,); NaN where a norm is zero."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.asarray(b, dtype=np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, a @ b / np.where(denom > 0, denom, 1), np.nan)


def state_cosines(hs: HiddenStates, vectors: ConceptVectors, layer: int,
                  targets: Iterable[str]) -> pd.DataFrame:
    """Cosine of every prompt's normalised state with each target's vector at ``layer``:
    a long table id, concept, target, layer, cosine (benign prompts included)."""
    x = hs.normalised(layer)
    parts = []
    for target in targets:
        parts.append(hs.items[["id", "concept"]].assign(
            target=target, layer=layer, cosine=cosine(x, vectors.get(target, layer))))
    return pd.concat(parts, ignore_index=True)


def similarity_matrix(vectors: ConceptVectors, layer: int) -> pd.DataFrame:
    """Concept x concept cosine between the concept vectors at ``layer``."""
    v = vectors.at(layer)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    u = v / np.where(norms > 0, norms, 1)
    m = np.clip(u @ u.T, -1, 1)
    np.fill_diagonal(m, np.where(norms[:, 0] > 0, 1.0, np.nan))
    return pd.DataFrame(m, index=vectors.concepts, columns=vectors.concepts)


def similarity_matrices(vectors: ConceptVectors) -> dict[int, pd.DataFrame]:
    return {layer: similarity_matrix(vectors, layer) for layer in vectors.layers}


SIMILARITIES = ("states", "vectors")
"""How similarity to the target is summarised per concept: "states", the mean cosine of the
concept's prompts with the target's vector (the mean of the paper's histograms), or "vectors",
the cosine between the concept's vector and the target's."""


def target_similarity(hs: HiddenStates, vectors: ConceptVectors, target: str, layer: int,
                      similarity: str = "states") -> pd.Series:
    """Similarity of every other concept to ``target`` at ``layer`` (index: concept)."""
    if similarity not in SIMILARITIES:
        raise ParameterError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
    others = [c for c in vectors.concepts if c != target]
    if similarity == "vectors":
        return similarity_matrix(vectors, layer).loc[others, target].rename("similarity")
    table = state_cosines(hs, vectors, layer, [target])
    means = table.groupby("concept")["cosine"].mean()
    return means.reindex(others).rename("similarity")


def similarity_table(hs: HiddenStates, vectors: ConceptVectors, targets: Iterable[str],
                     layers: Iterable[int] | None = None, similarity: str = "states") -> pd.DataFrame:
    """Long table target, concept, layer, similarity over ``layers`` (default: all computed)."""
    rows = []
    for target in targets:
        for layer in vectors.layers if layers is None else layers:
            s = target_similarity(hs, vectors, target, layer, similarity)
            rows += [{"target": target, "concept": c, "layer": layer, "similarity": float(v)}
                     for c, v in s.items()]
    return pd.DataFrame(rows)


def bootstrap_similarity(hs: HiddenStates, target: str, layers: Iterable[int], *,
                         method: str = "pca", center: str = "concept",
                         similarity: str = "states", n_boot: int = 200, seed: int = 0,
                         progress: bool = True, resample: bool = True
                         ) -> tuple[np.ndarray, list[str]]:
    """Similarities to ``target`` recomputed on ``n_boot`` resamples of the prompts.

    Each resample draws, within every concept (and the benign prompts), as many prompts as it
    has, with replacement; the global mean, the vectors and the similarities are recomputed from
    it, the same resample at every layer. Returns ``(array (len(layers), n_boot, n_others),
    other concepts)``. ``resample=False`` uses every prompt once in each "resample" (each then
    reproduces the observed similarities: a check of this code against :func:`target_similarity`).
    """
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    _check_method(method, center)
    if similarity not in SIMILARITIES:
        raise ParameterError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
    if n_boot < 1:
        raise ParameterError(f"n_boot must be at least 1, got {n_boot}")
    concepts, labels = hs.concepts, hs.labels
    if target not in concepts:
        raise ParameterError(f"target '{target}' has no prompts; concepts: {concepts}")
    others = [c for c in concepts if c != target]
    groups = concepts + ([BENIGN] if BENIGN in set(labels) else [])
    where = {g: np.flatnonzero(labels == g) for g in groups}
    rng = np.random.default_rng(seed)
    draws = [{g: rng.choice(idx, size=len(idx), replace=True) if resample else idx
              for g, idx in where.items()} for _ in range(n_boot)]
    layers = list(layers)
    out = np.full((len(layers), n_boot, len(others)), np.nan)
    bar = tqdm(total=len(layers) * n_boot, desc=f"bootstrap ({target})", unit="resample",
               disable=not progress, file=sys.stderr)
    # Small matrices: threads cost more than they save (and the machine may be shared).
    with threadpool_limits(limits=1):
        for li, layer in enumerate(layers):
            x = hs.states[:, layer, :].astype(np.float64)
            sq = np.einsum("ij,ij->i", x, x)
            for b, draw in enumerate(draws):
                means = {g: x[idx].mean(axis=0) for g, idx in draw.items()}
                mean = np.mean([means[c] for c in concepts], axis=0)

                def vec(concept):
                    rows = x[draw[concept]]
                    if method == "diff_means":
                        return _unit(means[concept] - means[BENIGN])
                    y = rows - (means[concept] if center == "concept" else mean)
                    return sign_towards(_top_direction(y), means[concept] - mean)

                if BENIGN not in draw and method == "diff_means":
                    raise ParameterError("difference-of-means vectors need benign prompts")
                v = vec(target)
                if similarity == "vectors":
                    out[li, b] = [float(cosine(vec(c), v)[0]) for c in others]
                    bar.update(1)
                    continue
                # cos(x_i - m, v) for all rows at once, without forming x - m
                dot = x @ v - mean @ v
                norm = np.sqrt(np.maximum(sq - 2 * (x @ mean) + mean @ mean, 0))
                with np.errstate(invalid="ignore", divide="ignore"):
                    cos = np.where(norm > 0, dot / np.where(norm > 0, norm, 1), np.nan)
                out[li, b] = [float(np.mean(cos[draw[c]])) for c in others]
                bar.update(1)
    bar.close()
    return out, others


# --- rank correlation ---------------------------------------------------------------------------

def _ranks(values: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(values, axis=-1)


def spearman_permutation(x: Sequence[float], y: Sequence[float], alternative: str = "greater",
                         n_perm: int = 20000, seed: int = 0) -> tuple[float, float]:
    """``(rho, p)``: Spearman's rho of ``x`` and ``y`` (scipy.stats.spearmanr) and its
    permutation p-value, exact over all n! orderings of ``y`` when n <= 8, else from ``n_perm``
    random ones. ``alternative``: "greater" (p = share of orderings with rho >= the observed),
    "less", or "two-sided" (|rho| >= |observed|). NaN pairs are dropped; fewer than three
    pairs, or a constant variable, give ``(nan, nan)``. Ties get average ranks (the exact test
    then permutes the tied values too, which is the correct conditional test)."""
    from scipy.stats import spearmanr

    if alternative not in ("greater", "less", "two-sided"):
        raise ParameterError(f"alternative must be greater, less or two-sided, got {alternative!r}")
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = len(x)
    if n < 3 or np.unique(x).size < 2 or np.unique(y).size < 2:
        return float("nan"), float("nan")
    rho = float(spearmanr(x, y).statistic)
    rx, ry = _ranks(x), _ranks(y)
    if n <= 8:
        perms = np.array(list(itertools.permutations(range(n))))
    else:
        rng = np.random.default_rng(seed)
        perms = np.array([rng.permutation(n) for _ in range(n_perm)])
    rp = ry[perms]
    cx = rx - rx.mean()
    cp = rp - rp.mean(axis=1, keepdims=True)
    null = (cp @ cx) / (np.linalg.norm(cp, axis=1) * np.linalg.norm(cx))
    tol = 1e-12
    if alternative == "greater":
        p = np.mean(null >= rho - tol)
    elif alternative == "less":
        p = np.mean(null <= rho + tol)
    else:
        p = np.mean(np.abs(null) >= abs(rho) - tol)
    if n > 8:  # a random sample of orderings: never report p = 0
        p = (p * len(perms) + 1) / (len(perms) + 1)
    return rho, float(p)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment (NaN entries stay NaN and are not counted)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out


def correlation_by_layer(observed: pd.DataFrame, boot: np.ndarray | None, ema: pd.Series,
                         alternative: str = "greater", ci: float = 0.95) -> pd.DataFrame:
    """Per layer: Spearman's rho between similarity and EMA across concepts, its bootstrap
    percentile interval and its exact permutation p-value (raw and Holm-adjusted over layers).

    ``observed``: layers x concepts (similarities); ``boot``: (layers, n_boot, concepts) in the
    same order, or None; ``ema``: one value per concept (NaN: not measured, left out).
    """
    ema = ema.reindex(observed.columns).astype(float)
    rows = []
    for li, layer in enumerate(observed.index):
        rho, p = spearman_permutation(observed.loc[layer].to_numpy(), ema.to_numpy(), alternative)
        low = high = float("nan")
        if boot is not None:
            rhos = [_rho(b, ema.to_numpy()) for b in boot[li]]
            rhos = np.array([r for r in rhos if not math.isnan(r)])
            if len(rhos):
                low, high = np.quantile(rhos, [(1 - ci) / 2, 1 - (1 - ci) / 2])
        rows.append({"layer": int(layer), "rho": rho, "low": float(low), "high": float(high),
                     "p": p, "n_concepts": int((~ema.isna()).sum()), "alternative": alternative})
    table = pd.DataFrame(rows)
    table["p_holm"] = holm(table["p"].to_numpy())
    return table


def _rho(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.unique(x).size < 2 or np.unique(y).size < 2:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


# --- the EMA measured in chapters 2 and 3 ------------------------------------------------------

def half_refusal_step(trajectory: pd.DataFrame, fraction: float = 0.5,
                      interpolate: bool = True) -> pd.DataFrame:
    """Per concept, the training step at which its refusal had fallen to ``fraction`` of its
    value at the first step (step 0: the aligned model).

    ``trajectory``: rows step, concept, rate. With ``interpolate`` the step is read off the
    straight line between the last checkpoint above the threshold and the first one at or below
    it; otherwise it is that first checkpoint. A concept that never got there has ``inf``
    (``reached`` False: it collapsed later than training went, if at all); one that was never
    refused at the start has NaN. Columns: concept, start_rate, end_rate, half_step, reached.
    """
    missing = {"step", "concept", "rate"} - set(trajectory.columns)
    if missing:
        raise ParameterError(f"the trajectory lacks column(s) {sorted(missing)}; it needs step, "
                             "concept, rate")
    rows = []
    for concept, part in trajectory.groupby("concept", sort=False):
        part = part.sort_values("step")
        steps, rates = part["step"].to_numpy(float), part["rate"].to_numpy(float)
        start = rates[0]
        row = {"concept": concept, "start_rate": float(start), "end_rate": float(rates[-1]),
               "half_step": float("nan"), "reached": False}
        if not start > 0:
            rows.append(row)
            continue
        threshold = fraction * start
        below = np.flatnonzero(rates[1:] <= threshold)
        if not len(below):
            row["half_step"] = float("inf")
        else:
            k = below[0] + 1
            step = steps[k]
            if interpolate and rates[k - 1] > rates[k]:
                step = steps[k - 1] + (rates[k - 1] - threshold) / (rates[k - 1] - rates[k]) \
                    * (steps[k] - steps[k - 1])
            row.update(half_step=float(step), reached=True)
        rows.append(row)
    table = pd.DataFrame(rows)
    order = [c for c in CONCEPTS if c in set(table["concept"])]
    order += [c for c in table["concept"] if c not in CONCEPTS]
    return table.set_index("concept").loc[order].reset_index()


def ema_measures(cross_summary: Mapping, unlearning_summary: Mapping | None, run: str,
                 reference: str = "aligned") -> pd.DataFrame:
    """Both EMA measures of one intervention, per concept.

    ``cross_summary``: chapter 3's summary (``["refusal"][condition][concept]``, fractions);
    ``unlearning_summary``: chapter 2's, whose ``["trajectory_by_concept"][run]`` holds the
    per-concept trajectory (records step, concept, rate). Columns: concept, aligned, after,
    drop_points, half_step, reached, is_target.
    """
    from .report import condition_parts

    refusal = cross_summary.get("refusal", {})
    aligned = refusal.get(reference, {})
    after = refusal.get(run, {})
    concepts = [c for c in CONCEPTS if c in aligned] + sorted(set(aligned) - set(CONCEPTS))
    table = pd.DataFrame({"concept": concepts,
                          "aligned": [aligned.get(c) for c in concepts],
                          "after": [after.get(c) for c in concepts]})
    table[["aligned", "after"]] = table[["aligned", "after"]].astype(float)
    table["drop_points"] = 100 * (table["aligned"] - table["after"])
    records = ((unlearning_summary or {}).get("trajectory_by_concept") or {}).get(run)
    if records:
        half = half_refusal_step(pd.DataFrame(records))[["concept", "half_step", "reached"]]
        table = table.merge(half, on="concept", how="left")
    else:
        table["half_step"], table["reached"] = float("nan"), False
    table["is_target"] = table["concept"] == condition_parts(run)[1]
    return table


def upstream_model(chapter: str, profile: str) -> str | None:
    """The model an earlier chapter's latest run (for ``profile``) used, from its run.json."""
    from .orchestrate import chapter_results

    record = chapter_results(chapter, profile) / "run.json"
    return json.loads(record.read_text()).get("parameters", {}).get("model")


def load_ema_measures(profile: str, runs: Iterable[str],
                      model: str | None = None) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """``({run: ema_measures table}, notes)`` from chapters 3 and 2 of ``profile``.

    A missing chapter, run or per-concept trajectory is not an error: its measure is left NaN
    and a note says what to run. When ``model`` is given and an upstream chapter ran another
    model, a note says so (similarity on one model cannot predict EMA measured on another).
    """
    from .orchestrate import chapter_summary

    notes, summaries = [], {}
    for chapter in ("cross_domain", "unlearning"):
        try:
            summaries[chapter] = chapter_summary(chapter, profile)
        except EmaError as exc:
            summaries[chapter] = None
            notes.append(f"{chapter}: {exc}")
            continue
        if model is not None:
            ran = upstream_model(chapter, profile)
            if ran is not None and ran != model:
                notes.append(f"{chapter} ran model '{ran}', this chapter '{model}': the EMA was "
                             "measured on another model")
    out = {}
    for run in runs:
        if summaries["cross_domain"] is None:
            continue
        if run not in summaries["cross_domain"].get("refusal", {}):
            notes.append(f"cross_domain: no condition '{run}' (conditions: "
                         f"{', '.join(summaries['cross_domain'].get('refusal', {}))})")
            continue
        unl = summaries["unlearning"]
        if unl is not None and run not in (unl.get("trajectory_by_concept") or {}):
            notes.append(f"unlearning: no per-concept trajectory for '{run}' (summary key "
                         "trajectory_by_concept); the half-refusal step is left out")
        out[run] = ema_measures(summaries["cross_domain"], unl, run)
    return out, notes


def same_model(notes: Sequence[str]) -> bool:
    """False when :func:`load_ema_measures` noted that upstream chapters ran another model."""
    return not any("measured on another model" in n for n in notes)


# --- the whole test -----------------------------------------------------------------------------

def vector_agreement(a: ConceptVectors, b: ConceptVectors) -> pd.DataFrame:
    """Per concept and layer, the cosine between two kinds of concept vector (e.g. PCA and
    difference of means): concept, layer, cosine."""
    rows = []
    for layer in sorted(set(a.layers) & set(b.layers)):
        for concept in a.concepts:
            if concept in b.concepts:
                rows.append({"concept": concept, "layer": layer, "cosine": float(
                    cosine(a.get(concept, layer), b.get(concept, layer))[0])})
    return pd.DataFrame(rows)


def correlation_table(hs: HiddenStates, ema: Mapping[str, pd.DataFrame],
                      methods: Iterable[str] = ("pca",), center: str = "concept",
                      similarity: str = "states", layers: Iterable[int] | None = None,
                      n_boot: int = 200, seed: int = 0, ci: float = 0.95,
                      measures: Mapping[str, str] = MEASURES, vectors: Mapping | None = None,
                      progress: bool = True) -> pd.DataFrame:
    """Spearman correlation between similarity to the target and EMA, per layer.

    ``ema``: run name -> :func:`ema_measures` table (the target is the row with is_target).
    ``vectors``: precomputed :class:`ConceptVectors` per method (computed when missing).
    Long table: run, target, method, measure, layer, rho, low, high, p, p_holm, n_concepts.
    """
    layers = hs.layers() if layers is None else list(layers)
    parts = []
    for method in methods:
        vecs = (vectors or {}).get(method) or concept_vectors(hs, method, center, layers)
        for run, table in ema.items():
            target = table.loc[table["is_target"], "concept"]
            if target.empty:
                raise ParameterError(f"the EMA table of '{run}' marks no target concept")
            target = target.iloc[0]
            observed = similarity_table(hs, vecs, [target], layers, similarity).pivot(
                index="layer", columns="concept", values="similarity")
            others = [c for c in vecs.concepts if c != target]
            observed = observed[others]
            boot = None
            if n_boot:
                boot, order = bootstrap_similarity(hs, target, layers, method=method, center=center,
                                                   similarity=similarity, n_boot=n_boot, seed=seed,
                                                   progress=progress)
                assert order == others
            values = table.set_index("concept")
            for measure, alternative in measures.items():
                if measure not in values.columns:
                    continue
                result = correlation_by_layer(observed, boot, values[measure], alternative, ci)
                parts.append(result.assign(run=run, target=target, method=method,
                                           measure=measure))
    if not parts:
        return pd.DataFrame(columns=["run", "target", "method", "measure", "layer", "rho", "low",
                                     "high", "p", "p_holm", "n_concepts", "alternative"])
    cols = ["run", "target", "method", "measure", "layer", "rho", "low", "high", "p", "p_holm",
            "n_concepts", "alternative"]
    return pd.concat(parts, ignore_index=True)[cols]


def json_records(table: pd.DataFrame, digits: int = 4) -> list[dict]:
    """A table as JSON-safe records for a chapter summary: rounded, NaN as None, inf as "inf"."""
    out = []
    for record in table.round(digits).to_dict("records"):
        for key, value in record.items():
            if isinstance(value, float) and math.isnan(value):
                record[key] = None
            elif isinstance(value, float) and math.isinf(value):
                record[key] = "inf" if value > 0 else "-inf"
            elif isinstance(value, np.generic):
                record[key] = value.item()
        out.append(record)
    return out


def _fmt(x, digits=2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def predicts(row, alpha: float = 0.05) -> bool:
    """A correlation row supports "similarity predicts EMA": p < alpha (one-sided, exact) and a
    bootstrap interval on the predicted side of zero."""
    if math.isnan(row["p"]):
        return False
    side = row["low"] > 0 if row["alternative"] == "greater" else row["high"] < 0
    return bool(row["p"] < alpha and (side or math.isnan(row["low"])))


def entanglement_claims(similarities: pd.DataFrame, correlations: pd.DataFrame, layer: int,
                        alpha: float = 0.05) -> pd.DataFrame:
    """The paper's R3 claims and this chapter's test, each with this run's numbers and a verdict.

    ``similarities``: :func:`similarity_table` (target, concept, layer, similarity) of the
    paper's method; ``correlations``: :func:`correlation_table`; ``layer``: the chosen layer.
    """
    from .plots import label

    rows = []

    def add(claim, paper, numbers, verdict):
        rows.append({"claim": claim, "paper": paper, "this run": numbers, "reproduces": verdict})

    at = similarities[similarities["layer"] == layer]
    cyber = at[at["target"] == "cybersecurity"].sort_values("similarity", ascending=False)
    if len(cyber):
        top = cyber.iloc[0]["concept"]
        add(f"The Cybersecurity vector is most similar to Safety prompts (layer {layer})",
            "yes, at layer 5 of 32 (Mistral-7B)",
            "; ".join(f"{label(r.concept)} {r.similarity:.3f}" for r in cyber.itertuples()),
            "yes" if top == "safety" else "no")
    safety = at[at["target"] == "safety"]
    if len(safety):
        lo, hi = safety["similarity"].min(), safety["similarity"].max()
        positive = int((safety["similarity"] > 0).sum())
        add(f"The Safety vector overlaps all concepts (layer {layer})",
            "mean cosines about 0.09-0.14 for every concept",
            f"mean cosines {lo:.3f} to {hi:.3f}; {positive} of {len(safety)} concepts above 0",
            "yes" if positive == len(safety) else ("partly" if positive else "no"))
    for (run, method, measure), part in correlations.groupby(["run", "method", "measure"],
                                                              sort=False):
        if method != "pca":
            continue
        here = part[part["layer"] == layer]
        if here.empty:
            continue
        r = here.iloc[0]
        sig = part[part["p_holm"] < alpha]
        what = "larger drop" if measure == "drop_points" else "earlier collapse"
        add(f"{run}: similarity to the target predicts EMA ({what}) across the other concepts",
            "suggested qualitatively; not tested",
            f"layer {layer}: rho = {_fmt(r['rho'])} [{_fmt(r['low'])}, {_fmt(r['high'])}], "
            f"one-sided p = {_fmt(r['p'], 3)} (n = {r['n_concepts']} concepts); layers with Holm "
            f"p < {alpha}: {', '.join(map(str, sig['layer'])) if len(sig) else 'none'}",
            "not testable" if math.isnan(r["p"]) else ("yes" if predicts(r, alpha) else "no"))
    return pd.DataFrame(rows)


def verdict_text(correlations: pd.DataFrame, layer: int, n_layers: int, model: str,
                 alpha: float = 0.05) -> str:
    """One plain sentence (markdown): does early-layer similarity predict EMA on this model?"""
    part = correlations[(correlations["method"] == "pca") & (correlations["layer"] == layer)]
    if part.empty or part["p"].isna().all():
        return (f"**Not testable here:** for `{model}` there is no EMA measurement from chapters "
                "2-3 for this profile, or it does not vary across the concepts (see the notes "
                "above).")
    bits, yes = [], 0
    for r in part.itertuples():
        if math.isnan(r.p):
            continue
        ok = predicts(r._asdict(), alpha)
        yes += ok
        bits.append(f"{r.run}, {'drop' if r.measure == 'drop_points' else 'half-refusal step'}: "
                    f"rho = {r.rho:+.2f} [{_fmt(r.low)}, {_fmt(r.high)}], p = {r.p:.3f}")
    tested = len(bits)
    answer = ("does" if yes == tested else "partly" if yes else "does not")
    lead = {"does": "predicts", "partly": "predicts only partly",
            "does not": "does not predict"}[answer]
    return (f"**On `{model}`, similarity to the target concept at layer {layer} of {n_layers} "
            f"{lead} EMA** ({yes} of {tested} tests with one-sided exact p < {alpha} and a "
            f"bootstrap interval on the predicted side of zero): " + "; ".join(bits) + ".")
