"""Rows per second of the cdns stage: Ray Data actor pool vs a plain loop over the same NegativeGenerator.

    python benchmarks/cdns_throughput.py          # tiny model, CPU: 16 rows at 64 px, 28 steps, 1 actor

Prints numbers; asserts nothing. The plain loop's time excludes its model load (printed apart);
the Ray time is the whole job (actor start-up, model load per actor, read, generate, write), which
is what a user waits for. On a 2-core laptop expect Ray to be slower: the point of the actor pool
is one actor per GPU on a cluster, not speed on one CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import cdns
from pipelines.config import load_config
from pipelines.synthetic import synthetic_triplets
from sfo.records import TRIPLET_SCHEMA, encode_png


def write_triplets(path: Path, rows: int, size: int) -> None:
    table = pa.Table.from_pylist([
        {"sample_id": t.sample_id, "item": t.item, "target_text": t.target_text,
         "reference_png": encode_png(t.reference), "target_png": encode_png(t.target), "source": "synthetic"}
        for t in synthetic_triplets(rows, size, seed=0)], schema=TRIPLET_SCHEMA)
    pq.write_table(table, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' or a local FLUX.1-dev folder")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=0.5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_triplets(tmp / "triplets.parquet", args.rows, args.size)

        def config(output: str, runner: str) -> cdns.CdnsConfig:
            return load_config(cdns.CdnsConfig, None, [
                f"model.source={args.model}", f"data.input={tmp / 'triplets.parquet'}", f"data.output={tmp / output}",
                f"cdns.size={args.size}", f"cdns.steps={args.steps}", f"cdns.batch_size={args.batch}",
                f"scaling.num_workers={args.actors}", f"scaling.cpus_per_worker={args.cpus_per_actor}",
                f"runner={runner}"])

        local = config("local", "local")
        start = time.perf_counter()
        generator = cdns.NegativeGenerator(local)
        load_s = time.perf_counter() - start
        table = pq.read_table(tmp / "triplets.parquet")
        start = time.perf_counter()
        for offset in range(0, table.num_rows, args.batch):
            generator(table.slice(offset, args.batch))
        loop_s = time.perf_counter() - start

        import ray

        ray.init(address="local", num_cpus=4, include_dashboard=False)  # a private local Ray
        start = time.perf_counter()
        cdns.run(config("ray", "ray"))
        ray_s = time.perf_counter() - start
        ray.shutdown()

    print(f"\n{args.rows} rows, {args.size} px, {args.steps} steps, batch {args.batch}, model {args.model!r}")
    print(f"  plain loop : {args.rows / loop_s:7.2f} rows/s  ({loop_s:.1f} s; model load {load_s:.1f} s apart)")
    print(f"  Ray Data   : {args.rows / ray_s:7.2f} rows/s  ({ray_s:.1f} s end to end, {args.actors} actor(s))")
    print(f"  ratio Ray / plain : {loop_s / ray_s:.2f}x")


if __name__ == "__main__":
    main()
