"""The paper's findings in miniature, in the shapes world, with the project's own jobs: one command.

    python -m experiments.reproduce [--budget full|tiny] [--only table4,tableC,...] [--seeds 0,1,2] [--out DIR]

1. Table 4: SFT base vs SFT-additional vs SFO with Self-Play negatives vs SFO with CDNS negatives.
2. Table C: SFO (CDNS) with logit-normal vs uniform timesteps.
3. Table B: SFO with CDNS negatives at several blur radii.
   beta: SFO with CDNS negatives at other betas (not a paper table: the why-not of the results).
   negatives: same-context negatives: CDNS image-only (blurred reference, the target text) and, as a
     diagnostic, exact renders of the subject with another pattern/accent in the same context.
   anchor: SFO (CDNS) with a positive anchor (``sfo.anchor``: dpop, rpo, sdpo).
   scope: SFO (CDNS) with the "sfo" LoRA on the other placement than the preset's (``lora.scope``).
   filter: SFO on CDNS negatives without the pairs whose negative kept the reference's pattern and accent
     (``cdns.oracle_filter``).
   sft-strength: the SFT base trained 2x and 4x longer, evaluated beside it (no SFO).
   guidance: SFT and SFO (CDNS) sampled with image guidance 2 (``eval.image_guidance``; no training).
   modes: SFT and SFO (CDNS) sampled in the decoupled and dual-branch modes at a few switch times
     (``experiments.modes``; no training), with each mode's images per second; ``modes.svg`` plots them.
4. App. A (Fig. A): share of a target colour under SFT (positives only) vs SFO (with negatives).

Stages: pretrain (cached) -> prepare (shapes triplets) -> per training seed: sft -> cdns per
negative set -> longer SFT bases and sfo arms; then evaluate_shapes (every method of every seed, one
model, the same held-out cells) -> App. A. Each stage is the job ``python -m pipelines.<stage>`` runs,
called in this driver on one local Ray (`--cores`: one single-threaded sampling actor per core; the SFT
base trains with that many torch threads, then a seed's other training jobs run side by side, one
single-threaded job per core: ``experiments.stages``). Each method is reported as its mean over
seeds and its paired difference against the same seed's SFT base on the same cells (``sfo.stats``: a
difference is claimed at >= 3 standard errors). Prints the tables and the wall time of every stage;
writes ``results.json`` and ``report.md`` under the run folder.

Blur radii are in pixels of the 32-pixel world. The paper blurs 512-pixel images with radius 5,
which removes details of a few pixels; the world's fine details are 2-pixel pattern cells, so the
world's CDNS uses radius 2 (``sfo.shapes.world.CDNS_BLUR_RADIUS``: the cells vanish, shape and
colours stay) and Table B sweeps 0.5-4.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from experiments.plan import (  # noqa: F401 - the plan's names, re-exported for callers of this module
    ANCHOR_WEIGHTS, BUDGETS, CDNS_RADIUS, EXPERIMENTS, IMAGE_GUIDANCE, ORACLE, PRESETS, Budget, Plan, oracle_quadruplets,
    plan,
)
from experiments.stages import Stages
from experiments.tables import RIVALS, aggregate, format_results, negative_pairs
from pipelines.common import CORES, start_local_ray
from pipelines.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "pipelines" / "configs"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full",
                        help="full: the README's numbers (on 2 cores: every experiment in one run 79 min; --only table4 "
                             "about 12 min per training seed, from that run's stage times); tiny: machinery check (minutes)")
    parser.add_argument("--only", default=",".join(EXPERIMENTS),
                        help=f"comma-separated experiments (default: all of {','.join(EXPERIMENTS)})")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="world",
                        help="world (default): the best configuration found here, the second LoRA on the reference "
                             "tokens only; paper: the paper's recipe as written")
    parser.add_argument("--set", dest="sfo_set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override of every SFO arm's config, after the preset's (an arm's own overrides win); "
                             "repeatable, e.g. --set sfo.anchor=dpop --set sfo.anchor_weight=1")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/reproduce-<date>-<time>)")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds: each runs sft, cdns and sfo with "
                        "its seed; every method is evaluated on the same held-out cells (default 0)")
    parser.add_argument("--sft-base", choices=("shipped", "train"), default="shipped",
                        help="shipped (default): every seed starts from the shipped SFT base (sfo/shapes/ref) when it "
                             "was trained on the model in use, as the paper starts from a trained OminiControl, and "
                             "seeds vary SFO; train: each seed trains its own for the budget's sft_steps (the runs "
                             "before 2026-12-05)")
    parser.add_argument("--cores", type=int, default=CORES,
                        help="cores to use: the sampling stages (cdns, evaluation) run one single-threaded actor per core, "
                             "the SFT base trains with this many torch threads, the other training jobs run one per core, "
                             f"single-threaded (default: this machine's, {CORES})")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of the local Ray (default: twice --cores, at least 4)")
    args = parser.parse_args(argv)
    args.experiments = [e for e in args.only.split(",") if e]
    if args.cores < 1:
        parser.error(f"--cores: must be at least 1, got {args.cores}")
    args.num_cpus = args.num_cpus or max(4, 2 * args.cores)
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: need one or more distinct integers, got {args.seeds}")
    unknown = sorted(set(args.experiments) - set(EXPERIMENTS))
    if unknown or not args.experiments:
        parser.error(f"--only: unknown experiment(s) {unknown}; use some of {','.join(EXPERIMENTS)}")
    try:
        check_sfo_overrides(args.sfo_set)
    except ValueError as err:
        parser.error(f"--set: {err}")
    if args.out is not None and args.out.exists():
        parser.error(f"--out {args.out} exists already; pick a new folder")
    return args


def check_sfo_overrides(overrides: list[str]) -> None:
    """Raises ``ValueError`` naming the override when the sfo job's config would refuse it (before any stage runs)."""
    from pipelines.train_config import SfoConfig

    load_config(SfoConfig, CONFIGS / "sfo.yaml", ["data.path=unchecked", "model.ref_adapter=unchecked", *overrides])


def run(args: argparse.Namespace) -> dict:
    import pyarrow as pa

    from experiments import modes
    from pipelines import cdns, evaluate_shapes, prepare, pretrain, shipped, train
    from pipelines.cdns import CdnsConfig
    from pipelines.evaluate_methods import MethodConfig
    from pipelines.evaluate_shapes import ShapesEvaluateConfig
    from pipelines.prepare import PrepareConfig
    from pipelines.train_config import SfoConfig, SftConfig
    from sfo.shapes.model import shipped_ref as find_shipped_ref
    from sfo.shapes.world import SIZE

    budget = BUDGETS[args.budget]
    runs = (args.out or Path("runs") / time.strftime("reproduce-%Y%m%d-%H%M%S")).resolve()
    runs.mkdir(parents=True)
    started, stages, the_plan = time.time(), Stages(), plan(args.experiments, budget, args.preset, args.sfo_set)
    common = ["model.source=shapes"]
    triplets = runs / "data" / "triplets"
    results: dict = {"budget": asdict(budget), "seeds": args.seeds, "experiments": args.experiments,
                     "preset": args.preset, "preset_overrides": PRESETS[args.preset] + args.sfo_set}

    stages("pretrain", lambda: pretrain.pretrain(pretrain.PretrainConfig(steps=budget.pretrain_steps)))
    base_ref = find_shipped_ref() if args.sft_base == "shipped" else None
    results["sft_base"] = (f"shipped: {shipped.describe(base_ref)}" if base_ref is not None
                           else f"trained per seed: {budget.sft_steps} steps")
    if args.sft_base == "shipped" and base_ref is None:
        print("[reproduce] no shipped SFT base matches the model in use: each seed trains its own", flush=True)
    jobs = [e for e in args.experiments if e != "appA"]
    if jobs:
        # One dataset (world seed 0) for every training seed: seeds vary the training, not the data.
        stages("prepare", lambda: prepare.run(load_config(PrepareConfig, CONFIGS / "prepare.yaml", [
            "data.source=shapes", f"data.size={SIZE}", f"data.limit={budget.triplets}", f"data.output={triplets}",
            "data.seed=0"])))
        methods = [{"name": "base", "active": []}]
        results["pairs"] = {}
        for seed in args.seeds:
            root = runs / f"seed{seed}" if len(args.seeds) > 1 else runs
            tag = f" (seed {seed})" if len(args.seeds) > 1 else ""
            ref = root / "train" / "sft" / "adapters" / "ref"
            train_common = common + [f"data.size={SIZE}", f"train.batch_size={budget.batch_size}", f"train.seed={seed}",
                                    f"output.storage_path={root / 'train'}", f"scaling.torch_threads={args.cores}"]
            sft = lambda c, n, k: train.run(load_config(SftConfig, CONFIGS / "sft.yaml", c + [  # noqa: E731
                f"data.path={triplets}", f"output.name={n}", f"train.steps={k}"]))
            if base_ref is not None:
                stages(f"sft{tag}", lambda r=ref: shipped.copy_shipped(str(r)))
            else:
                stages(f"sft{tag}", lambda c=train_common: sft(c, "sft", budget.sft_steps))
            for name, overrides in the_plan.negatives.items():
                out = root / "data" / name
                if name == ORACLE:
                    stages(f"negatives {name}{tag}", lambda o=out, s=seed: oracle_quadruplets(triplets, o, s))
                    continue
                stages(f"cdns {name}{tag}", lambda o=overrides, d=out, r=ref, s=seed: cdns.run(load_config(
                    CdnsConfig, CONFIGS / "cdns.yaml", common + [
                        f"model.ref_adapter={r}", f"data.input={triplets}", f"data.output={d}", f"cdns.size={SIZE}",
                        f"cdns.steps={budget.sample_steps}", f"cdns.seed={s}", "cdns.batch_size=16",
                        f"scaling.num_workers={args.cores}",
                        *[f"{k}={v}" for k, v in o.items()]])))
            for name in the_plan.negatives:
                results["pairs"][f"{name}@{seed}"] = negative_pairs(root / "data" / name)
            # The other training jobs side by side, one single-threaded job per core, the longest first.
            alone = train_common + ["scaling.torch_threads=1"]  # after train_common's: wins
            jobs = {f"{name}{tag}": lambda n=name, k=steps: sft(alone, n, k)
                    for name, steps in sorted(the_plan.sft_runs.items(), key=lambda item: -item[1])}
            for name, overrides in the_plan.arms.items():
                negatives = the_plan.arm_negatives[name]
                data = root / "data" / negatives if negatives else triplets
                jobs[f"sfo {name}{tag}"] = lambda o=overrides, n=name, d=data, r=ref: train.run(load_config(
                    SfoConfig, CONFIGS / "sfo.yaml", alone + [f"data.path={d}", f"model.ref_adapter={r}", f"output.name={n}",
                                                              f"train.steps={budget.sfo_steps}", f"sfo.beta={budget.beta}",
                                                              *o]))  # o last: wins
            stages.together(f"training{tag}", jobs, slots=args.cores)
            methods += [{"name": f"{n}@{seed}", "ref_adapter": str(root / "train" / n / "adapters" / "ref"), "active": ["ref"]}
                        for n in ("sft", *the_plan.sft_runs)]
            methods += [{"name": f"{n}@{seed}", "ref_adapter": str(ref), "active": ["ref", "sfo"],
                         "sfo_adapter": str(root / "train" / n / "adapters" / "sfo")} for n in the_plan.arms]
        evaluation = load_config(ShapesEvaluateConfig, CONFIGS / "evaluate_shapes.yaml", common + [
            f"output={runs / 'evaluate'}", f"eval.subjects={budget.eval_subjects}", f"eval.seeds={budget.eval_seeds}",
            f"eval.steps={budget.sample_steps}", f"scaling.num_workers={args.cores}"])
        evaluation.methods = [MethodConfig(**m) for m in methods]
        stages("evaluate", lambda: evaluate_shapes.run(evaluation))
        table = evaluate_shapes.read_images(evaluation.output, [m["name"] for m in methods])
        names = ["base", "sft", *the_plan.sft_runs, *the_plan.arms]
        if "guidance" in args.experiments:  # the same adapters and cells, sampled with image guidance
            suffix = f"-ig{IMAGE_GUIDANCE:g}"
            guided = replace(evaluation, output=runs / f"evaluate{suffix}",
                             eval=replace(evaluation.eval, image_guidance=IMAGE_GUIDANCE),
                             methods=[replace(m, name=m.name.replace("@", f"{suffix}@")) for m in evaluation.methods
                                      if m.name.split("@")[0] in ("sft", "sfo-cdns")])
            stages(f"evaluate{suffix}", lambda: evaluate_shapes.run(guided))
            table = pa.concat_tables([table, evaluate_shapes.read_images(guided.output, [m.name for m in guided.methods])])
            names += [f"sft{suffix}", f"sfo-cdns{suffix}"]
        rivals = RIVALS
        if "modes" in args.experiments:  # the same adapters and cells in each inference mode: one more evaluation
            sweep = modes.sweep(budget.mode_switches, budget.mode_rounds)
            moded = replace(evaluation, output=runs / "evaluate-modes", methods=modes.mode_methods(evaluation.methods, sweep))
            stages("evaluate-modes", lambda: evaluate_shapes.run(moded))
            table = pa.concat_tables([table, evaluate_shapes.read_images(moded.output, [m.name for m in moded.methods])])
            names += modes.names(sweep)
            rivals = {**RIVALS, **{n: ["sfo-cdns"] for n in modes.names(sweep) if n.startswith("sfo-cdns~")}}
            results["mode_throughput"] = stages("modes throughput", lambda: modes.throughput(
                "shapes", sweep, budget.sample_steps))
        results["methods"] = aggregate(table, args.seeds, names, rivals)
    if "appA" in args.experiments:
        from experiments import colour_shift

        config = colour_shift.ColourShiftConfig(steps=budget.colour_steps, eval_every=budget.colour_every,
                                                samples=budget.colour_samples, sample_steps=budget.sample_steps,
                                                beta=budget.beta, seed=args.seeds[0])
        results["appA"] = stages("appA", lambda: colour_shift.run(config))
    results["seconds"], results["wall_seconds"] = stages.seconds, round(time.time() - started, 1)
    (runs / "results.json").write_text(json.dumps(results, indent=2))
    text = format_results(results)
    (runs / "report.md").write_text(text + "\n")
    if results.get("mode_throughput") is not None:
        sweep = modes.sweep(budget.mode_switches, budget.mode_rounds)
        (runs / "modes.svg").write_text(modes.scatter_svg(modes.points(results["methods"], sweep)))
    print("\n" + text)
    print(f"\n[reproduce] everything is under {runs} (results.json, report.md)")
    return results


def cores_that_fit(cores: int, cpus: float) -> int:
    """``--cores`` within a Ray of ``cpus`` logical CPUs: two per core, as ``--num-cpus`` sizes a Ray of its own."""
    return max(1, min(cores, int(cpus // 2)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        start_local_ray(args.num_cpus)
    else:  # the caller's Ray: no more actors and training jobs than its CPUs hold
        cpus = ray.cluster_resources().get("CPU", 0)
        cores = cores_that_fit(args.cores, cpus)
        if cores < args.cores:
            print(f"[reproduce] --cores {args.cores} -> {cores}: this Ray has {cpus:g} "
                  "logical CPUs (two per core: a 0.5-CPU actor or training job, room for Ray Data's tasks)", flush=True)
        args.cores = cores
    try:
        run(args)
    finally:
        if started_ray:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
