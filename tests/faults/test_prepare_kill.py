"""Fault test of prepare: SIGKILL the job after its first files, rerun it into the same output: the finished
files are kept, each sample id is written once, and the files end as an uninterrupted run's (same names,
same rows, cached encoder outputs included); a rerun of the finished output is a no-op."""

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


def _files(folder: Path) -> dict[str, list[dict]]:
    return {path.name: pq.read_table(path).to_pylist() for path in parquet_files(folder)}


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

    capsys.readouterr()
    prepare.run(load_config(prepare.PrepareConfig, None, args))
    assert f"resuming: {rows_kept} triplet(s) already in" in capsys.readouterr().out
    assert {name: (output / name).stat().st_mtime_ns for name in kept} == stamps  # finished files untouched
    resumed = _files(output)
    ids = [row["sample_id"] for rows in resumed.values() for row in rows]
    assert len(ids) == ROWS == len(set(ids))  # each sample id exactly once

    straight = _files(prepare.run(load_config(prepare.PrepareConfig, None, [*ARGS, f"data.output={tmp_path / 'straight'}"])))
    assert resumed == straight  # same files, same rows in them, byte for byte (PNGs and cached floats)

    capsys.readouterr()
    prepare.run(load_config(prepare.PrepareConfig, None, args))
    assert f"already holds all {ROWS} triplets of this config; nothing to do" in capsys.readouterr().out
