"""Fault tests of cdns: SIGKILL the job mid-run and rerun into the same output, or SIGKILL one generator
actor: every sample exactly once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import cdns
from pipelines.config import load_config
from tests.faults.jobs import command, descendants, start_job, write_triplets

ROWS, PER_FILE, SIZE = 48, 4, 32


def _args(tmp_path: Path, output: Path) -> list[str]:
    return [f"data.input={tmp_path / 'triplets.parquet'}", f"data.output={output}", f"cdns.size={SIZE}", "cdns.steps=8",
            f"cdns.rows_per_file={PER_FILE}", "cdns.batch_size=4", "scaling.cpus_per_worker=0.5"]


@pytest.mark.slow
def test_a_killed_cdns_job_keeps_its_files_and_the_rerun_completes_exactly_once(tmp_path, capsys):
    rows = write_triplets(tmp_path / "triplets.parquet", ROWS, SIZE, seed=5)
    output = tmp_path / "out"
    args = _args(tmp_path, output)
    job = start_job("pipelines.cdns", args, tmp_path / "job.log")
    written = lambda: output.exists() and bool(cdns.parquet_files(output))  # noqa: E731
    try:
        deadline = time.time() + 240
        while not written():
            assert time.time() < deadline, "no output file after 240 s"
            assert job.poll() is None, "the job ended before writing anything"
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and the local Ray it started: no clean-up at all
        job.wait()
    kept = cdns.done_sample_ids(output)[0]
    assert 0 < len(kept) < ROWS, f"kill after the first file: expected partial output, got {len(kept)} rows"

    result = cdns.run(load_config(cdns.CdnsConfig, None, [*args, "runner=local"]))
    assert result["skipped"] == len(kept) and result["written"] == ROWS - len(kept)
    table = pq.ParquetDataset(cdns.parquet_files(output)).read(columns=["sample_id"])
    ids = table["sample_id"].to_pylist()
    assert sorted(ids) == sorted(t.sample_id for t in rows) and len(ids) == len(set(ids))  # each exactly once


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the actor process in /proc (Linux)")
@pytest.mark.slow
def test_a_killed_generator_actor_is_replaced_and_the_job_writes_every_sample_once(tmp_path):
    rows = write_triplets(tmp_path / "triplets.parquet", ROWS, SIZE, seed=6)
    output = tmp_path / "out"
    job = start_job("pipelines.cdns", _args(tmp_path, output), tmp_path / "job.log")
    try:
        deadline = time.time() + 240
        while not (output.exists() and cdns.parquet_files(output)):
            assert time.time() < deadline, "no output file after 240 s"
            assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.2)
        actors = [pid for pid in descendants(job.pid) if "NegativeGenerator" in command(pid)]
        assert actors, "no generator actor process found"
        done_before = len(cdns.done_sample_ids(output)[0])
        os.kill(actors[0], signal.SIGKILL)
        assert done_before < ROWS, "the job had finished before the kill"
        assert job.wait(timeout=300) == 0, (tmp_path / "job.log").read_text()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    table = pq.ParquetDataset(cdns.parquet_files(output)).read(columns=["sample_id"])
    ids = table["sample_id"].to_pylist()
    assert sorted(ids) == sorted(t.sample_id for t in rows) and len(ids) == len(set(ids))  # each exactly once
