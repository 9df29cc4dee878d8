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

import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.common import (
    ModelShape, check_cluster_gpus, check_memory_plan, distinct_rows, init_ray, model_shape, plan_dtype, ray_data_progress,
)
from pipelines.config import ConfigError, job_main
from pipelines.dpo_dino import DpoDinoGenerator
from pipelines.negatives import (  # noqa: F401 - the job's config and generator, re-exported
    DPO_DINO_MODE, NO_ADAPTER, RUNNERS, SEED_BITS, CdnsConfig, CdnsSection, DataConfig, NegativeGenerator, sample_seed,
)
from pipelines.resume import done_keys, parquet_files  # noqa: F401 - parquet_files re-exported
from sfo.records import TRIPLET_SCHEMA, check_schema


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
    found, moved = done_keys(output, ["sample_id"])
    return {key[0] for key in found}, moved


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


def plan_memory(config: CdnsConfig, shape: ModelShape):
    """The per-GPU memory plan of one actor's sampling batch (``sfo.memory.memory_plan``, job ``sample``): the
    model, ``cdns.batch_size`` at ``cdns.size``, the reference's K/V cache, the folded adapters' copy."""
    from sfo.memory import memory_plan

    fused = config.model.fuse_adapters and config.model.ref_adapter is not None
    return memory_plan(shape.config, job="sample", image_size=config.cdns.size, batch_size=config.cdns.batch_size,
                       text_tokens=shape.text_tokens, dtype=plan_dtype(config.model.dtype, config.scaling.use_gpu),
                       fused=fused, pixels_per_token=shape.pixels_per_token)


def _keep(batch: pa.Table, todo: list[str]) -> pa.Table:
    return batch.filter(pc.is_in(batch["sample_id"], value_set=pa.array(todo, pa.string())))


def cache_fits(config: CdnsConfig, files: list[Path]) -> bool:
    """Whether the triplets carry encoder caches (``sfo.records.CACHE_FIELDS``) made with this job's model at
    ``cdns.size``: then the output keeps them and adds the negatives' latents, so the sfo job runs no
    encoder. Decided once, here; a cache that does not fit is dropped with one line saying why."""
    from sfo.models import model_identity
    from sfo.records import CACHE_COLUMNS

    if not set(CACHE_COLUMNS) <= set(pq.read_schema(files[0]).names):
        return False
    made = distinct_rows(files, ["cache_model", "cache_size"])
    wanted = (model_identity(config.model.source), config.cdns.size)
    if config.cdns.mode == DPO_DINO_MODE or made != {wanted}:
        why = (f"mode {DPO_DINO_MODE} does not carry caches" if config.cdns.mode == DPO_DINO_MODE else
               f"they were made with (model, size) {sorted(made)}, not {wanted} (model.source, cdns.size)")
        print(f"[cdns] data.input: dropping the cached latents/embeddings: {why}", flush=True)
        return False
    print(f"[cdns] data.input: keeping the cached latents/embeddings ({wanted[0]}, {wanted[1]} px) and adding the "
          "negatives' latents", flush=True)
    return True


def generator_kwargs(config: CdnsConfig, files: list[Path]) -> dict:
    return {"config": config} | ({"keep_cache": True} if cache_fits(config, files) else {})


def generator_class(config: CdnsConfig) -> type[NegativeGenerator]:
    """``NegativeGenerator``, or ``pipelines.dpo_dino.DpoDinoGenerator`` for mode "dpo-dino"."""
    if config.cdns.mode == DPO_DINO_MODE:
        return DpoDinoGenerator
    return NegativeGenerator


def run_local(config: CdnsConfig, files: list[Path], todo: list[str], prefix: str) -> None:
    """The plain loop: the same generator class as the Ray job, one Parquet file per model batch (at most
    ``rows_per_file`` rows)."""
    generator = generator_class(config)(**generator_kwargs(config, files))
    table = _keep(pq.ParquetDataset(files).read(), todo)
    config.data.output.mkdir(parents=True, exist_ok=True)
    size = min(config.cdns.batch_size, config.cdns.rows_per_file)
    for index, start in enumerate(range(0, table.num_rows, size)):
        out = generator(table.slice(start, size))
        if out.num_rows:  # cdns.oracle_filter may drop a whole batch
            pq.write_table(out, config.data.output / f"{prefix}_{index:06d}.parquet")
        print(f"[cdns] local: {min(start + size, table.num_rows)}/{table.num_rows} rows", flush=True)


def run_ray(config: CdnsConfig, files: list[Path], todo: list[str], prefix: str) -> None:
    """Ray Data: read -> filter done ids -> actor pool of ``NegativeGenerator`` -> write Parquet."""
    import ray

    init_ray()  # --address, RAY_ADDRESS or a fresh local Ray: never a stale one
    scaling = config.scaling
    check_cluster_gpus(scaling, "cdns")
    gpus = {"num_gpus": scaling.gpus_per_worker} if scaling.use_gpu else {}
    ray_data_progress()
    # Output files numbered in input order, not in the order the actors finish: training reads them in file
    # order, so otherwise the same negatives reached the sfo job in another order on every run (and moved its
    # result by up to 0.02 subject fidelity in the shapes world).
    context = ray.data.DataContext.get_current()
    ordered = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        _write_negatives(config, files, todo, prefix, gpus)
    finally:
        context.execution_options.preserve_order = ordered


def _write_negatives(config: CdnsConfig, files: list[Path], todo: list[str], prefix: str, gpus: dict) -> None:
    import ray
    from ray.data.datasource import FilenameProvider

    scaling = config.scaling
    ds = ray.data.read_parquet([str(p) for p in files])
    ds = ds.map_batches(_keep, fn_kwargs={"todo": todo}, batch_format="pyarrow")
    # Blocks of rows_per_file rows whatever the input's layout (Ray's reader may pack several files into one
    # block, whose output would then be written only at the very end): each generator task gets one, and its
    # file is written when it is done. Streaming (no all-to-all), and Ray does not fuse it into the next map.
    ds = ds.repartition(target_num_rows_per_block=config.cdns.rows_per_file)
    ds = ds.map_batches(
        generator_class(config),
        fn_constructor_kwargs=generator_kwargs(config, files),
        compute=ray.data.ActorPoolStrategy(size=scaling.num_workers),
        batch_size=min(config.cdns.batch_size, config.cdns.rows_per_file),  # a batch never spans two output files
        batch_format="numpy",
        num_cpus=scaling.cpus_per_worker,
        **gpus,
    )
    ds.write_parquet(str(config.data.output), filename_provider=FilenameProvider(prefix, "parquet"))


def run(config: CdnsConfig) -> dict:
    """Checks inputs, skips done samples, generates the rest; returns {"skipped", "written", "dropped",
    "output"} (dropped: pairs ``cdns.oracle_filter`` left out)."""
    files = check_inputs(config)
    shape = model_shape(config.model.source)
    check_memory_plan(plan_memory(config, shape), config.scaling, shape, "cdns")  # before any model loads
    todo, skipped = plan(config, files)
    print(f"[cdns] mode {config.cdns.mode}: {skipped} sample(s) already in {config.data.output}, "
          f"{len(todo)} to generate ({config.runner})", flush=True)
    written = dropped = 0
    if todo:
        started = time.time()
        prefix = f"cdns-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        (run_local if config.runner == "local" else run_ray)(config, files, todo, prefix)
        done = done_sample_ids(config.data.output)[0]  # moves a file cut short by a killed writer aside
        missing = [i for i in todo if i not in done]
        if missing and config.runner == "ray" and not config.cdns.oracle_filter:  # the filter's drops are not lost
            print(f"[cdns] {len(missing)} sample(s) missing after the pass (a worker died while writing their file); "
                  "generating them again", flush=True)
            run_ray(config, files, missing, prefix + "-redo")
            done = done_sample_ids(config.data.output)[0]
        written = len(set(todo) & done)  # counted from the files: the filter drops rows
        dropped = len(todo) - written
        note = f", dropped {dropped} pair(s) whose negative kept the reference's details" if config.cdns.oracle_filter else ""
        print(f"[cdns] wrote {written} row(s) as {config.data.output}/{prefix}_*.parquet "
              f"in {time.time() - started:.1f} s{note}", flush=True)
    return {"skipped": skipped, "written": written, "dropped": dropped, "output": config.data.output}


def main(argv: list[str] | None = None) -> int:
    return job_main(CdnsConfig, "python -m pipelines.cdns", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
