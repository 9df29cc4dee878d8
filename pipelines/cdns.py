"""CDNS stage (SFO paper Sec. 3.3): triplet Parquet -> quadruplet Parquet with a generated negative per sample.

Each negative is sampled by the SFT model (base + "ref" LoRA) from a *degraded* condition
(``sfo.degrade``: blurred reference + "a photo of {item}" for mode ``cdns``). One callable class,
``NegativeGenerator``, does the work for the Ray Data job (an actor pool of it) and for the
plain in-process loop (``runner=local``), so both give identical bytes for the same sample.

    python -m pipelines.cdns --config pipelines/configs/cdns.yaml [key=value ...]

``data.input``, ``data.output`` and ``model.ref_adapter`` are local paths or ``s3://`` / ``gs://`` URIs
(``cluster.storage``; Ray Data reads and writes the URIs itself, the actors download the adapter).

Re-running into the same ``data.output`` resumes: sample ids already written are skipped,
unreadable (interrupted) files are moved aside as ``*.incomplete`` and their samples redone. The config is
recorded in ``<output>/_cdns.json``: a rerun that would make other negatives (another model, adapter, input,
mode, sampler, seed...) fails naming the field; ``EXECUTION_FIELDS`` (batch size, actors, runner, limit) may
change.

With cached triplets (``prepare``'s ``cache.enabled``) the output refers to their tensors by ``sample_id``
rather than copying them (``sfo.records.CACHED_QUADRUPLET_SCHEMA``): it adds the negatives' latents and the
cache's small columns; the sfo job joins the rest back from the triplets (its ``data.cache_path``).
"""

from __future__ import annotations

import sys
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cluster import storage
from pipelines.common import (
    ModelShape, check_cluster_gpus, check_memory_plan, distinct_rows, init_ray, model_shape, plan_dtype, ray_data_progress,
)
from pipelines.config import ConfigError, job_main, to_dict
from pipelines.dpo_dino import DpoDinoGenerator
from pipelines.evaluate_io import adapter_sha256
from pipelines.negatives import (  # noqa: F401 - the job's config and generator, re-exported
    DPO_DINO_MODE, LEGACY_CACHE_DTYPE, NO_ADAPTER, RUNNERS, SEED_BITS, CdnsConfig, CdnsSection, DataConfig,
    NegativeGenerator, sample_seed,
)
from pipelines.resume import check_same_config, done_keys, parquet_files, write_table_atomic  # noqa: F401 - re-exported
from sfo.records import TRIPLET_SCHEMA, check_schema

STAGE = "cdns"  # its record: <output>/_cdns.json
# Fields that change how the work is cut or run, not which negative a sample gets: a rerun may change them
# (a smaller cdns.batch_size after running out of memory; data.limit to extend a run). Batches of another size
# may move a negative's floats in their last bits (batched kernels), nothing more.
EXECUTION_FIELDS = ("data.output", "data.limit", "cdns.batch_size", "cdns.rows_per_file", "scaling", "runner")


def check_inputs(config: CdnsConfig) -> list[str]:
    """Fails before any work when the input is missing or is not triplet Parquet; returns its files (paths or URIs)."""
    source = config.data.input
    if source is None or not storage.exists(source):
        raise ConfigError(f"data.input: {source!r} does not exist; pass the triplet Parquet file or "
                          "folder the prepare stage wrote (data.input=...)")
    files = parquet_files(source)
    if not files:
        raise ConfigError(f"data.input: no *.parquet under {source!r}")
    for path in files:
        try:
            check_schema(storage.dataset(path).schema, TRIPLET_SCHEMA, f"data.input {path}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return files


def recorded_fields(config: CdnsConfig) -> dict:
    """What the negatives depend on, as dotted field -> plain value (``EXECUTION_FIELDS`` left out): the model
    (the "ref" adapter as its weight file's sha256, so a moved copy resumes), the input (absolute) and the
    cdns section."""
    plain = to_dict(config)
    fields = {f"{section}.{name}": value for section in ("model", "data", "cdns") for name, value in plain[section].items()}
    fields["data.input"] = storage.absolute(fields["data.input"])
    fields["model.ref_adapter"] = adapter_sha256(config.model.ref_adapter)
    for name in ("model.source", "cdns.dino_encoder"):
        if storage.exists(fields[name]):  # a local folder, not "tiny" / "shapes"
            fields[name] = storage.absolute(fields[name])
    return {k: v for k, v in fields.items() if not any(k == e or k.startswith(e + ".") for e in EXECUTION_FIELDS)}


def check_config(config: CdnsConfig) -> dict:
    """Records the config in ``<output>/_cdns.json``, or refuses one other than the output's (``pipelines.resume``)."""
    output = config.data.output
    return check_same_config(output, STAGE, recorded_fields(config), field_of_output="data.output",
                             has_files=bool(parquet_files(output)),
                             fresh_fix=f"pick a new data.output (or delete {output!r} yourself)")


def done_sample_ids(output: str) -> tuple[set[str], list[str]]:
    """Sample ids already in ``output``'s Parquet files; unreadable files are renamed ``*.incomplete``."""
    found, moved = done_keys(output, ["sample_id"])
    return {key[0] for key in found}, moved


def read_column(files: list[str], column: str) -> list:
    return pa.concat_tables([storage.read_table(f, columns=[column]) for f in files]).column(column).to_pylist()


def plan(config: CdnsConfig, files: list[str]) -> tuple[list[str], int]:
    """(sample ids still to generate, in input order; how many of the selected were already done)."""
    ids = read_column(files, "sample_id")
    if config.data.limit is not None:
        ids = ids[: config.data.limit]
    done, moved = done_sample_ids(config.data.output)
    for path in moved:
        print(f"[cdns] moved unreadable {path} aside (*.incomplete); its samples are regenerated", flush=True)
    todo = [i for i in ids if i not in done]
    return todo, len(ids) - len(todo)


def bytes_per_row(output: str) -> tuple[int, float]:
    """(rows, mean Parquet bytes per row) of ``output``'s files: what the sfo job reads per sample."""
    fs, _ = storage.resolve(output)
    files = [storage.resolve(f)[1] for f in parquet_files(output)]
    rows = sum(pq.read_metadata(path, filesystem=fs).num_rows for path in files)
    size = sum(info.size for info in fs.get_file_info(files))
    return rows, size / rows if rows else 0.0


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


def cache_fits(config: CdnsConfig, files: list[str]) -> bool:
    """Whether the triplets carry encoder caches (``sfo.records.CACHE_FIELDS``) made with this job's model at
    ``cdns.size``: then the output adds the negatives' latents and keeps the cache's small columns, referring
    to the triplets' tensors by ``sample_id``, so the sfo job runs no encoder. Decided once, here; a cache that
    does not fit is dropped with one line saying why."""
    from sfo.models import model_identity
    from sfo.records import CACHE_COLUMNS

    if not set(CACHE_COLUMNS) - {"cache_dtype"} <= set(storage.dataset(files[0]).schema.names):  # fp32 before it
        return False
    made = distinct_rows(files, ["cache_model", "cache_size"])
    wanted = (model_identity(config.model.source), config.cdns.size)
    if config.cdns.mode == DPO_DINO_MODE or made != {wanted}:
        why = (f"mode {DPO_DINO_MODE} does not carry caches" if config.cdns.mode == DPO_DINO_MODE else
               f"they were made with (model, size) {sorted(made)}, not {wanted} (model.source, cdns.size)")
        print(f"[cdns] data.input: dropping the cached latents/embeddings: {why}", flush=True)
        return False
    print(f"[cdns] data.input: the cached latents/embeddings fit ({wanted[0]}, {wanted[1]} px): adding the negatives' "
          "latents; the triplets' tensors are referred to by sample_id", flush=True)
    return True


def input_columns(files: list[str], keep_cache: bool) -> list[str]:
    """The triplet columns the generators read: never the cache's tensors (the output leaves them out), only
    its small columns when the cache is kept."""
    from sfo.records import CACHE_META_COLUMNS

    names = TRIPLET_SCHEMA.names
    if keep_cache:
        present = storage.dataset(files[0]).schema.names
        names = names + [c for c in CACHE_META_COLUMNS if c in present]
    return names


def generator_kwargs(config: CdnsConfig, keep_cache: bool) -> dict:
    return {"config": config} | ({"keep_cache": True} if keep_cache else {})


def generator_class(config: CdnsConfig) -> type[NegativeGenerator]:
    """``NegativeGenerator``, or ``pipelines.dpo_dino.DpoDinoGenerator`` for mode "dpo-dino"."""
    if config.cdns.mode == DPO_DINO_MODE:
        return DpoDinoGenerator
    return NegativeGenerator


def run_local(config: CdnsConfig, files: list[str], todo: list[str], prefix: str, keep_cache: bool = False) -> None:
    """The plain loop: the same generator class as the Ray job, one Parquet file per model batch (at most
    ``rows_per_file`` rows), each written whole."""
    generator = generator_class(config)(**generator_kwargs(config, keep_cache))
    columns = input_columns(files, keep_cache)
    table = _keep(pa.concat_tables([storage.read_table(f, columns=columns) for f in files]), todo)
    size = min(config.cdns.batch_size, config.cdns.rows_per_file)
    for index, start in enumerate(range(0, table.num_rows, size)):
        out = generator(table.slice(start, size))
        if out.num_rows:  # cdns.oracle_filter may drop a whole batch
            write_table_atomic(out, storage.join(config.data.output, f"{prefix}_{index:06d}.parquet"))
        print(f"[cdns] local: {min(start + size, table.num_rows)}/{table.num_rows} rows", flush=True)


def run_ray(config: CdnsConfig, files: list[str], todo: list[str], prefix: str, keep_cache: bool = False) -> None:
    """Ray Data: read -> filter done ids -> actor pool of ``NegativeGenerator`` -> write Parquet."""
    import ray

    init_ray()  # --address, RAY_ADDRESS or a fresh local Ray: never a stale one
    scaling = config.scaling
    check_cluster_gpus(scaling, "cdns")
    gpus = {"num_gpus": scaling.gpus_per_worker} if scaling.use_gpu else {}
    ray_data_progress()
    # Output files numbered in input order, mostly: Ray Data's streaming repartition below still moves a few
    # rows between and within files from run to run (seen with Ray 2.60 on uneven input blocks), so the sfo job
    # sorts its rows by sample_id (``train_data.training_dataset``) rather than trusting this order.
    context = ray.data.DataContext.get_current()
    ordered = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        _write_negatives(config, files, todo, prefix, gpus, keep_cache)
    finally:
        context.execution_options.preserve_order = ordered


def _write_negatives(config: CdnsConfig, files: list[str], todo: list[str], prefix: str, gpus: dict,
                     keep_cache: bool) -> None:
    import ray
    from ray.data.datasource import FilenameProvider

    scaling = config.scaling
    ds = ray.data.read_parquet(files, columns=input_columns(files, keep_cache))  # paths or s3:// / gs:// URIs
    ds = ds.map_batches(_keep, fn_kwargs={"todo": todo}, batch_format="pyarrow")
    # Blocks of rows_per_file rows whatever the input's layout (Ray's reader may pack several files into one
    # block, whose output would then be written only at the very end): each generator task gets one, and its
    # file is written when it is done. Streaming (no all-to-all), and Ray does not fuse it into the next map.
    ds = ds.repartition(target_num_rows_per_block=config.cdns.rows_per_file)
    ds = ds.map_batches(
        generator_class(config),
        fn_constructor_kwargs=generator_kwargs(config, keep_cache),
        compute=ray.data.ActorPoolStrategy(size=scaling.num_workers),
        batch_size=min(config.cdns.batch_size, config.cdns.rows_per_file),  # a batch never spans two output files
        batch_format="numpy",
        num_cpus=scaling.cpus_per_worker,
        **gpus,
    )
    ds.write_parquet(config.data.output, filename_provider=FilenameProvider(prefix, "parquet"))


def run(config: CdnsConfig) -> dict:
    """Checks inputs and the output's record, skips done samples, generates the rest; returns {"skipped",
    "written", "dropped", "output", "bytes_per_row"} (dropped: pairs ``cdns.oracle_filter`` left out;
    bytes_per_row: the output's Parquet bytes per row, all its files)."""
    files = check_inputs(config)
    shape = model_shape(config.model.source)
    check_memory_plan(plan_memory(config, shape), config.scaling, shape, "cdns")  # before any model loads
    check_config(config)
    output = config.data.output
    todo, skipped = plan(config, files)
    print(f"[cdns] mode {config.cdns.mode}: {skipped} sample(s) already in {output}, "
          f"{len(todo)} to generate ({config.runner})", flush=True)
    written = dropped = 0
    if todo:
        started = time.time()
        keep_cache = cache_fits(config, files)
        prefix = f"cdns-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        (run_local if config.runner == "local" else run_ray)(config, files, todo, prefix, keep_cache)
        done = done_sample_ids(output)[0]  # moves a file cut short by a killed writer aside
        missing = [i for i in todo if i not in done]
        if missing and config.runner == "ray" and not config.cdns.oracle_filter:  # the filter's drops are not lost
            print(f"[cdns] {len(missing)} sample(s) missing after the pass (a worker died while writing their file); "
                  "generating them again", flush=True)
            run_ray(config, files, missing, prefix + "-redo", keep_cache)
            done = done_sample_ids(output)[0]
        written = len(set(todo) & done)  # counted from the files: the filter drops rows
        dropped = len(todo) - written
        note = f", dropped {dropped} pair(s) whose negative kept the reference's details" if config.cdns.oracle_filter else ""
        print(f"[cdns] wrote {written} row(s) as {storage.join(output, prefix)}_*.parquet "
              f"in {time.time() - started:.1f} s{note}", flush=True)
    rows, per_row = bytes_per_row(output)
    print(f"[cdns] {output}: {rows} row(s), {per_row / 1024:.1f} KiB per row", flush=True)
    return {"skipped": skipped, "written": written, "dropped": dropped, "output": output, "bytes_per_row": per_row}


def main(argv: list[str] | None = None) -> int:
    return job_main(CdnsConfig, "python -m pipelines.cdns", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
