"""prepare: builds the triplet Parquet (reference image, target text, target image) every stage reads.

    python -m pipelines.prepare --config pipelines/configs/prepare.yaml [key=value ...]

Sources (``pipelines.prepare_sources``):
- ``shapes``: the shapes world (``sfo.shapes.world``; 48 px, exact oracles), the main job's default.
- ``synthetic``: simple procedural subjects at any size (no downloads).
- ``subjects200k``: Subjects200K pairs (paper Sec. 3.1 / App. D.2), either a folder of
  ``NAME.png`` (the pair image) + ``NAME.txt`` ("Instance: ...", "Description1: ...",
  "Description2: ...") and optional ``NAME.json`` quality scores, as in the dataset card's
  notebook; or Parquet shards in the Hugging Face layout (``image`` {bytes}, ``description``
  {item, description_0, description_1}, ``quality_assessment`` {compositeStructure,
  objectConsistency, imageQuality}). Pairs with any quality score below ``min_quality`` (5, as
  OminiControl) are dropped; pairs without scores are kept and counted.

Each pair gives one triplet: one panel is the reference, the other the target, described by its
own description. Which panel is which is decided per pair by a hash of its id (or both ways with
``both_directions``), so reruns give the same rows.

``data.input`` and ``data.output`` are local paths, ``s3://bucket/key`` or ``gs://bucket/key``
(``cluster.storage``). Rows go to ``part-NNNNN.parquet`` files of ``data.rows_per_file`` rows, numbered in
source order and each written whole by this process (the driver). Re-running into the same ``data.output``
resumes (``pipelines.resume``): finished files are kept, only the missing sample ids are made (and
encoded), none is written twice, and the files end as an uninterrupted run's; a finished output is left
as it is. The config is recorded in ``<output>/_prepare.json``: a rerun with other content (another
source, size, limit, seed, cache...) fails naming the field. ``cache.batch_size``, ``data.rows_per_file``
and ``scaling.*`` may change between runs.

With ``cache.enabled`` the rows also carry the frozen encoders' outputs (``sfo.records.CACHE_FIELDS``:
VAE latents of target and reference, T5 and pooled CLIP embeddings of the target text, and the
model, size and storage dtype they were made with), which the sft/sfo jobs use instead of encoding the
PNGs when their ``model.source`` and ``data.size`` match. The encoding is a Ray Data stage: the source's
rows (Subjects200K panels cut and resized in Ray Data, not on the driver; Ray may fuse that map into the
actors when both ask for the same resources) go to an actor pool of ``CacheEncoder``
(``scaling.num_workers`` actors, ``scaling.gpus_per_worker`` GPUs each with ``scaling.use_gpu``), so the
model is loaded on the actors, never on the driver, and many GPUs encode at once; the driver receives the
encoded rows in source order and writes each file. Two dtypes, two fields:

- ``cache.dtype``: the encoders' *compute* dtype (null: bf16 on GPU, fp32 on CPU), as ``model.dtype``.
- ``cache.store_dtype``: how the tensors are *stored*, ``bf16`` (default: half the bytes; FLUX.1-dev's T5
  embeddings of one prompt are 4 MiB instead of 8) or ``fp32``; each row's ``cache_dtype`` column says
  which (``sfo.records.cache_bytes`` / ``decode_cache``).

Without the cache no model is involved: the driver renders and writes the rows itself (no Ray).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import pyarrow as pa

from cluster import storage
from pipelines.common import (
    ScalingConfig, check_cluster_gpus, check_dtype, init_ray, ray_data_progress, use_torch_threads,
)
from pipelines.config import job_main, to_dict
from pipelines.prepare_sources import quality_note, render_rows, shapes_rows, subjects200k_rows, synthetic_rows
from pipelines.resume import check_same_config, done_keys, parquet_files, write_manifest, write_table_atomic
from sfo.records import CACHE_DTYPES, CACHE_FIELDS, TRIPLET_SCHEMA, cache_bytes, decode_png
from sfo.shapes.world import SIZE as WORLD_SIZE

SOURCES = ("shapes", "synthetic", "subjects200k")
ROWS_PER_FILE = 1000
STAGE = "prepare"  # its record: <output>/_prepare.json
# Fields that change how the work is cut, not what any row holds: a rerun may change them (a smaller
# cache.batch_size after running out of memory). Batches of another size may move cached floats in their
# last bits (conv reductions), nothing more. Every scaling.* field too.
EXECUTION_FIELDS = ("data.output", "data.rows_per_file", "cache.batch_size")
PART = "prepare_part"  # the output file a row goes to, carried through the Ray Data stage (not written)


@dataclass
class DataConfig:
    source: str = "synthetic"
    input: str | None = None  # Subjects200K folder or Parquet shard folder (source subjects200k): a path, s3:// or gs://
    output: str = "runs/data/triplets"  # folder of Parquet files (path or URI); reruns resume into it
    limit: int | None = None  # at most this many triplets (synthetic: exactly, default 16)
    size: int = 512  # panels are resized to size x size
    seed: int = 0
    padding: int = 8  # Subjects200K panel padding (0 for padding-free 1024x512 copies)
    min_quality: int = 5  # OminiControl's filter: every quality score >= 5
    both_directions: bool = False  # two triplets per pair (each panel as the reference once)
    rows_per_file: int = ROWS_PER_FILE  # rows per output file: a kill loses at most the file being made; with the
    #                                     cache the driver holds one file's encoded rows (FLUX.1-dev: ~4.3 MiB/row in bf16)

    def __post_init__(self) -> None:
        if self.input is not None:
            self.input = storage.check_uri(self.input, "data.input")
        self.output = storage.check_uri(self.output, "data.output")
        if self.source not in SOURCES:
            raise ValueError(f"data.source: unknown source {self.source!r}; use one of {list(SOURCES)}")
        if self.source == "subjects200k" and not self.input:
            raise ValueError("data.input: the subjects200k source needs the folder of pairs (data.input=PATH)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.limit: must be at least 1, got {self.limit}")
        if self.rows_per_file < 1:
            raise ValueError(f"data.rows_per_file: must be at least 1, got {self.rows_per_file}")
        if self.size < 16 or self.size % 16:
            raise ValueError(f"data.size: must be a positive multiple of 16, got {self.size}")
        if self.source == "shapes" and self.size != WORLD_SIZE:
            raise ValueError(f"data.size: the shapes world is drawn at {WORLD_SIZE} px; set data.size={WORLD_SIZE}")


@dataclass
class CacheConfig:
    """Optional encoder outputs per row (``sfo.records.CACHE_FIELDS``), for training without the encoders."""

    enabled: bool = False
    model: str = "tiny"  # the FLUX the training job will load ("tiny" or a local FLUX.1-dev folder)
    size: int | None = None  # pixel side to encode at; default data.size (must equal the training data.size)
    dtype: str | None = None  # compute dtype, bf16 | fp32; default bf16 on GPU, fp32 on CPU (as model.dtype)
    store_dtype: str = "bf16"  # how the tensors are stored: bf16 (half the bytes) | fp32; rows' cache_dtype column
    batch_size: int = 8  # rows per encoder call (per actor)

    def __post_init__(self) -> None:
        if self.size is not None and (self.size < 16 or self.size % 16):
            raise ValueError(f"cache.size: must be a positive multiple of 16, got {self.size}")
        if self.batch_size < 1:
            raise ValueError(f"cache.batch_size: must be at least 1, got {self.batch_size}")
        if not self.model:
            raise ValueError("cache.model: must not be empty; 'tiny' or a local FLUX.1-dev folder")
        check_dtype(self.dtype, "cache")
        if self.store_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache.store_dtype: unknown {self.store_dtype!r}; use one of {list(CACHE_DTYPES)}")


@dataclass
class PrepareConfig:
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    # The encoder actors (cache.enabled only): scaling.num_workers actors, scaling.gpus_per_worker GPUs each
    # with scaling.use_gpu, scaling.cpus_per_worker CPUs each (and for each Subjects200K render task).
    scaling: ScalingConfig = field(default_factory=ScalingConfig)


class CacheEncoder:
    """Adds ``CACHE_FIELDS`` to rows: the frozen VAE and text encoders' outputs (no math of its own). One
    instance per Ray Data actor: the model loads there, once.

    Args:
        config: the cache section (model, size, compute ``dtype``, ``store_dtype``, ``batch_size``).
        data_size: ``data.size``, the default encoding size.
        scaling: the actors' ``torch_threads``.
    """

    def __init__(self, config: CacheConfig, data_size: int, scaling: ScalingConfig | None = None) -> None:
        from sfo.models import load_flux, model_identity

        if scaling is not None:
            use_torch_threads(scaling)
        self.config = config
        self.size = config.size or data_size
        self.identity = model_identity(config.model)
        self.model = load_flux(config.model, dtype=config.dtype)

    def _images(self, column: list[bytes]) -> list:
        images = [decode_png(b) for b in column]  # resized as the training job resizes PNGs
        return [im if im.size == (self.size, self.size) else im.resize((self.size, self.size)) for im in images]

    def __call__(self, batch: pa.Table) -> pa.Table:
        """B triplet rows (a Ray Data ``pyarrow`` batch; extra columns pass through) -> the same rows with
        ``CACHE_FIELDS``, tensors as ``cache.store_dtype`` bytes."""
        from sfo.latents import encode_images
        from sfo.text import encode_prompts

        rows, out, dtype = batch.to_pylist(), [], self.config.store_dtype
        for start in range(0, len(rows), self.config.batch_size):
            chunk = rows[start:start + self.config.batch_size]
            target = encode_images(self.model, self._images([r["target_png"] for r in chunk])).float().cpu()  # (B, L, 64)
            reference = encode_images(self.model, self._images([r["reference_png"] for r in chunk])).float().cpu()
            text = encode_prompts(self.model, [r["target_text"] for r in chunk])
            embeds, pooled = text.prompt_embeds.float().cpu(), text.pooled.float().cpu()  # (B, Lt, D), (B, P)
            for i, row in enumerate(chunk):
                out.append(row | {
                    "cache_target_latents": cache_bytes(target[i].numpy(), dtype),
                    "cache_reference_latents": cache_bytes(reference[i].numpy(), dtype),
                    "cache_prompt_embeds": cache_bytes(embeds[i].numpy(), dtype),
                    "cache_pooled": cache_bytes(pooled[i].numpy(), dtype),
                    "cache_latent_tokens": target.shape[1], "cache_text_tokens": embeds.shape[1],
                    "cache_model": self.identity, "cache_size": self.size, "cache_dtype": dtype,
                })
        return pa.Table.from_pylist(out)


def render_batch(batch: pa.Table, size: int, padding: int) -> pa.Table:
    """``prepare_sources.render_rows`` as a Ray Data ``pyarrow`` map: units in, triplet rows (+ ``PART``) out."""
    return pa.Table.from_pylist(render_rows(batch.to_pylist(), size, padding))


def recorded_fields(config: PrepareConfig) -> dict:
    """What the rows depend on, as dotted field -> plain value (``EXECUTION_FIELDS`` and ``scaling.*`` left out;
    paths made absolute, URIs kept)."""
    fields = {f"{section}.{name}": value
              for section, values in to_dict(config).items() for name, value in values.items()}
    if fields["data.input"] is not None:
        fields["data.input"] = storage.absolute(fields["data.input"])
    if storage.exists(fields["cache.model"]):  # a local FLUX folder, not "tiny"
        fields["cache.model"] = storage.absolute(fields["cache.model"])
    return {k: v for k, v in fields.items() if k not in EXECUTION_FIELDS and not k.startswith("scaling.")}


def free_name(output: str, index: int) -> str:
    """``part-{index}.parquet``, or ``part-{index}-{k}.parquet`` with the first free k when a kept file has the
    name (local or URI)."""
    path, k = storage.join(output, f"part-{index:05d}.parquet"), 0
    while storage.exists(path):
        k += 1
        path = storage.join(output, f"part-{index:05d}-{k}.parquet")
    return path


def plan_parts(config: DataConfig, rows, done: set[str]) -> tuple[list[tuple[int, list[dict]]], int]:
    """(the output files still to make: (part index, its missing units), in source order; the source's total
    rows). Part k holds rows k * rows_per_file ... of the source (done rows included), as a straight run."""
    parts: dict[int, list[dict]] = {}
    total = 0
    for row in rows:
        if row["sample_id"] not in done:
            parts.setdefault(total // config.rows_per_file, []).append(row)
        total += 1
        if config.limit is not None and total >= config.limit:
            break
    return list(parts.items()), total


def encode_on_ray(config: PrepareConfig, parts: list[tuple[int, list[dict]]]):
    """The cache's Ray Data stage: units -> render tasks -> ``CacheEncoder`` actor pool; yields (part, rows) in
    source order, one output file's rows at a time (what the driver holds)."""
    import ray

    init_ray()  # --address, RAY_ADDRESS or a fresh local Ray (the main job's, when it started one)
    scaling = config.scaling
    check_cluster_gpus(scaling, STAGE)
    gpus = {"num_gpus": scaling.gpus_per_worker} if scaling.use_gpu else {}
    ray_data_progress()
    context = ray.data.DataContext.get_current()
    ordered = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # rows come back in source order: files as a straight run's
    try:
        # One block per output file: the encoder's batches never span two files, as in a rerun that makes one.
        ds = ray.data.from_blocks([pa.Table.from_pylist([u | {PART: part} for u in units]) for part, units in parts])
        ds = ds.map_batches(render_batch, fn_kwargs={"size": config.data.size, "padding": config.data.padding},
                            batch_size=None, batch_format="pyarrow", num_cpus=scaling.cpus_per_worker)
        ds = ds.map_batches(
            CacheEncoder,
            fn_constructor_kwargs={"config": config.cache, "data_size": config.data.size, "scaling": scaling},
            compute=ray.data.ActorPoolStrategy(size=scaling.num_workers),
            batch_size=min(config.cache.batch_size, config.data.rows_per_file),
            batch_format="pyarrow",
            num_cpus=scaling.cpus_per_worker,
            **gpus,
        )
        current, rows = None, []
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                if row[PART] != current and rows:
                    yield current, rows
                    rows = []
                current = row[PART]
                rows.append(row)
        if rows:
            yield current, rows
    finally:
        context.execution_options.preserve_order = ordered


def run(config: PrepareConfig) -> str:
    """Writes the triplet Parquet files, or the ones an earlier run into ``data.output`` left missing; returns
    the output folder (path or URI, as given)."""
    data = config.data
    output = data.output
    manifest = check_same_config(output, STAGE, recorded_fields(config), field_of_output="data.output",
                                 has_files=bool(parquet_files(output)),
                                 fresh_fix=f"pick a new data.output (or delete {output!r} yourself)")
    found, moved = done_keys(output, ["sample_id"])
    done = {key[0] for key in found}
    for path in moved:
        print(f"prepare: moved unreadable {path} aside (*.incomplete); its rows are made again", flush=True)
    finished = manifest.get("finished")
    if finished and not moved and len(done) == finished["rows"]:
        print(f"prepare: {output} already holds all {len(done)} triplets of this config; nothing to do", flush=True)
        return output
    if done:
        print(f"prepare: resuming: {len(done)} triplet(s) already in {output} are kept; making the rest", flush=True)
    stats = {"pairs": 0, "filtered": 0, "unscored": 0}
    sources = {"shapes": shapes_rows, "synthetic": synthetic_rows}
    rows = sources[data.source](data, done) if data.source in sources else subjects200k_rows(data, stats, done)
    parts, total = plan_parts(data, rows, done)
    if total == 0:
        raise ValueError(f"data.input: no triplet survived (pairs read: {stats['pairs']}, "
                         f"below quality {data.min_quality}: {stats['filtered']})")
    schema = pa.schema(list(TRIPLET_SCHEMA) + CACHE_FIELDS) if config.cache.enabled else TRIPLET_SCHEMA
    storage.makedirs(output)
    started, written = time.time(), 0
    if not parts:
        made = iter(())
    elif config.cache.enabled:
        made = encode_on_ray(config, parts)  # the model loads on the actors only when something is left to encode
    else:
        made = ((part, render_rows(units, data.size, data.padding)) for part, units in parts)
    for part, out in made:
        write_table_atomic(pa.Table.from_pylist(out, schema=schema), free_name(output, part))
        written += len(out)
        print(f"  prepare: {total} triplets, {written} new ({written / (time.time() - started):.1f}/s)", flush=True)
    write_manifest(output, STAGE, manifest | {"finished": {"rows": total}})
    detail = "" if data.source in sources else quality_note(stats, data.min_quality)
    cached = f" with cached latents/embeddings ({config.cache.store_dtype})" if config.cache.enabled else ""
    kept = f" ({total - written} kept from an earlier run)" if total > written else ""
    print(f"prepare: wrote {written} triplets{kept}{detail}{cached} to {output} in {time.time() - started:.1f} s",
          flush=True)
    return output


def main(argv: list[str] | None = None) -> int:
    return job_main(PrepareConfig, "python -m pipelines.prepare", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
