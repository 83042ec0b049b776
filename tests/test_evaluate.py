"""ema_utils.core.evaluate (+ plots, widgets, notebook helpers) on the tiny random model."""

import json

import matplotlib
import pandas as pd
import pytest

from ema_utils import CONCEPTS, evaluate as ev
from ema_utils.cli import main
from ema_utils.core.data import load_set, utility_questions
from ema_utils.core.errors import DataError, ParameterError

matplotlib.use("Agg")


@pytest.fixture
def build(tmp_path, monkeypatch):
    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path / "build"))
    return tmp_path / "build"


def test_sample_items_is_stable_and_nested():
    table = pd.DataFrame({"id": [f"i{k}" for k in range(20)], "concept": ["a"] * 10 + ["b"] * 10})
    three = ev.sample_items(table, 3, seed=0)
    assert three.groupby("concept").size().tolist() == [3, 3]
    assert three.equals(ev.sample_items(table, 3, seed=0))
    five = ev.sample_items(table, 5, seed=0)
    assert set(three["id"]) <= set(five["id"]), "growing n keeps the earlier items"
    assert set(ev.sample_items(table, 3, seed=1)["id"]) != set(three["id"])
    assert len(ev.sample_items(table, 0)) == 20
    with pytest.raises(ParameterError, match="n_per_concept"):
        ev.sample_items(table, -1)


def test_eval_items_cover_every_concept_with_the_right_scorer():
    items = ev.eval_items(n_per_concept=3)
    assert set(items["concept"]) == set(CONCEPTS)
    assert (items["split"] == "eval").all()
    bias = items[items["concept"] == "bias"]
    assert (bias["scorer"] == "bbq").all() and (bias["context_condition"] == "ambig").all()
    tox = items[items["scorer"] == "toxigen"]
    assert tox["label"].astype(bool).all(), "only toxic statements measure toxicity"


def test_evaluate_scores_every_concept_and_caches(tiny, build, monkeypatch):
    model, tokenizer = tiny
    result = ev.evaluate(model, tokenizer, "tiny", n_per_concept=2, judge="phrase",
                         max_new_tokens=4, batch_size=4, progress=False)
    assert result.rates["concept"].tolist() == list(CONCEPTS)
    assert ((result.rates["low"] <= result.rates["rate"]) & (result.rates["rate"] <= result.rates["high"])).all()
    assert result.over_refusal["n"] > 0 and 0 <= result.utility["accuracy"] <= 1
    # Utility is MMLU: two questions per subject from the report part, paired by question id
    report_ids = set(utility_questions("report", 2)["id"])
    assert result.utility["n"] == 114 and set(result.utility["correct"]) == report_ids
    assert not report_ids & set(utility_questions("dev", 2)["id"])
    assert result.utility["low"] <= result.utility["accuracy"] <= result.utility["high"]
    payload = result.to_json()
    assert set(payload) >= {"model", "refusal", "over_refusal", "utility"}
    assert payload["utility"] == {"set": "mmlu", "accuracy": result.utility["accuracy"],
                                  "low": result.utility["low"], "high": result.utility["high"],
                                  "n": 114, "chance": 0.25}
    assert set(payload["refusal"]) == set(CONCEPTS)
    json.dumps(payload)  # serialisable

    import ema_utils.core.generation as generation

    monkeypatch.setattr(generation, "generate_responses",
                        lambda *a, **k: pytest.fail("cached generations were recomputed"))
    again = ev.evaluate(model, tokenizer, "tiny", n_per_concept=2, judge="phrase",
                        max_new_tokens=4, batch_size=4, progress=False)
    pd.testing.assert_frame_equal(again.rates, result.rates)


def test_user_prompts_any_concept(tiny, build, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "1", "concept": "weapons", "prompt": "hi"}\n'
                    '{"id": "2", "concept": "fraud", "prompt": "hello there"}\n')
    items = ev.read_user_prompts(path)
    model, tokenizer = tiny
    result = ev.evaluate(model, tokenizer, "tiny", items=items, judge="phrase", max_new_tokens=3,
                         progress=False)
    assert result.rates["concept"].tolist() == ["fraud", "weapons"]
    assert result.over_refusal is None and result.utility is None


@pytest.mark.parametrize("text, message", [
    ('{"id": "1", "concept": "x"}\n', "line 1: missing field"),
    ('{"id": "1", "concept": "x", "prompt": "a"}\n{"id": "1", "concept": "x", "prompt": "b"}\n',
     "line 2: id '1' already used on line 1"),
    ('not json\n', "line 1: not valid JSON"),
    ("", "no prompts"),
])
def test_user_prompt_errors_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        ev.read_user_prompts(path)


def test_ema_eval_json(build, capsys, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "1", "concept": "demo", "prompt": "hi"}\n')
    assert main(["eval", "--model", "tiny-random", "--prompts", str(path), "--judge", "phrase",
                 "--max-new-tokens", "3", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["model"].startswith("tiny-random:") and payload["refusal"]["demo"]["n"] == 1
    assert main(["eval", "--model", "tiny-random", "--concepts", "weather"]) == 2
    assert "unknown concept" in capsys.readouterr().err


def test_refusal_profile_figure_has_title_and_labels():
    from ema_utils import plots

    rates = pd.DataFrame({"concept": ["safety", "bias"], "rate": [0.5, 0.2],
                          "low": [0.3, 0.1], "high": [0.7, 0.4]})
    paper = pd.DataFrame({"concept": ["safety", "bias"], "model": ["m", "m"], "value": [90, 80]})
    ax = plots.refusal_profile(rates, paper=paper, title="T")
    assert ax.get_title() == "T" and "%" in ax.get_ylabel() and ax.get_xlabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Safety", "Bias"]
    assert plots.ordered_concepts(["zeta", "bias", "safety"]) == ["safety", "bias", "zeta"]


def test_widgets_redact_compliant_harmful_answers():
    from ema_utils import widgets

    items = pd.DataFrame([
        {"concept": "safety", "prompt": "p1", "response": "Sure, step one is to gather the things "
         "you need and then continue", "scorer": "refusal", "is_refusal": False, "aligned": False},
        {"concept": "safety", "prompt": "p2", "response": "I'm sorry, but I can't assist with that.",
         "scorer": "refusal", "is_refusal": True, "aligned": True},
        {"concept": "bias", "prompt": "p3", "response": "C", "scorer": "bbq", "aligned": True},
    ])
    assert widgets.display_response(items.iloc[0]).endswith("[...]")
    assert widgets.display_response(items.iloc[1]) == "I'm sorry, but I can't assist with that."
    page = widgets.items_html(items)
    assert "continue" not in page and "can&#x27;t assist" in page
    tabs = widgets.response_browser(items)
    assert [tabs.get_title(i) for i in range(2)] == ["Safety", "Bias"]


def test_start_chapter_seeds_and_makes_folder(tmp_path):
    import torch

    from ema_utils.core.notebook import start_chapter

    folder = start_chapter("setup", str(tmp_path / "r"), seed=3)
    a = torch.rand(2)
    start_chapter("setup", str(tmp_path / "r"), seed=3)
    assert folder.is_dir() and torch.equal(a, torch.rand(2))
    assert start_chapter("setup", None, 0).is_dir()


def test_bias_and_toxicity_answered_in_writing(tiny, build, monkeypatch):
    items = ev.generated_choice_items(n_per_concept=3)
    assert set(items["concept"]) == {"bias_generated", "toxicity_generated"}
    bbq = items[items["scorer"] == "bbq_generated"]
    assert not bbq["prompt"].str.contains("Answer with the letter").any()
    assert bbq["prompt"].str.contains("The options:").all()
    # the same items, in the same sample, as the forced-choice columns
    forced = ev.eval_items(("bias", "toxicity"), n_per_concept=3)
    assert set(items["id"]) == set(forced["id"])
    # canned answers: for BBQ the unknown option, a named person, a refusal; ToxiGen yes / no
    unknown = bbq.iloc[0]
    person = bbq.iloc[1]
    answers = {unknown["id"]: f"{unknown['choices'][unknown['unknown_index']]}.",
               person["id"]: f"{person['choices'][(person['unknown_index'] + 1) % 3]} did it.",
               bbq.iloc[2]["id"]: "I'm sorry, but I can't help with that."}
    tox = items[items["scorer"] == "toxigen_generated"]
    answers.update({tox.iloc[0]["id"]: "Yes.", tox.iloc[1]["id"]: "No.", tox.iloc[2]["id"]: "Maybe."})

    import ema_utils.core.generation as generation

    monkeypatch.setattr(generation, "generate_responses", lambda model, tok, table, **k: table.assign(
        response=table["id"].map(answers)))
    model, tokenizer = tiny
    result = ev.evaluate(model, tokenizer, "tiny-canned", items=items, judge="phrase",
                         max_new_tokens=8, progress=False)
    got = result.items.set_index("id")
    assert bool(got.loc[unknown["id"], "aligned"]) and not bool(got.loc[person["id"], "aligned"])
    assert bool(got.loc[bbq.iloc[2]["id"], "aligned"])          # a refusal is not biased
    assert not bool(got.loc[tox.iloc[0]["id"], "aligned"]) and bool(got.loc[tox.iloc[1]["id"], "aligned"])
    assert bool(got.loc[tox.iloc[2]["id"], "aligned"]) and not bool(got.loc[tox.iloc[2]["id"], "answer_read"])
    rates = result.rates.set_index("concept")
    assert rates.loc["bias_generated", "rate"] == pytest.approx(2 / 3)
    assert rates.loc["toxicity_generated", "rate"] == pytest.approx(2 / 3)
