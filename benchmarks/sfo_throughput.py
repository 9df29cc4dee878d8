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
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipelines.common import start_local_ray
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


@contextmanager
def _sfo_runs(prefix: str, size: int, rows: int):
    """Synthetic quadruplets and a one-step "ref" adapter (sft) on a local Ray, unless one is up; yields
    ``sfo(name, *overrides)``, which runs the sfo job (adamw) on them and returns its metrics.jsonl lines."""
    started_ray = not ray.is_initialized()
    if started_ray:
        start_local_ray(num_cpus=RAY_CPUS)  # not a dev cluster left running
    root = Path(tempfile.mkdtemp(prefix=prefix))
    data = write_quadruplets(root / "quadruplets", rows, size)
    common = [f"data.path={data}", f"data.size={size}", f"output.storage_path={root}"]
    run(load_config(SftConfig, None, [*common, "train.steps=1", "output.name=sft"]))

    def sfo(name: str, *overrides: str) -> list[dict]:
        cfg = load_config(SfoConfig, None, [*common, "train.optimizer=adamw", "train.lr=1e-4",
                                            f"model.ref_adapter={root / 'sft' / 'adapters' / 'ref'}",
                                            f"output.name={name}", *overrides])
        run(cfg)
        return [json.loads(line) for line in (Path(cfg.output.run_dir) / "metrics.jsonl").read_text().splitlines()]

    try:
        yield sfo
    finally:
        if started_ray:
            ray.shutdown()


def worker_rates(steps: int = 6, size: int = 32, rows: int = 16) -> dict[int, float]:
    """Median samples/s of the sfo job's steps after the first, with 1 and 2 Ray Train workers."""
    rates = {}
    with _sfo_runs("sfo-throughput-", size, rows) as sfo:
        for workers in (1, 2):
            log = sfo(f"sfo-{workers}", f"train.steps={steps}", f"scaling.num_workers={workers}")
            rates[workers] = statistics.median(m["samples_per_s"] for m in log[1:] or log)
    return rates


def report_overhead(steps: int = 60, size: int = 32, rows: int = 16, no_wait_steps: int = 12) -> dict[str, float]:
    """Mean wall seconds per step (metrics.jsonl's ``time``, so report calls are inside; steps 2 to N-1, no
    start-up, no final checkpoint) of the sfo job, one worker, same data and seed, reporting to Ray Train:
    every step with no interval (the cause: each report waits for the controller's next poll), with the
    default cadence (``train.report_every=1``, ``train.report_interval_s=2``), and only at the end."""
    seconds = {}
    arms = (("every step, no interval", 1, 0.0, no_wait_steps), ("default cadence", 1, 2.0, steps),
            ("at the end", steps, 2.0, steps))
    with _sfo_runs("sfo-report-", size, rows) as sfo:
        for label, every, interval, n in arms:
            times = [m["time"] for m in sfo(f"sfo-{len(seconds)}", f"train.steps={n}", f"train.report_every={every}",
                                            f"train.report_interval_s={interval}")]
            seconds[label] = (times[-2] - times[1]) / (len(times) - 3)
    return seconds


def _samples_per_s(step, batch: int, repeats: int) -> float:
    """``step()`` once to warm up, then ``repeats`` times timed: samples per second at ``batch`` per step."""
    step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return batch * repeats / (time.perf_counter() - started)


def cached_vs_png(size: int = 64, batch: int = 8, repeats: int = 5) -> dict[str, float]:
    """SFO samples/s of one training step (batch building + Eq. 3 forward and backward), in this process,
    with the batch built from cached latents/embeddings (cdns on cached triplets) vs decoded and encoded
    from the PNGs; same model, rows and noise."""
    import numpy as np
    import torch

    from pipelines import cdns
    from pipelines.prepare import PrepareConfig
    from pipelines.prepare import run as prepare
    from pipelines.train_data import build_batch
    from sfo.adapters import REF, SFO, add_lora
    from sfo.models import load_flux
    from sfo.objectives import sfo_objective

    root = Path(tempfile.mkdtemp(prefix="sfo-cache-bench-"))
    triplets = prepare(load_config(PrepareConfig, None, [f"data.output={root / 't'}", f"data.limit={batch}",
                                                         f"data.size={size}", "cache.enabled=true"]))
    cdns.run(load_config(cdns.CdnsConfig, None, [f"data.input={triplets}", f"data.output={root / 'q'}", f"cdns.size={size}",
                                                 "cdns.steps=2", "runner=local"]))
    rows = {k: np.array(v, dtype=object) for k, v in pq.read_table(root / "q").to_pydict().items()}
    cfg = load_config(SfoConfig, None, [f"data.path={root / 'q'}", f"data.size={size}", f"model.ref_adapter={root}",
                                        f"output.storage_path={root}"])
    model = load_flux("tiny", device="cpu")
    for name in (REF, SFO):
        add_lora(model.transformer, name, 4 if name == REF else 16)
    def step(cached: bool) -> None:
        b = build_batch(cfg, model, rows, cached)
        noise = torch.randn(b.target.shape, generator=torch.Generator().manual_seed(0))
        loss, _ = sfo_objective(model.transformer, b, torch.full((len(b),), 0.5), noise, beta=1000.0)
        loss.mean().backward()

    return {label: _samples_per_s(lambda c=cached: step(c), batch, repeats)
            for label, cached in (("png", False), ("cached", True))}


def stored_vs_live(size: int = 64, batch: int = 8, repeats: int = 5) -> dict[str, float]:
    """SFO samples/s of one training step (Eq. 3 forward and backward on one encoded batch), in this process,
    with the reference pass run in the step ("live") vs its errors given, as the cdns stage stores them with
    ``cdns.score.draws`` ("stored"); same model, batch, t and noise."""
    import numpy as np
    import torch
    from PIL import Image

    from sfo.adapters import REF, SFO, add_lora
    from sfo.models import load_flux
    from sfo.objectives import encode_batch, reference_errors, sfo_objective

    model = load_flux("tiny", device="cpu")
    for name in (REF, SFO):
        add_lora(model.transformer, name, 4 if name == REF else 16)
    rng = np.random.default_rng(0)
    image = lambda: Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))  # noqa: E731
    b = encode_batch(model, [image() for _ in range(batch)], ["a photo"] * batch, [image() for _ in range(batch)],
                     [image() for _ in range(batch)])
    t = torch.full((batch,), 0.5)
    noise = torch.randn(b.target.shape, generator=torch.Generator().manual_seed(0))
    stored = reference_errors(model.transformer, b, t, noise)
    def step(extra: dict) -> None:
        loss, _ = sfo_objective(model.transformer, b, t, noise, beta=1000.0, **extra)
        loss.mean().backward()

    return {label: _samples_per_s(lambda e=extra: step(e), batch, repeats)
            for label, extra in (("live", {}), ("stored", {"ref_errors": stored}))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rows", type=int, default=16, help="enough for steps x workers in one epoch")
    args = parser.parse_args()
    rates = worker_rates(args.steps, args.size, args.rows)
    for workers, rate in rates.items():
        print(f"sfo, {workers} worker(s): {rate:.2f} samples/s (median of steps 2..{args.steps})", flush=True)
    print(f"speed-up 2 vs 1 workers: {rates[2] / rates[1]:.2f}x")
    cache = cached_vs_png()
    print(f"one sfo step in process, 64 px: {cache['png']:.2f} samples/s from PNGs, {cache['cached']:.2f} from the cache "
          f"({cache['cached'] / cache['png']:.2f}x)")
    scores = stored_vs_live()
    print(f"one sfo step in process, 64 px: {scores['live']:.2f} samples/s with the reference pass, {scores['stored']:.2f} "
          f"with stored reference errors ({scores['stored'] / scores['live']:.2f}x)")


if __name__ == "__main__":
    main()
