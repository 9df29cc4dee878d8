"""Fault test: another Ray instance on the same host, started after a training job's first steps or before the
job, does not kill the job (issue 26).

The other instance is what a colleague's ``ray start --head`` leaves on a shared box: default settings (the
host's default auth token, ``ray_current_cluster`` pointing at it). Without the job pinning its processes to
its own cluster (``pipelines.common.own_cluster_env``), Ray Train's PlacementGroupCleaner asks that instance
whether the job's controller lives, reads "not found" as dead, and removes the live run's placement group:
the workers die and the job fails.

Both Rays share a Ray temp folder of the test's own (``RAY_TMPDIR``): the host as the test sets it up, with no
``ray_current_cluster`` left by earlier runs (a stale one makes Ray's cleaner fail differently, by chance).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster.local import LocalHead, free_port, node_ip
from tests.faults.jobs import start_job, write_triplets

UNTIL_STOPPED = 100_000  # steps of the job another Ray starts beside: it trains until the test has seen enough
HOLD_S = 10.0  # ... which is this long beside the other head: ten of the cleaner's checks (one a second)
BESIDE_STEPS = 100  # the other head is up before this job starts; it must finish
REMOVED = ("Cleaning up placement group", "placement group was removed")  # the cleaner's and the worker's lines


@pytest.fixture
def ray_tmpdir():
    """A short Ray temp folder for both instances (Ray's socket paths must stay under ~107 characters)."""
    path = tempfile.mkdtemp(prefix="ray2-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _head(log: Path, ray_tmpdir: str, foreign: bool):
    """A ``ray start --head`` in the test's Ray temp folder, up: its dashboard answers and ``ray start`` has
    finished (it writes ``ray_current_cluster`` last, and that file is what Ray's clients find). Ours
    (``foreign=False``) is cluster.local's as shipped; a foreign one is somebody else's plain ``ray start``:
    none of this project's settings (no RAY_ADDRESS pin). Both without auth, so that either answers the
    other's processes, as two heads with the host's default token do. Yields the head's GCS address."""
    head = LocalHead(num_cpus=2, dashboard_port=free_port(), gcs_port=free_port(), auth=False, log=log)
    if foreign:
        head.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
            "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    head.env["RAY_TMPDIR"] = ray_tmpdir
    with head:
        gcs = f"{node_ip()}:{head.gcs_port}"
        address_file = Path(ray_tmpdir) / "ray" / "ray_current_cluster"
        deadline = time.time() + 180
        while not (address_file.is_file() and address_file.read_text().strip() == gcs):
            assert time.time() < deadline, f"ray start did not finish in 180 s: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        yield gcs


def _steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return lines


def _sft(tmp_path: Path, name: str, env: dict[str, str], steps: int):
    data = tmp_path / "triplets"
    if not data.is_dir():
        write_triplets(data / "part-0.parquet", 8, 32, seed=3)
    return start_job("pipelines.sft", [
        f"data.path={data}", "data.size=32", f"train.steps={steps}", "train.batch_size=2", "train.optimizer=adamw",
        "train.report_every=1", "train.checkpoint_every=1000", f"output.storage_path={tmp_path}",
        f"output.name={name}"], tmp_path / f"{name}.log", env=env)


def _check_unharmed(tmp_path: Path, name: str, steps: int | None = None) -> list[dict]:
    """Every step logged once (all ``steps`` of them when given), by the first worker group, and no placement
    group removed. Returns the steps."""
    log = (tmp_path / f"{name}.log").read_text(errors="replace")
    lines = _steps(tmp_path / name)
    assert [line["step"] for line in lines] == list(range(1, (steps or len(lines)) + 1))  # every step, once
    assert {line["attempt"] for line in lines} == {1}  # no worker group was lost and restarted
    assert not [marker for marker in REMOVED if marker in log], log[-4000:]
    return lines


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="Linux: the jobs run as process groups")
@pytest.mark.slow
def test_a_ray_started_during_training_does_not_kill_the_job(tmp_path, ray_tmpdir):
    """The job joins our head (as ``ray job submit`` makes it: RAY_ADDRESS = its GCS); after its first steps
    somebody starts another head, which becomes the host's newest cluster. The job trains on beside it for
    ``HOLD_S`` (unfixed, the cleaner removed the placement group within its first checks), then is stopped."""
    with _head(tmp_path / "our-head.log", ray_tmpdir, foreign=False) as ours:
        env = {"RAY_ADDRESS": ours, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmpdir}
        job = _sft(tmp_path, "during", env, UNTIL_STOPPED)
        try:
            deadline = time.time() + 240
            while not any(line["step"] >= 2 for line in _steps(tmp_path / "during")):
                assert time.time() < deadline, "no training step after 240 s"
                assert job.poll() is None, (tmp_path / "during.log").read_text()[-3000:]
                time.sleep(0.2)
            with _head(tmp_path / "other-head.log", ray_tmpdir, foreign=True):
                before = len(_steps(tmp_path / "during"))
                up = time.time()
                while time.time() - up < HOLD_S:
                    assert job.poll() is None, (tmp_path / "during.log").read_text()[-4000:]
                    time.sleep(0.2)
                after = _check_unharmed(tmp_path, "during")
                assert len(after) > before, "no step beside the other Ray"
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="Linux: the jobs run as process groups")
@pytest.mark.slow
def test_a_job_started_beside_another_ray_finishes(tmp_path, ray_tmpdir):
    """Another head first (the host's newest cluster), then a job with a fresh local Ray of its own."""
    with _head(tmp_path / "other-head.log", ray_tmpdir, foreign=True):
        job = _sft(tmp_path, "beside", {"RAY_TMPDIR": ray_tmpdir}, BESIDE_STEPS)
        try:
            job.wait(timeout=600)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    assert job.returncode == 0, (tmp_path / "beside.log").read_text()[-4000:]
    _check_unharmed(tmp_path, "beside", BESIDE_STEPS)
