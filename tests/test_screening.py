"""ema_utils.build.screening: does the first-token refusal score agree with the generated verdict?"""

import contextlib
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from ema_utils.build import screening
from ema_utils.core.errors import ParameterError


def _items(step, verdicts, scores):
    return pd.DataFrame({"step": step, "is_refusal": verdicts, "first_token": scores})


def test_screening_agreement_counts_items_and_rates_per_step():
    items = pd.concat([
        _items(0, [True, True, True, False], [0.9, 0.8, 0.3, 0.1]),  # one refusal scored low
        _items(5, [False, False, True, False], [0.1, 0.2, 0.7, 0.6]),  # one answer scored high
    ])
    out = screening.screening_agreement(items)
    assert out["items"] == 8 and out["agreement"] == pytest.approx(6 / 8)
    assert out["usable"] is False  # 75% is far under the 97% bar
    assert [(r["step"], r["generated"], r["screened"]) for r in out["by_step"]] == [
        (0, 0.75, 0.5), (5, 0.25, 0.5)]
    # the ranking is imperfect (0.3 refusal below 0.6 answer), so the AUC is under 1
    assert 0.5 < out["auc"] < 1.0
    # 0.3 gets the low refusal right and one answer wrong, 0.7 the other way round: 7 of 8 each,
    # the best any threshold does on these items
    assert out["best_agreement"] == 7 / 8
    assert min(abs(out["best_threshold"] - t) for t in (0.3, 0.7)) < 1e-9


def test_screening_agreement_is_usable_when_the_score_separates_the_verdicts():
    rng = np.random.default_rng(0)
    verdicts = rng.random(200) < 0.4
    scores = np.where(verdicts, 0.8, 0.2) + rng.normal(0, 0.05, 200)
    out = screening.screening_agreement(_items(0, verdicts, scores))
    assert out["agreement"] == 1.0 and out["usable"] and out["auc"] == 1.0


def test_screening_agreement_refuses_bad_input():
    with pytest.raises(ParameterError, match="threshold"):
        screening.screening_agreement(_items(0, [True], [0.5]), threshold=2)
    with pytest.raises(ParameterError, match="first_token"):
        screening.screening_agreement(pd.DataFrame({"step": [0], "is_refusal": [True]}))
    with pytest.raises(ParameterError, match="no items"):
        screening.screening_agreement(_items(0, [], []))
    # one class only: no AUC, but the agreement still counts
    assert screening.screening_agreement(_items(0, [False, False], [0.1, 0.2]))["auc"] is None


def test_check_screening_scores_every_checkpoint_of_the_profiles_run(monkeypatch):
    # The real check trains and generates; here each model step is a stand-in, so what is
    # tested is the plan: the run's own steps and settings, generation reused, a first-token
    # score per refusal item, and the report.
    calls, scored_models = [], []

    def evaluate(model, tokenizer, model_id, **kw):
        calls.append((model_id, kw["split"], kw["n_per_concept"], kw["max_new_tokens"]))
        assert model == f"adapted:{model_id}"  # generation on the checkpoint, not the base
        return SimpleNamespace(items=pd.DataFrame({
            "prompt": ["a", "b", "c"], "scorer": ["refusal", "refusal", "bbq"],
            "is_refusal": [True, False, None]}))

    class FirstToken:
        def __init__(self, model, tokenizer, batch_size, progress):
            scored_models.append(model)

        def scores(self, prompts):
            return np.array([0.9, 0.1][:len(prompts)])

    run = SimpleNamespace(name="npo_cybersecurity",
                          trajectory=pd.DataFrame({"step": [0, 0, 5, 5, 10]}),
                          checkpoint_path=lambda step: None if step == 0 else f"ckpt-{step}")
    monkeypatch.setattr(screening, "load_model", lambda name, device=None, dtype=None, log=None:
                        ("model", "tokenizer"))
    monkeypatch.setattr(screening, "model_identity", lambda name, model: "base")
    monkeypatch.setattr(screening, "run_intervention", lambda *a, **kw: run)
    monkeypatch.setattr(screening, "evaluate", evaluate)
    monkeypatch.setattr(screening, "FirstTokenJudge", FirstToken)
    monkeypatch.setattr(screening, "with_checkpoint",
                        lambda lm, path, merged: contextlib.nullcontext(f"adapted:base+{path}"))
    monkeypatch.setattr(screening, "checkpoint_model_id", lambda mid, name, path: f"{mid}+{path}")
    report = screening.check_screening("cpu", progress=False)
    assert [c[0] for c in calls] == ["base+None", "base+ckpt-5", "base+ckpt-10"]
    # the first-token score reads each checkpoint's model too
    assert scored_models == ["adapted:base+None", "adapted:base+ckpt-5", "adapted:base+ckpt-10"]
    assert all(c[1:] == ("dev", 8, 16) for c in calls)  # the cpu profile's trajectory settings
    assert report["items"] == 6 and report["agreement"] == 1.0 and report["usable"]
    assert report["run"] == "npo_cybersecurity" and report["dtype"] == "fp32"
    text = screening.render_markdown(report)
    assert "100.0% at threshold 0.5" in text and "| 10 | 50% | 50% |" in text


def test_npo_run_settings_are_the_profiles_chapter_settings():
    from ema_utils.build.orchestrate import npo_run_settings

    evals, config, run_kwargs = npo_run_settings("cpu")
    assert (config.method, config.lr, config.max_steps, config.checkpoint_every) == ("npo", 8e-5, 20, 5)
    assert run_kwargs["traj_n_per_concept"] == 8 and evals["n_eval_per_concept"] == 30
    smoke = npo_run_settings("smoke")[1]
    assert smoke.max_steps == 4 and smoke.checkpoint_every == 4
    with pytest.raises(ParameterError, match="nope"):
        npo_run_settings("nope")
