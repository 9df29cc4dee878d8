"""The sft and sfo training jobs on Ray Train (TorchTrainer) with DeepSpeed ZeRO inside the loop.

Orchestration only (STYLE 5): the loss math is ``sfo.objectives`` / ``sfo.loss``; this module
builds the model on each worker, shards the Parquet with Ray Data, steps DeepSpeed, reports
metrics, checkpoints (trainable weights + optimiser state only) and exports the adapter.

Layout of ``{output.storage_path}/{output.name}/``: Ray Train's ``checkpoint_*`` folders,
``metrics.jsonl`` (one line per step, rank 0), ``summary.json``, and ``adapters/<name>/`` in the
diffusers LoRA format (``FluxPipeline.load_lora_weights`` reads it). ``output.storage_path`` is a shared
folder or an ``s3://`` / ``gs://`` URI (``cluster.storage``): Ray Train writes its checkpoints there, and
rank 0 writes the export and the metrics log through the same filesystem (``pipelines.train_outputs``).

Randomness: each sample's timestep and noise come from a ``torch.Generator`` seeded with
(train.seed, optimiser step, sample_id), so they do not depend on how samples are laid out over
workers and micro-batches (that is what makes the invariance test hold), and positive/negative
share them (``sfo_objective``). The data order is shuffled per epoch with a seeded local buffer
(``train.shuffle_buffer``, ``epoch_rows``). A checkpoint holds the data position (epoch, batches
consumed) with the step, weights and optimiser state: a resume continues the same order where it
stopped (``row_batches``), and the noise stream with the step.

Before Ray starts, the driver prints the job's per-GPU memory plan (``sfo.memory``, from the model's configs
alone) and, on GPUs, refuses one above a GPU's memory naming the setting to change (``common.check_memory_plan``);
``deepspeed.zero_stage=3`` is refused on GPUs (the frozen base is loaded whole on every GPU: nothing to shard).

Data with cached encoder outputs (``sfo.records.CACHE_FIELDS``, from ``prepare`` with
``cache.enabled``) skips the VAE and text encoders for targets, references and prompts when the
cache was made with this job's model and ``data.size`` (``use_cache``). cdns keeps a fitting cache's small
columns and adds the negatives' latents (``sfo.records.CACHED_QUADRUPLET_SCHEMA``); the sfo job joins the
triplets' tensors back from ``data.cache_path`` by ``sample_id`` (``train_data.join_cache``) and runs no
encoder; without the negatives' latents it encodes their PNGs. When no batch needs an encoder the workers load
the transformer alone (``load_model``: no VAE, no T5/CLIP, no tokenizers), and ``summary.json`` names what
they loaded (``components``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import torch

from cluster import storage
from pipelines import train_worker
from pipelines.common import (
    check_cluster_gpus, check_memory_plan, init_ray, model_shape, plan_dtype, ray_data_progress, use_torch_threads,
)
from pipelines.config import ConfigError
from pipelines.train_config import SfoConfig, TrainConfig
from pipelines.train_data import (  # noqa: F401 - the data side, re-exported for callers of this module
    _columns, build_batch, epoch_rows, micro_batches, needs_encoders, row_batches, sample_seed, stored_draws,
    timesteps_and_noise, training_dataset, use_cache, use_scores,
)
from pipelines.train_outputs import (  # noqa: F401 - the run folder's writers, re-exported
    MetricsLog, ReportCadence, export, frozen_fingerprint, start_metrics_log,
)
from sfo import adapters as A
from sfo.models import FluxModel
from sfo.objectives import sfo_objective, sft_objective

FROZEN_REF = "ref_frozen"  # variant "direct": a frozen copy of "ref" plays p_ref in Eq. 3
CKPT_TAG = "state"  # DeepSpeed checkpoint tag inside each Ray checkpoint folder
STATE_FILE = "train_state.json"
# SFO's per-pair statistics averaged into metrics.jsonl (sfo.loss.sfo_loss): how often the pair is ranked
# right, the logit, and how far the policy's error moved from the reference's on the positive and the negative.
PAIR_STATS = ("implicit_accuracy", "reward_margin", "positive_rise", "negative_rise")
NEVER_PRINT = 10**9  # DeepSpeed's steps_per_print: we report ourselves


def run(cfg: TrainConfig):
    """Runs the job described by ``cfg`` on the current Ray cluster; returns Ray Train's Result."""
    from ray.train.torch import TorchTrainer

    cfg.check_inputs()
    cfg = for_workers(cfg)
    check_memory_plan(plan_memory(cfg), cfg.scaling, model_shape(cfg.model.source), cfg.stage)  # before any load
    init_ray()  # --address, RAY_ADDRESS or a fresh local Ray: never a stale one
    check_cluster_gpus(cfg.scaling, cfg.stage)
    cached, scored = use_cache(cfg), use_scores(cfg)
    encoders = needs_encoders(cfg, cached)
    ray_data_progress()
    data = training_dataset(cfg, _columns(cfg, cached, scored))
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same shard order on every attempt, so a checkpoint's data position means one thing
    trainer = TorchTrainer(
        train_worker.train_loop,  # = train_loop below, imported only on the workers
        train_loop_config={"config": cfg, "use_cache": cached, "use_scores": scored, "encoders": encoders},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=cfg.output.name, storage_path=storage.absolute(cfg.output.storage_path),
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.output.max_failures)),
        datasets={"train": data},
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )
    return trainer.fit()


def plan_memory(cfg: TrainConfig):
    """The per-GPU memory plan of one step of this job (``sfo.memory.memory_plan``), from the model's configs
    alone: batch, LoRA rank, ZeRO stage and workers, checkpointing, dtype and optimiser as ``cfg`` sets them."""
    from sfo.memory import memory_plan

    shape = model_shape(cfg.model.source)
    pairs = isinstance(cfg, SfoConfig) and cfg.sfo.variant != "sft-additional"  # positive + negative sequences
    ranks = {"sfo_rank": cfg.lora.rank} if pairs else {"ref_rank": cfg.lora.rank}
    return memory_plan(shape.config, job="sfo" if pairs else "sft", image_size=cfg.data.size,
                       batch_size=cfg.train.batch_size, text_tokens=shape.text_tokens, **ranks,
                       zero_stage=cfg.deepspeed.zero_stage, world_size=cfg.scaling.num_workers,
                       gradient_checkpointing=cfg.train.gradient_checkpointing,
                       dtype=plan_dtype(cfg.model.dtype, cfg.scaling.use_gpu), optimizer=cfg.train.optimizer,
                       pixels_per_token=shape.pixels_per_token)


def for_workers(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the local folders its workers read (``model.source``, ``model.ref_adapter``) made absolute
    against this driver's working directory: Ray Train starts every worker in a working directory of its own
    (its ``WorkingDirectorySetupCallback``), where a relative path such as sfo.yaml's default
    ``runs/train/sft/adapters/ref`` would not exist. URIs stay as they are."""
    from dataclasses import replace

    from sfo.models import SHAPES, TINY

    def absolute(path: str | None) -> str | None:
        if path is None or storage.is_remote(path) or not Path(path).expanduser().exists():
            return path
        return str(Path(path).expanduser().absolute())

    source = cfg.model.source if cfg.model.source in (TINY, SHAPES) else absolute(cfg.model.source)
    return replace(cfg, model=replace(cfg.model, source=source, ref_adapter=absolute(cfg.model.ref_adapter)))


def load_model(cfg: TrainConfig, device, encoders: bool = True) -> FluxModel:
    """The job's model: the whole pipeline (``sfo.models.load_flux``), or with ``encoders`` false the transformer
    alone (``sfo.models.load_transformer_only``: no VAE, text encoders or tokenizers built)."""
    from sfo import models

    if encoders:
        return models.load_flux(cfg.model.source, device=device, dtype=cfg.model.dtype)
    return models.load_transformer_only(cfg.model.source, device=device, dtype=cfg.model.dtype)


def loaded_components(model: FluxModel) -> list[str]:
    """The pipeline components ``model`` holds (``sfo.models.PIPELINE_COMPONENTS`` that are not None)."""
    from sfo.models import PIPELINE_COMPONENTS

    return sorted(name for name in PIPELINE_COMPONENTS if getattr(model.pipe, name, None) is not None)


def setup_adapters(cfg: TrainConfig, transformer) -> tuple[str, object]:
    """Puts the job's adapters on the transformer; returns (trained adapter, objective(batch, t, noise))."""
    if not isinstance(cfg, SfoConfig):
        A.add_lora(transformer, cfg.lora.name, cfg.lora.rank, alpha=cfg.lora.alpha, init="gaussian")
        A.set_scope(transformer, cfg.lora.name, cfg.lora.scope)
        return cfg.lora.name, lambda b, t, n: sft_objective(transformer, b, t, n, adapters=[cfg.lora.name])
    beta, variant = cfg.sfo.beta, cfg.sfo.variant
    with storage.local_copy(cfg.model.ref_adapter) as ref:  # a URI: downloaded to a temporary folder
        A.load_adapter(transformer, ref, A.REF)  # frozen
        if variant == "direct":
            A.load_adapter(transformer, ref, FROZEN_REF)
    anchor = dict(anchor=cfg.sfo.anchor, anchor_weight=cfg.sfo.anchor_weight)
    if variant == "direct":  # paper Table E: SFO on the SFT LoRA itself, against a frozen copy of it
        A.set_trainable(transformer, [A.REF])
        return A.REF, lambda b, t, n: sfo_objective(transformer, b, t, n, beta=beta, policy=[A.REF],
                                                    reference=[FROZEN_REF], **anchor)
    name = cfg.lora.name
    A.add_lora(transformer, name, cfg.lora.rank, alpha=cfg.lora.alpha)  # B = 0: policy starts = reference
    A.set_scope(transformer, name, cfg.lora.scope)
    if variant == "sft-additional":  # paper Table E: the extra LoRA trained with Eq. 1, no negatives
        return name, lambda b, t, n: sft_objective(transformer, b, t, n, adapters=[A.REF, name])
    return name, lambda b, t, n, **stored: sfo_objective(transformer, b, t, n, beta=beta, policy=[A.REF, name],
                                                         reference=[A.REF], **anchor, **stored)


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], sharded: bool) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    from prodigyopt import Prodigy

    # Paper Sec. 4.1 / OminiControl: Prodigy, lr 1, bias correction, safeguard warm-up. Under ZeRO
    # sharding each rank sees a slice, so the step-size estimate must be all-reduced (fsdp_in_use);
    # that path calls .cuda(), so the config refuses it on CPU (TrainConfig.__post_init__).
    return Prodigy(params, lr=cfg.train.lr, use_bias_correction=True, safeguard_warmup=True,
                   weight_decay=cfg.train.weight_decay, fsdp_in_use=sharded)


def deepspeed_config(cfg: TrainConfig, dtype: torch.dtype) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.max_grad_norm,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,  # Prodigy is a client optimiser DeepSpeed does not know
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": NEVER_PRINT,
    }


def _reduce(values: list[float]) -> list[float]:
    """Sums values over all workers (gloo/nccl), so rank 0 reports global numbers."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized():
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        tensor = tensor.to(device)
        torch.distributed.all_reduce(tensor)
    return tensor.cpu().tolist()


def disable_cpu_shm_comm() -> None:
    """Tells DeepSpeed its CPU shared-memory all-reduce op is unavailable, so ``init_distributed`` does not
    JIT-compile it (``deepspeed.comm.torch.build_shm_op`` consults this cached table; gloo is used)."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def train_loop(loop_config: dict) -> None:
    """The per-worker loop: model, DeepSpeed engine, resume, steps, checkpoints, export."""
    cfg: TrainConfig = loop_config["config"]
    use_torch_threads(cfg.scaling)
    if not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from ray.train.torch import get_device

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = get_device()
    if not cfg.scaling.use_gpu and not cfg.deepspeed.cpu_shm_comm:
        disable_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
    # Rank 0 loads first: the tiny model's cache may need building, and with torch.distributed up (Ray Train
    # starts it) transformers writes weights on rank 0 only; the other ranks then load what rank 0 built.
    encoders = loop_config.get("encoders", True)
    if rank == 0:
        model = load_model(cfg, device, encoders)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        model = load_model(cfg, device, encoders)
    transformer = model.transformer
    torch.manual_seed(cfg.train.seed)  # LoRA init draws from the global RNG: same on every rank and layout
    trained, objective = setup_adapters(cfg, transformer)
    if cfg.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    fingerprint_before = frozen_fingerprint(transformer)
    params = A.trainable_parameters(transformer)
    sharded = world > 1 and cfg.deepspeed.zero_stage > 0
    engine, _, _, _ = deepspeed.initialize(model=transformer, model_parameters=params,
                                           optimizer=build_optimizer(cfg, params, sharded),
                                           config=deepspeed_config(cfg, model.dtype))

    start, position = 0, (0, 0)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            engine.load_checkpoint(folder, tag=CKPT_TAG, load_module_strict=False)
            state = json.loads((Path(folder) / STATE_FILE).read_text())
            start, position = state["step"], tuple(state.get("position", (0, 0)))  # older checkpoints: epoch start

    log = MetricsLog(storage.join(cfg.output.run_dir, "metrics.jsonl"), start) if rank == 0 else None
    stream = micro_batches(cfg, model, loop_config.get("use_cache", False), rank, position)
    scored = loop_config.get("use_scores", False)
    cadence = ReportCadence(cfg.train.report_every, cfg.train.report_interval_s)
    for step in range(start + 1, cfg.train.steps + 1):
        began = time.perf_counter()
        sums: dict[str, float] = {"loss": 0.0, **dict.fromkeys(PAIR_STATS, 0.0), "samples": 0.0}
        for _ in range(cfg.train.grad_accum):
            position, sample_ids, batch, rows = next(stream)
            shape, stored = tuple(batch.target.shape[1:]), {}
            if scored:  # the cdns stage's draw for this epoch, with the reference's errors: no reference pass
                t, noise, stored["ref_errors"] = stored_draws(cfg, rows, position[0], shape)
            else:
                t, noise = timesteps_and_noise(cfg, step, sample_ids, shape)
            loss, stats = objective(batch, t.to(device), noise.to(device, model.dtype), **stored)  # (N,)
            engine.backward(loss.mean())
            engine.step()  # DeepSpeed steps the optimiser only at the accumulation boundary
            sums["loss"] += loss.detach().sum().item()
            for key in PAIR_STATS:
                if key in stats:
                    sums[key] += stats[key].float().sum().item()
            sums["samples"] += len(batch)
        *values, report = _reduce([*sums.values(), float(rank == 0 and cadence.due(step))])
        totals = dict(zip(sums, values))
        elapsed = time.perf_counter() - began
        grad_norm = engine.get_global_grad_norm()
        metrics = {"step": step, "loss": totals["loss"] / totals["samples"],
                   "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "step_time": elapsed, "samples_per_s": totals["samples"] / elapsed}
        if cfg.needs_negatives:
            metrics.update({key: totals[key] / totals["samples"] for key in PAIR_STATS})
        if rank == 0:
            metrics.update(attempt=log.attempt, time=time.time())
            log.append(metrics)  # the whole file rewritten: object stores cannot append
            metrics = {k: v for k, v in metrics.items() if k not in ("attempt", "time")}
        every = cfg.train.checkpoint_every
        if step == cfg.train.steps or (every and step % every == 0):
            _report_with_checkpoint(engine, metrics, {"step": step, "position": list(position)}, rank)
            cadence.reported()
        elif report:
            ray.train.report(metrics)
            cadence.reported()
    export(cfg, engine, transformer, trained, rank, fingerprint_before, loaded_components(model))


def _report_with_checkpoint(engine, metrics: dict, state: dict, rank: int) -> None:
    """Saves trainable weights + optimiser state (each rank its own ZeRO shard) and ``state`` (step, data
    position: every rank consumes the same number of batches) and reports them."""
    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=CKPT_TAG, exclude_frozen_parameters=True)
        if rank == 0:
            (Path(folder) / STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_{state['step']:08d}")


def main_for(cfg: TrainConfig) -> int:
    """Command-line body shared by ``pipelines.sft`` and ``pipelines.sfo``."""
    try:
        cfg.check_inputs()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = run(cfg)
    except (ConfigError, FileNotFoundError) as exc:  # e.g. an unreachable --address, a plan above the GPU's memory
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"done: {cfg.stage} step {result.metrics.get('step')} loss {result.metrics.get('loss')}")
    print(f"  adapters: {storage.join(cfg.output.run_dir, 'adapters')}; "
          f"metrics: {storage.join(cfg.output.run_dir, 'metrics.jsonl')}")
    return 0
