"""Fault test: SIGTERM (what `ray job stop` and Kubernetes send) or SIGINT (Ctrl-C) to a training job's
driver ends the job and every process it started (the local Ray, its train workers) within a bounded time."""

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

from pipelines.synthetic import synthetic_triplets
from sfo.records import TRIPLET_SCHEMA, encode_png

BOUND_S = 60  # driver gone, then every process it started gone, each within this


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process, from /proc."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return out


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()[:80].replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def _descendants(root: int) -> set[int]:
    table, found, frontier = _processes(), set(), {root}
    while frontier:
        frontier = {pid for pid, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def _running(pids: set[int]) -> set[int]:
    table = _processes()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}  # zombies have exited


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc (Linux)")
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_job_and_everything_it_started(tmp_path, signum):
    rows = synthetic_triplets(8, 32, seed=2)
    data = tmp_path / "triplets"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist([
        {"sample_id": t.sample_id, "item": t.item, "target_text": t.target_text, "reference_png": encode_png(t.reference),
         "target_png": encode_png(t.target), "source": "synthetic"} for t in rows], schema=TRIPLET_SCHEMA),
        data / "part-0.parquet")
    args = [f"data.path={data}", "data.size=32", "train.steps=100000", "train.batch_size=2", "train.report_every=1",
            f"output.storage_path={tmp_path}", "output.name=long"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.Popen([sys.executable, "-m", "pipelines.sft", *args], start_new_session=True, env=env,
                           stdout=open(tmp_path / "job.log", "wb"), stderr=subprocess.STDOUT)
    metrics = tmp_path / "long" / "metrics.jsonl"
    try:
        deadline = time.time() + 240
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):  # workers are training
            assert time.time() < deadline, "no training step after 240 s"
            assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.2)
        started = _descendants(job.pid)
        assert started, "the job started no processes"
        job.send_signal(signum)  # the driver only, as `ray job stop` does
        job.wait(timeout=BOUND_S)
        deadline = time.time() + BOUND_S
        while _running(started) and time.time() < deadline:
            time.sleep(0.5)
        left = {pid: _command(pid) for pid in _running(started)}
        assert not left, f"still running {BOUND_S} s after the driver exited: {left}"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
