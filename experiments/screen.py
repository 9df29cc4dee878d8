"""Screening of SFO configurations in the shapes world, in one process (no Ray): hypotheses, fast.

    python -m experiments.screen --seed 0 --arms sfo-cdns,sfo-oracle-rpo [--out DIR]

The jobs (``pipelines/``) pay Ray's start-up per stage (a worker group, DeepSpeed, an actor:
about a minute each on 2 cores), which makes a sweep of SFO arms slow. This driver runs the same
pieces in one process: the same objectives (``sfo.objectives``), optimiser settings (Prodigy with
bias correction and safeguard warm-up, weight decay 0.01, clipping 1.0), per-sample seeding
(``pipelines.train.timesteps_and_noise``), negative generator (``pipelines.cdns.NegativeGenerator``,
runner ``local``) and evaluator (``pipelines.evaluate_shapes.ShapesEvaluator``) as the jobs; only
the training loop is a plain loop instead of Ray Train + DeepSpeed (one worker, no sharding).
A configuration found here is confirmed with the jobs by ``make reproduce``.

Per training seed: prepare's triplets (world seed 0) -> SFT "ref" -> the negative sets the arms
need -> each SFO arm -> every method evaluated on the same held-out cells (world seed 1000,
``--subjects`` x ``--sample-seeds``), so methods are compared pairwise (``sfo.stats``). Writes
``<out>/seed<k>/verdicts.json`` (every method's per-cell verdicts) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

NEGATIVE_SETS = ("cdns", "image-only", "self-play", "oracle")


@dataclass(frozen=True)
class Arm:
    """One SFO configuration (``negatives`` None: SFT-additional, Eq. 1 on an extra LoRA)."""

    negatives: str | None = "cdns"
    anchor: str = "none"
    anchor_weight: float = 0.0
    scope: str = "all"
    beta: float = 1000.0
    steps: int = 150
    oracle_filter: bool = False  # drop the pairs whose negative kept the reference's details (cdns.oracle_filter)


ARMS: dict[str, Arm] = {
    "sft-additional": Arm(negatives=None),
    "sfo-cdns": Arm(),
    "sfo-self-play": Arm(negatives="self-play"),
    "sfo-image-only": Arm(negatives="image-only"),
    "sfo-oracle": Arm(negatives="oracle"),
    "sfo-cdns-dpop": Arm(anchor="dpop", anchor_weight=5.0),
    "sfo-cdns-rpo": Arm(anchor="rpo", anchor_weight=1000.0),
    "sfo-cdns-sdpo": Arm(anchor="sdpo", anchor_weight=1.0),
    "sfo-cdns-cond": Arm(scope="condition"),
    "sfo-image-only-dpop": Arm(negatives="image-only", anchor="dpop", anchor_weight=5.0),
    "sfo-image-only-rpo": Arm(negatives="image-only", anchor="rpo", anchor_weight=1000.0),
    "sfo-oracle-dpop": Arm(negatives="oracle", anchor="dpop", anchor_weight=5.0),
    "sfo-oracle-rpo": Arm(negatives="oracle", anchor="rpo", anchor_weight=1000.0),
    "sfo-oracle-cond": Arm(negatives="oracle", scope="condition"),
    # the world preset's placement (lora.scope=condition) with its rivals and the remedies left to try
    "sfo-self-play-cond": Arm(negatives="self-play", scope="condition"),
    "sfo-cdns-cond-dpop": Arm(scope="condition", anchor="dpop", anchor_weight=5.0),
    "sfo-cdns-cond-dpop1": Arm(scope="condition", anchor="dpop", anchor_weight=1.0),  # the hinge's dose: 5 held the
    "sfo-cdns-cond-dpop0.25": Arm(scope="condition", anchor="dpop", anchor_weight=0.25),  # positive and lost the gain
    "sfo-cdns-cond-filtered": Arm(scope="condition", oracle_filter=True),
    "sfo-cdns-cond-filtered-dpop": Arm(scope="condition", oracle_filter=True, anchor="dpop", anchor_weight=5.0),
}


@dataclass(frozen=True)
class Setup:
    triplets: int = 512
    sft_steps: int = 300
    batch_size: int = 8
    sample_steps: int = 28
    blur_radius: float = 2.0
    subjects: int = 256
    sample_seeds: int = 2
    ref_scope: str = "all"
    image_guidance: tuple[float, ...] = (1.0,)  # sampler image guidance at evaluation; != 1 adds "<method>@ig<w>"


def oracle_negatives(triplets, seed: int):
    """The exact render of each triplet's subject with another (pattern, accent), same context: a
    negative that differs from the positive in the fine details only (a diagnostic, not CDNS)."""
    from sfo.shapes import world as W

    rng = np.random.default_rng(seed)
    return [W.render(W.fine_twin(t.subject, rng), t.context) for t in triplets]


def train(model, objective, data: dict, steps: int, batch_size: int, seed: int, params, log) -> list[dict]:
    """Prodigy as the jobs use it; one seeded shuffle per epoch; per-sample t and noise as the jobs draw them."""
    import torch
    from prodigyopt import Prodigy

    from pipelines.train import sample_seed
    from sfo.timesteps import TimestepSampling, sample_timesteps

    optimizer = Prodigy(params, lr=1.0, use_bias_correction=True, safeguard_warmup=True, weight_decay=0.01)
    n = len(data["ids"])
    order, epoch, position, curve = [], 0, 0, []
    sampling = TimestepSampling("logit_normal")
    for step in range(1, steps + 1):
        if position + batch_size > n or not order:
            order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
            epoch, position = epoch + 1, 0
        index = order[position:position + batch_size]
        position += batch_size
        ts, noises = [], []
        for i in index:
            g = torch.Generator().manual_seed(sample_seed(seed, step, data["ids"][i]))
            ts.append(sample_timesteps(1, sampling, g))
            noises.append(torch.randn(data["target"].shape[1:], generator=g))
        loss, stats = objective(data["batch"](index), torch.cat(ts), torch.stack(noises))
        optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        curve.append({"step": step, "loss": loss.mean().item(),
                      **{k: v.float().mean().item() for k, v in stats.items()}})
        if step % 50 == 0 or step == steps:
            log(f"  step {step}/{steps} loss {np.mean([c['loss'] for c in curve[-50:]]):.4f}")
    return curve


def encoded(model, triplets, negatives=None) -> dict:
    """Triplets (and negatives) through the frozen encoders once, with a batch builder by index."""
    import torch

    from sfo.latents import condition_ids, encode_images, grid_ids
    from sfo.objectives import TrainBatch
    from sfo.text import encode_prompts
    from sfo.transformer import Condition

    side = 32 // model.pixel_multiple
    chunks = lambda images: torch.cat([encode_images(model, images[i:i + 64]) for i in range(0, len(images), 64)])
    target = chunks([t.target for t in triplets])
    reference = chunks([t.reference for t in triplets])
    prompts = [t.target_text for t in triplets]
    texts = [encode_prompts(model, prompts[i:i + 64]) for i in range(0, len(prompts), 64)]
    text = type(texts[0])(torch.cat([t.prompt_embeds for t in texts]), torch.cat([t.pooled for t in texts]), texts[0].txt_ids)
    negative = chunks(negatives) if negatives is not None else None
    cids, gids = condition_ids(side, side), grid_ids(side, side)

    def batch(index):
        index = torch.as_tensor(index)
        return TrainBatch(target=target[index], text=text.select(index), condition=Condition(reference[index], cids),
                          img_ids=gids, negative=negative[index] if negative is not None else None)

    return {"ids": [t.sample_id for t in triplets], "target": target, "batch": batch}


def run_seed(seed: int, arm_names: list[str], setup: Setup, out: Path, log=print) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.cdns import CdnsConfig, CdnsSection, NegativeGenerator
    from pipelines.common import ModelConfig
    from pipelines.evaluate_methods import MethodConfig
    from pipelines.evaluate_shapes import JUDGEMENTS, ShapesEvaluateConfig, ShapesEvaluator, WorldEvalSection
    from pipelines.prepare import DataConfig, shapes_rows
    from sfo import adapters as A
    from sfo.models import load_flux
    from sfo.objectives import sfo_objective, sft_objective
    from sfo.shapes.world import SIZE, world_triplets

    import torch

    torch.manual_seed(seed)
    folder = out / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    triplets = world_triplets(setup.triplets, 0)
    ref_dir = folder / "adapters" / "sft" / A.REF

    started = time.time()
    if not (ref_dir / A.LORA_WEIGHTS).is_file():
        log(f"[screen] seed {seed}: sft ({setup.sft_steps} steps)")
        model = load_flux("shapes", device="cpu")
        torch.manual_seed(seed)
        A.add_lora(model.transformer, A.REF, A.REF_RANK, init="gaussian")
        A.set_scope(model.transformer, A.REF, setup.ref_scope)
        data = encoded(model, triplets)
        train(model, lambda b, t, n: sft_objective(model.transformer, b, t, n, adapters=[A.REF]), data,
              setup.sft_steps, setup.batch_size, seed, A.trainable_parameters(model.transformer), log)
        A.save_adapter(model.transformer, A.REF, ref_dir)
    seconds["sft"] = time.time() - started

    rows = pa.Table.from_pylist(list(shapes_rows(DataConfig(source="shapes", size=SIZE, limit=setup.triplets, seed=0))))
    negatives: dict[str, list] = {}
    from sfo.records import decode_png

    for name in sorted({ARMS[a].negatives for a in arm_names} - {None}):
        started = time.time()
        path = folder / "negatives" / f"{name}.parquet"
        if name == "oracle":
            negatives[name] = oracle_negatives(triplets, seed)
            continue
        if not path.is_file():
            log(f"[screen] seed {seed}: negatives {name}")
            config = CdnsConfig(model=ModelConfig(source="shapes", ref_adapter=str(ref_dir)),
                                cdns=CdnsSection(mode=name, blur_radius=setup.blur_radius if name != "self-play" else None,
                                                 steps=setup.sample_steps, size=SIZE, batch_size=64, seed=seed))
            generator = NegativeGenerator(config, device="cpu")
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.concat_tables([generator(rows.slice(i, 64)) for i in range(0, rows.num_rows, 64)]), path)
        negatives[name] = [decode_png(b) for b in pq.read_table(path, columns=["negative_png"])["negative_png"].to_pylist()]
        seconds[f"negatives {name}"] = time.time() - started

    methods = [MethodConfig(name="sft", ref_adapter=str(ref_dir), active=[A.REF])]
    for name in arm_names:
        arm = ARMS[name]
        sfo_dir = folder / "adapters" / name / A.SFO
        started = time.time()
        if not (sfo_dir / A.LORA_WEIGHTS).is_file():
            log(f"[screen] seed {seed}: {name} {asdict(arm)}")
            model = load_flux("shapes", device="cpu")
            tr = model.transformer
            A.load_adapter(tr, ref_dir, A.REF)
            torch.manual_seed(seed)
            A.add_lora(tr, A.SFO, A.SFO_RANK)
            A.set_scope(tr, A.SFO, arm.scope)
            kept, pairs = triplets, negatives[arm.negatives] if arm.negatives else None
            if arm.oracle_filter:
                from sfo.shapes.oracle import keeps_reference_details

                keep = [not keeps_reference_details(t.reference, n) for t, n in zip(triplets, pairs)]
                kept, pairs = [t for t, k in zip(triplets, keep) if k], [n for n, k in zip(pairs, keep) if k]
                log(f"[screen] seed {seed}: oracle filter kept {len(kept)} of {len(triplets)} pairs")
            data = encoded(model, kept, pairs)
            if arm.negatives is None:
                objective = lambda b, t, n: sft_objective(tr, b, t, n, adapters=[A.REF, A.SFO])
            else:
                objective = lambda b, t, n: sfo_objective(tr, b, t, n, beta=arm.beta, anchor=arm.anchor,
                                                          anchor_weight=arm.anchor_weight)
            curve = train(model, objective, data, arm.steps, setup.batch_size, seed, A.trainable_parameters(tr), log)
            A.save_adapter(tr, A.SFO, sfo_dir)
            (sfo_dir.parent / "curve.json").write_text(json.dumps(curve))
        seconds[name] = time.time() - started
        methods.append(MethodConfig(name=name, ref_adapter=str(ref_dir), sfo_adapter=str(sfo_dir), active=[A.REF, A.SFO]))

    verdict_file = folder / "verdicts.json"
    verdicts = json.loads(verdict_file.read_text()) if verdict_file.is_file() else {}
    for guidance in setup.image_guidance:
        suffix = "" if guidance == 1.0 else f"@ig{guidance:g}"
        config = ShapesEvaluateConfig(methods=methods, runner="local", eval=WorldEvalSection(
            subjects=setup.subjects, seeds=setup.sample_seeds, steps=setup.sample_steps, image_guidance=guidance))
        cells = [{"sample_id": t.sample_id, "seed": s} for t in world_triplets(setup.subjects, config.eval.seed)
                 for s in range(setup.sample_seeds)]
        for method in methods:
            key = method.name + suffix
            if key in verdicts:
                continue
            started = time.time()
            log(f"[screen] seed {seed}: evaluating {key} ({len(cells)} images)")
            evaluator = ShapesEvaluator(replace(config, methods=[method]), device="cpu")
            tables = [evaluator(pa.Table.from_pylist([{**c, "method": method.name} for c in cells[i:i + 64]]))
                      for i in range(0, len(cells), 64)]
            table = pa.concat_tables(tables)
            verdicts[key] = {k: [bool(v) for v in table[k].to_pylist()] for k in JUDGEMENTS}
            verdict_file.write_text(json.dumps(verdicts))
            seconds[f"eval {key}"] = time.time() - started
    (folder / "seconds.json").write_text(json.dumps(seconds, indent=1))
    return verdicts


def table(per_seed: dict[int, dict], baseline: str = "sft") -> str:
    """Mean rates over seeds and the paired difference against ``baseline`` (subject fidelity, text)."""
    from sfo.stats import claim, combine_seeds, paired_difference

    seeds = sorted(per_seed)
    methods = [m for m in per_seed[seeds[0]] if all(m in per_seed[s] for s in seeds)]
    lines = [f"seeds {seeds}; cells per seed {len(per_seed[seeds[0]][baseline]['subject'])}",
             f"{'method':<22}{'subject':>9}{'fine':>8}{'pattern':>9}{'text':>8}   subject vs {baseline} (paired)          text vs {baseline}"]
    for m in methods:
        rate = lambda k: np.mean([np.mean(per_seed[s][m][k]) for s in seeds])
        row = f"{m:<22}{rate('subject'):>9.3f}{rate('fine'):>8.3f}{rate('pattern'):>9.3f}{rate('text'):>8.3f}"
        if m != baseline:
            for key in ("subject", "text"):
                pairs = [(np.asarray(per_seed[s][m][key], dtype=float), np.asarray(per_seed[s][baseline][key], dtype=float))
                         for s in seeds]
                c = combine_seeds([paired_difference(a, b) for a, b in pairs],
                                  [a - b for a, b in pairs])  # the seeds share their cells: each cell counts once
                row += f"   {c['diff']:+.3f} ± {c['se']:.3f} (z {c['z']:+.1f}, {claim(c)})"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.screen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    parser.add_argument("--arms", default="sfo-cdns", help=f"comma-separated arms of: {','.join(ARMS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/screen"), help="run folder; reruns reuse what is there")
    parser.add_argument("--sft-steps", type=int, default=Setup.sft_steps)
    parser.add_argument("--triplets", type=int, default=Setup.triplets, help="training triplets (world seed 0)")
    parser.add_argument("--sample-steps", type=int, default=Setup.sample_steps, help="sampler steps (negatives, evaluation)")
    parser.add_argument("--subjects", type=int, default=Setup.subjects, help="held-out triplets (x sample seeds = cells)")
    parser.add_argument("--ref-scope", default="all", choices=("all", "condition"), help="scope of the SFT 'ref' LoRA")
    parser.add_argument("--sfo-steps", type=int, default=None, help="override every arm's SFO steps")
    parser.add_argument("--image-guidance", default="1", help="comma-separated sampler image guidance scales to "
                        "evaluate every method at (default 1 = off); others add '<method>@ig<w>' rows")
    args = parser.parse_args(argv)
    names = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(names) - set(ARMS))
    if unknown:
        parser.error(f"--arms: unknown {unknown}; use some of {','.join(ARMS)}")
    if args.sfo_steps is not None:
        for name in names:
            ARMS[name] = replace(ARMS[name], steps=args.sfo_steps)
    setup = Setup(sft_steps=args.sft_steps, subjects=args.subjects, ref_scope=args.ref_scope, triplets=args.triplets,
                  sample_steps=args.sample_steps,
                  image_guidance=tuple(float(w) for w in args.image_guidance.split(",") if w.strip()))
    per_seed = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        per_seed[seed] = run_seed(seed, names, setup, args.out)
        print(table(per_seed), flush=True)
    (args.out / "table.txt").write_text(table(per_seed) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
