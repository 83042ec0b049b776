"""ema_utils.methods.interventions on the tiny model: one NPO run, its trajectory and its selection."""

import pandas as pd
import pytest
import torch

from ema_utils import CONCEPTS, checkpoints, interventions, trainer
from ema_utils.core.errors import ParameterError




def test_npo_run_is_scored_along_training_and_cached(tiny, canned_refusals, tmp_path,
                                                     monkeypatch):
    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path / "build"))
    model, tokenizer = tiny
    config = trainer.UnlearnConfig(method="npo", lr=1e-2, max_steps=4, checkpoint_every=2,
                                   batch_size=2, lora_r=2, lora_alpha=2)
    kwargs = dict(n_forget=4, traj_n_per_concept=1, traj_max_new_tokens=2, kl_n_per_concept=2,
                  judge="phrase", batch_size=4, progress=False)
    splits = []  # which prompt split each checkpoint is scored on
    real_evaluate = interventions.evaluate
    monkeypatch.setattr(interventions, "evaluate",
                        lambda *a, **k: splits.append(k.get("split")) or real_evaluate(*a, **k))
    run = interventions.run_intervention(model, tokenizer, "tiny", "cybersecurity", "npo", config,
                                         **kwargs)
    assert splits == ["dev"] * 3, "the checkpoint rules must read the development split"
    assert run.name == "npo_cybersecurity" and run.forget_stats["used"] == 4
    assert sorted(run.trajectory["step"].unique()) == [0, 2, 4]
    assert set(run.trajectory["concept"]) == set(CONCEPTS)
    # each checkpoint's development-split rates travel in the run's summary (chapter 4 -> 6)
    assert set(run.summary()["dev_refusal"]) == {"0", "2", "4"}
    assert run.losses["npo"].iloc[-1] < run.losses["npo"].iloc[0], "NPO loss goes down"
    assert set(run.kl["concept"]) == set(CONCEPTS)
    assert (run.kl[run.kl["step"] == 0]["kl"].abs() < 1e-6).all(), "no change at step 0"
    assert (run.kl[run.kl["step"] == 4]["kl"] > 0).any(), "training moved the first token"
    # the mean over each concept's KL prompts carries its interval over those prompts
    trained = run.kl[run.kl["step"] == 4]
    assert (trained["n"] == 2).all() and (trained["low"] <= trained["kl"] + 1e-12).all()
    assert (trained["kl"] <= trained["high"] + 1e-12).all()
    # a run folder written before per-prompt values were kept: the means, intervals NaN
    (run.folder / "kl.jsonl").rename(run.folder / "kl.jsonl.bak")
    try:
        old = interventions.kl_by_concept(run.folder)
    finally:
        (run.folder / "kl.jsonl.bak").rename(run.folder / "kl.jsonl")
    merged = old.merge(run.kl, on=["step", "concept"], suffixes=("_old", ""))
    assert len(merged) == len(run.kl) and old["low"].isna().all()
    assert (merged["kl_old"] - merged["kl"]).abs().max() < 1e-6
    import matplotlib

    matplotlib.use("Agg")
    from ema_utils import plots

    assert plots.kl_curves([run]).axes[0].collections, "each concept's interval band is drawn"
    assert run.selected is None or run.selected["step"] in (2, 4)
    assert run.summary()["utility_above_chance"] in (True, False)  # the auto rule's input is kept
    assert run.checkpoint_path(0) is None and run.checkpoint_path(4).is_dir()
    assert not checkpoints.has_adapter(model), "the caller's model is left without an adapter"
    summary = interventions.trajectory_summary(run)
    assert list(summary.columns) == ["step", "target", "non_target_mean", "utility"]

    monkeypatch.setattr(trainer, "unlearn", lambda *a, **k: pytest.fail("retrained"))
    again = interventions.run_intervention(model, tokenizer, "tiny", "cybersecurity", "npo",
                                           config, **kwargs)
    pd.testing.assert_frame_equal(again.trajectory, run.trajectory)
    assert again.folder == run.folder

    interventions.save_run_summaries(tmp_path, [run])
    loaded = interventions.load_run_summaries(tmp_path)
    assert loaded["npo_cybersecurity"]["forget"]["used"] == 4
    # a step given per run overrides the checkpoint rule (the matched-refusal comparison)
    scored = interventions.evaluate_runs(model, tokenizer, "tiny", loaded, rule="last",
                                         steps={"npo_cybersecurity": 2}, n_per_concept=1,
                                         max_new_tokens=2, judge="phrase", batch_size=4,
                                         over_refusal=False, utility=False, progress=False)
    assert scored["npo_cybersecurity"].settings["step"] == 2 and "aligned" in scored
    last = interventions.evaluate_runs(model, tokenizer, "tiny", loaded, rule="last", n_per_concept=1,
                                       max_new_tokens=2, judge="phrase", batch_size=4,
                                       over_refusal=False, utility=False, progress=False)
    assert last["npo_cybersecurity"].settings["step"] == 4


def test_bad_concept_or_method_is_named(tiny):
    model, tokenizer = tiny
    config = trainer.UnlearnConfig()
    with pytest.raises(ParameterError, match="unknown concept 'weather'"):
        interventions.run_intervention(model, tokenizer, "tiny", "weather", "npo", config)
    with pytest.raises(ParameterError, match="unknown method 'rlhf'"):
        interventions.run_intervention(model, tokenizer, "tiny", "safety", "rlhf", config)
    with pytest.raises(ParameterError, match="does not match"):
        interventions.run_intervention(model, tokenizer, "tiny", "safety", "sft", config)


def test_ema_unlearn_validates_before_loading(monkeypatch, capsys):
    from ema_utils import models
    from ema_utils.cli import main

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["unlearn", "--concept", "weather", "--method", "npo"]) == 2
    err = capsys.readouterr().err
    assert "'weather'" in err and "cybersecurity, safety" in err
    assert main(["unlearn", "--concept", "safety", "--method", "npo", "-p", "lr=-1"]) == 2
    assert "lr must be a positive number" in capsys.readouterr().err
    assert main(["unlearn", "--concept", "safety", "--method", "npo", "--retain-ratio", "1:x"]) == 2
    assert "'1:x'" in capsys.readouterr().err
    assert main(["unlearn", "--concept", "safety", "--method", "npo", "-p", "max_steps=0"]) == 2
    assert "max_steps" in capsys.readouterr().err


def test_ema_unlearn_runs_on_the_tiny_model(tiny, canned_refusals, tmp_path,
                                            monkeypatch, capsys):
    import json

    from ema_utils.cli import main

    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path / "build"))
    assert main(["unlearn", "--concept", "safety", "--method", "npo", "--model", "tiny-random",
                 "-p", "max_steps=2", "-p", "checkpoint_every=1", "-p", "lr=1e-2",
                 "-p", "lora_r=2", "-p", "n_forget=3", "-p", "traj_n_per_concept=1",
                 "-p", "traj_max_new_tokens=2", "-p", "kl_n_per_concept=1", "-p", "judge=phrase",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "npo_safety" and [r["step"] for r in out["trajectory"]] == [0, 1, 2]
    assert (tmp_path / "build").exists() and out["losses"]


@pytest.mark.parametrize("ratio, per_step", [(1, 2), (2, 4), ("1:3", 6)])
def test_the_forget_retain_ratio_sets_the_retain_data_per_step(tiny, canned_refusals, tmp_path,
                                                                monkeypatch, ratio, per_step):
    # The paper's forget:retain ratio changes how much retain data each step sees (#23): at 1:2
    # a step holds two retain examples per forget example, so the retain term weighs more.
    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path / "build"))
    model, tokenizer = tiny
    seen = {}

    class Stop(Exception):
        pass

    def capture(model, tokenizer, forget=None, config=None, retain=None, **kwargs):
        seen["config"], seen["retain"] = config, retain
        raise Stop

    monkeypatch.setattr(trainer, "unlearn", capture)
    config = trainer.UnlearnConfig(method="npo_retain", max_steps=2, batch_size=2, lora_r=2, lora_alpha=2)
    with pytest.raises(Stop):
        interventions.run_intervention(model, tokenizer, "tiny", "safety", "npo", config, n_forget=4,
                                       retain_ratio=ratio, traj_n_per_concept=1, traj_max_new_tokens=2,
                                       kl_n_per_concept=1, judge="phrase", batch_size=4, progress=False)
    assert seen["config"].retain_batch_size == per_step and seen["config"].batch_size == 2
    assert len(seen["retain"]) == 4 * per_step // 2  # the retain set grows with the ratio too
    assert interventions.retain_batch(4, 0.1) == 1  # never an empty retain batch


def test_the_training_seed_changes_training_only(tiny, canned_refusals, tmp_path, monkeypatch):
    # The data seed draws the forget subset and the scored items; the training seed (the
    # config's) only LoRA's initialisation and the batch order. Two training seeds on one data
    # seed: the same forget set and items, different adapters.
    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path / "build"))
    model, tokenizer = tiny
    kwargs = dict(n_forget=4, forget_candidates=8, traj_n_per_concept=1, traj_max_new_tokens=2,
                  kl_n_per_concept=1, judge="phrase", batch_size=4, seed=3, progress=False)
    config = trainer.UnlearnConfig(method="npo", lr=1e-2, max_steps=2, checkpoint_every=2,
                                   batch_size=2, lora_r=2, lora_alpha=2)
    runs = interventions.run_seeds(model, tokenizer, "tiny", "cybersecurity", "npo", config,
                                   train_seeds=[0, 1], **kwargs)
    assert [r.name for r in runs] == ["npo_cybersecurity", "npo_seed1_cybersecurity"]
    assert [r.settings["config"]["seed"] for r in runs] == [0, 1]
    forget = [pd.read_json(r.folder.parent / f"{r.folder.name}.inputs.json", typ="series")["forget"]
              for r in runs]
    assert forget[0] == forget[1], "the same forget set"
    assert runs[0].trajectory[["step", "concept", "n"]].equals(runs[1].trajectory[["step", "concept", "n"]])
    assert runs[0].folder != runs[1].folder
    assert not runs[0].losses["npo"].equals(runs[1].losses["npo"]), "training differs"
    for bad in ([], [1, 1], [-1], "0"):
        with pytest.raises(ParameterError, match="train_seeds"):
            interventions.run_seeds(model, tokenizer, "tiny", "cybersecurity", "npo", config,
                                    train_seeds=bad, **kwargs)


def test_ema_unlearn_takes_a_training_seed_apart_from_the_data_seed(monkeypatch):
    from ema_utils import models
    from ema_utils.cli import main

    seen = {}

    class Stop(Exception):
        pass

    def fake_run(model, tokenizer, model_id, concept, method, config, **kwargs):
        seen.update(train=config.seed, data=kwargs.get("seed"))
        raise Stop

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(interventions, "model_identity", lambda *a: "m")
    monkeypatch.setattr(interventions, "run_intervention", fake_run)
    for argv, want in ((["-p", "seed=3", "-p", "train_seed=5"], {"train": 5, "data": 3}),
                       (["-p", "seed=3"], {"train": 3, "data": 3}),
                       (["-p", "train_seed=2"], {"train": 2, "data": None})):
        seen.clear()
        with pytest.raises(Stop):
            main(["unlearn", "--concept", "safety", "--method", "npo", *argv])
        assert seen == want, argv


def test_the_auto_rule_is_the_papers_only_where_utility_can_tell_checkpoints_apart(tmp_path):
    from ema_utils.methods.checkpoints import resolve_rule

    assert resolve_rule("auto", True) == "utility"
    assert resolve_rule("auto", False) == "first_below"  # MMLU at chance: the utility rule is noise
    assert resolve_rule("auto", None) == "utility"  # a run recorded before: the paper's rule
    assert resolve_rule("last", False) == "last" and resolve_rule("utility", False) == "utility"
    with pytest.raises(ParameterError, match="checkpoint rule 'best' unknown; rules: auto, utility"):
        resolve_rule("best", True)
    for step in (5, 10, 15, 20):
        (tmp_path / f"checkpoint-{step:05d}").mkdir()
    summary = {"folder": str(tmp_path), "selected_step": 20, "first_below_step": 10}
    at_chance = {**summary, "utility_above_chance": False}
    assert interventions.chosen_step(at_chance) == 10 and interventions.rule_for(at_chance) == "first_below"
    assert interventions.chosen_step({**summary, "utility_above_chance": True}) == 20
    assert interventions.chosen_step(at_chance, "utility") == 20
    assert interventions.chosen_step(at_chance, "last") == 20
    assert interventions.chosen_step({**at_chance, "first_below_step": None}) == 20  # none found: the last


def test_a_run_knows_whether_its_aligned_utility_lies_above_chance(tmp_path):
    def run(utility):
        return interventions.InterventionRun(
            name="npo_safety", concept="safety", method="npo", folder=tmp_path, forget_stats={},
            losses=pd.DataFrame(), kl=pd.DataFrame(), trajectory=pd.DataFrame(),
            utility=pd.DataFrame(utility), selected=None, first_below=None)

    assert run([{"step": 0, "utility": 0.28, "low": 0.21}, {"step": 5, "utility": 0.3, "low": 0.22}]
               ).utility_above_chance() is False
    above = run([{"step": 0, "utility": 0.6, "low": 0.52}])
    assert above.utility_above_chance() is True and above.summary()["utility_above_chance"] is True
    assert run([{"step": 0, "utility": 0.6}]).utility_above_chance() is None  # not recorded
    assert run([]).utility_above_chance() is None
