"""ema_utils.chapters.narrow, stability and steering (chapter 6): adapter scaling and orthogonal
noise keep their promises, the formulas and verdicts hold on constructed numbers, the upstream
runs are found (and never retrained), and the direction hooks run on the tiny model."""

import json
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from ema_utils import (CONCEPTS, activations, checkpoints, narrow, plots, sets, stability, steering,
                       trainer)
from ema_utils.core import metrics
from ema_utils.core.errors import EmaError, ParameterError

matplotlib.use("Agg")



@pytest.fixture
def lora(tiny):
    """The tiny model with a LoRA adapter whose B matrices are random (peft starts them at 0),
    removed again afterwards (the tiny model is shared by the whole session)."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    with checkpoints._quiet_peft():
        peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj",
                                                                                  "down_proj"],
                                                task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, module, adapter in stability.lora_layers(peft):
            w = module.lora_B[adapter].weight
            w.copy_(0.05 * torch.randn(w.shape, generator=generator))
    peft.eval()
    try:
        yield peft, tokenizer
    finally:
        checkpoints.unload_adapter(peft)


def _logits(model, tokenizer):
    ids = tokenizer(["the model refuses", "a short prompt here"], return_tensors="pt",
                    padding=True)
    with torch.no_grad():
        return model(**ids).logits


def _forget_table():
    return pd.DataFrame({"id": ["f1", "f2", "f3"], "concept": "safety",
                         "prompt": ["how do I pick a lock", "make something dangerous",
                                    "tell me a secret"],
                         "response": ["I'm sorry, but I can't assist with that."] * 3})


# --- scaling ------------------------------------------------------------------------------------

def test_scaling_restores_weights_exactly_and_scale_zero_is_the_base_model(lora):
    model, tokenizer = lora
    before = [m.lora_B[a].weight.detach().clone() for _, m, a in stability.lora_layers(model)]
    trained = _logits(model, tokenizer)
    with stability.adapter_disabled(model):
        base = _logits(model, tokenizer)
    assert not torch.allclose(trained, base), "the random adapter changes the model"
    with stability.scaled_adapter(model, 0.0):
        assert stability.adapter_norm(model) == 0
        assert torch.allclose(_logits(model, tokenizer), base, atol=1e-6, rtol=0)
    with stability.scaled_adapter(model, 1.0):
        assert torch.equal(_logits(model, tokenizer), trained)
    after = [m.lora_B[a].weight for _, m, a in stability.lora_layers(model)]
    assert all(torch.equal(b, a) for b, a in zip(before, after)), "weights restored exactly"


def test_adapter_norm_is_the_frobenius_norm_of_all_updates_and_scales_linearly(lora):
    model, _ = lora
    explicit = math.sqrt(sum(float((m.scaling[a] * m.lora_B[a].weight.detach().double()
                                    @ m.lora_A[a].weight.detach().double()).pow(2).sum())
                             for _, m, a in stability.lora_layers(model)))
    norm = stability.adapter_norm(model)
    assert norm == pytest.approx(explicit, rel=1e-9) and norm > 0
    with stability.scaled_adapter(model, 1.7):
        assert stability.adapter_norm(model) == pytest.approx(1.7 * norm, rel=1e-6)
    with stability.adapter_at_norm(model, 0.25):
        assert stability.adapter_norm(model) == pytest.approx(0.25, rel=1e-6)
    assert stability.adapter_norm(model) == pytest.approx(norm, rel=1e-12)
    with pytest.raises(ParameterError, match="factor"):
        with stability.scaled_adapter(model, float("nan")):
            pass
    assert len(stability.layer_norms(model)) == len(stability.lora_layers(model))


def test_weights_are_restored_when_the_body_raises(lora):
    model, _ = lora
    before = stability.adapter_norm(model)
    with pytest.raises(RuntimeError):
        with stability.perturbed_adapter(model, 0.9, seed=3):
            raise RuntimeError("boom")
    assert stability.adapter_norm(model) == before


def test_a_model_without_adapter_is_refused(tiny):
    with pytest.raises(ParameterError, match="no LoRA adapter"):
        stability.adapter_norm(tiny[0])


# --- orthogonal noise ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7,), (5, 3), (16, 2)])
@pytest.mark.parametrize("eps", [0.01, 0.3, 0.99, 1.0])
def test_orthogonal_perturbation_keeps_the_norm_and_the_angle(shape, eps):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = stability.orthogonal_noise(x, torch.Generator().manual_seed(5))
    assert float((y * x).sum()) == pytest.approx(0, abs=1e-10), "noise orthogonal to x"
    assert float(y.norm()) == pytest.approx(float(x.norm()), rel=1e-12), "noise has x's norm"
    xp = stability.orthogonal_perturbation(x, eps, torch.Generator().manual_seed(5))
    assert xp.shape == x.shape and xp.dtype == x.dtype
    assert float(xp.norm()) == pytest.approx(float(x.norm()), rel=1e-10)
    cos = float((xp * x).sum() / (x.norm() * xp.norm()))
    assert cos == pytest.approx(math.sqrt(1 - eps ** 2), abs=1e-10)
    assert torch.allclose(xp, math.sqrt(1 - eps ** 2) * x + eps * y)


def test_orthogonal_perturbation_edge_cases():
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(stability.orthogonal_perturbation(x, 0.0), x)
    zero = torch.zeros(3, 2)
    assert torch.equal(stability.orthogonal_perturbation(zero, 0.5), zero)
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ParameterError, match="eps"):
            stability.orthogonal_perturbation(x, bad)
    a = stability.orthogonal_perturbation(x, 0.4, torch.Generator().manual_seed(2))
    b = stability.orthogonal_perturbation(x, 0.4, torch.Generator().manual_seed(2))
    assert torch.equal(a, b), "the same seed gives the same noise"


def test_perturbed_adapter_keeps_each_matrix_norm_and_eps0_leaves_the_loss(lora):
    model, tokenizer = lora
    loss = stability.ForgetLoss(model, tokenizer, _forget_table(), beta=0.1, batch_size=2)
    assert len(loss) == 3
    assert loss.base()["npo"] == pytest.approx(2 / 0.1 * math.log(2), rel=1e-6)
    orig = loss(model)
    with stability.scaled_adapter(model, 0.0):
        assert loss(model)["npo"] == pytest.approx(loss.base()["npo"], abs=1e-6)
    weights = [w for _, m, a in stability.lora_layers(model) for w in (m.lora_A[a].weight,
                                                                      m.lora_B[a].weight)]
    norms = [float(w.detach().norm()) for w in weights]
    with stability.perturbed_adapter(model, 0.0, seed=1):
        assert loss(model) == orig, "eps = 0 changes nothing"
    with stability.perturbed_adapter(model, 0.5, seed=1):
        inside = [float(w.detach().norm()) for w in weights]
        assert inside == pytest.approx(norms, rel=1e-5)
        assert loss(model)["npo"] != orig["npo"]
    assert [float(w.detach().norm()) for w in weights] == norms
    assert loss(model) == orig, "restored exactly"

    eff = stability.efficiency_sweep(model, loss, scales=[0, 1, 2], target_norms=[0.1],
                                  progress=False)
    assert list(eff["kind"]) == ["factor"] * 3 + ["norm"]
    native = stability.adapter_norm(model)
    assert eff["norm"].tolist() == pytest.approx([0, native, 2 * native, 0.1], rel=1e-6)
    assert eff.loc[1, "npo"] == pytest.approx(orig["npo"], rel=1e-9)
    stab = stability.stability_sweep(model, loss, eps_values=[0.0, 1.0], seeds=[0, 1], progress=False)
    assert len(stab) == 4
    assert stab[stab["eps"] == 0]["npo"].tolist() == pytest.approx([orig["npo"]] * 2)


# --- formulas and verdicts on constructed numbers -----------------------------------------------

def test_relative_increase():
    assert stability.relative_increase(5.0, 2.0, 8.0) == pytest.approx(0.5)
    assert stability.relative_increase(2.0, 2.0, 8.0) == 0.0
    assert stability.relative_increase(8.0, 2.0, 8.0) == 1.0
    out = stability.relative_increase(np.array([3.0, 5.0]), 2.0, 6.0)
    assert out.tolist() == pytest.approx([0.25, 0.75])
    assert math.isnan(stability.relative_increase(5.0, 8.0, 8.0)), "no gap: undefined"
    assert math.isnan(stability.relative_increase(5.0, 9.0, 8.0)), "the adapter made it worse"


def test_seed_interval():
    mean, low, high = stability.seed_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and low < 2.0 < high
    assert high - mean == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    mean, low, high = stability.seed_interval([4.0, float("nan")])
    assert mean == 4.0 and math.isnan(low) and math.isnan(high)


def _stability_table():
    rows = []
    for solution, slope in (("general", 0.2), ("narrow", 0.6)):
        for eps in (0.1, 0.5, 1.0):
            for seed in (0, 1, 2):
                rel = slope * eps + 0.01 * seed
                rows.append({"solution": solution, "eps": eps, "seed": seed,
                             "npo": 2.0 + rel * 8.0, "nll": 0.0})
    return pd.DataFrame(rows)


def test_stability_summary_and_verdict():
    orig = {"general": {"npo": 2.0}, "narrow": {"npo": 2.0}}
    base = {"general": {"npo": 10.0}, "narrow": {"npo": 10.0}}
    summary = stability.stability_summary(_stability_table(), orig, base)
    row = summary[(summary["solution"] == "narrow") & (summary["eps"] == 0.5)].iloc[0]
    assert row["mean"] == pytest.approx(0.3 + 0.01) and row["n"] == 3
    assert row["low"] < row["mean"] < row["high"]
    v = stability.stability_verdict(summary)
    assert v["verdict"] == "yes" and v["general"] < v["narrow"]
    swapped = _stability_table().replace({"solution": {"general": "narrow", "narrow": "general"}})
    assert stability.stability_verdict(stability.stability_summary(swapped, orig, base))["verdict"] == "no"
    same = _stability_table()
    same.loc[same["solution"] == "narrow", "npo"] = same.loc[same["solution"] == "general",
                                                             "npo"].to_numpy() + 0.01
    assert stability.stability_verdict(stability.stability_summary(same, orig, base))["verdict"] == "no", \
        "a difference below the margin is no difference"
    noisy = _stability_table()
    shift = noisy["seed"].map({0: -1.5, 1: 0.5, 2: 2.0}) * (noisy["solution"] == "narrow")
    noisy["npo"] = noisy["npo"] + shift
    v = stability.stability_verdict(stability.stability_summary(noisy, orig, base))
    assert v["verdict"] == "partly" and v["difference_interval"][0] < 0 < v["difference"]
    undefined = {"general": {"npo": 10.0}, "narrow": {"npo": 2.0}}
    assert stability.stability_verdict(
        stability.stability_summary(_stability_table(), undefined, base))["verdict"] == "n/a"


def test_efficiency_verdict():
    def table(general, narrow_):
        rows = []
        for norm, g, n in zip((0.0, 0.5, 1.0), general, narrow_):
            rows += [{"solution": "general", "kind": "norm", "scale": 1, "norm": norm, "npo": g},
                     {"solution": "narrow", "kind": "norm", "scale": 1, "norm": norm, "npo": n}]
        return pd.DataFrame(rows)

    assert stability.efficiency_verdict(table([13.8, 5, 1], [13.8, 9, 4]))["verdict"] == "yes"
    assert stability.efficiency_verdict(table([13.8, 5, 5], [13.8, 9, 4]))["verdict"] == "partly"
    assert stability.efficiency_verdict(table([13.8, 9, 5], [13.8, 5, 4]))["verdict"] == "no"
    v = stability.efficiency_verdict(table([13.8, 5, 1], [13.8, 9, 4]))
    assert v["n"] == 2, "norm 0 (both = the aligned model) is not judged"
    assert stability.efficiency_verdict(pd.DataFrame(columns=["solution", "kind", "norm", "npo"]))[
        "verdict"] == "n/a"


def _mitigation_summary():
    aligned = {c: 0.9 for c in CONCEPTS}
    refusal = {"aligned": aligned,
               "npo_safety": {**{c: 0.5 for c in CONCEPTS}, "safety": 0.1},
               "npo_kl_1to1_lambda1_safety": {**{c: 0.6 for c in CONCEPTS}, "safety": 0.1},
               "npo_kl_1to1_lambda10_safety": {**{c: 0.85 for c in CONCEPTS}, "safety": 0.3},
               "npo_kl_1to1_lambda100_safety": {**{c: 0.95 for c in CONCEPTS}, "safety": 0.8},
               "npo_retain_1to1_safety": {c: 0.9 for c in CONCEPTS}}
    return {"refusal": refusal, "steps": {"npo_kl_1to1_lambda10_safety": 4}}


def test_kl_choice_rule():
    summary = _mitigation_summary()
    # a second training seed of an arm is not a further candidate: chapter 6 reads the first
    summary["refusal"]["npo_kl_1to1_lambda10_seed1_safety"] = {c: 0.9 for c in CONCEPTS}
    table = narrow.kl_candidates(summary)
    assert table["kl_lambda"].tolist() == [1.0, 10.0, 100.0]
    assert table.loc[1, "gap"] == pytest.approx(-0.05)
    choice = narrow.choose_kl_lambda(summary)
    assert choice["condition"] == "npo_kl_1to1_lambda10_safety" and choice["kl_lambda"] == 10
    assert "smallest lambda that passes the narrow test" in choice["rule"]
    assert narrow.passes_narrow_test(table).tolist() == [False, True, False]
    # two pass: the sweep stops at the smaller lambda
    summary["refusal"]["npo_kl_1to1_lambda100_safety"] = {**{c: 0.95 for c in CONCEPTS},
                                                          "safety": 0.2}
    assert narrow.choose_kl_lambda(summary)["kl_lambda"] == 10
    # none passes: the sweep's end is reached and said; the closest gap is shown, a tie in
    # |gap| going to the lower target refusal
    none = {"refusal": {"aligned": {c: 0.9 for c in CONCEPTS},
                        "npo_kl_1to1_lambda10_safety": {**{c: 0.85 for c in CONCEPTS}, "safety": 0.85},
                        "npo_kl_1to1_lambda100000_safety": {**{c: 0.95 for c in CONCEPTS},
                                                            "safety": 0.8}}}
    end = narrow.choose_kl_lambda(none)
    assert end["kl_lambda"] == 100000 and "sweep's end is reached" in end["rule"]
    assert "(10, 100000)" in end["rule"]
    assert narrow.choose_kl_lambda(summary, kl_lambda=1.0)["kl_lambda"] == 1
    with pytest.raises(ParameterError, match="lambda 1, 10, 100 only"):
        narrow.choose_kl_lambda(summary, kl_lambda=5)
    with pytest.raises(EmaError, match="no KL run"):
        narrow.choose_kl_lambda({"refusal": {"aligned": {c: 1 for c in CONCEPTS}}})
    v = narrow.narrow_verdict(narrow.choose_kl_lambda(_mitigation_summary()),
                              _mitigation_summary()["refusal"]["npo_safety"])
    assert v["verdict"] == "yes" and v["target_drop"] == pytest.approx(0.6)


def _dose(steer=(0.85, 0.6, 0.2), band=((0.8, 0.9), (0.75, 0.9), (0.7, 0.85)), ablated=0.7,
          ablated_band=(0.2, 0.3), answer=(0.88, 0.85, 0.8), aligned=0.9, unlearned=0.2,
          coefficients=(0.25, 1.0, 4.0), n_random=10):
    """A dose table: the prompt-token direction's pooled refusal per coefficient, the random
    directions spread evenly over ``band`` at each, ablations, aligned and unlearned."""
    rows = [{"kind": "aligned", "direction": "", "coefficient": np.nan, "rate": aligned},
            {"kind": "unlearned", "direction": "", "coefficient": np.nan, "rate": unlearned},
            {"kind": "ablate", "direction": "prompt token", "coefficient": np.nan, "rate": ablated},
            {"kind": "ablate", "direction": "answer tokens", "coefficient": np.nan, "rate": 0.25}]
    for c, s_rate, a_rate, (lo, hi) in zip(coefficients, steer, answer, band):
        rows += [{"kind": "steer", "direction": "prompt token", "coefficient": c, "rate": s_rate},
                 {"kind": "steer", "direction": "answer tokens", "coefficient": c, "rate": a_rate}]
        rows += [{"kind": "steer", "direction": f"random {k}", "coefficient": c, "rate": r}
                 for k, r in enumerate(np.linspace(lo, hi, n_random))]
    rows += [{"kind": "ablate", "direction": f"random {k}", "coefficient": np.nan, "rate": r}
             for k, r in enumerate(np.linspace(*ablated_band, n_random))]
    table = pd.DataFrame(rows)
    table["low"], table["high"], table["n"] = table["rate"] - 0.05, table["rate"] + 0.05, 40
    return table


def test_dose_verdicts_read_where_the_direction_leaves_the_random_band():
    band = metrics.random_band(_dose())
    steer = band[band["kind"] == "steer"].set_index("coefficient")
    assert steer.loc[1.0, "band_low"] == pytest.approx(0.75) and steer["n_random"].eq(10).all()
    v = steering.steering_verdict(_dose(), "prompt token")
    # at 1x: 0.6 < band 0.75 and 30 points below aligned: leaves the band there
    assert v["verdict"] == "yes" and v["leaves_at"] == 1.0 and "from 1x" in v["text"]
    # below the band, but less than 15 points below the aligned model
    v = steering.steering_verdict(_dose(steer=(0.85, 0.8, 0.78), band=((0.86, 0.9),) * 3), "prompt token")
    assert v["verdict"] == "partly" and v["leaves_at"] == 0.25
    # as low as random directions get: inside the band, however low
    v = steering.steering_verdict(_dose(steer=(0.85, 0.6, 0.2), band=((0.8, 0.9), (0.5, 0.9), (0.1, 0.5))),
                                  "prompt token")
    assert v["verdict"] == "no" and "never below the band of 10 random directions" in v["text"]
    # random directions already at 0% everywhere: no room to steer beyond them, "no" not earned
    v = steering.steering_verdict(_dose(steer=(0.1, 0.05, 0.0), band=((0.0, 0.1),) * 3), "prompt token")
    assert v["verdict"] == "n/a" and "smaller coefficients" in v["text"]
    v = steering.steering_verdict(_dose(steer=(0.1, 0.05, 0.03), band=((0.02, 0.1),) * 3), "prompt token")
    assert v["verdict"] == "no"  # room under the band at 0.02: it could have left it
    a = steering.ablation_verdict(_dose(ablated=0.5, ablated_band=(0.6, 0.95)), "prompt token")
    assert a["verdict"] == "n/a" and "already gives 95%" in a["text"]
    a = steering.ablation_verdict(_dose(), "prompt token")
    assert a["verdict"] == "yes" and a["recovered"] == pytest.approx(5 / 7)
    assert steering.ablation_verdict(_dose(ablated=0.4), "prompt token")["verdict"] == "partly"
    assert steering.ablation_verdict(_dose(ablated=0.28), "prompt token")["verdict"] == "no"
    assert steering.ablation_verdict(_dose(unlearned=0.85), "prompt token")["verdict"] == "n/a"
    real, shown_band = steering.dose_tables(_dose())
    assert not real["direction"].str.startswith("random").any() and len(shown_band) == 4
    assert set(real["coefficient"]) == {"", "0.25x", "1x", "4x"}
    both = steering.dose_verdicts(_dose(), primary="prompt token")
    assert both["steering"]["verdict"] == "yes" and both["steering"]["others"] == {"answer tokens": "no"}
    assert "also read: [no] answer tokens" in both["steering"]["text"]
    assert both["ablation"]["others"] == {"answer tokens": "no"}
    with pytest.raises(ParameterError, match="primary direction 'last token' was not evaluated"):
        steering.dose_verdicts(_dose(), primary="last token")


def test_claims_table_and_overall_line():
    verdicts = {"efficiency": {"verdict": "yes", "text": "e"},
                "stability": {"verdict": "no", "text": "s"}}
    table = narrow.claims(verdicts)
    assert list(table.columns) == ["claim", "Soligo et al. 2026", "this run", "holds here"]
    assert len(table) == len(narrow.CLAIMS)
    by = table.set_index("holds here")
    assert "not tested" in by.index, "the optional drift experiment is listed as not tested"
    assert "holds in part" in narrow.overall_line(verdicts, "m")
    verdicts["stability"]["verdict"] = "yes"
    assert "**holds**" in narrow.overall_line(verdicts, "m")
    verdicts["stability"]["verdict"] = "n/a"
    assert "cannot be fully judged" in narrow.overall_line(verdicts, "m")
    verdicts["narrow"] = {"verdict": "yes", "text": "n"}
    verdicts["stability"]["verdict"] = "yes"
    assert "**holds**" in narrow.overall_line(verdicts, "m")


@pytest.mark.parametrize("narrow_result", ["partly", "no"])
def test_headline_withholds_efficiency_and_stability_without_a_narrow_solution(narrow_result):
    # The second paper compares the general solution with a *narrow* one; a KL run that fails
    # the narrow test makes that a comparison of two general solutions: no verdict is printed.
    verdicts = {"narrow": {"verdict": narrow_result, "text": "n"},
                "efficiency": {"verdict": "no", "text": "e"},
                "stability": {"verdict": "no", "text": "s"},
                "steering": {"verdict": "yes", "text": "st"}}
    line = narrow.overall_line(verdicts, "m")
    assert "is not judged" in line and f"narrow test: {narrow_result}" in line
    assert "does not hold" not in line and "**holds" not in line
    by_claim = narrow.claims(verdicts).set_index("claim")["holds here"]
    assert by_claim[narrow.CLAIMS["efficiency"][0]] == narrow.WITHHELD
    assert by_claim[narrow.CLAIMS["stability"][0]] == narrow.WITHHELD
    assert by_claim[narrow.CLAIMS["steering"][0]] == "yes"  # other claims keep their verdicts
    assert by_claim[narrow.CLAIMS["narrow"][0]] == narrow_result


def test_common_norms():
    assert stability.common_norms({"general": 2.0, "narrow": 1.0}) == [0.5, 1.0, 1.5, 2.0, 3.0]
    assert stability.common_norms({"general": 2.0}, [0.5, 3]) == [0.5, 3.0]
    with pytest.raises(ParameterError):
        stability.common_norms({"general": 2.0}, [-1])


# --- plots --------------------------------------------------------------------------------------

def _labelled(ax):
    assert ax.get_title() or ax.figure._suptitle is not None
    assert ax.get_xlabel() and ax.get_ylabel()


def test_plots_have_titles_and_labels():
    import matplotlib.pyplot as plt

    eff = pd.DataFrame([
        {"solution": s, "kind": k, "scale": f, "norm": f * n, "npo": 13.8 - f * d, "nll": 1.0}
        for s, n, d in (("general", 2.0, 5.0), ("narrow", 1.0, 2.0))
        for k, f in (("factor", 0.0), ("factor", 1.0), ("factor", 2.0), ("norm", 0.75))])
    ax = plots.efficiency_curves(eff, base_loss=13.8)
    _labelled(ax)
    assert "norm" in ax.get_xlabel() and "nats" in ax.get_ylabel()
    orig = {"general": {"npo": 2.0}, "narrow": {"npo": 2.0}}
    base = {"general": {"npo": 10.0}, "narrow": {"npo": 10.0}}
    ax = plots.stability_curves(stability.stability_summary(_stability_table(), orig, base))
    _labelled(ax)
    assert ax.get_xscale() == "log"
    profile = pd.DataFrame({"layer": [1, 2, 3], "norm_general": [0.1, 0.5, 1.0],
                            "norm_narrow": [0.1, 0.2, 0.3], "cosine": [0.9, 0.5, 0.2]})
    fig = plots.direction_profile(profile, layer=2)
    assert fig._suptitle.get_text()
    for ax in fig.axes:
        _labelled(ax)
    fig = plots.dose_curves(_dose())
    assert fig._suptitle.get_text()
    for ax in fig.axes:
        _labelled(ax)
    left = fig.axes[0]
    assert left.get_xscale() == "log" and len(left.collections) >= 1, "the random band is drawn"
    assert any("10 random directions" in t.get_text() for t in left.get_legend().get_texts())
    plt.close("all")


# --- upstream runs ------------------------------------------------------------------------------

def test_missing_upstream_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path / "build"))
    with pytest.raises(EmaError, match="ema run unlearning --profile smoke"):
        narrow.general_solution("smoke")
    with pytest.raises(EmaError, match="ema run mitigation --profile cpu"):
        narrow.narrow_solution(None, None, "m", "cpu")


def test_no_training_guard():
    with narrow._no_training("ema run mitigation --profile x"):
        with pytest.raises(EmaError, match="ema run mitigation --profile x"):
            trainer.unlearn(None, None)
    assert trainer.unlearn.__name__ == "unlearn", "restored afterwards"


@pytest.fixture(scope="module")
def upstream(tiny, tmp_path_factory):
    """Chapters 2 and 4 as they would leave their results, on the tiny model (canned refusals):
    a plain NPO run and one KL run on Safety, with pointer files, run.json and summaries."""
    from ema_utils import interventions, mitigation, run_options
    from ema_utils.core.cache import atomic_write_json

    build = tmp_path_factory.mktemp("narrow-build")
    model, tokenizer = tiny

    def fake(model, tokenizer, table, judge, max_new_tokens, batch_size, progress):
        return table[["id", "concept", "prompt"]].assign(
            response="I'm sorry, but I can't assist with that.", complete=True, is_refusal=True)

    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMA_BUILD_DIR", str(build))
        mp.setattr(sets, "_generate_and_judge", fake)
        params = {"n_forget": 4, "forget_candidates": 0, "forget_max_new_tokens": 24,
                  "traj_n_per_concept": 1, "traj_max_new_tokens": 2, "kl_n_per_concept": 1,
                  "eval_batch_size": 4, "judge": "phrase", "seed": 0, "model": "tiny"}
        ch2 = build / "results" / "unlearning" / "k2"
        ch2.mkdir(parents=True)
        atomic_write_json(ch2 / "run.json", {"parameters": params})
        options = run_options.upstream_options(ch2)
        config = trainer.UnlearnConfig(method="npo", lr=5e-2, max_steps=2, checkpoint_every=1,
                                       batch_size=2, lora_r=2, lora_alpha=2)
        plain = interventions.run_intervention(model, tokenizer, "tiny", "safety", "npo", config,
                                               retain_ratio=1, progress=False, **options)
        interventions.save_run_summaries(ch2, [plain])
        atomic_write_json(build / "results" / "unlearning" / "smoke.json", {"folder": str(ch2)})
        summaries = interventions.load_run_summaries(ch2)
        plan = mitigation.augmented_plan(summaries, ["safety"], retain_ratios=[],
                                         sft_retain_ratios=[], kl_lambdas=[10.0], model_id="tiny")
        runs = mitigation.train_augmented(model, tokenizer, "tiny", plan, options, progress=False)
        ch4 = build / "results" / "mitigation" / "k4"
        ch4.mkdir(parents=True)
        atomic_write_json(ch4 / "run.json", {"parameters": {"model": "tiny", "kl_ratio": 1.0,
                                                            "w1": 1.0, "checkpoint_rule": "last"}})
        refusal = {"aligned": {c: 0.9 for c in CONCEPTS},
                   "npo_safety": {**{c: 0.5 for c in CONCEPTS}, "safety": 0.1},
                   "npo_kl_1to1_lambda10_safety": {**{c: 0.85 for c in CONCEPTS}, "safety": 0.3}}
        atomic_write_json(ch4 / "summary.json", {"refusal": refusal,
                                                 "steps": {"npo_kl_1to1_lambda10_safety": 2}})
        atomic_write_json(build / "results" / "mitigation" / "smoke.json", {"folder": str(ch4)})
        yield {"build": build, "plain": plain, "kl": runs["npo_kl_1to1_lambda10_safety"],
               "fake": fake}
    torch.set_num_threads(old_threads)


def test_solutions_are_read_from_the_earlier_chapters(tiny, upstream, monkeypatch):
    monkeypatch.setenv("EMA_BUILD_DIR", str(upstream["build"]))
    monkeypatch.setattr(sets, "_generate_and_judge", upstream["fake"])
    model, tokenizer = tiny
    general = narrow.general_solution("smoke")
    assert general.condition == "npo_safety" and general.path.is_dir()
    assert general.step == 2, "chapter 4's rule ('last') is used"
    assert general.beta == pytest.approx(0.1)
    sol, choice = narrow.narrow_solution(model, tokenizer, "tiny", "smoke")
    assert sol.condition == "npo_kl_1to1_lambda10_safety" and choice["kl_lambda"] == 10
    assert sol.path == upstream["kl"].folder / "checkpoint-00002"
    assert sol.config["method"] == "npo_kl" and sol.config["kl_lambda"] == 10
    assert not checkpoints.has_adapter(model)
    with pytest.raises(EmaError, match="same model"):
        narrow.narrow_solution(model, tokenizer, "other", "smoke")
    table = narrow.solutions_table([general, sol], json.loads(
        (upstream["build"] / "results" / "mitigation" / "k4" / "summary.json").read_text()))
    assert list(table.index) == ["aligned", "general", "narrow"]

    norms = stability.adapter_norms(model, [general, sol])
    assert set(norms) == {"general", "narrow"} and min(norms.values()) > 0
    # a KL run chapter 4 did not train is an error, not a training run
    alt = upstream["build"] / "results" / "mitigation" / "k4-alt"
    alt.mkdir(exist_ok=True)
    (alt / "run.json").write_text((upstream["build"] / "results" / "mitigation" / "k4" / "run.json")
                                  .read_text())
    summary = json.loads((upstream["build"] / "results" / "mitigation" / "k4" / "summary.json")
                         .read_text())
    summary["refusal"]["npo_kl_1to1_lambda100_safety"] = summary["refusal"].pop(
        "npo_kl_1to1_lambda10_safety")
    (alt / "summary.json").write_text(json.dumps(summary))
    (upstream["build"] / "results" / "mitigation" / "alt.json").write_text(
        json.dumps({"folder": str(alt)}))
    (upstream["build"] / "results" / "unlearning" / "alt.json").write_text(
        (upstream["build"] / "results" / "unlearning" / "smoke.json").read_text())
    with pytest.raises(EmaError, match="does not train.*ema run mitigation --profile alt"):
        narrow.narrow_solution(model, tokenizer, "tiny", "alt")
    assert not checkpoints.has_adapter(model)

    forget = narrow.forget_examples(model, tokenizer, "tiny", "smoke", n=3)
    assert len(forget) == 3 and (forget["concept"] == "safety").all()
    m = stability.measure_solution(model, tokenizer, general, forget, scales=[0, 1],
                                target_norms=[0.5 * 1], eps_values=[0.5], seeds=[0],
                                batch_size=4, progress=False)
    assert m["efficiency"]["solution"].eq("general").all() and m["norm"] > 0
    assert m["orig"]["npo"] < m["base"]["npo"], "unlearning lowered the forget loss"
    assert m["efficiency"].loc[0, "npo"] == pytest.approx(m["base"]["npo"], abs=1e-5)
    assert not checkpoints.has_adapter(model)


def test_direction_hooks_on_the_tiny_model(tiny, upstream, monkeypatch):
    monkeypatch.setenv("EMA_BUILD_DIR", str(upstream["build"]))
    model, tokenizer = tiny
    general = narrow.general_solution("smoke")
    prompts = steering.direction_prompts(7, seed=0)
    direction = steering.solution_direction(model, tokenizer, "tiny", general, prompts,
                                          batch_size=4, progress=False)
    n_layers = model.config.num_hidden_layers
    assert direction.shape == (n_layers + 1, model.config.hidden_size)
    assert np.linalg.norm(direction[1:], axis=1).max() > 0, "the adapter moved the activations"
    again = steering.solution_direction(model, tokenizer, "tiny", general, prompts, batch_size=4,
                                      progress=False)
    np.testing.assert_array_equal(direction, again)
    profile = steering.layer_profile({"general": direction, "narrow": direction})
    assert profile["layer"].tolist() == list(range(1, n_layers + 1))
    assert profile["cosine"].dropna().tolist() == pytest.approx([1.0] * len(profile["cosine"].dropna()))
    layer = steering.steer_layer(n_layers, 0.5)
    assert layer == 1
    residual = steering.residual_norm(model, tokenizer, "tiny", prompts, layer, batch_size=4,
                                      progress=False)
    states = activations.hidden_states(model, tokenizer, prompts, batch_size=4, progress=False)
    assert residual == pytest.approx(float(np.linalg.norm(states[:, layer], axis=1).mean()), rel=1e-5)
    # the tiny random model's answers decode to nothing: give it the aligned model's kind of answer
    from ema_utils.core import generation

    monkeypatch.setattr(generation, "generate_responses", lambda m, t, p, **k: p.assign(
        response=["I can't help with that."] * len(p)))
    answer = steering.answer_direction(model, tokenizer, "tiny", general, prompts, max_new_tokens=3,
                                       batch_size=4, progress=False)
    assert answer.shape == direction.shape and np.linalg.norm(answer[1:], axis=1).max() > 0
    assert not np.allclose(answer, direction), "answer tokens read a different mean"
    with pytest.raises(ParameterError, match="n_random_directions must be a positive integer"):
        steering.dose_evaluations(model, tokenizer, "tiny", general, {"prompt token": direction},
                                  layer, residual, n_random=0)
    dose = steering.dose_evaluations(model, tokenizer, "tiny", general,
                                     {"prompt token": direction, "answer tokens": answer}, layer,
                                     residual, coefficients=[1.0, 4.0], n_random=2, n_per_concept=1,
                                     max_new_tokens=2, batch_size=4, judge="phrase", progress=False)
    assert dose.groupby("kind").size().to_dict() == {"aligned": 1, "unlearned": 1,
                                                     "steer": 2 * 4, "ablate": 4}
    assert dose["rate"].between(0, 1).all() and (dose["n"] > 0).all()
    assert set(dose.loc[dose["kind"] == "steer", "direction"]) == {
        "prompt token", "answer tokens", "random 0", "random 1"}
    assert len(metrics.random_band(dose)) == 3  # steer at 1x and 4x, ablate
    assert not checkpoints.has_adapter(model)
    # the hooks are gone: the aligned model gives its own logits again
    ids = tokenizer(["a prompt"], return_tensors="pt")
    with torch.no_grad():
        first = model(**ids).logits
        from ema_utils import directions
        with directions.add_direction(model, direction[layer], layer, 50.0):
            steered = model(**ids).logits
        assert not torch.allclose(first, steered)
        assert torch.equal(model(**ids).logits, first)


def test_answer_token_means_average_the_answer_tokens_whatever_the_batch(tiny):
    model, tokenizer = tiny
    table = pd.DataFrame({"id": ["a", "b", "c"], "prompt": ["How do I pick a lock?", "Hi", "Why?"],
                          "response": ["I can't help with that.", "Hello there, how are you", "  "]})
    one = activations.answer_token_means(model, tokenizer, table, batch_size=1, progress=False)
    two = activations.answer_token_means(model, tokenizer, table, batch_size=2, progress=False)
    assert one.shape == (model.config.num_hidden_layers + 1, model.config.hidden_size)
    np.testing.assert_allclose(one, two, rtol=1e-4, atol=1e-5)  # padding does not count
    first = activations.answer_token_means(model, tokenizer, table.iloc[:1], progress=False)
    assert not np.allclose(first, one), "the second answer's tokens count too"
    with pytest.raises(ParameterError, match="no non-empty responses"):
        activations.answer_token_means(model, tokenizer, table.iloc[2:], progress=False)


def test_kl_choice_reads_the_development_items_when_chapter_4_recorded_them():
    summary = _mitigation_summary()  # on the eval items lambda 10 is closest to the aligned model
    dev = {"aligned": {c: 0.9 for c in CONCEPTS},
           "npo_kl_1to1_lambda1_safety": {**{c: 0.88 for c in CONCEPTS}, "safety": 0.1},
           "npo_kl_1to1_lambda10_safety": {**{c: 0.6 for c in CONCEPTS}, "safety": 0.3}}
    choice = narrow.choose_kl_lambda({**summary, "dev_refusal": dev})
    assert choice["kl_lambda"] == 1 and "development items" in choice["rule"]
    # chosen on the development items, judged on the reported ones
    reported = narrow.reported_choice(choice, summary)
    assert reported["condition"] == choice["condition"] and reported["rule"] == choice["rule"]
    assert reported["non_target_mean"] == pytest.approx(0.6) and choice["non_target_mean"] == pytest.approx(0.88)
    assert narrow.narrow_verdict(reported)["verdict"] == "no"  # the others fell 30 points
    assert narrow.reported_choice(choice, {})["non_target_mean"] == pytest.approx(0.88)
    assert "eval items" in narrow.choose_kl_lambda(summary)["rule"]


def test_dev_refusal_at_takes_each_runs_scored_step():
    from ema_utils.methods import interventions

    summaries = {"npo_safety": {"dev_refusal": {"0": {"safety": 0.9}, "4": {"safety": 0.2}}},
                 "npo_kl_1to1_lambda10_safety": {"dev_refusal": {"0": {"safety": 0.9},
                                                                 "8": {"safety": 0.4}}},
                 "old_run": {}}
    out = interventions.dev_refusal_at(summaries, {"npo_safety": 4, "npo_kl_1to1_lambda10_safety": 8,
                                                   "old_run": 4})
    assert out == {"aligned": {"safety": 0.9}, "npo_safety": {"safety": 0.2},
                   "npo_kl_1to1_lambda10_safety": {"safety": 0.4}}
