"""The judges by name: :func:`get_judge`, :func:`score_responses`, :func:`judge_fingerprint`.

The one place that knows every judge kind (:data:`JUDGES`) and which one the chapters use by
default (:data:`DEFAULT_JUDGE`, with the measurements behind that choice).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from ..errors import ParameterError
from ..paths import sha256_file
from .base import Judge
from .endpoint import RUBRIC, EndpointJudge
from .ensemble import CONFIDENT, ENSEMBLE_RULE, EnsembleJudge
from .first_token import (
    REFUSAL_OPENINGS,
    RUBRIC_QUESTION,
    FirstTokenJudge,
    RubricModelJudge,
)
from .learned import (
    _CACHE_VERSION,
    LEARNED_CS,
    LEARNED_PCA,
    LEARNED_TEXT,
    LEARNED_TRAIN,
    LEARNED_VERSION,
    LearnedJudge,
)
from .phrase import PhraseJudge, _patterns_digest

JUDGES = ("phrase", "learned", "ensemble", "first_token", "small_model", "endpoint")
"""Every judge name :func:`get_judge` knows."""

RESPONSE_JUDGES = ("phrase", "learned")
"""The offline judges that read responses; :func:`validate_judges` scores these.

``first_token`` is left out of the validation table on purpose: it scores a *prompt* with a
model (how likely the model is to open with a refusal), not a response that someone else
generated, so the labelled responses cannot be scored by it. ``endpoint`` is optional and not
offline."""

DEFAULT_JUDGE = "phrase"
"""The judge every chapter and the over-refusal set use by default, chosen by the protocol of
:mod:`ema_utils.core.judges.draw` on a fresh labelled draw (:data:`DRAW_PATH`, 2026-12-06): 370
responses of nine sources (the aligned model greedy and sampled, NPO, SFT, retain-augmented,
KL-regularised, steered and ablated models, SmolLM2-135M-Instruct) on harmful, benign and
over-refusal prompts, labelled blind by two annotators (agreement 99.5%, kappa 0.99), split
into dev (158) and test (212) by a hash of the text before any judge was fitted or chosen.

On dev, where the choice is made (:func:`choose_on_dev`: highest kappa, ties to the smaller
worst-source error, then to the simpler judge): phrase 0.948, the phrase+learned ensembles
"both" and "confident" 0.948 (the same verdicts on every dev item), learned (fitted on the
labelled set and the dev part, scored out-of-fold) 0.914, the learned judge fitted on the
labelled set alone 0.673 (its false refusals, 13% of dev, were the misfire this protocol was
built to find), and the default 0.5B model asked the rubric's yes/no question 0.00 (it says "No"
to every item at threshold 0.5; its P(Yes) ranks refusals *last*, dev AUC 0.02, and it judges
about one response a second on 2 cores). Phrase wins the tie as the simpler judge.

On test, scored once per candidate: phrase kappa 0.945 (95% bootstrap 0.89-0.99), 2.4% of items
wrong; learned and ensemble "both" 0.956. The targets (kappa >= 0.90 overall, >= 0.85 in every
source of >= 20 items, no kind of error above 5% of its source) are met overall and in every
source but the aligned model *sampled* at temperature 0.8 (kappa 0.64, 3 of 22 wrong), a
decoding no chapter uses; no candidate met them there. On the chapters' own outputs held out
(:data:`HELDOUT_PATH`, 300 items): phrase 0.87, learned 0.87.

Confirmation draws of texts never labelled before (chapter 1, the data card; files in
:mod:`ema_utils.core.judges.labels`), each scored once: 0.77 on ``DRAW2_PATH``, 0.86 on
``DRAW3_PATH``, 0.76 on ``DRAW4_PATH``, 0.84 on ``DRAW5_PATH``, 0.89 on ``DRAW6_PATH``, 0.83
on ``DRAW7_PATH``, 0.88 on ``DRAW8_PATH`` and 0.83 on ``DRAW9_PATH`` (each then read, fixed on,
and made development data), and, for the phrase judge as it is now, **0.72 [0.63, 0.81]** on
``CONFIRM_PATH`` (332 items: aligned greedy 0.93 (29 items, 1 missed refusal), the checkpoints of
two NPO runs 0.88 (43 items, 2 missed), the aligned model sampled 0.77 (130 items, 10 missed, 2
false), the second model sampled 0.27 (130 items, 15 missed, 2 false); 0.85 on the 288 items no
annotator was unsure of, 0.16 on the 44 they were). The targets are not met. Over nine fresh
draws (eight fixes) the kappa stayed between 0.72 and 0.89 with no trend: the errors that remain
are on items the annotators themselves doubt, on harmless substitutes (a polite letter where a
bullying message was asked for), which no phrase can see, and on the second model's own ways of
declining. Past them lies a judge that understands the request (``endpoint`` against a capable
served model), which does not run on this machine.

A second opinion from the default model was measured on the development draws and ruled out:
asked the rubric's question (or "does the response do what was asked?"), its first-token
probability ranks the phrase judge's 42 missed refusals among the 795 texts it passes (753 real
answers) at AUC
0.67 (either question), and every threshold adds more false refusals than it removes misses
(its 40 most confident items: 11 misses caught, 29 answers made refusals).

The labelled set (:data:`LABELS_PATH`, 385 items, 83 written to be hard) is the stress test
the learned judge is fitted on; by 5-fold cross-validation there learned 0.79, phrase 0.76.
The selection of the model's own refusals for forget and retain sets uses the phrase judge by
name (``build_forget_set``'s ``judge="phrase"``: training data should hold only clear
refusals). :func:`validate_judges` reports every figure; ``-p judge=learned`` runs a chapter
with another judge."""


def get_judge(name: str | None = None, **kwargs) -> Judge:
    """A judge by name (None: :data:`DEFAULT_JUDGE`); ``kwargs`` go to its constructor.

    ``learned`` returns the default fit on the labelled set (kwargs: labels_path, text, refit);
    ``first_token`` and ``small_model`` need ``model=`` and ``tokenizer=``; ``endpoint`` needs ``base_url=`` and
    ``model=``.
    """
    name = name or DEFAULT_JUDGE
    if name == "phrase":
        return PhraseJudge(**kwargs)
    if name == "learned":
        return LearnedJudge.default(**kwargs)
    if name == "first_token":
        if "model" not in kwargs or "tokenizer" not in kwargs:
            raise ParameterError("the first_token judge scores prompts with a model: "
                                 "get_judge('first_token', model=model, tokenizer=tokenizer)")
        return FirstTokenJudge(**kwargs)
    if name == "ensemble":
        rule = kwargs.pop("rule", ENSEMBLE_RULE)
        return EnsembleJudge(LearnedJudge.default(**kwargs), rule=rule)
    if name == "small_model":
        if "model" not in kwargs or "tokenizer" not in kwargs:
            raise ParameterError("the small_model judge asks a model: "
                                 "get_judge('small_model', model=model, tokenizer=tokenizer)")
        return RubricModelJudge(**kwargs)
    if name == "endpoint":
        return EndpointJudge(**kwargs)
    raise ParameterError(f"unknown judge {name!r}; judges: {', '.join(JUDGES)}")


def judge_fingerprint(name: str | None = None, labels_path=None) -> str:
    """A short digest of what a judge's verdicts depend on, for results-cache keys.

    phrase: the pattern lists; learned: those plus the labels file and the model settings;
    first_token / endpoint: the scoring code's version (their model or server is keyed by the
    caller). Changes whenever a verdict could change, so cached judgements are not reused.
    """
    name = name or DEFAULT_JUDGE
    if name not in JUDGES:
        raise ParameterError(f"unknown judge {name!r}; judges: {', '.join(JUDGES)}")
    parts = [name, _CACHE_VERSION]
    if name in ("phrase", "learned", "ensemble"):
        parts.append(_patterns_digest())
    if name == "ensemble":
        parts += [ENSEMBLE_RULE, str(CONFIDENT)]
    if name in ("learned", "ensemble"):
        if labels_path:
            path = Path(labels_path)
            parts.append(sha256_file(path) if path.is_file() else "no-labels")
        else:
            parts.append("|".join(f"{Path(p).name}:{part}:{sha256_file(p) if Path(p).is_file() else '-'}"
                                  for p, part in LEARNED_TRAIN))
        parts += [LEARNED_TEXT,
                  str(LEARNED_PCA), str(LEARNED_CS), LEARNED_VERSION]
    if name == "first_token":
        parts.append(",".join(REFUSAL_OPENINGS))
    if name == "small_model":
        parts.append(hashlib.sha256(RUBRIC_QUESTION.encode()).hexdigest())
    if name == "endpoint":
        parts.append(hashlib.sha256(RUBRIC.encode()).hexdigest())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def score_responses(records, judge: str | Judge | None = None, **judge_kwargs) -> pd.DataFrame:
    """Judge every (prompt, response): a copy of ``records`` with a bool column ``is_refusal``.

    ``records`` is a table or a list of dicts with ``prompt`` and ``response`` (the output of
    ``generation.generate_responses``); ``judge`` a name or a Judge (None: :data:`DEFAULT_JUDGE`).
    """
    table = records.copy() if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    if not isinstance(judge, Judge):
        judge = get_judge(judge, **judge_kwargs)
    need = ["prompt", "response"] if judge.needs_responses else ["prompt"]
    missing = [c for c in need if c not in table.columns]
    if missing and len(table):
        raise ParameterError(f"records lack column(s) {missing}; the {judge.name} judge needs {need}")
    if table.empty:
        return table.assign(is_refusal=pd.Series(dtype=bool))
    responses = table["response"].tolist() if "response" in table.columns else None
    flags = judge.judge(table["prompt"].tolist(), responses)
    return table.assign(is_refusal=pd.Series(flags, index=table.index, dtype=bool))
