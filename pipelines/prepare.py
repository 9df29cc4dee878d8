"""prepare: builds the triplet Parquet (reference image, target text, target image) every stage reads.

    python -m pipelines.prepare --config pipelines/configs/prepare.yaml [key=value ...]

Sources:
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
``both_directions``), so reruns give the same file.

Rows go to ``part-NNNNN.parquet`` files of ``data.rows_per_file`` rows, each written whole (a temporary
name, then renamed). Re-running into the same ``data.output`` resumes (``pipelines.resume``): finished
files are kept, only the missing sample ids are made (and encoded), none is written twice, and the files
end as an uninterrupted run's; a finished output is left as it is. The config is recorded in
``<output>/_prepare.json``: a rerun with other content (another source, size, limit, seed, cache...)
fails naming the field. ``cache.batch_size`` and ``data.rows_per_file`` may change between runs.

With ``cache.enabled`` the rows also carry the frozen encoders' outputs (``sfo.records.CACHE_FIELDS``:
VAE latents of target and reference, T5 and pooled CLIP embeddings of the target text, and the
model and size they were made with), which the sft/sfo jobs use instead of encoding the PNGs
when their ``model.source`` and ``data.size`` match.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from collections.abc import Iterator, Set
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.common import check_dtype
from pipelines.config import job_main, to_dict
from pipelines.resume import check_same_config, done_keys, parquet_files, write_manifest, write_table_atomic
from pipelines.synthetic import synthetic_triplets
from sfo.shapes.world import SIZE as WORLD_SIZE, world_triplets
from sfo.records import CACHE_FIELDS, TRIPLET_SCHEMA, decode_png, encode_png, float32_bytes, split_subjects200k_pair

SOURCES = ("shapes", "synthetic", "subjects200k")
QUALITY_KEYS = ("compositeStructure", "objectConsistency", "imageQuality")
ROWS_PER_FILE = 1000
DEFAULT_SYNTHETIC_ROWS = 16
STAGE = "prepare"  # its record: <output>/_prepare.json
# Fields that change how the work is cut, not what any row holds: a rerun may change them (a smaller
# cache.batch_size after running out of memory). Batches of another size may move cached floats in their
# last bits (conv reductions), nothing more.
EXECUTION_FIELDS = ("data.output", "data.rows_per_file", "cache.batch_size")


@dataclass
class DataConfig:
    source: str = "synthetic"
    input: str | None = None  # Subjects200K folder or Parquet shard folder (source subjects200k)
    output: str = "runs/data/triplets"  # folder of Parquet files
    limit: int | None = None  # at most this many triplets (synthetic: exactly, default 16)
    size: int = 512  # panels are resized to size x size
    seed: int = 0
    padding: int = 8  # Subjects200K panel padding (0 for padding-free 1024x512 copies)
    min_quality: int = 5  # OminiControl's filter: every quality score >= 5
    both_directions: bool = False  # two triplets per pair (each panel as the reference once)
    rows_per_file: int = ROWS_PER_FILE  # rows per output file: a kill loses at most the file being made

    def __post_init__(self) -> None:
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
    dtype: str | None = None  # bf16 | fp32; default bf16 on GPU, fp32 on CPU (stored as float32 either way)
    batch_size: int = 8  # rows per encoder call

    def __post_init__(self) -> None:
        if self.size is not None and (self.size < 16 or self.size % 16):
            raise ValueError(f"cache.size: must be a positive multiple of 16, got {self.size}")
        if self.batch_size < 1:
            raise ValueError(f"cache.batch_size: must be at least 1, got {self.batch_size}")
        if not self.model:
            raise ValueError("cache.model: must not be empty; 'tiny' or a local FLUX.1-dev folder")
        check_dtype(self.dtype, "cache")


@dataclass
class PrepareConfig:
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)


@dataclass(frozen=True)
class Pair:
    pair_id: str
    image: Image.Image
    item: str
    descriptions: tuple[str, str]
    quality: dict | None


def read_pair_folder(folder: Path) -> Iterator[Pair]:
    """Pairs from ``NAME.png`` + ``NAME.txt`` (+ optional ``NAME.json``) files, sorted by name."""
    for png in sorted(folder.glob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            raise ValueError(f"data.input: {str(png)!r} has no description file {txt.name!r}")
        fields = {}
        for line in txt.read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        missing = [k for k in ("instance", "description1", "description2") if not fields.get(k)]
        if missing:
            raise ValueError(f"data.input: {str(txt)!r} lacks {missing} lines ('Instance: ...', 'Description1: ...')")
        quality_file = png.with_suffix(".json")
        quality = json.loads(quality_file.read_text()) if quality_file.is_file() else None
        yield Pair(png.stem, Image.open(png), fields["instance"], (fields["description1"], fields["description2"]), quality)


def read_pair_parquet(folder: Path) -> Iterator[Pair]:
    """Pairs from Parquet shards in the Hugging Face Subjects200K layout."""
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else [folder]
    for path in files:
        table = pq.read_table(path)
        for name in ("image", "description"):
            if name not in table.column_names:
                raise ValueError(f"data.input: {str(path)!r} has no {name!r} column (Subjects200K layout expected)")
        for index, row in enumerate(table.to_pylist()):
            image = row["image"]["bytes"] if isinstance(row["image"], dict) else row["image"]
            desc = row["description"]
            yield Pair(f"{path.stem}-{index:07d}", Image.open(io.BytesIO(image)), desc["item"],
                       (desc["description_0"], desc["description_1"]), row.get("quality_assessment"))


def passes_quality(quality: dict | None, minimum: int) -> bool:
    return quality is None or all((quality.get(key) or 0) >= minimum for key in QUALITY_KEYS)


def subjects200k_rows(config: DataConfig, stats: dict, skip: Set[str] = frozenset()) -> Iterator[dict]:
    """The source's rows in order; a row whose sample id is in ``skip`` comes as ``{"sample_id": id}`` only
    (no panel resized or encoded: a resumed run's finished rows)."""
    source = Path(config.input)
    if not source.exists():
        raise FileNotFoundError(f"data.input: {str(source)!r} does not exist")
    has_parquet = source.is_file() or any(source.glob("*.parquet"))
    pairs = read_pair_parquet(source) if has_parquet else read_pair_folder(source)
    for pair in pairs:
        stats["pairs"] += 1
        if pair.quality is None:
            stats["unscored"] += 1
        if not passes_quality(pair.quality, config.min_quality):
            stats["filtered"] += 1
            continue
        flip = int(hashlib.sha256(f"{config.seed}/{pair.pair_id}".encode()).hexdigest(), 16) % 2
        directions = [(0, 1), (1, 0)] if config.both_directions else [(flip, 1 - flip)]
        panels = None
        for ref, tgt in directions:
            sample_id = f"s200k-{pair.pair_id}-{tgt}"
            if sample_id in skip:
                yield {"sample_id": sample_id}
                continue
            if panels is None:
                panels = [p.resize((config.size, config.size), Image.BICUBIC)
                          for p in split_subjects200k_pair(pair.image, padding=config.padding)]
            yield {
                "sample_id": sample_id,
                "item": pair.item,
                "target_text": pair.descriptions[tgt],
                "reference_png": encode_png(panels[ref]),
                "target_png": encode_png(panels[tgt]),
                "source": f"subjects200k:{source.name}",
            }


def synthetic_rows(config: DataConfig, skip: Set[str] = frozenset()) -> Iterator[dict]:
    for t in synthetic_triplets(config.limit or DEFAULT_SYNTHETIC_ROWS, config.size, config.seed):
        yield {"sample_id": t.sample_id} if t.sample_id in skip else {
            "sample_id": t.sample_id, "item": t.item, "target_text": t.target_text,
            "reference_png": encode_png(t.reference), "target_png": encode_png(t.target), "source": "synthetic"}


def shapes_rows(config: DataConfig, skip: Set[str] = frozenset()) -> Iterator[dict]:
    for t in world_triplets(config.limit or DEFAULT_SYNTHETIC_ROWS, config.seed):
        yield {"sample_id": t.sample_id} if t.sample_id in skip else {
            "sample_id": t.sample_id, "item": t.item, "target_text": t.target_text,
            "reference_png": encode_png(t.reference), "target_png": encode_png(t.target), "source": "shapes"}


class CacheEncoder:
    """Adds ``CACHE_FIELDS`` to rows: the frozen VAE and text encoders' outputs (no math of its own)."""

    def __init__(self, config: CacheConfig, data_size: int) -> None:
        from sfo.models import load_flux, model_identity

        self.config = config
        self.size = config.size or data_size
        self.identity = model_identity(config.model)
        self.model = load_flux(config.model, dtype=config.dtype)

    def _images(self, column: list[bytes]) -> list[Image.Image]:
        images = [decode_png(b) for b in column]  # resized as the training job resizes PNGs
        return [im if im.size == (self.size, self.size) else im.resize((self.size, self.size)) for im in images]

    def __call__(self, rows: list[dict]) -> list[dict]:
        from sfo.latents import encode_images
        from sfo.text import encode_prompts

        out = []
        for start in range(0, len(rows), self.config.batch_size):
            chunk = rows[start:start + self.config.batch_size]
            target = encode_images(self.model, self._images([r["target_png"] for r in chunk])).float().cpu()  # (B, L, 64)
            reference = encode_images(self.model, self._images([r["reference_png"] for r in chunk])).float().cpu()
            text = encode_prompts(self.model, [r["target_text"] for r in chunk])
            embeds, pooled = text.prompt_embeds.float().cpu(), text.pooled.float().cpu()  # (B, Lt, D), (B, P)
            for i, row in enumerate(chunk):
                out.append(row | {
                    "cache_target_latents": float32_bytes(target[i]), "cache_reference_latents": float32_bytes(reference[i]),
                    "cache_prompt_embeds": float32_bytes(embeds[i]), "cache_pooled": float32_bytes(pooled[i]),
                    "cache_latent_tokens": target.shape[1], "cache_text_tokens": embeds.shape[1],
                    "cache_model": self.identity, "cache_size": self.size,
                })
        return out


def recorded_fields(config: PrepareConfig) -> dict:
    """What the rows depend on, as dotted field -> plain value (``EXECUTION_FIELDS`` left out; paths resolved)."""
    fields = {f"{section}.{name}": value
              for section, values in to_dict(config).items() for name, value in values.items()}
    if fields["data.input"] is not None:
        fields["data.input"] = str(Path(fields["data.input"]).resolve())
    if Path(fields["cache.model"]).exists():  # a FLUX folder, not "tiny"
        fields["cache.model"] = str(Path(fields["cache.model"]).resolve())
    return {k: v for k, v in fields.items() if k not in EXECUTION_FIELDS}


def free_name(output: Path, index: int) -> Path:
    """``part-{index}.parquet``, or ``part-{index}-{k}.parquet`` with the first free k when a kept file has the name."""
    path, k = output / f"part-{index:05d}.parquet", 0
    while path.exists():
        k += 1
        path = output / f"part-{index:05d}-{k}.parquet"
    return path


def run(config: PrepareConfig) -> Path:
    """Writes the triplet Parquet files, or the ones an earlier run into ``data.output`` left missing; returns
    the output folder."""
    data = config.data
    output = Path(data.output)
    manifest = check_same_config(output, STAGE, recorded_fields(config), field_of_output="data.output",
                                 has_files=output.is_dir() and bool(parquet_files(output)),
                                 fresh_fix=f"pick a new data.output (or delete {str(output)!r} yourself)")
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
    encoder = None  # loaded when the first row to encode comes: a rerun with little left skips the load
    schema = pa.schema(list(TRIPLET_SCHEMA) + CACHE_FIELDS) if config.cache.enabled else TRIPLET_SCHEMA
    started, total, written, chunk, part = time.time(), 0, 0, [], 0

    def flush():
        """Writes the current file's missing rows (all of them unless a kept file holds some)."""
        nonlocal encoder, chunk, part, written
        missing = [row for row in chunk if row["sample_id"] not in done]
        if missing:
            if config.cache.enabled and encoder is None:
                encoder = CacheEncoder(config.cache, data.size)
            out = encoder(missing) if encoder else missing
            write_table_atomic(pa.Table.from_pylist(out, schema=schema), free_name(output, part))
            written += len(missing)
            print(f"  prepare: {total} triplets, {written} new ({written / (time.time() - started):.1f}/s)", flush=True)
        part += 1
        chunk = []

    for row in rows:
        chunk.append(row)
        total += 1
        if len(chunk) >= data.rows_per_file:
            flush()
        if data.limit is not None and total >= data.limit:
            break
    if chunk:
        flush()
    if total == 0:
        raise ValueError(f"data.input: no triplet survived (pairs read: {stats['pairs']}, "
                         f"below quality {data.min_quality}: {stats['filtered']})")
    write_manifest(output, STAGE, manifest | {"finished": {"rows": total}})
    detail = "" if data.source in sources else (
        f" from {stats['pairs']} pairs ({stats['filtered']} dropped below quality {data.min_quality}, "
        f"{stats['unscored']} without scores kept)")
    cached = (f" with cached latents/embeddings ({encoder.identity}, {encoder.size} px)" if encoder else
              " with cached latents/embeddings" if config.cache.enabled else "")
    kept = f" ({total - written} kept from an earlier run)" if total > written else ""
    print(f"prepare: wrote {written} triplets{kept}{detail}{cached} to {output} in {time.time() - started:.1f} s",
          flush=True)
    return output


def main(argv: list[str] | None = None) -> int:
    return job_main(PrepareConfig, "python -m pipelines.prepare", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
