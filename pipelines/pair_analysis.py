"""CDNS pair analysis (SFO paper Fig. 3b, App. D.6 Table F): DINO similarity of each positive/negative pair.

Reads the cdns stage's quadruplet Parquet, scores DINO(target_png, negative_png) per row, and writes

- ``<output>/quadruplets.parquet``: the input rows plus ``pair_dino`` (float32) and ``pair_bucket``
  ("high" | "mid" | "low": high = the pair is most similar, i.e. the subtlest fidelity gap);
- ``<output>/bucket=<name>.parquet``: the same rows split per bucket, ready for the sfo job's
  ``data.input`` (Table F trains on Low, Mid, High or all three);
- ``<output>/histogram.json``: numpy histogram counts/edges of ``pair_dino`` and the thresholds.

Input and output are local paths or ``s3://`` / ``gs://`` URIs (``cluster.storage``); each file is written whole.

Buckets are tertiles of ``pair_dino`` unless ``analysis.thresholds=[low,high]`` is given.
A plain in-process loop (no Ray): the encoders are small next to generation.

    python -m pipelines.pair_analysis --config pipelines/configs/pair_analysis.yaml [key=value ...]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cluster import storage
from pipelines.config import ConfigError, job_main
from pipelines.resume import parquet_files

BUCKETS = ("low", "mid", "high")  # ascending pair DINO similarity
TERTILES = (1 / 3, 2 / 3)


@dataclass
class AnalysisSection:
    input: str | None = None  # quadruplet Parquet file or folder (the cdns stage's output): a path, s3:// or gs://
    output: str = "runs/analysis/pairs"  # a path, s3:// or gs://
    bins: int = 20  # histogram bins over [-1, 1]
    thresholds: list[float] | None = None  # [low, high]: pair_dino < low -> low, >= high -> high; null = tertiles
    batch_size: int = 16
    dino_encoder: str = "tiny"  # "tiny" (random weights) or a local DINO ViT-S/16 folder
    clip_encoder: str = "tiny"  # only loaded alongside (Scorer holds both); "tiny" or a CLIP folder

    def __post_init__(self) -> None:
        if self.input is not None:
            self.input = storage.check_uri(self.input, "analysis.input")
        self.output = storage.check_uri(self.output, "analysis.output")
        if self.bins < 1:
            raise ValueError(f"analysis.bins: must be at least 1, got {self.bins}")
        if self.thresholds is not None and (len(self.thresholds) != 2 or self.thresholds[0] > self.thresholds[1]):
            raise ValueError(f"analysis.thresholds: need [low, high] with low <= high, got {self.thresholds}")


@dataclass
class PairAnalysisConfig:
    analysis: AnalysisSection = field(default_factory=AnalysisSection)


def bucket_thresholds(scores: np.ndarray, thresholds: list[float] | None = None) -> tuple[float, float]:
    """(low, high) edges: the given ones, or the tertiles of ``scores`` (N,)."""
    if thresholds is not None:
        return float(thresholds[0]), float(thresholds[1])
    low, high = np.quantile(scores, TERTILES)
    return float(low), float(high)


def assign_buckets(scores: np.ndarray, low: float, high: float) -> list[str]:
    """(N,) similarities -> bucket names: < low "low", >= high "high", else "mid"."""
    index = (scores >= low).astype(int) + (scores >= high).astype(int)  # 0, 1, 2
    return [BUCKETS[i] for i in index]


def pair_dino(table: pa.Table, scorer, batch_size: int) -> np.ndarray:
    """(N,) DINO cosine of each row's target_png (positive) and negative_png."""
    from sfo.records import decode_png

    scores = []
    for start in range(0, table.num_rows, batch_size):
        part = table.slice(start, batch_size)
        positives = [decode_png(b) for b in part.column("target_png").to_pylist()]
        negatives = [decode_png(b) for b in part.column("negative_png").to_pylist()]
        scores.append(scorer.pairwise_dino(positives, negatives).numpy())
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def run(config: PairAnalysisConfig) -> dict:
    """Scores, buckets and writes; returns {"rows", "thresholds", "counts", "histogram"}."""
    from sfo.metrics import RANDOM_ENCODERS_NOTE, Scorer
    from sfo.records import QUADRUPLET_SCHEMA, check_schema

    a = config.analysis
    if a.input is None or not storage.exists(a.input):
        raise ConfigError(f"analysis.input: {a.input!r} does not exist; pass the cdns stage's quadruplet Parquet")
    files = parquet_files(a.input)
    if not files:
        raise ConfigError(f"analysis.input: no *.parquet under {a.input!r}")
    table = pa.concat_tables([storage.read_table(f) for f in files])
    try:
        check_schema(table, QUADRUPLET_SCHEMA, "analysis.input")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    scorer = Scorer.load(a.dino_encoder, a.clip_encoder)
    scores = pair_dino(table, scorer, a.batch_size)
    low, high = bucket_thresholds(scores, a.thresholds)
    buckets = assign_buckets(scores, low, high)
    table = table.append_column("pair_dino", pa.array(scores, pa.float32())).append_column(
        "pair_bucket", pa.array(buckets, pa.string()))
    storage.write_table(table, storage.join(a.output, "quadruplets.parquet"))
    counts = {}
    for name in BUCKETS:
        selected = table.filter(pc.equal(table["pair_bucket"], name))
        storage.write_table(selected, storage.join(a.output, f"bucket={name}.parquet"))
        counts[name] = selected.num_rows
    hist, edges = np.histogram(scores, bins=a.bins, range=(-1.0, 1.0))
    result = {"rows": table.num_rows, "thresholds": [low, high], "counts": counts,
              "histogram": {"counts": hist.tolist(), "edges": edges.tolist()},
              "random_encoders": scorer.random_encoders, "note": RANDOM_ENCODERS_NOTE if scorer.random_encoders else ""}
    storage.write_json(storage.join(a.output, "histogram.json"), result)
    print(f"[pair_analysis] {table.num_rows} pairs, thresholds low={low:.3f} high={high:.3f}, counts {counts}", flush=True)
    for c, left in zip(hist, edges):
        if c:
            print(f"  [{left:+.2f}, {left + 2.0 / a.bins:+.2f}) {'#' * int(c)} {c}", flush=True)
    if scorer.random_encoders:
        print(f"NOTE: {RANDOM_ENCODERS_NOTE}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    return job_main(PairAnalysisConfig, "python -m pipelines.pair_analysis", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
