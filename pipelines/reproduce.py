"""The paper's findings in miniature, in the shapes world, with the project's own jobs: one command.

    python -m pipelines.reproduce [--budget full|tiny] [--only table4,tableC,tableB,appA] [--out DIR]

1. Table 4: SFT base vs SFT-additional vs SFO with Self-Play negatives vs SFO with CDNS negatives.
2. Table C: SFO (CDNS) with logit-normal vs uniform timesteps.
3. Table B: SFO with CDNS negatives at several blur radii.
   beta: SFO with CDNS negatives at other betas (not a paper table: the why-not of the results).
4. App. A (Fig. A): share of a target colour under SFT (positives only) vs SFO (with negatives).

Stages: pretrain (cached) -> prepare (shapes triplets) -> sft -> cdns per negative set ->
sfo per arm -> evaluate_shapes (every method at once) -> App. A; each stage is the job
``python -m pipelines.<stage>`` runs, called in this driver on one local Ray. Prints the tables and
the wall time of every stage; writes ``results.json`` and ``report.md`` under the run folder.

Blur radii are in pixels of the 48-pixel world. The paper blurs 512-pixel images with radius 5,
which removes details of a few pixels; the world's fine details are 3-pixel pattern cells, so the
world's CDNS uses radius 2 (the cells vanish, shape and colours stay) and Table B sweeps 0.5-4.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines.config import load_config

CONFIGS = Path(__file__).resolve().parent / "configs"
EXPERIMENTS = ("table4", "tableC", "tableB", "beta", "appA")
CDNS_RADIUS = 2.0  # world pixels; see the module docstring


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
    beta: float = 1000.0  # paper Sec. 4.1


BUDGETS = {
    "full": Budget(pretrain_steps=1500, triplets=512, sft_steps=300, sfo_steps=150, batch_size=8, sample_steps=28,
                   eval_subjects=128, eval_seeds=2, blur_radii=(0.5, 1.0, 2.0, 4.0), betas=(100.0, 10000.0), colour_steps=60, colour_every=20,
                   colour_samples=100),
    # Checks the machinery (tests): every stage and arm runs, nothing is learned.
    "tiny": Budget(pretrain_steps=2, triplets=4, sft_steps=1, sfo_steps=1, batch_size=2, sample_steps=2,
                   eval_subjects=2, eval_seeds=1, blur_radii=(1.0, 2.0), betas=(100.0,), colour_steps=1, colour_every=1,
                   colour_samples=4),
}


@dataclass
class Plan:
    """Which negative sets, SFO arms and evaluated methods the chosen experiments need."""

    negatives: dict[str, dict] = field(default_factory=dict)  # name -> cdns overrides
    arms: dict[str, list[str]] = field(default_factory=dict)  # name -> sfo overrides (data.path filled later)
    arm_negatives: dict[str, str | None] = field(default_factory=dict)


def plan(experiments: list[str], budget: Budget) -> Plan:
    p = Plan()

    def cdns(radius: float) -> str:
        name = f"cdns-r{radius:g}"
        p.negatives[name] = {"cdns.mode": "cdns", "cdns.blur_radius": radius}
        return name

    def arm(name: str, negatives: str | None, overrides: list[str]) -> None:
        p.arms[name], p.arm_negatives[name] = overrides, negatives

    if "table4" in experiments:
        arm("sft-additional", None, ["sfo.variant=sft-additional"])
        p.negatives["self-play"] = {"cdns.mode": "self-play"}
        arm("sfo-self-play", "self-play", [])
    if {"table4", "tableC"} & set(experiments):
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
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full",
                        help="full: the README's numbers (about 45 min on 2 cores with the model pretrained); tiny: machinery check (minutes)")
    parser.add_argument("--only", default=",".join(EXPERIMENTS),
                        help=f"comma-separated experiments (default: all of {','.join(EXPERIMENTS)})")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/reproduce-<date>-<time>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every job (default 0)")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray (default 4)")
    args = parser.parse_args(argv)
    args.experiments = [e for e in args.only.split(",") if e]
    unknown = sorted(set(args.experiments) - set(EXPERIMENTS))
    if unknown or not args.experiments:
        parser.error(f"--only: unknown experiment(s) {unknown}; use some of {','.join(EXPERIMENTS)}")
    if args.out is not None and args.out.exists():
        parser.error(f"--out {args.out} exists already; pick a new folder")
    return args


class Stages:
    """Runs named stages, printing progress and recording each one's wall time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn):
        print(f"\n[reproduce] {name} ...", flush=True)
        started = time.time()
        result = fn()
        self.seconds[name] = round(time.time() - started, 1)
        print(f"[reproduce] {name} done in {self.seconds[name]:.0f} s", flush=True)
        return result


def run(args: argparse.Namespace) -> dict:
    from pipelines import cdns, evaluate_shapes, prepare, pretrain, train
    from pipelines.cdns import CdnsConfig
    from pipelines.evaluate_shapes import ShapesEvaluateConfig
    from pipelines.prepare import PrepareConfig
    from pipelines.train_config import SfoConfig, SftConfig
    from sfo.shapes.world import SIZE

    budget = BUDGETS[args.budget]
    runs = (args.out or Path("runs") / time.strftime("reproduce-%Y%m%d-%H%M%S")).resolve()
    runs.mkdir(parents=True)
    stages, the_plan = Stages(), plan(args.experiments, budget)
    model = ["model.source=shapes"]
    train_common = model + [f"data.size={SIZE}", f"train.batch_size={budget.batch_size}", f"train.seed={args.seed}",
                            f"output.storage_path={runs / 'train'}"]
    triplets, ref = runs / "data" / "triplets", runs / "train" / "sft" / "adapters" / "ref"
    results: dict = {"budget": asdict(budget), "seed": args.seed, "experiments": args.experiments}

    stages("pretrain", lambda: pretrain.pretrain(pretrain.PretrainConfig(steps=budget.pretrain_steps, seed=args.seed)))
    jobs = [e for e in args.experiments if e != "appA"]
    if jobs:
        stages("prepare", lambda: prepare.run(load_config(PrepareConfig, CONFIGS / "prepare.yaml", [
            "data.source=shapes", f"data.size={SIZE}", f"data.limit={budget.triplets}", f"data.output={triplets}",
            f"data.seed={args.seed}"])))
        stages("sft", lambda: train.run(load_config(SftConfig, CONFIGS / "sft.yaml", train_common + [
            f"data.path={triplets}", "output.name=sft", f"train.steps={budget.sft_steps}"])))
        for name, overrides in the_plan.negatives.items():
            stages(f"cdns {name}", lambda o=overrides, n=name: cdns.run(load_config(CdnsConfig, CONFIGS / "cdns.yaml", model + [
                f"model.ref_adapter={ref}", f"data.input={triplets}", f"data.output={runs / 'data' / n}",
                f"cdns.size={SIZE}", f"cdns.steps={budget.sample_steps}", f"cdns.seed={args.seed}", "cdns.batch_size=16",
                *[f"{k}={v}" for k, v in o.items()]])))
        for name, overrides in the_plan.arms.items():
            negatives = the_plan.arm_negatives[name]
            data = runs / "data" / negatives if negatives else triplets
            stages(f"sfo {name}", lambda o=overrides, n=name, d=data: train.run(load_config(SfoConfig, CONFIGS / "sfo.yaml",
                train_common + [f"data.path={d}", f"model.ref_adapter={ref}", f"output.name={n}",
                                f"train.steps={budget.sfo_steps}", f"sfo.beta={budget.beta}", *o])))  # o last: wins
        methods = [{"name": "base", "active": []}, {"name": "sft", "ref_adapter": str(ref), "active": ["ref"]}]
        methods += [{"name": n, "ref_adapter": str(ref), "sfo_adapter": str(runs / "train" / n / "adapters" / "sfo"),
                     "active": ["ref", "sfo"]} for n in the_plan.arms]
        evaluation = load_config(ShapesEvaluateConfig, CONFIGS / "evaluate_shapes.yaml", model + [
            f"output={runs / 'evaluate'}", f"eval.subjects={budget.eval_subjects}", f"eval.seeds={budget.eval_seeds}",
            f"eval.steps={budget.sample_steps}"])
        evaluation.methods = [evaluate_shapes.MethodConfig(**m) for m in methods]
        results["methods"] = stages("evaluate", lambda: evaluate_shapes.run(evaluation))
    if "appA" in args.experiments:
        from pipelines import colour_shift

        config = colour_shift.ColourShiftConfig(steps=budget.colour_steps, eval_every=budget.colour_every,
                                                samples=budget.colour_samples, sample_steps=budget.sample_steps,
                                                beta=budget.beta, seed=args.seed)
        results["appA"] = stages("appA", lambda: colour_shift.run(config))
    results["seconds"] = stages.seconds
    (runs / "results.json").write_text(json.dumps(results, indent=2))
    text = format_results(results)
    (runs / "report.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\n[reproduce] everything is under {runs} (results.json, report.md)")
    return results


def format_results(results: dict) -> str:
    """The reproduction tables as Markdown."""
    from pipelines.colour_shift import format_curves

    lines = [f"# SFO in the shapes world (budget {json.dumps(results['budget'])}, seed {results['seed']})", ""]
    methods = results.get("methods", {})

    def table(title: str, rows: list[str]) -> None:
        rows = [r for r in rows if r in methods]
        if not rows:
            return
        lines.extend([f"## {title}", "", "| method | images | subject fidelity | fine | coarse | text |",
                      "|---|---|---|---|---|---|"])
        for r in rows:
            m = methods[r]
            lines.append(f"| {r} | {m['images']} | " + " | ".join(
                f"{m[k]:.3f} ± {m['stderr'][k]:.3f}" for k in ("subject", "fine", "coarse", "text")) + " |")
        lines.append("")

    table("Table 4: negatives", ["base", "sft", "sft-additional", "sfo-self-play", "sfo-cdns"])
    table("Table C: timesteps (SFO, CDNS)", ["sfo-cdns", "sfo-cdns-uniform"])
    table("Table B: blur radius of CDNS (world pixels; sfo-cdns is radius 2)",
          sorted((n for n in methods if n.startswith("sfo-cdns-r")), key=lambda n: float(n[len("sfo-cdns-r"):]))
          + ["sfo-cdns"])
    table(f"beta (SFO, CDNS; sfo-cdns is beta {results['budget']['beta']:g})",
          [n for n in methods if n.startswith("sfo-cdns-beta")] + ["sfo-cdns"])
    if "appA" in results:
        lines.extend(["## App. A: colour shift", "", "```", format_curves(results["appA"]), "```", ""])
    lines.extend(["## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"])
    lines.extend(f"| {name} | {seconds:.0f} |" for name, seconds in results["seconds"].items())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
    try:
        run(args)
    finally:
        if started_ray:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
