"""prepare's sources: the rows each one gives, in order, and how a Subjects200K pair becomes two PNG panels.

A source yields *units*, one per triplet, in its order. The embedded sources (``shapes``, ``synthetic``) give
finished rows (their PNGs are small and cheap). ``subjects200k`` gives light units that only say where the
pair is (``pair``: its PNG file, or its Parquet shard and ``pair_row``) and which panel is which; its
descriptions and quality scores are read here, its images only by ``render_rows``, a part at a time (on
the driver without the cache, in Ray Data tasks with it), so 200K pairs are never in memory at once.

Every path goes through ``cluster.storage``: local folders, ``s3://`` and ``gs://`` alike.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Set as AbstractSet
from dataclasses import dataclass

import pyarrow.parquet as pq
from PIL import Image

from cluster import storage
from pipelines.synthetic import synthetic_triplets
from sfo.records import encode_png, split_subjects200k_pair
from sfo.shapes.world import world_triplets

QUALITY_KEYS = ("compositeStructure", "objectConsistency", "imageQuality")
DEFAULT_SYNTHETIC_ROWS = 16
# A subjects200k unit's locator: the pair's PNG file, or its Parquet shard and row there (null for files).
LOCATOR_KEYS = ("pair", "pair_row", "panel_ref", "panel_tgt")


@dataclass(frozen=True)
class PairText:
    """A Subjects200K pair without its image: where it is, its descriptions and quality scores."""

    pair_id: str
    pair: str  # the pair's PNG, or the Parquet shard holding it (as a URI of the input's kind)
    pair_row: int | None  # its row in that shard; None for a PNG file
    item: str
    descriptions: tuple[str, str]
    quality: dict | None


def read_pair_folder(folder: str) -> Iterator[PairText]:
    """Pairs from ``NAME.png`` + ``NAME.txt`` (+ optional ``NAME.json``) files, sorted by name (one listing)."""
    files = set(storage.list_files(folder, recursive=False))
    for png in sorted(f for f in files if f.endswith(".png")):
        txt, quality_file = png[:-len(".png")] + ".txt", png[:-len(".png")] + ".json"
        if txt not in files:
            raise ValueError(f"data.input: {png!r} has no description file {storage.basename(txt)!r}")
        fields = {}
        for line in storage.read_text(txt).splitlines():
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        missing = [k for k in ("instance", "description1", "description2") if not fields.get(k)]
        if missing:
            raise ValueError(f"data.input: {txt!r} lacks {missing} lines ('Instance: ...', 'Description1: ...')")
        quality = storage.read_json(quality_file) if quality_file in files else None
        yield PairText(storage.basename(png)[:-len(".png")], png, None, fields["instance"],
                       (fields["description1"], fields["description2"]), quality)


def read_pair_parquet(source: str) -> Iterator[PairText]:
    """Pairs from Parquet shards in the Hugging Face Subjects200K layout (their ``image`` column left unread)."""
    for path in storage.list_files(source, ".parquet"):
        names = storage.dataset(path).schema.names
        for name in ("image", "description"):
            if name not in names:
                raise ValueError(f"data.input: {path!r} has no {name!r} column (Subjects200K layout expected)")
        columns = ["description"] + (["quality_assessment"] if "quality_assessment" in names else [])
        table = storage.read_table(path, columns=columns)
        stem = storage.basename(path).removesuffix(".parquet")
        for index, row in enumerate(table.to_pylist()):
            desc = row["description"]
            yield PairText(f"{stem}-{index:07d}", path, index, desc["item"], (desc["description_0"], desc["description_1"]),
                           row.get("quality_assessment"))


def passes_quality(quality: dict | None, minimum: int) -> bool:
    return quality is None or all((quality.get(key) or 0) >= minimum for key in QUALITY_KEYS)


def subjects200k_rows(config, stats: dict, skip: AbstractSet[str] = frozenset()) -> Iterator[dict]:
    """The source's units in order (``LOCATOR_KEYS``, no image read); a unit whose sample id is in ``skip``
    comes as ``{"sample_id": id}`` only (a resumed run's finished rows).

    Args:
        config: ``pipelines.prepare.DataConfig``.
        stats: counters "pairs", "filtered", "unscored", updated as pairs are read.
    """
    source = config.input
    if not storage.exists(source):
        raise FileNotFoundError(f"data.input: {source!r} does not exist")
    has_parquet = storage.is_file(source) or bool(storage.list_files(source, ".parquet"))
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
        for ref, tgt in directions:
            sample_id = f"s200k-{pair.pair_id}-{tgt}"
            yield {"sample_id": sample_id} if sample_id in skip else {
                "sample_id": sample_id, "item": pair.item, "target_text": pair.descriptions[tgt],
                "source": f"subjects200k:{storage.basename(source)}",
                "pair": pair.pair, "pair_row": pair.pair_row, "panel_ref": ref, "panel_tgt": tgt,
            }


def synthetic_rows(config, skip: AbstractSet[str] = frozenset()) -> Iterator[dict]:
    for t in synthetic_triplets(config.limit or DEFAULT_SYNTHETIC_ROWS, config.size, config.seed):
        yield {"sample_id": t.sample_id} if t.sample_id in skip else {
            "sample_id": t.sample_id, "item": t.item, "target_text": t.target_text,
            "reference_png": encode_png(t.reference), "target_png": encode_png(t.target), "source": "synthetic"}


def shapes_rows(config, skip: AbstractSet[str] = frozenset()) -> Iterator[dict]:
    for t in world_triplets(config.limit or DEFAULT_SYNTHETIC_ROWS, config.seed):
        yield {"sample_id": t.sample_id} if t.sample_id in skip else {
            "sample_id": t.sample_id, "item": t.item, "target_text": t.target_text,
            "reference_png": encode_png(t.reference), "target_png": encode_png(t.target), "source": "shapes"}


def _pair_images(units: list[dict]) -> dict[tuple, Image.Image]:
    """(pair, pair_row) -> the pair image, for the pairs ``units`` name: a PNG file read whole, a shard's rows
    from the row groups holding them (``image`` column only)."""
    images: dict[tuple, Image.Image] = {}
    shards: dict[str, set[int]] = {}
    for unit in units:
        if unit["pair_row"] is None:
            key = (unit["pair"], None)
            if key not in images:
                images[key] = Image.open(io.BytesIO(storage.read_bytes(unit["pair"])))
        else:
            shards.setdefault(unit["pair"], set()).add(unit["pair_row"])
    for shard, rows in shards.items():
        fs, path = storage.resolve(shard)
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            start = 0
            for group in range(parquet.num_row_groups):
                count = parquet.metadata.row_group(group).num_rows
                wanted = sorted(r for r in rows if start <= r < start + count)
                if wanted:
                    column = parquet.read_row_group(group, columns=["image"]).column("image")
                    for row in wanted:
                        value = column[row - start].as_py()
                        data = value["bytes"] if isinstance(value, dict) else value
                        images[(shard, row)] = Image.open(io.BytesIO(data))
                start += count
    return images


def render_rows(units: list[dict], size: int, padding: int) -> list[dict]:
    """Triplet rows (``sfo.records.TRIPLET_SCHEMA`` + any extra keys the units carry) from ``units``: finished
    rows pass through; a subjects200k unit's pair is split into its panels, resized to ``size`` and encoded."""
    todo = [u for u in units if u.get("reference_png") is None]
    images = _pair_images(todo) if todo else {}
    panels: dict[tuple, list[bytes]] = {}  # both directions of a pair split it once
    out = []
    for unit in units:
        if unit.get("reference_png") is not None:
            out.append(unit)
            continue
        key = (unit["pair"], unit["pair_row"])
        if key not in panels:
            halves = split_subjects200k_pair(images[key], padding=padding)
            panels[key] = [encode_png(p.resize((size, size), Image.BICUBIC)) for p in halves]
        row = {k: v for k, v in unit.items() if k not in LOCATOR_KEYS}
        out.append(row | {"reference_png": panels[key][unit["panel_ref"]], "target_png": panels[key][unit["panel_tgt"]]})
    return out


def quality_note(stats: dict, minimum: int) -> str:
    return (f" from {stats['pairs']} pairs ({stats['filtered']} dropped below quality {minimum}, "
            f"{stats['unscored']} without scores kept)")

