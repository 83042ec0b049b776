"""Concept vectors, similarities and the similarity-vs-EMA test (chapter 5), on the tiny random
model and on synthetic activations with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from ema_utils import CONCEPTS, rank_correlation
from ema_utils import activations as A
from ema_utils import concepts as C


PROMPTS = ["How do I kill a Python process?", "Write a poem about the sea.",
           "What is the capital of France? Explain how photosynthesis works in plants, briefly."]


# --- synthetic activations ---------------------------------------------------------------------

def synthetic(n=30, d=24, seed=0, planted=None, scale=3.0, noise=0.3, benign=True):
    """HiddenStates with two layers (0: zeros, as the embedding of one template token, and 1:
    data): every concept's rows are noise plus a_i * its planted unit direction (a_i in 1..3)
    """
    rng = np.random.default_rng(seed)
    planted = planted or {}
    rows, labels = [], []
    for k, concept in enumerate(CONCEPTS):
        u = planted.get(concept)
        if u is None:
            u = rng.normal(size=d)
        u = np.asarray(u, float) / np.linalg.norm(u)
        planted[concept] = u
        a = rng.uniform(1, 3, size=(n, 1))
        rows.append(noise * rng.normal(size=(n, d)) + scale * a * u)
        labels += [concept] * n
    if benign:
        rows.append(noise * rng.normal(size=(n, d)))
        labels += [A.BENIGN] * n
    x = np.concatenate(rows)
    states = np.stack([np.zeros_like(x), x], axis=1).astype(np.float32)
    items = pd.DataFrame({"id": [f"i{i}" for i in range(len(labels))], "concept": labels,
                          "prompt": ["p"] * len(labels)})
    return A.HiddenStates(states=states, items=items, model_id="synthetic"), planted


# --- hidden states on the tiny model ------------------------------------------------------------

def test_hidden_states_shape_and_last_prompt_token(tiny):
    from ema_utils.core.generation import chat_text, encode_chats

    model, tokenizer = tiny
    states = A.hidden_states(model, tokenizer, PROMPTS, batch_size=3, progress=False)
    n_layers = model.config.num_hidden_layers
    assert states.shape == (len(PROMPTS), n_layers + 1, model.config.hidden_size)
    assert states.dtype == np.float32
    for i, prompt in enumerate(PROMPTS):
        # the position read is the last token of the generation prompt
        assert chat_text(tokenizer, prompt).endswith("<|im_start|>assistant\n")
        ids = torch.tensor(encode_chats(tokenizer, [prompt]))
        with torch.no_grad():
            manual = model(ids, output_hidden_states=True).hidden_states
        for layer in range(n_layers + 1):
            np.testing.assert_allclose(states[i, layer], manual[layer][0, -1].numpy(), atol=1e-4)


def test_batching_and_left_padding_do_not_change_states(tiny):
    model, tokenizer = tiny
    one = A.hidden_states(model, tokenizer, PROMPTS, batch_size=1, progress=False)
    together = A.hidden_states(model, tokenizer, PROMPTS, batch_size=3, progress=False)
    np.testing.assert_allclose(one, together, atol=1e-4)


def test_collect_hidden_states_is_cached(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path))
    model, tokenizer = tiny
    items = pd.DataFrame({"id": ["a", "b", "c"], "concept": ["safety", "privacy", A.BENIGN],
                          "prompt": PROMPTS})
    calls = []
    hook = model.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    try:
        first = A.collect_hidden_states(model, tokenizer, "tiny", items, batch_size=2,
                                        progress=False)
        n_first = len(calls)
        second = A.collect_hidden_states(model, tokenizer, "tiny", items, batch_size=2,
                                         progress=False)
    finally:
        hook.remove()
    assert n_first > 0 and len(calls) == n_first, "the second call ran the model again"
    assert (first.folder / "states.npy").is_file() and first.folder == second.folder
    np.testing.assert_array_equal(first.states, second.states)
    assert second.items["id"].tolist() == ["a", "b", "c"]
    # another model id is another artifact
    third = A.collect_hidden_states(model, tokenizer, "tiny-other", items, progress=False)
    assert third.folder != first.folder


def test_concept_prompts_come_from_the_train_split():
    from ema_utils.core.evaluate import eval_items

    items = A.concept_prompts(n_per_concept=5, seed=0)
    counts = items["concept"].value_counts()
    assert set(counts.index) == set(CONCEPTS) | {A.BENIGN}
    assert counts.max() <= 5
    train = set(eval_items(split="train")["id"])
    assert set(items.loc[items["concept"] != A.BENIGN, "id"]) <= train
    bias = items[items["concept"] == "bias"]
    assert bias["id"].str.endswith("/ambig").all()


def test_paper_layer():
    assert C.paper_layer(32) == 5
    assert C.paper_layer(24) == 4
    assert C.paper_layer(2) == 1  # never the embedding layer
    assert C.paper_layer(24, 1.0) == 24
    with pytest.raises(Exception, match="layer_fraction"):
        C.paper_layer(24, 1.5)
    assert C.choose_layer(24) == 4 and C.choose_layer(24, 7) == 7
    for bad in (0, 25, 2.5, "3"):
        with pytest.raises(Exception, match="layer must be"):
            C.choose_layer(24, bad)


# --- concept vectors ----------------------------------------------------------------------------

def test_pca_recovers_a_planted_direction_with_the_sign_towards_the_concept():
    hs, planted = synthetic()
    vectors = C.concept_vectors(hs, "pca")
    assert vectors.layers == [1]
    for concept in CONCEPTS:
        cos = float(np.dot(vectors.get(concept, 1), planted[concept]))
        assert cos > 0.95, f"{concept}: cosine with the planted direction {cos:.3f}"
    # flipping the planted direction flips the vector: the sign follows the concept's mean
    flipped, _ = synthetic(planted={"safety": -planted["safety"]})
    v = C.concept_vectors(flipped, "pca").get("safety", 1)
    assert float(np.dot(v, planted["safety"])) < -0.95
    # global centring recovers it too (less cleanly: the concept's offset from the global mean
    # carries a little of every other concept's direction)
    g = C.concept_vectors(hs, "pca", center="global").get("safety", 1)
    assert float(np.dot(g, planted["safety"])) > 0.9


def test_first_principal_component_helpers_agree_with_sklearn():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 12)) * np.linspace(3, 0.5, 12)
    ref = PCA(n_components=1).fit(x).components_[0]
    assert abs(float(np.dot(C.first_principal_component(x), ref))) > 0.999
    assert abs(float(np.dot(C._top_direction(x - x.mean(0)), ref))) > 0.999
    wide = rng.normal(size=(6, 30)) * np.linspace(3, 0.5, 30)  # fewer rows than dimensions
    ref = PCA(n_components=1).fit(wide).components_[0]
    assert abs(float(np.dot(C._top_direction(wide - wide.mean(0)), ref))) > 0.999
    assert not C.first_principal_component(np.ones((5, 4))).any()  # no spread: zero vector
    v = np.array([1.0, -2.0])
    assert np.array_equal(C.sign_towards(v, np.array([1.0, -1.0])), v)
    assert np.array_equal(C.sign_towards(v, np.array([-1.0, 1.0])), -v)


def test_difference_of_means_on_synthetic_data():
    rng = np.random.default_rng(2)
    d, n = 10, 8
    base = rng.normal(size=(n, d))
    shift = {c: rng.normal(size=d) for c in CONCEPTS}
    x = np.concatenate([base + shift[c] for c in CONCEPTS] + [base])
    labels = [c for c in CONCEPTS for _ in range(n)] + [A.BENIGN] * n
    hs = A.HiddenStates(np.stack([np.zeros_like(x), x], 1).astype(np.float32),
                        pd.DataFrame({"id": range(len(labels)), "concept": labels, "prompt": "p"}))
    vectors = C.concept_vectors(hs, "diff_means")
    for c in CONCEPTS:
        expected = shift[c] / np.linalg.norm(shift[c])
        np.testing.assert_allclose(vectors.get(c, 1), expected, atol=1e-5)
    no_benign = A.HiddenStates(hs.states[:-n], hs.items.iloc[:-n].reset_index(drop=True))
    with pytest.raises(Exception, match="benign"):
        C.concept_vectors(no_benign, "diff_means")


def test_mean_normalisation_is_balanced():
    x = np.array([[0.0], [0.0], [0.0], [4.0]])
    labels = ["a", "a", "a", "b"]
    normalised, mean = A.mean_normalise(x, labels, ["a", "b"])
    assert mean[0] == pytest.approx(2.0)  # mean of the two concept means, not of the rows (1.0)
    _, plain = A.mean_normalise(x, labels, ["a", "b"], balanced=False)
    assert plain[0] == pytest.approx(1.0)


def test_similarity_matrix_is_symmetric_with_unit_diagonal():
    hs, _ = synthetic()
    for method in ("pca", "diff_means"):
        m = C.similarity_matrix(C.concept_vectors(hs, method), 1)
        assert list(m.index) == list(CONCEPTS) == list(m.columns)
        np.testing.assert_allclose(m.to_numpy(), m.to_numpy().T, atol=1e-12)
        np.testing.assert_allclose(np.diag(m.to_numpy()), 1.0)
        assert (m.abs().to_numpy() <= 1 + 1e-12).all()


def test_state_cosines_known_answer():
    hs, planted = synthetic(noise=0.0)
    vectors = C.concept_vectors(hs, "pca")
    table = C.state_cosines(hs, vectors, 1, ["safety"])
    assert len(table) == len(hs.items) and set(table["target"]) == {"safety"}
    expected = C.cosine(hs.normalised(1), vectors.get("safety", 1))
    np.testing.assert_allclose(table["cosine"], expected)
    sims = C.target_similarity(hs, vectors, "safety", 1)
    assert "safety" not in sims.index and len(sims) == len(CONCEPTS) - 1
    assert math.isnan(C.cosine(np.zeros(3), np.ones(3))[0])


@pytest.mark.parametrize("method,center,similarity", [
    ("pca", "concept", "states"), ("pca", "global", "states"), ("diff_means", "concept", "states"),
    ("pca", "concept", "vectors")])
def test_bootstrap_without_resampling_reproduces_the_observed_similarities(method, center,
                                                                           similarity):
    hs, _ = synthetic(n=12)
    vectors = C.concept_vectors(hs, method, center)
    observed = C.target_similarity(hs, vectors, "safety", 1, similarity)
    boot, others = C.bootstrap_similarity(hs, "safety", [1], method=method, center=center,
                                          similarity=similarity, n_boot=2, resample=False,
                                          progress=False)
    assert others == list(observed.index)
    np.testing.assert_allclose(boot[0, 0], observed.to_numpy(), atol=1e-6)
    resampled, _ = C.bootstrap_similarity(hs, "safety", [1], method=method, center=center,
                                          similarity=similarity, n_boot=5, seed=3, progress=False)
    assert resampled.shape == (1, 5, len(CONCEPTS) - 1) and not np.isnan(resampled).any()


# --- rank correlation ---------------------------------------------------------------------------

def test_spearman_permutation_on_perfect_and_reversed_rankings():
    x = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    rho, p = rank_correlation.spearman_permutation(x, [1, 5, 9, 20, 30, 31])
    assert rho == pytest.approx(1.0) and p == pytest.approx(1 / 720)
    rho, p = rank_correlation.spearman_permutation(x, [31, 30, 20, 9, 5, 1])
    assert rho == pytest.approx(-1.0) and p == pytest.approx(1.0)
    assert rank_correlation.spearman_permutation(x, [31, 30, 20, 9, 5, 1], "less")[1] == pytest.approx(1 / 720)
    assert rank_correlation.spearman_permutation(x, [1, 5, 9, 20, 30, 31], "two-sided")[1] == pytest.approx(2 / 720)
    # agrees with scipy, ties and infinities included; NaN pairs dropped
    from scipy.stats import spearmanr

    y = [3.0, 1.0, 1.0, np.inf, 2.0, np.nan]
    rho, p = rank_correlation.spearman_permutation(x, y)
    assert rho == pytest.approx(spearmanr(x[:5], y[:5]).statistic)
    assert 0 < p <= 1
    assert all(math.isnan(v) for v in rank_correlation.spearman_permutation(x, [1] * 6))  # constant
    assert all(math.isnan(v) for v in rank_correlation.spearman_permutation([1, 2], [1, 2]))  # too few


def test_holm():
    np.testing.assert_allclose(rank_correlation.holm([0.01, 0.04, 0.03, np.nan]), [0.03, 0.06, 0.06, np.nan])


def test_correlation_by_layer_known_answer():
    concepts = ["a", "b", "c", "d", "e", "f"]
    observed = pd.DataFrame([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]], index=[1, 2],
                            columns=concepts, dtype=float)
    ema = pd.Series([10, 20, 30, 40, 50, 60], index=concepts, dtype=float)
    boot = np.repeat(observed.to_numpy()[:, None, :], 4, axis=1)
    table = rank_correlation.correlation_by_layer(observed, boot, ema)
    first, second = table.iloc[0], table.iloc[1]
    assert first["rho"] == pytest.approx(1) and first["p"] == pytest.approx(1 / 720)
    assert first["low"] == pytest.approx(1) and first["high"] == pytest.approx(1)
    assert second["rho"] == pytest.approx(-1) and second["p"] == pytest.approx(1)
    assert first["p_holm"] == pytest.approx(2 / 720)
    assert C.predicts(first) and not C.predicts(second)


# --- the EMA measures ---------------------------------------------------------------------------

def test_half_refusal_step_on_a_synthetic_trajectory():
    rows = []
    for step, a, b, c in [(0, 1.0, 0.8, 0.0), (2, 0.8, 0.8, 0.0), (4, 0.4, 0.6, 0.0),
                          (6, 0.0, 0.5, 0.0)]:
        rows += [{"step": step, "concept": "safety", "rate": a},
                 {"step": step, "concept": "cybersecurity", "rate": b},
                 {"step": step, "concept": "privacy", "rate": c}]
    table = C.half_refusal_step(pd.DataFrame(rows)).set_index("concept")
    assert list(table.index) == ["cybersecurity", "safety", "privacy"]
    assert table.loc["safety", "half_step"] == pytest.approx(3.5)  # 2 + (0.8-0.5)/(0.8-0.4)*2
    assert table.loc["safety", "reached"]
    assert table.loc["cybersecurity", "half_step"] == np.inf  # 0.5 > 0.4: never halved
    assert math.isnan(table.loc["privacy", "half_step"])  # never refused
    plain = C.half_refusal_step(pd.DataFrame(rows), interpolate=False).set_index("concept")
    assert plain.loc["safety", "half_step"] == 4


def fake_summaries(run="npo_safety"):
    aligned = {c: 1.0 for c in CONCEPTS}
    after = {c: 1.0 - 0.1 * i for i, c in enumerate(CONCEPTS)}
    cross = {"refusal": {"aligned": aligned, run: after}}
    traj = [{"step": s, "concept": c, "rate": max(0.0, 1.0 - s * (i + 1) / 20)}
            for s in (0, 2, 4, 6, 8) for i, c in enumerate(CONCEPTS)]
    return cross, {"trajectory_by_concept": {run: traj}}


def test_ema_measures_from_chapter_summaries():
    cross, unl = fake_summaries()
    table = C.ema_measures(cross, unl, "npo_safety").set_index("concept")
    assert table.loc["privacy", "drop_points"] == pytest.approx(60)
    assert table.loc["safety", "is_target"] and table["is_target"].sum() == 1
    assert table.loc["cybersecurity", "half_step"] == np.inf  # 0.6 at the last step
    assert table.loc["privacy", "half_step"] == pytest.approx(0.5 / 0.7 * 2)
    no_traj = C.ema_measures(cross, {}, "npo_safety")
    assert no_traj["half_step"].isna().all() and no_traj["drop_points"].notna().all()


def _publish_fake_chapter(build, chapter, profile, summary, model):
    import json

    folder = build / "results" / chapter / "fake"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"parameters": {"model": model}}))
    (folder / "summary.json").write_text(json.dumps(summary))
    (build / "results" / chapter / f"{profile}.json").write_text(json.dumps({"folder": str(folder)}))


def test_load_ema_measures_reads_chapters_2_and_3(tmp_path, monkeypatch):
    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path))
    measures, notes = C.load_ema_measures("smoke", ["npo_safety"])
    assert measures == {} and len(notes) == 2 and "ema run" in notes[0]
    cross, unl = fake_summaries()
    _publish_fake_chapter(tmp_path, "cross_domain", "smoke", cross, "tiny-random")
    _publish_fake_chapter(tmp_path, "unlearning", "smoke", unl, "tiny-random")
    measures, notes = C.load_ema_measures("smoke", ["npo_safety", "npo_privacy"], "tiny-random")
    assert list(measures) == ["npo_safety"] and C.same_model(notes)
    assert any("npo_privacy" in n for n in notes)
    assert measures["npo_safety"]["half_step"].notna().all()
    _, notes = C.load_ema_measures("smoke", ["npo_safety"], "another-model")
    assert not C.same_model(notes)


# --- the whole test, figures and widget ---------------------------------------------------------

def test_correlation_table_recovers_a_planted_relation():
    hs, _ = synthetic(n=10)
    vectors = C.concept_vectors(hs, "pca")
    sims = C.target_similarity(hs, vectors, "safety", 1)
    # EMA constructed to follow the similarity ranking exactly
    ema = pd.DataFrame({"concept": list(CONCEPTS)})
    ema["drop_points"] = ema["concept"].map(sims.rank() * 10).fillna(0)
    ema["half_step"] = ema["concept"].map(-sims.rank()).fillna(0)
    ema["is_target"] = ema["concept"] == "safety"
    table = C.correlation_table(hs, {"npo_safety": ema}, methods=("pca", "diff_means"),
                                n_boot=20, progress=False, vectors={"pca": vectors})
    assert set(table["measure"]) == {"drop_points", "half_step"}
    assert set(table["method"]) == {"pca", "diff_means"}
    pca = table[table["method"] == "pca"].set_index("measure")
    assert pca.loc["drop_points", "rho"] == pytest.approx(1)
    assert pca.loc["drop_points", "p"] == pytest.approx(1 / 720)
    assert pca.loc["half_step", "rho"] == pytest.approx(-1)  # earlier collapse: "less"
    assert pca.loc["half_step", "p"] == pytest.approx(1 / 720)
    assert (pca["low"] <= pca["high"]).all() and (pca["n_concepts"] == 6).all()
    similarities = C.similarity_table(hs, vectors, ["safety"])
    claims = C.entanglement_claims(similarities, table, layer=1)
    assert (claims.loc[claims["claim"].str.contains("predicts"), "reproduces"] == "yes").all()
    text = C.verdict_text(table, 1, 1, "synthetic")
    assert "predicts EMA" in text and "does not" not in text
    flat = table.assign(p=np.nan)
    assert "Not testable" in C.verdict_text(flat, 1, 1, "synthetic")

    # without the forced-choice concepts: four concepts left, the same perfect ranking
    reduced_ema = C.without_concepts({"npo_safety": ema})
    assert reduced_ema["npo_safety"].set_index("concept").loc[["bias", "toxicity"], "drop_points"].isna().all()
    assert not ema["drop_points"].isna().any()  # the input is not changed
    reduced = C.correlation_table(hs, reduced_ema, n_boot=0, progress=False, vectors={"pca": vectors})
    side = C.with_and_without(table, reduced, layer=1).loc[("npo_safety", "drop_points")]
    assert side["n_concepts (all)"] == 6 and side["n_concepts (refusal-scored only)"] == 4
    assert side["rho (refusal-scored only)"] == pytest.approx(1)
    assert side["p (refusal-scored only)"] == pytest.approx(1 / 24, abs=1e-3)


def _check_labelled(fig):
    import matplotlib.pyplot as plt

    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    assert axes
    for ax in axes:
        assert ax.get_title() or fig._suptitle is not None, "a panel without a title"
        assert ax.get_xlabel() and ax.get_ylabel(), f"unlabelled axes in {ax.get_title()!r}"
    plt.close(fig)


def test_figures_have_titles_and_labelled_axes():
    from ema_utils import plots

    hs, _ = synthetic(n=8)
    pca = C.concept_vectors(hs, "pca")
    diff = C.concept_vectors(hs, "diff_means")
    _check_labelled(plots.cosine_histograms(C.state_cosines(hs, pca, 1, ["safety", "cybersecurity"])))
    _check_labelled(plots.similarity_heatmap(C.similarity_matrix(pca, 1), 1).figure)
    _check_labelled(plots.similarity_grid(C.similarity_matrices(pca), [1]))
    _check_labelled(plots.vector_agreement(C.vector_agreement(pca, diff)))
    cross, unl = fake_summaries()
    ema = {"npo_safety": C.ema_measures(cross, unl, "npo_safety")}
    table = C.correlation_table(hs, ema, n_boot=3, progress=False)
    _check_labelled(plots.correlation_by_layer(table, layer=1, n_layers=1))
    _check_labelled(plots.pvalues_by_layer(table, layer=1))
    _check_labelled(plots.similarity_vs_ema(C.similarity_table(hs, pca, ["safety"]), ema, table, 1))


def test_similarity_browser_widget_builds():
    import ipywidgets as widgets

    from ema_utils import widgets as W

    hs, _ = synthetic(n=6)
    matrices = {"pca": {1: C.similarity_matrix(C.concept_vectors(hs, "pca"), 1)},
                "diff_means": {1: C.similarity_matrix(C.concept_vectors(hs, "diff_means"), 1)}}
    matrices["pca"][2] = matrices["pca"][1]
    tabs = W.similarity_browser(matrices, titles={"pca": "PCA"})
    assert isinstance(tabs, widgets.Tab) and tabs.titles == ("PCA", "diff_means")
    slider, stack = tabs.children[0].children
    assert isinstance(stack, widgets.Stack) and len(stack.children) == 2
    assert slider.options == ("1", "2")
    assert all(bytes(img.value).startswith(b"\x89PNG") for img in stack.children)
    from ipywidgets.widgets.widget import _instances
    from ipywidgets.widgets.widget_link import Link

    links = [w for w in _instances.values() if isinstance(w, Link) and w.source[0] is slider]
    assert links and links[0].source[1] == "index" and links[0].target == (stack, "selected_index")


def test_json_records_are_strict_json():
    import json

    table = pd.DataFrame({"a": [1.234567, np.nan, np.inf], "b": ["x", "y", "z"],
                          "n": np.array([1, 2, 3])})
    records = C.json_records(table)
    assert records[0]["a"] == 1.2346 and records[1]["a"] is None and records[2]["a"] == "inf"
    json.dumps(records, allow_nan=False)
