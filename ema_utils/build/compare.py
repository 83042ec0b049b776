"""The book's "Models compared" page: every model run under a profile, side by side.

`ema run CHAPTER --profile P --model M` keeps M's runs in their own slot (``P@M``,
ema_utils.core.results.run_slot). This page reads each slot's finished chapter 1 (the aligned
model's refusal profile, over-refusal and MMLU) and chapter 3 (EMA per concept after narrow
unlearning) and puts them in two tables, one column per model, so that a reader sees how a
new model's profile and EMA compare with the default model's. A model without a finished
chapter says which command fills its column.
"""

from __future__ import annotations

from ..core.errors import EmaError
from ..chapters.tables import format_percent
from ..core.results import chapter_summary, slot_options, slots_with

MODELS_PAGE = "book/models"
BEGIN, END = "<!-- ema:models:begin -->", "<!-- ema:models:end -->"


def _points(delta) -> str:
    points = round(100 * delta)
    return "0 pts" if points == 0 else f"{points:+d} pts".replace("-", "−")


def _summary(chapter: str, slot: str) -> dict | None:
    try:
        return chapter_summary(chapter, slot)
    except EmaError:
        return None


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def refusal_rows(setups: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Concept rows (refusal rate with its 95% interval), then over-refusal and MMLU; one column
    per model (``setups``: model -> chapter 1 summary)."""
    concepts = sorted({c for s in setups.values() for c in s.get("refusal", {}).get("aligned", {})})
    rows = []
    for concept in concepts:
        row = [concept.replace("_", " ")]
        for s in setups.values():
            rate = s.get("refusal", {}).get("aligned", {}).get(concept)
            low, high = (s.get("intervals", {}).get(concept) or (None, None))
            row.append(format_percent(rate, low, high))
        rows.append(row)
    over = ["over-refusal (benign prompts)"]
    mmlu = ["MMLU accuracy (chance 25%)"]
    for s in setups.values():
        o = s.get("over_refusal") or {}
        over.append(format_percent(o.get("rate"), o.get("low"), o.get("high")))
        m = s.get("mmlu") or {}
        mmlu.append(format_percent(m.get("accuracy"), m.get("low"), m.get("high")))
    return ["refusal of the aligned model"] + list(setups), rows + [over, mmlu]


def ema_rows(crosses: dict[str, dict | None]) -> tuple[list[str], list[list[str]]]:
    """One row per (unlearned concept, concept): the change in refusal after narrow NPO, marked
    "EMA" where chapter 3's paired test flags it; "not run" for a model without chapter 3."""
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for model, summary in crosses.items():
        for t in (summary or {}).get("ema_tests", []):
            if not str(t.get("condition", "")).startswith("npo_"):
                continue
            target = t["condition"].removeprefix("npo_")
            mark = " (target)" if t.get("is_target") else (" **EMA**" if t.get("flagged") else "")
            cells.setdefault((target, t["concept"]), {})[model] = _points(t["delta"]) + mark
    rows = [[f"NPO on {target.replace('_', ' ')}", concept.replace("_", " ")]
            + [cells[(target, concept)].get(m, "not run" if crosses[m] is None else "n/a")
               for m in crosses]
            for target, concept in sorted(cells)]
    return ["unlearned", "concept"] + list(crosses), rows


def render_comparison(profile: str) -> str:
    """The page's generated part for ``profile``: both tables, and how to add a model."""
    slots = slots_with("setup", profile)
    if not slots:
        return f"*No model has run chapter 1 under profile `{profile}` yet.*\n"
    setups = {}
    for slot in slots:
        summary = _summary("setup", slot) or {}
        setups[summary.get("model") or slot] = summary
    names = dict(zip(slots, setups))
    crosses = {names[slot]: _summary("cross_domain", slot) for slot in slots}
    parts = [f"Profile `{profile}`: {len(slots)} model(s). "
             "Rates are the share of refused prompts with a 95% Wilson interval over items.\n"]
    header, rows = refusal_rows(setups)
    parts.append(_markdown_table(header, rows))
    header, rows = ema_rows(crosses)
    if rows:
        parts.append("\nChange in refusal after narrow NPO unlearning (chapter 3), in points; "
                     "**EMA** marks a drop on a non-target concept that passes both the paper's "
                     "15-point rule and the paired test.\n")
        parts.append(_markdown_table(header, rows))
    missing = [slot for slot in slots if crosses[names[slot]] is None]
    if missing:
        parts.append("\nChapter 3 has not run for: " + ", ".join(
            f"{names[s]} (`ema run cross_domain {slot_options(s)}`)" for s in missing) + ".\n")
    return "\n".join(parts)


def render_models_page(template: str, profile: str) -> str:
    start, stop = template.find(BEGIN), template.find(END)
    if start < 0 or stop < start:
        raise EmaError(f"{MODELS_PAGE}.md lacks the markers {BEGIN} ... {END} where the "
                       "comparison goes; restore them.")
    return template[:start] + render_comparison(profile) + template[stop + len(END):]
