"""Fault tests of training: SIGKILL an sft job after a checkpoint, rerun it: it resumes from the checkpoint,
logs each step once, and ends with the same adapter as a run that was never interrupted (same data order);
SIGKILL one of two train workers: FailureConfig restarts the group from the checkpoint, each step once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sfo.adapters import LORA_WEIGHTS
from tests.faults.jobs import command, descendants, start_job, write_triplets

ROWS, SIZE, STEPS = 12, 32, 6  # batch 2, shuffled: 6 batches per epoch; the kill lands mid-epoch
LONG = 60  # steps of the worker-kill run: a kill after step 3 lands well before the end


def _job(tmp_path: Path, data: Path, name: str, log: str, *extra: str) -> subprocess.Popen:
    return start_job("pipelines.sft", [
        f"data.path={data}", f"data.size={SIZE}", f"train.steps={STEPS}", "train.batch_size=2",
        "train.checkpoint_every=2", "train.shuffle_buffer=8", "train.optimizer=adamw", "train.lr=1e-3",
        "train.report_every=1", f"output.storage_path={tmp_path}", f"output.name={name}", *extra], tmp_path / log)


def _lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return lines


def _triplets(tmp_path: Path) -> Path:
    write_triplets(tmp_path / "triplets" / "part-0.parquet", ROWS, SIZE, seed=7)
    return tmp_path / "triplets"


def _wait_for_step(job: subprocess.Popen, run_dir: Path, step: int, log: Path) -> None:
    deadline = time.time() + 240
    while not any(line["step"] >= step for line in _lines(run_dir)):
        assert time.time() < deadline, f"no step {step} after 240 s"
        assert job.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)


def _finish(job: subprocess.Popen, tmp_path: Path, log: str) -> None:
    assert job.wait(timeout=300) == 0, (tmp_path / log).read_text()[-3000:]


@pytest.mark.slow
def test_a_killed_training_job_resumes_to_the_uninterrupted_result(tmp_path):
    data = _triplets(tmp_path)
    job = _job(tmp_path, data, "killed", "killed.log")
    run_dir = tmp_path / "killed"
    try:
        _wait_for_step(job, run_dir, 3, tmp_path / "killed.log")  # checkpoint 2 committed, step 3 done
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver, its workers and the local Ray it started
        job.wait()
    assert not (run_dir / "adapters").exists()

    rerun = _job(tmp_path, data, "killed", "rerun.log")
    straight = tmp_path / "straight"
    _finish(rerun, tmp_path, "rerun.log")
    _finish(_job(tmp_path, data, "straight", "straight.log"), tmp_path, "straight.log")

    resumed, clean = _lines(run_dir), _lines(straight)
    assert [line["step"] for line in resumed] == list(range(1, STEPS + 1))  # each step exactly once
    assert {line["attempt"] for line in resumed if line["step"] > 2} == {2}
    assert [line["loss"] for line in resumed] == pytest.approx([line["loss"] for line in clean], rel=1e-5)
    a = load_file(run_dir / "adapters" / "ref" / LORA_WEIGHTS)
    b = load_file(straight / "adapters" / "ref" / LORA_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _train_workers(root: int) -> list[int]:
    """Pids of the Ray Train worker processes among ``root``'s descendants."""
    return sorted(pid for pid in descendants(root) if "RayTrainWorker" in command(pid))


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes in /proc (Linux)")
@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(tmp_path):
    data = _triplets(tmp_path)
    job = _job(tmp_path, data, "workers", "workers.log", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
               "deepspeed.zero_stage=2", "output.max_failures=1", f"train.steps={LONG}")
    run_dir = tmp_path / "workers"
    try:
        # rank 0 at step 5: both ranks passed step 4's all-reduce, so both reported checkpoint 2 (and likely 4)
        _wait_for_step(job, run_dir, 5, tmp_path / "workers.log")
        workers = _train_workers(job.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        _finish(job, tmp_path, "workers.log")
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    lines = _lines(run_dir)
    assert [line["step"] for line in lines] == list(range(1, LONG + 1))  # each step exactly once
    attempts = [line["attempt"] for line in lines]
    assert attempts == sorted(attempts) and attempts[0] == 1 and attempts[-1] == 2  # one retry
    assert attempts.index(2) >= 2  # it resumed from a checkpoint (step 2 or later), not from the start
    assert (run_dir / "adapters" / "ref" / LORA_WEIGHTS).is_file()
