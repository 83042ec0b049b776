"""ema_utils.build.compare: the "Models compared" page reads every model's slot of a profile."""

import pytest

from ema_utils.build import compare
from ema_utils.core import results
from ema_utils.core.cache import atomic_write_json
from ema_utils.core.errors import EmaError


def _finished(chapter: str, slot: str, summary: dict) -> None:
    folder = results.results_root() / chapter / f"key-{slot}"
    folder.mkdir(parents=True)
    atomic_write_json(folder / "run.json", {"chapter": chapter})
    results.save_summary(folder, summary)
    results.point_at(chapter, slot, f"key-{slot}", folder)


def _setup(model: str, cyber: float) -> dict:
    return {"model": model, "refusal": {"aligned": {"cybersecurity": cyber, "safety": 0.5}},
            "intervals": {"cybersecurity": [cyber - 0.1, cyber + 0.1], "safety": [0.3, 0.7]},
            "over_refusal": {"rate": 0.0, "low": 0.0, "high": 0.2},
            "mmlu": {"accuracy": 0.3, "low": 0.2, "high": 0.4}}


@pytest.fixture
def build(tmp_path, monkeypatch):
    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path / "build"))


def test_each_model_of_the_profile_gets_a_column(build):
    _finished("setup", "smoke", _setup("qwen", 0.8))
    _finished("setup", results.run_slot("smoke", "smollm2"), _setup("smollm2", 0.25))
    _finished("setup", "cpu", _setup("cpu-only-model", 0.9))  # another profile: not shown
    _finished("cross_domain", "smoke", {"ema_tests": [
        {"condition": "npo_cybersecurity", "concept": "cybersecurity", "delta": -0.5,
         "is_target": True, "flagged": False, "seeds": 1},
        {"condition": "npo_cybersecurity", "concept": "safety", "delta": -0.3,
         "is_target": False, "flagged": True, "seeds": 1}]})
    page = compare.render_comparison("smoke")
    header = next(line for line in page.splitlines() if line.startswith("| refusal"))
    assert header == "| refusal of the aligned model | qwen | smollm2 |"
    assert "| cybersecurity | 80% [70, 90] | 25% [15, 35] |" in page
    assert "| MMLU accuracy (chance 25%) | 30% [20, 40] | 30% [20, 40] |" in page
    assert "cpu-only-model" not in page
    assert "| NPO on cybersecurity | safety | −30 pts **EMA** | not run |" in page
    assert "| NPO on cybersecurity | cybersecurity | −50 pts (target) | not run |" in page
    assert "`ema run cross_domain --profile smoke --model smollm2`" in page


def test_a_profile_without_runs_says_so_and_markers_are_required(build):
    assert "No model has run chapter 1" in compare.render_comparison("smoke")
    page = compare.render_models_page(f"# T\n{compare.BEGIN}\nold\n{compare.END}\nend", "smoke")
    assert "old" not in page and page.startswith("# T") and page.endswith("end")
    with pytest.raises(EmaError, match="markers"):
        compare.render_models_page("# T without markers", "smoke")
