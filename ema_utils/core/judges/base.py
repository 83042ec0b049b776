"""The interface every refusal judge shares: ``judge(prompts, responses) -> list[bool]``.

True means refusal. A judge that reads responses checks them with :meth:`Judge._check`
(one response per prompt; None or NaN counts as an empty response).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ParameterError


class Judge:
    """Base class: ``judge(prompts, responses)`` returns one bool per item, True = refusal."""

    name = "judge"
    needs_responses = True

    def judge(self, prompts: Sequence[str], responses: Sequence[str] | None = None) -> list[bool]:
        raise NotImplementedError

    def __call__(self, prompts, responses=None) -> list[bool]:
        return self.judge(prompts, responses)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    @staticmethod
    def _check(prompts, responses) -> tuple[list[str], list[str]]:
        prompts = [str(p) for p in prompts]
        if responses is None:
            raise ParameterError("this judge reads responses: pass responses (one per prompt)")
        responses = ["" if r is None or (isinstance(r, float) and r != r) else str(r)
                     for r in responses]  # None / NaN: no response
        if len(prompts) != len(responses):
            raise ParameterError(
                f"got {len(prompts)} prompts but {len(responses)} responses; pass one response per prompt"
            )
        return prompts, responses
