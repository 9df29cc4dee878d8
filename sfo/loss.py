"""SFO losses: pure tensor functions, per-sample outputs, no reduction (the caller reduces).

SFO paper Eq. 1 (flow matching), Eq. 3 and Fig. C (the DPO-style SFO objective).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flow_matching_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error of a velocity prediction (SFO paper Eq. 1).

    Args:
        pred: (N, ...) predicted velocity f(x_t, t, c).
        target: (N, ...) target velocity, epsilon - x_0.

    Returns:
        (N,) mean of (pred - target)^2 over all non-batch dims (float32).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred/target: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def sfo_loss(
    policy_err_pos: torch.Tensor,
    policy_err_neg: torch.Tensor,
    ref_err_pos: torch.Tensor,
    ref_err_neg: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SFO objective per sample (SFO paper Eq. 3, Fig. C lines 21-34).

        Delta_theta = err_theta(x+) - err_theta(x-)
        Delta_ref   = err_ref(x+)   - err_ref(x-)
        loss        = -log sigmoid(-beta * (Delta_theta - Delta_ref))

    Args:
        policy_err_pos, policy_err_neg: (N,) flow-matching errors of the trained model ("ref"+"sfo")
            on the positive and negative targets (same noise, same t).
        ref_err_pos, ref_err_neg: (N,) the same for the frozen reference ("ref" only).
        beta: regularisation strength (paper: 1000).

    Returns:
        loss: (N,) per-sample loss.
        stats: detached (N,) tensors:
            ``implicit_accuracy`` 1 where the policy improved the positive more than the negative
            relative to the reference (logit > 0), 0.5 at a tie, else 0;
            ``reward_margin`` the logit -beta * (Delta_theta - Delta_ref);
            ``policy_diff``/``ref_diff`` Delta_theta and Delta_ref.
    """
    errors = (policy_err_pos, policy_err_neg, ref_err_pos, ref_err_neg)
    if any(e.ndim != 1 for e in errors) or len({e.shape for e in errors}) != 1:
        raise ValueError(f"errors: expected four (N,) tensors of one shape, got {[tuple(e.shape) for e in errors]}")
    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta} (the paper uses 1000)")
    policy_diff = policy_err_pos - policy_err_neg  # (N,)
    ref_diff = ref_err_pos - ref_err_neg  # (N,)
    logits = -beta * (policy_diff - ref_diff)  # (N,)
    loss = -F.logsigmoid(logits)
    stats = {
        "implicit_accuracy": ((logits > 0).float() + 0.5 * (logits == 0).float()).detach(),
        "reward_margin": logits.detach(),
        "policy_diff": policy_diff.detach(),
        "ref_diff": ref_diff.detach(),
    }
    return loss, stats
