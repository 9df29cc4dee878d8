"""The training jobs' data side: which columns they read, whether the cached encoder outputs fit, the
per-sample timesteps and noise, and the stream of encoded micro-batches from a worker's Ray Data shard.

Randomness: each sample's timestep and noise come from a ``torch.Generator`` seeded with (train.seed,
optimiser step, sample_id), so they do not depend on how samples are laid out over workers and
micro-batches. The data order is shuffled per epoch with a seeded local buffer (``epoch_rows``).

cdns output with a cache holds only the cache's small columns and the negatives' latents; the triplets'
tensors stay in the triplets (``data.cache_path``) and are joined back by ``sample_id`` (``join_cache``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.train
import torch

from cluster import storage
from pipelines.common import distinct_rows, score_fingerprint
from pipelines.config import ConfigError
from pipelines.train_config import SfoConfig, TrainConfig
from sfo.latents import encode_images
from sfo.models import model_identity
from sfo.objectives import batch_from_cache, encode_batch
from sfo.records import (
    CACHE_COLUMNS, CACHE_TENSOR_COLUMNS, NEGATIVE_CACHE_FIELD, SCORE_COLUMNS, decode_cache, decode_images, refers_to_cache,
)
from sfo.timesteps import draw, sample_timesteps

SEED_BYTES = 8
BLOCK_MIB = 64  # the in-memory dataset's blocks (Ray Data's own target is 128 MiB)


def parquet_mib(path: str | Path) -> float:
    """The MiB of the Parquet at ``path`` (local, ``s3://``, ``gs://``): a file, or every ``*.parquet`` under a folder."""
    files = storage.list_files(path, ".parquet")
    if not files:
        return 0.0
    fs, _ = storage.resolve(path)
    return sum(info.size for info in fs.get_file_info([storage.resolve(f)[1] for f in files])) / 2**20


def _names(path: str) -> set[str]:
    return set(storage.dataset(path).schema.names)


def joins_cache(cfg: TrainConfig) -> bool:
    """Whether the triplets' cache tensors come from ``data.cache_path`` (``data.path`` refers to them by id)."""
    return bool(cfg.data.cache_path) and refers_to_cache(_names(cfg.data.path))


def cache_index(path: str) -> dict[str, tuple[str, int]]:
    """``sample_id`` -> (file, row in file) over the Parquet at ``path``: what ``join_cache`` reads rows by."""
    index: dict[str, tuple[str, int]] = {}
    for file in storage.list_files(path, ".parquet"):
        for row, sample_id in enumerate(storage.read_table(file, columns=["sample_id"]).column(0).to_pylist()):
            index.setdefault(sample_id, (file, row))
    return index


def _read_rows(file: str, rows: list[int], columns: list[str]) -> pa.Table:
    """``rows`` of one Parquet file (in that order), reading only the row groups that hold them."""
    fs, path = storage.resolve(file)
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        starts = np.cumsum([0] + sizes)  # row group g holds rows starts[g] .. starts[g + 1] - 1
        group_of = {r: int(np.searchsorted(starts, r, side="right")) - 1 for r in rows}
        groups = sorted(set(group_of.values()))
        table = parquet.read_row_groups(groups, columns=columns)
    offset = dict(zip(groups, np.cumsum([0] + [sizes[g] for g in groups])))  # where each group starts in ``table``
    return table.take([int(offset[group_of[r]] + r - starts[group_of[r]]) for r in rows])


def join_cache(batch: pa.Table, index: dict[str, tuple[str, int]], columns: list[str] = CACHE_TENSOR_COLUMNS) -> pa.Table:
    """``batch`` with ``columns`` of the rows of the same ``sample_id`` in the indexed Parquet, rows in order.

    A lookup join per batch (each batch reads only the row groups it needs), in the order the rows came in: the
    stream stays in file order, which a resume and a seeded shuffle rely on (``row_batches``). Ray Data's own
    ``Dataset.join`` needs polars (not a dependency here) and hash-shuffles the rows out of their order.
    """
    ids = batch.column("sample_id").to_pylist()
    missing = [i for i in ids if i not in index]
    if missing:
        raise ValueError(f"data.cache_path: no row for sample_id(s) {missing[:5]}: data.path was made from other "
                         "triplets; point data.cache_path at the prepare output cdns read")
    by_file: dict[str, list[int]] = {}
    for sample_id in ids:
        file, row = index[sample_id]
        by_file.setdefault(file, []).append(row)
    parts, where, total = [], {}, 0  # where: (file, k-th row asked of it) -> its row in the concatenation
    for file, rows in by_file.items():
        parts.append(_read_rows(file, rows, columns))
        where.update({(file, k): total + k for k in range(len(rows))})
        total += len(rows)
    asked = dict.fromkeys(by_file, 0)
    order = []
    for sample_id in ids:
        file = index[sample_id][0]
        order.append(where[(file, asked[file])])
        asked[file] += 1
    for name in columns:
        found = [part.column(name) for part in parts]
        batch = batch.append_column(name, pa.concat_arrays([c.combine_chunks() for c in found]).take(order)
                                    if found else pa.array([], pa.binary()))
    return batch


def training_dataset(cfg: TrainConfig, columns: list[str]) -> ray.data.Dataset:
    """The job's Ray ``Dataset`` of ``data.path`` (with the cache's tensors joined from ``data.cache_path`` when it
    refers to them).

    At most ``data.in_memory_mib`` of Parquet: read, joined and sorted by ``sample_id`` here, in the driver, and
    handed to Ray as blocks of at most ``BLOCK_MIB`` (each epoch after the first then reads the object store).
    Sorted because the writers' row order is not reproducible: Ray Data's streaming repartition in cdns put the
    same negatives in another order from run to run even with ``preserve_order`` (and a resumed cdns appends its
    rest in new files). One canonical order makes the same data train the same adapter however it was written.
    Read here rather than by Ray Data's read and sort: those start a sample / map / reduce round of tasks, about
    10-20 s of start-up on a small cluster for data read in well under a second.

    Larger: streamed from the files every epoch by Ray Data, in file order."""
    joined = [c for c in columns if c in CACHE_TENSOR_COLUMNS] if joins_cache(cfg) else []
    read = [c for c in columns if c not in joined]
    # The cache's share is at most its size: the triplets may hold more rows than the join takes.
    mib = parquet_mib(cfg.data.path) + (parquet_mib(cfg.data.cache_path) if joined else 0.0)
    if mib > cfg.data.in_memory_mib:
        data = ray.data.read_parquet(cfg.data.path, columns=read)
        if joined:
            index = cache_index(cfg.data.cache_path)
            data = data.map_batches(join_cache, batch_format="pyarrow", fn_kwargs={"index": index, "columns": joined})
        return data
    table = storage.dataset(cfg.data.path).to_table(columns=read).sort_by("sample_id")
    if joined:
        table = join_cache(table, cache_index(cfg.data.cache_path), joined)
    return ray.data.from_arrow(blocks(table, BLOCK_MIB))


def blocks(table: pa.Table, mib: float) -> list[pa.Table]:
    """``table`` cut into consecutive slices of at most about ``mib`` MiB each (at least one row, one slice)."""
    rows = max(1, int(table.num_rows * mib * 2**20 // max(table.nbytes, 1)))
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)] or [table]


def _columns(cfg: TrainConfig, cached: bool = False, scored: bool = False) -> list[str]:
    cols = ["sample_id", "target_text"] + (CACHE_COLUMNS if cached else ["reference_png", "target_png"])
    if not cfg.needs_negatives:
        return cols
    cols += [NEGATIVE_CACHE_FIELD.name] if cached and negatives_cached(cfg) else ["negative_png"]
    return cols + (SCORE_COLUMNS if scored else [])


def use_scores(cfg: TrainConfig) -> bool:
    """Whether ``data.path`` carries reference errors (cdns ``score.draws``) made for this job: its model, "ref"
    adapter, ``data.size`` and timestep scheme (``pipelines.common.score_fingerprint``). Decided once, in the
    driver; stored errors that do not fit are reported (one line) and the job runs the reference pass."""
    if not set(SCORE_COLUMNS) <= _names(cfg.data.path):
        return False
    if not (isinstance(cfg, SfoConfig) and cfg.sfo.variant == "sfo"):
        print(f"[{cfg.stage}] data.path: stored reference errors unused (they serve Eq. 3 with the ref model as "
              "reference, sfo.variant=sfo)", flush=True)
        return False
    made = distinct_rows(cfg.data.path, ["score_fingerprint"])
    wanted = score_fingerprint(cfg.model.source, cfg.model.ref_adapter, cfg.data.size, cfg.sampling)
    if made != {(wanted,)}:
        print(f"[{cfg.stage}] data.path: stored reference errors were made for another model, ref adapter, size or "
              "timestep scheme than this job's (model.source, model.ref_adapter, data.size, sfo.scheme/mean/std); "
              "running the reference pass", flush=True)
        return False
    print(f"[{cfg.stage}] data.path: using the stored reference errors (the reference pass is skipped)", flush=True)
    return True


def stored_draws(cfg: TrainConfig, rows: dict, epoch: int, shape: tuple[int, ...]):
    """(N,) t, (N, L, 64) noise and the reference's (N,) errors on positive and negative for draw
    ``epoch mod K`` of each row (``sfo.records.SCORE_FIELDS``); the noise regenerated from the draw's seed."""
    def matrix(name: str, dtype) -> np.ndarray:  # a list column (Ray Data: an object array of arrays) -> (N, K)
        return np.stack([np.asarray(x, dtype=dtype) for x in rows[name]])

    seeds = matrix("score_seeds", np.int64)
    j = epoch % seeds.shape[1]
    pairs = [draw(int(seed), cfg.sampling, shape) for seed in seeds[:, j]]
    t = torch.cat([p[0] for p in pairs])
    stored = torch.from_numpy(matrix("score_t", np.float32)[:, j])
    if not torch.allclose(t, stored, atol=1e-6):
        raise ValueError("data.path: score_t does not match the timesteps its seeds draw; the scores are corrupt "
                         "or were made with another sfo.timesteps; regenerate them (cdns) or drop the score columns")
    errors = tuple(torch.from_numpy(matrix(k, np.float32)[:, j]) for k in ("score_ref_err_pos", "score_ref_err_neg"))
    return t, torch.stack([p[1] for p in pairs]), errors


def negatives_cached(cfg: TrainConfig) -> bool:
    """Whether ``data.path``'s rows carry the negatives' latents (cdns on cached triplets)."""
    return NEGATIVE_CACHE_FIELD.name in _names(cfg.data.path)


def needs_encoders(cfg: TrainConfig, cached: bool) -> bool:
    """Whether the workers must load the VAE and text encoders: not when every tensor of a batch is cached."""
    return not cached or (cfg.needs_negatives and not negatives_cached(cfg))


def use_cache(cfg: TrainConfig) -> bool:
    """Whether ``data.path`` carries cached encoder outputs made for this job's model and ``data.size``.

    Decided once, in the driver: a cache made with another model or size is reported here (one
    line) and the job encodes the PNGs instead.
    """
    names = _names(cfg.data.path) | (set(CACHE_TENSOR_COLUMNS) if joins_cache(cfg) else set())
    if not set(CACHE_COLUMNS) <= names:
        return False
    made = distinct_rows(cfg.data.path, ["cache_model", "cache_size"])
    wanted = (model_identity(cfg.model.source), cfg.data.size)
    if joins_cache(cfg):
        meta = ["cache_model", "cache_size", "cache_dtype"]
        mine, theirs = distinct_rows(cfg.data.path, meta), distinct_rows(cfg.data.cache_path, meta)
        if not mine <= theirs:
            raise ConfigError(f"data.cache_path: its cache was made as (model, size, dtype) {sorted(theirs)}, data.path's "
                              f"rows say {sorted(mine)}; point data.cache_path at the triplets cdns read")
    if made != {wanted}:
        print(f"[{cfg.stage}] data.path: cached latents/embeddings were made with (model, size) {sorted(made)}, "
              f"not {wanted} (model.source, data.size); ignoring them and encoding the PNGs", flush=True)
        return False
    negatives = (" and the negatives' latents" if negatives_cached(cfg) else " (negatives: encoding their PNGs)"
                 ) if cfg.needs_negatives else ""
    print(f"[{cfg.stage}] data.path: using cached latents/embeddings ({wanted[0]}, {wanted[1]} px){negatives}", flush=True)
    return True


def sample_seed(seed: int, step: int, sample_id: str) -> int:
    """A generator seed per (run seed, optimiser step, sample): independent of the worker layout."""
    digest = hashlib.sha256(f"{seed}/{step}/{sample_id}".encode()).digest()
    return int.from_bytes(digest[:SEED_BYTES], "little") >> 1


def timesteps_and_noise(cfg: TrainConfig, step: int, sample_ids, shape: tuple[int, ...]):
    """(N,) timesteps and (N, L, 64) noise, one seeded generator per sample."""
    ts, noises = [], []
    for sample_id in sample_ids:
        generator = torch.Generator().manual_seed(sample_seed(cfg.train.seed, step, str(sample_id)))
        ts.append(sample_timesteps(1, cfg.sampling, generator))
        noises.append(torch.randn(shape, generator=generator))
    return torch.cat(ts), torch.stack(noises)


def build_batch(cfg: TrainConfig, model, rows: dict, cached: bool):
    """One ``TrainBatch`` from a numpy batch of rows: from the cache columns, or by encoding the PNGs."""
    size = cfg.data.size
    with torch.no_grad():
        if not cached:
            return encode_batch(model, decode_images(rows["reference_png"], size), [str(x) for x in rows["target_text"]],
                                decode_images(rows["target_png"], size),
                                decode_images(rows["negative_png"], size) if cfg.needs_negatives else None)
        tensors = {k: torch.from_numpy(v) for k, v in decode_cache(rows).items()}
        side = size // model.pixel_multiple
        negative = None
        if cfg.needs_negatives:
            negative = tensors.get("negative")
            if negative is None:
                negative = encode_images(model, decode_images(rows["negative_png"], size))
        return batch_from_cache(tensors["target"], tensors["reference"], tensors["prompt_embeds"], tensors["pooled"],
                                grid=(side, side), device=model.device, dtype=model.dtype, negative=negative)


def epoch_rows(data, cfg: TrainConfig, epoch: int, rank: int = 0):
    """One epoch of numpy row batches from ``data`` (a worker's shard, or any Ray ``Dataset``).

    With ``train.shuffle_buffer`` > 0 the rows pass Ray Data's local shuffle buffer, seeded from
    (train.seed, epoch, rank): the same seed gives the same order, each epoch another.
    """
    shuffle = {}
    if cfg.train.shuffle_buffer:
        digest = hashlib.sha256(f"shuffle/{cfg.train.seed}/{epoch}/{rank}".encode()).digest()
        shuffle = {"local_shuffle_buffer_size": cfg.train.shuffle_buffer,
                   "local_shuffle_seed": int.from_bytes(digest[:4], "little")}
    return data.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy", drop_last=True, **shuffle)


def row_batches(data, cfg: TrainConfig, rank: int = 0, position: tuple[int, int] = (0, 0)):
    """Endless ``((epoch, offset), rows)``: numpy row batches of epoch after epoch, from ``position``.

    ``offset`` counts the batches of ``epoch`` consumed, this one included; a stream started at a
    yielded position continues exactly where that one went on (the same seeded order, the first
    ``offset`` batches skipped without decoding), which is what a resume from a checkpoint needs.
    The shard's own order must be deterministic (``run`` asks Ray Data to preserve order).
    """
    epoch, skip = position
    while True:
        seen = False
        for index, rows in enumerate(epoch_rows(data, cfg, epoch, rank)):
            seen = True
            if index >= skip:
                yield (epoch, index + 1), rows
        if not seen:
            raise ValueError(f"data.path: a worker got no full batch; need at least train.batch_size x "
                             f"scaling.num_workers = {cfg.train.batch_size * cfg.scaling.num_workers} rows")
        epoch, skip = epoch + 1, 0


def micro_batches(cfg: TrainConfig, model, cached: bool = False, rank: int = 0, position: tuple[int, int] = (0, 0)):
    """Endless ``(position, sample_ids, batch, rows)``: encoded micro-batches from this worker's Ray Data shard,
    with their raw rows (``stored_draws`` reads the score columns from them)."""
    for after, rows in row_batches(ray.train.get_dataset_shard("train"), cfg, rank, position):
        yield after, list(rows["sample_id"]), build_batch(cfg, model, rows, cached), rows
