"""Groups a replica's requests by batch key and runs one group at a time, without Ray (unit-tested alone).

Replaces ``@serve.batch``, which hands one list of every waiting request to one call and answers them all
when the slowest is done (issue 27). Here each request waits in a queue with its deadline; the worker takes
the oldest request, waits ``wait_s`` for company, gathers the waiting requests of the same batch key
(``Job.batch_key``: same size, steps, adapters) up to ``max_images`` images, and runs that group alone.
Each request is answered as soon as its own group is done. A group grows only while its expected time still
fits in every member's remaining deadline (a 1-image request is not made to wait for 7 others' images).

A request whose caller is cancelled (client gone, or the ingress's deadline passed) leaves the queue, or,
once running, marks itself cancelled; the group's ``should_stop`` is true when every member is cancelled or
past its deadline, and ``run_group`` (``Generator.run``) asks it after every sampling step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.schema import Job


class DeadlineExceeded(Exception):
    """A request's deadline passed before its images were done (the ingress answers 504)."""


@dataclass(eq=False)
class Entry:
    job: Job
    deadline: float  # time.monotonic() when the request must be done
    future: asyncio.Future
    cancelled: bool = False  # read from the sampler's thread: a plain bool, set once

    def expired(self, now: float) -> bool:
        return self.cancelled or now > self.deadline


@dataclass
class GroupQueue:
    """Args:
        run_group: ``(jobs, should_stop) -> one list of PNG bytes per job``; runs in a worker thread and
            raises when ``should_stop()`` turns true (``serving.generator.Stopped``).
        max_images: most images in one group (a request with more still runs, alone).
        wait_s: how long the oldest request waits for company before its group starts.
        expected_s: a group's expected sampling time from its total work (``Deadlines.expected_s``).
    """

    run_group: Callable[[list[Job], Callable[[], bool]], list[list[bytes]]]
    max_images: int
    wait_s: float
    expected_s: Callable[[float], float] = lambda work: 0.0
    pending: list[Entry] = field(default_factory=list)
    groups_run: int = 0
    _wake: asyncio.Event | None = None
    _worker: asyncio.Task | None = None

    async def submit(self, job: Job, timeout_s: float) -> list[bytes]:
        """This job's PNGs once its group is done.

        Raises:
            DeadlineExceeded: ``timeout_s`` passed first (the group was stopped or never started).
            asyncio.CancelledError: the caller was cancelled; the job leaves the queue / its group may stop.
        """
        loop = asyncio.get_running_loop()
        entry = Entry(job, time.monotonic() + timeout_s, loop.create_future())
        self.pending.append(entry)
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._loop())
        try:
            return await asyncio.shield(entry.future)  # shielded: a cancelled caller must not cancel the group
        except asyncio.CancelledError:
            entry.cancelled = True
            if entry in self.pending:
                self.pending.remove(entry)
            raise

    def _take_group(self) -> list[Entry]:
        """The oldest live request and the compatible ones that fit with it (removed from ``pending``)."""
        now = time.monotonic()
        for entry in [e for e in self.pending if e.expired(now)]:
            self.pending.remove(entry)
            if not entry.future.done():
                entry.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
        if not self.pending:
            return []
        first = self.pending[0]
        group, images, work = [first], len(first.job.seeds), first.job.work
        for entry in self.pending[1:]:
            n = len(entry.job.seeds)
            if entry.job.batch_key != first.job.batch_key or images + n > self.max_images:
                continue
            finish = now + self.expected_s(work + entry.job.work)
            if any(finish > member.deadline for member in (*group, entry)):
                continue
            group.append(entry)
            images, work = images + n, work + entry.job.work
        for entry in group:
            self.pending.remove(entry)
        return group

    async def _loop(self) -> None:
        while True:
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self.wait_s)  # company for the oldest request
            group = self._take_group()
            if not group:
                continue

            def should_stop(group: list[Entry] = group) -> bool:
                now = time.monotonic()
                return all(e.expired(now) for e in group)

            self.groups_run += 1
            try:
                results = await asyncio.to_thread(self.run_group, [e.job for e in group], should_stop)
            except Exception as exc:  # noqa: BLE001 - every member gets the group's failure
                stopped = should_stop()
                for entry in group:
                    if not entry.future.done():
                        entry.future.set_exception(
                            DeadlineExceeded("the deadline passed during sampling; stopped between steps")
                            if stopped else exc)
                continue
            for entry, result in zip(group, results):
                if not entry.future.done():
                    entry.future.set_result(result)
