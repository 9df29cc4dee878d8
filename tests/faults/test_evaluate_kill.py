"""Fault test of evaluate: SIGKILL the Ray job after its first image files, rerun it into the same output: the
images written are kept (none deleted), only the missing (method, subject, prompt, seed) are generated, each
is written once, and images and summary equal an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import evaluate
from pipelines.config import load_config
from pipelines.resume import done_keys, parquet_files
from tests.faults.jobs import start_job

SUBJECTS, SEEDS = 8, 4  # 32 images in batches of 2 on one actor: the kill lands mid-run
ARGS = [f"eval.subjects={SUBJECTS}", f"eval.seeds={SEEDS}", "eval.size=32", "eval.steps=8", "eval.batch_size=2",
        "scaling.cpus_per_worker=0.5"]


def _images(folder) -> list[dict]:
    return [row for path in parquet_files(folder / "images") for row in pq.read_table(path).to_pylist()]


@pytest.mark.slow
def test_a_killed_evaluate_job_keeps_its_images_and_the_rerun_ends_as_a_straight_run(tmp_path, capsys):
    output = tmp_path / "out"
    job = start_job("pipelines.evaluate", [*ARGS, f"output={output}"], tmp_path / "job.log")
    try:
        deadline = time.time() + 240
        while not ((output / "images").is_dir() and parquet_files(output / "images")):
            assert time.time() < deadline, "no image file after 240 s"
            assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and the local Ray it started: no clean-up at all
        job.wait()
    files = parquet_files(output / "images")
    kept = done_keys(output / "images", list(evaluate.IMAGE_KEY))[0]
    files = [Path(path) for path in files if Path(path).exists()]  # a file cut short was moved aside
    assert 0 < len(kept) < SUBJECTS * SEEDS, f"kill after the first file: expected partial output, got {len(kept)}"
    stamps = {path: path.stat().st_mtime_ns for path in files}

    capsys.readouterr()
    summary = evaluate.run(load_config(evaluate.EvaluateConfig, None, [*ARGS, f"output={output}", "runner=local"]))
    assert f"{len(kept)} image(s) already in" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in files} == stamps  # earlier images kept, untouched
    keys = [tuple(row[c] for c in evaluate.IMAGE_KEY) for row in _images(output)]
    assert len(keys) == SUBJECTS * SEEDS == len(set(keys))  # each image exactly once

    straight = tmp_path / "straight"
    expected = evaluate.run(load_config(evaluate.EvaluateConfig, None, [*ARGS, f"output={straight}", "runner=local"]))
    assert evaluate.read_images(output, ["base"]).to_pylist() == evaluate.read_images(straight, ["base"]).to_pylist()
    assert summary == expected
