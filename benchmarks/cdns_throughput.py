"""Rows per second of the cdns stage: Ray Data actor pool vs a plain loop over the same NegativeGenerator.

    python -m benchmarks.cdns_throughput [--torch-threads 2]   # tiny model, CPU: 256 rows at 64 px, 28 steps, 1 actor

Prints numbers; asserts nothing. The plain loop's time excludes its model load (printed apart);
the Ray time is the whole job (actor start-up, model load per actor, read, generate, write), and its
steady state is the rate after the first output file (start-up printed apart). The actor holds 0.5 CPU,
so Ray gives its torch one thread unless ``--torch-threads`` (``scaling.torch_threads``) says more,
while the plain loop uses every core.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import cdns
from pipelines.common import start_local_ray
from pipelines.config import load_config
from pipelines.synthetic import synthetic_triplets
from sfo.records import TRIPLET_SCHEMA, encode_png


def write_triplets(path: Path, rows: int, size: int) -> None:
    table = pa.Table.from_pylist([
        {"sample_id": t.sample_id, "item": t.item, "target_text": t.target_text,
         "reference_png": encode_png(t.reference), "target_png": encode_png(t.target), "source": "synthetic"}
        for t in synthetic_triplets(rows, size, seed=0)], schema=TRIPLET_SCHEMA)
    pq.write_table(table, path)


def measure(rows: int = 256, size: int = 64, steps: int = 28, batch: int = 4, actors: int = 1, cpus_per_actor: float = 0.5,
            torch_threads: int | None = None, model: str = "tiny") -> dict:
    """The plain loop and the Ray Data job on the same rows and generator class. Ray's start-up (until its
    first output file) is reported apart from its steady-state rate (the rows after that file over the
    time after it). Returns seconds and rows/s of each."""
    import threading

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_triplets(tmp / "triplets.parquet", rows, size)

        def config(output: str, runner: str) -> cdns.CdnsConfig:
            return load_config(cdns.CdnsConfig, None, [
                f"model.source={model}", f"data.input={tmp / 'triplets.parquet'}", f"data.output={tmp / output}",
                f"cdns.size={size}", f"cdns.steps={steps}", f"cdns.batch_size={batch}", f"cdns.rows_per_file={batch}",
                f"scaling.num_workers={actors}", f"scaling.cpus_per_worker={cpus_per_actor}",
                f"scaling.torch_threads={torch_threads or 'null'}", f"runner={runner}"])

        local = config("local", "local")
        start = time.perf_counter()
        generator = cdns.NegativeGenerator(local)
        load_s = time.perf_counter() - start
        table = pq.read_table(tmp / "triplets.parquet")
        start = time.perf_counter()
        for offset in range(0, table.num_rows, batch):
            generator(table.slice(offset, batch))
        loop_s = time.perf_counter() - start
        del generator

        first: list[tuple[float, int]] = []  # (time, rows) of the first output file
        done = threading.Event()

        def watch(folder: Path) -> None:
            while not done.is_set() and not first:
                files = sorted(folder.glob("*.parquet")) if folder.exists() else []
                if files:
                    try:
                        first.append((time.perf_counter(), sum(pq.read_metadata(f).num_rows for f in files)))
                    except Exception:  # a file still being written
                        pass
                time.sleep(0.05)

        started_ray = not ray.is_initialized()
        if started_ray:
            start_local_ray(num_cpus=4)  # a private local Ray
        watcher = threading.Thread(target=watch, args=(tmp / "ray",), daemon=True)
        start = time.perf_counter()
        watcher.start()
        cdns.run(config("ray", "ray"))
        ray_s = time.perf_counter() - start
        done.set()
        if started_ray:
            ray.shutdown()
    first_at, first_rows = first[0] if first else (start + ray_s, 0)
    startup_s = first_at - start
    steady = (rows - first_rows) / max(ray_s - startup_s, 1e-9)
    return {"rows": rows, "loop_s": loop_s, "load_s": load_s, "ray_s": ray_s, "startup_s": startup_s,
            "loop_rows_per_s": rows / loop_s, "ray_rows_per_s": rows / ray_s, "ray_steady_rows_per_s": steady}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' or a local FLUX.1-dev folder")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=0.5)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="scaling.torch_threads of the actors (default: Ray's, one thread for a 0.5-CPU actor)")
    args = parser.parse_args()
    r = measure(args.rows, args.size, args.steps, args.batch, args.actors, args.cpus_per_actor, args.torch_threads,
                args.model)
    print(f"\n{args.rows} rows, {args.size} px, {args.steps} steps, batch {args.batch}, model {args.model!r}")
    print(f"  plain loop : {r['loop_rows_per_s']:7.2f} rows/s  ({r['loop_s']:.1f} s; model load {r['load_s']:.1f} s apart)")
    print(f"  Ray Data   : {r['ray_rows_per_s']:7.2f} rows/s  ({r['ray_s']:.1f} s end to end, {args.actors} actor(s)); "
          f"steady state {r['ray_steady_rows_per_s']:.2f} rows/s after {r['startup_s']:.1f} s of start-up")
    print(f"  ratio Ray / plain : {r['ray_rows_per_s'] / r['loop_rows_per_s']:.2f}x end to end, "
          f"{r['ray_steady_rows_per_s'] / r['loop_rows_per_s']:.2f}x steady state")


if __name__ == "__main__":
    main()
