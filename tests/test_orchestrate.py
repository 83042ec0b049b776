"""ema_utils.build.orchestrate: parameters, the chapter cache, and the run/results/clean commands.

Uses a two-cell stand-in notebook on the tiny model, so no real chapter or model is needed.
"""

import json

import nbformat
import pytest

from ema_utils import orchestrate
from ema_utils.cli import main
from ema_utils.core import results
from ema_utils.core.errors import EmaError, ParameterError

PROFILES = """
smoke:
  description: test profile
  cell_timeout: 120
  common: {model: tiny-random, seed: 0}
  setup: {n: 2}
other:
  description: another
  common: {model: tiny-random, seed: 1}
"""


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A build folder, a profiles file and a stand-in setup notebook that counts its runs."""
    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path / "build"))
    profiles = tmp_path / "profiles.yml"
    profiles.write_text(PROFILES)
    monkeypatch.setattr(orchestrate, "PROFILES_FILE", profiles)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell(
        "model = 'tiny-random'\nseed = 0\nn = 1\nresults_dir = None\nprofile = None\nrun_slot = None")
    params.metadata["tags"] = ["parameters"]
    counter = tmp_path / "executions.txt"
    body = nbformat.v4.new_code_cell(
        "from pathlib import Path\n"
        "from ema_utils.core.results import save_summary\n"
        f"with open({str(counter)!r}, 'a') as f: f.write('x')\n"
        "save_summary(results_dir, {'n': n, 'seed': seed, 'model': model})")
    nb.cells = [params, body]
    path = tmp_path / "notebooks" / "01_setup.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, str(path))
    monkeypatch.setattr(orchestrate, "notebook_path",
                        lambda chapter: path if chapter == "setup" else tmp_path / "none.ipynb")
    monkeypatch.setattr(orchestrate, "NOTEBOOK_DIR", path.parent)
    return counter


def test_parameters_layer_in_order(sandbox):
    params = orchestrate.resolve_parameters("setup", "smoke", None, {"seed": 7})
    assert params == {"model": "tiny-random", "seed": 7, "n": 2}
    assert orchestrate.resolve_parameters("setup", "smoke", "other-model", {})["model"] == "other-model"


def test_unknown_parameter_profile_and_chapter_are_named(sandbox):
    with pytest.raises(ParameterError) as err:
        orchestrate.resolve_parameters("setup", "smoke", None, {"learning_rate": 1})
    assert "learning_rate" in str(err.value) and "n, seed" in str(err.value)
    with pytest.raises(ParameterError, match="unknown profile 'fast'.*smoke, other"):
        orchestrate.get_profile("fast")
    with pytest.raises(ParameterError, match="unknown chapter 'intro'"):
        orchestrate.check_chapter("intro")
    with pytest.raises(ParameterError, match="key=value"):
        orchestrate.parse_overrides(["seed"])
    assert orchestrate.parse_overrides(["lr=3e-5", "c=[a, b]", "x=text"]) == {
        "lr": 3e-5, "c": ["a", "b"], "x": "text"}


def test_run_is_cached_and_changed_parameter_reruns(sandbox, capsys):
    first = orchestrate.run_chapter("setup", "smoke", log=lambda m: None)
    assert not first.reused and sandbox.read_text() == "x"
    record = json.loads((first.folder / "run.json").read_text())
    assert record["parameters"]["n"] == 2 and record["packages"]["torch"]
    assert record["model_digest"] and record["data_digest"]
    again = orchestrate.run_chapter("setup", "smoke", log=lambda m: None)
    assert again.reused and again.key == first.key and sandbox.read_text() == "x", \
        "unchanged parameters must not execute the notebook again"
    changed = orchestrate.run_chapter("setup", "smoke", overrides={"n": 3}, log=lambda m: None)
    assert not changed.reused and changed.key != first.key and sandbox.read_text() == "xx"
    assert orchestrate.chapter_summary("setup", "smoke") == {"n": 3, "seed": 0, "model": "tiny-random"}
    executed = orchestrate.executed_dir("smoke") / "01_setup.ipynb"
    nb = nbformat.read(str(executed), as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "n = 3" in injected[0].source, "the published notebook is the latest run"


def test_unfinished_run_is_not_trusted(sandbox):
    run = orchestrate.run_chapter("setup", "smoke", log=lambda m: None)
    (run.folder / "run.json").unlink()  # as if killed before the run record was written
    again = orchestrate.run_chapter("setup", "smoke", log=lambda m: None)
    assert not again.reused and sandbox.read_text() == "xx"


def test_missing_prerequisite_names_the_command(sandbox):
    with pytest.raises(EmaError, match="ema run setup --profile other"):
        orchestrate.chapter_results("setup", "other")


def test_cli_run_results_clean(sandbox, capsys, tmp_path):
    assert main(["run", "setup", "--profile", "smoke", "-p", "n=5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["chapter"] == "setup" and out[0]["reused"] is False
    assert main(["results", "setup", "--profile", "smoke", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 5
    assert main(["run", "setup", "--profile", "smoke", "-p", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["clean"]) == 0
    assert not (tmp_path / "build").exists()
    assert (tmp_path / "notebooks" / "01_setup.ipynb").exists(), "clean never removes sources"


def test_progress_and_logs_reach_the_terminal_not_the_page(sandbox, capfd):
    path = orchestrate.notebook_path("setup")
    nb = nbformat.read(str(path), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        "from ema_utils.core import console\n"
        "console.log('[ema] training the stand-in')\n"
        "for _ in console.progress_bar(range(3), desc='unlearn (npo)', mininterval=0): pass"))
    nbformat.write(nb, str(path))
    run = orchestrate.run_chapter("setup", "smoke", log=lambda m: None)
    executed = nbformat.read(str(run.notebook), as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if o.output_type == "stream" or "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert not outputs, f"the page shows build output: {outputs}"
    err = capfd.readouterr().err
    assert "[ema] training the stand-in" in err and "unlearn (npo): 100%" in err
    assert "without encryption" not in err, "the kernel's start-up warning is noise in the log"
    assert "[ema] training the stand-in" in (run.folder / "progress.log").read_text()


def test_another_model_is_kept_apart_from_the_profiles_own(sandbox, capsys, monkeypatch):
    quiet = {"log": lambda m: None}
    cached = []  # a packaged model is de-quantized before the chapter starts, not inside it
    monkeypatch.setattr(orchestrate, "ensure_cached", lambda name, log: cached.append(name))
    own = orchestrate.run_chapter("setup", "smoke", **quiet)
    other = orchestrate.run_chapter("setup", "smoke", model="smollm2-135m-instruct", **quiet)
    assert cached == ["smollm2-135m-instruct"], "tiny-random is built in code; smollm2 is packaged"
    assert other.slot == "smoke@smollm2-135m-instruct" and own.slot == "smoke"
    assert other.key != own.key and not other.reused
    # the profile's own model still has its results, pointer and executed chapter
    assert orchestrate.chapter_summary("setup", "smoke")["model"] == "tiny-random"
    assert orchestrate.chapter_summary("setup", other.slot)["model"] == "smollm2-135m-instruct"
    own_page = nbformat.read(str(orchestrate.executed_dir("smoke") / "01_setup.ipynb"), as_version=4)
    assert "tiny-random" in own_page.cells[1].source, "the default model's page was overwritten"
    assert (orchestrate.executed_dir(other.slot) / "01_setup.ipynb").is_file()
    assert results.slots_with("setup", "smoke") == ["smoke", "smoke@smollm2-135m-instruct"]
    assert orchestrate.book_dir(other.slot).name == "smoke@smollm2-135m-instruct"
    assert orchestrate.book_dir(other.slot) != orchestrate.book_dir("smoke")
    # naming the profile's own model is the profile's slot, not a new one
    assert orchestrate.run_chapter("setup", "smoke", model="tiny-random", **quiet).reused
    assert main(["results", "setup", "--profile", "smoke", "--model", "smollm2-135m-instruct",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "smollm2-135m-instruct"
    assert main(["results", "setup", "--profile", "smoke", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "tiny-random"
    with pytest.raises(EmaError, match="ema run setup --profile other --model smollm2"):
        orchestrate.chapter_results("setup", results.run_slot("other", "smollm2-135m-instruct"))


def test_run_slot_names_are_safe_file_names():
    assert results.run_slot("cpu") == "cpu"
    assert results.run_slot("cpu", "Qwen/Qwen2.5-7B-Instruct") == "cpu@Qwen_Qwen2.5-7B-Instruct"
    assert results.run_slot("gpu", "/models/my model/") == "gpu@models_my_model"
    assert results.slot_profile("gpu@models_my_model") == "gpu"
    assert results.slot_options("cpu@x") == "--profile cpu --model x"
    assert results.slot_options("cpu") == "--profile cpu"


def test_failing_notebook_reports_cell_and_keeps_no_finished_run(sandbox, tmp_path):
    path = orchestrate.notebook_path("setup")
    nb = nbformat.read(str(path), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("raise ValueError('bad thing')"))
    nbformat.write(nb, str(path))
    with pytest.raises(EmaError, match="ValueError: bad thing"):
        orchestrate.run_chapter("setup", "smoke", log=lambda m: None)
    with pytest.raises(EmaError):
        orchestrate.chapter_results("setup", "smoke")


def test_edited_notebook_is_executed_again(sandbox):
    first = orchestrate.run_chapter("setup", "smoke", log=lambda m: None)
    path = orchestrate.notebook_path("setup")
    nb = nbformat.read(str(path), as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("A new paragraph."))
    nbformat.write(nb, str(path))
    again = orchestrate.run_chapter("setup", "smoke", log=lambda m: None)
    assert not again.reused and again.key != first.key


def test_every_profile_is_valid_for_every_chapter():
    """The real profiles file: each block names only parameters its chapter's notebook takes."""
    assert orchestrate.available_chapters()[:3] == ["setup", "unlearning", "cross_domain"]
    for profile in orchestrate.profile_names():
        for chapter in orchestrate.available_chapters():
            params = orchestrate.resolve_parameters(chapter, profile)
            assert params["seed"] == 0 and params["model"]


def test_peak_memory_sees_a_child_process():
    import subprocess
    import sys

    with orchestrate.PeakMemory(interval=0.05) as memory:
        subprocess.run([sys.executable, "-c", "b = bytearray(300 * 2**20); import time; time.sleep(1)"],
                       check=True)
    alone = orchestrate.tree_rss(__import__("os").getpid())
    assert memory.peak - alone > 200 * 2**20, "the child's 300 MiB must be counted"
    assert memory.peak_mib > 0


# --- a chapter that reads an earlier chapter's results ------------------------------------------

def _stand_in(path, params_source, body_source):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell(params_source)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body_source)]
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def chain(sandbox, tmp_path, monkeypatch):
    """Stand-ins for chapter 2 (unlearning: writes n) and chapter 3 (cross_domain: reads
    chapter 2's summary, as the real notebook does); the counter gets 'u' and 'c' per run."""
    folder = tmp_path / "notebooks"
    head = (f"from ema_utils.core.results import chapter_summary, save_summary\n"
            f"with open({str(sandbox)!r}, 'a') as f: f.write({{letter!r}})\n")
    paths = {
        "setup": folder / "01_setup.ipynb",
        "unlearning": _stand_in(
            folder / "02_unlearning.ipynb",
            "model = 'tiny-random'\nseed = 0\nn = 1\nresults_dir = None\nprofile = None\nrun_slot = None",
            head.format(letter="u") + "save_summary(results_dir, {'n': n})"),
        "cross_domain": _stand_in(
            folder / "03_cross_domain.ipynb",
            "model = 'tiny-random'\nseed = 0\nresults_dir = None\nprofile = None\nrun_slot = None",
            head.format(letter="c")
            + "save_summary(results_dir, {'upstream_n': chapter_summary('unlearning', run_slot)['n']})"),
    }
    monkeypatch.setattr(orchestrate, "notebook_path",
                        lambda chapter: paths.get(chapter, tmp_path / "none.ipynb"))
    monkeypatch.setattr(orchestrate, "code_digest", lambda: "pinned")  # others edit the library
    return sandbox


def test_changed_upstream_parameter_reexecutes_the_downstream_chapter(chain):
    quiet = {"log": lambda m: None}
    orchestrate.run_chapter("unlearning", "smoke", overrides={"n": 1}, **quiet)
    first = orchestrate.run_chapter("cross_domain", "smoke", **quiet)
    assert orchestrate.chapter_summary("cross_domain", "smoke") == {"upstream_n": 1}
    again = orchestrate.run_chapter("cross_domain", "smoke", **quiet)
    assert again.reused and again.key == first.key and chain.read_text() == "uc", \
        "an unchanged upstream run must not execute the downstream chapter again"
    orchestrate.run_chapter("unlearning", "smoke", overrides={"n": 2}, **quiet)
    changed = orchestrate.run_chapter("cross_domain", "smoke", **quiet)
    assert not changed.reused and changed.key != first.key, \
        "chapter 3 must not be reused on the results of an earlier chapter 2 run"
    assert orchestrate.chapter_summary("cross_domain", "smoke") == {"upstream_n": 2}
    # Back to the first chapter 2 run (reused): chapter 3's run on it is reused too.
    assert orchestrate.run_chapter("unlearning", "smoke", overrides={"n": 1}, **quiet).reused
    back = orchestrate.run_chapter("cross_domain", "smoke", **quiet)
    assert back.reused and back.key == first.key and chain.read_text() == "ucuc"
    assert orchestrate.chapter_summary("cross_domain", "smoke") == {"upstream_n": 1}


def test_downstream_chapter_without_upstream_run_names_the_command(chain):
    with pytest.raises(EmaError, match="ema run unlearning --profile smoke"):
        orchestrate.run_chapter("cross_domain", "smoke", log=lambda m: None)
    with pytest.raises(EmaError):
        orchestrate.chapter_results("cross_domain", "smoke")


def test_dependencies_declare_every_earlier_chapter_a_chapter_reads():
    """DEPENDS_ON (ema_utils.core.results) names every chapter whose results a chapter's notebook, or
    a library module it imports that reads results, refers to; earlier chapters only."""
    import re

    from ema_utils import CHAPTERS
    from ema_utils.core.paths import NOTEBOOK_DIR, PROJECT_ROOT
    from ema_utils.core.results import DEPENDS_ON

    assert list(DEPENDS_ON) == list(CHAPTERS)
    named = re.compile(r"""["'](%s)["']""" % "|".join(CHAPTERS))
    for index, chapter in enumerate(CHAPTERS):
        assert set(DEPENDS_ON[chapter]) <= set(CHAPTERS[:index]), f"{chapter} reads a later chapter"
        nb = nbformat.read(str(NOTEBOOK_DIR / f"{index + 1:02d}_{chapter}.ipynb"), as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        sources = [code]
        for line in re.findall(r"^from ema_utils import (.+)$", code, re.M):
            for name in (n.strip() for n in line.split(",")):
                module = PROJECT_ROOT / "ema_utils" / f"{name}.py"
                if module.is_file() and "from .results import" in module.read_text():
                    sources.append(module.read_text())
        read = {c for text in sources for c in named.findall(text)} - {chapter}
        assert read <= set(DEPENDS_ON[chapter]), (chapter, sorted(read - set(DEPENDS_ON[chapter])))
