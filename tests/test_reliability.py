"""Reliability (issue 11): what happens when something goes wrong.

- Bad parameters are refused before any model is loaded (and before papermill starts a kernel),
  with a message naming the parameter and what it accepts: the CLI, the Python API and the
  parameters a chapter run passes to papermill.
- Bad data stops a run before anything is generated from it.
- Killing a chapter run (SIGINT, SIGKILL) or an artifact write leaves the results cache valid:
  nothing unfinished is trusted, the next run executes again, the one after reuses it.
- The same parameters and seed give the same numbers and generations; the run record says what
  produced them.
- Nothing touches the network at run time.
- An unwritable cache folder is named, with the variable that moves it, before work starts.

Everything runs on stand-in chapter notebooks and the tiny random model. The interruption and
no-network tests run `ema run` in a subprocess, which finds the stand-in through
EMA_NOTEBOOK_DIR (see ema_utils.core.paths).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pandas as pd
import pytest

from ema_utils import CONCEPTS, cache, data, models, orchestrate, sources
from ema_utils.cli import build_parser, main
from ema_utils.core.errors import DataError, EmaError, ParameterError
from ema_utils.core.paths import DATA_DIR

PROFILES = """
smoke:
  description: test profile
  cell_timeout: 120
  common: {model: tiny-random, seed: 0}
  setup: {n: 2}
other:
  description: another
  common: {model: tiny-random, seed: 1}
broken:
  description: a profile with wrong values (caught before papermill, like -p values)
  common: {model: tiny-random, seed: 0}
  setup: {steps: 0, concepts: [weather]}
"""

STANDIN_PARAMETERS = """\
model = 'tiny-random'
seed = 0
n = 1
concepts = ['cybersecurity']
lr = 3e-5
steps = 2
retain_ratio = '1:1'
judge = None
results_dir = None
profile = None"""


def write_notebook(path: Path, parameters: str, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *(nbformat.v4.new_code_cell(c) for c in cells)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def cli(argv, capsys) -> tuple[int, str, str]:
    """Run `ema ARGV` in-process: (exit code, stdout, stderr); argparse errors count as exits."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A build folder, a test profiles file and a stand-in setup chapter (via EMA_NOTEBOOK_DIR)
    that takes a concept list, a learning rate, steps and a ratio, and counts its runs."""
    build = tmp_path / "build"
    monkeypatch.setenv("EMA_BUILD_DIR", str(build))
    monkeypatch.setenv("EMA_NOTEBOOK_DIR", str(tmp_path / "notebooks"))
    profiles = tmp_path / "profiles.yml"
    profiles.write_text(PROFILES)
    monkeypatch.setattr(orchestrate, "PROFILES_FILE", profiles)
    counter = tmp_path / "executions.txt"
    write_notebook(tmp_path / "notebooks" / "01_setup.ipynb", STANDIN_PARAMETERS,
                   f"with open({str(counter)!r}, 'a') as f: f.write('x')\n"
                   "from ema_utils.build.orchestrate import save_summary\n"
                   "save_summary(results_dir, {'n': n, 'lr': lr, 'steps': steps})")
    return SimpleNamespace(build=build, counter=counter, root=tmp_path)


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any model load or papermill kernel fails the test: proves a refusal came before them."""
    import papermill

    def model_loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    def kernel_started(*args, **kwargs):
        raise AssertionError("papermill started a kernel before the bad input was refused")

    for name in ("load_model", "tiny_random", "ensure_cached"):
        monkeypatch.setattr(models, name, model_loaded)
    monkeypatch.setattr(papermill, "execute_notebook", kernel_started)


# --- 1. bad parameters: refused before any model loads, naming the parameter ----------------------

RUN_CASES = {
    "unknown concept": (["setup", "--profile", "smoke", "-p", "concepts=[cybersecurity, weather]"],
                        ["-p concepts must be", "weather", "cybersecurity, safety", "privacy"]),
    "unknown model": (["setup", "--profile", "smoke", "--model", "no-such-model"],
                      ["model must be", "'no-such-model'", "tiny-random", "local folder", "hub id"]),
    "missing model folder": (["setup", "--profile", "smoke", "--model", "/no/such/folder"],
                             ["model must be", "'/no/such/folder'", "local folder"]),
    "ratio 1:x": (["setup", "--profile", "smoke", "-p", "retain_ratio=1:x"],
                  ["-p retain_ratio must be", "'1:x'", "'1:2'"]),
    "negative learning rate": (["setup", "--profile", "smoke", "-p", "lr=-1e-4"],
                               ["-p lr must be", "positive number", "-0.0001"]),
    "zero steps": (["setup", "--profile", "smoke", "-p", "steps=0"], ["-p steps must be", "integer >= 1"]),
    "negative n": (["setup", "--profile", "smoke", "-p", "n=-1"], ["-p n must be", "integer >= 0"]),
    "seed not a number": (["setup", "--profile", "smoke", "-p", "seed=abc"],
                          ["-p seed must be", "integer >= 0", "'abc'"]),
    "unknown judge": (["setup", "--profile", "smoke", "-p", "judge=gpt-4"],
                      ["-p judge must be", "phrase, learned"]),
    "unknown profile": (["setup", "--profile", "fast"], ["unknown profile 'fast'", "smoke, other"]),
    "parameter the notebook does not take": (
        ["setup", "--profile", "smoke", "-p", "learning_rate=1e-4"],
        ["'learning_rate'", "takes: concepts, judge, lr, model, n, retain_ratio, seed, steps"]),
    "unknown chapter": (["intro", "--profile", "smoke"], ["unknown chapter 'intro'", "setup, unlearning"]),
    "wrong values in a profile": (["setup", "--profile", "broken"],
                                  ["2 invalid parameter value(s)", "parameter 'steps' must be",
                                   "parameter 'concepts' must be", "weather"]),
    "-p without =": (["setup", "--profile", "smoke", "-p", "steps"], ["key=value", "'steps'"]),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_ema_run_refuses_bad_parameters_before_any_model(case, sandbox, nothing_loads, capsys):
    argv, words = RUN_CASES[case]
    code, out, err = cli(["run", *argv], capsys)
    assert code == 2 and out == ""
    for word in words:
        assert word in err, f"{case}: {word!r} missing from {err!r}"
    assert not sandbox.counter.exists() and not (sandbox.build / "results").exists()


def test_all_problems_are_reported_at_once(sandbox, nothing_loads, capsys):
    code, _, err = cli(["run", "setup", "--profile", "smoke", "-p", "lr=0", "-p", "steps=-2",
                        "-p", "concepts=[]"], capsys)
    assert code == 2 and "3 invalid values" in err
    assert "-p lr must be" in err and "-p steps must be" in err and "-p concepts must be" in err


EVAL_CASES = {
    "unknown model": (["--model", "no-such-model"], ["--model", "'no-such-model'", "tiny-random"]),
    "unknown concept": (["--model", "tiny-random", "--concepts", "safety", "weather"],
                        ["--concepts", "unknown concept", "weather", "medical_legal"]),
    "negative n": (["--model", "tiny-random", "--n", "-3"], ["--n", "integer >= 0", "-3"]),
    "zero tokens": (["--model", "tiny-random", "--max-new-tokens", "0"],
                    ["--max-new-tokens", "integer >= 1"]),
    "zero batch": (["--model", "tiny-random", "--batch-size", "0"], ["--batch-size", "integer >= 1"]),
    "unknown judge": (["--model", "tiny-random", "--judge", "claude"], ["--judge", "phrase, learned"]),
    "missing adapter": (["--model", "tiny-random", "--adapter", "/no/such/adapter"],
                        ["--adapter", "/no/such/adapter", "adapter_model"]),
    "missing prompt file": (["--model", "tiny-random", "--prompts", "/no/such.jsonl"],
                            ["/no/such.jsonl", "no such file"]),
    "n not a number": (["--model", "tiny-random", "--n", "ten"], ["--n", "invalid int value: 'ten'"]),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_ema_eval_refuses_bad_parameters_before_any_model(case, sandbox, nothing_loads, capsys):
    argv, words = EVAL_CASES[case]
    code, out, err = cli(["eval", *argv], capsys)
    assert code == 2 and out == ""
    for word in words:
        assert word in err, f"{case}: {word!r} missing from {err!r}"


OTHER_CLI_CASES = {
    "data check: missing folder": (["data", "check", "--data-dir", "/no/such/data"],
                                   ["--data-dir /no/such/data", "not a folder", "prompts/"]),
    "data check: unknown option": (["data", "check", "--fast"], ["unrecognized arguments: --fast"]),
    "results: unknown profile": (["results", "setup", "--profile", "fast"],
                                 ["unknown profile 'fast'", "smoke, other"]),
    "results: unknown chapter": (["results", "intro", "--profile", "smoke"],
                                 ["unknown chapter 'intro'"]),
    "results: nothing run yet": (["results", "setup", "--profile", "smoke"],
                                 ["no finished run", "ema run setup --profile smoke"]),
    "book: unknown profile": (["book", "--profile", "fast"], ["unknown profile 'fast'"]),
    "models: unknown model": (["models", "--time-load", "gpt2-xl"], ["--time-load", "tiny-random"]),
}


@pytest.mark.parametrize("case", list(OTHER_CLI_CASES))
def test_other_commands_refuse_bad_parameters(case, sandbox, nothing_loads, capsys):
    argv, words = OTHER_CLI_CASES[case]
    code, out, err = cli(argv, capsys)
    assert code == 2 and out == ""
    for word in words:
        assert word in err, f"{case}: {word!r} missing from {err!r}"


def _has_command(name: str) -> bool:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return name in sub.choices


UNLEARN_CASES = {
    "unknown concept": (["--concept", "weather", "--method", "npo"], ["concept", "weather", "safety"]),
    "unknown method": (["--concept", "safety", "--method", "dpo"], ["method", "dpo", "npo"]),
    "ratio 1:x": (["--concept", "safety", "--method", "npo", "--retain-ratio", "1:x"],
                  ["ratio", "1:x", "1:2"]),
    "negative learning rate": (["--concept", "safety", "--method", "npo", "-p", "lr=-1"],
                               ["lr", "positive"]),
    "zero steps": (["--concept", "safety", "--method", "npo", "-p", "max_steps=0"],
                   ["max_steps", ">= 1"]),
    "unknown -p key": (["--concept", "safety", "--method", "npo", "-p", "learning_rate=1"],
                       ["learning_rate", "lr"]),
}


@pytest.mark.skipif(not _has_command("unlearn"), reason="`ema unlearn` does not exist yet")
@pytest.mark.parametrize("case", list(UNLEARN_CASES))
def test_ema_unlearn_refuses_bad_parameters_before_any_model(case, sandbox, nothing_loads, capsys):
    argv, words = UNLEARN_CASES[case]
    code, out, err = cli(["unlearn", *argv], capsys)
    assert code == 2 and out == ""
    for word in words:
        assert word in err, f"{case}: {word!r} missing from {err!r}"


@pytest.mark.parametrize("case", [c for c, (argv, _) in RUN_CASES.items()
                                  if "-p" in argv and "=" in argv[-1]])
def test_run_chapter_refuses_bad_overrides_before_papermill(case, sandbox, nothing_loads):
    """The Python API and papermill's parameters: the same refusals through run_chapter."""
    argv, words = RUN_CASES[case]
    overrides = orchestrate.parse_overrides([argv[-1]])
    # run_chapter names the parameter as the chapter sees it: "parameter 'lr' must be ..."
    words = [f"parameter '{w.split()[1]}' must be" if w.startswith("-p ") else w for w in words]
    with pytest.raises(ParameterError) as err:
        orchestrate.run_chapter("setup", "smoke", overrides=overrides, log=lambda m: None)
    for word in words:
        assert word in str(err.value)
    assert not sandbox.counter.exists()


def test_run_chapter_refuses_bad_model_profile_and_key(sandbox, nothing_loads):
    with pytest.raises(ParameterError, match="'model' must be a registry model"):
        orchestrate.run_chapter("setup", "smoke", model="no-such-model", log=lambda m: None)
    with pytest.raises(ParameterError, match="unknown profile 'fast'.*smoke, other"):
        orchestrate.run_chapter("setup", "fast", log=lambda m: None)
    with pytest.raises(ParameterError, match="takes no parameter 'bogus'"):
        orchestrate.resolve_parameters("setup", "smoke", None, {"bogus": 1})


def test_validate_parameters_normalises_good_values(sandbox, tmp_path, monkeypatch):
    folder = tmp_path / "my-model"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    params = orchestrate.validate_parameters("setup", {
        "model": "my-model", "steps": 1e1, "lr": 1, "concepts": "safety", "retain_ratio": 2,
        "n": 0, "judge": None, "seed": 3})
    assert params["model"] == str(folder.resolve()), "a relative folder is made absolute"
    assert params["steps"] == 10 and isinstance(params["steps"], int)
    for hub_id in ("Qwen/Qwen2.5-7B-Instruct", "tiny-random"):
        orchestrate.validate_parameters("setup", {"model": hub_id})
    monkeypatch.setattr(orchestrate, "PROFILES_FILE",
                        Path(orchestrate.__file__).parents[1] / "profiles.yml")
    monkeypatch.delenv("EMA_NOTEBOOK_DIR")
    for profile in orchestrate.profile_names():  # the shipped profiles are all valid
        for chapter in orchestrate.available_chapters():
            orchestrate.validate_parameters(chapter, orchestrate.resolve_parameters(chapter, profile))


class Untouchable:
    """A stand-in model or tokenizer: any use fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) before the bad input was refused")

    def __call__(self, *args, **kwargs):
        raise AssertionError("the model was called before the bad input was refused")


@pytest.mark.parametrize("kwargs, words", [
    ({"concepts": ("safety", "weather")}, ["unknown concept", "weather", "privacy"]),
    ({"n_per_concept": -1}, ["n_per_concept", "positive"]),
    ({"max_new_tokens": 0}, ["max_new_tokens", "at least 1"]),
    ({"batch_size": 0}, ["batch_size", "at least 1"]),
    ({"judge": "claude"}, ["claude", "phrase"]),
])
def test_evaluate_refuses_bad_parameters_before_generating(kwargs, words, sandbox):
    from ema_utils.core.evaluate import evaluate

    with pytest.raises(EmaError) as err:
        evaluate(Untouchable(), Untouchable(), "untouchable", progress=False, **kwargs)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("make, words", [
    (lambda T, S: T.UnlearnConfig(lr=-1e-4), ["UnlearnConfig.lr", "positive number"]),
    (lambda T, S: T.UnlearnConfig(max_steps=0), ["UnlearnConfig.max_steps", "integer >= 1"]),
    (lambda T, S: T.UnlearnConfig(method="dpo"), ["UnlearnConfig.method", "npo, sft"]),
    (lambda T, S: T.UnlearnConfig.from_params({"learning_rate": 1e-4}), ["learning_rate", "lr"]),
    (lambda T, S: T.UnlearnConfig.from_params({"lr": "fast"}), ["UnlearnConfig.lr", "'fast'"]),
    (lambda T, S: S.parse_ratio("1:x"), ["ratio", "'1:x'", "'1:2'"]),
    (lambda T, S: S.parse_ratio("1:0"), ["ratio", "'1:0'"]),
    (lambda T, S: S.parse_ratio(-2), ["ratio", "-2"]),
])
def test_unlearning_api_refuses_bad_settings(make, words):
    from ema_utils import sets, trainer

    with pytest.raises(ParameterError) as err:
        make(trainer, sets)
    for word in words:
        assert word in str(err.value)


# --- 2. bad data: named, and nothing generated from partial data --------------------------------

def test_wrong_checksum_of_a_packaged_source_fails_ema_data_check(monkeypatch, capsys):
    bad = dataclasses.replace(sources.SOURCES["bbq"], sha256="0" * 64)
    monkeypatch.setitem(sources.SOURCES, "bbq", bad)
    code, out, err = cli(["data", "check", "--json"], capsys)
    assert code == 2 and out == "", "--json prints nothing on stdout when the check fails"
    assert "bbq_300.json" in err and "not the pinned" in err and "0" * 64 in err
    assert "pip install --force-reinstall" in err


@pytest.fixture
def broken_data(tmp_path, monkeypatch):
    """A copy of the project's data folder, used by the loaders; break(rel) corrupts one file."""
    root = tmp_path / "data"
    shutil.copytree(DATA_DIR, root)
    monkeypatch.setattr(data, "DATA_DIR", root)

    def brk(rel):
        path = root / rel
        lines = path.read_text().count("\n")
        path.write_text(path.read_text() + '{"id": "broken", "prompt": \n')
        return path, lines + 1

    return brk


@pytest.mark.parametrize("rel", [
    data.PROMPT_FILES["privacy"],
    data.SET_FILES["over_refusal"],
    # (the project's own utility set is no longer read by evaluate: utility is MMLU, a
    # hash-pinned package file; `ema data check` still validates the retired set)
])
def test_evaluate_on_malformed_data_fails_before_generating(rel, broken_data, sandbox, tiny,
                                                            monkeypatch):
    import ema_utils.core.generation as generation
    from ema_utils.core.evaluate import evaluate

    path, line = broken_data(rel)
    generated = []
    real = generation.generate_responses
    monkeypatch.setattr(generation, "generate_responses",
                        lambda *a, **k: generated.append(1) or real(*a, **k))
    model, tokenizer = tiny
    with pytest.raises(DataError) as err:
        evaluate(model, tokenizer, "tiny", n_per_concept=1, judge="phrase", max_new_tokens=2,
                 progress=False)
    assert f"{path.name}, line {line}" in str(err.value)
    assert not generated, "responses were generated although part of the data is malformed"


# --- 3. interruptions ---------------------------------------------------------------------------

STANDIN_BODY = """\
import os, time
from pathlib import Path
from ema_utils.build.orchestrate import save_summary
marks = Path(os.environ["STANDIN_MARKS"])
with open(marks / "executions.txt", "a") as f:
    f.write(f"{os.getpid()}\\n")
save_summary(results_dir, {"stage": "midway"})
(marks / "started").write_text(str(os.getpid()))
time.sleep(float(os.environ.get("STANDIN_SLEEP", "0")))
(marks / "late").write_text("the sleep finished")
save_summary(results_dir, {"stage": "done", "model": model, "seed": seed})
"""


def _default_sigint():  # runs in the child: Ctrl-C raises KeyboardInterrupt there, as in a shell
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ema(args, env, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ema_utils.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_default_sigint, **kwargs)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@pytest.fixture
def chapter_env(tmp_path, monkeypatch):
    """A stand-in setup chapter taking the real chapter's parameters (so the shipped smoke
    profile applies), which sleeps midway; the environment for `ema run` in a subprocess."""
    defaults = orchestrate.notebook_parameters("setup")  # the real notebook's parameter cell
    marks = tmp_path / "marks"
    marks.mkdir()
    write_notebook(tmp_path / "notebooks" / "01_setup.ipynb",
                   "\n".join(f"{k} = {v!r}" for k, v in defaults.items()), STANDIN_BODY)
    env = {**os.environ, "EMA_BUILD_DIR": str(tmp_path / "build"),
           "EMA_NOTEBOOK_DIR": str(tmp_path / "notebooks"), "STANDIN_MARKS": str(marks),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("EMA_BUILD_DIR", "EMA_NOTEBOOK_DIR"):  # the same folders in this process
        monkeypatch.setenv(key, env[key])
    return SimpleNamespace(env=env, marks=marks, build=tmp_path / "build",
                           results=tmp_path / "build" / "results" / "setup")


RUN_ARGS = ["run", "setup", "--profile", "smoke", "--model", "tiny-random", "--json"]
SLOT = "smoke@tiny-random"


def _executions(marks: Path) -> int:
    path = marks / "executions.txt"
    return len(path.read_text().split()) if path.exists() else 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_killed_chapter_run_leaves_the_cache_valid(sig, chapter_env, capsys, monkeypatch):
    proc = _ema(RUN_ARGS, {**chapter_env.env, "STANDIN_SLEEP": "120"})
    started = chapter_env.marks / "started"
    deadline = time.time() + 120
    while not started.exists():
        assert proc.poll() is None, f"ema run ended before the notebook started:\n{proc.stderr.read()}"
        assert time.time() < deadline, "the stand-in notebook never started"
        time.sleep(0.1)
    kernel = int(started.read_text())
    proc.send_signal(sig)
    # communicate() returns once the kernel, which inherited the pipes, has gone too.
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "ema run: interrupted" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    deadline = time.time() + 15
    while _alive(kernel) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(kernel), "the notebook's kernel outlived the killed run"
    assert not (chapter_env.marks / "late").exists(), "the notebook went on after the kill"

    # The cache holds nothing a later run would trust.
    [folder] = [p for p in chapter_env.results.iterdir() if p.is_dir()]
    assert not (folder / "run.json").exists(), "an unfinished run must have no run record"
    assert not (folder / "01_setup.ipynb").exists(), "only a finished run publishes its notebook"
    summary = folder / "summary.json"
    if summary.exists():  # whole, never half-written (written by rename), and never read:
        assert json.loads(summary.read_text()) == {"stage": "midway"}
    # --model tiny-random is not the smoke profile's model: the run's slot is smoke@tiny-random
    assert not (chapter_env.results / f"{SLOT}.json").exists(), "no pointer to it"
    assert not (chapter_env.build / "executed" / SLOT / "01_setup.ipynb").exists()
    assert not [p for p in chapter_env.results.rglob("*") if ".tmp-" in p.name]
    code, _, err = cli(["results", "setup", "--profile", "smoke", "--model", "tiny-random"], capsys)
    assert code == 2 and "no finished run" in err

    # The next run executes again and finishes ...
    again = _ema(RUN_ARGS, {**chapter_env.env, "STANDIN_SLEEP": "0"})
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err[-3000:]
    [run] = json.loads(out)
    assert run["reused"] is False and _executions(chapter_env.marks) == 2
    assert Path(run["notebook"]).parent == folder
    assert json.loads(summary.read_text()) == {"stage": "done", "model": "tiny-random", "seed": 0}
    assert (folder / "run.json").is_file()
    assert orchestrate.chapter_summary("setup", SLOT)["stage"] == "done"
    assert (chapter_env.results / f"{SLOT}.json").is_file()

    # ... and the one after reuses it without starting a kernel.
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda *a, **k: pytest.fail("a finished run was executed again"))
    reused = orchestrate.run_chapter("setup", "smoke", model="tiny-random", log=lambda m: None)
    assert reused.reused and reused.folder == folder and _executions(chapter_env.marks) == 2

    if sig == signal.SIGKILL:
        _check_run_record(folder, reused.key)


def _check_run_record(folder: Path, key: str) -> None:
    """run.json records the parameters, package versions, model and data digests."""
    record = json.loads((folder / "run.json").read_text())
    expected = orchestrate.validate_parameters("setup", orchestrate.resolve_parameters(
        "setup", "smoke", "tiny-random"))
    assert record["parameters"] == expected and record["key"] == key == folder.name
    assert record["model"] == "tiny-random" and record["seed"] == 0
    assert record["model_digest"] == models.model_digest("tiny-random")
    assert record["data_digest"] == data.data_digest()
    for package in ("torch", "transformers", "peft", "pandas", "numpy", "papermill"):
        assert record["packages"][package] == metadata.version(package), package
    assert record["python"] == ".".join(map(str, sys.version_info[:3]))
    assert record["machine"]["cpu_count"] == os.cpu_count()


KILLED_WRITE = """\
import sys, time
from pathlib import Path
from ema_utils.core.cache import cached
marks = Path(sys.argv[1])
def fill(folder):
    (folder / "adapter_model.safetensors").write_bytes(b"the first half of the weights")
    (marks / "filling").write_text(str(folder))
    time.sleep(120)
    (folder / "adapter_config.json").write_text("{}")
cached("adapter", {"r": 4}, fill, kind="dir")
"""


def test_killed_directory_write_is_never_trusted(tmp_path, monkeypatch):
    build = tmp_path / "build"
    monkeypatch.setenv("EMA_BUILD_DIR", str(build))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITE, str(tmp_path)],
                            env={**os.environ, "EMA_BUILD_DIR": str(build)})
    deadline = time.time() + 60
    while not (tmp_path / "filling").exists():
        assert proc.poll() is None and time.time() < deadline, "the write never started"
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=30)

    store = cache.store_dir()
    final = store / f"adapter-{cache.stable_hash({'r': 4})}"
    assert not final.exists(), "a killed write must not leave the artifact's own name"
    [leftover] = [p for p in store.iterdir() if p.name.startswith(".adapter-")]
    assert not (leftover / ".complete").exists()
    assert (leftover / "adapter_model.safetensors").exists(), "(SIGKILL cannot clean up)"

    # A folder under the artifact's name but without .complete (e.g. copied by hand) is not
    # trusted either.
    shutil.copytree(leftover, final)
    calls = []

    def fill(folder):
        calls.append(folder)
        (folder / "adapter_model.safetensors").write_bytes(b"all of the weights")
        (folder / "adapter_config.json").write_text("{}")

    path = cache.cached("adapter", {"r": 4}, fill, kind="dir")
    assert len(calls) == 1 and path == final and (path / ".complete").is_file()
    assert (path / "adapter_model.safetensors").read_bytes() == b"all of the weights"
    assert cache.cached("adapter", {"r": 4}, fill, kind="dir") == final and len(calls) == 1


# --- 4. reproducibility -------------------------------------------------------------------------

def test_same_seed_same_generations_and_metrics(tmp_path, monkeypatch):
    """Two evaluations in separate build folders (nothing cached): identical tables."""
    import torch

    from ema_utils.core.evaluate import evaluate

    torch.set_num_threads(1)
    results = []
    for i in range(2):
        monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path / f"build{i}"))
        model, tokenizer = models.load_model("tiny-random")  # built afresh from its seed
        results.append(evaluate(model, tokenizer, "tiny", n_per_concept=2, judge="phrase",
                                max_new_tokens=6, batch_size=4, seed=1, progress=False))
    a, b = results
    assert list((tmp_path / "build0").rglob("*.jsonl")), "each run computed its own artifacts"
    pd.testing.assert_frame_equal(a.items, b.items, check_exact=True)
    pd.testing.assert_frame_equal(a.rates, b.rates, check_exact=True)
    assert a.over_refusal == b.over_refusal and a.utility == b.utility
    assert a.items["response"].str.len().gt(0).any(), "the model generated text"
    assert set(a.rates["concept"]) == set(CONCEPTS)


# --- 5. no network at run time ------------------------------------------------------------------

SITECUSTOMIZE = """\
# Installed by tests/test_reliability.py: every Python process started with this folder on
# PYTHONPATH refuses network connections (IPv4 and IPv6) and logs the attempt.
import errno, os, socket

_LOG = os.environ["EMA_TEST_NET_LOG"]
_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _guard(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with open(_LOG, "a") as f:
            f.write(f"{os.getpid()} blocked {address!r}\\n")
        raise OSError(errno.ENETUNREACH, f"network blocked by the test (connect to {address!r})")


def connect(self, address):
    _guard(self, address)
    return _connect(self, address)


def connect_ex(self, address):
    _guard(self, address)
    return _connect_ex(self, address)


socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
with open(_LOG, "a") as f:
    f.write(f"{os.getpid()} guard\\n")
"""

OFFLINE_BODY = """\
import socket
from ema_utils import models
from ema_utils.core.evaluate import evaluate
from ema_utils.build.orchestrate import save_summary
try:  # the guard is active in this kernel too (192.0.2.1 is TEST-NET-1, never routed)
    socket.create_connection(("192.0.2.1", 80), timeout=2)
    raise AssertionError("the socket guard is not active in the kernel")
except OSError as exc:
    assert "network blocked by the test" in str(exc), exc
lm, tokenizer = models.load_model(model)
result = evaluate(lm, tokenizer, model, n_per_concept=1, judge="phrase", max_new_tokens=3,
                  batch_size=8, seed=seed, progress=False)
save_summary(results_dir, {"rates": result.rates.set_index("concept")["rate"].to_dict(),
                           "utility": result.utility["accuracy"]})
"""


def test_chapter_runs_with_the_network_blocked(tmp_path, monkeypatch):
    defaults = orchestrate.notebook_parameters("setup")
    write_notebook(tmp_path / "notebooks" / "01_setup.ipynb",
                   "\n".join(f"{k} = {v!r}" for k, v in defaults.items()), OFFLINE_BODY)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "net.log"
    env = {**os.environ, "EMA_BUILD_DIR": str(tmp_path / "build"),
           "EMA_NOTEBOOK_DIR": str(tmp_path / "notebooks"), "EMA_TEST_NET_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = _ema(RUN_ARGS, env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    lines = log.read_text().splitlines()
    guarded = {line.split()[0] for line in lines if line.endswith(" guard")}
    assert len(guarded) >= 2, "the guard must be active in `ema` and in the notebook's kernel"
    attempts = [line for line in lines if " blocked " in line]
    assert attempts and all("192.0.2.1" in line for line in attempts), \
        f"something tried the network: {attempts}"
    summary = json.loads((Path(json.loads(out)[0]["notebook"]).parent / "summary.json").read_text())
    assert set(summary["rates"]) == set(CONCEPTS)


@pytest.fixture
def no_network(monkeypatch):
    attempts = []
    real = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network blocked by the test (connect to {address!r})")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: connect(self, address))
    with pytest.raises(OSError, match="network blocked"):
        socket.create_connection(("192.0.2.1", 80), timeout=2)
    attempts.clear()
    return attempts


def test_evaluate_and_the_judge_encoder_work_offline(no_network, tmp_path, monkeypatch):
    import torch

    from ema_utils import embeddings
    from ema_utils.core.evaluate import evaluate

    torch.set_num_threads(1)
    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path / "build"))
    model, tokenizer = models.load_model("tiny-random")
    result = evaluate(model, tokenizer, "tiny", n_per_concept=1, judge="phrase", max_new_tokens=3,
                      progress=False)
    assert set(result.rates["concept"]) == set(CONCEPTS)
    try:  # the learned judge's sentence encoder loads from its package, not from the hub
        encoder, _ = embeddings.load_encoder.__wrapped__()
    except EmaError as exc:  # not installed here: nothing to show
        pytest.skip(str(exc))
    assert encoder is not None
    assert no_network == [], f"something tried the network: {no_network}"


# --- 6. an unwritable cache folder is named before work starts ----------------------------------

@pytest.fixture
def under_a_file(tmp_path):
    """A path whose parent is a regular file: mkdir fails there, even for root."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return blocker / "sub"


def test_unwritable_build_dir_is_named_before_work(under_a_file, sandbox, nothing_loads,
                                                   monkeypatch, capsys):
    monkeypatch.setenv("EMA_BUILD_DIR", str(under_a_file))
    with pytest.raises(EmaError) as err:
        orchestrate.run_chapter("setup", "smoke", log=lambda m: None)
    assert str(under_a_file) in str(err.value) and "EMA_BUILD_DIR" in str(err.value)
    code, _, err = cli(["run", "setup", "--profile", "smoke"], capsys)
    assert code == 2 and str(under_a_file) in err and "EMA_BUILD_DIR" in err
    assert not sandbox.counter.exists()


def test_unwritable_model_cache_is_named_before_dequantizing(under_a_file, monkeypatch):
    monkeypatch.setenv("EMA_CACHE_DIR", str(under_a_file))
    monkeypatch.setattr(models, "_build_cache",
                        lambda *a, **k: pytest.fail("de-quantizing started"))
    for call in (lambda: models.ensure_cached(models.DEFAULT_MODEL),
                 lambda: models.load_model(models.DEFAULT_MODEL)):
        with pytest.raises(EmaError) as err:
            call()
        assert str(under_a_file / "models") in str(err.value)
        assert "EMA_CACHE_DIR" in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_build_dir_is_named(sandbox, tmp_path, monkeypatch):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    monkeypatch.setenv("EMA_BUILD_DIR", str(folder))
    try:
        with pytest.raises(EmaError, match="EMA_BUILD_DIR"):
            orchestrate.run_chapter("setup", "smoke", log=lambda m: None)
    finally:
        folder.chmod(0o700)
