"""Concept entanglement (the paper's R3): concept vectors per layer and whether they predict EMA.

The paper (Mushtaq et al. 2026) reads the hidden state at the last prompt token of 200 prompts per
concept, at every layer; mean-normalises them; takes the first principal component of each
concept's states as its *concept vector* (RepE-style); and shows, for one layer (5 of 32) of one
model, histograms of the cosine between the Safety (or Cybersecurity) vector and every concept's
prompts. It links that overlap to where EMA appeared, qualitatively. This module reproduces that
and adds the quantitative test the paper did not run: across the six non-target concepts, the
Spearman correlation between similarity to the target and the EMA measured in chapters 2-3, at
every layer, with a bootstrap interval and an exact permutation p-value.

Choices made here (the paper does not state them; the token position and the prompts whose
states are read are in :mod:`ema_utils.chapters.activations`):

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
- **Permutation p-value** (:mod:`ema_utils.chapters.rank_correlation`). Exact: the Spearman coefficient for
  every one of the n! orderings of the EMA values (720 for six concepts), one-sided in the
  hypothesised direction (more similar to the target -> larger drop / earlier collapse). With six
  concepts the smallest possible p-value is 1/720. Across layers, Holm's correction is reported
  beside the raw p-values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from ..core.console import progress_bar
from .. import CONCEPTS
from ..core.errors import EmaError, ParameterError
from ..core.results import (
    chapter_results,
    chapter_summary,
    json_records,  # noqa: F401  (chapter 5's notebook reads it here)
)
from ..methods.condition import concept_of
from .activations import BENIGN, HiddenStates, mean_normalise
from .rank_correlation import correlation_by_layer

PAPER_LAYER_FRACTION = 5 / 32
"""The paper's layer: 5 of Mistral-7B's 32."""

MEASURES = {"drop_points": "greater", "half_step": "less"}
"""The two EMA measures and the direction in which "more similar -> more EMA" lies: a larger
drop in refusal at the chosen checkpoint (points), an earlier step at which the concept lost half
its refusal along training (optimizer steps)."""

MEASURE_LABELS = {"drop_points": "drop in refusal at the chosen checkpoint (points)",
                  "half_step": "step at which half the refusal was lost (optimizer steps)"}
METHOD_LABELS = {"pca": "first principal component (the paper's)",
                 "diff_means": "difference of means vs benign prompts"}


# --- the layer ----------------------------------------------------------------------------------

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


# --- concept vectors ---------------------------------------------------------------------------

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
    # deferred: sklearn is slow to import; only the PCA needs it
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


def target_similarity(hs: HiddenStates, vectors: ConceptVectors, concept: str, layer: int,
                      similarity: str = "states") -> pd.Series:
    """Similarity of every other concept to ``concept`` at ``layer`` (index: concept)."""
    if similarity not in SIMILARITIES:
        raise ParameterError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
    others = [c for c in vectors.concepts if c != concept]
    if similarity == "vectors":
        return similarity_matrix(vectors, layer).loc[others, concept].rename("similarity")
    table = state_cosines(hs, vectors, layer, [concept])
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


def bootstrap_similarity(hs: HiddenStates, concept: str, layers: Iterable[int], *,
                         method: str = "pca", center: str = "concept",
                         similarity: str = "states", n_boot: int = 200, seed: int = 0,
                         progress: bool = True, resample: bool = True
                         ) -> tuple[np.ndarray, list[str]]:
    """Similarities to ``concept`` recomputed on ``n_boot`` resamples of the prompts.

    Each resample draws, within every concept (and the benign prompts), as many prompts as it
    has, with replacement; the global mean, the vectors and the similarities are recomputed from
    it, the same resample at every layer. Returns ``(array (len(layers), n_boot, n_others),
    other concepts)``. ``resample=False`` uses every prompt once in each "resample" (each then
    reproduces the observed similarities: a check of this code against :func:`target_similarity`).
    """
    _check_method(method, center)
    if similarity not in SIMILARITIES:
        raise ParameterError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
    if n_boot < 1:
        raise ParameterError(f"n_boot must be at least 1, got {n_boot}")
    concepts, labels = hs.concepts, hs.labels
    if concept not in concepts:
        raise ParameterError(f"target '{concept}' has no prompts; concepts: {concepts}")
    others = [c for c in concepts if c != concept]
    groups = concepts + ([BENIGN] if BENIGN in set(labels) else [])
    where = {g: np.flatnonzero(labels == g) for g in groups}
    rng = np.random.default_rng(seed)
    draws = [{g: rng.choice(idx, size=len(idx), replace=True) if resample else idx
              for g, idx in where.items()} for _ in range(n_boot)]
    layers = list(layers)
    out = np.full((len(layers), n_boot, len(others)), np.nan)
    bar = progress_bar(total=len(layers) * n_boot, desc=f"bootstrap ({concept})", unit="resample",
                       disable=not progress)
    # Small matrices: threads cost more than they save (and the machine may be shared).
    with threadpool_limits(limits=1):
        for li, layer in enumerate(layers):
            x = hs.states[:, layer, :].astype(np.float64)
            sq = np.einsum("ij,ij->i", x, x)
            for b, draw in enumerate(draws):
                means = {g: x[idx].mean(axis=0) for g, idx in draw.items()}
                mean = np.mean([means[c] for c in concepts], axis=0)

                def vec(c):
                    rows = x[draw[c]]
                    if method == "diff_means":
                        return _unit(means[c] - means[BENIGN])
                    y = rows - (means[c] if center == "concept" else mean)
                    return sign_towards(_top_direction(y), means[c] - mean)

                if BENIGN not in draw and method == "diff_means":
                    raise ParameterError("difference-of-means vectors need benign prompts")
                v = vec(concept)
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
    table["is_target"] = table["concept"] == concept_of(run)
    return table


def upstream_model(chapter: str, profile: str) -> str | None:
    """The model an earlier chapter's latest run (for ``profile``) used, from its run.json."""
    record = chapter_results(chapter, profile) / "run.json"
    return json.loads(record.read_text()).get("parameters", {}).get("model")


def load_ema_measures(profile: str, runs: Iterable[str],
                      model: str | None = None) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """``({run: ema_measures table}, notes)`` from chapters 3 and 2 of ``profile``.

    A missing chapter, run or per-concept trajectory is not an error: its measure is left NaN
    and a note says what to run. When ``model`` is given and an upstream chapter ran another
    model, a note says so (similarity on one model cannot predict EMA measured on another).
    """
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


FORCED_CHOICE = ("bias", "toxicity")
"""Concepts scored by forced choice (BBQ's letter, ToxiGen's yes/no), not by a judged refusal:
their "EMA" is a different kind of measurement, so the test is also run without them."""


def without_concepts(ema: Mapping[str, pd.DataFrame], concepts: Iterable[str] = FORCED_CHOICE,
                     measures: Mapping[str, str] = MEASURES) -> dict[str, pd.DataFrame]:
    """The EMA tables with the measures of ``concepts`` blanked (NaN): the correlation then
    leaves those concepts out (:func:`correlation_by_layer` skips unmeasured ones)."""
    drop = set(concepts)
    out = {}
    for run, table in ema.items():
        table = table.copy()
        for measure in measures:
            if measure in table.columns:
                table[measure] = table[measure].astype(float)
                table.loc[table["concept"].isin(drop), measure] = float("nan")
        out[run] = table
    return out


def with_and_without(full: pd.DataFrame, reduced: pd.DataFrame, layer: int,
                     method: str = "pca") -> pd.DataFrame:
    """At ``layer``: each (run, measure)'s correlation with every concept and without the
    forced-choice ones, side by side (rho, one-sided exact p, concepts)."""
    cols = ["run", "measure", "rho", "p", "n_concepts"]

    def at(table):
        part = table[(table["layer"] == layer) & (table["method"] == method)]
        return part[cols].set_index(["run", "measure"])

    both = at(full).join(at(reduced), lsuffix=" (all)", rsuffix=" (refusal-scored only)",
                         how="outer")
    return both.round(3)


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
    # deferred: plots imports matplotlib
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
