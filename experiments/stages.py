"""Named, timed stages of ``experiments.reproduce``: one after another, or a group side by side on Ray.

A group (``Stages.together``) runs each call as a Ray task of its own (``num_cpus=0``: the jobs it starts
ask Ray for their own resources), at most ``slots`` at a time, longest first as the caller orders them.
On a few cores, single-threaded training jobs side by side get more done per second than one job with
every thread (torch's intra-op threads scale poorly on these small models), and the jobs' fixed costs
(start-up, epoch boundaries, export) overlap.
"""

from __future__ import annotations

import time
from typing import Callable


class Stages:
    """Runs named stages, printing progress and recording each one's wall time (``seconds``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], object]):
        print(f"\n[reproduce] {name} ...", flush=True)
        started = time.time()
        result = fn()
        self.seconds[name] = round(time.time() - started, 1)
        print(f"[reproduce] {name} done in {self.seconds[name]:.0f} s", flush=True)
        return result

    def together(self, group: str, calls: dict[str, Callable[[], object]], slots: int) -> None:
        """Runs ``calls`` (name -> function, for their side effects) as Ray tasks, at most ``slots`` at once, in
        the order given. Records each call's own seconds under its name and the group's under ``group``; the
        first failure is raised once the calls already running have ended (none is started after it)."""
        if slots < 1:
            raise ValueError(f"slots: must be at least 1, got {slots}")
        if slots == 1 or len(calls) <= 1:
            for name, fn in calls.items():
                self(name, fn)
            return
        import ray

        timed = ray.remote(num_cpus=0, max_retries=0)(_timed)
        print(f"\n[reproduce] {group}: {len(calls)} jobs, {slots} at a time ...", flush=True)
        started, waiting, running, failure = time.time(), list(calls.items()), {}, None
        while waiting or running:
            while waiting and len(running) < slots and failure is None:
                name, fn = waiting.pop(0)
                running[timed.remote(fn)] = name
                print(f"[reproduce] {name} started", flush=True)
            if not running:
                break
            [ref], _ = ray.wait(list(running), num_returns=1)
            name = running.pop(ref)
            try:
                self.seconds[name] = round(ray.get(ref), 1)
                print(f"[reproduce] {name} done in {self.seconds[name]:.0f} s", flush=True)
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the running calls end
                print(f"[reproduce] {name} failed: {exc}", flush=True)
                failure = failure or exc
        self.seconds[group] = round(time.time() - started, 1)
        print(f"[reproduce] {group} done in {self.seconds[group]:.0f} s", flush=True)
        if failure is not None:
            raise failure


def _timed(fn: Callable[[], object]) -> float:
    """Runs ``fn`` (in a Ray task) and returns its seconds."""
    started = time.time()
    fn()
    return time.time() - started
