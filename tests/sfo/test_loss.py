import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from sfo.loss import flow_matching_error, sdpo_loser_scale, sfo_loss


def test_flow_matching_error_is_per_sample_mean_square():
    """pred - target = [[1, -1, 2, 0], [3, 3, 3, 3]] -> means of squares [6/4, 9]."""
    target = torch.zeros(2, 2, 2)
    pred = torch.tensor([[[1.0, -1.0], [2.0, 0.0]], [[3.0, 3.0], [3.0, 3.0]]])
    assert_close(flow_matching_error(pred, target), torch.tensor([1.5, 9.0]))


def test_flow_matching_error_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="pred/target"):
        flow_matching_error(torch.zeros(2, 3), torch.zeros(2, 4))


def test_sfo_loss_hand_worked():
    """policy (pos, neg) = (0.10, 0.30), ref = (0.20, 0.25), beta = 10:
    Delta_theta = -0.20, Delta_ref = -0.05, logit = -10 * (-0.15) = 1.5, loss = -log sigmoid(1.5)."""
    loss, stats = sfo_loss(torch.tensor([0.10]), torch.tensor([0.30]), torch.tensor([0.20]), torch.tensor([0.25]), beta=10.0)
    assert_close(loss, torch.tensor([-math.log(1 / (1 + math.exp(-1.5)))]))
    assert_close(stats["reward_margin"], torch.tensor([1.5]))
    assert_close(stats["implicit_accuracy"], torch.tensor([1.0]))


def test_sfo_loss_matches_paper_figure_c():
    """Fig. C computes the loss from errors chunked out of one concatenated (pos, neg) batch."""
    g = torch.Generator().manual_seed(0)
    n, beta = 5, 1000.0
    model_loss = torch.rand(2 * n, generator=g) * 1e-2
    ref_loss = torch.rand(2 * n, generator=g) * 1e-2
    model_pos, model_neg = model_loss.chunk(2)
    ref_pos, ref_neg = ref_loss.chunk(2)
    expected = -F.logsigmoid(-beta * ((model_pos - model_neg) - (ref_pos - ref_neg)))
    loss, _ = sfo_loss(model_pos, model_neg, ref_pos, ref_neg, beta=beta)
    assert loss.shape == (n,)
    assert_close(loss, expected)


def test_sfo_loss_is_log2_when_policy_equals_reference():
    errs = torch.tensor([0.3, 0.1, 0.7])
    loss, stats = sfo_loss(errs, errs.flip(0), errs, errs.flip(0), beta=1000.0)
    assert_close(loss, torch.full((3,), math.log(2.0)))
    assert_close(stats["implicit_accuracy"], torch.full((3,), 0.5))


def test_sfo_loss_gradient_pushes_positive_error_down_and_negative_up():
    pos = torch.tensor([0.2], requires_grad=True)
    neg = torch.tensor([0.2], requires_grad=True)
    loss, _ = sfo_loss(pos, neg, torch.tensor([0.2]), torch.tensor([0.2]), beta=100.0)
    loss.sum().backward()
    assert pos.grad.item() > 0  # descending lowers the positive's error
    assert neg.grad.item() < 0  # and raises the negative's


def test_sfo_loss_does_not_reduce():
    loss, stats = sfo_loss(*(torch.rand(7) for _ in range(4)), beta=1.0)
    assert loss.shape == (7,) and all(v.shape == (7,) for v in stats.values())


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_sfo_loss_rejects_non_positive_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        sfo_loss(*(torch.rand(2) for _ in range(4)), beta=beta)


def test_sfo_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="errors"):
        sfo_loss(torch.rand(2), torch.rand(3), torch.rand(2), torch.rand(2), beta=1.0)


# Positive anchors. Shared numbers: policy (pos, neg) = (0.30, 0.40), ref = (0.20, 0.25), beta = 10:
# Delta_theta = -0.10, Delta_ref = -0.05, Eq. 3 logit = -10 * (-0.05) = 0.5; the positive rose by 0.10.
ANCHOR_ERRORS = tuple(torch.tensor([v]) for v in (0.30, 0.40, 0.20, 0.25))


def test_dpop_hand_worked():
    """dpop, lambda 2: logit = 0.5 - 10 * 2 * relu(0.30 - 0.20) = -1.5, loss = log(1 + e^1.5)."""
    loss, stats = sfo_loss(*ANCHOR_ERRORS, beta=10.0, anchor="dpop", anchor_weight=2.0)
    assert_close(loss, torch.tensor([math.log(1 + math.exp(1.5))]))
    assert_close(stats["reward_margin"], torch.tensor([-1.5]))
    assert_close(stats["positive_rise"], torch.tensor([0.10]))
    assert_close(stats["negative_rise"], torch.tensor([0.15]))  # 0.40 - 0.25


def test_dpop_is_eq3_when_the_positive_did_not_rise():
    """policy pos 0.15 < ref pos 0.20: the hinge is 0, so dpop's loss is Eq. 3's."""
    errors = (torch.tensor([0.15]), torch.tensor([0.40]), torch.tensor([0.20]), torch.tensor([0.25]))
    plain, _ = sfo_loss(*errors, beta=10.0)
    anchored, _ = sfo_loss(*errors, beta=10.0, anchor="dpop", anchor_weight=5.0)
    assert_close(anchored, plain)


def test_rpo_hand_worked():
    """rpo, lambda 2: loss = -log sigmoid(0.5) + 2 * 0.30 = log(1 + e^-0.5) + 0.6."""
    loss, _ = sfo_loss(*ANCHOR_ERRORS, beta=10.0, anchor="rpo", anchor_weight=2.0)
    assert_close(loss, torch.tensor([math.log(1 + math.exp(-0.5)) + 0.6]))


def test_sdpo_loser_scale_hand_worked():
    """r+ = (1, 0): r- = (2, 0) -> <r+, r-> = 2, |r+|^2 = 1, scale 1/2; r- = (-1, 0) (opposed) -> 1;
    r- = (0.5, 0) -> 1 / 0.5 = 2, clamped to 1; mu 0.5 with r- = (2, 0) -> 1/4."""
    pos = torch.tensor([[1.0, 0.0]] * 3)
    neg = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.5, 0.0]])
    assert_close(sdpo_loser_scale(pos, neg), torch.tensor([0.5, 1.0, 1.0]))
    assert_close(sdpo_loser_scale(pos[:1], neg[:1], mu=0.5), torch.tensor([0.25]))


def test_sdpo_keeps_eq3_value_and_scales_only_the_negative_gradient():
    pos, neg = torch.tensor([0.30], requires_grad=True), torch.tensor([0.40], requires_grad=True)
    plain_pos, plain_neg = torch.tensor([0.30], requires_grad=True), torch.tensor([0.40], requires_grad=True)
    loss, stats = sfo_loss(pos, neg, *ANCHOR_ERRORS[2:], beta=10.0, anchor="sdpo", loser_scale=torch.tensor([0.25]))
    plain, _ = sfo_loss(plain_pos, plain_neg, *ANCHOR_ERRORS[2:], beta=10.0)
    assert_close(loss, plain)
    loss.sum().backward()
    plain.sum().backward()
    assert_close(pos.grad, plain_pos.grad)
    assert_close(neg.grad, 0.25 * plain_neg.grad)


def test_sdpo_step_does_not_raise_the_positive_error_to_first_order():
    """A linear 'model' f(x) = W x with aligned residuals: Eq. 3's step raises the positive's error,
    the safeguarded step does not."""
    x_pos, x_neg, v_pos, v_neg = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.2]), torch.tensor([0.0, 0.0]), torch.tensor([-3.0, 0.0])

    def step(anchor: str) -> float:
        w = torch.eye(2, requires_grad=True)
        pred_pos, pred_neg = w @ x_pos, w @ x_neg
        err = lambda p, v: (p - v).pow(2).mean().view(1)
        pol_pos, pol_neg = err(pred_pos, v_pos), err(pred_neg, v_neg)
        ref = (pol_pos.detach(), pol_neg.detach())
        scale = sdpo_loser_scale((pred_pos - v_pos)[None], (pred_neg - v_neg)[None]) if anchor == "sdpo" else None
        loss, _ = sfo_loss(pol_pos, pol_neg, *ref, beta=1.0, anchor=anchor, loser_scale=scale)
        loss.sum().backward()
        with torch.no_grad():
            w2 = w - 1e-3 * w.grad
            return (err(w2 @ x_pos, v_pos) - pol_pos).item()

    assert step("none") > 0  # the plain step makes the positive worse here
    assert step("sdpo") <= 1e-9


@pytest.mark.parametrize("anchor, weight, message", [("hinge", 0.0, "sfo.anchor"), ("dpop", -1.0, "sfo.anchor_weight")])
def test_anchor_validation_names_the_field(anchor, weight, message):
    with pytest.raises(ValueError, match=message):
        sfo_loss(*ANCHOR_ERRORS, beta=1.0, anchor=anchor, anchor_weight=weight)


def test_sdpo_needs_its_scale():
    with pytest.raises(ValueError, match="loser_scale"):
        sfo_loss(*ANCHOR_ERRORS, beta=1.0, anchor="sdpo")
