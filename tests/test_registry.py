"""ema_utils.methods.registry: adding a method is one entry and one loss, shown end to end on a toy
method (gradient ascent) run through a smoke intervention on the tiny model; the registry
checks its entries and `ema methods` lists them."""

import json

import pytest

from ema_utils import CONCEPTS, interventions, registry
from ema_utils.cli import main
from ema_utils.methods.condition import Condition
from ema_utils.core.errors import ParameterError
from ema_utils.methods.trainer import UnlearnConfig


def gradient_ascent_loss(step: registry.Step) -> dict:
    """The toy method: raise the forget responses' cross-entropy (plain gradient ascent)."""
    return {"ga": -registry.cross_entropy_term(step, "forget")}


@pytest.fixture
def toy_method():
    method = registry.register(registry.Method(
        "ga", "gradient ascent", gradient_ascent_loss, {"ga": "w_forget"}, ("forget",),
        "a toy method for the registry test", style=("v", "#000000")))
    yield method
    registry.unregister("ga")
    assert "ga" not in registry.METHODS


def test_a_registered_toy_method_runs_through_a_smoke_intervention(tiny, canned_refusals, tmp_path,
                                                                    monkeypatch, toy_method):
    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path / "build"))
    model, tokenizer = tiny
    config = UnlearnConfig(method="ga", lr=1e-2, max_steps=3, checkpoint_every=3, batch_size=2,
                           lora_r=2, lora_alpha=2)
    assert config.uses_forget and not config.uses_retain and config.loss_weights() == {"ga": 1.0}
    run = interventions.run_intervention(model, tokenizer, "tiny", "cybersecurity", "ga", config,
                                         n_forget=4, traj_n_per_concept=1, traj_max_new_tokens=2,
                                         kl_n_per_concept=1, judge="phrase", batch_size=4,
                                         progress=False)
    assert run.name == "ga_cybersecurity" and run.method == "ga"
    assert "ga" in run.losses.columns and "npo" not in run.losses.columns
    assert run.losses["ga"].iloc[-1] < run.losses["ga"].iloc[0], "gradient ascent's loss goes down"
    assert sorted(run.trajectory["step"].unique()) == [0, 3]
    assert set(run.trajectory["concept"]) == set(CONCEPTS)
    # the rest of the book reads the entry: names, labels, styles
    condition = Condition("ga", "cybersecurity")
    assert condition.name == run.name and condition.label == "gradient ascent"
    assert condition.style == ("v", "#000000")


def test_ema_methods_lists_every_entry_and_a_new_one(capsys, toy_method):
    assert main(["methods", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)["methods"]}
    assert list(listed)[:5] == ["npo", "sft", "npo_retain", "sft_retain", "npo_kl"]
    assert listed["npo_kl"]["weights"] == {"npo": "w_forget", "kl": "kl_lambda"}
    assert listed["npo_retain"]["base"] == "npo" and listed["npo_retain"]["data"] == ["forget", "retain"]
    assert listed["sft"]["paper_method"] == "finetune_sft"
    assert listed["ga"]["label"] == "gradient ascent"
    assert main(["methods"]) == 0
    assert "npo_kl" in capsys.readouterr().out


def test_every_method_weighs_its_parts_by_real_config_fields():
    for name, method in registry.METHODS.items():
        config = UnlearnConfig(method=name)
        assert set(config.loss_weights()) == set(method.weights)
        assert config.uses_retain == ("retain" in method.data)


@pytest.mark.parametrize("kwargs, message", [
    (dict(data=("weather",)), "data must be a non-empty subset"),
    (dict(weights={}), "weights must map each loss part"),
    (dict(base="rlhf"), "base 'rlhf' is not registered"),
])
def test_bad_entries_are_refused(kwargs, message):
    fields = dict(name="bad", label="bad", loss=gradient_ascent_loss, weights={"ga": "w_forget"},
                  data=("forget",), description="")
    fields.update(kwargs)
    with pytest.raises(ParameterError, match=message):
        registry.register(registry.Method(**fields))
    assert "bad" not in registry.METHODS


def test_a_weight_field_that_does_not_exist_is_named(toy_method):
    registry.register(registry.Method("ga2", "x", gradient_ascent_loss, {"ga": "w_nothing"},
                                      ("forget",), ""))
    try:
        with pytest.raises(ParameterError, match="UnlearnConfig.w_nothing, which does not exist"):
            UnlearnConfig(method="ga2")
    finally:
        registry.unregister("ga2")


def test_unknown_method_lists_the_registry():
    with pytest.raises(ParameterError, match="unknown method 'rlhf'; methods: npo, sft"):
        registry.get_method("rlhf")
    with pytest.raises(ParameterError, match="the method registry"):
        UnlearnConfig(method="rlhf")
    assert registry.plain_methods() == ("npo", "sft")
    assert registry.augmented_methods() == ("npo_retain", "sft_retain", "npo_kl")
    assert registry.method_label("npo_kl") == "NPO + KL" and registry.method_label("x") == "x"
