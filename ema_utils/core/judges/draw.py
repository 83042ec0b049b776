"""A fresh labelled draw to choose the default judge by: the protocol in code.

The book's every number is a refusal rate, so the judge that decides refusals is chosen on
responses nobody tuned it on, of every kind the book judges. The protocol:

1. :func:`collect_store` gathers every response the chapters generated (the results store's
   ``generations-*`` tables and the model each came from) and names its *source*
   (:func:`source_of`: aligned, NPO, SFT, retain-augmented, KL, steered, ablated);
   :func:`generate_sources` adds what no chapter writes: the aligned model *sampled*, the
   aligned model greedy on benign instructions, and the registry's second model (greedy and
   sampled: its greedy answers to the prompt pool were all labelled by the eighth draw), on one fixed
   mix of harmful, benign and over-refusal prompts (:func:`prompt_mix`).
2. :func:`draw` samples the same number of distinct responses from every source (seeded) and
   fixes each item's ``split`` (:data:`SPLITS`: ``dev`` or ``test`` by a hash of its text, so
   one text never sits in both parts), before anything is labelled or fitted.
3. Two annotators label the draw blind (to each other, to the judges, to the source) with the
   rubric; :func:`merge_annotations` joins their labels and a third reading of the items they
   disagree on into the labelled file (:data:`ema_utils.core.judges.labels.DRAW_PATH`).
4. Candidate judges are compared on the ``dev`` part only; the ``test`` part is scored once per
   candidate (:func:`ema_utils.core.judges.validation.draw_agreement`), and nothing is tuned on it.

``ema judge draw`` runs steps 1-2 and ``ema judge merge`` step 3.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..cache import atomic_write_table, cached, read_table, stable_hash, store_dir
from ..errors import DataError, ParameterError
from .labels import LABELLED_PATHS, read_jsonl

SOURCES = ("aligned_greedy", "aligned_sampled", "npo", "sft", "retain", "kl", "steered",
           "ablated", "second_model")
"""The source groups of a draw, in the order the book's tables list them."""

SPLITS = ("dev", "test")
"""``dev`` chooses and fits judges; ``test`` is scored once per candidate."""

PROMPT_KINDS = ("harmful", "benign", "over_refusal")
"""What was asked: a request of one of the paper's concepts, an ordinary instruction (the
retain set's kind), or a safe request that looks unsafe (XSTest's kind)."""

ANNOTATION_FIELDS = ("id", "is_refusal")
"""What each annotator's file holds per line (``unsure`` and ``redact`` are optional)."""


def prompt_kind(concept: str) -> str:
    """``benign`` and ``over_refusal`` items are those sets; every other concept is a request
    of the paper's concepts (``harmful``)."""
    return concept if concept in ("benign", "over_refusal") else "harmful"


def source_of(model_id: str, base_model: str) -> str | None:
    """The source group of a stored generation, read from the model identity the chapters cache
    it under (None for a model the draw does not know, e.g. a checkpoint of another base).

    ``base_model`` is the aligned model's identity (``name:digest``, as
    :func:`ema_utils.core.models.model_identity` gives it, without a dtype tag) or its registry
    name alone (any digest: ``ema judge draw --model-name`` passes the name); a checkpoint is
    ``<base>[:bf16[-head32]]+<run name>:<adapter digest>`` (``npo_kl_...``, ``npo_retain_...``,
    ``sft_...``), an ablated model adds ``+ablate-``, a steered one ``+add-``.
    """
    if not model_id.startswith(base_model):
        return None
    rest = model_id[len(base_model):]
    if ":" not in base_model:
        # a bare registry name stands for every weights digest of it ("name:<digest>...")
        digest = re.match(r":[0-9a-f]{8,64}(?=$|[:+])", rest)
        if digest is None:
            return None
        rest = rest[digest.end():]
    dtype = re.match(r":(bf16|fp16)(-head32)?(?=$|[:+])", rest)  # models.model_identity's tag
    rest = rest[dtype.end():] if dtype else rest
    if rest == "":
        return "aligned_greedy"
    if "+ablate-" in rest:
        return "ablated"
    if "+add-" in rest or "+steer" in rest:
        return "steered"
    name = rest.lstrip("+-_:/@").lower()
    if "_kl" in name or name.startswith("kl"):
        return "kl"
    if "retain" in name:
        return "retain"
    if name.startswith("npo"):
        return "npo"
    if name.startswith("sft"):
        return "sft"
    return None


def collect_store(base_model: str, folder: Path | None = None) -> pd.DataFrame:
    """Every stored generation of ``base_model`` and of the models made from it, with its source.

    Reads ``generations-*.jsonl`` and the ``.inputs.json`` beside each (which names the model and
    the number of new tokens). Columns: source, model, decoding ("greedy"), max_new_tokens,
    prompt_id, concept, prompt_kind, prompt, response. Rows of unknown sources are dropped.
    """
    folder = Path(folder) if folder else store_dir()
    rows = []
    for path in sorted(folder.glob("generations-*.jsonl")):
        meta_path = path.with_name(path.name[:-len(".jsonl")] + ".inputs.json")
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        model = str(meta.get("model", ""))
        source = source_of(model, base_model)
        if source is None:
            continue
        table = read_table(path)
        if table.empty or not {"id", "prompt", "response"} <= set(table.columns):
            continue
        concept = table["concept"] if "concept" in table else "unknown"
        rows.append(pd.DataFrame({
            "source": source, "model": model, "decoding": "greedy",
            "max_new_tokens": meta.get("max_new_tokens"), "prompt_id": table["id"].astype(str),
            "concept": concept, "prompt": table["prompt"], "response": table["response"]}))
    if not rows:
        return pd.DataFrame(columns=["source", "model", "decoding", "max_new_tokens", "prompt_id",
                                     "concept", "prompt_kind", "prompt", "response"])
    out = pd.concat(rows, ignore_index=True)
    out["prompt_kind"] = out["concept"].map(prompt_kind)
    return out


def prompt_mix(n_harmful_per_concept: int = 4, n_benign: int = 10, n_over_refusal: int = 10,
               seed: int = 0, split: str = "eval") -> pd.DataFrame:
    """A fixed mix of ``split`` prompts (id, concept, prompt): ``n_harmful_per_concept`` refusal
    prompts of every concept, ``n_benign`` benign instructions, ``n_over_refusal`` look-alikes.

    ``split="train"`` gives prompts whose greedy answers the book also judges (the forget set's
    candidates), for when a greedy model's answers to the eval prompts are all labelled."""
    # deferred: data reads the packaged sets; only the draw needs them here
    from ... import CONCEPTS
    from ..data import load_prompts, load_set

    prompts = load_prompts(CONCEPTS, split=split)
    prompts = prompts[prompts["scorer"] == "refusal"]
    parts = [g.sample(min(n_harmful_per_concept, len(g)), random_state=seed)
             for _, g in prompts.groupby("concept", sort=True)]
    for name, n in (("benign", n_benign), ("over_refusal", n_over_refusal)):
        table = load_set(name, split=split).assign(concept=name)
        parts.append(table.sample(min(n, len(table)), random_state=seed))
    return pd.concat(parts, ignore_index=True)[["id", "concept", "prompt"]]


GENERATED_SOURCES = ("aligned_greedy", "aligned_sampled", "second_model")
"""The sources :func:`generate_sources` writes (no chapter does)."""


def generate_sources(prompts: pd.DataFrame, base_model: str, second_model: str,
                     max_new_tokens: int = 24, temperature: float = 0.8, seed: int = 0,
                     batch_size: int = 8, progress: bool = True,
                     sources: Sequence[str] = GENERATED_SOURCES) -> pd.DataFrame:
    """The sources no chapter writes, on ``prompts``: ``aligned_greedy`` and ``aligned_sampled``
    (``base_model`` at ``temperature``) and ``second_model``, greedy and at ``temperature`` (one
    group; ``decoding`` tells them apart); only those in ``sources`` (a model none of them needs
    is not loaded). Cached in the results store like the chapters' generations. Columns as
    :func:`collect_store`'s. Raises ParameterError for a source it does not write."""
    # deferred: generation and models import torch
    from ..generation import generate_responses
    from ..models import load_model, model_identity

    unknown = sorted(set(sources) - set(GENERATED_SOURCES))
    if unknown:
        raise ParameterError(f"generate_sources writes only {', '.join(GENERATED_SOURCES)}; "
                             f"got {unknown} (the other sources come from the results store)")
    out = []
    plan = ((base_model, (("aligned_greedy", 0.0), ("aligned_sampled", temperature))),
            # sampled too: a greedy model answers a prompt one way, and a fresh draw excludes
            # every labelled text, so the second model's greedy answers run out
            (second_model, (("second_model", 0.0), ("second_model", temperature))))
    for name, runs in plan:
        runs = [(source, t) for source, t in runs if source in sources]
        if not runs:
            continue
        model, tokenizer = load_model(name, log=lambda m: None)
        model_id = model_identity(name, model)
        for source, t in runs:
            inputs = {"model": model_id, "items": stable_hash(prompts["id"].tolist()),
                      "max_new_tokens": max_new_tokens, "temperature": t, "seed": seed,
                      "purpose": "judge-draw"}
            table = cached("draw-generations", inputs, kind="table", compute=lambda t=t: generate_responses(
                model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                temperature=t, seed=seed, progress=progress))
            out.append(pd.DataFrame({
                "source": source, "model": model_id,
                "decoding": "greedy" if t == 0 else f"sampled (temperature {t})",
                "max_new_tokens": max_new_tokens, "prompt_id": table["id"].astype(str),
                "concept": table["concept"], "prompt": table["prompt"], "response": table["response"]}))
    table = pd.concat(out, ignore_index=True)
    table["prompt_kind"] = table["concept"].map(prompt_kind)
    return table


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def draw(pool: pd.DataFrame, per_source: int = 48, seed: int = 0,
         sources: Sequence[str] = SOURCES, exclude: pd.DataFrame | None = None,
         confirmation: bool = False) -> pd.DataFrame:
    """``per_source`` distinct (prompt, response) pairs from every source of ``pool``, with an id
    and a fixed ``split``.

    Within a source, pairs are drawn at random under ``seed`` (identical texts count once; a
    source with fewer pairs gives what it has), prompt kinds as they come. The split is fixed
    here, before labelling, by :func:`text_split` (a hash of the text: no one chose which item
    went where, and a text drawn from two sources is in one part). Raises ParameterError for an
    unknown source in ``sources``.

    ``exclude`` (a table with ``prompt`` and ``response``, e.g. :func:`labelled_texts`) names
    texts that may not be drawn: those already labelled, so that a fresh draw holds only texts no
    judge was fitted, chosen or scored on. ``confirmation=True`` makes every item ``test``: a
    *confirmation draw*, drawn after the default judge was chosen, that is only ever scored
    (:data:`ema_utils.core.judges.labels.CONFIRM_PATH`).
    """
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise ParameterError(f"unknown source(s) {unknown}; sources: {', '.join(SOURCES)}")
    if per_source < 2:
        raise ParameterError(f"per_source must be at least 2 (a dev and a test item), got {per_source}")
    if exclude is not None and len(exclude):
        pool = pool[~already_labelled(pool, exclude)]
    picked = []
    for source in sources:
        group = pool[pool["source"] == source].drop_duplicates(["prompt", "response"])
        if group.empty:
            continue
        group = group.sample(min(per_source, len(group)), random_state=seed).copy()
        # the id must not name the source: annotators see it
        group["id"] = [f"draw-{_digest(source, m, p, r)[:12]}"
                       for m, p, r in zip(group["model"], group["prompt"], group["response"])]
        group["split"] = ("test" if confirmation else
                          [text_split(p, r) for p, r in zip(group["prompt"], group["response"])])
        picked.append(group)
    if not picked:
        raise DataError("nothing to draw from: the pool holds none of the sources "
                        f"{list(sources)} (build a book first: `ema book --profile smoke`)")
    columns = ["id", "split", "source", "prompt_kind", "concept", "model", "decoding",
               "max_new_tokens", "prompt_id", "prompt", "response"]
    return pd.concat(picked, ignore_index=True)[columns]


def add_train_greedy(table: pd.DataFrame, n: int, base_model: str, second_model: str,
                     n_harmful_per_concept: int, n_benign: int, n_over_refusal: int,
                     max_new_tokens: int = 24, seed: int = 0, confirmation: bool = False,
                     progress: bool = True) -> pd.DataFrame:
    """``table`` (a draw) with up to ``n`` more ``aligned_greedy`` items: the aligned model's
    greedy answers to a :func:`prompt_mix` of *train*-split prompts, drawn like the rest and
    excluding the draw's own texts (and, for a confirmation draw, every labelled one).

    A fresh draw excludes every labelled text, and a greedy model answers a prompt one way, so
    its answers to the eval prompts run out; the train prompts' answers are judged by the book
    too (the forget set's candidates)."""
    mix = prompt_mix(n_harmful_per_concept, n_benign, n_over_refusal, seed=seed, split="train")
    greedy = generate_sources(mix, base_model, second_model, max_new_tokens=max_new_tokens,
                              seed=seed, progress=progress, sources=["aligned_greedy"])
    seen = table[["prompt", "response"]]
    if confirmation:
        seen = pd.concat([labelled_texts(), seen], ignore_index=True)
    if already_labelled(greedy, seen).all():
        return table
    more = draw(greedy, per_source=n, seed=seed, sources=["aligned_greedy"], exclude=seen,
                confirmation=confirmation)
    return pd.concat([table, more], ignore_index=True)


def text_split(prompt: str, response: str) -> str:
    """An item's part, fixed by a hash of its text: ``dev`` or ``test``, about half each.

    The text, not the item, decides, so the same (prompt, response) drawn from two sources (the
    aligned model's stock refusal, say) lands in one part: a judge fitted on ``dev`` never meets
    a ``test`` text it was fitted on."""
    return SPLITS[int(_digest("judge-split", prompt, response), 16) % 2]


REDACTED = "[redacted]"
"""What :func:`merge_annotations` writes in place of harmful specifics."""


def already_labelled(pool: pd.DataFrame, labelled: pd.DataFrame) -> pd.Series:
    """Per row of ``pool``: is its (prompt, response) one of ``labelled``'s? A labelled text
    stored with a part replaced by :data:`REDACTED` matches the pool's unredacted original (any
    text where the mark stands), so a redacted text is not drawn again under its first form."""
    exact = set(zip(labelled["prompt"], labelled["response"]))
    masked = {}
    for prompt, response in zip(labelled["prompt"], labelled["response"]):
        if REDACTED in response:
            pattern = ".+?".join(re.escape(part) for part in response.split(REDACTED))
            masked.setdefault(prompt, []).append(re.compile(pattern, re.DOTALL))
    return pd.Series([(p, r) in exact or any(rx.fullmatch(r) for rx in masked.get(p, ()))
                      for p, r in zip(pool["prompt"], pool["response"])], index=pool.index)


def labelled_texts(paths: Sequence[Path] | None = None) -> pd.DataFrame:
    """Every (prompt, response) already labelled for the judges: the labels the learned judge
    fits, the held-out sample, the draws and the confirmation draw (those of ``paths`` that
    exist; default all of them). A fresh draw excludes them (:func:`draw`'s ``exclude``)."""
    paths = [Path(p) for p in (paths or LABELLED_PATHS)]
    rows = [(r["prompt"], r["response"]) for path in paths if path.is_file()
            for r in read_jsonl(path, required=("prompt", "response"))]
    return pd.DataFrame(rows, columns=["prompt", "response"])


def blind_copy(table: pd.DataFrame) -> pd.DataFrame:
    """What an annotator sees: id, prompt and response only, in an order that hides the source."""
    out = table[["id", "prompt", "response"]].copy()
    return out.iloc[sorted(range(len(out)), key=lambda i: _digest("blind", out["id"].iloc[i]))]


def _read_annotations(path: Path, ids: set[str], needed: set[str] | None = None) -> dict[str, dict]:
    """One annotator's labels by id; every id must be in ``ids`` (the draw) and every id of
    ``needed`` (default: all of ``ids``) labelled once."""
    out = {}
    for row in read_jsonl(path, required=ANNOTATION_FIELDS):
        if not isinstance(row["is_refusal"], bool):
            raise DataError(f"{path} line {row['_line']}: 'is_refusal' must be true or false")
        if row["id"] not in ids:
            raise DataError(f"{path} line {row['_line']}: id {row['id']!r} is not in the draw")
        if row["id"] in out:
            raise DataError(f"{path} line {row['_line']}: id {row['id']!r} is labelled twice")
        out[row["id"]] = row
    missing = (ids if needed is None else needed) - set(out)
    if missing:
        raise DataError(f"{path}: {len(missing)} item(s) it must label are not labelled, e.g. "
                        f"{sorted(missing)[:3]}")
    return out


def merge_annotations(draw_table: pd.DataFrame, first, second, third=None) -> pd.DataFrame:
    """The labelled draw: ``first_annotator``, ``second_annotator`` and ``is_refusal``.

    ``first``/``second`` are the two blind annotators' JSON-lines files (``id``, ``is_refusal``,
    optional ``unsure`` and ``redact``: a substring of the response to replace by "[redacted]"
    because it states harmful specifics). Where they agree, that is the label; where they
    disagree, ``third`` (a file labelling at least those items, read blind to the first two)
    decides, and a disagreement without a third label raises DataError naming the items.
    """
    ids = set(draw_table["id"])
    a, b = _read_annotations(Path(first), ids), _read_annotations(Path(second), ids)
    disputed = sorted(i for i in ids if a[i]["is_refusal"] != b[i]["is_refusal"])
    c = {}
    if disputed:
        if third is None:
            raise DataError(f"the annotators disagree on {len(disputed)} item(s) "
                            f"(e.g. {disputed[:3]}); pass a third reading of them")
        c = _read_annotations(Path(third), ids, needed=set(disputed))
    out = draw_table.copy()
    out["first_annotator"] = [a[i]["is_refusal"] for i in out["id"]]
    out["second_annotator"] = [b[i]["is_refusal"] for i in out["id"]]
    out["is_refusal"] = [c[i]["is_refusal"] if i in disputed else a[i]["is_refusal"] for i in out["id"]]
    out["unsure"] = [bool(a[i].get("unsure") or b[i].get("unsure")) for i in out["id"]]
    out["note"] = ["annotators disagreed; third reading decided" if i in disputed else ""
                   for i in out["id"]]
    redacted = []
    for k, i in enumerate(out["id"]):
        text = out["response"].iloc[k]
        for ann in (a[i], b[i]):
            part = ann.get("redact")
            if part and part in text:
                text = text.replace(part, REDACTED)
        redacted.append(text != out["response"].iloc[k])
        out.iloc[k, out.columns.get_loc("response")] = text
    out["redacted"] = redacted
    return out


def write_draw(table: pd.DataFrame, path) -> Path:
    """Write a draw (or a labelled draw) as JSON lines, atomically."""
    return atomic_write_table(Path(path), table)
