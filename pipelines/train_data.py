"""The training jobs' data side: which columns they read, whether the cached encoder outputs fit, the
per-sample timesteps and noise, and the stream of encoded micro-batches from a worker's Ray Data shard.

Randomness: each sample's timestep and noise come from a ``torch.Generator`` seeded with (train.seed,
optimiser step, sample_id), so they do not depend on how samples are laid out over workers and
micro-batches. The data order is shuffled per epoch with a seeded local buffer (``epoch_rows``).
"""

from __future__ import annotations

import hashlib

import pyarrow.dataset as pads
import ray
import ray.train
import torch

from pipelines.train_config import TrainConfig
from sfo.latents import encode_images
from sfo.models import model_identity
from sfo.objectives import batch_from_cache, encode_batch
from sfo.records import CACHE_COLUMNS, NEGATIVE_CACHE_FIELD, decode_cache, decode_png
from sfo.timesteps import sample_timesteps

SEED_BYTES = 8


def _columns(cfg: TrainConfig, cached: bool = False) -> list[str]:
    cols = ["sample_id", "target_text"] + (CACHE_COLUMNS if cached else ["reference_png", "target_png"])
    if not cfg.needs_negatives:
        return cols
    return cols + ([NEGATIVE_CACHE_FIELD.name] if cached and negatives_cached(cfg) else ["negative_png"])


def negatives_cached(cfg: TrainConfig) -> bool:
    """Whether ``data.path``'s rows carry the negatives' latents (cdns on cached triplets)."""
    return NEGATIVE_CACHE_FIELD.name in pads.dataset(cfg.data.path, format="parquet").schema.names


def use_cache(cfg: TrainConfig) -> bool:
    """Whether ``data.path`` carries cached encoder outputs made for this job's model and ``data.size``.

    Decided once, in the driver: a cache made with another model or size is reported here (one
    line) and the job encodes the PNGs instead.
    """
    dataset = pads.dataset(cfg.data.path, format="parquet")
    if not set(CACHE_COLUMNS) <= set(dataset.schema.names):
        return False
    table = dataset.to_table(columns=["cache_model", "cache_size"])
    made = set(zip(table["cache_model"].to_pylist(), table["cache_size"].to_pylist()))
    wanted = (model_identity(cfg.model.source), cfg.data.size)
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


def _images(column, size: int) -> list:
    images = [decode_png(bytes(b)) for b in column]
    return [im if im.size == (size, size) else im.resize((size, size)) for im in images]


def build_batch(cfg: TrainConfig, model, rows: dict, cached: bool):
    """One ``TrainBatch`` from a numpy batch of rows: from the cache columns, or by encoding the PNGs."""
    size = cfg.data.size
    with torch.no_grad():
        if not cached:
            return encode_batch(model, _images(rows["reference_png"], size), [str(x) for x in rows["target_text"]],
                                _images(rows["target_png"], size),
                                _images(rows["negative_png"], size) if cfg.needs_negatives else None)
        tensors = {k: torch.from_numpy(v) for k, v in decode_cache(rows).items()}
        side = size // model.pixel_multiple
        negative = None
        if cfg.needs_negatives:
            negative = tensors["negative"] if "negative" in tensors else encode_images(model, _images(rows["negative_png"], size))
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
    """Endless ``(position, sample_ids, batch)``: encoded micro-batches from this worker's Ray Data shard."""
    for after, rows in row_batches(ray.train.get_dataset_shard("train"), cfg, rank, position):
        yield after, list(rows["sample_id"]), build_batch(cfg, model, rows, cached)
