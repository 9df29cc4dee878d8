import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from sfo.loss import flow_matching_error, sfo_loss


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
