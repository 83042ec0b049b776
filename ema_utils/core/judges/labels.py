"""The hand-labelled responses the judges are validated against, and JSON-lines reading.

:data:`LABELS_PATH` (what the learned judge fits and :func:`ema_utils.core.judges.validate_judges`
cross-validates on) and :data:`HELDOUT_PATH` (the chapters' own outputs, never trained on);
:func:`load_labels` reads either as a table, :func:`read_jsonl` any JSON-lines file with
errors that name the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..errors import DataError
from ..paths import DATA_DIR

LABELS_PATH = DATA_DIR / "judge_labels.jsonl"
"""The hand-labelled responses the judges are validated against (and the learned judge fits)."""

HELDOUT_PATH = DATA_DIR / "judge_heldout.jsonl"
"""A random sample of the cpu chapters' own generations, labelled by hand and never trained on:
the judges' agreement on what the chapters actually judge (:func:`heldout_agreement`). Each item
carries both annotators' labels (``first_annotator``, ``second_annotator``: each labelled blind
to the other and to every judge); ``is_refusal`` is the label they settled on."""


DRAW_PATH = DATA_DIR / "judge_draw.jsonl"
"""The protocol's labelled draw (:mod:`ema_utils.core.judges.draw`): responses of every source the
book judges, labelled blind by two annotators, each item fixed to the ``dev`` or ``test`` part
before anything was fitted. Judges are chosen (and the learned judge also fitted) on ``dev``;
``test`` is scored once per candidate."""

DRAW2_PATH = DATA_DIR / "judge_draw2.jsonl"
"""The first confirmation draw (365 texts never labelled before, 364 kept, drawn after the default was
chosen, labelled blind by two annotators). It was scored once, with the phrase judge of that
day (kappa 0.77, short of the targets: the data card and chapter 1 give the figures); its misses
were then read and the phrase judge's patterns fixed on them, so it is *development* data now
(every item's ``split`` is ``dev``) and the fix was tested on :data:`DRAW3_PATH`."""

DRAW3_PATH = DATA_DIR / "judge_draw3.jsonl"
"""The second confirmation draw (245 texts, drawn after the fix on :data:`DRAW2_PATH`, labelled
blind the same way). Scored once (phrase kappa 0.86, short of the targets on the second model);
its misses were then read and the phrase judge fixed on them (a cut-off inability, a harmless
substitute for requested writing, echoed request words), so it is *development* data now (every
item ``dev``) and the fix was tested on :data:`DRAW4_PATH`."""

DRAW4_PATH = DATA_DIR / "judge_draw4.jsonl"
"""The third confirmation draw, the fourth draw in chapter 1's count (307 texts, drawn after the fix on :data:`DRAW3_PATH`, labelled
blind the same way). Scored once (phrase kappa 0.76, 0.93 on the items no annotator was unsure
of; short of the targets on the sampled, NPO and second-model texts); its misses were then read
and the phrase judge fixed on the narrow forms among them (a cut-off "I don't (have the)", a
refusal in Chinese, a specialist referral, general information offered instead, "not
recommended"), so it is *development* data now (every item ``dev``) and the fix was tested on
:data:`DRAW5_PATH`."""

DRAW5_PATH = DATA_DIR / "judge_draw5.jsonl"
"""The fourth confirmation draw, the fifth draw in chapter 1's count (232 texts, drawn after the fix on :data:`DRAW4_PATH`, labelled
blind the same way, committed before it was scored). Scored once (phrase kappa 0.84 [0.76,
0.92]: greedy 1.00, NPO 0.95, sampled 0.76; 0.93 on the items no annotator was unsure of); its
misses were then read and the phrase judge fixed on the forms among them (an AI identity of
several words, a request for more context, "However, I can provide you with some" cut off, "a
dangerous action", and "the post below" as a delivery), so it is *development* data now (every
item ``dev``) and the fix was tested on :data:`DRAW6_PATH`."""

DRAW6_PATH = DATA_DIR / "judge_draw6.jsonl"
"""The fifth confirmation draw, the sixth in chapter 1's count (182 texts: 130 sampled, 33 from
the checkpoints of a gentler NPO-Cybersecurity run, 17 greedy, 2 second model; drawn after the
fix on :data:`DRAW5_PATH`, labelled blind the same way, committed before it was scored). Scored
once (phrase kappa 0.89 [0.82, 0.95]: greedy 1.00, sampled 0.88, NPO 0.87; 0.96 on the items no
annotator was unsure of); its errors were then read and the phrase judge fixed on the forms among
them, so it is *development* data now (every item ``dev``) and the fix was tested on
:data:`DRAW7_PATH`."""

DRAW7_PATH = DATA_DIR / "judge_draw7.jsonl"
"""The sixth confirmation draw, the seventh in chapter 1's count (223 texts: 130 sampled, 70 from
the checkpoints of two NPO runs trained for it, 20 greedy, 3 second model; drawn after the fix on
:data:`DRAW6_PATH`, labelled blind the same way, committed before it was scored). Scored once
(phrase kappa 0.83 [0.75, 0.90]: NPO 0.91, greedy 0.89, sampled 0.75; 0.91 on the items no
annotator was unsure of); its errors were then read and the phrase judge fixed on the forms among
them (a generic offer of help as the whole opening, a professional's possessive read as a
referral, a message's "sorry to inform you", the hedge "it's important to note that"), so it is
*development* data now (every item ``dev``) and the fix was tested on :data:`DRAW8_PATH`."""

DRAW8_PATH = DATA_DIR / "judge_draw8.jsonl"
"""The seventh confirmation draw, the eighth in chapter 1's count (197 texts: 130 sampled, 56 from
the checkpoints of two NPO runs trained for it, 9 greedy, 2 second model; drawn after the fix on
:data:`DRAW7_PATH`, labelled blind the same way, committed before it was scored). Scored once
(phrase kappa 0.88 [0.80, 0.95]: sampled 0.87, NPO 0.87, greedy 1.00; 0.93 on the items no
annotator was unsure of); its errors were then read and the phrase judge fixed on the forms among
them (an inability with "currently", a definition asked for and given, an apology that asks back
which one is meant), so it is *development* data now (every item ``dev``) and the fix was tested
on :data:`DRAW9_PATH`."""

DRAW9_PATH = DATA_DIR / "judge_draw9.jsonl"
"""The eighth confirmation draw, the ninth in chapter 1's count (312 texts: 130 aligned sampled,
130 second model sampled, 28 from the checkpoints of two NPO runs trained for it, 24 aligned
greedy on train-split prompts; drawn after the fix on :data:`DRAW8_PATH`, labelled blind the same
way, committed before it was scored). Scored once (phrase kappa 0.83 [0.75, 0.90]: every greedy
and NPO text right, the aligned model sampled 0.90, the second model sampled 0.23; 0.93 without
the second model); its errors were then read and the phrase judge fixed on the forms among them
("sorry to inform you, but", an AI's "I recommend using ...", "important to consider the size"),
so it is *development* data now (every item ``dev``) and the fix is tested on
:data:`CONFIRM_PATH`."""

CONFIRM_PATH = DATA_DIR / "judge_confirm.jsonl"
"""The confirmation draw: the newest draw, made *after* the default judge was last changed, of
texts no judge was fitted, chosen or scored on (:func:`ema_utils.core.judges.draw.labelled_texts`
excluded), labelled blind by two annotators the same way. Every item is ``test``: it is scored
once per candidate and chooses nothing. Now the ninth confirmation draw, the tenth in chapter
1's count (332 texts: 130 aligned sampled, 130 second model sampled, 43 from the checkpoints of
two NPO runs trained for it, 29 aligned greedy, 24 of them on train-split prompts; drawn after
the fix on :data:`DRAW9_PATH`): phrase kappa 0.72 [0.63, 0.81], greedy 0.93, NPO 0.88, the
aligned model sampled 0.77, the second model sampled 0.27."""

LABELLED_PATHS = (LABELS_PATH, HELDOUT_PATH, DRAW_PATH, DRAW2_PATH, DRAW3_PATH, DRAW4_PATH,
                  DRAW5_PATH, DRAW6_PATH, DRAW7_PATH, DRAW8_PATH,
                  DRAW9_PATH, CONFIRM_PATH)
"""Every file of labelled responses, oldest first: what a fresh draw must exclude."""


def read_jsonl(path, required: Sequence[str] = ()) -> list[dict]:
    """The objects of a JSON-lines file; a malformed line raises DataError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in required if k not in obj]
            if missing:
                raise DataError(f"{path} line {lineno}: missing field(s) {missing}; each line needs "
                                f"{list(required)}")
            for key in required:
                if key in ("prompt", "response") and not isinstance(obj[key], str):
                    raise DataError(f"{path} line {lineno}: field '{key}' must be a string")
            obj["_line"] = lineno
            rows.append(obj)
    return rows


def load_draw(path=None, part: str | None = None) -> pd.DataFrame:
    """The labelled draw (:data:`DRAW_PATH`) as a table, or only its ``part`` ("dev" or "test")."""
    path = Path(path) if path else DRAW_PATH
    table = load_labels(path)
    if "split" not in table or not set(table["split"]) <= {"dev", "test"}:
        raise DataError(f"{path}: every item of a draw needs a 'split' of 'dev' or 'test' "
                        "(fixed by `ema judge draw` before labelling)")
    return table if part is None else table[table["split"] == part].reset_index(drop=True)


def load_labels(path=None) -> pd.DataFrame:
    """The labelled set as a table (id, prompt, response, is_refusal, and any other fields)."""
    path = Path(path) if path else LABELS_PATH
    if not path.is_file():
        raise DataError(f"{path}: the judge-validation labels are missing (expected one JSON "
                        "object per line with id, prompt, response and is_refusal; the project's "
                        "are data/judge_labels.jsonl and data/judge_heldout.jsonl)")
    rows = read_jsonl(path, required=("id", "prompt", "response", "is_refusal"))
    for row in rows:
        if not isinstance(row["is_refusal"], bool):
            raise DataError(f"{path} line {row['_line']}: 'is_refusal' must be true or false")
    if not rows:
        raise DataError(f"{path}: no labelled items")
    return pd.DataFrame(rows).drop(columns="_line")
