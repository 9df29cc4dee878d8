"""Subject-conditioned FLUX sampling: flow-matching Euler on FLUX.1-dev's shifted schedule, in three
modes (``Sampler``): standard, decoupled (EZIGen) and dual-branch (DCI).

Used by CDNS negative generation (paper Sec. 3.3: 28 steps, guidance 3.5), evaluation and serving.
Each sample has its own seed: its noise is drawn from its own generator, so a seed gives the same
image alone or inside any batch. The reference's keys/values are computed once per image
(``sfo.transformer.encode_condition``) and reused at every step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image

from sfo.latents import condition_ids, decode_tokens, encode_images, grid_ids, pack
from sfo.models import FluxModel
from sfo.modes import MODES, SamplingMode  # noqa: F401 - re-exported: the sampler config's mode
from sfo.text import encode_prompts
from sfo.transformer import Condition, encode_condition, flux_forward, reference_attention

DEFAULT_STEPS = 28  # paper Sec. 4.1
DEFAULT_GUIDANCE = 3.5  # paper Sec. 4.1 (FLUX.1-dev's guidance embedding)
UNCONDITIONAL = ""  # text guidance's unconditional prompt (the caption-dropout caption of pretraining)


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
    # Text guidance (classifier-free guidance, for a model trained with caption dropout and no distilled
    # guidance embedding, e.g. a shapes-world model pretrained with ``caption_dropout``): v = v(empty prompt)
    # + w (v(prompt) - v(empty prompt)), the reference (if any) kept in both passes. 1 = off (one pass).
    text_guidance: float = 1.0
    sampling: SamplingMode = SamplingMode()

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampler.steps: must be a positive integer, got {self.steps!r}")
        if not np.isfinite(self.guidance) or self.guidance < 0:
            raise ValueError(f"sampler.guidance: must be a finite number >= 0, got {self.guidance!r}")
        if not np.isfinite(self.image_guidance) or self.image_guidance < 0:
            raise ValueError(f"sampler.image_guidance: must be a finite number >= 0 (1 = off), got {self.image_guidance!r}")
        if not np.isfinite(self.text_guidance) or self.text_guidance < 0:
            raise ValueError(f"sampler.text_guidance: must be a finite number >= 0 (1 = off), got {self.text_guidance!r}")
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
    auxiliary_prompts: list[str] | None = None,
) -> torch.Tensor:
    """Runs the sampler in ``config.sampling.mode`` and returns the final packed latent tokens (B, L, 64).

    Args:
        prompts: one prompt per sample.
        seeds: one seed per sample.
        references: one RGB reference image per sample (all one size), or None for plain
            text-to-image (``standard`` mode only).
        progress: called as ``progress(step, steps)`` after every denoising step.
        auxiliary_prompts: ``dual-branch`` only: the auxiliary branch's prompts (the prompt with the
            subject replaced by a generic word, ``sfo.degrade.generic_subject_text``); default the prompts.
    """
    return Sampler(model, prompts, seeds, config, references, auxiliary_prompts).run(progress)


class Sampler:
    """One batch's sampling state (text embeddings, noise, the reference's cache, the schedule) and the
    three modes over it. Every step is an Euler step of ``flux_forward``'s velocity on FLUX.1-dev's shifted
    schedule; the modes differ only in which velocity a step takes:

    - ``standard``: with the reference at every step.
    - ``decoupled`` (EZIGen Sec. 3.2-3.3): without it while t > ``switch`` (the layout pass), with it
      below (the appearance pass); then, per sample, re-noise the result to the switch time with fresh
      noise and repeat the appearance pass until the latent changes by less than ``tolerance``
      (mean |change|) between rounds, within ``min_rounds`` .. ``max_rounds``.
    - ``dual-branch`` (DCI): while t > ``switch``, the concept branch (reference + prompt) on the tokens
      that attend to the reference (``concept_mask``) and the auxiliary branch (auxiliary prompt, no
      reference) elsewhere, on one shared latent; below, the concept branch alone.
    """

    @torch.no_grad()
    def __init__(self, model: FluxModel, prompts: list[str], seeds: list[int], config: SamplerConfig,
                 references: list[Image.Image] | None = None, auxiliary_prompts: list[str] | None = None):
        n = len(prompts)
        if len(seeds) != n:
            raise ValueError(f"seeds: need one seed per prompt, got {len(seeds)} seeds for {n} prompts")
        if references is not None and len(references) != n:
            raise ValueError(f"references: need one reference per prompt, got {len(references)} for {n} prompts")
        if auxiliary_prompts is not None and len(auxiliary_prompts) != n:
            raise ValueError(f"auxiliary_prompts: need one per prompt, got {len(auxiliary_prompts)} for {n} prompts")
        if config.sampling.mode != "standard" and references is None:
            raise ValueError(f"sampling.mode: {config.sampling.mode!r} needs reference images; use 'standard' without one")
        if config.sampling.mode == "dual-branch" and not config.cache_condition:
            raise ValueError("sampling.mode: dual-branch reads the reference attention from the condition cache; "
                             "keep cache_condition true")
        cell = model.pixel_multiple
        if config.height % cell or config.width % cell:
            raise ValueError(f"sampler.height/width: {config.height}x{config.width} must be multiples of {cell}")
        self.model, self.config, self.seeds = model, config, [int(s) for s in seeds]
        self.prompts, self.auxiliary_prompts = prompts, auxiliary_prompts
        transformer = model.transformer
        h_tok, w_tok = config.height // cell, config.width // cell
        self.text = encode_prompts(model, prompts)
        self.guidance = None
        if transformer.config.guidance_embeds:
            self.guidance = torch.full((n,), float(config.guidance), device=model.device)
        self.latent_shape = (model.vae.config.latent_channels, config.height // model.vae_scale_factor,
                             config.width // model.vae_scale_factor)
        self.img_ids = grid_ids(h_tok, w_tok).to(model.device)
        self.condition = None
        # Text guidance's unconditional pass: the empty prompt, with the reference encoded under it.
        self.empty_text = encode_prompts(model, [UNCONDITIONAL] * n) if config.text_guidance != 1.0 else None
        self.empty_condition = None
        if references is not None:
            tokens = encode_images(model, references)  # (B, Lc, 64)
            ref_w, ref_h = references[0].size
            self.condition = Condition(tokens, condition_ids(ref_h // cell, ref_w // cell).to(model.device))
            self.empty_condition = self.condition
            if config.cache_condition:
                if self.empty_text is not None:
                    self.empty_condition = encode_condition(transformer, self.condition, self.empty_text.pooled,
                                                            self.guidance)
                self.condition = encode_condition(transformer, self.condition, self.text.pooled, self.guidance)
        self.sigmas = flux_sigmas(model, config.steps, h_tok * w_tok)
        self.rounds: list[int] | None = None  # decoupled: the appearance passes each sample took
        self.changes: list[list[float]] | None = None  # decoupled: each sample's mean |change| in rounds 2, 3, ...

    def noise(self, seeds: list[int]) -> torch.Tensor:
        return initial_noise(seeds, *self.latent_shape).to(self.model.device, self.model.dtype)  # (B, L, 64)

    def velocity(self, x: torch.Tensor, i: int, reference: bool = True, text=None) -> torch.Tensor:
        """Step ``i``'s velocity (B, L, 64): with the reference (and image guidance) or without it; with
        text guidance, extrapolated from the empty prompt's velocity (the same reference or none)."""
        t = torch.full((x.shape[0],), float(self.sigmas[i]), device=x.device)
        text = self.text if text is None else text
        forward = lambda c, words=text: flux_forward(self.model.transformer, x, self.img_ids, words, t,  # noqa: E731
                                                     self.guidance, c, joint=not self.config.cache_condition)
        with_reference = reference and self.condition is not None
        velocity = forward(self.condition if with_reference else None)
        if with_reference and self.config.image_guidance != 1.0:
            velocity = image_guided(velocity, forward(None), self.config.image_guidance)
        if self.empty_text is not None:
            unconditioned = forward(self.empty_condition if with_reference else None, self.empty_text)
            velocity = text_guided(velocity, unconditioned, self.config.text_guidance)
        return velocity

    def euler(self, x: torch.Tensor, i: int, velocity: torch.Tensor) -> torch.Tensor:
        return (x.float() + (self.sigmas[i + 1] - self.sigmas[i]).item() * velocity.float()).to(self.model.dtype)

    def denoise(self, x: torch.Tensor, steps: range, reference: bool = True, tick=None) -> torch.Tensor:
        for i in steps:
            x = self.euler(x, i, self.velocity(x, i, reference))
            if tick is not None:
                tick()
        return x

    def switch_step(self) -> int:
        """The first step at or below the switch time: steps before it have t > ``sampling.switch``."""
        return int((self.sigmas[:-1] > self.config.sampling.switch).sum())

    @torch.no_grad()
    def layout(self, tick=None) -> torch.Tensor:
        """Decoupled mode's layout pass: from the seeds' noise to the switch time, the text alone."""
        return self.denoise(self.noise(self.seeds), range(self.switch_step()), reference=False, tick=tick)

    @torch.no_grad()
    def run(self, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        mode = self.config.sampling.mode
        steps = self.config.steps
        total = steps if mode != "decoupled" else self.switch_step() + self.config.sampling.max_rounds * (
            steps - self.switch_step())
        done = [0]

        def tick() -> None:
            done[0] += 1
            if progress is not None:
                progress(done[0], total)

        if mode == "decoupled":
            return self.decoupled(tick)
        if mode == "dual-branch":
            return self.dual_branch(tick)
        return self.denoise(self.noise(self.seeds), range(steps), tick=tick)

    def decoupled(self, tick=None) -> torch.Tensor:
        """Each round after the first runs only the samples still changing (``subset``): a converged
        sample costs nothing more, and the others' results are what they would be alone."""
        m, split = self.config.sampling, self.switch_step()
        appearance = range(split, self.config.steps)
        tau = float(self.sigmas[split])
        result = self.denoise(self.layout(tick), appearance, tick=tick)
        rounds = torch.ones(len(self.seeds), dtype=torch.long)
        active = torch.ones(len(self.seeds), dtype=torch.bool)
        self.changes = [[] for _ in self.seeds]
        for r in range(2, m.max_rounds + 1):
            rows = active.nonzero().flatten()
            if len(rows) == 0:
                break
            batch = self if len(rows) == len(self.seeds) else self.subset(rows.tolist())
            fresh = batch.noise([round_seed(s, r) for s in batch.seeds])
            previous = result[rows.to(result.device)]
            again = batch.denoise(((1 - tau) * previous.float() + tau * fresh.float()).to(self.model.dtype),
                                  appearance, tick=tick)
            change = (again.float() - previous.float()).abs().flatten(1).mean(1).cpu()  # (active,)
            result = result.index_copy(0, rows.to(result.device), again)
            rounds[rows] += 1
            for row, c in zip(rows.tolist(), change.tolist()):
                self.changes[row].append(c)
            active[rows] = ~((change < m.tolerance) & (rounds[rows] >= m.min_rounds))
        self.rounds = rounds.tolist()
        return result

    def subset(self, index: list[int]) -> "Sampler":
        """This sampler restricted to the samples at ``index`` (same schedule and settings)."""
        part = copy.copy(self)
        part.seeds = [self.seeds[i] for i in index]
        part.text = self.text.select(index)
        if self.guidance is not None:
            part.guidance = self.guidance[index]
        if self.condition is not None:
            part.condition = self.condition.select(index)
            part.empty_condition = self.empty_condition.select(index)
        if self.empty_text is not None:
            part.empty_text = self.empty_text.select(index)
        return part

    def dual_branch(self, tick=None) -> torch.Tensor:
        m = self.config.sampling
        auxiliary = encode_prompts(self.model, self.auxiliary_prompts or self.prompts)
        x = self.noise(self.seeds)
        for i in range(self.config.steps):
            if float(self.sigmas[i]) > m.switch:
                with reference_attention() as probes:
                    concept = self.velocity(x, i)
                mask = concept_mask(torch.stack(probes).mean(0), m.mask_threshold)  # (B, L)
                velocity = blend_velocities(concept, self.velocity(x, i, reference=False, text=auxiliary), mask)
            else:
                velocity = self.velocity(x, i)
            x = self.euler(x, i, velocity)
            if tick is not None:
                tick()
        return x


def round_seed(seed: int, round_index: int) -> int:
    """The seed of decoupled mode's fresh noise for ``round_index`` (>= 2) of the sample seeded ``seed``."""
    return int(np.random.SeedSequence([int(seed) & (2**63 - 1), round_index]).generate_state(1, np.uint64)[0] >> 1)


def concept_mask(mass: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, L) bool: the subject's tokens, where the attention mass on the reference, min-max normalised
    per image to [0, 1], is >= ``threshold`` (0: every token; above 1: none)."""
    low = mass.amin(dim=1, keepdim=True)
    span = (mass.amax(dim=1, keepdim=True) - low).clamp_min(1e-12)
    return (mass - low) / span >= threshold


def blend_velocities(concept: torch.Tensor, auxiliary: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, 64): the concept branch's velocity on the masked tokens (B, L), the auxiliary's elsewhere."""
    return torch.where(mask.to(concept.device)[:, :, None], concept, auxiliary.to(concept.dtype))


def image_guided(conditioned: torch.Tensor, unconditioned: torch.Tensor, scale: float) -> torch.Tensor:
    """Image guidance: v_u + scale (v_c - v_u) for velocities (B, L, 64) with / without the reference tokens."""
    return unconditioned + scale * (conditioned - unconditioned)


text_guided = image_guided  # text (classifier-free) guidance: v_empty + scale (v_prompt - v_empty), the same extrapolation


def generate(
    model: FluxModel,
    prompts: list[str],
    seeds: list[int],
    config: SamplerConfig = SamplerConfig(),
    references: list[Image.Image] | None = None,
    progress: Callable[[int, int], None] | None = None,
    auxiliary_prompts: list[str] | None = None,
) -> list[Image.Image]:
    """Generates one RGB image per prompt (see ``sample_latents`` for the arguments)."""
    latents = sample_latents(model, prompts, seeds, config, references, progress, auxiliary_prompts)
    return decode_tokens(model, latents, config.height, config.width)
