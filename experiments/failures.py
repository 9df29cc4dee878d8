"""Where an adapter fails to copy the subject: an evaluation's images broken down by the reference's details.

    python -m experiments.failures RUN/evaluate [--methods sft,sfo]

Reads a ``pipelines.evaluate_shapes`` output (``images/*.parquet``: each image and its verdicts), rebuilds
each image's cell from its ``sample_id`` (``shapes-<world seed>-<index>``), reads the image again with the
oracle and prints, per method:

- subject fidelity and pattern / accent copied, per reference pattern, accent, and target size;
- the patterns drawn in place of each reference pattern (rows: the reference's, columns: the one read;
  ``none``: no pattern could be read).

A diagnostic of what limits the SFT base and what SFO moves; it judges nothing new (the oracle's verdicts
are the evaluation's own) and picks nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

BREAKDOWNS = ("pattern", "accent", "size")  # the reference's pattern and accent, the target text's size


def breakdown(rows: list[dict]) -> dict:
    """Per method: rates per reference detail, and the confusion of patterns (reference -> read)."""
    from sfo.shapes import oracle
    from sfo.records import decode_png
    from sfo.shapes.world import triplets_of

    cells = triplets_of({row["sample_id"] for row in rows})
    tables: dict[str, dict] = defaultdict(lambda: {"by": defaultdict(lambda: defaultdict(list)),
                                                   "confusion": Counter(), "images": 0})
    for row in rows:
        cell = cells[row["sample_id"]]
        table = tables[row["method"]]
        table["images"] += 1
        values = {"pattern": cell.subject.pattern, "accent": cell.subject.accent, "size": cell.context.size}
        for key in BREAKDOWNS:
            for judged in ("subject", "pattern", "accent"):
                table["by"][key][(values[key], judged)].append(bool(row[judged]))
        read = oracle.read_image(decode_png(row["image_png"])).pattern
        table["confusion"][(cell.subject.pattern, read or "none")] += 1
    return {method: {"images": t["images"], "confusion": dict(t["confusion"]),
                     "by": {key: {f"{value}/{judged}": sum(v) / len(v) for (value, judged), v in by.items()}
                            for key, by in t["by"].items()}}
            for method, t in tables.items()}


def format_breakdown(method: str, result: dict) -> str:
    from sfo.shapes.world import PATTERNS

    lines = [f"## {method} ({result['images']} images)", "", "| reference | value | subject | pattern | accent | n |",
             "|---|---|---|---|---|---|"]
    for key, rates in result["by"].items():
        values = sorted({name.split("/")[0] for name in rates})
        for value in values:
            n = (sum(result["confusion"].get((value, read), 0) for read in (*PATTERNS, "none"))
                 if key == "pattern" else "")
            lines.append(f"| {key} | {value} | " + " | ".join(f"{rates[f'{value}/{j}']:.2f}" for j in
                                                            ("subject", "pattern", "accent")) + f" | {n} |")
    reads = (*PATTERNS, "none")
    lines += ["", "| reference pattern -> read | " + " | ".join(reads) + " |", "|---|" + "---|" * len(reads)]
    for pattern in PATTERNS:
        counts = (str(result["confusion"].get((pattern, r), 0)) for r in reads)
        lines.append(f"| {pattern} | " + " | ".join(counts) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.failures", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("evaluation", help="a pipelines.evaluate_shapes output folder (with images/*.parquet)")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: every one there)")
    args = parser.parse_args(argv)
    files = sorted((Path(args.evaluation) / "images").glob("*.parquet"))
    if not files:
        parser.error(f"evaluation: no images/*.parquet under {args.evaluation}; give a pipelines.evaluate_shapes "
                     "output folder")
    import pyarrow.parquet as pq

    columns = ["method", "sample_id", "image_png", "subject", "pattern", "accent"]
    rows = pq.read_table(files, columns=columns).to_pylist()
    if args.methods:
        wanted = args.methods.split(",")
        missing = sorted(set(wanted) - {r["method"] for r in rows})
        if missing:
            parser.error(f"--methods: {', '.join(missing)} not in this evaluation "
                         f"(it has {', '.join(sorted({r['method'] for r in rows}))})")
        rows = [r for r in rows if r["method"] in wanted]
    for method, result in breakdown(rows).items():
        print(format_breakdown(method, result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
