"""ema_utils.methods.condition: the typed condition names itself, reads stored names back, and refuses
bad fields with a message that names the field."""

import pytest

from ema_utils import CONCEPTS
from ema_utils.methods.condition import Condition, aligned, parse_ratio
from ema_utils.core.errors import ParameterError


@pytest.mark.parametrize("condition, name", [
    (aligned(), "aligned"),
    (Condition("npo", "safety"), "npo_safety"),
    (Condition("npo_retain", "safety", retain_ratio="1:2"), "npo_retain_1to2_safety"),
    (Condition("npo_kl", "medical_legal", retain_ratio=1, kl_lambda=0.1),
     "npo_kl_1to1_lambda0.1_medical_legal"),
    (Condition("sft_retain", "cybersecurity", retain_ratio=3, retain_weight=0.5, train_seed=2),
     "sft_retain_1to3_w0.5_seed2_cybersecurity"),
])
def test_a_condition_names_itself_and_its_name_reads_back(condition, name):
    assert condition.name == name == str(condition)
    assert Condition.from_name(name) == condition
    assert Condition.from_dict(condition.to_dict()) == condition


def test_every_method_and_concept_round_trips():
    # concept names share suffixes (e.g. "sensitive_content"), method names share prefixes
    # (npo, npo_kl, npo_retain): the longest match must win both ways
    for method in ("npo", "sft", "npo_retain", "sft_retain", "npo_kl"):
        for concept in CONCEPTS:
            c = Condition(method, concept, kl_lambda=10.0 if method == "npo_kl" else None)
            assert Condition.from_name(c.name) == c


def test_base_label_and_style_come_from_the_registry():
    kl = Condition("npo_kl", "safety", retain_ratio=1, kl_lambda=10, train_seed=1)
    assert kl.is_augmented and kl.base == Condition("npo", "safety", train_seed=1)
    assert kl.label == "NPO + KL \u03bb=10 (seed 1)"
    assert Condition("npo_retain", "safety", retain_ratio=1, retain_weight=10).label == \
        "NPO + retain CE 1:1 w2=10"
    assert Condition("sft_retain", "safety", retain_ratio=2).label == "SFT + retain CE 1:2"
    assert Condition("sft", "safety").style != Condition("npo", "safety").style
    with pytest.raises(ParameterError, match="not an augmented condition"):
        Condition("npo", "safety").base


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="rlhf", concept="safety"), "unknown method 'rlhf'"),
    (dict(method="npo", concept="weather"), "Condition.concept must be one of"),
    (dict(method="npo", concept="safety", kl_lambda=-1), "Condition.kl_lambda"),
    (dict(method="npo", concept="safety", train_seed=1.5), "Condition.train_seed"),
    (dict(method="npo_retain", concept="safety", retain_ratio="1:x"), "forget:retain"),
    (dict(method="aligned", concept="safety"), "aligned condition takes no"),
])
def test_bad_fields_are_named(kwargs, message):
    with pytest.raises(ParameterError, match=message):
        Condition(**kwargs)


def test_a_name_that_is_no_condition_is_refused_with_the_pattern():
    with pytest.raises(ParameterError, match="names no condition"):
        Condition.from_name("rlhf_safety")
    with pytest.raises(ParameterError, match="cannot read 'beta2'"):
        Condition.from_name("npo_beta2_safety")


def test_parse_ratio():
    assert parse_ratio("1:2") == parse_ratio(2) == 2.0
    assert parse_ratio("2:1") == 0.5
    for bad in ("1:0", "x", 0, -1, True, float("inf")):
        with pytest.raises(ParameterError, match="forget:retain"):
            parse_ratio(bad)


def test_a_condition_is_its_name_wherever_names_go():
    import json
    import pickle

    import pandas as pd

    c = Condition("npo_retain", "safety", retain_ratio=2)
    assert c == "npo_retain_1to2_safety" and {c: 1}["npo_retain_1to2_safety"] == 1
    assert json.dumps({c: c}) == '{"npo_retain_1to2_safety": "npo_retain_1to2_safety"}'
    assert f"unlearn-{c}" == "unlearn-npo_retain_1to2_safety"
    assert pd.DataFrame({"x": [1]}, index=[c]).to_string().split()[-2] == "npo_retain_1to2_safety"
    back = pickle.loads(pickle.dumps(c))
    assert back == c and back.retain_ratio == 2.0 and isinstance(back, Condition)
    with pytest.raises(AttributeError, match="immutable"):
        c.method = "npo"
    assert c.replace(retain_ratio=3) == "npo_retain_1to3_safety"


def test_names_read_from_files_become_conditions_at_the_edge():
    from ema_utils.methods.condition import as_condition, concept_of, try_condition

    assert as_condition("npo_kl_1to1_lambda10_safety").kl_lambda == 10.0
    assert concept_of("sft_retain_1to1_medical_legal") == "medical_legal"
    assert concept_of("aligned") is None and concept_of("my-external-model") is None
    assert try_condition("my-external-model") is None
    with pytest.raises(ParameterError, match="names no condition"):
        as_condition("my-external-model")
