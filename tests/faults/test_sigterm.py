"""Fault test: SIGTERM (what `ray job stop` and Kubernetes send) or SIGINT (Ctrl-C) to a training job's
driver ends the job and every process it started (the local Ray, its train workers) within a bounded time."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.faults.jobs import command, descendants, running, start_job, write_triplets

BOUND_S = 60  # driver gone, then every process it started gone, each within this


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc (Linux)")
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_job_and_everything_it_started(tmp_path, signum):
    data = tmp_path / "triplets"
    write_triplets(data / "part-0.parquet", 8, 32, seed=2)
    job = start_job("pipelines.sft", [f"data.path={data}", "data.size=32", "train.steps=100000", "train.batch_size=2",
                                      "train.report_every=1", f"output.storage_path={tmp_path}", "output.name=long"],
                    tmp_path / "job.log")
    metrics = tmp_path / "long" / "metrics.jsonl"
    try:
        deadline = time.time() + 240
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):  # workers are training
            assert time.time() < deadline, "no training step after 240 s"
            assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.2)
        started = descendants(job.pid)
        assert started, "the job started no processes"
        job.send_signal(signum)  # the driver only, as `ray job stop` does
        job.wait(timeout=BOUND_S)
        deadline = time.time() + BOUND_S
        while running(started) and time.time() < deadline:
            time.sleep(0.5)
        left = {pid: command(pid)[:80] for pid in running(started)}
        assert not left, f"still running {BOUND_S} s after the driver exited: {left}"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
