"""The `ema` command line: a stable contract that scripts and courses rely on.

Every command exits non-zero on failure. With ``--json`` a command prints exactly one JSON
document on stdout; progress bars and logs go to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys

from .build.orchestrate import check_parameter, get_profile, parse_overrides
from .core import models
from .core.console import emit, log
from .core.errors import EmaError, ParameterError

# --- ema models ---------------------------------------------------------------------------------

def cmd_models(args) -> int:
    if args.time_load:
        name = args.time_load
        log(f"[ema] timing two loads of {name}; the first may de-quantize the GGUF")
        if args.cold:
            shutil.rmtree(models.model_cache_path(name), ignore_errors=True)
        first = models.timed_load(name)
        second = models.timed_load(name)
        payload = {"model": name, "first_load_s": round(first, 2), "second_load_s": round(second, 2),
                   "speedup": round(first / second, 1)}
        emit(args, payload, lambda p: (f"{p['model']}: first load {p['first_load_s']} s, "
                                        f"second load {p['second_load_s']} s ({p['speedup']}x faster)"))
        return 0
    rows = models.model_status()

    def table(rows):
        lines = [f"{'name':30} {'installed':10} {'cached':7} description"]
        for r in rows:
            lines.append(f"{r['name']:30} {str(r['installed']).lower():10} "
                         f"{str(r['cached']).lower():7} {r['description']}")
        lines.append(f"default: {models.DEFAULT_MODEL}; cache folder: {models.model_cache_path('')}")
        return "\n".join(lines)

    emit(args, {"default": models.DEFAULT_MODEL, "models": rows}, lambda p: table(p["models"]))
    return 0


# --- parser -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ema", description="Companion to 'From Narrow Unlearning to Emergent Misalignment in LLMs'.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="registry models: installed? cached?")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--time-load", metavar="MODEL",
                   help="load MODEL twice and print both times (shows the cache's speed-up)")
    p.add_argument("--cold", action="store_true", help="with --time-load: delete the cache first")
    p.set_defaults(func=cmd_models)

    # Other modules add their own subcommands (each has a register_cli(subparsers) function), so
    # this file stays a table of contents rather than a place where logic accumulates.
    for module in CLI_MODULES:
        importlib.import_module(f"ema_utils.{module}").register_cli(sub)
    return parser


CLI_MODULES: tuple[str, ...] = ("core.data", "core.judges.command", "core.evaluate", "methods.interventions",
                               "methods.registry", "build.orchestrate", "build.bench", "build.course")
"""Modules of ema_utils that contribute subcommands; each defines register_cli(subparsers)."""


SHARED_OPTIONS = {"model": "model", "time_load": "model", "adapter": "adapter", "concepts": "concepts",
                  "concept": "concept", "n": "n", "max_new_tokens": "max_new_tokens",
                  "batch_size": "batch_size", "judge": "judge", "method": "method",
                  "retain_ratio": "retain_ratio", "retain_loss": "retain_loss", "seed": "seed"}
"""Option (argparse dest) -> the parameter rule it is checked by (orchestrate.check_parameter)."""


def check_args(args) -> None:
    """Check the options commands share (--model, --concepts, --n, --profile, ...) before a
    command runs, so a wrong value fails before any model is loaded, naming the option and
    what it accepts."""
    problems = []
    for dest, rule in SHARED_OPTIONS.items():
        value = getattr(args, dest, None)
        wanted = None if value is None else check_parameter(rule, value)
        if wanted is not None:
            problems.append(f"--{dest.replace('_', '-')} must be {wanted}; got {value!r}")
    # -p key=value: values of known names (lr, max_steps, concepts, ...) are checked here;
    # which keys a command takes is its own business (e.g. a chapter's parameters cell).
    for key, value in parse_overrides(getattr(args, "param", None)).items():
        wanted = check_parameter(key, value)
        if wanted is not None:
            problems.append(f"-p {key} must be {wanted}; got {value!r}")
    if len(problems) == 1:
        raise ParameterError(problems[0])
    if problems:
        raise ParameterError(f"{len(problems)} invalid values:\n  " + "\n  ".join(problems))
    if getattr(args, "profile", None) is not None:
        get_profile(args.profile)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        return int(args.func(args) or 0)
    except EmaError as exc:
        print(f"ema {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ema {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
