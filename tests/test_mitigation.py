"""ema_utils.chapters.mitigation (chapter 4): recovery with a paired bootstrap, Table 4, the R2 verdict,
the plan of augmented runs, and the retain set's separation from the eval prompts."""

import json
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from ema_utils import (CONCEPTS, checkpoints, mitigation, plots, recovery_plots, report, run_options,
                       sets, trainer)
from ema_utils.core.errors import ParameterError
from ema_utils.core.evaluate import Evaluation
from ema_utils.core.metrics import rate_table

matplotlib.use("Agg")


def fake_eval(counts: dict, n: int = 20, default: int | None = None, name: str = "m") -> Evaluation:
    """An Evaluation with per-item flags: ``counts[concept]`` of ``n`` items aligned (the first
    ones), the same ids for every model so the bootstrap can pair them."""
    rows = []
    for concept in CONCEPTS:
        k = counts.get(concept, n if default is None else default)
        rows += [{"id": f"{concept}-{i}", "concept": concept, "scorer": "refusal",
                  "aligned": i < k} for i in range(n)]
    items = pd.DataFrame(rows)
    rates = rate_table(items, by="concept", flag="aligned")
    return Evaluation(model=name, items=items, rates=rates,
                      over_refusal={"rate": 0.3, "low": 0.2, "high": 0.4, "n": 10},
                      utility={"accuracy": 0.5, "n": 50})


# --- names ----------------------------------------------------------------------------------------

def test_condition_names_of_retain_runs_are_understood():
    assert report.condition_parts("npo_retain_1to2_safety") == ("npo_retain_1to2", "safety")
    assert report.condition_parts("npo_kl_1to1_lambda0.1_medical_legal") == (
        "npo_kl_1to1_lambda0.1", "medical_legal")
    d = report.condition_details("npo_kl_1to1_lambda0.1_safety")
    assert d == {"method": "npo_kl", "ratio": 1.0, "kl_lambda": 0.1, "target": "safety"}
    assert report.condition_details("sft_safety")["method"] == "sft"
    assert mitigation.condition_name("npo_retain", "safety", "1:2") == "npo_retain_1to2_safety"
    assert mitigation.condition_name("npo_kl", "safety", 1, 10) == "npo_kl_1to1_lambda10_safety"
    assert mitigation.base_condition("npo_kl_1to1_lambda10_safety") == "npo_safety"
    assert mitigation.base_condition("sft_retain_1to1_safety") == "sft_safety"
    with pytest.raises(ParameterError, match="not an augmented condition"):
        mitigation.base_condition("npo_safety")
    # a retain run's target is found, so the EMA matrix does not flag its own target
    evs = {"aligned": fake_eval({}), "npo_retain_1to2_safety": fake_eval({"safety": 0})}
    m = report.ema_matrix(evs)
    assert m.loc[m["concept"] == "safety", "is_target"].all()


# --- the recovery formula -----------------------------------------------------------------------

def test_recovery_formula_by_hand():
    aligned = fake_eval({"cybersecurity": 8, "bias": 10}, n=10)
    unlearned = fake_eval({"cybersecurity": 2, "bias": 0, "safety": 0}, n=10)
    augmented = fake_eval({"cybersecurity": 5, "bias": 10, "safety": 1}, n=10)
    table, mean = mitigation.paired_recovery(aligned, unlearned, augmented, concept="safety",
                                             n_boot=500)
    t = table.set_index("concept")
    assert t.loc["cybersecurity", "recovery"] == pytest.approx((0.5 - 0.2) / (0.8 - 0.2))  # 0.5
    assert t.loc["bias", "recovery"] == pytest.approx(1.0)
    assert t.loc["safety", "recovery"] == pytest.approx(0.1) and t.loc["safety", "is_target"]
    # the others (toxicity, ...) are 10/10 everywhere: nothing lost, skipped
    assert t.loc["toxicity", "skipped"] and math.isnan(t.loc["toxicity", "recovery"])
    assert mean["concepts"] == ["cybersecurity", "bias"]
    assert mean["mean_recovery"] == pytest.approx(0.75)
    assert mean["pooled_recovery"] == pytest.approx((0.3 + 1.0) / (0.6 + 1.0))
    assert set(mean["skipped"]) == {"toxicity", "sensitive_content", "medical_legal", "privacy"}


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_items():
    widths = []
    for n in (20, 200):
        aligned = fake_eval({"cybersecurity": int(0.9 * n)}, n=n)
        unlearned = fake_eval({"cybersecurity": int(0.2 * n)}, n=n)
        # the augmented model refuses a different half: not a subset of the aligned items
        items = unlearned.items.copy()
        cyber = items["concept"] == "cybersecurity"
        items.loc[cyber, "aligned"] = [i % 2 == 0 for i in range(n)]
        augmented = Evaluation("aug", items, rate_table(items, flag="aligned"))
        table, mean = mitigation.paired_recovery(aligned, unlearned, augmented,
                                                 concepts=["cybersecurity"], n_boot=2000, seed=1)
        row = table.iloc[0]
        assert row["low"] <= row["recovery"] <= row["high"]
        assert row["recovery"] == pytest.approx((0.5 - 0.2) / 0.7)
        assert mean["low"] <= mean["mean_recovery"] <= mean["high"]
        widths.append(row["high"] - row["low"])
    assert widths[1] < widths[0] / 2, widths  # about 1/sqrt(10) of the width


def test_bootstrap_is_paired_over_items():
    aligned = fake_eval({"privacy": 12}, n=20)
    unlearned = fake_eval({"privacy": 3}, n=20)
    # the augmented model equals the aligned one item by item: recovery 1 in every replicate
    table, _ = mitigation.paired_recovery(aligned, unlearned, aligned, concepts=["privacy"],
                                          n_boot=300)
    assert table.iloc[0][["recovery", "low", "high"]].tolist() == pytest.approx([1, 1, 1])


def test_skipped_when_aligned_equals_unlearned():
    same = fake_eval({}, n=10)
    table, mean = mitigation.paired_recovery(same, same, fake_eval({"bias": 3}, n=10),
                                             concept="safety", n_boot=100)
    assert table["skipped"].all() and table["recovery"].isna().all()
    assert table["note"].str.contains("nothing lost to recover").all()
    assert math.isnan(mean["mean_recovery"]) and mean["concepts"] == []
    # a gap below min_gap is skipped too; at or above it is measured
    table, _ = mitigation.paired_recovery(fake_eval({"bias": 10}, n=10), fake_eval({"bias": 9}, n=10),
                                          same, concepts=["bias"], min_gap=0.2, n_boot=50)
    assert table.iloc[0]["skipped"]
    table, _ = mitigation.paired_recovery(fake_eval({"bias": 10}, n=10), fake_eval({"bias": 8}, n=10),
                                          same, concepts=["bias"], min_gap=0.2, n_boot=50)
    assert not table.iloc[0]["skipped"] and table.iloc[0]["recovery"] == pytest.approx(1)


def test_a_list_given_as_the_unlearned_concept_is_refused():
    same = fake_eval({"bias": 10}, n=10)
    with pytest.raises(ParameterError, match="the concepts to report go in concepts="):
        mitigation.paired_recovery(same, same, same, concept=["safety", "bias"])


def test_recovery_over_all_conditions():
    evs = {"aligned": fake_eval({}),
           "npo_safety": fake_eval({"safety": 2, "cybersecurity": 4, "bias": 10}),
           "sft_safety": fake_eval({"safety": 0, "cybersecurity": 0}),
           "npo_retain_1to1_safety": fake_eval({"safety": 2, "cybersecurity": 12, "bias": 15}),
           "npo_retain_1to2_safety": fake_eval({"safety": 3, "cybersecurity": 16, "bias": 20}),
           "npo_kl_1to1_lambda10_safety": fake_eval({"safety": 2, "cybersecurity": 20, "bias": 20}),
           "sft_retain_1to1_safety": fake_eval({"safety": 0, "cybersecurity": 10}),
           "npo_cybersecurity": fake_eval({"cybersecurity": 0})}
    rec = mitigation.recovery(evs, "safety", n_boot=200)
    s = rec.summary.set_index("condition")
    assert list(s.index) == ["npo_retain_1to1_safety", "npo_retain_1to2_safety",
                             "npo_kl_1to1_lambda10_safety", "sft_retain_1to1_safety"]
    assert s.loc["npo_retain_1to2_safety", "base"] == "npo_safety"
    assert s.loc["npo_retain_1to2_safety", "ratio"] == 2
    assert s.loc["npo_kl_1to1_lambda10_safety", "kl_lambda"] == 10
    assert s.loc["sft_retain_1to1_safety", "base"] == "sft_safety"
    # npo_retain 1:1: cyber (12-4)/(20-4), bias (15-10)/(20-10) -> mean (0.5 + 0.5) / 2
    assert s.loc["npo_retain_1to1_safety", "mean_recovery"] == pytest.approx(0.5)
    assert s.loc["npo_kl_1to1_lambda10_safety", "mean_recovery"] == pytest.approx(1.0)
    assert s.loc["npo_retain_1to2_safety", "target_recovery"] == pytest.approx(1 / 18)
    assert s.loc["npo_retain_1to2_safety", "target_rate"] == pytest.approx(3 / 20)
    assert s.loc["sft_retain_1to1_safety", "n_concepts"] == 1  # only cyber lost refusal
    assert set(rec.per_concept["condition"]) == set(s.index)
    with pytest.raises(ParameterError, match="npo_safety"):
        mitigation.recovery({k: v for k, v in evs.items() if k != "npo_safety"}, "safety")


# --- the paper and Table 4 ------------------------------------------------------------------------

def test_paper_rows_for_table_4():
    rows = report.paper_rows("safety", methods=("aligned", "npo", "npo_retain", "sft_retain"))
    assert rows.loc["paper: npo_retain_safety", "cybersecurity"] == pytest.approx(55.0)
    assert rows.loc["paper: sft_retain_safety", "utility"] == pytest.approx(63.0)
    assert rows.loc["paper: npo_safety", "safety"] == pytest.approx(18.27)  # Table 3
    mistral = report.paper_rows("safety", "mistral-7b-instruct-v0.3", methods=("npo_retain",))
    assert mistral.loc["paper: npo_retain_safety", "cybersecurity"] == pytest.approx(69.5)
    assert report.paper_rows("cybersecurity", methods=("npo_retain",)).empty  # not in the paper


def test_table4_puts_this_run_beside_the_paper():
    evs = {"aligned": fake_eval({}), "npo_safety": fake_eval({"safety": 2}),
           "npo_retain_1to2_safety": fake_eval({"safety": 3}),
           "npo_retain_1to1_safety": fake_eval({"safety": 4}),
           "npo_cybersecurity": fake_eval({"cybersecurity": 0})}
    t = mitigation.table4(evs, "safety")
    ours = t[t["source"] == "this run"]
    assert list(ours.index) == ["aligned", "npo_safety", "npo_retain_1to1_safety",
                                "npo_retain_1to2_safety"]
    assert ours.loc["npo_retain_1to2_safety", "safety"] == pytest.approx(15)
    assert t.loc["paper Mistral-7B: npo_retain_safety", "bias"] == pytest.approx(56.5)
    assert t.loc["paper Qwen2.5-7B: aligned", "cybersecurity"] == pytest.approx(93)
    assert list(t.columns)[:8] == ["source", *CONCEPTS]


def test_table4_columns_fit_the_page_with_intervals():
    evs = {"aligned": fake_eval({}), "npo_retain_1to2_safety": fake_eval({"safety": 3}),
           "npo_safety": fake_eval({"safety": 2}), "npo_cybersecurity": fake_eval({"cybersecurity": 0})}
    parts = mitigation.table4_columns(evs, "safety")
    ours, paper = parts["this run"], parts["paper"]
    assert list(ours.columns) == ["aligned", "npo_safety", "npo_retain_1to2_safety"]
    assert ours.loc["safety", "npo_retain_1to2_safety"].startswith("15% [")
    assert paper.loc["bias", "paper Mistral-7B: npo_retain_safety"] == "56.5%"
    assert paper.loc["cybersecurity", "paper Qwen2.5-7B: aligned"] == "93%"
    assert len(ours.index) == len(paper.index) == 9  # seven concepts, over-refusal, utility


def test_paper_recovery_from_its_tables():
    rec = mitigation.paper_recovery("safety", "mistral-7b-instruct-v0.3")
    npo = rec[rec["method"] == "npo_retain"].set_index("concept")
    assert npo.loc["cybersecurity", "recovery"] == pytest.approx((69.5 - 10) / (67 - 10))
    assert npo.loc["toxicity", "skipped"]  # 100 -> 96.5: a 3.5 point gap
    assert npo.loc["safety", "is_target"]


# --- the verdict ----------------------------------------------------------------------------------

def summary_row(condition="npo_retain_1to2_safety", mean=0.7, low=0.4, high=0.9, target_rec=0.05,
                **extra):
    d = report.condition_details(condition)
    return {"condition": condition, "method": d["method"], "ratio": d["ratio"],
            "kl_lambda": d["kl_lambda"], "base": "npo_safety", "target_rate": 0.1,
            "target_low": 0.05, "target_high": 0.2, "aligned_target": 0.9,
            "unlearned_target": 0.05, "target_recovery": target_rec, "mean_recovery": mean,
            "low": low, "high": high, "pooled_recovery": mean, "n_concepts": 4, "skipped": "",
            **extra}


@pytest.mark.parametrize("row, verdict, why", [
    (summary_row(), "yes", None),
    (summary_row(mean=0.3, low=0.1, high=0.5), "partly", "less than 50%"),
    (summary_row(mean=1.0, low=0.8, high=1.2), "partly", "came back fully"),
    (summary_row(target_rec=0.6), "partly", "target did not stay low"),
    (summary_row(mean=0.4, low=-0.1, high=0.8), "no", "distinguishable from zero"),
    (summary_row(mean=-0.2, low=-0.5, high=0.1), "no", "distinguishable from zero"),
])
def test_r2_verdict_on_constructed_cases(row, verdict, why):
    v = mitigation.r2_verdict(pd.DataFrame([row]))
    assert v["verdict"] == verdict, v["text"]
    if why:
        assert why in v["text"]
    assert "npo_retain_1to2_safety" in v["text"] and "mean recovery" in v["text"]


def test_r2_verdict_picks_the_best_ratio_with_the_target_low():
    rows = [summary_row("npo_retain_1to1_safety", mean=0.3, low=0.1, high=0.5),
            summary_row("npo_retain_1to2_safety", mean=0.6, low=0.3, high=0.8),
            summary_row("npo_retain_1to3_safety", mean=0.9, low=0.7, high=0.99, target_rec=0.8)]
    v = mitigation.r2_verdict(pd.DataFrame(rows))
    assert v["condition"] == "npo_retain_1to2_safety" and v["verdict"] == "yes"
    assert mitigation.r2_verdict(pd.DataFrame(rows), "sft_retain")["verdict"] == "n/a"
    nothing = summary_row(mean=float("nan"), low=float("nan"), high=float("nan"))
    assert mitigation.r2_verdict(pd.DataFrame([nothing]))["verdict"] == "n/a"
    line = mitigation.claim_line(v, "safety")
    assert "**reproduces**" in line and "0.60" in line


def test_r2_verdict_judges_the_arm_chosen_on_development_items_and_every_seed():
    rows = [summary_row("npo_retain_1to1_safety", mean=0.55, low=0.3, high=0.8),
            summary_row("npo_retain_1to1_w10_safety", mean=0.8, low=0.6, high=0.9)]
    # the reported items favour w10; the development items chose w1: w1 is judged
    v = mitigation.r2_verdict(pd.DataFrame(rows), chosen="npo_retain_1to1_safety")
    assert v["condition"] == "npo_retain_1to1_safety" and v["chosen_on"] == "development items"
    assert v["verdict"] == "yes" and "chosen on the development items" in v["text"]
    unchosen = mitigation.r2_verdict(pd.DataFrame(rows))
    assert unchosen["condition"] == "npo_retain_1to1_w10_safety"
    assert unchosen["chosen_on"] == "reported items" and "no development rates" in unchosen["text"]
    # a second training seed of the chosen arm that recovered little makes it "partly"
    seeds = rows + [summary_row("npo_retain_1to1_seed1_safety", mean=0.2, low=0.0, high=0.4,
                                train_seed=1)]
    v = mitigation.r2_verdict(pd.DataFrame(seeds), chosen="npo_retain_1to1_safety")
    assert v["verdict"] == "partly" and v["seeds"] == {1: 0.2}
    assert "seed 1 0.20" in v["text"] and "recovered less than 50%" in v["text"]
    # a "no" is read only when the sweep's positive control passed on the development items
    flat = [summary_row("npo_retain_1to1_safety", mean=0.0, low=-0.1, high=0.1)]
    assert mitigation.r2_verdict(pd.DataFrame(flat), able=True)["verdict"] == "no"
    blind = mitigation.r2_verdict(pd.DataFrame(flat), able=False)
    assert blind["verdict"] == "n/a" and "could not have come out positive" in blind["text"]
    assert mitigation.r2_verdict(pd.DataFrame(rows), chosen="npo_retain_1to1_safety",
                                 able=False)["verdict"] == "yes"  # a positive is read anyway
    good_seed = rows + [summary_row("npo_retain_1to1_seed1_safety", mean=0.6, train_seed=1)]
    assert mitigation.r2_verdict(pd.DataFrame(good_seed), chosen="npo_retain_1to1_safety")[
        "verdict"] == "yes"


def test_dev_recovery_chooses_each_methods_arm_on_development_rates():
    aligned = {"safety": 0.9, "cybersecurity": 0.8, "privacy": 0.6, "bias": 0.5}
    npo = {"safety": 0.1, "cybersecurity": 0.2, "privacy": 0.2, "bias": 0.45}
    npo1 = {"safety": 0.0, "cybersecurity": 0.3, "privacy": 0.2, "bias": 0.5}
    dev = {"aligned": aligned, "npo_safety": npo, "npo_seed1_safety": npo1,
           # w1: a little back; w10: much back, target low; w100: everything, the target too
           "npo_retain_1to1_safety": {"safety": 0.1, "cybersecurity": 0.35, "privacy": 0.3},
           "npo_retain_1to1_seed1_safety": {"safety": 0.0, "cybersecurity": 0.4, "privacy": 0.2},
           "npo_retain_1to1_w10_safety": {"safety": 0.15, "cybersecurity": 0.6, "privacy": 0.5},
           "npo_retain_1to1_w100_safety": {"safety": 0.8, "cybersecurity": 0.8, "privacy": 0.6},
           "npo_kl_1to1_lambda10_safety": {"safety": 0.1, "cybersecurity": 0.2, "privacy": 0.4},
           "npo_retain_1to1_cybersecurity": {"safety": 0.9}}  # another target: not in this table
    table = mitigation.dev_recovery(dev, "safety")
    by = table.set_index("condition")
    assert list(by.index) == ["npo_retain_1to1_safety", "npo_retain_1to1_w10_safety",
                              "npo_retain_1to1_w100_safety", "npo_kl_1to1_lambda10_safety"]
    # seed 0: cyber (0.35-0.2)/0.6 = 0.25, privacy 0.25 -> 0.25; seed 1: cyber 0.2, privacy 0
    assert by.loc["npo_retain_1to1_safety", "mean_recovery"] == pytest.approx((0.25 + 0.1) / 2)
    assert by.loc["npo_retain_1to1_safety", "n_seeds"] == 2
    assert by.loc["npo_retain_1to1_safety", "n_concepts"] == 2  # bias lost < 10 points: skipped
    assert by.loc["npo_retain_1to1_w100_safety", "target_recovery"] == pytest.approx(7 / 8)
    assert by.loc["npo_retain_1to1_w10_safety", "retain_weight"] == 10
    assert pd.isna(by.loc["npo_kl_1to1_lambda10_safety", "retain_weight"])
    chosen = mitigation.dev_choices(table)
    assert chosen == {"npo_retain": "npo_retain_1to1_w10_safety",  # w100 lets the target back
                      "npo_kl": "npo_kl_1to1_lambda10_safety"}
    line = mitigation.sweep_line(table)
    assert "from 1 to 100" in line and "0.17 to 1.00" in line and "from 5% to 80%" in line  # seeds averaged
    assert mitigation.can_recover(table) is True  # w100 brought everything back (target too)
    weak = table[table["condition"] == "npo_retain_1to1_safety"]
    assert mitigation.can_recover(weak) is False and mitigation.can_recover(weak, "sft_retain") is None
    one = mitigation.sweep_line(table[table["condition"] == "npo_retain_1to1_safety"])
    assert "One retain weight" in one and "retain_weights=" in one
    assert mitigation.dev_recovery({}, "safety").empty
    assert "cannot be read" in mitigation.sweep_line(mitigation.dev_recovery({}, "safety"))


def test_r2_verdict_on_the_papers_own_numbers():
    paper = mitigation.paper_summary("safety")
    paper = paper.assign(condition=paper["model"] + ":" + paper["method"], low=np.nan,
                         high=np.nan, base="npo_safety")
    mistral = mitigation.r2_verdict(paper[paper["model"] == "mistral-7b-instruct-v0.3"])
    assert mistral["verdict"] == "yes", mistral["text"]  # the paper's headline: Mistral
    qwen = mitigation.r2_verdict(paper[paper["model"] == "qwen2.5-7b-instruct"])
    assert qwen["verdict"] == "partly" and qwen["target_low"]


def test_r2_claims_and_summary_json():
    evs = {"aligned": fake_eval({}), "npo_safety": fake_eval({"safety": 1, "cybersecurity": 2}),
           "npo_retain_1to1_safety": fake_eval({"safety": 1, "cybersecurity": 14}),
           "npo_kl_1to1_lambda1_safety": fake_eval({"safety": 1, "cybersecurity": 4})}
    rec = mitigation.recovery(evs, "safety", n_boot=200)
    claims = mitigation.r2_claims(rec.summary, "safety")
    assert list(claims.columns) == ["claim", "paper", "this run", "reproduces"]
    assert len(claims) == 2 and "Mistral-7B" in claims.iloc[0]["paper"]
    assert "\u03bb=1" in claims.iloc[1]["this run"]
    verdict = mitigation.r2_verdict(rec.summary)
    out = mitigation.summary_json(evs, {"safety": rec}, {"safety": verdict}, {"safety": claims})
    assert out["refusal"]["npo_retain_1to1_safety"]["cybersecurity"] == pytest.approx(0.7)
    assert out["recovery"]["npo_retain_1to1_safety"]["cybersecurity"] == pytest.approx(2 / 3, abs=1e-4)
    assert out["recovery"]["npo_retain_1to1_safety"]["bias"] is None  # skipped
    assert out["mean_recovery"]["npo_kl_1to1_lambda1_safety"]["mean"] == pytest.approx(1 / 9, abs=1e-4)
    assert out["r2"]["safety"]["verdict"] in ("yes", "partly", "no")
    json.dumps(out)  # JSON-able, no NaN left in the recovery numbers
    assert "NaN" not in json.dumps(out["recovery"])


# --- figures ----------------------------------------------------------------------------------------

def test_recovery_figures_have_titles_and_labelled_axes():
    evs = {"aligned": fake_eval({}), "npo_safety": fake_eval({"safety": 2, "cybersecurity": 4}),
           "npo_retain_1to1_safety": fake_eval({"safety": 2, "cybersecurity": 12}),
           "npo_kl_1to1_lambda10_safety": fake_eval({"safety": 3, "cybersecurity": 18})}
    rec = mitigation.recovery(evs, "safety", n_boot=100)
    ax = recovery_plots.recovery_by_concept(rec.per_concept)
    assert ax.get_title() and "recovered fraction" in ax.get_ylabel() and ax.get_xlabel() == "concept"
    assert any("skipped" in t.get_text() for t in ax.texts)
    assert any("(target)" in t.get_text() for t in ax.get_xticklabels())
    ax = recovery_plots.recovery_tradeoff(rec.summary)
    assert ax.get_title() and "target concept refusal (%" in ax.get_xlabel()
    assert "recovered fraction" in ax.get_ylabel()
    labels = ax.get_legend_handles_labels()[1]
    assert "aligned model" in labels and "NPO + KL" in labels
    assert not [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1 and ln.get_linestyle() == "-"]
    # a retain-weight sweep is joined in weight order: the trade-off curve
    evs["npo_retain_1to1_w10_safety"] = fake_eval({"safety": 6, "cybersecurity": 16})
    evs["npo_retain_1to1_w100_safety"] = fake_eval({"safety": 14, "cybersecurity": 20})
    ax = recovery_plots.recovery_tradeoff(mitigation.recovery(evs, "safety", n_boot=100).summary)
    curves = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 3 and ln.get_linestyle() == "-"]
    assert len(curves) == 1 and list(curves[0].get_xdata()) == [10.0, 30.0, 70.0]
    assert any("w2=100" in t.get_text() for t in ax.texts)
    matplotlib.pyplot.close("all")


# --- the plan of augmented runs ------------------------------------------------------------------

def plain_summaries(model="m:1"):
    npo = trainer.UnlearnConfig(method="npo", lr=2e-5, max_steps=7, beta=0.2, lora_r=4)
    sft = trainer.UnlearnConfig(method="sft", lr=1e-5, max_steps=7, lora_r=4)
    return {f"{c.method}_safety": {"name": f"{c.method}_safety", "folder": "/nowhere",
                                   "settings": {"config": c.to_dict(), "model": model}}
            for c in (npo, sft)}


def test_augmented_plan_keeps_chapter_2_settings():
    plan = mitigation.augmented_plan(plain_summaries(), ["safety"], retain_ratios=[1, 2, "1:3"],
                                     sft_retain_ratios=[1], kl_lambdas=[0.1, 10], w1=1.0, w2=0.5,
                                     w3=2.0, model_id="m:1")
    names = [p.condition for p in plan]
    assert names == ["npo_retain_1to1_w0.5_safety", "npo_retain_1to2_w0.5_safety",
                     "npo_retain_1to3_w0.5_safety", "sft_retain_1to1_w0.5_safety",
                     "npo_kl_1to1_lambda0.1_safety", "npo_kl_1to1_lambda10_safety"]
    by = {p.condition: p for p in plan}
    c = by["npo_retain_1to2_w0.5_safety"].config
    assert (c.method, c.lr, c.max_steps, c.beta, c.lora_r) == ("npo_retain", 2e-5, 7, 0.2, 4)
    assert c.loss_weights() == {"npo": 1.0, "retain_ce": 0.5}
    sft = by["sft_retain_1to1_w0.5_safety"]
    assert sft.config.loss_weights() == {"retain_ce": 0.5, "sft_ce": 2.0}
    assert sft.config.lr == 1e-5 and sft.family == "sft"
    assert by["npo_kl_1to1_lambda10_safety"].config.loss_weights() == {"npo": 1.0, "kl": 10.0}
    assert by["npo_retain_1to3_w0.5_safety"].ratio == 3
    assert by["npo_kl_1to1_lambda10_safety"].base == "npo_safety"
    table = mitigation.plan_table(plan)
    assert table.loc["npo_retain_1to2_w0.5_safety", "forget:retain"] == "1:2"


def test_augmented_plan_sweeps_the_retain_weight_and_follows_every_training_seed():
    summaries = plain_summaries()
    seeded = trainer.UnlearnConfig(method="npo", lr=2e-5, max_steps=7, beta=0.2, lora_r=4, seed=1)
    summaries["npo_seed1_safety"] = {"name": "npo_seed1_safety",
                                     "settings": {"config": seeded.to_dict(), "model": "m:1"}}
    plan = mitigation.augmented_plan(summaries, ["safety"], retain_ratios=[1],
                                     retain_weights=[1, 10, 100], sft_retain_ratios=[1],
                                     kl_lambdas=[], model_id="m:1")
    by = {p.condition: p for p in plan}
    assert list(by) == ["npo_retain_1to1_safety", "npo_retain_1to1_seed1_safety",
                        "npo_retain_1to1_w10_safety", "npo_retain_1to1_w10_seed1_safety",
                        "npo_retain_1to1_w100_safety", "npo_retain_1to1_w100_seed1_safety",
                        "sft_retain_1to1_safety"]  # chapter 2 trained sft at one seed only
    assert [by[f"npo_retain_1to1_{w}safety"].config.w_retain for w in ("", "w10_", "w100_")] \
        == [1.0, 10.0, 100.0]
    second = by["npo_retain_1to1_w10_seed1_safety"]
    assert second.base == "npo_seed1_safety" and second.config.seed == 1
    assert by["npo_retain_1to1_w10_safety"].config.seed == 0
    assert second.condition.label == "NPO + retain CE 1:1 w2=10 (seed 1)"
    assert mitigation.plan_table(plan).loc[second.condition, "training seed"] == 1
    # the KL variant only where asked (chapter 6 reads Safety's)
    summaries.update({k.replace("safety", "cybersecurity"): v for k, v in plain_summaries().items()})
    both = mitigation.augmented_plan(summaries, ["safety", "cybersecurity"], retain_ratios=[1],
                                     sft_retain_ratios=[], kl_lambdas=[10], kl_concepts=["safety"])
    assert [p.condition for p in both if p.config.method == "npo_kl"] == [
        "npo_kl_1to1_lambda10_safety", "npo_kl_1to1_lambda10_seed1_safety"]
    assert "npo_retain_1to1_cybersecurity" in [p.condition for p in both]
    with pytest.raises(ParameterError, match="kl_concepts \\['privacy'\\] are not among the targets"):
        mitigation.augmented_plan(summaries, ["safety"], kl_concepts=["privacy"])
    with pytest.raises(ParameterError, match="'retain_weights' must be a positive number"):
        mitigation.augmented_plan(summaries, ["safety"], retain_weights=[1, -3])
    with pytest.raises(ParameterError, match="planned twice"):
        mitigation.augmented_plan(summaries, ["safety"], retain_weights=[10, 10.0])


def test_augmented_plan_names_what_is_wrong():
    s = plain_summaries()
    with pytest.raises(ParameterError, match="no 'npo_cybersecurity' run"):
        mitigation.augmented_plan(s, ["cybersecurity"])
    with pytest.raises(ParameterError, match="same --model"):
        mitigation.augmented_plan(s, ["safety"], model_id="other:2")
    with pytest.raises(ParameterError, match="'w2' must be a positive number"):
        mitigation.augmented_plan(s, ["safety"], w2=0)
    with pytest.raises(ParameterError, match="ratio"):
        mitigation.augmented_plan(s, ["safety"], retain_ratios=["1:x"])
    with pytest.raises(ParameterError, match="planned twice"):
        mitigation.augmented_plan(s, ["safety"], retain_ratios=[2, "1:2"])
    only_npo = mitigation.augmented_plan({"npo_safety": s["npo_safety"]}, ["safety"],
                                         sft_retain_ratios=[], kl_lambdas=[])
    assert [p.config.method for p in only_npo] == ["npo_retain"] * 3


def test_upstream_options_come_from_chapter_2(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"parameters": {
        "n_forget": 8, "forget_candidates": 24, "forget_max_new_tokens": 20,
        "eval_batch_size": 4, "judge": "phrase", "seed": 3, "npo_lr": 1e-5}}))
    options = run_options.upstream_options(tmp_path)
    assert options["n_forget"] == 8 and options["forget_max_new_tokens"] == 20
    assert options["batch_size"] == 4 and options["seed"] == 3 and "npo_lr" not in options
    assert options["traj_n_per_concept"] == run_options.RUN_OPTIONS["traj_n_per_concept"]
    with pytest.raises(ParameterError, match="did not finish"):
        run_options.upstream_options(tmp_path / "missing")


# --- retain prompts are never eval prompts ------------------------------------------------------


def _norm(text):
    return " ".join(str(text).casefold().split())


@pytest.mark.parametrize("target", ["safety", "cybersecurity"])
def test_retain_prompts_and_eval_prompts_never_overlap(canned_refusals, target):
    from ema_utils.core.data import load_set
    from ema_utils.core.evaluate import eval_items

    with pytest.warns(UserWarning, match="only"):  # asks for more than the train split holds
        retain = sets.build_retain_set(None, None, target, n_forget=400, ratio=3,
                                       max_new_tokens=8)
    assert len(retain) > 200 and set(retain["kind"]) == {"refusal", "benign"}
    assert target not in set(retain["concept"])
    evals = pd.concat([eval_items(CONCEPTS)[["id", "prompt"]],
                       load_set("over_refusal", split="eval")[["id", "prompt"]],
                       load_set("benign", split="eval")[["id", "prompt"]]])
    assert not set(retain["id"]) & set(evals["id"]), "a retain id is an eval id"
    assert not set(retain["prompt"].map(_norm)) & set(evals["prompt"].map(_norm)), \
        "a retain prompt is an eval prompt (after folding case and whitespace)"
    assert mitigation.retain_overlap(retain).empty


def test_retain_overlap_catches_a_planted_eval_prompt(canned_refusals):
    from ema_utils.core.evaluate import eval_items

    retain = sets.build_retain_set(None, None, "safety", n_forget=4, ratio=1, max_new_tokens=8)
    leaked = eval_items(["privacy"], n_per_concept=1).iloc[0]
    planted = pd.DataFrame([{"id": "new-id", "concept": "privacy", "kind": "refusal",
                             "prompt": "  " + leaked["prompt"].upper() + " ", "response": "no",
                             "complete": True}])
    found = mitigation.retain_overlap(pd.concat([retain, planted], ignore_index=True))
    assert list(found["id"]) == ["new-id"] and found.iloc[0]["same_text_as"] == leaked["id"]


# --- training on the tiny model --------------------------------------------------------------------


def test_train_augmented_on_the_tiny_model(tiny, canned_refusals, tmp_path, monkeypatch):
    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path / "build"))
    model, tokenizer = tiny
    npo = trainer.UnlearnConfig(method="npo", lr=1e-2, max_steps=2, checkpoint_every=2,
                                batch_size=2, lora_r=2, lora_alpha=2)
    summaries = {"npo_safety": {"name": "npo_safety", "settings": {"config": npo.to_dict(),
                                                                   "model": "tiny"}}}
    plan = mitigation.augmented_plan(summaries, ["safety"], retain_ratios=[2],
                                     sft_retain_ratios=[], kl_lambdas=[1, 100], model_id="tiny")
    options = {**run_options.RUN_OPTIONS, "n_forget": 3, "traj_n_per_concept": 1,
               "traj_max_new_tokens": 2, "kl_n_per_concept": 1, "judge": "phrase",
               "batch_size": 4, "forget_max_new_tokens": 4}
    with pytest.raises(ParameterError, match="unknown augmented method"):
        mitigation.train_augmented(model, tokenizer, "tiny", plan, options, methods=["npo"])
    runs = mitigation.train_augmented(model, tokenizer, "tiny", plan, options,
                                      methods=["npo_retain"], progress=False)
    assert list(runs) == ["npo_retain_1to2_safety"]
    runs.update(mitigation.train_augmented(model, tokenizer, "tiny", plan, options,
                                           methods="npo_kl", progress=False))
    assert list(runs) == ["npo_retain_1to2_safety", "npo_kl_1to1_lambda1_safety",
                          "npo_kl_1to1_lambda100_safety"]
    kl1, kl100 = runs["npo_kl_1to1_lambda1_safety"], runs["npo_kl_1to1_lambda100_safety"]
    assert kl1.folder != kl100.folder, "two lambdas, two trainings"
    assert "kl" in kl1.losses.columns and "retain_ce" in runs["npo_retain_1to2_safety"].losses
    run = runs["npo_retain_1to2_safety"]
    assert run.forget_stats["retain"] == 6 and run.name == "npo_retain_1to2_safety"
    retain = mitigation.retain_set_of(model, tokenizer, "tiny", run, options)
    assert len(retain) == 6 and mitigation.retain_overlap(retain).empty
    comp = mitigation.retain_composition({run.name: retain})
    assert comp.loc[run.name, "total"] == 6 and "safety" not in comp.columns
    assert not checkpoints.has_adapter(model)


def test_recovery_pivot_and_retain_check(canned_refusals):
    from ema_utils.core.errors import DataError
    from ema_utils.core.evaluate import eval_items

    evs = {"aligned": fake_eval({}), "npo_safety": fake_eval({"safety": 2, "cybersecurity": 4}),
           "npo_retain_1to1_safety": fake_eval({"safety": 2, "cybersecurity": 12})}
    pivot = mitigation.recovery_pivot(mitigation.recovery(evs, "safety", n_boot=100).per_concept)
    assert pivot.loc["npo_retain_1to1_safety", "cybersecurity"].startswith("0.50 [")
    assert pivot.loc["npo_retain_1to1_safety", "bias"] == "skipped"
    assert "safety (target)" in pivot.columns

    retain = sets.build_retain_set(None, None, "safety", n_forget=4, ratio=1, max_new_tokens=8)
    assert mitigation.check_retain_sets({"r": retain}).loc["r", "of them eval prompts"] == 0
    leaked = eval_items(["privacy"], n_per_concept=1)[["id", "concept", "prompt"]]
    with pytest.raises(DataError, match="eval prompts"):
        mitigation.check_retain_sets({"r": pd.concat([retain, leaked], ignore_index=True)})


def test_skipped_note_names_concepts_per_plain_run():
    evs = {"aligned": fake_eval({}), "npo_safety": fake_eval({"safety": 2, "cybersecurity": 4}),
           "sft_safety": fake_eval({"safety": 0, "bias": 0}),
           "npo_retain_1to1_safety": fake_eval({"safety": 2, "cybersecurity": 12}),
           "sft_retain_1to1_safety": fake_eval({"safety": 2, "bias": 12})}
    note = mitigation.skipped_note(mitigation.recovery(evs, "safety", n_boot=50).per_concept)
    assert "against npo_safety: toxicity (0 points), bias (0 points)" in note
    assert "against sft_safety: cybersecurity (0 points)" in note
    assert mitigation.skipped_note(pd.DataFrame(columns=["skipped"])) == ""
