"""Directions (ema_utils.chapters.directions): means, the refusal direction, ablation and steering hooks,
on the tiny random model (also wrapped by peft) and on synthetic arrays with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ema_utils import directions as D
from ema_utils.core.errors import EmaError, ParameterError


PROMPTS = ["How do I kill a Python process?", "Write a poem about the sea.",
           "What is the capital of France? Explain how photosynthesis works in plants, briefly."]


def _states(model, tokenizer, prompts=PROMPTS):
    """hidden_states of every position, every layer, for the prompts padded on the left."""
    from ema_utils.core.generation import encode_chats, left_pad

    ids, mask = left_pad(encode_chats(tokenizer, prompts), tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return [h.float().numpy() for h in out.hidden_states], mask.numpy().astype(bool)


def _direction(hidden, seed=1):
    return np.random.default_rng(seed).normal(size=hidden)


def _hook_count(model):
    blocks = D.decoder_layers(model)
    embed = D._base_model(model).get_input_embeddings()
    return sum(len(m._forward_hooks) for m in list(blocks) + [embed])


# --- shapes and means on the tiny model -----------------------------------------------------------

def test_mean_activations_and_refusal_direction_shapes(tiny):
    from ema_utils.chapters.activations import hidden_states

    model, tokenizer = tiny
    n, hidden = model.config.num_hidden_layers, model.config.hidden_size
    mean = D.mean_activations(model, tokenizer, PROMPTS, batch_size=2, progress=False)
    assert mean.shape == (n + 1, hidden) and mean.dtype == np.float64
    states = hidden_states(model, tokenizer, PROMPTS, progress=False)
    np.testing.assert_allclose(mean, states.mean(axis=0), atol=1e-5)
    direction = D.refusal_direction(model, tokenizer, PROMPTS[:1], PROMPTS[1:], progress=False)
    assert direction.shape == (n + 1, hidden)
    np.testing.assert_allclose(direction, states[0] - states[1:].mean(axis=0), atol=1e-5)
    assert np.allclose(direction[0], 0), "layer 0 is the same template token for every prompt"
    same = D.model_diff_direction(model, model, tokenizer, PROMPTS, progress=False)
    assert same.shape == (n + 1, hidden) and np.allclose(same, 0)
    with pytest.raises(ParameterError, match="no refused prompts"):
        D.refusal_direction(model, tokenizer, [], PROMPTS, progress=False)


def test_difference_of_means_on_synthetic_data():
    rng = np.random.default_rng(0)
    shift = rng.normal(size=(3, 8))
    a = rng.normal(size=(400, 3, 8)) + shift
    b = rng.normal(size=(300, 3, 8))
    d = D.difference_of_means(a, b)
    assert d.shape == (3, 8)
    np.testing.assert_allclose(d, a.mean(0) - b.mean(0))
    assert np.abs(d - shift).max() < 0.35  # the planted shift, within sampling error
    with pytest.raises(ParameterError):
        D.difference_of_means(a[:0], b)


def test_refused_and_complied_splits_a_judged_table():
    table = pd.DataFrame({"prompt": ["a", "b", "c", "d"], "is_refusal": [True, False, None, True]})
    refused, complied = D.refused_and_complied(table)
    assert refused == ["a", "d"] and complied == ["b"]
    with pytest.raises(ParameterError, match="is_refusal"):
        D.refused_and_complied(table.drop(columns="is_refusal"))


def test_separation_and_layer_choice_find_the_planted_layer():
    rng = np.random.default_rng(0)
    n, layers, hidden = 60, 6, 10
    states = rng.normal(size=(n, layers, hidden))
    refused = np.arange(n) < 30
    states[refused, 3, 0] += 4.0  # the two groups separate most at layer 3
    states[refused, 5, 0] += 8.0  # ... and even more at the last layer, past 80% depth
    sep = D.separation_by_layer(states, refused)
    assert sep.shape == (layers,) and np.nanargmax(sep) == 5 and sep[3] > 2 * np.nanmax(sep[1:3])
    assert D.choose_direction_layer(sep) == 3
    assert D.choose_direction_layer(sep, layer=2) == 2
    with pytest.raises(ParameterError):
        D.choose_direction_layer(sep, layer=9)
    assert np.isnan(D.separation_by_layer(states, np.ones(n, bool))).all()


# --- vectors ------------------------------------------------------------------------------------------

def test_unit_and_cosine_by_layer_on_constructed_vectors():
    e = np.eye(4)
    d1 = np.stack([e[0], e[0], e[0], np.zeros(4)])
    d2 = np.stack([3 * e[0], -e[0], e[0] + e[1], e[2]])
    np.testing.assert_allclose(D.cosine_by_layer(d1, d2)[:3], [1, -1, 1 / np.sqrt(2)])
    assert np.isnan(D.cosine_by_layer(d1, d2)[3])
    np.testing.assert_allclose(D.cosine_by_layer(d2, e[0])[:3], [1, -1, 1 / np.sqrt(2)])
    assert float(D.cosine_by_layer(e[0], e[1])) == 0
    u = D.unit(d2)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1)
    assert not np.any(D.unit(np.zeros(4)))
    with pytest.raises(ParameterError):
        D.cosine_by_layer(np.ones((3, 4)), np.ones((2, 4)))


def test_random_direction_like_matches_norms_and_is_seeded():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(5, 16)) * np.arange(5)[:, None]  # row 0 is zero
    r = D.random_direction_like(d, seed=3)
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), np.linalg.norm(d, axis=1), atol=1e-12)
    np.testing.assert_array_equal(r, D.random_direction_like(d, seed=3))
    assert not np.allclose(r[1:], D.random_direction_like(d, seed=4)[1:])
    assert np.abs(D.cosine_by_layer(r, d)[1:]).max() < 0.9
    one = D.random_direction_like(d[2], seed=0)
    assert one.shape == (16,) and np.isclose(np.linalg.norm(one), np.linalg.norm(d[2]))


# --- hooks ----------------------------------------------------------------------------------------------

def test_ablation_leaves_hooked_layers_orthogonal_to_the_direction(tiny):
    model, tokenizer = tiny
    n = model.config.num_hidden_layers
    d = _direction(model.config.hidden_size)
    u = D.unit(d)
    base, mask = _states(model, tokenizer)
    scale = max(np.abs(h[mask]).max() for h in base)
    for l in range(n):  # not ablated: every layer has a component along the direction
        assert np.abs(base[l][mask] @ u).max() > 1e-3 * scale
    with D.ablate_direction(model, d):  # all layers
        hooked, _ = _states(model, tokenizer)
    for l in range(n):  # the last reported state is after the final norm (module docstring)
        assert np.abs(hooked[l][mask] @ u).max() < 1e-5 * scale, f"layer {l} not orthogonal"
    with D.ablate_direction(model, d, layers=[1]):
        one, _ = _states(model, tokenizer)
    assert np.abs(one[1][mask] @ u).max() < 1e-5 * scale
    np.testing.assert_allclose(one[0], base[0], atol=1e-6)  # layer 0 untouched
    assert np.abs(one[2][mask] @ u).max() > 1e-3 * scale, "the direction is written back later"
    # one direction per layer: row l is projected out of layer l
    per_layer = np.stack([_direction(model.config.hidden_size, seed=s) for s in range(n + 1)])
    with D.ablate_direction(model, per_layer, layers=range(n)):
        hooked, _ = _states(model, tokenizer)
    for l in range(n):
        assert np.abs(hooked[l][mask] @ D.unit(per_layer[l])).max() < 1e-5 * scale
    with pytest.raises(ParameterError):
        with D.ablate_direction(model, d, layers=[n + 1]):
            pass
    with pytest.raises(ParameterError, match="hidden size"):
        with D.ablate_direction(model, np.ones(3)):
            pass


def test_hooks_are_removed_on_exit_and_on_exception(tiny):
    model, tokenizer = tiny
    _states(model, tokenizer)  # transformers installs its own recording hooks on first use
    before = _hook_count(model)
    base, _ = _states(model, tokenizer)
    d = _direction(model.config.hidden_size)
    with D.ablate_direction(model, d):
        assert _hook_count(model) == before + model.config.num_hidden_layers + 1
    assert _hook_count(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with D.add_direction(model, d, layer=1, scale=3.0):
            assert _hook_count(model) == before + 1
            raise RuntimeError("boom")
    assert _hook_count(model) == before
    after, _ = _states(model, tokenizer)
    for h0, h1 in zip(base, after):
        np.testing.assert_allclose(h0, h1, atol=1e-6)


def test_add_direction_shifts_that_layer_by_exactly_scale_times_direction(tiny):
    model, tokenizer = tiny
    d = _direction(model.config.hidden_size)
    base, mask = _states(model, tokenizer)
    for layer in (0, 1):
        with D.add_direction(model, d, layer=layer, scale=2.5):
            steered, _ = _states(model, tokenizer)
        for l in range(layer):
            np.testing.assert_allclose(steered[l], base[l], atol=1e-6)
        np.testing.assert_allclose(steered[layer] - base[layer],
                                   np.broadcast_to(2.5 * d, base[layer].shape), atol=1e-4)
        assert not np.allclose(steered[layer + 1], base[layer + 1], atol=1e-3)
    per_layer = np.zeros((model.config.num_hidden_layers + 1, model.config.hidden_size))
    per_layer[1] = d
    with D.add_direction(model, per_layer, layer=1, scale=-1.0):
        steered, _ = _states(model, tokenizer)
    np.testing.assert_allclose(steered[1] - base[1], np.broadcast_to(-d, base[1].shape), atol=1e-4)


def test_hooks_handle_tuple_outputs():
    t = torch.ones(1, 2, 3)
    out = D._map_hidden((t, "cache"), lambda h: 2 * h)
    assert torch.equal(out[0], 2 * t) and out[1] == "cache"
    with pytest.raises(Exception, match="cannot read"):
        D._map_hidden({"x": t}, lambda h: h)


def test_hooks_and_directions_work_through_a_peft_lora_model():
    from peft import LoraConfig, get_peft_model

    from ema_utils.core.models import tiny_random

    model, tokenizer = tiny_random()
    model.eval()
    before = D.mean_activations(model, tokenizer, PROMPTS, progress=False)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    lora.eval()
    blocks = D.decoder_layers(lora)
    assert len(blocks) == model.config.num_hidden_layers and blocks is model.model.layers
    d = _direction(model.config.hidden_size)
    with D.ablate_direction(lora, d, layers=[0, 1]):
        hooked, mask = _states(lora, tokenizer)
    scale = np.abs(hooked[1][mask]).max()
    assert np.abs(hooked[1][mask] @ D.unit(d)).max() < 1e-5 * scale
    with D.add_direction(lora, d, layer=1, scale=1.0):
        steered, _ = _states(lora, tokenizer)
    plain, _ = _states(lora, tokenizer)
    np.testing.assert_allclose(steered[1] - plain[1], np.broadcast_to(d, plain[1].shape), atol=1e-4)
    assert _hook_count(lora) == _hook_count(model)
    diff = D.adapter_diff_direction(lora, tokenizer, PROMPTS, progress=False)
    with lora.disable_adapter():
        without = D.mean_activations(lora, tokenizer, PROMPTS, progress=False)
    np.testing.assert_allclose(without, before, atol=1e-5)
    assert diff.shape == without.shape and np.linalg.norm(diff[1:]) > 0
    np.testing.assert_allclose(
        diff, D.mean_activations(lora, tokenizer, PROMPTS, progress=False) - without, atol=1e-6)
    with pytest.raises(ParameterError, match="PEFT"):
        D.adapter_diff_direction(tiny_random()[0], tokenizer, PROMPTS)


# --- the chapter-5 pieces ------------------------------------------------------------------------------

def test_ablation_model_id_names_direction_and_layers():
    d = np.arange(1.0, 5.0)
    a = D.ablation_model_id("m:1", d, None, "refusal")
    assert a.startswith("m:1+ablate-refusal:") and a.endswith("@all")
    assert a == D.ablation_model_id("m:1", 3 * d, None, "refusal"), "the unit direction counts"
    assert a != D.ablation_model_id("m:1", -d, None, "refusal")
    assert D.ablation_model_id("m:1", d, [4], "refusal").endswith("@4")


def test_direction_prompts_are_balanced_and_nested():
    small = D.direction_prompts(12, seed=0)
    assert len(small) == 12 and set(small.columns) == {"id", "concept", "prompt"}
    counts = small["concept"].value_counts()
    assert "bias" not in counts and counts.max() - counts.min() <= 1
    larger = D.direction_prompts(60, seed=0)
    assert len(larger) == 60 and set(small["id"]) <= set(larger["id"])
    assert len(D.direction_prompts(0)) > 60  # 0: every refusal-scored prompt


def test_fit_refusal_direction_with_given_verdicts(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path))
    model, tokenizer = tiny
    items = pd.DataFrame({"id": ["a", "b", "c"], "concept": ["safety", "privacy", "safety"],
                          "prompt": PROMPTS, "is_refusal": [True, False, True]})
    fit = D.fit_refusal_direction(model, tokenizer, "tiny", items, progress=False)
    expected = D.refusal_direction(model, tokenizer, [PROMPTS[0], PROMPTS[2]], [PROMPTS[1]],
                                   progress=False)
    np.testing.assert_allclose(fit.direction, expected, atol=1e-5)
    assert fit.counts().loc["all"].tolist() == [2, 1]
    assert list(fit.by_layer().columns) == ["layer", "norm", "separation"]
    with pytest.raises(EmaError, match="n_direction_prompts"):
        D.fit_refusal_direction(model, tokenizer, "tiny", items.assign(is_refusal=False),
                                progress=False)


def test_concept_cosines_long_table():
    from ema_utils.chapters.concepts import ConceptVectors

    e = np.eye(3)
    vectors = np.zeros((2, 3, 3))
    vectors[0, 1], vectors[0, 2] = e[0], e[1]
    vectors[1, 1], vectors[1, 2] = -e[0], e[0]
    cv = ConceptVectors(method="pca", concepts=["safety", "privacy"], layers=[1, 2],
                        vectors=vectors)
    direction = np.stack([np.zeros(3), 2 * e[0], e[1]])
    table = D.concept_cosines(direction, {"pca": cv})
    got = table.set_index(["concept", "layer"])["cosine"]
    assert got[("safety", 1)] == 1 and got[("safety", 2)] == 1
    assert got[("privacy", 1)] == -1 and got[("privacy", 2)] == 0


def test_ablation_study_runs_three_named_conditions(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path))
    model, tokenizer = tiny
    d = _direction(model.config.hidden_size)
    before = _hook_count(model)
    evals = D.ablation_study(model, tokenizer, "tiny", d, layers=None, n_per_concept=2,
                             max_new_tokens=2, batch_size=4, judge="phrase",
                             concepts=("safety", "privacy"), progress=False)
    assert _hook_count(model) == before
    assert list(evals) == list(D.CONDITIONS)
    ids = {ev.model for ev in evals.values()}
    assert len(ids) == 3 and any("+ablate-refusal:" in i for i in ids)
    rates = D.ablation_rates(evals)
    assert set(rates["condition"]) == set(D.CONDITIONS) and set(rates["concept"]) == {"safety", "privacy"}
    pooled = D.pooled_refusal(evals)
    assert (pooled["n"] == 4).all()
    claim = D.ablation_claim(evals, layer=1, layers_label="all layers")
    assert claim.iloc[0]["reproduces"] in {"yes", "partly", "no"}
    assert "refusal direction" in D.ablation_verdict(evals, 1, "all layers", "tiny")
    with pytest.raises(ParameterError):
        D.ablation_study(model, tokenizer, "tiny", np.zeros(model.config.hidden_size))
