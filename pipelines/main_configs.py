"""The main job's stage configs: each job's YAML (``pipelines/configs/``), the chain's paths
(``cluster.chain``), then this run's flags: sizes, the device (``--gpus N`` or the CPU's cores) and the world's
settings. ``pipelines.main`` builds them once and runs every stage with its own."""

from __future__ import annotations

import argparse
from pathlib import Path

from cluster import storage
from cluster.chain import evaluation_methods, stage_overrides
from pipelines.common import CORES, GPU_DTYPE, model_shape
from pipelines.config import load_config

CONFIGS = Path(__file__).resolve().parent / "configs"
# The shapes world's SFT base is rank 16, not the paper's 4 (App. D.1, for the 12B FLUX.1-dev): trained by this job
# for 2400 steps on 512 triplets, rank 4 copied the subject in 0.367 of 256 held-out cells, rank 16 in 0.516
# (docs/shapes-world.md).
WORLD_REF_RANK = 16


def gpu_overrides(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each stage's overrides for ``--gpus N``: the training jobs get N workers of one GPU each, bf16 and (for
    transformers above ``CHECKPOINTING_PARAMETERS``) gradient checkpointing; prepare's encoders, cdns and
    evaluate N actors of one GPU each, bf16. Nothing for a CPU run."""
    if not args.gpus:
        return {}
    actors = ["scaling.use_gpu=true", f"scaling.num_workers={args.gpus}", "scaling.gpus_per_worker=1",
              f"model.dtype={GPU_DTYPE}"]
    training = actors + (["train.gradient_checkpointing=true"] if model_shape(args.model).large else [])
    return {"prepare": ["scaling.use_gpu=true", f"scaling.num_workers={args.gpus}", "scaling.gpus_per_worker=1",
                        f"cache.dtype={GPU_DTYPE}"],
            "sft": training, "sfo": training, "cdns": actors, "evaluate": actors}


def cpu_overrides(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each stage's overrides on the CPU: the machine's cores used, not one. The sampling stages (cdns, evaluate)
    run one single-threaded actor per core (Ray gives a 0.5-CPU actor one torch thread), as many as the local
    Ray's logical CPUs hold beside Ray Data's tasks; the one training worker uses every core's torch thread."""
    if args.gpus:
        return {}
    actors = max(1, min(CORES, int((args.num_cpus - 1) / 0.5)))
    threads = [f"scaling.torch_threads={CORES}"]
    return {"sft": threads, "sfo": threads, "cdns": [f"scaling.num_workers={actors}"],
            "evaluate": [f"scaling.num_workers={actors}"]}


def prepare_overrides(args: argparse.Namespace) -> list[str]:
    """prepare's source (the world, synthetic triplets or ``--data``'s Subjects200K) and its encoder cache."""
    source = "shapes" if args.model == "shapes" else "subjects200k" if args.data else "synthetic"
    extra = [f"data.limit={args.samples}", f"data.size={args.size}", f"data.source={source}"]
    extra += [f"data.seed={args.world_seed}"] if args.model == "shapes" else []
    extra += [f"data.input={storage.absolute(args.data)}"] if args.data else []
    return extra + (["cache.enabled=true", f"cache.model={model_source(args.model)}"] if args.cache else [])


def model_source(model: str) -> str:
    return model if model in ("tiny", "shapes") else str(Path(model).resolve())


def stage_configs(args: argparse.Namespace, runs: str) -> dict:
    """The four jobs' configs: their YAML, the chain's paths, then this run's sizes."""
    from pipelines.cdns import CdnsConfig
    from pipelines.evaluate import EvaluateConfig
    from pipelines.evaluate_shapes import ShapesEvaluateConfig
    from pipelines.pair_analysis import PairAnalysisConfig
    from pipelines.prepare import PrepareConfig
    from pipelines.train_config import PRESETS, SfoConfig, SftConfig
    from sfo.shapes.world import CDNS_BLUR_RADIUS

    common = [f"model.source={args.model}"]
    shapes = args.model == "shapes"
    modes = [f"eval.sampling.mode={args.mode}", f"eval.sampling.switch={args.switch}"]
    evaluation = (["eval.subjects=" + str(args.eval_subjects), f"eval.seeds={args.eval_seeds}", f"eval.steps={args.sample_steps}",
                   f"eval.base_subjects={min(args.base_subjects, args.eval_subjects)}"]
                  if shapes else
                  [f"eval.size={args.size}", f"eval.steps={args.sample_steps}", f"eval.seeds={args.eval_seeds}",
                   f"eval.subjects={args.eval_subjects}", f"eval.prompts={args.eval_prompts}"]
                  + ([f"eval.dreambench={args.dreambench.resolve()}"] if args.dreambench else []))
    # The world model is small: batches of 8 fit a CPU step (fewer when there are fewer triplets).
    world_batch = [f"train.batch_size={min(8, args.samples)}"] if shapes else []
    extra = {
        "prepare": prepare_overrides(args),
        "sft": common + [f"data.size={args.size}", f"train.steps={args.sft_steps}"] + world_batch
        + ([f"lora.rank={WORLD_REF_RANK}"] if shapes else []),
        "cdns": common + [f"cdns.size={args.size}", f"cdns.steps={args.sample_steps}"]
        + (["cdns.batch_size=16", f"cdns.blur_radius={CDNS_BLUR_RADIUS}"] if shapes else []),  # the world's radius
        "pair_analysis": [],
        "sfo": common + [f"data.size={args.size}", f"train.steps={args.sfo_steps}"] + world_batch + PRESETS[args.preset]
        + ([f"train.seed={args.sfo_seed}"] if args.sfo_seed is not None else []),
        "evaluate": common + evaluation + modes + [evaluation_methods(runs, base=True)],  # base: the report's floor row
    }
    for stage, overrides in (gpu_overrides(args) | cpu_overrides(args)).items():
        extra[stage] += overrides
    classes = {"prepare": PrepareConfig, "sft": SftConfig, "cdns": CdnsConfig, "pair_analysis": PairAnalysisConfig,
               "sfo": SfoConfig, "evaluate": ShapesEvaluateConfig if shapes else EvaluateConfig}
    files = {stage: CONFIGS / f"{stage}.yaml" for stage in classes} | ({"evaluate": CONFIGS / "evaluate_shapes.yaml"}
                                                                      if shapes else {})
    configs = {stage: load_config(cls, files[stage], stage_overrides(stage, runs) + extra[stage])
               for stage, cls in classes.items()}
    if shapes and configs["prepare"].data.seed == configs["evaluate"].eval.seed:
        raise ValueError(f"--world-seed {args.world_seed}: the evaluation's held-out cells are world seed "
                         f"{args.world_seed}; training on them would score the model on its own triplets; pick another seed")
    return configs
