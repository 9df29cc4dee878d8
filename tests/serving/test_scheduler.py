"""``GroupQueue`` without Ray or a model: groups by batch key, answers each request when its own group is
done, drops cancelled / expired requests, and stops a running group once all its requests are gone."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serving.scheduler import DeadlineExceeded, GroupQueue
from tests.serving.test_generator import job


class FakeRun:
    """``run_group`` stand-in: each group takes ``seconds_per_step x steps`` and asks ``should_stop`` every
    step, like ``Generator.run``; records the groups it ran."""

    def __init__(self, seconds_per_step: float = 0.01):
        self.seconds_per_step = seconds_per_step
        self.groups: list[list[int]] = []  # seeds of each group's first images
        self.steps_run = 0
        self.stopped = threading.Event()

    def __call__(self, jobs, should_stop):
        self.groups.append([j.seeds[0] for j in jobs])
        for _ in range(jobs[0].steps):
            time.sleep(self.seconds_per_step)
            self.steps_run += 1
            if should_stop():
                self.stopped.set()
                raise RuntimeError("stopped")
        return [[b"png%d" % s for s in j.seeds] for j in jobs]


def run(coro):
    return asyncio.run(coro)


def test_compatible_requests_share_a_group_and_others_wait_for_their_own():
    fake = FakeRun()
    queue = GroupQueue(fake, max_images=3, wait_s=0.05)

    async def main():
        return await asyncio.gather(*(queue.submit(j, 10) for j in [
            job((1,)), job((2,), side=64), job((3, 4)), job((5,)), job((6,), adapter="ref")]))

    out = run(main())
    assert out == [[b"png1"], [b"png2"], [b"png3", b"png4"], [b"png5"], [b"png6"]]
    assert fake.groups == [[1, 3], [2], [5], [6]]  # [1, 3+4] fills 3 images; 5 waits for the next group of its key


def test_each_request_returns_when_its_own_group_is_done():
    """A 2-step request and a 50-step one arrive together: the short one is answered ~48 steps earlier."""
    fake = FakeRun(seconds_per_step=0.02)
    queue = GroupQueue(fake, max_images=8, wait_s=0.05)
    done: dict[str, float] = {}

    async def timed(name, j):
        await queue.submit(j, 30)
        done[name] = time.monotonic()

    async def main():
        await asyncio.gather(timed("short", job((1,), steps=2)), timed("long", job((2,), steps=50, side=64)))

    run(main())
    assert done["long"] - done["short"] > 0.5  # 48 steps x 20 ms later, not at the same time


def test_a_group_grows_only_while_it_fits_its_members_deadlines():
    fake = FakeRun()
    queue = GroupQueue(fake, max_images=8, wait_s=0.05, expected_s=lambda work: work * 3000)  # one: 23 s, two: 47 s

    async def main():
        return await asyncio.gather(queue.submit(job((1,), side=64), 30), queue.submit(job((2,), side=64), 30))

    run(main())
    assert fake.groups == [[1], [2]]  # together their expected time would pass the first one's deadline


def test_cancelled_request_leaves_the_queue_and_a_running_group_stops():
    fake = FakeRun(seconds_per_step=0.02)
    queue = GroupQueue(fake, max_images=8, wait_s=0.01)

    async def main():
        long = asyncio.ensure_future(queue.submit(job((1,), steps=10_000), 60))
        queued = asyncio.ensure_future(queue.submit(job((2,), side=64), 60))
        await asyncio.sleep(0.3)
        assert len(queue.pending) == 1
        queued.cancel()
        long.cancel()
        await asyncio.sleep(0.1)
        assert not queue.pending and fake.stopped.is_set()
        start = time.monotonic()
        assert await queue.submit(job((3,)), 60) == [b"png3"]  # the replica is free again
        return time.monotonic() - start

    assert run(main()) < 1.0
    assert fake.steps_run < 100  # stopped after a step or two, not 10 000


def test_deadline_stops_the_group_and_raises():
    fake = FakeRun(seconds_per_step=0.02)
    queue = GroupQueue(fake, max_images=8, wait_s=0.01)

    async def main():
        with pytest.raises(DeadlineExceeded, match="stopped between steps"):
            await queue.submit(job((1,), steps=10_000), 0.3)
        with pytest.raises(DeadlineExceeded, match="queued"):
            await queue.submit(job((2,)), 0.0)

    run(main())
    assert fake.steps_run < 50
