"""CDNS stage (SFO paper Sec. 3.3): triplet Parquet -> quadruplet Parquet with a generated negative per sample.

Each negative is sampled by the SFT model (base + "ref" LoRA) from a *degraded* condition
(``sfo.degrade``: blurred reference + "a photo of {item}" for mode ``cdns``). One callable class,
``NegativeGenerator``, does the work for the Ray Data job (an actor pool of it) and for the
plain in-process loop (``runner=local``), so both give identical bytes for the same sample.

    python -m pipelines.cdns --config pipelines/configs/cdns.yaml [key=value ...]

Re-running into the same ``data.output`` resumes: sample ids already written are skipped,
unreadable (interrupted) files are moved aside as ``*.incomplete`` and their samples redone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.common import ModelConfig, ScalingConfig, init_ray, ray_data_progress
from pipelines.config import ConfigError, job_main
from sfo.degrade import CDNS_MODES, Degradation
from sfo.records import QUADRUPLET_SCHEMA, TRIPLET_SCHEMA, check_schema

PIXEL_MULTIPLE = 16  # FLUX: 8x VAE compression x 2x2 token packing
SEED_BITS = 31  # per-sample seeds fit torch.Generator and int64 columns on every platform
RUNNERS = ("ray", "local")
NO_ADAPTER = "none"  # negative_adapter_sha256 when no "ref" LoRA was loaded
DPO_DINO_MODE = "dpo-dino"  # paper Table 4 baseline: pipelines.dpo_dino, not a degradation


@dataclass
class DataConfig:
    input: Path | None = None  # a triplet Parquet file, or a folder of them (the prepare stage's output)
    output: Path = Path("runs/data/quadruplets")  # folder of quadruplet Parquet files; re-running resumes into it
    limit: int | None = None  # the first N input samples only (None = all)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.limit: must be at least 1 or null, got {self.limit}")


@dataclass
class CdnsSection:
    mode: str = "cdns"  # one of sfo.degrade.CDNS_MODES (paper Tables 4/5), or "dpo-dino" (Table 4)
    blur_radius: float | None = None  # override the mode's blur (paper Table B sweeps 2.5 / 5 / 10 / 20)
    noise_std: float | None = None  # override the mode's noise level ("noise" mode)
    steps: int = 28  # paper Sec. 4.1
    guidance: float = 3.5  # paper Sec. 4.1
    image_guidance: float = 1.0  # sfo.sampler image guidance (1 = off, as the paper)
    size: int = 512  # negatives are size x size; references are resized to it
    batch_size: int = 4  # samples per model call (per actor)
    rows_per_file: int = 64  # rows per output file: a file is written as soon as its rows are generated, so a
    #                          killed job loses at most this many rows per actor (a few GPU-minutes by default)
    seed: int = 0  # per-sample seeds derive from (seed, sample_id)
    dino_encoder: str = "tiny"  # dpo-dino only: a local DINO ViT-S/16 folder, or "tiny" (random weights)

    def __post_init__(self) -> None:
        if self.mode not in CDNS_MODES and self.mode != DPO_DINO_MODE:
            raise ValueError(f"cdns.mode: unknown {self.mode!r}; use one of {sorted(CDNS_MODES) + [DPO_DINO_MODE]}")
        if self.size < PIXEL_MULTIPLE or self.size % PIXEL_MULTIPLE:
            raise ValueError(f"cdns.size: must be a positive multiple of {PIXEL_MULTIPLE}, got {self.size}")
        if self.steps < 1:
            raise ValueError(f"cdns.steps: must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"cdns.batch_size: must be at least 1, got {self.batch_size}")
        if self.rows_per_file < 1:
            raise ValueError(f"cdns.rows_per_file: must be at least 1, got {self.rows_per_file}")
        if not (math.isfinite(self.image_guidance) and self.image_guidance >= 0):
            raise ValueError(f"cdns.image_guidance: must be a finite number >= 0 (1 = off), got {self.image_guidance}")
        self.degradation()  # an invalid blur_radius / noise_std fails here, not on an actor

    def degradation(self) -> Degradation:
        """The mode's degradation with this section's overrides applied."""
        overrides = {k: v for k, v in (("blur_radius", self.blur_radius), ("noise_std", self.noise_std)) if v is not None}
        base = CDNS_MODES["self-play"] if self.mode == DPO_DINO_MODE else CDNS_MODES[self.mode]  # dpo-dino: undegraded
        try:
            return dataclasses.replace(base, **overrides)
        except ValueError as exc:
            raise ValueError(str(exc).replace("degradation.", "cdns.")) from None


@dataclass
class CdnsConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cdns: CdnsSection = field(default_factory=CdnsSection)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    runner: str = "ray"  # "ray" (Ray Data actor pool) or "local" (plain loop, same generator)

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner: unknown {self.runner!r}; use one of {list(RUNNERS)}")


def sample_seed(seed: int, sample_id: str) -> int:
    """A reproducible per-sample seed in [0, 2**31), independent of batching and of the actor."""
    digest = hashlib.sha256(f"{seed}/{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (1 << SEED_BITS)


class NegativeGenerator:
    """Triplet rows in, quadruplet rows out; loads the model (+ "ref" LoRA) once per instance (= per actor).

    Args:
        config: the job's config (only ``model`` and ``cdns`` are read).
        device: where to load the model; None = CUDA when available, else CPU.
    """

    def __init__(self, config: CdnsConfig, device: str | None = None) -> None:
        from sfo import adapters
        from sfo.models import load_flux
        from sfo.sampler import SamplerConfig

        self.section = config.cdns
        self.degradation = config.cdns.degradation()
        self.model = load_flux(config.model.source, device=device, dtype=config.model.dtype)
        transformer = self.model.transformer
        if config.model.ref_adapter is not None:
            adapters.load_adapter(transformer, config.model.ref_adapter, adapters.REF)
            self.adapter_sha = adapters.adapter_fingerprint(transformer, [adapters.REF])
            self._adapters = lambda: adapters.ref_only(transformer)
        else:
            self.adapter_sha = NO_ADAPTER
            self._adapters = lambda: adapters.use_adapters(transformer, [])
        s = self.section
        self.sampler = SamplerConfig(steps=s.steps, guidance=s.guidance, height=s.size, width=s.size,
                                     image_guidance=s.image_guidance)

    def __call__(self, batch: dict | pa.Table) -> pa.Table:
        """Generates one negative per row.

        Args:
            batch: B triplet rows, as a dict of columns (Ray Data's numpy batches: object arrays of
                str / bytes) or a ``pa.Table``; columns of ``TRIPLET_SCHEMA``.
        Returns:
            A ``pa.Table`` of B rows in ``QUADRUPLET_SCHEMA`` (the triplet columns passed through).
        """
        from PIL import Image

        from sfo.degrade import degrade_condition
        from sfo.records import decode_png, encode_png
        from sfo.sampler import generate

        columns = batch.to_pydict() if isinstance(batch, pa.Table) else {k: list(v) for k, v in batch.items()}
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        side = (self.section.size, self.section.size)
        seeds, prompts, references = [], [], []
        for row in rows:
            seed = sample_seed(self.section.seed, str(row["sample_id"]))
            reference = decode_png(row["reference_png"]).resize(side, Image.BICUBIC)
            target = decode_png(row["target_png"]).resize(side, Image.BICUBIC)
            reference, prompt = degrade_condition(reference, str(row["target_text"]), str(row["item"]),
                                                  self.degradation, seed=seed, target=target)
            seeds.append(seed)
            prompts.append(prompt)
            references.append(reference)
        with self._adapters():
            negatives = generate(self.model, prompts, seeds, self.sampler, references)
        d, s = self.degradation, self.section
        out = {f.name: list(columns[f.name]) for f in TRIPLET_SCHEMA}  # passed through unchanged
        out.update({
            "negative_png": [encode_png(image) for image in negatives],
            "negative_mode": [s.mode] * len(rows),
            "negative_image_degradation": [d.image] * len(rows),
            "negative_text_degradation": [d.text] * len(rows),
            "negative_blur_radius": [d.blur_radius if d.image == "blur" else None] * len(rows),
            "negative_noise_std": [d.noise_std if d.image == "noise" else None] * len(rows),
            "negative_prompt": prompts,
            "negative_seed": seeds,
            "negative_steps": [s.steps] * len(rows),
            "negative_guidance": [s.guidance] * len(rows),
            "negative_adapter_sha256": [self.adapter_sha] * len(rows),
        })
        return pa.Table.from_pydict(out, schema=QUADRUPLET_SCHEMA)


def parquet_files(path: Path) -> list[Path]:
    """The Parquet files of a file or folder, sorted (hidden and ``_``-prefixed files skipped)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))


def check_inputs(config: CdnsConfig) -> list[Path]:
    """Fails before any work when the input is missing or is not triplet Parquet; returns its files."""
    source = config.data.input
    if source is None or not source.exists():
        raise ConfigError(f"data.input: {str(source)!r} does not exist; pass the triplet Parquet file or "
                          "folder the prepare stage wrote (data.input=...)")
    files = parquet_files(source)
    if not files:
        raise ConfigError(f"data.input: no *.parquet under {str(source)!r}")
    for path in files:
        try:
            check_schema(pq.read_schema(path), TRIPLET_SCHEMA, f"data.input {path}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return files


def done_sample_ids(output: Path) -> tuple[set[str], list[Path]]:
    """Sample ids already in ``output``'s Parquet files; unreadable files are renamed ``*.incomplete``."""
    done: set[str] = set()
    moved = []
    for path in parquet_files(output) if output.exists() else []:
        try:
            ids = pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist()
        except Exception:  # a file cut short by an interruption: redo its samples
            path.rename(path.with_name(path.name + ".incomplete"))
            moved.append(path)
            continue
        done.update(ids)
    return done, moved


def plan(config: CdnsConfig, files: list[Path]) -> tuple[list[str], int]:
    """(sample ids still to generate, in input order; how many of the selected were already done)."""
    ids = pq.ParquetDataset(files).read(columns=["sample_id"]).column("sample_id").to_pylist()
    if config.data.limit is not None:
        ids = ids[: config.data.limit]
    done, moved = done_sample_ids(config.data.output)
    for path in moved:
        print(f"[cdns] moved unreadable {path} aside (*.incomplete); its samples are regenerated", flush=True)
    todo = [i for i in ids if i not in done]
    return todo, len(ids) - len(todo)


def _keep(batch: pa.Table, todo: list[str]) -> pa.Table:
    return batch.filter(pc.is_in(batch["sample_id"], value_set=pa.array(todo, pa.string())))


def generator_class(config: CdnsConfig) -> type[NegativeGenerator]:
    """``NegativeGenerator``, or ``pipelines.dpo_dino.DpoDinoGenerator`` for mode "dpo-dino"."""
    if config.cdns.mode == DPO_DINO_MODE:
        from pipelines.dpo_dino import DpoDinoGenerator

        return DpoDinoGenerator
    return NegativeGenerator


def run_local(config: CdnsConfig, files: list[Path], todo: list[str], prefix: str) -> int:
    """The plain loop: the same generator class as the Ray job, one Parquet file per model batch (at most
    ``rows_per_file`` rows). Returns rows written."""
    generator = generator_class(config)(config)
    table = _keep(pq.ParquetDataset(files).read(), todo)
    config.data.output.mkdir(parents=True, exist_ok=True)
    size = min(config.cdns.batch_size, config.cdns.rows_per_file)
    for index, start in enumerate(range(0, table.num_rows, size)):
        out = generator(table.slice(start, size))
        pq.write_table(out, config.data.output / f"{prefix}_{index:06d}.parquet")
        print(f"[cdns] local: {start + out.num_rows}/{table.num_rows} rows", flush=True)
    return table.num_rows


def run_ray(config: CdnsConfig, files: list[Path], todo: list[str], prefix: str) -> int:
    """Ray Data: read -> filter done ids -> actor pool of ``NegativeGenerator`` -> write Parquet."""
    import ray
    from ray.data.datasource import FilenameProvider

    init_ray()  # --address, RAY_ADDRESS or a fresh local Ray: never a stale one
    scaling = config.scaling
    gpus = {"num_gpus": scaling.gpus_per_worker} if scaling.use_gpu else {}
    ray_data_progress()
    ds = ray.data.read_parquet([str(p) for p in files])
    ds = ds.map_batches(_keep, fn_kwargs={"todo": todo}, batch_format="pyarrow")
    # Blocks of rows_per_file rows whatever the input's layout (Ray's reader may pack several files into one
    # block, whose output would then be written only at the very end): each generator task gets one, and its
    # file is written when it is done. Streaming (no all-to-all), and Ray does not fuse it into the next map.
    ds = ds.repartition(target_num_rows_per_block=config.cdns.rows_per_file)
    ds = ds.map_batches(
        generator_class(config),
        fn_constructor_kwargs={"config": config},
        compute=ray.data.ActorPoolStrategy(size=scaling.num_workers),
        batch_size=min(config.cdns.batch_size, config.cdns.rows_per_file),  # a batch never spans two output files
        batch_format="numpy",
        num_cpus=scaling.cpus_per_worker,
        **gpus,
    )
    ds.write_parquet(str(config.data.output), filename_provider=FilenameProvider(prefix, "parquet"))
    return len(todo)


def run(config: CdnsConfig) -> dict:
    """Checks inputs, skips done samples, generates the rest; returns {"skipped", "written", "output"}."""
    files = check_inputs(config)
    todo, skipped = plan(config, files)
    print(f"[cdns] mode {config.cdns.mode}: {skipped} sample(s) already in {config.data.output}, "
          f"{len(todo)} to generate ({config.runner})", flush=True)
    written = 0
    if todo:
        started = time.time()
        prefix = f"cdns-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        written = (run_local if config.runner == "local" else run_ray)(config, files, todo, prefix)
        print(f"[cdns] wrote {written} row(s) as {config.data.output}/{prefix}_*.parquet "
              f"in {time.time() - started:.1f} s", flush=True)
    return {"skipped": skipped, "written": written, "output": config.data.output}


def main(argv: list[str] | None = None) -> int:
    return job_main(CdnsConfig, "python -m pipelines.cdns", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
