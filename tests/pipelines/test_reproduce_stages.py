"""``experiments.stages``: reproduce's timed stages, one after another or side by side on Ray."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from experiments.stages import Stages


def _job(log: Path, name: str, seconds: float, fail: bool = False):
    def run() -> None:  # runs in a Ray task: leaves its start and end where the test reads them
        started = time.time()
        time.sleep(seconds)
        (log / f"{name}.json").write_text(json.dumps([started, time.time()]))
        if fail:
            raise ValueError(f"{name} failed on purpose")
    return run


def _most_at_once(log: Path) -> int:
    spans = [json.loads(p.read_text()) for p in log.glob("*.json")]
    return max(sum(s <= t < e for s, e in spans) for t, _ in spans)


def test_a_group_runs_side_by_side_within_its_slots_and_times_each_job(ray_local, tmp_path):
    stages = Stages()
    stages.together("training", {n: _job(tmp_path, n, 1.5) for n in ("a", "b", "c", "d")}, slots=2)
    assert sorted(p.stem for p in tmp_path.glob("*.json")) == ["a", "b", "c", "d"]
    assert _most_at_once(tmp_path) == 2  # two at a time, never more
    assert all(1.5 <= stages.seconds[n] < stages.seconds["training"] for n in "abcd")
    assert stages.seconds["training"] < 4 * 1.5  # side by side: less than the jobs' sum


def test_one_slot_runs_the_jobs_in_this_process_one_after_another(tmp_path):
    stages = Stages()
    stages.together("training", {n: _job(tmp_path, n, 0.1) for n in ("a", "b")}, slots=1)
    assert _most_at_once(tmp_path) == 1 and set(stages.seconds) == {"a", "b"}
    with pytest.raises(ValueError, match="slots"):
        stages.together("training", {}, slots=0)


def test_a_failed_job_fails_the_group_after_the_running_ones_end_and_starts_no_more(ray_local, tmp_path):
    stages = Stages()
    jobs = {"bad": _job(tmp_path, "bad", 0.2, fail=True), "slow": _job(tmp_path, "slow", 2.0),
            "never": _job(tmp_path, "never", 0.1)}
    with pytest.raises(ValueError, match="bad failed on purpose"):
        stages.together("training", jobs, slots=2)
    assert (tmp_path / "slow.json").exists() and not (tmp_path / "never.json").exists()
    assert "slow" in stages.seconds and "bad" not in stages.seconds
