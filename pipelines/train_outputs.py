"""What rank 0 of the sft and sfo jobs writes into the run folder, through ``cluster.storage`` (a local
folder, ``s3://`` or ``gs://``): ``metrics.jsonl``, ``adapters/<name>/`` and ``summary.json``; and when it
reports to Ray Train (``ReportCadence``).

Object stores cannot append: the metrics log lives in rank 0's memory and is written whole after every step
(a PUT of a few KiB), so a kill never leaves a partial line under the final name.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from cluster import storage
from pipelines.train_config import SfoConfig, TrainConfig
from sfo import adapters as A

FINGERPRINT_MAX_PARAMS = 50_000_000  # hash frozen weights only for small models (the tiny preset)


class MetricsLog:
    """``metrics.jsonl`` of a run (re)starting after step ``start``, kept in memory and written whole.

    Lines after ``start`` came from an attempt that died before its next checkpoint: they are dropped (and the
    file rewritten at once), so after any resume or retry the log holds each step exactly once. ``attempt``
    counts from 1: one more than the largest attempt the log has seen (dropped lines included, so a retry that
    found no checkpoint and starts over is still told apart from the attempt before it).
    """

    def __init__(self, uri: str | Path, start: int):
        kept, attempt = [], 1 if not start else 2
        if storage.is_file(uri):
            for line in storage.read_text(uri).splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill (a local file written before whole writes)
                    continue
                attempt = max(attempt, int(record.get("attempt", 1)) + 1)
                if record.get("step", 0) <= start:
                    kept.append(json.dumps(record))
        self.uri, self.lines, self.attempt = str(uri), kept, attempt
        self.write()

    def append(self, record: dict) -> None:
        """Adds one step's line and writes the file whole."""
        self.lines.append(json.dumps(record))
        self.write()

    def write(self) -> None:
        storage.write_text(self.uri, "".join(line + "\n" for line in self.lines))


def start_metrics_log(path: str | Path, start: int) -> int:
    """Prepares ``metrics.jsonl`` for a run (re)starting after step ``start`` (``MetricsLog``); returns the attempt."""
    return MetricsLog(path, start).attempt


class ReportCadence:
    """When the loop calls ``ray.train.report``: every ``train.report_every`` steps, but never sooner than
    ``train.report_interval_s`` after the previous report.

    Ray Train (V2) hands a worker's reports to its controller through a one-slot queue that the controller
    drains once per poll of the workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default): a report made
    sooner than that after the previous one blocks the training loop until the next poll (measured: 2.0 s per
    step when reporting every 0.05 s step). Only rank 0's clock decides, and the step's all-reduce shares its
    decision, so every rank calls ``report`` (a collective) at the same steps."""

    def __init__(self, every: int, interval_s: float, clock=time.monotonic):
        self.every, self.interval_s, self.clock = every, interval_s, clock
        self.last = -float("inf")

    def due(self, step: int) -> bool:
        return step % self.every == 0 and self.clock() - self.last >= self.interval_s

    def reported(self) -> None:
        self.last = self.clock()


def frozen_fingerprint(transformer, zero3: bool = False) -> str | None:
    """sha256 of every frozen parameter (base + frozen adapters), or None for big models.

    Under ZeRO-3 the parameters are gathered first (a collective: every rank must call this).
    """
    import deepspeed

    frozen = [(k, p) for k, p in transformer.named_parameters() if not p.requires_grad]
    size = sum(getattr(p, "ds_numel", p.numel()) for _, p in frozen)
    if size > FINGERPRINT_MAX_PARAMS:
        return None
    digest = hashlib.sha256()
    with deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=None, enabled=zero3):
        for key, param in frozen:
            digest.update(key.encode())
            digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def export(cfg: TrainConfig, engine, transformer, trained: str, rank: int, fingerprint_before,
           components: list[str]) -> None:
    """Rank 0 writes the trained adapter (gathered from ZeRO-3 shards first), the sfo job's "ref" beside it and a
    summary (with the pipeline ``components`` the workers loaded) into the run folder."""
    import deepspeed

    params = A.trainable_parameters(transformer)
    gather = cfg.deepspeed.zero_stage == 3
    adapters = storage.join(cfg.output.run_dir, "adapters")
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=gather):
        if rank == 0:
            state = {k: v.detach().clone() for k, v in A.adapter_state_dict(transformer, trained).items()}
            with storage.staged_folder(storage.join(adapters, trained)) as folder:  # remote: uploaded when saved
                A.save_adapter(transformer, trained, folder, state_dict=state)
    fingerprint_after = frozen_fingerprint(transformer, zero3=gather)
    if rank != 0:
        return
    if isinstance(cfg, SfoConfig) and trained != A.REF:  # the sfo LoRA only means something on its ref
        with storage.local_copy(cfg.model.ref_adapter) as folder:
            storage.upload_folder(folder, storage.join(adapters, A.REF))
    summary = {
        "stage": cfg.stage, "variant": getattr(getattr(cfg, "sfo", None), "variant", None), "trained": trained,
        "steps": cfg.train.steps, "world_size": engine.world_size if hasattr(engine, "world_size") else None,
        "frozen_sha256_before": fingerprint_before,
        "frozen_sha256_after": fingerprint_after, "zero_stage": cfg.deepspeed.zero_stage,
        "adapters": sorted({f[len(adapters):].lstrip("/").split("/")[0] for f in storage.list_files(adapters)}),
        "components": components,  # the pipeline modules each worker loaded (cached data: the transformer only)
    }
    storage.write_json(storage.join(cfg.output.run_dir, "summary.json"), summary)
