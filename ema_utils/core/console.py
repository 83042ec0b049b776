"""What commands print: one JSON document on stdout with --json, readable text otherwise, and
progress and logs on stderr. It sits at the bottom of the library so that any module's
command (``register_cli``) can print without importing the command line above it."""

from __future__ import annotations

import json
import sys


def log(msg: str) -> None:
    """Print a progress or log line to stderr (stdout is kept for the command's result)."""
    print(msg, file=sys.stderr, flush=True)


def emit(args, payload, human) -> None:
    """Print ``payload`` as JSON when ``args.json`` is set, else the text ``human(payload)``."""
    if getattr(args, "json", False):
        json.dump(payload, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(human(payload))
