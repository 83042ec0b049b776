"""Parameter values as people type them: ``-p key=value`` on the command line.

A value is read as a Python literal when it is one (``None``, ``3e-5``, ``["a"]``), else as
YAML (so ``-p concepts=[a, b]`` and ``-p name=text`` work without quotes). Both `ema run`
(ema_utils.build.orchestrate) and `ema unlearn` (ema_utils.methods.interventions) read their ``-p`` here.
"""

from __future__ import annotations

import ast
import re

import yaml

from .errors import ParameterError


def parse_literal(text: str):
    """A parameter's value from its source text: a Python literal (None, 3e-5, ["a"]) if it is
    one, else YAML (so `-p concepts=[a, b]` and `-p name=text` work without quotes)."""
    if re.fullmatch(r"\s*\d+(\s*:\s*\d+)+\s*", text):
        return text.strip()  # "1:2" is a ratio, not YAML 1.1's base-60 integer 62
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(items: list[str] | None) -> dict:
    """``["lr=3e-5", "concepts=[cybersecurity, safety]"]`` -> dict; values are read as YAML."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParameterError(f"-p expects key=value, got '{item}' (e.g. -p max_new_tokens=32)")
        overrides[key.strip()] = parse_literal(value.strip()) if value.strip() else ""
    return overrides
