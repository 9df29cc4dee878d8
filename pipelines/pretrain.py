"""pretrain: trains the shapes-world FLUX as a text-to-image model and caches it for ``load_flux("shapes")``.

    python -m pipelines.pretrain [--config FILE] [key=value ...]

FLUX.1-dev's role in the paper is a text-to-image base that has never seen a reference image; the
shapes-world model plays it here. Its transformer (``sfo.shapes.model``) is trained from scratch,
every parameter, with the flow-matching loss (paper Eq. 1 without a condition,
``sfo.objectives.sft_objective``) on target images of the world paired with one of their three
captions (``sfo.shapes.world.captions``: the target text, the CDNS generic text, the App. A
prompt). The saved weights are an exponential moving average of the trained ones.

One process, no Ray: the model is small enough for one CPU. The result goes to
``$SFO_CACHE_DIR/shapes-flux/<sizes fingerprint>/`` (a FLUX folder in the diffusers layout, with
``pretrain.json`` recording the run); one pretrained for at least ``steps`` is kept unless
``force=true``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.config import job_main
from sfo.latents import encode_images, grid_ids
from sfo.models import FluxModel
from sfo.objectives import TrainBatch, sft_objective
from sfo.sampler import UNCONDITIONAL  # the caption-dropout caption is text guidance's unconditional prompt
from sfo.shapes import world as W
from sfo.shapes.model import (
    MANIFEST, SHIPPED, SHIPPED_STEPS, ShapesFluxConfig, build_shapes_pipeline, file_digests, pretrained_folder,
    shipped_manifest,
)
from sfo.text import TextEmbeddings, encode_prompts
from sfo.timesteps import TimestepSampling, sample_timesteps

CAPTION_WEIGHTS = (0.5, 0.25, 0.25)  # target text, generic text, App. A prompt


@dataclass
class PretrainConfig:
    steps: int = SHIPPED_STEPS
    batch_size: int = 48
    lr: float = 1e-3
    warmup: int = 100  # linear warm-up steps, then cosine decay to 10% of lr
    ema: float = 0.995  # decay of the saved weights' moving average
    # Share of examples trained with the empty caption, so the model also learns the unconditional velocity
    # that text guidance (``sampler.text_guidance``, classifier-free guidance) extrapolates from. 0 = never.
    caption_dropout: float = 0.0
    seed: int = 0
    log_every: int = 50
    force: bool = False  # retrain even when the cache holds a pretrained model
    output: str | None = None  # default: the cache folder load_flux("shapes") reads

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema: must be in [0, 1), got {self.ema}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout: must be in [0, 1) (e.g. 0.1), got {self.caption_dropout}")

    @property
    def folder(self) -> Path:
        return Path(self.output).expanduser() if self.output else pretrained_folder()


class WorldData:
    """Every (subject, context) target of the world as tokens, every caption as embeddings: a
    training batch is then an index draw, no rendering or text encoding per step. With
    ``caption_dropout`` p, each example's caption is the empty one (``UNCONDITIONAL``) with probability p."""

    def __init__(self, model: FluxModel, batch: int = 256, caption_dropout: float = 0.0) -> None:
        self.caption_dropout = caption_dropout
        pairs = [(s, c) for s in W.ALL_SUBJECTS for c in W.ALL_CONTEXTS]
        self.tokens = torch.cat([encode_images(model, [W.render(s, c) for s, c in pairs[i:i + batch]])
                                 for i in range(0, len(pairs), batch)])  # (P, L, D)
        # The empty caption only with dropout: a run without it encodes exactly the batches it always did.
        texts = sorted({text for s, c in pairs for text in W.captions(s, c)} | ({UNCONDITIONAL} if caption_dropout else set()))
        self.empty = texts.index(UNCONDITIONAL) if caption_dropout else -1
        index = {text: i for i, text in enumerate(texts)}
        self.caption_ids = torch.tensor([[index[t] for t in W.captions(s, c)] for s, c in pairs])  # (P, 3)
        parts = [encode_prompts(model, texts[i:i + batch]) for i in range(0, len(texts), batch)]
        self.text = TextEmbeddings(torch.cat([p.prompt_embeds for p in parts]), torch.cat([p.pooled for p in parts]),
                                   parts[0].txt_ids)
        side = W.SIZE // model.pixel_multiple
        self.img_ids = grid_ids(side, side)

    def batch(self, n: int, generator: torch.Generator) -> TrainBatch:
        pair = torch.randint(len(self.tokens), (n,), generator=generator)
        variant = torch.multinomial(torch.tensor(CAPTION_WEIGHTS), n, replacement=True, generator=generator)
        ids = self.caption_ids[pair, variant]
        if self.caption_dropout:  # drawn only when on, so a run without dropout keeps its random stream
            ids = torch.where(torch.rand(n, generator=generator) < self.caption_dropout, self.empty, ids)
        text = self.text.select(ids)
        return TrainBatch(target=self.tokens[pair], text=text, condition=None, img_ids=self.img_ids)


def pretrained_steps(folder: Path) -> int:
    """Steps the model cached in ``folder`` was pretrained for (0: none there)."""
    record = folder / "pretrain.json"
    if not (folder / "model_index.json").is_file() or not record.is_file():
        return 0
    return int(json.loads(record.read_text())["config"]["steps"])


def learning_rate(cfg: PretrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _log(message: str) -> None:
    print(message, flush=True)


def pretrain(cfg: PretrainConfig, log=_log) -> Path:
    """Trains and saves the shapes-world pipeline; returns its folder."""
    folder = cfg.folder
    done = pretrained_steps(folder)
    shipped = shipped_manifest()
    if cfg.output is None and not cfg.force and 0 < done < cfg.steps and shipped and shipped["config"]["steps"] >= cfg.steps:
        # A cache left by an older release (the 1500-step model) would be preferred over the shipped model and, being
        # short of the steps asked, retrained: set it aside (kept, not deleted) and use the shipped model.
        aside = folder.with_name(f"{folder.name}.{done}-steps")
        shutil.rmtree(aside, ignore_errors=True)
        folder.rename(aside)
        log(f"pretrain: the cached shapes model had {done} steps, the shipped one has {shipped['config']['steps']}: "
            f"the cached one moved to {aside}")
        done = 0
    if cfg.output is None and not cfg.force and not done and shipped and shipped["config"]["steps"] >= cfg.steps:
        log(f"pretrain: using the shipped shapes model ({SHIPPED}, {shipped['config']['steps']} steps; "
            "force=true rebuilds it into the cache)")
        return SHIPPED
    if done >= cfg.steps and not cfg.force:
        log(f"pretrain: {folder} already holds the shapes model pretrained for {done} steps (force=true retrains)")
        return folder
    if done:
        log(f"pretrain: the cached shapes model had {done} steps, fewer than {cfg.steps}: retraining")
    torch.manual_seed(cfg.seed)
    pipe = build_shapes_pipeline(ShapesFluxConfig())
    model = FluxModel(pipe=pipe, source="shapes", text_max_length=ShapesFluxConfig().text_max_length,
                      dtype=torch.float32, device=torch.device("cpu"))
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval().requires_grad_(False)
    data = WorldData(model, caption_dropout=cfg.caption_dropout)
    transformer = pipe.transformer.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampling = TimestepSampling("logit_normal")
    start, losses = time.time(), []
    log(f"pretrain: {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M parameters, "
        f"{len(data.tokens)} images x 3 captions, {cfg.steps} steps of {cfg.batch_size}")
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        batch = data.batch(cfg.batch_size, generator)
        t = sample_timesteps(cfg.batch_size, sampling, generator)
        noise = torch.randn(batch.target.shape, generator=generator)
        loss = sft_objective(transformer, batch, t, noise)[0].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), transformer.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            elapsed = time.time() - start
            eta = elapsed / (step + 1) * (cfg.steps - step - 1)
            log(f"pretrain: step {step + 1}/{cfg.steps} loss {np.mean(losses[-cfg.log_every:]):.4f} "
                f"({elapsed:.0f} s, {eta:.0f} s left)")
    pipe.register_modules(transformer=ema)
    record = {"config": asdict(cfg), "sizes": asdict(ShapesFluxConfig()), "final_loss": float(np.mean(losses[-50:])),
              "seconds": round(time.time() - start, 1)}
    _save_atomically(pipe, folder, record)
    if folder.resolve() == SHIPPED.resolve():
        write_manifest(folder, record)
    log(f"pretrain: saved to {folder} ({record['seconds']:.0f} s, final loss {record['final_loss']:.4f})")
    return folder


def write_manifest(folder: Path, record: dict) -> None:
    """The shipped model's MANIFEST.json (``sfo.shapes.model.verify_shipped`` checks it): the command that made
    it, when and where, its config and sizes, and the sha256 of every file."""
    import datetime
    import platform

    config = {k: v for k, v in record["config"].items() if k not in ("force", "output", "log_every")}
    defaults = {k: v for k, v in asdict(PretrainConfig()).items() if k in config}
    changed = " ".join(f"{k}={v}" for k, v in config.items() if v != defaults[k])
    manifest = {
        "what": "the shapes-world FLUX (sfo.shapes.model), pretrained text-to-image; load_flux('shapes') reads it "
                "when no rebuilt copy is cached",
        "command": f"python -m pipelines.pretrain output=sfo/shapes/pretrained force=true {changed}".strip(),
        "made": f"{datetime.date.today()}, {platform.machine()} CPU x {torch.get_num_threads()} threads, torch "
                f"{torch.__version__}, {record['seconds']:.0f} s",
        "config": record["config"], "sizes": record["sizes"], "final_loss": record["final_loss"],
        "files": file_digests(folder),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _save_atomically(pipe, folder: Path, record: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pretraining-", dir=folder.parent))
    try:
        pipe.save_pretrained(staging)
        (staging / "pretrain.json").write_text(json.dumps(record, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    return job_main(PretrainConfig, "python -m pipelines.pretrain", __doc__, pretrain, argv)


if __name__ == "__main__":
    sys.exit(main())
