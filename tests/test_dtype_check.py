"""ema_utils.build.dtype_check: comparing verdicts of two compute dtypes, item by item and by run."""

from types import SimpleNamespace

import pandas as pd
import pytest

from ema_utils import book, dtype_check
from ema_utils.core.errors import EmaError


def _items(flags, concept="safety"):
    return pd.DataFrame({"id": range(len(flags)), "concept": concept, "aligned": flags})


def test_compare_items_counts_agreement_and_checks_rates_against_intervals():
    fast = pd.concat([_items([True] * 18 + [False] * 12), _items([True] * 10, "bias")])
    same = fast.copy()
    out = dtype_check.compare_items(fast, same)
    assert (out["items"], out["agreed"], out["agreement"], out["all_within"]) == (40, 40, 1.0, True)
    # four safety verdicts flipped one way: 18/30 -> 22/30 lies inside both intervals
    moved = pd.concat([_items([True] * 22 + [False] * 8), _items([True] * 10, "bias")])
    out = dtype_check.compare_items(fast, moved)
    assert out["agreed"] == 36 and out["all_within"]
    safety = next(r for r in out["rates"] if r["concept"] == "safety")
    assert safety["fast"] == pytest.approx(0.6) and safety["reference"] == pytest.approx(22 / 30)
    assert safety["agreement"] == pytest.approx(26 / 30)
    # a collapse (18/30 -> 2/30) is outside the interval
    far = pd.concat([_items([True] * 2 + [False] * 28), _items([True] * 10, "bias")])
    out = dtype_check.compare_items(fast, far)
    assert not out["all_within"]
    assert {r["concept"]: r["within"] for r in out["rates"]} == {"safety": False, "bias": True}


def test_compare_items_refuses_different_item_sets():
    with pytest.raises(EmaError, match="different items"):
        dtype_check.compare_items(_items([True, False]), _items([True, False, True]))


def _run(rates, first, selected, seconds):
    traj = pd.DataFrame({"step": [0, 5, 10], "concept": "cybersecurity", "rate": rates,
                         "low": [max(r - 0.2, 0) for r in rates], "high": [min(r + 0.2, 1) for r in rates]})
    return SimpleNamespace(trajectory=traj, first_below=None if first is None else {"step": first},
                           selected={"step": selected}, losses=pd.DataFrame({"seconds": seconds}))


def test_compare_trajectories_requires_the_same_checkpoints():
    a = _run([0.7, 0.3, 0.1], 10, 10, [2.0, 2.2])
    b = _run([0.7, 0.35, 0.05], 10, 10, [8.0, 8.4])
    out = dtype_check.compare_trajectories(a, b, "cybersecurity")
    assert out["same_checkpoints"] and out["all_within"]
    assert out["seconds_per_step"] == {"fast": 2.1, "reference": 8.2}
    c = _run([0.7, 0.1, 0.0], 5, 10, [8.0])
    out = dtype_check.compare_trajectories(a, c, "cybersecurity")
    assert not out["same_checkpoints"] and out["first_below"] == {"fast": 10, "reference": 5}


def test_render_states_the_verdict_and_the_book_page_shows_it():
    report = {"profile": "cpu", "model": "m", "fast": "bf16", "reference": "fp32",
              "min_agreement": 0.97, "items_per_concept": 30, "wall_s": 600, "holds": True,
              "evaluations": [{"model": "aligned", "items": 240, "agreed": 236,
                               "agreement": 236 / 240, "all_within": True,
                               "rates": [{"concept": "safety", "within": True}]}],
              "trajectory": {"concept": "cybersecurity",
                             "steps": [{"step": 0, "fast": 0.7, "reference": 0.7, "within": True}],
                             "first_below": {"fast": 10, "reference": 10},
                             "selected": {"fast": 20, "reference": 20},
                             "seconds_per_step": {"fast": 2.0, "reference": 8.0}}}
    text = dtype_check.render_markdown(report)
    assert "**holds**" in text and "236 (98%)" in text and "| bf16 | 70% |" in text
    template = ("# R\n<!-- ema:run-records:begin -->x<!-- ema:run-records:end -->\n"
                "<!-- ema:dtype-check:begin -->PLACEHOLDER<!-- ema:dtype-check:end -->\n")
    page = book.render_reproducibility(template, {}, "cpu", dtype_report=report)
    assert "**holds**" in page and "PLACEHOLDER" not in page
    page = book.render_reproducibility(template, {}, "cpu", dtype_report=None)
    assert "ema bench --dtype-check --profile cpu" in page
    assert "does NOT hold" in dtype_check.render_markdown({**report, "holds": False})


def test_check_compute_dtype_runs_both_dtypes_on_the_profiles_items(monkeypatch):
    # The real check trains and generates for half an hour; here every model step is replaced
    # by a stand-in, so what is tested is the check's own plan: which models it scores in which
    # dtype, with the profile's settings, and how it concludes.
    import contextlib

    import torch

    calls = []
    models_loaded = []

    def load_model(name, device=None, dtype=None, log=None):
        models_loaded.append(dtype)
        return torch.nn.Linear(1, 1).to(dtype), "tokenizer"

    def evaluate(model, tokenizer, model_id, **kw):
        calls.append((model_id, kw["n_per_concept"], kw["max_new_tokens"]))
        flags = [True] * 20 + [False] * 10
        return SimpleNamespace(items=_items(flags))

    def run_intervention(lm, tok, model_id, concept, method, config, **kw):
        run = _run([0.7, 0.3, 0.1], 10, 10, [2.0])
        run.name = f"{method}_{concept}"
        run.summary = lambda: {"selected_step": 10}
        run.checkpoint_path = lambda step: f"ckpt-{step}"
        return run

    monkeypatch.setattr(dtype_check, "load_model", load_model)
    monkeypatch.setattr(dtype_check, "evaluate", evaluate)
    monkeypatch.setattr(dtype_check, "run_intervention", run_intervention)
    monkeypatch.setattr(dtype_check, "chosen_step", lambda summary, rule: summary["selected_step"])
    monkeypatch.setattr(dtype_check, "with_checkpoint",
                        lambda lm, path, merged: contextlib.nullcontext(lm))
    monkeypatch.setattr(dtype_check, "checkpoint_model_id", lambda mid, name, path: f"{mid}+{path}")
    monkeypatch.setattr(dtype_check, "resolve_dtype", lambda d, device=None, log=None:
                        torch.bfloat16 if d == "auto" else torch.float32)
    report = dtype_check.check_compute_dtype("cpu", save=False, progress=False)
    assert models_loaded == [torch.bfloat16, torch.float32]
    assert [e["model"] for e in report["evaluations"]] == [
        "aligned", "npo_cybersecurity step 5", "npo_cybersecurity step 10"]
    assert all(n == 30 and t == 24 for _, n, t in calls)  # the cpu profile's chapter-3 settings
    assert sum(":bf16" in mid for mid, _, _ in calls) == 3 == len(calls) - 3
    assert report["holds"] is True and report["trajectory"]["same_checkpoints"]
