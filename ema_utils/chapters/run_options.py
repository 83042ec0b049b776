"""The options chapter 2 ran its interventions with, for the chapters that build on its runs.

Chapter 4 trains its augmented runs with them (so they use the *same* forget set and are scored
and selected the same way as the plain runs they are compared with), and chapter 6 rebuilds
chapter 4's KL run and the forget set with them.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import ParameterError

RUN_OPTIONS = {"n_forget": 0, "forget_candidates": 0, "forget_max_new_tokens": 24,
               "traj_n_per_concept": 8, "traj_max_new_tokens": 16, "kl_n_per_concept": 8,
               "batch_size": 16, "judge": None, "max_drop": 0.03, "target_threshold": 0.25,
               "seed": 0, "utility_per_subject": 2}
"""run_intervention's data and scoring options, with its defaults."""


def upstream_options(chapter_folder) -> dict:
    """The run_intervention options chapter 2 used (forget set size, candidates, generation
    lengths, trajectory sizes, judge, checkpoint rule thresholds, seed), read from its run.json.

    With these the augmented runs train on the *same* forget set and are scored and selected
    the same way as the plain runs they are compared with. Chapter 2 calls its scoring batch
    size ``eval_batch_size``.
    """
    path = Path(chapter_folder) / "run.json"
    if not path.is_file():
        raise ParameterError(f"{path} is missing: the unlearning chapter did not finish; run "
                             "`ema run unlearning --profile P` first")
    params = json.loads(path.read_text()).get("parameters", {})
    options = dict(RUN_OPTIONS)
    for key in options:
        source = "eval_batch_size" if key == "batch_size" else key
        if source in params:
            options[key] = params[source]
    return options
