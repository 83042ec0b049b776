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

DEFAULT_JUDGE = "learned"
"""The judge chapters use by default: the offline judge with the highest agreement with the hand
labels. On 300 of the cpu chapters' own generations, drawn at random and labelled by two
annotators, never trained on (:data:`HELDOUT_PATH`, 2026-11-23): learned kappa 0.86 (95%
bootstrap interval 0.79-0.93), phrase 0.82 (0.74-0.89); the annotators agree at 0.98. On the 200
outputs of unlearned, steered or ablated models (20 refusals) learned 0.76, phrase 0.57 (96% and
94% judged right). Measured 2026-11-22 by 5-fold cross-validation on the 385 labelled items (5 seeds):
learned kappa 0.79 (0.77-0.81), phrase 0.73. Per kind of response the learned judge is as
accurate as the phrase judge on the openings of unlearned models (0.83 against 0.84 right; the
phrase judge was the default until then because an earlier learned judge was worse there) and
far better on harmless answers to harmful requests (about 0.55 against 0.05) and deflections
(0.86 against 0.77), which lower the phrase judge's recall for every model alike. On the cpu
chapters' own generations (2,538 responses of unlearned checkpoints) the two agree on 97%; of
the 55 distinct disagreements outside the over-refusal set, read by hand, the learned judge was
right on 22 and the phrase judge on 18 (15 unclear): the learned judge catches "As an AI
language model, I don't have the ability to ..." deflections, the phrase judge some compliant
openings the learned judge calls refusals. (Some labelled items were modelled on these very
outputs, so this check flatters the learned judge a little.) An empty response is a refusal
for both (nothing was given).
Two places keep the phrase judge on purpose: the over-refusal set (:data:`ema_utils.core.evaluate.
OVER_REFUSAL_JUDGE`, benign prompts, where the phrase judge's precision matters) and the
selection of the model's own refusals for forget and retain sets (``build_forget_set``'s
``judge="phrase"``: training data should hold only clear refusals).
:func:`validate_judges` reports both, per category too; pass ``judge="phrase"`` to a chapter to
use the other."""


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
