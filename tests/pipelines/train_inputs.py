"""Training inputs the sft / sfo tests share: triplet and quadruplet Parquet folders at 32 px (synthetic, or from
``prepare`` with the encoder cache on, and quadruplets over them as cdns writes them), an SFT config over a folder,
and rows as Ray Data's numpy batches give them."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import load_config
from pipelines.synthetic import synthetic_triplets
from pipelines.train_config import SftConfig
from sfo.records import QUADRUPLET_SCHEMA, TRIPLET_SCHEMA, encode_png

SIZE = 32


def write_parquet(folder: Path, rows: int, negatives: bool) -> str:
    triplets = synthetic_triplets(rows, SIZE, seed=0)
    others = synthetic_triplets(rows, SIZE, seed=1)  # another subject's image stands in for a CDNS negative
    columns = {
        "sample_id": [t.sample_id for t in triplets], "item": [t.item for t in triplets],
        "target_text": [t.target_text for t in triplets],
        "reference_png": [encode_png(t.reference) for t in triplets],
        "target_png": [encode_png(t.target) for t in triplets], "source": ["synthetic"] * rows,
    }
    if negatives:
        columns.update(
            negative_png=[encode_png(o.target) for o in others], negative_mode=["test"] * rows,
            negative_image_degradation=["none"] * rows, negative_text_degradation=["none"] * rows,
            negative_blur_radius=[None] * rows, negative_noise_std=[None] * rows,
            negative_prompt=[t.target_text for t in triplets], negative_seed=list(range(rows)),
            negative_steps=[1] * rows, negative_guidance=[1.0] * rows, negative_adapter_sha256=["0"] * rows,
        )
    folder.mkdir(parents=True)
    schema = QUADRUPLET_SCHEMA if negatives else TRIPLET_SCHEMA
    pq.write_table(pa.table(columns, schema=schema), folder / "part-0.parquet")
    return str(folder)


def sft_config(tmp: Path, name: str, data: str, *overrides: str) -> SftConfig:
    return load_config(SftConfig, None, [f"data.path={data}", f"data.size={SIZE}", "train.steps=2",
                                         f"output.storage_path={tmp}", f"output.name={name}", *overrides])


def cached_triplets(folder: Path, *overrides: str) -> str:
    """Triplets from ``prepare`` with the encoder cache on (the tiny model), stored as fp32: batches built from it
    equal batches encoded from the PNGs (bf16, the default, rounds them)."""
    from pipelines.prepare import PrepareConfig
    from pipelines.prepare import run as prepare

    return str(prepare(load_config(PrepareConfig, None, [f"data.output={folder}", "data.limit=2", f"data.size={SIZE}",
                                                         "cache.enabled=true", "cache.store_dtype=fp32", *overrides])))


def cached_quadruplets(triplets: str, folder: Path, tensors: bool) -> str:
    """Quadruplets over cached triplets as cdns writes them (``tensors`` false: the cache's small columns and the
    negatives' latents only, rows in reverse order) or with the triplets' tensors kept; each row's target stands in
    for its negative."""
    from sfo.records import CACHE_META_COLUMNS, CACHE_TENSOR_COLUMNS, NEGATIVE_CACHE_FIELD

    table = pq.read_table(triplets)
    rows = table.num_rows
    columns = {name: table.column(name) for name in TRIPLET_SCHEMA.names}
    columns.update(
        negative_png=table.column("target_png"), negative_mode=["test"] * rows, negative_image_degradation=["none"] * rows,
        negative_text_degradation=["none"] * rows, negative_blur_radius=[None] * rows, negative_noise_std=[None] * rows,
        negative_prompt=table.column("target_text"), negative_seed=list(range(rows)), negative_steps=[1] * rows,
        negative_guidance=[1.0] * rows, negative_adapter_sha256=["0"] * rows)
    out = pa.table(columns, schema=QUADRUPLET_SCHEMA)
    for name in CACHE_META_COLUMNS + (CACHE_TENSOR_COLUMNS if tensors else []):
        out = out.append_column(name, table.column(name))
    out = out.append_column(NEGATIVE_CACHE_FIELD.name, table.column("cache_target_latents"))
    folder.mkdir(parents=True)
    pq.write_table(out if tensors else out.take(list(reversed(range(rows)))), folder / "part-0.parquet")
    return str(folder)


def numpy_rows(path: str) -> dict:
    """The rows as Ray Data's numpy batches give them (object arrays of bytes / str)."""
    import numpy as np

    return {k: np.array(v, dtype=object) for k, v in pq.read_table(path).to_pydict().items()}
