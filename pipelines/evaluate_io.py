"""The evaluation jobs' files: which images an output already holds, which batches to make, the images read back,
the summary written, the adapters' weight files hashed. Every path is a local path or an ``s3://`` / ``gs://`` URI (``cluster.storage``).

Shared by ``pipelines.evaluate`` and ``pipelines.evaluate_shapes`` (whose image schemas and keys differ) and their
runners, ``pipelines.evaluate_methods``.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cluster import storage
from pipelines.resume import first_per_key, parquet_files

IMAGES = "images"  # <output>/images/*.parquet


def adapter_sha256(folder: str | None) -> str | None:
    """``sha256:<hex>`` of an adapter folder's weight file (``sfo.adapters.LORA_WEIGHTS``), None for no folder:
    what a record keeps, so a copy of the same adapter elsewhere (another path, a bucket) resumes its output."""
    from sfo.adapters import LORA_WEIGHTS

    if folder is None:
        return None
    return "sha256:" + hashlib.sha256(storage.read_bytes(storage.join(folder, LORA_WEIGHTS))).hexdigest()


def images_folder(output: str) -> str:
    return storage.join(output, IMAGES)


def key_of(row: dict, key: tuple[str, ...]) -> tuple:
    return tuple(row[c] for c in key)


def only_keys(table: pa.Table, keys: list[tuple], key: tuple[str, ...]) -> pa.Table:
    """The rows of ``table`` whose ``key`` columns are one of ``keys``."""
    wanted = set(keys)
    return table.filter(pa.array([k in wanted for k in zip(*(table.column(c).to_pylist() for c in key))], pa.bool_()))


def batches_to_make(rows: list[dict], found: set[tuple], key: tuple[str, ...],
                    size: int) -> tuple[list[dict], list | None]:
    """The batches of ``rows`` (cut every ``size`` rows, as a straight run cuts them) that hold a row not in
    ``found``, concatenated; and the keys of the rows to write (None: all of them).

    Making whole batches gives each image the batch a straight run gave it: a batch's other rows change an
    image's floats in their last bits (batched kernels), and a resumed run then differs from a straight one.
    """
    batches = [rows[i:i + size] for i in range(0, len(rows), size)]
    todo = [b for b in batches if any(key_of(row, key) not in found for row in b)]
    made = [row for b in todo for row in b]  # cut every `size` rows again: the same batches (only the last is short)
    missing = [key_of(row, key) for row in made if key_of(row, key) not in found]
    return made, (None if len(missing) == len(made) else missing)


def read_images(output: str, methods: list[str], schema: pa.Schema, key: tuple[str, ...]) -> pa.Table:
    """The images of ``methods`` under ``output/images``, read as ``schema``: in method order, then sorted by
    ``key``, each ``key`` once (the same table however a resumed run split its files)."""
    files = parquet_files(images_folder(output))
    if not files:
        return schema.empty_table()
    fs = storage.resolve(files[0])[0]
    table = pa.concat_tables([pq.read_table(storage.resolve(f)[1], schema=schema, filesystem=fs) for f in files])
    return pa.concat_tables([first_per_key(table.filter(pc.equal(table["method"], m)), list(key)) for m in methods])


def write_summary(summary: dict, output: str, csv_lines: list[str] | None = None) -> None:
    """``<output>/summary.json`` (and ``summary.csv`` when ``csv_lines`` are given), each written whole."""
    storage.write_json(storage.join(output, "summary.json"), summary)
    if csv_lines is not None:
        storage.write_text(storage.join(output, "summary.csv"), "\n".join(csv_lines) + "\n")
