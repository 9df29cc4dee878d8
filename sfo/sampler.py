"""Subject-conditioned FLUX sampling: flow-matching Euler on FLUX.1-dev's shifted schedule.

Used by CDNS negative generation (paper Sec. 3.3: 28 steps, guidance 3.5), evaluation and serving.
Each sample has its own seed: its noise is drawn from its own generator, so a seed gives the same
image alone or inside any batch. The reference's keys/values are computed once per image
(``sfo.transformer.encode_condition``) and reused at every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image

from sfo.latents import condition_ids, decode_tokens, encode_images, grid_ids, pack
from sfo.models import FluxModel
from sfo.text import encode_prompts
from sfo.transformer import Condition, encode_condition, flux_forward

DEFAULT_STEPS = 28  # paper Sec. 4.1
DEFAULT_GUIDANCE = 3.5  # paper Sec. 4.1 (FLUX.1-dev's guidance embedding)


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    height: int = 512
    width: int = 512
    # True: the reference's keys/values are computed once per image. False: the literal masked
    # joint sequence [text, target, reference] runs at every step (the reference implementation).
    cache_condition: bool = True
    # Image guidance (OminiControl's image_guidance_scale): v = v(no reference) + w (v(reference) - v(no
    # reference)), a second pass without the reference tokens at every step. 1 = off (one pass).
    image_guidance: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampler.steps: must be a positive integer, got {self.steps!r}")
        if not np.isfinite(self.guidance) or self.guidance < 0:
            raise ValueError(f"sampler.guidance: must be a finite number >= 0, got {self.guidance!r}")
        if not np.isfinite(self.image_guidance) or self.image_guidance < 0:
            raise ValueError(f"sampler.image_guidance: must be a finite number >= 0 (1 = off), got {self.image_guidance!r}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"sampler.height/width: must be positive, got {self.height}x{self.width}")


def flux_sigmas(model: FluxModel, steps: int, image_seq_len: int) -> torch.Tensor:
    """(steps + 1,) noise levels from 1 down to 0, shifted as FLUX.1-dev's pipeline shifts them.

    The resolution-dependent shift ``mu`` and the schedule come from the model's own scheduler
    config (dynamic shifting for FLUX.1-dev), through diffusers' scheduler.
    """
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.pipe.scheduler.config)
    config = scheduler.config
    mu = calculate_shift(
        image_seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu if config.use_dynamic_shifting else None)
    return scheduler.sigmas.float().cpu()


def initial_noise(seeds: list[int], channels: int, height: int, width: int) -> torch.Tensor:
    """(B, L, 64) packed noise, sample i drawn from ``torch.Generator().manual_seed(seeds[i])``.

    Drawn on the CPU in the unpacked (16, H/8, W/8) layout, as ``FluxPipeline`` draws it with a
    list of generators, so results do not depend on the device or on the batch.
    """
    noise = [torch.randn((1, channels, height, width), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return pack(torch.cat(noise))


@torch.no_grad()
def sample_latents(
    model: FluxModel,
    prompts: list[str],
    seeds: list[int],
    config: SamplerConfig = SamplerConfig(),
    references: list[Image.Image] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Runs the sampler and returns the final packed latent tokens (B, L, 64).

    Args:
        prompts: one prompt per sample.
        seeds: one seed per sample.
        references: one RGB reference image per sample (all one size), or None for plain
            text-to-image.
        progress: called as ``progress(step, steps)`` after every step.
    """
    n = len(prompts)
    if len(seeds) != n:
        raise ValueError(f"seeds: need one seed per prompt, got {len(seeds)} seeds for {n} prompts")
    if references is not None and len(references) != n:
        raise ValueError(f"references: need one reference per prompt, got {len(references)} for {n} prompts")
    cell = model.pixel_multiple
    if config.height % cell or config.width % cell:
        raise ValueError(f"sampler.height/width: {config.height}x{config.width} must be multiples of {cell}")
    transformer = model.transformer
    h_tok, w_tok = config.height // cell, config.width // cell
    text = encode_prompts(model, prompts)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((n,), float(config.guidance), device=model.device)
    latent_side = model.vae_scale_factor
    x = initial_noise(seeds, model.vae.config.latent_channels, config.height // latent_side, config.width // latent_side)
    x = x.to(model.device, model.dtype)  # (B, L, 64)
    img_ids = grid_ids(h_tok, w_tok).to(model.device)

    condition = None
    if references is not None:
        tokens = encode_images(model, references)  # (B, Lc, 64)
        ref_w, ref_h = references[0].size
        condition = Condition(tokens, condition_ids(ref_h // cell, ref_w // cell).to(model.device))
        if config.cache_condition:
            condition = encode_condition(transformer, condition, text.pooled, guidance)

    sigmas = flux_sigmas(model, config.steps, h_tok * w_tok)
    for i in range(config.steps):
        t = torch.full((n,), float(sigmas[i]), device=model.device)
        velocity = flux_forward(transformer, x, img_ids, text, t, guidance, condition, joint=not config.cache_condition)
        if condition is not None and config.image_guidance != 1.0:
            unconditioned = flux_forward(transformer, x, img_ids, text, t, guidance, None)
            velocity = image_guided(velocity, unconditioned, config.image_guidance)
        x = (x.float() + (sigmas[i + 1] - sigmas[i]).item() * velocity.float()).to(model.dtype)  # Euler step
        if progress is not None:
            progress(i + 1, config.steps)
    return x


def image_guided(conditioned: torch.Tensor, unconditioned: torch.Tensor, scale: float) -> torch.Tensor:
    """Image guidance: v_u + scale (v_c - v_u) for velocities (B, L, 64) with / without the reference tokens."""
    return unconditioned + scale * (conditioned - unconditioned)


def generate(
    model: FluxModel,
    prompts: list[str],
    seeds: list[int],
    config: SamplerConfig = SamplerConfig(),
    references: list[Image.Image] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    """Generates one RGB image per prompt (see ``sample_latents`` for the arguments)."""
    latents = sample_latents(model, prompts, seeds, config, references, progress)
    return decode_tokens(model, latents, config.height, config.width)
