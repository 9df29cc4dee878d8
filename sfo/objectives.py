"""Training objectives on the FLUX transformer: SFT (paper Eq. 1) and SFO (Eq. 3, Fig. C).

These run the model passes; the math on their outputs is ``sfo.loss``. Ray Train loops call them
and only shard, reduce, step and report.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass

import torch

from PIL import Image

from sfo.adapters import REF, SFO, use_adapters
from sfo.latents import condition_ids, encode_images, grid_ids
from sfo.models import FluxModel
from sfo.loss import check_anchor, flow_matching_error, sdpo_loser_scale, sfo_loss
from sfo.text import TextEmbeddings, encode_prompts
from sfo.transformer import Condition, encode_condition, flux_forward

TRAIN_GUIDANCE = 1.0  # OminiControl trains FLUX.1-dev's guidance embedding input at 1.0


@dataclass
class TrainBatch:
    """One batch of N samples in the transformer's token space.

    Attributes:
        target: (N, L, 64) clean packed latents of the (positive) target x_tgt.
        text: prompt embeddings of the target text c_text.
        condition: reference-image tokens c_img; None for plain text-to-image (pretraining, App. A).
        img_ids: (L, 3) target position ids.
        negative: (N, L, 64) clean packed latents of the negative target x_tgt^-, for SFO.
    """

    target: torch.Tensor
    text: TextEmbeddings
    condition: Condition | None
    img_ids: torch.Tensor
    negative: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.target.shape[0]


def encode_batch(
    model: FluxModel,
    references: list[Image.Image],
    prompts: list[str],
    targets: list[Image.Image],
    negatives: list[Image.Image] | None = None,
) -> TrainBatch:
    """Encodes triplets (and negatives) with the frozen VAE and text encoders into a ``TrainBatch``."""
    cell = model.pixel_multiple
    target_w, target_h = targets[0].size
    ref_w, ref_h = references[0].size
    return TrainBatch(
        target=encode_images(model, targets),
        text=encode_prompts(model, prompts),
        condition=Condition(encode_images(model, references), condition_ids(ref_h // cell, ref_w // cell).to(model.device)),
        img_ids=grid_ids(target_h // cell, target_w // cell).to(model.device),
        negative=encode_images(model, negatives) if negatives is not None else None,
    )


def batch_from_cache(
    target: torch.Tensor,
    reference: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    *,
    grid: tuple[int, int],
    device: torch.device | str,
    dtype: torch.dtype,
    negative: torch.Tensor | None = None,
) -> TrainBatch:
    """A ``TrainBatch`` from cached encoder outputs (``sfo.records.CACHE_FIELDS``), equal to ``encode_batch``'s.

    Args:
        target, reference: (N, L, 64) packed latents of target and reference, both on one token grid.
        prompt_embeds: (N, Lt, D) T5 embeddings; pooled: (N, P) CLIP pooled embeddings.
        grid: (height, width) of the token grid in tokens (pixels / ``model.pixel_multiple``).
        device, dtype: where and in which precision the batch goes (the model's).
        negative: (N, L, 64) latents of the negative targets, already encoded, for SFO.
    """
    h, w = grid
    if target.shape[1] != h * w or reference.shape[1] != h * w:
        raise ValueError(f"cache: {target.shape[1]} target / {reference.shape[1]} reference tokens do not fill a "
                         f"{h}x{w} grid")
    to = dict(device=device, dtype=dtype)
    # FLUX's text ids are all zero (FluxPipeline.encode_prompt), so they are not cached.
    text = TextEmbeddings(prompt_embeds.to(**to), pooled.to(**to), torch.zeros(prompt_embeds.shape[1], 3, **to))
    return TrainBatch(
        target=target.to(**to),
        text=text,
        condition=Condition(reference.to(**to), condition_ids(h, w).to(device)),
        img_ids=grid_ids(h, w).to(device),
        negative=negative.to(**to) if negative is not None else None,
    )


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x_0 + t * epsilon (paper Eq. 1), t (N,) broadcast over tokens."""
    t = t.to(x0.dtype).view(-1, 1, 1)
    return (1 - t) * x0 + t * noise


def _guidance(transformer, n: int, device) -> torch.Tensor | None:
    return torch.full((n,), TRAIN_GUIDANCE, device=device) if transformer.config.guidance_embeds else None


def sft_objective(
    transformer, batch: TrainBatch, t: torch.Tensor, noise: torch.Tensor, adapters: list[str] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-matching loss per sample (paper Eq. 1) with the given adapters active.

    Args:
        t: (N,) timesteps; noise: (N, L, 64) epsilon.
        adapters: adapters applied in the pass (default: those active on the transformer).
    Returns:
        loss (N,) and stats {"flow_matching_error": (N,)}.
    """
    guidance = _guidance(transformer, len(batch), batch.target.device)
    x_t = noised(batch.target, noise, t)
    with use_adapters(transformer, adapters) if adapters is not None else contextlib.nullcontext():
        pred = flux_forward(transformer, x_t, batch.img_ids, batch.text, t, guidance, batch.condition)
    err = flow_matching_error(pred, noise - batch.target)
    return err, {"flow_matching_error": err.detach()}


def _pair_pass(transformer, batch: TrainBatch, t: torch.Tensor, noise: torch.Tensor):
    """Positive and negative as one batch of 2N sharing noise and t (Fig. C lines 8-16): returns
    ``predict()`` (the model's (2N, L, 64) velocity with the adapters active when called) and the target
    velocity."""
    if batch.negative is None:
        raise ValueError("batch.negative: SFO needs a negative target per sample (run the cdns stage first)")
    guidance = _guidance(transformer, len(batch), batch.target.device)
    x0 = torch.cat([batch.target, batch.negative])  # (2N, L, 64)
    x_t = noised(x0, noise.repeat(2, 1, 1), t.repeat(2))
    target_v = noise.repeat(2, 1, 1) - x0
    text2, t2 = batch.text.repeat(2), t.repeat(2)
    guidance2 = guidance.repeat(2) if guidance is not None else None

    def predict() -> torch.Tensor:
        # The condition path is shared by the pair: computed once for N, repeated for 2N.
        cache = None  # no condition: plain text-to-image (paper App. A)
        if batch.condition is not None:
            cache = encode_condition(transformer, batch.condition, batch.text.pooled, guidance).repeat(2)
        return flux_forward(transformer, x_t, batch.img_ids, text2, t2, guidance2, cache)  # (2N, L, 64)

    return predict, target_v


def reference_errors(transformer, batch: TrainBatch, t: torch.Tensor, noise: torch.Tensor,
                     reference: list[str] = (REF,)) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3's reference terms: the frozen ``reference`` adapters' (N,) flow-matching errors on the positive
    and the negative for t (N,) and noise (N, L, 64), without gradient (what ``sfo_objective`` computes
    first, and what the cdns stage can store beforehand)."""
    predict, target_v = _pair_pass(transformer, batch, t, noise)
    with torch.no_grad(), use_adapters(transformer, list(reference)):
        ref_pos, ref_neg = flow_matching_error(predict(), target_v).chunk(2)
    return ref_pos, ref_neg


def sfo_objective(
    transformer,
    batch: TrainBatch,
    t: torch.Tensor,
    noise: torch.Tensor,
    *,
    beta: float,
    policy: list[str] = (REF, SFO),
    reference: list[str] = (REF,),
    anchor: str = "none",
    anchor_weight: float = 0.0,
    ref_errors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SFO loss per sample (paper Eq. 3; Fig. C), optionally with a positive anchor (``sfo.loss``).

    Positive and negative share the noise epsilon and the timestep t (Fig. C lines 8-16), and go
    through the model as one batch of 2N. The reference pass (``reference`` adapters) runs without
    gradient; the policy pass (``policy`` adapters) carries it. ``anchor="sdpo"`` scales the
    negative's gradient from the policy's residuals (``sdpo_loser_scale``, ``anchor_weight`` = mu).
    ``ref_errors``: the reference pass's (N,) errors on positive and negative for these very t and noise,
    computed earlier (``reference_errors``, stored by the cdns stage): the reference pass is skipped.

    Returns:
        loss (N,) and stats (N,) tensors: implicit_accuracy, reward_margin, policy/ref errors.
    """
    check_anchor(anchor, anchor_weight)
    predict, target_v = _pair_pass(transformer, batch, t, noise)
    if ref_errors is None:
        with torch.no_grad(), use_adapters(transformer, list(reference)):
            ref_pos, ref_neg = flow_matching_error(predict(), target_v).chunk(2)
    else:  # stored by the data stage for this very (t, noise): the reference pass is skipped
        ref_pos, ref_neg = (e.to(target_v.device, torch.float32) for e in ref_errors)
    with use_adapters(transformer, list(policy)):
        pred = predict()
    pol_pos, pol_neg = flow_matching_error(pred, target_v).chunk(2)
    scale = None
    if anchor == "sdpo":
        residual_pos, residual_neg = (pred - target_v).chunk(2)
        scale = sdpo_loser_scale(residual_pos, residual_neg, mu=anchor_weight or 1.0)
    loss, stats = sfo_loss(pol_pos, pol_neg, ref_pos, ref_neg, beta=beta, anchor=anchor, anchor_weight=anchor_weight,
                           loser_scale=scale)
    if scale is not None:
        stats["loser_scale"] = scale
    stats.update(policy_err_pos=pol_pos.detach(), policy_err_neg=pol_neg.detach(), ref_err_pos=ref_pos, ref_err_neg=ref_neg)
    return loss, stats
