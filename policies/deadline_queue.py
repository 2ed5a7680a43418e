"""A FIFO of deadline-bound engine calls, run one at a time, that refuses what it cannot serve.

The server's engine runs one call at a time (``policies.server`` says why), so requests queue.
Every call stops by its own deadline (plus the engine step in flight, which cannot be
interrupted), which bounds when a newly arriving request could start at the latest: walk the
queue in order, each job ending at max(that time, its deadline) plus an overrun, the step in
flight.  A request that would then have less than ``min_service_s`` left before its deadline,
or that finds ``max_queue`` requests waiting, is refused at arrival rather than answered late;
an admitted one is run with whatever time remains when its turn comes, less a response margin,
and is refused while it waits if the engine falls so far behind that its deadline can no
longer be met.  The overrun and the margin are measured after every job (the largest recent
values, at least the configured ones), so the bound follows the engine and the event loop
under the current load.  Jobs are blocking functions run on one worker thread; their results
are handed back to the asyncio event loop that queued them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

OVERRUN_WINDOW = 16
"""Jobs over which the largest measured overrun is kept."""


class Refused(Exception):
    """A request the queue cannot serve in time.

    :param reason: ``"queue_full"``, ``"deadline_unmeetable"`` (at arrival) or
        ``"engine_behind"`` (while waiting).
    :param retry_after_s: when the queue will have drained, at the latest.
    """

    def __init__(self, reason: str, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.reason, self.retry_after_s = reason, retry_after_s


class DeadlineExpired(Exception):
    """A job's deadline passed before its turn came (admission should prevent this)."""


@dataclass(eq=False)
class Job:
    """One queued call; ``future`` resolves on the event loop with the work's result."""

    deadline_at: float  # time.monotonic() by which the result must be handed back
    work: Callable[[float, threading.Event], Any]  # (seconds left, cancel) -> result
    future: asyncio.Future
    cancel: threading.Event = field(default_factory=threading.Event)
    started_at: float | None = None
    returned_at: float | None = None  # when its work returned (the engine may still be busy)


class DeadlineQueue:
    """FIFO of blocking jobs run one at a time on a worker thread, admitted by deadline.

    :param max_queue: most jobs waiting (not running) at once.
    :param min_service_s: least time a job must have left at its worst-case start.
    :param overrun_s: least allowance per job for the engine step in flight at its deadline.
    :param response_margin_s: least time kept back from each deadline for handing the result
        back; raised by how late recent results reached the event loop.
    :param after_job: called on the worker after each job (e.g. to check the engine is clean).
    """

    def __init__(
        self,
        max_queue: int,
        min_service_s: float,
        overrun_s: float,
        response_margin_s: float,
        after_job: Callable[[], None] | None = None,
    ) -> None:
        if max_queue < 1 or min(min_service_s, overrun_s, response_margin_s) < 0:
            raise ValueError("max_queue must be >= 1 and the times >= 0")
        self.max_queue, self.min_service_s = max_queue, min_service_s
        self.overrun_s, self.response_margin_s = overrun_s, response_margin_s
        self._after_job = after_job
        self._jobs: list[Job] = []  # the running job (if any) first, then the waiting ones
        self._overruns: deque[float] = deque(maxlen=OVERRUN_WINDOW)
        self._lateness: deque[float] = deque(maxlen=OVERRUN_WINDOW)
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tts-engine")
        self._executor.submit(lambda: None).result()  # start the worker now, not on a request

    @property
    def waiting(self) -> int:
        """Jobs queued and not started."""
        with self._lock:
            return sum(job.started_at is None for job in self._jobs)

    @property
    def running(self) -> bool:
        """Whether a job is running (or the engine is still finishing its last step)."""
        with self._lock:
            return any(job.started_at is not None for job in self._jobs)

    def latest_start(self, now: float) -> float:
        """The latest time a job submitted now would start (caller holds no lock)."""
        with self._lock:
            return self._latest_start(now)

    @property
    def overrun_estimate_s(self) -> float:
        """Allowance per job for the time from its call's stop until the engine is free."""
        with self._lock:
            return self._overrun_estimate()

    def _overrun_estimate(self) -> float:
        return max([self.overrun_s, *self._overruns])

    def _margin(self) -> float:
        return self.response_margin_s + max([0.0, *self._lateness])

    def _latest_start(self, now: float, before: Job | None = None) -> float:
        """When a job queued after all others (or at ``before``'s place) starts at the latest."""
        t, overrun = now, self._overrun_estimate()
        for job in self._jobs:
            if job is before:
                break
            t = max(t, job.deadline_at if job.returned_at is None else job.returned_at) + overrun
        return t

    def admit(self, deadline_at: float) -> None:
        """Raise ``Refused`` if a job with this deadline would be refused now (a cheap check
        before preparing a request; ``submit`` checks again)."""
        with self._lock:
            self._admit(deadline_at, time.monotonic())

    def _admit(self, deadline_at: float, now: float) -> None:
        start = self._latest_start(now)
        waiting = sum(job.started_at is None for job in self._jobs)
        if waiting >= self.max_queue:
            raise Refused(
                "queue_full",
                f"server busy: {waiting} requests already wait (max_queue={self.max_queue})",
                start - now,
            )
        left = deadline_at - start - self._margin()
        if left < self.min_service_s:
            raise Refused(
                "deadline_unmeetable",
                f"deadline cannot be met: the {len(self._jobs)} requests ahead may hold the "
                f"engine for {start - now:.2f} s, leaving {max(left, 0.0):.2f} s, less than "
                f"the minimum service time of {self.min_service_s:g} s",
                start - now,
            )

    def submit(self, deadline_at: float, work: Callable[[float, threading.Event], Any]) -> Job:
        """Queue ``work`` (call from the event loop).

        :raises Refused: when the queue is full or the deadline cannot be met in the worst case.
        """
        with self._lock:
            self._admit(deadline_at, time.monotonic())
            job = Job(deadline_at, work, asyncio.get_running_loop().create_future())
            self._jobs.append(job)
        self._executor.submit(self._execute, job)
        return job

    def drop_if_behind(self, job: Job) -> Refused | None:
        """Drop a waiting job that can no longer get ``min_service_s`` before its deadline.

        Admission assumed the jobs ahead would free the engine within the overrun estimate of
        their deadlines; when the engine falls behind that (a slow step on a loaded machine), it
        is better to refuse the job now than to fail it at its deadline.  Returns the refusal,
        or None when the job is still on time (or already started).
        """
        with self._lock:
            if job.started_at is not None or job not in self._jobs:
                return None
            now = time.monotonic()
            start = self._latest_start(now, before=job)
            left = job.deadline_at - start - self._margin()
            if left >= self.min_service_s:
                return None
            job.cancel.set()
            self._jobs.remove(job)
            return Refused(
                "engine_behind",
                f"the engine fell behind its estimate: the requests ahead may hold it for "
                f"{start - now:.2f} s more, leaving {max(left, 0.0):.2f} s",
                start - now,
            )

    def cancel(self, job: Job) -> str:
        """Cancel a job: ``"queued"`` if dropped before it started, ``"running"`` if aborted
        (its work sees ``cancel`` set), ``"done"`` if it had already finished."""
        with self._lock:
            job.cancel.set()
            if job.started_at is None:
                with contextlib.suppress(ValueError):
                    self._jobs.remove(job)
                return "queued"
            return "running" if job in self._jobs else "done"

    def _execute(self, job: Job) -> None:
        with self._lock:
            if job.cancel.is_set():
                return
            job.started_at = time.monotonic()
            work_deadline = job.deadline_at - self._margin()
        result, error = None, None
        try:
            if work_deadline <= job.started_at:
                raise DeadlineExpired("the deadline passed while the request was queued")
            result = job.work(work_deadline - job.started_at, job.cancel)
        except Exception as exc:  # handed to whoever awaits the job
            error = exc
        with self._lock:
            job.returned_at = time.monotonic()
        job.future.get_loop().call_soon_threadsafe(self._settle, job, work_deadline, result, error)
        try:  # the job holds the engine until the step in flight is done
            if self._after_job is not None:
                self._after_job()
        finally:
            with self._lock:
                self._jobs.remove(job)
                overrun = time.monotonic() - min(job.returned_at, work_deadline)
                self._overruns.append(overrun)

    def _settle(self, job: Job, work_deadline: float, result: Any, error: Exception | None) -> None:
        """On the event loop: hand over the result; note how late past its deadline it came
        (the engine's last step, a busy loop), so that later jobs keep that much back."""
        with self._lock:
            self._lateness.append(time.monotonic() - max(work_deadline, job.started_at))
        if job.future.done():
            return
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)

    def close(self) -> None:
        """Abort the running job, drop the waiting ones and stop the worker."""
        with self._lock:
            for job in self._jobs:
                job.cancel.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
