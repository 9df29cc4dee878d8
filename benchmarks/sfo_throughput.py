"""SFO training throughput on Ray Train + DeepSpeed ZeRO-2: samples/s with 1 vs 2 workers.

    python -m benchmarks.sfo_throughput [--steps 6] [--size 32] [--rows 16]

Builds synthetic quadruplets (another subject's target stands in for the CDNS negative), trains a
"ref" LoRA for one step (sft), then runs the sfo job with 1 and 2 workers (adamw: Prodigy is
refused under ZeRO sharding on CPU) and prints the median samples/s of the steps after the first
(the first pays the Ray Data start-up). On a 2-core laptop the workers share the cores, so the
ratio says little about a GPU cluster; it checks the plumbing and the per-step overheads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipelines.config import load_config
from pipelines.synthetic import synthetic_triplets
from pipelines.train import run
from pipelines.train_config import SfoConfig, SftConfig
from sfo.records import QUADRUPLET_SCHEMA, encode_png

RAY_CPUS = 4  # fractional workers + Ray Data tasks on 2 cores (docs: ENVIRONMENT.md)


def write_quadruplets(folder: Path, rows: int, size: int) -> str:
    triplets, others = synthetic_triplets(rows, size, seed=0), synthetic_triplets(rows, size, seed=1)
    columns = {
        "sample_id": [t.sample_id for t in triplets], "item": [t.item for t in triplets],
        "target_text": [t.target_text for t in triplets], "reference_png": [encode_png(t.reference) for t in triplets],
        "target_png": [encode_png(t.target) for t in triplets], "source": ["synthetic"] * rows,
        "negative_png": [encode_png(o.target) for o in others], "negative_mode": ["benchmark"] * rows,
        "negative_image_degradation": ["none"] * rows, "negative_text_degradation": ["none"] * rows,
        "negative_blur_radius": [None] * rows, "negative_noise_std": [None] * rows,
        "negative_prompt": [t.target_text for t in triplets], "negative_seed": list(range(rows)),
        "negative_steps": [1] * rows, "negative_guidance": [1.0] * rows, "negative_adapter_sha256": ["0"] * rows,
    }
    folder.mkdir(parents=True)
    pq.write_table(pa.table(columns, schema=QUADRUPLET_SCHEMA), folder / "part-0.parquet")
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rows", type=int, default=16, help="enough for steps x workers in one epoch")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False)  # not a dev cluster left running
    root = Path(tempfile.mkdtemp(prefix="sfo-throughput-"))
    data = write_quadruplets(root / "quadruplets", args.rows, args.size)
    common = [f"data.path={data}", f"data.size={args.size}", f"output.storage_path={root}"]
    run(load_config(SftConfig, None, [*common, "train.steps=1", "output.name=sft"]))
    rates = {}
    for workers in (1, 2):
        cfg = load_config(SfoConfig, None, [
            *common, f"train.steps={args.steps}", f"scaling.num_workers={workers}", "train.optimizer=adamw",
            "train.lr=1e-4", f"model.ref_adapter={root / 'sft' / 'adapters' / 'ref'}", f"output.name=sfo-{workers}"])
        run(cfg)
        log = [json.loads(line) for line in (cfg.output.run_dir / "metrics.jsonl").read_text().splitlines()]
        rates[workers] = statistics.median(m["samples_per_s"] for m in log[1:] or log)
        print(f"sfo, {workers} worker(s): {rates[workers]:.2f} samples/s (median of steps 2..{args.steps})", flush=True)
    print(f"speed-up 2 vs 1 workers: {rates[2] / rates[1]:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
