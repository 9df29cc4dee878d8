"""SFO losses: pure tensor functions, per-sample outputs, no reduction (the caller reduces).

SFO paper Eq. 1 (flow matching), Eq. 3 and Fig. C (the DPO-style SFO objective), and the optional
positive anchors (``ANCHORS``) that keep Eq. 3 from raising the positive's error:

- ``none``: Eq. 3 as the paper writes it.
- ``dpop``: DPO-Positive (Pal et al. 2024, "Smaug"): a hinge on the positive's error rising above
  the reference's, inside the sigmoid: logit -= beta * lambda * relu(err_theta(x+) - err_ref(x+)).
- ``rpo``: an SFT term on the positive (RPO, Pang et al. 2024): loss += lambda * err_theta(x+).
- ``sdpo``: Diffusion-SDPO's safeguard (Fu et al. 2025, arXiv 2511.03317), output-space form: the
  negative's gradient is scaled per sample by ``sdpo_loser_scale`` so that, to first order, the
  step does not raise the positive's error. The forward value is Eq. 3's.
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
    anchor: str = "none",
    anchor_weight: float = 0.0,
    loser_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SFO objective per sample (SFO paper Eq. 3, Fig. C lines 21-34), optionally anchored.

        Delta_theta = err_theta(x+) - err_theta(x-)
        Delta_ref   = err_ref(x+)   - err_ref(x-)
        loss        = -log sigmoid(-beta * (Delta_theta - Delta_ref))

    Args:
        policy_err_pos, policy_err_neg: (N,) flow-matching errors of the trained model ("ref"+"sfo")
            on the positive and negative targets (same noise, same t).
        ref_err_pos, ref_err_neg: (N,) the same for the frozen reference ("ref" only).
        beta: regularisation strength (paper: 1000).
        anchor: one of ``ANCHORS`` (module docstring); ``none`` is the paper's Eq. 3.
        anchor_weight: lambda of ``dpop`` / ``rpo`` (>= 0; ignored by ``none`` / ``sdpo``).
        loser_scale: (N,) ``sdpo`` only: factors in [0, 1] from ``sdpo_loser_scale``; the negative's
            policy error keeps its value but its gradient is multiplied by them.

    Returns:
        loss: (N,) per-sample loss.
        stats: detached (N,) tensors:
            ``implicit_accuracy`` 1 where the policy improved the positive more than the negative
            relative to the reference (logit > 0), 0.5 at a tie, else 0;
            ``reward_margin`` the logit -beta * (Delta_theta - Delta_ref);
            ``policy_diff``/``ref_diff`` Delta_theta and Delta_ref;
            ``positive_rise``/``negative_rise`` err_theta - err_ref on x+ / x- (> 0: the policy is worse).
    """
    errors = (policy_err_pos, policy_err_neg, ref_err_pos, ref_err_neg)
    if any(e.ndim != 1 for e in errors) or len({e.shape for e in errors}) != 1:
        raise ValueError(f"errors: expected four (N,) tensors of one shape, got {[tuple(e.shape) for e in errors]}")
    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta} (the paper uses 1000)")
    check_anchor(anchor, anchor_weight)
    if (anchor == "sdpo") != (loser_scale is not None):
        raise ValueError("loser_scale: pass it exactly when anchor='sdpo' (from sdpo_loser_scale)")
    if loser_scale is not None:
        if loser_scale.shape != policy_err_neg.shape:
            raise ValueError(f"loser_scale: expected shape {tuple(policy_err_neg.shape)}, got {tuple(loser_scale.shape)}")
        scale = loser_scale.detach().to(policy_err_neg.dtype)
        policy_err_neg = scale * policy_err_neg + (1 - scale) * policy_err_neg.detach()  # same value, scaled gradient
    policy_diff = policy_err_pos - policy_err_neg  # (N,)
    ref_diff = ref_err_pos - ref_err_neg  # (N,)
    positive_rise = policy_err_pos - ref_err_pos  # (N,) > 0: the policy is worse than the reference on x+
    logits = -beta * (policy_diff - ref_diff)  # (N,)
    if anchor == "dpop":
        logits = logits - beta * anchor_weight * F.relu(positive_rise)
    loss = -F.logsigmoid(logits)
    if anchor == "rpo":
        loss = loss + anchor_weight * policy_err_pos
    stats = {
        "implicit_accuracy": ((logits > 0).float() + 0.5 * (logits == 0).float()).detach(),
        "reward_margin": logits.detach(),
        "policy_diff": policy_diff.detach(),
        "ref_diff": ref_diff.detach(),
        "positive_rise": positive_rise.detach(),
        "negative_rise": (policy_err_neg - ref_err_neg).detach(),
    }
    return loss, stats


ANCHORS = ("none", "dpop", "rpo", "sdpo")


def check_anchor(anchor: str, weight: float) -> None:
    """Raises ``ValueError`` naming the field for an unknown anchor or a negative weight."""
    if anchor not in ANCHORS:
        raise ValueError(f"sfo.anchor: unknown {anchor!r}; use one of {list(ANCHORS)}")
    if not weight >= 0:
        raise ValueError(f"sfo.anchor_weight: must be >= 0, got {weight}")


def sdpo_loser_scale(residual_pos: torch.Tensor, residual_neg: torch.Tensor, *, mu: float = 1.0,
                     eps: float = 1e-12) -> torch.Tensor:
    """Diffusion-SDPO's per-sample factor on the negative's gradient (output-space, first order).

    Eq. 3's gradient descends ``g+ - s * g-`` (up to the shared sigmoid factor), with g+- the
    gradients of the positive/negative errors; the positive's error then changes by
    ``-(|g+|^2 - s <g+, g->)``. With the gradients approximated in output space by the residuals
    r = f(x_t) - (epsilon - x_0) (the error's gradient w.r.t. the prediction, up to a constant), the
    largest s in [0, 1] that keeps that change <= 0 is ``min(1, mu |r+|^2 / <r+, r->)`` when the
    residuals are aligned, else 1.

    Args:
        residual_pos, residual_neg: (N, ...) policy residuals on the positive and the negative.
        mu: safety factor (<= 1 is stricter).
    Returns:
        (N,) detached factors in [0, 1].
    """
    if residual_pos.shape != residual_neg.shape:
        raise ValueError(f"residuals: shapes differ, {tuple(residual_pos.shape)} vs {tuple(residual_neg.shape)}")
    if not mu > 0:
        raise ValueError(f"sfo.anchor_weight: sdpo's mu must be > 0, got {mu}")
    rp, rn = residual_pos.detach().float().flatten(1), residual_neg.detach().float().flatten(1)
    inner = (rp * rn).sum(1)  # (N,)
    norm = rp.pow(2).sum(1)  # (N,)
    scale = torch.where(inner > eps, mu * norm / inner.clamp_min(eps), torch.ones_like(inner))
    return scale.clamp(0.0, 1.0)
