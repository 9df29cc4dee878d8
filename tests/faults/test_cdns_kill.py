"""Fault tests of cdns: SIGKILL the job mid-run and rerun into the same output, or SIGKILL one generator
actor: every sample exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import cdns
from pipelines.config import load_config
from pipelines.synthetic import synthetic_triplets
from sfo.records import TRIPLET_SCHEMA, encode_png

ROWS, PER_FILE, SIZE = 48, 4, 32


@pytest.mark.slow
def test_a_killed_cdns_job_keeps_its_files_and_the_rerun_completes_exactly_once(tmp_path, capsys):
    rows = synthetic_triplets(ROWS, SIZE, seed=5)
    pq.write_table(pa.Table.from_pylist([
        {"sample_id": t.sample_id, "item": t.item, "target_text": t.target_text, "reference_png": encode_png(t.reference),
         "target_png": encode_png(t.target), "source": "synthetic"} for t in rows], schema=TRIPLET_SCHEMA),
        tmp_path / "triplets.parquet")  # one input file: Ray's reader makes it one block
    output = tmp_path / "out"
    args = [f"data.input={tmp_path / 'triplets.parquet'}", f"data.output={output}", f"cdns.size={SIZE}", "cdns.steps=8",
            f"cdns.rows_per_file={PER_FILE}", "cdns.batch_size=4", "scaling.cpus_per_worker=0.5"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.Popen([sys.executable, "-m", "pipelines.cdns", *args], start_new_session=True, env=env,
                           stdout=open(tmp_path / "job.log", "wb"), stderr=subprocess.STDOUT)
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


def _descendants(root: int) -> dict[int, bytes]:
    """pid -> command line of every descendant of ``root`` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    out = {}
    for pid in found:
        try:
            out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the actor process in /proc (Linux)")
@pytest.mark.slow
def test_a_killed_generator_actor_is_replaced_and_the_job_writes_every_sample_once(tmp_path):
    rows = synthetic_triplets(ROWS, SIZE, seed=6)
    pq.write_table(pa.Table.from_pylist([
        {"sample_id": t.sample_id, "item": t.item, "target_text": t.target_text, "reference_png": encode_png(t.reference),
         "target_png": encode_png(t.target), "source": "synthetic"} for t in rows], schema=TRIPLET_SCHEMA),
        tmp_path / "triplets.parquet")
    output = tmp_path / "out"
    args = [f"data.input={tmp_path / 'triplets.parquet'}", f"data.output={output}", f"cdns.size={SIZE}", "cdns.steps=8",
            f"cdns.rows_per_file={PER_FILE}", "cdns.batch_size=4", "scaling.cpus_per_worker=0.5"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.Popen([sys.executable, "-m", "pipelines.cdns", *args], start_new_session=True, env=env,
                           stdout=open(tmp_path / "job.log", "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not (output.exists() and cdns.parquet_files(output)):
            assert time.time() < deadline, "no output file after 240 s"
            assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.2)
        actors = [pid for pid, cmd in _descendants(job.pid).items() if b"NegativeGenerator" in cmd]
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
