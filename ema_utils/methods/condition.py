"""A condition: one model the book scores, as a typed value.

"aligned" is the model as shipped; every other condition is a training run: a method from the
registry on a target concept, with the forget:retain ratio and KL lambda of the augmented
methods, and optionally a retain weight and a training seed. The value names itself
(``Condition("npo_retain", "safety", retain_ratio=2).name == "npo_retain_1to2_safety"``), and
that name is what files, caches and tables show; code passes the value around and reads its
fields instead of taking names apart.
"""

from __future__ import annotations

import math

from .. import CONCEPTS
from ..core.errors import ParameterError
from .registry import METHODS, get_method, method_label, method_style

ALIGNED = "aligned"


def parse_ratio(ratio) -> float:
    """Retain examples per forget example: 2, 2.0 or "1:2" -> 2.0 (the CLI's --retain-ratio)."""
    value = ratio
    if isinstance(ratio, str):
        parts = ratio.split(":")
        try:
            value = float(parts[1]) / float(parts[0]) if len(parts) == 2 else float(parts[0])
        except (ValueError, ZeroDivisionError):
            value = None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 \
            or not math.isfinite(value):
        raise ParameterError(f"ratio must be a positive number or 'forget:retain' such as '1:2'; "
                             f"got {ratio!r}")
    return float(value)


FIELDS = ("method", "concept", "retain_ratio", "kl_lambda", "retain_weight", "train_seed")


class Condition(str):
    """``method`` "aligned" or a registered method; ``concept`` the target concept (None for the
    aligned model); ``retain_ratio`` retain examples per forget example (forget:retain =
    1:ratio); ``kl_lambda`` the KL weight of npo_kl; ``retain_weight`` the retain loss weight
    when it is not the default 1; ``train_seed`` the training seed when runs differ by it.

    The value *is* its name (a ``str``): dictionaries keyed by conditions, JSON files and table
    indexes hold the name and compare equal to it, while code reads the fields. Immutable.
    """

    def __new__(cls, method: str, concept: str | None = None, retain_ratio=None,
                kl_lambda=None, retain_weight=None, train_seed=None):
        fields = _checked(method, concept, retain_ratio, kl_lambda, retain_weight, train_seed)
        self = super().__new__(cls, _name(**fields))
        for key, value in fields.items():
            object.__setattr__(self, key, value)
        return self

    def __setattr__(self, key, value):
        raise AttributeError(f"a Condition is immutable; use .replace({key}=...)")

    def __reduce__(self):
        return (Condition, tuple(getattr(self, f) for f in FIELDS))

    def __repr__(self) -> str:
        given = ", ".join(f"{f}={getattr(self, f)!r}" for f in FIELDS[1:] if getattr(self, f) is not None)
        return f"Condition({self.method!r}{', ' + given if given else ''})"

    @property
    def name(self) -> str:
        """The condition's name in files and tables, as a plain str: "npo_safety",
        "npo_retain_1to2_safety", "npo_kl_1to1_lambda10_safety"; a non-default retain weight adds
        "_w0.5" and a training seed "_seed1" before the concept."""
        return str.__str__(self)

    def __str__(self) -> str:
        return self.name

    @property
    def is_aligned(self) -> bool:
        return self.method == ALIGNED

    @property
    def is_augmented(self) -> bool:
        return not self.is_aligned and METHODS[self.method].base is not None

    @property
    def base(self) -> "Condition":
        """The plain run an augmented condition is compared with: npo_retain_1to2_safety ->
        npo_safety (the same training seed)."""
        if not self.is_augmented:
            raise ParameterError(f"'{self.name}' is not an augmented condition (methods: "
                                 f"{', '.join(m for m in METHODS if METHODS[m].base)}; "
                                 "e.g. npo_retain_1to2_safety)")
        return Condition(METHODS[self.method].base, self.concept, train_seed=self.train_seed)

    @property
    def label(self) -> str:
        """A short label for figures: "NPO + retain CE 1:2", "NPO + retain CE 1:1 w2=10",
        "NPO + KL \u03bb=10", "NPO", "NPO (seed 1)"."""
        text = "aligned model" if self.is_aligned else method_label(self.method)
        if self.kl_lambda is not None:
            text += f" \u03bb={self.kl_lambda:g}"
        elif self.retain_ratio is not None:
            text += f" 1:{self.retain_ratio:g}"
        if self.retain_weight is not None:
            text += f" w2={self.retain_weight:g}"
        if self.train_seed is not None:
            text += f" (seed {self.train_seed})"
        return text

    @property
    def style(self) -> tuple[str, str]:
        """(marker, colour) of the method in figures."""
        return method_style(self.method)

    def replace(self, **changes) -> "Condition":
        return Condition(**{**{f: getattr(self, f) for f in FIELDS}, **changes})

    def to_dict(self) -> dict:
        """The fields and the name, JSON-able (chapters' summaries store this)."""
        return {"name": self.name, **{f: getattr(self, f) for f in FIELDS}}

    @classmethod
    def from_name(cls, name: str) -> "Condition":
        """The condition a stored name stands for (results read back from a chapter's files):
        the inverse of :attr:`name`, driven by the registry's method names."""
        if name == ALIGNED:
            return cls(ALIGNED)
        concept = next((c for c in sorted(CONCEPTS, key=len, reverse=True)
                        if name.endswith("_" + c)), None)
        rest = name[: -len(concept) - 1] if concept else name
        method = next((m for m in sorted(METHODS, key=len, reverse=True)
                       if rest == m or rest.startswith(m + "_")), None)
        if concept is None or method is None:
            raise ParameterError(f"'{name}' names no condition: expected <method>[_1to<ratio>]"
                                 f"[_w<weight>][_lambda<lambda>][_seed<n>]_<concept> with a method "
                                 f"from {', '.join(METHODS)} and a concept from {', '.join(CONCEPTS)}")
        fields = {}
        prefixes = (("1to", "retain_ratio", float), ("w", "retain_weight", float),
                    ("lambda", "kl_lambda", float), ("seed", "train_seed", int))
        for token in filter(None, rest[len(method):].split("_")):
            for prefix, field_name, kind in prefixes:
                if token.startswith(prefix) and field_name not in fields:
                    try:
                        fields[field_name] = kind(token[len(prefix):])
                        break
                    except ValueError:
                        pass
            else:
                raise ParameterError(f"'{name}': cannot read '{token}' (expected 1to<ratio>, "
                                     "w<weight>, lambda<lambda> or seed<n>)")
        return cls(method, concept, **fields)

    @classmethod
    def from_dict(cls, d: dict) -> "Condition":
        """Back from :meth:`to_dict` (the name is ignored: the fields decide)."""
        return cls(**{k: d.get(k) for k in FIELDS})



def _checked(method, concept, retain_ratio, kl_lambda, retain_weight, train_seed) -> dict:
    """The fields, checked and normalised (ratios and weights as floats)."""
    if method == ALIGNED:
        if any(v is not None for v in (concept, retain_ratio, kl_lambda, retain_weight, train_seed)):
            raise ParameterError("the aligned condition takes no concept, ratio, lambda, weight or seed")
        return dict(method=ALIGNED, concept=None, retain_ratio=None, kl_lambda=None,
                    retain_weight=None, train_seed=None)
    get_method(method)
    if concept not in CONCEPTS:
        raise ParameterError(f"Condition.concept must be one of {', '.join(CONCEPTS)}; got {concept!r}")
    if retain_ratio is not None:
        retain_ratio = parse_ratio(retain_ratio)
    numbers = {"kl_lambda": kl_lambda, "retain_weight": retain_weight}
    for key, value in numbers.items():
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ParameterError(f"Condition.{key} must be a number >= 0; got {value!r}")
            numbers[key] = float(value)
    if train_seed is not None and (isinstance(train_seed, bool) or not isinstance(train_seed, int)
                                   or train_seed < 0):
        raise ParameterError(f"Condition.train_seed must be an integer >= 0; got {train_seed!r}")
    return dict(method=method, concept=concept, retain_ratio=retain_ratio, train_seed=train_seed,
                **numbers)


def _name(method, concept, retain_ratio, kl_lambda, retain_weight, train_seed) -> str:
    if method == ALIGNED:
        return ALIGNED
    name = method
    if retain_ratio is not None:
        name += f"_1to{retain_ratio:g}"
    if retain_weight is not None:
        name += f"_w{retain_weight:g}"
    if kl_lambda is not None:
        name += f"_lambda{kl_lambda:g}"
    if train_seed is not None:
        name += f"_seed{train_seed}"
    return f"{name}_{concept}"


def try_condition(value) -> Condition | None:
    """The Condition a value stands for, or None for a name that is no condition (an evaluation
    may be labelled with any name, e.g. an external model's)."""
    if isinstance(value, Condition):
        return value
    try:
        return Condition.from_name(str(value))
    except ParameterError:
        return None


def concept_of(value) -> str | None:
    """The concept a condition was trained on; None for the aligned model or a name that is no
    condition."""
    condition = try_condition(value)
    return None if condition is None else condition.concept


def as_condition(value) -> Condition:
    """A Condition from a Condition or a stored name (a chapter's files hold names)."""
    return value if isinstance(value, Condition) else Condition.from_name(str(value))

def aligned() -> Condition:
    return Condition(ALIGNED)


def condition_label(name: str) -> str:
    """The figure label of a stored condition name ("NPO + retain CE 1:2"); a name that is no
    condition is shown as it is."""
    condition = try_condition(name)
    return name if condition is None else condition.label
