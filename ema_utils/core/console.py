"""What commands print: one JSON document on stdout with --json, readable text otherwise, and
progress and logs on stderr. It sits at the bottom of the library so that any module's
command (``register_cli``) can print without importing the command line above it.

Inside a chapter executed by `ema run`, stderr would land in the chapter's page. So the
orchestrator names a file in ``EMA_PROGRESS_FILE`` and relays it to its own terminal
(:class:`ema_utils.build.orchestrate.ProgressRelay`); :func:`log` and :func:`progress_bar` write
there when it is set.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PROGRESS_ENV = "EMA_PROGRESS_FILE"

_progress_files: dict[str, object] = {}


def progress_stream():
    """Where progress bars and log lines go: the file named by EMA_PROGRESS_FILE (set by the
    orchestrator for the chapters it executes), else stderr."""
    path = os.environ.get(PROGRESS_ENV)
    if not path:
        return sys.stderr
    stream = _progress_files.get(path)
    if stream is None or stream.closed:
        # line-buffered append: the relay reads whole lines as they are written
        stream = _progress_files[path] = open(path, "a", buffering=1, encoding="utf-8")
    return stream


def log(msg: str) -> None:
    """Print a progress or log line to stderr, or to the build's progress file (never stdout,
    which is kept for the command's result, nor a chapter's page)."""
    print(msg, file=progress_stream(), flush=True)


def tagged_log(tag: str):
    """A :func:`log` that starts each line with ``tag`` ("[ema screening]"), except lines that
    already carry an "[ema" tag of their own (the model loader's)."""
    def _log(msg: str) -> None:
        log(msg if msg.startswith("[ema") else f"{tag} {msg}")
    return _log


def progress_bar(iterable=None, **kwargs):
    """A tqdm text bar on :func:`progress_stream` (tqdm.auto would draw a widget into a notebook
    page). Takes tqdm's arguments (total, desc, unit, disable, leave, ...)."""
    # deferred: tqdm is light, but this module is imported by everything, even `ema --help`
    from tqdm import tqdm

    return tqdm(iterable, file=progress_stream(), **kwargs)


def emit(args, payload, human) -> None:
    """Print ``payload`` as JSON when ``args.json`` is set, else the text ``human(payload)``."""
    if getattr(args, "json", False):
        json.dump(payload, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(human(payload))


class ProgressRelay:
    """For the process that executes a chapter: points EMA_PROGRESS_FILE at ``path`` for the
    kernel it starts (a child inherits the environment), and copies what the kernel writes
    there to ``out`` (stderr) while it runs. Whole lines are copied as they come; on a terminal
    the latest state of a progress bar is drawn too (tqdm redraws a bar with "\\r"). The file is
    kept beside the run as its log."""

    def __init__(self, path, out=None, interval: float = 0.5):
        # deferred: only the orchestrator relays; codecs/threading stay out of `ema --help`
        import codecs
        import threading

        self.path, self.out, self.interval = Path(path), out, interval
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pos, self._pending, self._live = 0, "", False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._previous = None

    @property
    def _stream(self):
        return self.out or sys.stderr

    def _write_line(self, text: str) -> None:
        clear = "\r\x1b[K" if self._live else ""
        self._stream.write(f"{clear}{text}\n")
        self._live = False

    def pump(self, final: bool = False) -> None:
        """Copy what was written since the last call."""
        with open(self.path, "rb") as f:
            f.seek(self._pos)
            chunk = f.read()
            self._pos = f.tell()
        self._pending += self._decoder.decode(chunk, final=final)
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            shown = [part for part in line.split("\r") if part.strip()]
            if shown:
                self._write_line(shown[-1].rstrip())
        tail = [part for part in self._pending.split("\r") if part.strip()]
        if final and tail:
            self._write_line(tail[-1].rstrip())
            self._pending = ""
        elif tail and getattr(self._stream, "isatty", lambda: False)():
            self._stream.write("\r\x1b[K" + tail[-1].rstrip()[:200])
            self._live = True
        self._stream.flush()

    def _run(self):
        while not self._stop.wait(self.interval):
            self.pump()

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(b"")
        self._previous = os.environ.get(PROGRESS_ENV)
        os.environ[PROGRESS_ENV] = str(self.path)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.pump(final=True)
        if self._previous is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = self._previous
