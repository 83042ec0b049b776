"""ema_utils.core.console: progress goes to stderr, or to the build's progress file, never stdout."""

import io
import os
import subprocess
import sys

from ema_utils.core import console


def test_log_and_progress_bar_write_to_the_progress_file_when_one_is_named(tmp_path, monkeypatch, capsys):
    target = tmp_path / "progress.log"
    monkeypatch.setenv(console.PROGRESS_ENV, str(target))
    console.log("[ema] training")
    for _ in console.progress_bar(range(3), desc="steps", mininterval=0):
        pass
    out = capsys.readouterr()
    assert out.out == "" and out.err == "", "nothing may reach the notebook's stdout or stderr"
    text = target.read_text()
    assert "[ema] training\n" in text and "steps: 100%" in text and "3/3" in text


def test_without_a_progress_file_logs_go_to_stderr(monkeypatch, capsys):
    monkeypatch.delenv(console.PROGRESS_ENV, raising=False)
    console.log("hello")
    out = capsys.readouterr()
    assert out.err == "hello\n" and out.out == ""


def test_the_relay_copies_a_child_processs_lines_and_final_bar_and_restores_the_environment(tmp_path):
    before = os.environ.get(console.PROGRESS_ENV)
    out = io.StringIO()
    child = ("from ema_utils.core import console\n"
             "console.log('[ema] first line')\n"
             "for _ in console.progress_bar(range(4), desc='unlearn', mininterval=0): pass\n"
             "import os, sys; open(os.environ['EMA_PROGRESS_FILE'], 'a').write('no newline at the end')\n")
    with console.ProgressRelay(tmp_path / "progress.log", out=out, interval=0.05):
        subprocess.run([sys.executable, "-c", child], check=True)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[ema] first line"
    # tqdm redraws its bar with "\r": one line per finished bar, its last state, not every redraw
    bars = [line for line in lines if line.startswith("unlearn")]
    assert len(bars) == 1 and "4/4" in bars[0] and "\r" not in out.getvalue()
    assert lines[-1] == "no newline at the end", "an unfinished last line is still shown"
    assert os.environ.get(console.PROGRESS_ENV) == before
    assert "[ema] first line" in (tmp_path / "progress.log").read_text(), "the log is kept"


def test_a_tagged_log_tags_its_lines_but_not_lines_already_tagged(monkeypatch, capsys):
    monkeypatch.delenv(console.PROGRESS_ENV, raising=False)
    log = console.tagged_log("[ema screening]")
    log("scoring step 3")
    log("[ema] loading the model")
    assert capsys.readouterr().err.splitlines() == ["[ema screening] scoring step 3",
                                                   "[ema] loading the model"]
