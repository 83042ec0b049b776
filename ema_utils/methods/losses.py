"""The training losses of the unlearning chapters: pure functions on logits, labels and log-probs.

Kept apart from data and training (as in open-unlearning) so each can be checked by hand on a
few numbers. Conventions, shared with :mod:`ema_utils.methods.trainer`:

- ``logits`` are ``(batch, seq, vocab)`` as a causal LM returns them; ``labels`` are
  ``(batch, seq)`` token ids aligned with ``input_ids`` (the Hugging Face convention), with
  ``IGNORE_INDEX`` (-100) on the prompt and on padding, so only response tokens count. The
  functions shift internally: the logits at position t predict the label at position t + 1.
- Sequence log-probabilities are *sums* over response tokens, log pi(y|x) = sum_t log
  pi(y_t | x, y_<t), as in the NPO objective; cross-entropy is a *mean* over response tokens
  (the usual SFT loss, insensitive to how long the responses are).
- Everything is computed in float32 even for a bfloat16 model: log-softmax over a 150k-token
  vocabulary in bfloat16 loses the small differences NPO and the KL term are made of.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..core.errors import ParameterError

IGNORE_INDEX = -100
"""Label value of tokens that carry no loss (prompt and padding), as in torch's cross_entropy."""


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.ndim != 3 or labels.ndim != 2 or logits.shape[:2] != labels.shape:
        raise ParameterError(f"logits must be (batch, seq, vocab) and labels (batch, seq) with the "
                             f"same batch and seq; got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return logits[:, :-1, :].float(), labels[:, 1:]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, mask)``, both ``(batch, seq - 1)``: log p(label_{t+1} | tokens <= t) and whether
    that label counts (is not IGNORE_INDEX). Masked entries of ``logp`` are 0."""
    logits, labels = _shift(logits, labels)
    mask = labels != IGNORE_INDEX
    # cross_entropy with reduction "none" is the per-token -log p, without keeping a second
    # (batch, seq, vocab) tensor of log-softmax values alive for the backward pass.
    nll = F.cross_entropy(logits.transpose(1, 2), labels.masked_fill(~mask, 0), reduction="none")
    return (-nll).masked_fill(~mask, 0.0), mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) per example, ``(batch,)``: the sum of log p(y_t | x, y_<t) over response tokens."""
    logp, _ = token_logprobs(logits, labels)
    return logp.sum(dim=1)


def response_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per response token over the batch (the SFT and retain loss).

    Averaged over all response tokens in the batch (not per example first), like Hugging Face's
    causal-LM loss, so long and short responses weigh by their tokens.
    """
    logp, mask = token_logprobs(logits, labels)
    n = mask.sum()
    if n == 0:
        raise ParameterError("no response tokens in the batch (every label is -100): the "
                             "responses are empty; drop those rows")
    return -logp.sum() / n


def npo_loss(logp_theta: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """The paper's Eq. 1: ``-(2/beta) * mean(log sigmoid(-beta * (logp_theta - logp_ref)))``.

    ``logp_theta`` and ``logp_ref`` are ``(batch,)`` sequence log-probs of the forget responses
    (:func:`sequence_logprob`) under the trained and the reference model. At theta == ref the loss
    is (2/beta) log 2; it falls towards 0 as the trained model makes the responses less likely
    than the reference does, and its gradient in logp_theta is positive (descent lowers it),
    with a weight sigmoid(beta * log-ratio) that fades once a response is unlikely enough: what
    keeps NPO from collapsing the model the way plain gradient ascent does.
    """
    if not beta > 0:
        raise ParameterError(f"beta must be positive, got {beta}")
    if logp_theta.shape != logp_ref.shape:
        raise ParameterError(f"logp_theta and logp_ref must have the same shape, got "
                             f"{tuple(logp_theta.shape)} and {tuple(logp_ref.shape)}")
    log_ratio = logp_theta.float() - logp_ref.float().detach()
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def npo_loss_at_reference(beta: float) -> float:
    """NPO's value when the trained model equals the reference: (2/beta) log 2."""
    return 2.0 / beta * math.log(2.0)


def token_kl(logits_ref: torch.Tensor, logits_theta: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of KL(P_ref || P_theta) over the vocabulary, in nats.

    ``logits_*`` are ``(batch, seq, vocab)`` (or already ``(positions, vocab)``); ``mask``
    ``(batch, seq)`` picks the positions that count (all when None). Per position:
    sum_v p_ref(v) (log p_ref(v) - log p_theta(v)), the second paper's regulariser (direction:
    reference first, so the trained model is penalised for moving mass away from what the
    aligned model would say). The reference side carries no gradient.
    """
    if logits_ref.shape != logits_theta.shape:
        raise ParameterError(f"logits_ref and logits_theta must have the same shape, got "
                             f"{tuple(logits_ref.shape)} and {tuple(logits_theta.shape)}")
    if mask is not None:
        if mask.shape != logits_ref.shape[:-1]:
            raise ParameterError(f"mask must be {tuple(logits_ref.shape[:-1])}, got {tuple(mask.shape)}")
        # Select positions before the log-softmax: a (positions, vocab) copy instead of two
        # full (batch, seq, vocab) ones.
        logits_ref, logits_theta = logits_ref[mask.bool()], logits_theta[mask.bool()]
    ref = F.log_softmax(logits_ref.detach().float(), dim=-1).reshape(-1, logits_ref.shape[-1])
    cur = F.log_softmax(logits_theta.float(), dim=-1).reshape(-1, logits_theta.shape[-1])
    if ref.shape[0] == 0:
        raise ParameterError("token_kl: no positions selected by the mask")
    return F.kl_div(cur, ref, log_target=True, reduction="sum") / ref.shape[0]


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """``(batch, seq)`` bool: the logit positions that predict a response token.

    Position t predicts label t + 1, so this is ``labels != -100`` shifted left by one.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def combine(parts: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """sum_k weights[k] * parts[k]: the augmented objectives (w1 NPO + w2 CE, w1 NPO + lambda KL,
    w2 CE_retain + w3 CE_sft). Every part must have a weight and every weight a part."""
    if set(parts) != set(weights):
        raise ParameterError(f"loss parts {sorted(parts)} and weights {sorted(weights)} differ")
    return sum(float(weights[k]) * parts[k] for k in sorted(parts))
