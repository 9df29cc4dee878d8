"""Paper App. A (Fig. A) in the shapes world: SFT on positives vs SFO with negatives, towards one colour.

Asked for ``"a photo of a circle"``, the pretrained shapes model draws circles of every colour.
Two LoRAs of one rank are trained on it for the same steps, batch and optimiser:

- SFT: the flow-matching loss (paper Eq. 1) on positives only, circles of the target colour;
- SFO: the paper's loss (Eq. 3, beta as Sec. 4.1) on the same positives, each paired with a
  negative: the same circle (context, pattern, accent) in another colour. The reference model
  is the frozen base.

Every ``eval_every`` steps each arm draws ``samples`` circles (fixed seeds) and the oracle reads
their colour; the curve is the share of the target colour. Text-to-image, no reference image: the
jobs are reference-conditioned, so this toy runs the same objectives (``sfo.objectives``) in one
process instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sfo import adapters as A
from sfo.latents import encode_images, grid_ids
from sfo.models import FluxModel, load_flux
from sfo.objectives import TrainBatch, sfo_objective, sft_objective
from sfo.sampler import SamplerConfig, generate
from sfo.shapes import world as W
from sfo.shapes.oracle import read_image
from sfo.text import encode_prompts
from sfo.timesteps import TimestepSampling, sample_timesteps

ARMS = ("sft", "sfo")


@dataclass
class ColourShiftConfig:
    colour: str = "red"
    shape: str = "circle"
    steps: int = 60
    eval_every: int = 20
    batch_size: int = 16
    rank: int = 16
    samples: int = 100  # paper App. A: 100 samples per checkpoint
    sample_steps: int = 28
    beta: float = 1000.0
    optimizer: str = "prodigy"  # plain Prodigy (the jobs add bias correction and safeguard warm-up); "adamw" uses lr
    lr: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.colour not in W.COLOURS:
            raise ValueError(f"colour_shift.colour: unknown {self.colour!r}; use one of {list(W.COLOURS)}")
        if self.shape not in W.SHAPES:
            raise ValueError(f"colour_shift.shape: unknown {self.shape!r}; use one of {list(W.SHAPES)}")
        for name in ("steps", "eval_every", "batch_size", "rank", "samples", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"colour_shift.{name}: must be at least 1, got {getattr(self, name)}")


def _pairs(cfg: ColourShiftConfig) -> list[tuple[W.Subject, W.Context, W.Subject]]:
    """(positive subject, context, negative subject): every circle of the target colour in every
    context, with its twin of another colour (cycled through the other colours)."""
    others = [c for c in W.COLOURS if c != cfg.colour]
    positives = [(s, c) for s in W.ALL_SUBJECTS if s.shape == cfg.shape and s.colour == cfg.colour for c in W.ALL_CONTEXTS]
    return [(s, c, W.Subject(s.shape, others[i % len(others)], s.pattern, s.accent))
            for i, (s, c) in enumerate(positives)]


def colour_share(model: FluxModel, cfg: ColourShiftConfig, active: list[str]) -> dict[str, float]:
    """Share of each colour (and ``None``: unreadable) among ``samples`` generated circles."""
    sampler = SamplerConfig(steps=cfg.sample_steps, height=W.SIZE, width=W.SIZE)
    prompt = W.shape_text(cfg.shape)
    counts: dict = {}
    with A.use_adapters(model.transformer, active):
        for start in range(0, cfg.samples, 50):
            seeds = list(range(start, min(start + 50, cfg.samples)))
            for image in generate(model, [prompt] * len(seeds), seeds, sampler):
                colour = read_image(image).colour
                counts[colour] = counts.get(colour, 0) + 1
    return {str(k): v / cfg.samples for k, v in counts.items()}


def _optimizer(cfg: ColourShiftConfig, params):
    if cfg.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=cfg.lr, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)


def run_arm(arm: str, cfg: ColourShiftConfig, log=print) -> list[dict]:
    """Trains one arm from the base model; returns its curve [{step, share, seconds}]."""
    model = load_flux("shapes", device="cpu")
    transformer = model.transformer
    A.add_lora(transformer, arm, cfg.rank)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, params)
    pairs = _pairs(cfg)
    positives = encode_images(model, [W.render(s, c) for s, c, _ in pairs])
    negatives = encode_images(model, [W.render(n, c) for _, c, n in pairs])
    text = encode_prompts(model, [W.shape_text(cfg.shape)])
    img_ids = grid_ids(W.SIZE // model.pixel_multiple, W.SIZE // model.pixel_multiple)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampling = TimestepSampling("logit_normal")
    started = time.time()
    curve = [{"step": 0, "share": colour_share(model, cfg, []), "seconds": 0.0}]
    for step in range(1, cfg.steps + 1):
        index = torch.randint(len(pairs), (cfg.batch_size,), generator=generator)
        batch = TrainBatch(target=positives[index], text=text.select([0] * cfg.batch_size), condition=None,
                           img_ids=img_ids, negative=negatives[index])
        t = sample_timesteps(cfg.batch_size, sampling, generator)
        noise = torch.randn(batch.target.shape, generator=generator)
        if arm == "sft":
            loss = sft_objective(transformer, batch, t, noise, adapters=[arm])[0].mean()
        else:
            loss = sfo_objective(transformer, batch, t, noise, beta=cfg.beta, policy=[arm], reference=[])[0].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            share = colour_share(model, cfg, [arm])
            curve.append({"step": step, "share": share, "seconds": round(time.time() - started, 1)})
            log(f"[app-a] {arm} step {step}/{cfg.steps}: loss {loss.item():.4f}, "
                f"{cfg.colour} {share.get(cfg.colour, 0.0):.2f} ({time.time() - started:.0f} s)")
    return curve


def run(cfg: ColourShiftConfig, log=print) -> dict:
    """Both arms; returns {arm: curve} plus the config."""
    return {"config": cfg.__dict__, **{arm: run_arm(arm, cfg, log) for arm in ARMS}}


def format_curves(result: dict) -> str:
    colour = result["config"]["colour"]
    steps = [p["step"] for p in result["sft"]]
    lines = [f"App. A: share of {colour} among {result['config']['samples']} samples of "
             f"{W.shape_text(result['config']['shape'])!r}",
             f"{'step':<8}" + "".join(f"{s:>8}" for s in steps)]
    for arm in ARMS:
        lines.append(f"{arm:<8}" + "".join(f"{p['share'].get(colour, 0.0):>8.2f}" for p in result[arm]))
    return "\n".join(lines)
