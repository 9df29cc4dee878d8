"""Typed configs of the two Ray Train jobs: ``sft`` ("ref" LoRA, Eq. 1) and ``sfo`` ("sfo" LoRA, Eq. 3).

Everything is validated here, in the driver, before Ray starts a worker: a bad field fails in
milliseconds with its dotted name instead of after a worker group has paid its imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster import storage
from pipelines.common import ModelConfig, ScalingConfig
from pipelines.config import ConfigError
from sfo.adapters import LORA_WEIGHTS, REF, REF_RANK, SCOPES, SFO, SFO_RANK
from sfo.loss import check_anchor
from sfo.records import (
    CACHE_TENSOR_COLUMNS, QUADRUPLET_SCHEMA, TRIPLET_SCHEMA, check_schema, refers_to_cache,
)
from sfo.timesteps import SCHEMES, TimestepSampling

OPTIMIZERS = ("prodigy", "adamw")
# SFO presets: overrides of the sfo job's config (and of SFT-additional's extra LoRA). "paper": Eq. 3 as the paper
# trains it. "world": the best configuration found in the shapes world (README): the second LoRA acts on the
# reference tokens only (OminiControl's latent_lora: false placement).
PRESETS = {"paper": [], "world": ["lora.scope=condition"]}
VARIANTS = ("sfo", "sft-additional", "direct")  # paper Table E: SFO, SFT on an extra LoRA, SFO on "ref" itself
ZERO_STAGES = (0, 2, 3)  # 0 = plain data parallel (the only sharding-free choice for Prodigy on CPU)
PIXEL_MULTIPLE = 16  # FLUX: 8x VAE compression x 2x2 token packing


@dataclass
class TrainDataConfig:
    path: str = ""  # Parquet file or folder (local, s3:// or gs://): triplets (sft) or quadruplets with negatives (sfo)
    size: int = 64  # images are resized to size x size; a multiple of 16
    # The cached triplets (prepare's output) that cdns quadruplets with a cache refer to: their tensors
    # (sfo.records.CACHE_TENSOR_COLUMNS) are joined back by sample_id (train_data.join_cache). "" = none.
    cache_path: str = ""
    # Parquet of at most this many MiB is read once into Ray's object store (``train_data.training_dataset``):
    # every epoch after the first then starts at once instead of re-reading the files (seconds each). 0: stream.
    in_memory_mib: float = 1024.0

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("data.path: required; point it at the Parquet written by the prepare (sft) or cdns (sfo) job")
        storage.check_uri(self.path, "data.path")
        if self.cache_path:
            storage.check_uri(self.cache_path, "data.cache_path")
        if self.size < PIXEL_MULTIPLE or self.size % PIXEL_MULTIPLE:
            raise ValueError(f"data.size: must be a positive multiple of {PIXEL_MULTIPLE}, got {self.size}")
        if not self.in_memory_mib >= 0:
            raise ValueError(f"data.in_memory_mib: must be >= 0 (0 streams the files every epoch), got {self.in_memory_mib}")


@dataclass
class LoraConfig:
    name: str = REF  # the adapter this job trains (and exports)
    rank: int = REF_RANK
    alpha: float | None = None  # scale = alpha / rank; default alpha = rank
    scope: str = "all"  # "all" tokens, or "condition": the reference tokens only (OminiControl's latent_lora: false)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("lora.name: must not be empty")
        if self.scope not in SCOPES:
            raise ValueError(f"lora.scope: unknown {self.scope!r}; use one of {list(SCOPES)}")
        if self.rank < 1:
            raise ValueError(f"lora.rank: must be at least 1, got {self.rank}")


@dataclass
class TrainLoopConfig:
    steps: int = 2  # optimiser steps (paper App. D.2: 300 at 4 GPUs x batch 4)
    batch_size: int = 1  # per worker per micro-step
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    checkpoint_every: int = 0  # 0: one checkpoint at the end only
    report_every: int = 1  # ray.train.report at most every N steps and ...
    report_interval_s: float = 2.0  # ... at most every S seconds: Ray Train's controller takes one report per poll
    #   (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), so a sooner one blocks the step until the next poll.
    #   metrics.jsonl gets every step; the last step is always reported
    gradient_checkpointing: bool = False
    seed: int = 0
    shuffle_buffer: int = 1024  # rows of Ray Data's local shuffle buffer, reseeded every epoch from (seed, epoch,
    #                             rank); 0 = file order (the data then arrives in the same order every epoch)
    optimizer: str = "prodigy"  # paper Sec. 4.1
    lr: float = 1.0  # Prodigy's lr is a multiplier of its own estimate: 1 as the paper; adamw: e.g. 1e-4
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "report_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}: must be at least 1, got {getattr(self, name)}")
        if not self.report_interval_s >= 0:
            raise ValueError(f"train.report_interval_s: must be >= 0 seconds, got {self.report_interval_s}")
        if self.checkpoint_every < 0:
            raise ValueError(f"train.checkpoint_every: must be >= 0, got {self.checkpoint_every}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"train.shuffle_buffer: must be >= 0 (0 = file order), got {self.shuffle_buffer}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer: unknown {self.optimizer!r}; use one of {list(OPTIMIZERS)}")
        if not self.lr > 0:
            raise ValueError(f"train.lr: must be > 0, got {self.lr}")
        if self.max_grad_norm < 0:
            raise ValueError(f"train.max_grad_norm: must be >= 0, got {self.max_grad_norm}")


@dataclass
class TimestepConfig:
    scheme: str = "logit_normal"  # timestep sampling (paper Sec. 3.2, Table C)
    mean: float = 0.0
    std: float = 1.0

    section = "timesteps"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"{self.section}.scheme: unknown {self.scheme!r}; use one of {list(SCHEMES)}")
        if not self.std > 0:
            raise ValueError(f"{self.section}.std: must be > 0, got {self.std}")

    @property
    def sampling(self) -> TimestepSampling:
        return TimestepSampling(self.scheme, self.mean, self.std)


@dataclass
class SfoSection(TimestepConfig):
    beta: float = 1000.0  # paper Sec. 4.1
    variant: str = "sfo"
    anchor: str = "none"  # positive anchor (sfo.loss.ANCHORS): none (paper Eq. 3) | dpop | rpo | sdpo
    anchor_weight: float = 0.0  # lambda of dpop / rpo; mu of sdpo (0 = 1)

    section = "sfo"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_anchor(self.anchor, self.anchor_weight)
        if self.variant not in VARIANTS:
            raise ValueError(f"sfo.variant: unknown {self.variant!r}; use one of {list(VARIANTS)}")
        if not self.beta > 0:
            raise ValueError(f"sfo.beta: must be > 0, got {self.beta}")


@dataclass
class DeepSpeedSection:
    zero_stage: int = 2
    # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU processes on first use: ~13 minutes of C++ on
    # 2 cores, and a compile cut short leaves a lock that hangs every later job. Off: gloo does the
    # all-reduce (what this project's CPU runs need); on GPUs it is unused either way.
    cpu_shm_comm: bool = False

    def __post_init__(self) -> None:
        if self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"deepspeed.zero_stage: {self.zero_stage} is not supported; use one of {list(ZERO_STAGES)}")


@dataclass
class OutputConfig:
    storage_path: str = "runs/train"  # a shared folder (local on a laptop, NFS on a cluster) or s3:// / gs:// URI
    name: str = "sft"  # rerunning with the same storage_path and name resumes from the last checkpoint
    max_failures: int = 0  # Ray Train restarts the worker group from the last checkpoint this often

    @property
    def run_dir(self) -> str:
        """The run's folder: an absolute local path, or the URI (never a local ``s3:/...`` path)."""
        return storage.join(storage.absolute(self.storage_path), self.name)

    def __post_init__(self) -> None:
        storage.check_uri(self.storage_path, "output.storage_path")
        if not self.name or "/" in self.name:
            raise ValueError(f"output.name: must be a plain folder name, got {self.name!r}")
        if self.max_failures < -1:
            raise ValueError(f"output.max_failures: must be >= -1 (-1 = forever), got {self.max_failures}")


@dataclass
class TrainConfig:
    """Sections both training jobs share; ``SftConfig`` and ``SfoConfig`` add their own."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: TrainDataConfig = field(default_factory=lambda: TrainDataConfig(path="runs/data/triplets"))
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    stage = "sft"

    def __post_init__(self) -> None:
        if self.scaling.use_gpu and self.deepspeed.zero_stage == 3:
            raise ValueError(
                "deepspeed.zero_stage: 3 shards nothing of the frozen base on GPUs: every GPU loads the whole frozen "
                "transformer (no deepspeed.zero.Init / meta-device load), so ZeRO-3 only adds gathers of the LoRA "
                "weights; use deepspeed.zero_stage=2 (the trained LoRA's gradients and optimiser state sharded)"
            )
        sharded = self.scaling.num_workers > 1 and self.deepspeed.zero_stage > 0
        if self.train.optimizer == "prodigy" and sharded and not self.scaling.use_gpu:
            raise ValueError(
                "train.optimizer: prodigy with a sharded optimizer (deepspeed.zero_stage > 0, scaling.num_workers > 1) "
                "needs prodigyopt's fsdp_in_use path, which calls .cuda(): on CPU use train.optimizer=adamw "
                "(e.g. train.lr=1e-4) or deepspeed.zero_stage=0, or scaling.use_gpu=true"
            )

    def check_inputs(self) -> None:
        """Checks the files the job reads (data schema, the cache's triplets, adapters) before anything starts."""
        if not storage.exists(self.data.path):
            raise ValueError(f"data.path: {self.data.path!r} does not exist; run the prepare/cdns job first")
        schema = storage.dataset(self.data.path).schema
        check_schema(schema, QUADRUPLET_SCHEMA if self.needs_negatives else TRIPLET_SCHEMA, "data.path")
        refers = refers_to_cache(schema.names)
        if refers and not self.data.cache_path:
            raise ConfigError(f"data.cache_path: data.path {self.data.path!r} holds cdns output that refers to the cached "
                              f"triplets' tensors ({', '.join(CACHE_TENSOR_COLUMNS)}) by sample_id; set data.cache_path "
                              "to the prepare output cdns read (e.g. data.cache_path=runs/data/triplets)")
        if refers:  # otherwise data.cache_path is unused (the chain sets it whether prepare cached or not)
            if not storage.exists(self.data.cache_path):
                raise ValueError(f"data.cache_path: {self.data.cache_path!r} does not exist; point it at the cached "
                                 "triplets (prepare with cache.enabled) that data.path was made from")
            missing = {"sample_id", *CACHE_TENSOR_COLUMNS} - set(storage.dataset(self.data.cache_path).schema.names)
            if missing:
                raise ValueError(f"data.cache_path: {self.data.cache_path!r} lacks the column(s) {sorted(missing)}; "
                                 "point it at the cached triplets (prepare with cache.enabled)")

    @property
    def needs_negatives(self) -> bool:
        return False

    @property
    def sampling(self) -> TimestepSampling:
        raise NotImplementedError


@dataclass
class SftConfig(TrainConfig):
    """The sft job: trains the "ref" LoRA with the flow-matching loss (paper Eq. 1, App. D.1)."""

    timesteps: TimestepConfig = field(default_factory=TimestepConfig)

    @property
    def sampling(self) -> TimestepSampling:
        return self.timesteps.sampling


@dataclass
class SfoConfig(TrainConfig):
    """The sfo job: trains the "sfo" LoRA over the frozen "ref" (paper Eq. 3, Sec. 4.1, App. D.2)."""

    data: TrainDataConfig = field(default_factory=lambda: TrainDataConfig(path="runs/data/quadruplets"))
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(name=SFO, rank=SFO_RANK))
    sfo: SfoSection = field(default_factory=SfoSection)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(name="sfo"))

    stage = "sfo"

    def __post_init__(self) -> None:
        TrainConfig.__post_init__(self)
        if not self.model.ref_adapter:
            raise ValueError("model.ref_adapter: required for sfo; the folder holding the sft job's 'ref' LoRA")
        storage.check_uri(self.model.ref_adapter, "model.ref_adapter")
        if self.sfo.variant != "direct" and self.lora.name == REF:
            raise ValueError(f"lora.name: {REF!r} is the frozen SFT adapter; name the new one e.g. {SFO!r}")

    def check_inputs(self) -> None:
        super().check_inputs()
        if not storage.is_file(storage.join(self.model.ref_adapter, LORA_WEIGHTS)):
            raise ValueError(f"model.ref_adapter: no {LORA_WEIGHTS} in {self.model.ref_adapter!r}; "
                             "pass the adapters/ref folder the sft job wrote")

    @property
    def needs_negatives(self) -> bool:
        return self.sfo.variant != "sft-additional"

    @property
    def sampling(self) -> TimestepSampling:
        return self.sfo.sampling
