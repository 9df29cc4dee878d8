"""What ``experiments.reproduce`` runs: the experiments, their budgets and presets, and the negative sets,
SFO arms and evaluated methods each needs (``plan``); the oracle's fine-detail negatives (a diagnostic).

Blur radii are world pixels (``sfo.shapes.world.CDNS_BLUR_RADIUS``, 2: the paper's radius 5 at 512 px
removes details of a few pixels; the world's details are 2-pixel cells in 32 px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.train_config import PRESETS  # what every SFO arm adds to the sfo job's config
from sfo.shapes.model import SHIPPED_STEPS
from sfo.shapes.world import CDNS_BLUR_RADIUS as CDNS_RADIUS

EXPERIMENTS = ("table4", "tableC", "tableB", "beta", "negatives", "anchor", "scope", "filter", "sft-strength", "guidance",
               "modes", "appA")
IMAGE_GUIDANCE = 2.0  # the "guidance" experiment's sampler image guidance (1 = off)
ANCHOR_WEIGHTS = {"dpop": 5.0, "rpo": 1000.0, "sdpo": 1.0}  # rpo: Eq. 3's gradient carries beta * sigmoid ~ 500, so Eq. 1 needs ~beta to count


@dataclass(frozen=True)
class Budget:
    pretrain_steps: int
    triplets: int
    sft_steps: int
    sfo_steps: int
    batch_size: int
    sample_steps: int
    eval_subjects: int
    eval_seeds: int
    blur_radii: tuple[float, ...]
    betas: tuple[float, ...]  # the "beta" experiment: SFO (CDNS) at other betas than Sec. 4.1's
    colour_steps: int
    colour_every: int
    colour_samples: int
    anchors: tuple[str, ...] = ("dpop", "rpo", "sdpo")
    beta: float = 1000.0  # paper Sec. 4.1
    sft_multiples: tuple[int, ...] = (2, 4)  # the "sft-strength" experiment: SFT for sft_steps x each
    mode_switches: tuple[float, ...] = (0.9, 0.6)  # the "modes" experiment: each mode at these switch times
    mode_rounds: tuple[int, int] = (3, 5)  # decoupled's (min, max) appearance rounds (EZIGen: 3, 10)


BUDGETS = {
    # 256 held-out triplets x 2 sample seeds = 512 images per method and training seed.
    "full": Budget(pretrain_steps=SHIPPED_STEPS, triplets=512, sft_steps=300, sfo_steps=150, batch_size=8, sample_steps=28,
                   eval_subjects=256, eval_seeds=2, blur_radii=(0.5, 1.0, 2.0, 4.0), betas=(100.0, 10000.0), colour_steps=60, colour_every=20,
                   colour_samples=100),
    # Checks the machinery (tests): every stage and arm runs, nothing is learned.
    "tiny": Budget(pretrain_steps=2, triplets=4, sft_steps=1, sfo_steps=1, batch_size=2, sample_steps=2,
                   eval_subjects=2, eval_seeds=1, blur_radii=(1.0, 2.0), betas=(100.0,), colour_steps=1, colour_every=1,
                   colour_samples=4, anchors=("sdpo",), sft_multiples=(2,), mode_switches=(0.6,), mode_rounds=(1, 2)),
}


@dataclass
class Plan:
    """Which negative sets, SFO arms and evaluated methods the chosen experiments need."""

    negatives: dict[str, dict] = field(default_factory=dict)  # name -> cdns overrides
    arms: dict[str, list[str]] = field(default_factory=dict)  # name -> sfo overrides (data.path filled later)
    arm_negatives: dict[str, str | None] = field(default_factory=dict)
    sft_runs: dict[str, int] = field(default_factory=dict)  # extra SFT bases (name -> steps), evaluated beside "sft"


def plan(experiments: list[str], budget: Budget, preset: str = "paper", overrides: list[str] = ()) -> Plan:
    """The plan of ``experiments``: every SFO arm gets the preset's overrides, then ``overrides``, then its own."""
    p = Plan()
    common = PRESETS[preset] + list(overrides)

    def cdns(radius: float) -> str:
        name = f"cdns-r{radius:g}"
        p.negatives[name] = {"cdns.mode": "cdns", "cdns.blur_radius": radius}
        return name

    def arm(name: str, negatives: str | None, overrides: list[str]) -> None:
        p.arms[name], p.arm_negatives[name] = common + overrides, negatives  # the arm's own overrides win

    if "table4" in experiments:
        arm("sft-additional", None, ["sfo.variant=sft-additional"])
        p.negatives["self-play"] = {"cdns.mode": "self-play"}
        arm("sfo-self-play", "self-play", [])
    if {"table4", "tableC", "guidance", "modes"} & set(experiments):
        arm("sfo-cdns", cdns(CDNS_RADIUS), [])
    if "tableC" in experiments:
        arm("sfo-cdns-uniform", cdns(CDNS_RADIUS), ["sfo.scheme=uniform"])
    if "tableB" in experiments:
        for radius in budget.blur_radii:
            if radius == CDNS_RADIUS and "sfo-cdns" in p.arms:
                continue
            arm("sfo-cdns" if radius == CDNS_RADIUS else f"sfo-cdns-r{radius:g}", cdns(radius), [])
    if "beta" in experiments:
        for beta in budget.betas:
            arm(f"sfo-cdns-beta{beta:g}", cdns(CDNS_RADIUS), [f"sfo.beta={beta}"])
    if "negatives" in experiments:
        p.negatives[f"image-only-r{CDNS_RADIUS:g}"] = {"cdns.mode": "image-only", "cdns.blur_radius": CDNS_RADIUS}
        arm("sfo-image-only", f"image-only-r{CDNS_RADIUS:g}", [])
        p.negatives[ORACLE] = {}  # written by oracle_quadruplets, no model
        arm("sfo-oracle", ORACLE, [])
    if "anchor" in experiments:
        for anchor in budget.anchors:
            arm(f"sfo-cdns-{anchor}", cdns(CDNS_RADIUS), [f"sfo.anchor={anchor}", f"sfo.anchor_weight={ANCHOR_WEIGHTS[anchor]}"])
    if "filter" in experiments:  # CDNS without the pairs whose negative kept the reference's pattern and accent
        p.negatives[f"cdns-r{CDNS_RADIUS:g}-filtered"] = {"cdns.mode": "cdns", "cdns.blur_radius": CDNS_RADIUS,
                                                         "cdns.oracle_filter": True}
        arm("sfo-cdns-filtered", f"cdns-r{CDNS_RADIUS:g}-filtered", [])
    if "sft-strength" in experiments:
        p.sft_runs.update({f"sft-{budget.sft_steps * k}": budget.sft_steps * k for k in budget.sft_multiples})
    if "scope" in experiments:  # the other placement than the preset's
        other = "all" if "lora.scope=condition" in common else "condition"
        arm(f"sfo-cdns-{other}", cdns(CDNS_RADIUS), [f"lora.scope={other}"])
    share_reference_errors(p, budget)
    return p


TIMESTEP_FIELDS = ("sfo.scheme=", "sfo.mean=", "sfo.std=")  # an arm with one of these draws its own timesteps


def share_reference_errors(p: Plan, budget: Budget) -> None:
    """A CDNS set that two or more SFO arms train on with the default timesteps stores Eq. 3's reference terms
    (``cdns.score.draws``): one reference pass per row and draw in cdns instead of one per step in every
    arm, which then skips it (``make bench``: 1.41x per SFO step). One draw per epoch an arm sees, so no
    (t, noise) repeats within an arm. A set serving one arm keeps the arm's own reference pass."""
    draws = math.ceil(budget.sfo_steps * budget.batch_size / budget.triplets)
    users: dict[str, int] = {}
    for name, negatives in p.arm_negatives.items():
        own_timesteps = any(o.startswith(TIMESTEP_FIELDS) for o in p.arms[name])
        if negatives is not None and negatives != ORACLE and not own_timesteps:
            users[negatives] = users.get(negatives, 0) + 1
    for negatives, count in users.items():
        if count >= 2:
            p.negatives[negatives]["cdns.score.draws"] = draws


ORACLE = "oracle-fine"  # diagnostic negatives: the subject with another pattern/accent, same context


def oracle_quadruplets(triplets: Path, output: Path, seed: int) -> int:
    """Quadruplets whose negative is the exact render of the positive's subject with another (pattern,
    accent), in the same context: the pair differs in the fine details only. A diagnostic of the world
    (it needs the world's renderer), not a negative-sampling method. Returns the rows written."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sfo.records import QUADRUPLET_SCHEMA, encode_png
    from sfo.shapes.world import fine_twin, render, triplets_of

    table = pq.read_table(triplets)
    ids = table["sample_id"].to_pylist()
    world = triplets_of(ids)
    rng = np.random.default_rng(seed)
    negatives = [encode_png(render(fine_twin(world[i].subject, rng), world[i].context)) for i in ids]
    n = len(ids)
    out = table.select([f.name for f in QUADRUPLET_SCHEMA if f.name in table.column_names]).to_pydict()
    out.update(negative_png=negatives, negative_mode=[ORACLE] * n, negative_image_degradation=["none"] * n,
               negative_text_degradation=["none"] * n, negative_blur_radius=[None] * n, negative_noise_std=[None] * n,
               negative_prompt=table["target_text"].to_pylist(), negative_seed=[seed] * n, negative_steps=[0] * n,
               negative_guidance=[0.0] * n, negative_adapter_sha256=["none"] * n)
    output.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(out, schema=QUADRUPLET_SCHEMA), output / "part-00000.parquet")
    return n
