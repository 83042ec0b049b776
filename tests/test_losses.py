"""ema_utils.methods.losses against hand computations on tiny tensors."""

import math

import pytest
import torch

from ema_utils import losses as L
from ema_utils.core.errors import ParameterError


def _log_softmax(row):
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


# One sequence of 4 tokens over a 3-token vocabulary: a 1-token prompt, a 2-token response, one
# pad. Labels are aligned with input_ids; logits at position t predict the label at t + 1.
LOGITS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0], [5.0, 0.0, 0.0]]
LABELS = [-100, 1, 2, -100]  # prompt, response y1=1, response y2=2, pad


def _tensors():
    return torch.tensor([LOGITS]), torch.tensor([LABELS])


def test_sequence_logprob_sums_response_tokens_only():
    logits, labels = _tensors()
    # y1 = 1 is predicted at position 0, y2 = 2 at position 1; positions 2 and 3 carry no label.
    expected = _log_softmax(LOGITS[0])[1] + _log_softmax(LOGITS[1])[2]
    assert L.sequence_logprob(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_response_cross_entropy_is_mean_nll_over_response_tokens():
    logits, labels = _tensors()
    expected = -(_log_softmax(LOGITS[0])[1] + _log_softmax(LOGITS[1])[2]) / 2
    assert L.response_cross_entropy(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_cross_entropy_averages_over_tokens_of_the_whole_batch():
    # Two sequences with 2 and 1 response tokens: the mean is over the 3 tokens, not per row.
    logits = torch.tensor([LOGITS, LOGITS])
    labels = torch.tensor([LABELS, [-100, 0, -100, -100]])
    nll = [-_log_softmax(LOGITS[0])[1], -_log_softmax(LOGITS[1])[2], -_log_softmax(LOGITS[0])[0]]
    assert L.response_cross_entropy(logits, labels).item() == pytest.approx(sum(nll) / 3, abs=1e-6)


def test_cross_entropy_without_response_tokens_raises():
    logits, _ = _tensors()
    with pytest.raises(ParameterError, match="no response tokens"):
        L.response_cross_entropy(logits, torch.full((1, 4), -100))


def test_npo_matches_a_hand_computation():
    theta = torch.tensor([-2.0, -3.0])
    ref = torch.tensor([-2.5, -2.0])
    beta = 0.5
    # log sigmoid(x) = -log(1 + exp(-x)); x_i = -beta * (theta_i - ref_i)
    terms = [-math.log1p(math.exp(beta * (t - r))) for t, r in zip([-2.0, -3.0], [-2.5, -2.0])]
    expected = -(2 / beta) * sum(terms) / 2
    assert L.npo_loss(theta, ref, beta).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_npo_at_the_reference_is_2_over_beta_log_2(beta):
    logp = torch.tensor([-7.0, -1.5, -30.0])
    assert L.npo_loss(logp, logp.clone(), beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    assert L.npo_loss_at_reference(beta) == pytest.approx(2 / beta * math.log(2))


def test_npo_gradient_pushes_the_forget_likelihood_down():
    theta = torch.tensor([-2.0, -3.0], requires_grad=True)
    L.npo_loss(theta, torch.tensor([-2.5, -2.0]), beta=0.1).backward()
    # Gradient descent moves log pi_theta(y|x) along -grad: every grad > 0 means it decreases.
    assert (theta.grad > 0).all()
    # Analytically d/dlogp = (2/n) * sigmoid(beta * (logp - ref)): the NPO weight.
    expected = [2 / 2 * torch.sigmoid(torch.tensor(0.1 * d)).item() for d in (0.5, -1.0)]
    assert theta.grad.tolist() == pytest.approx(expected, rel=1e-5)


def test_npo_loss_decreases_as_the_response_becomes_unlikely():
    ref = torch.tensor([-5.0])
    values = [L.npo_loss(torch.tensor([lp]), ref, 0.1).item() for lp in (-5.0, -10.0, -50.0)]
    assert values[0] > values[1] > values[2] > 0


def test_npo_rejects_a_bad_beta():
    with pytest.raises(ParameterError, match="beta"):
        L.npo_loss(torch.zeros(1), torch.zeros(1), beta=0)


def test_token_kl_matches_a_hand_computation():
    ref = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]])
    cur = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])

    def kl(a, b):
        pa = [math.exp(v) for v in _log_softmax(a)]
        return sum(p * (la - lb) for p, la, lb in zip(pa, _log_softmax(a), _log_softmax(b)))

    both = (kl(ref[0, 0].tolist(), cur[0, 0].tolist()) + kl(ref[0, 1].tolist(), cur[0, 1].tolist())) / 2
    assert L.token_kl(ref, cur).item() == pytest.approx(both, rel=1e-6)
    first = kl(ref[0, 0].tolist(), cur[0, 0].tolist())
    mask = torch.tensor([[True, False]])
    assert L.token_kl(ref, cur, mask).item() == pytest.approx(first, rel=1e-6)


def test_token_kl_is_zero_at_the_reference_and_only_theta_gets_gradient():
    ref = torch.randn(2, 3, 5)
    cur = ref.clone().requires_grad_(True)
    value = L.token_kl(ref, cur)
    assert value.item() == pytest.approx(0.0, abs=1e-7)
    (L.token_kl(ref, cur + 0.3 * torch.randn(2, 3, 5))).backward()
    assert cur.grad is not None and cur.grad.abs().sum() > 0


def test_response_positions_are_labels_shifted_left():
    labels = torch.tensor([[-100, -100, 7, 8, -100]])
    assert L.response_positions(labels).tolist() == [[False, True, True, False, False]]


def test_combined_loss_is_the_weighted_sum():
    # The augmented objective w1 * NPO + w2 * CE on hand-made tensors.
    logits, labels = _tensors()
    npo = L.npo_loss(torch.tensor([-2.0]), torch.tensor([-2.5]), 0.1)
    ce = L.response_cross_entropy(logits, labels)
    total = L.combine({"npo": npo, "retain_ce": ce}, {"npo": 0.7, "retain_ce": 2.0})
    assert total.item() == pytest.approx(0.7 * npo.item() + 2.0 * ce.item(), rel=1e-6)
    with pytest.raises(ParameterError, match="differ"):
        L.combine({"npo": npo}, {"npo": 1.0, "kl": 1.0})


def test_shape_mismatch_is_explained():
    with pytest.raises(ParameterError, match="logits must be"):
        L.sequence_logprob(torch.zeros(1, 4, 3), torch.zeros(1, 5, dtype=torch.long))
