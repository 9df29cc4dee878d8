"""Fault test of prepare: SIGKILL the job (its driver and the local Ray its cache's actor pool runs on) after
its first files, rerun it into the same output: the finished files are kept, each sample id is written once,
and the files end as an uninterrupted run's (same names, same rows, cached encoder outputs included); a
rerun of the finished output is a no-op.

The encoding runs (the rerun, the straight run) are jobs of their own, each with its own fresh Ray, as a
user would run them: this test process starts no Ray (the pipeline tests' session Ray would refuse a second)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import prepare
from pipelines.config import load_config
from pipelines.resume import parquet_files
from tests.faults.jobs import start_job

ROWS, PER_FILE = 24, 4
PAUSE_S = 0.5  # after each file of the killed job: the kill lands between two files on any machine
ARGS = ["data.source=synthetic", f"data.limit={ROWS}", "data.size=32", f"data.rows_per_file={PER_FILE}",
        "cache.enabled=true", "cache.batch_size=2"]


def _job(tmp_path: Path, args: list[str], log: str) -> str:
    """``python -m pipelines.prepare args`` run to its end (a fresh local Ray of its own); returns its output."""
    job = start_job("pipelines.prepare", args, tmp_path / log)
    assert job.wait(timeout=600) == 0, (tmp_path / log).read_text()[-3000:]
    return (tmp_path / log).read_text()


def _files(folder: Path) -> dict[str, list[dict]]:
    return {Path(path).name: pq.read_table(path).to_pylist() for path in parquet_files(folder)}


@pytest.mark.slow
def test_a_killed_prepare_job_keeps_its_files_and_the_rerun_ends_as_a_straight_run(tmp_path, capsys):
    output = tmp_path / "out"
    args = [*ARGS, f"data.output={output}"]
    job = start_job("tests.faults.paced_job", ["pipelines.prepare", str(PAUSE_S), *args], tmp_path / "job.log")
    try:
        deadline = time.time() + 240
        while not (output.is_dir() and parquet_files(output)):
            assert time.time() < deadline, "no output file after 240 s"
            assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # no clean-up at all
        job.wait()
    kept = _files(output)
    rows_kept = sum(len(rows) for rows in kept.values())
    assert 0 < rows_kept < ROWS, f"kill after the first file: expected partial output, got {rows_kept} rows"
    stamps = {name: (output / name).stat().st_mtime_ns for name in kept}

    rerun = _job(tmp_path, args, "rerun.log")
    assert f"resuming: {rows_kept} triplet(s) already in" in rerun
    assert f"wrote {ROWS - rows_kept} triplets ({rows_kept} kept from an earlier run)" in rerun
    assert {name: (output / name).stat().st_mtime_ns for name in kept} == stamps  # finished files untouched
    resumed = _files(output)
    ids = [row["sample_id"] for rows in resumed.values() for row in rows]
    assert len(ids) == ROWS == len(set(ids))  # each sample id exactly once

    _job(tmp_path, [*ARGS, f"data.output={tmp_path / 'straight'}"], "straight.log")
    assert resumed == _files(tmp_path / "straight")  # same files, same rows in them, byte for byte (PNGs, cached bf16)

    capsys.readouterr()
    prepare.run(load_config(prepare.PrepareConfig, None, args))
    assert f"already holds all {ROWS} triplets of this config; nothing to do" in capsys.readouterr().out
