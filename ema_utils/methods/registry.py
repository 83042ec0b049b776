"""The training methods, one entry each (in the spirit of open-unlearning's method registry).

A method is a small loss function over one step's batches plus what the rest of the book needs
to know about it: the config field that weighs each loss part, which data sets it trains on,
its label and plot style, the plain method it is compared with, and the paper's row it matches.
Adding a method is one :func:`register` call and one loss function; the trainer, the chapters'
plans, tables and plots, and ``ema methods`` read everything else from here.

=========== ======================================================== =======================
method      loss per step                                            data
=========== ======================================================== =======================
npo         w_forget * NPO(forget)                  (the paper's Eq. 1) forget
sft         w_sft * CE(sft labels)                  (the "finetune" row) sft
npo_retain  w_forget * NPO(forget) + w_retain * CE(retain)           forget, retain
sft_retain  w_retain * CE(retain) + w_sft * CE(sft labels)           sft, retain
npo_kl      w_forget * NPO(forget) + kl_lambda * KL(P_ref || P_theta) forget, retain
=========== ======================================================== =======================

The loss terms themselves are pure functions in :mod:`ema_utils.methods.losses`; the functions here only
say which batch each term reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..core.console import emit
from ..core.errors import ParameterError

if TYPE_CHECKING:
    import torch

DATA_KINDS = ("forget", "sft", "retain")
"""The data sets a method can train on, in the order a step reads them: the model's own
refusals (forget), compliant labels from a small labeller (sft), the aligned model's own
answers on other concepts (retain)."""


@dataclass
class Step:
    """What a method's loss sees in one micro-step.

    ``batches`` holds a collated batch (input_ids, attention_mask, labels) for each data kind
    the method reads; ``ref_logp`` the reference model's sequence log-probs of the forget batch
    (computed once before training); ``reference()`` a context in which the frozen aligned
    model answers; ``logits`` / ``response_logits`` run a model on a batch. A loss writes
    diagnostics that are not optimised (e.g. the forget log-prob) into ``extra``.
    """

    model: torch.nn.Module
    config: object  # an UnlearnConfig
    batches: dict
    ref_logp: torch.Tensor | None
    reference: Callable[[], contextlib.AbstractContextManager]
    logits: Callable
    response_logits: Callable
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One training method.

    ``loss(step)`` returns the unweighted loss parts ``{part: scalar tensor}``; ``weights`` maps
    each part to the UnlearnConfig field that weighs it (the trainer sums weight * part);
    ``data`` names the data sets it trains on (from DATA_KINDS); ``base`` is the plain method an
    augmented one is compared with in chapter 4 (None for a plain method); ``paper_method`` the
    method's name in the paper's tables (None when the paper has no such row); ``style`` the
    marker and colour of its points in the chapters' figures.
    """

    name: str
    label: str
    loss: Callable[[Step], dict]
    weights: Mapping[str, str]
    data: tuple[str, ...]
    description: str
    base: str | None = None
    paper_method: str | None = None
    style: tuple[str, str] = ("D", "#8172B3")

    @property
    def family(self) -> str:
        """The plain method whose forget data this one uses ("npo" for npo_kl)."""
        return self.base or self.name

    @property
    def uses_retain(self) -> bool:
        return "retain" in self.data

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "weights": dict(self.weights),
                "data": list(self.data), "base": self.base, "paper_method": self.paper_method,
                "marker": self.style[0], "color": self.style[1], "description": self.description}


METHODS: dict[str, Method] = {}
"""Every registered method by name, in registration order."""


def register(method: Method) -> Method:
    """Add ``method`` to the registry (checked: known data kinds, a weight per part, a known
    base). Re-registering a name replaces the entry."""
    unknown = [d for d in method.data if d not in DATA_KINDS]
    if unknown or not method.data:
        raise ParameterError(f"method {method.name!r}: data must be a non-empty subset of "
                             f"{', '.join(DATA_KINDS)}; got {list(method.data)}")
    if not method.weights:
        raise ParameterError(f"method {method.name!r}: weights must map each loss part to the "
                             "UnlearnConfig field that weighs it, e.g. {'npo': 'w_forget'}")
    if method.base is not None and method.base not in METHODS:
        raise ParameterError(f"method {method.name!r}: base {method.base!r} is not registered; "
                             f"methods: {', '.join(METHODS)}")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests that register toy methods clean up with this)."""
    METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """The registered method ``name``, or a ParameterError that lists the known ones."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ParameterError(f"unknown method {name!r}; methods: {', '.join(METHODS)} "
                             "(`ema methods` describes each)") from None


def plain_methods() -> tuple[str, ...]:
    """The methods chapter 2 trains on their own (no base): npo and sft."""
    return tuple(name for name, m in METHODS.items() if m.base is None)


def augmented_methods() -> tuple[str, ...]:
    """The methods chapter 4 compares with a plain one (npo_retain, sft_retain, npo_kl)."""
    return tuple(name for name, m in METHODS.items() if m.base is not None)


def method_label(name: str) -> str:
    """The method's label for tables and figures ("NPO + KL"); an unknown name as it is."""
    return METHODS[name].label if name in METHODS else name


def method_style(name: str) -> tuple[str, str]:
    """(marker, colour) of the method's points in figures; a neutral style when unknown."""
    return METHODS[name].style if name in METHODS else Method.style


# --- the loss terms: which batch each reads -----------------------------------------------------

def npo_term(step: Step) -> torch.Tensor:
    """NPO on the forget batch against the reference log-probs; records the forget log-prob."""
    # deferred: losses imports torch; the registry is read by `ema --help` and parameter checks
    from . import losses as L

    logp = L.sequence_logprob(*step.response_logits(step.model, step.batches["forget"]))
    step.extra["forget_logp"] = logp.detach().mean()
    return L.npo_loss(logp, step.ref_logp.to(logp), step.config.beta)


def cross_entropy_term(step: Step, kind: str) -> torch.Tensor:
    """Token-mean cross-entropy of the responses of the ``kind`` batch (sft or retain)."""
    # deferred: losses imports torch; the registry is read by `ema --help` and parameter checks
    from . import losses as L

    return L.response_cross_entropy(*step.response_logits(step.model, step.batches[kind]))


def kl_term(step: Step) -> torch.Tensor:
    """KL(P_ref || P_theta) on the retain batch, over response tokens or every position."""
    # deferred: losses imports torch; the registry is read by `ema --help` and parameter checks
    from . import losses as L

    batch = step.batches["retain"]
    # Full-width logits: the KL's mask may cover every position (kl_positions "all").
    logits = step.logits(step.model, batch)
    with step.reference() as ref:
        ref_logits = step.logits(ref, batch)
    mask = (L.response_positions(batch["labels"]) if step.config.kl_positions == "response"
            else batch["attention_mask"].bool())
    return L.token_kl(ref_logits, logits, mask)


# --- the methods --------------------------------------------------------------------------------
# Each loss computes its terms in the order forget, sft, retain (the order of DATA_KINDS), so a
# method's forward passes run in one fixed order.

def npo_loss(step: Step) -> dict:
    return {"npo": npo_term(step)}


def sft_loss(step: Step) -> dict:
    return {"sft_ce": cross_entropy_term(step, "sft")}


def npo_retain_loss(step: Step) -> dict:
    return {"npo": npo_term(step), "retain_ce": cross_entropy_term(step, "retain")}


def sft_retain_loss(step: Step) -> dict:
    return {"sft_ce": cross_entropy_term(step, "sft"), "retain_ce": cross_entropy_term(step, "retain")}


def npo_kl_loss(step: Step) -> dict:
    return {"npo": npo_term(step), "kl": kl_term(step)}


register(Method(
    "npo", "NPO", npo_loss, {"npo": "w_forget"}, ("forget",),
    "negative preference optimisation on the model's own refusals (the paper's unlearning)",
    paper_method="unlearn_npo", style=("X", "#1f3b66")))
register(Method(
    "sft", "SFT", sft_loss, {"sft_ce": "w_sft"}, ("sft",),
    "fine-tuning on compliant answers from a small labeller (the paper's finetune baseline)",
    paper_method="finetune_sft", style=("X", "#8c4a1c")))
register(Method(
    "npo_retain", "NPO + retain CE", npo_retain_loss, {"npo": "w_forget", "retain_ce": "w_retain"},
    ("forget", "retain"),
    "NPO plus cross-entropy on the aligned model's answers to other concepts (the paper's containment)",
    base="npo", paper_method="augmented_unlearn_npo", style=("o", "#4C72B0")))
register(Method(
    "sft_retain", "SFT + retain CE", sft_retain_loss, {"retain_ce": "w_retain", "sft_ce": "w_sft"},
    ("sft", "retain"),
    "SFT plus cross-entropy on the retain set (the paper's augmented finetune)",
    base="sft", paper_method="augmented_finetune_sft", style=("s", "#DD8452")))
register(Method(
    "npo_kl", "NPO + KL", npo_kl_loss, {"npo": "w_forget", "kl": "kl_lambda"}, ("forget", "retain"),
    "NPO plus a KL penalty to the aligned model on the retain prompts (the second paper's narrow solution)",
    base="npo", style=("^", "#55A868")))


# --- ema methods --------------------------------------------------------------------------------

def cmd_methods(args) -> int:
    rows = [m.to_dict() for m in METHODS.values()]

    def table(payload):
        lines = [f"{'method':11} {'label':16} {'loss parts (weight field)':38} {'data':14} "
                 f"{'compared with':13} paper row"]
        for r in payload["methods"]:
            parts = ", ".join(f"{p} ({w})" for p, w in r["weights"].items())
            lines.append(f"{r['name']:11} {r['label']:16} {parts:38} {'+'.join(r['data']):14} "
                         f"{r['base'] or '-':13} {r['paper_method'] or '-'}")
        return "\n".join(lines)

    emit(args, {"methods": rows}, table)
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("methods", help="the training methods: loss parts, data, labels, paper rows")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_methods)
