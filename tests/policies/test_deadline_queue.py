"""DeadlineQueue with sleeping jobs (no engine): admission bound, FIFO, cancel, overrun."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from policies.deadline_queue import DeadlineExpired, DeadlineQueue, Refused


def _sleeper(log: list, name: str, late_s: float = 0.0):
    """Work that uses all the time it is given (or stops when cancelled), then overruns."""

    def work(left_s: float, cancel: threading.Event) -> str:
        log.append((name, "start", time.monotonic()))
        cancelled = cancel.wait(left_s)
        time.sleep(late_s)
        log.append((name, "cancelled" if cancelled else "end", time.monotonic()))
        return name

    return work


def test_admission_uses_the_worst_case_start_and_runs_fifo():
    async def scenario():
        queue = DeadlineQueue(8, min_service_s=0.2, overrun_s=0.05, response_margin_s=0.0)
        log: list = []
        now = time.monotonic()
        first = queue.submit(now + 0.5, _sleeper(log, "a"))
        with pytest.raises(Refused, match="deadline cannot be met") as refused:
            queue.submit(now + 0.6, _sleeper(log, "b"))  # would start at 0.55: 0.05 s left
        assert refused.value.reason == "deadline_unmeetable"
        assert refused.value.retry_after_s == pytest.approx(0.55, abs=0.05)
        second = queue.submit(now + 1.0, _sleeper(log, "c"))
        assert await first.future == "a" and await second.future == "c"
        queue.close()
        return now, log

    now, log = asyncio.run(scenario())
    assert [(name, event) for name, event, _ in log] == [
        ("a", "start"), ("a", "end"), ("c", "start"), ("c", "end")
    ]  # fmt: skip
    times = {(name, event): t - now for name, event, t in log}
    assert times[("a", "end")] <= times[("c", "start")] and times[("c", "end")] <= 1.05


def test_full_queue_refuses_and_cancel_drops_or_aborts():
    async def scenario():
        queue = DeadlineQueue(1, min_service_s=0.0, overrun_s=0.0, response_margin_s=0.0)
        log: list = []
        now = time.monotonic()
        running = queue.submit(now + 5.0, _sleeper(log, "a"))
        await asyncio.sleep(0.1)
        waiting = queue.submit(now + 10.0, _sleeper(log, "b"))
        with pytest.raises(Refused) as refused:
            queue.submit(now + 20.0, _sleeper(log, "c"))
        assert refused.value.reason == "queue_full"
        assert (queue.waiting, queue.running) == (1, True)
        assert queue.cancel(waiting) == "queued" and queue.waiting == 0
        assert queue.cancel(running) == "running"
        assert await running.future == "a"
        queue.close()
        return log

    log = asyncio.run(scenario())
    assert [(name, event) for name, event, _ in log] == [("a", "start"), ("a", "cancelled")]


def test_overrun_is_learned_and_an_expired_job_fails_fast():
    async def scenario():
        queue = DeadlineQueue(4, min_service_s=0.0, overrun_s=0.01, response_margin_s=0.0)
        log: list = []
        now = time.monotonic()
        late = queue.submit(now + 0.2, _sleeper(log, "late", late_s=0.3))
        expired = queue.submit(now + 0.25, _sleeper(log, "never"))  # admitted: overrun unknown
        await late.future
        with pytest.raises(DeadlineExpired):
            await expired.future
        assert queue.overrun_estimate_s >= 0.3
        queue.close()
        return log

    log = asyncio.run(scenario())
    assert all(name != "never" for name, _, _ in log)


def test_waiting_job_is_refused_early_when_the_engine_falls_behind():
    async def scenario():
        queue = DeadlineQueue(4, min_service_s=0.2, overrun_s=0.05, response_margin_s=0.0)
        log: list = []
        now = time.monotonic()
        slow = queue.submit(now + 0.3, _sleeper(log, "slow", late_s=1.0))  # overruns by 1 s
        waiting = queue.submit(now + 1.0, _sleeper(log, "waiting"))  # admitted: start by 0.35
        assert queue.drop_if_behind(waiting) is None
        while (refusal := queue.drop_if_behind(waiting)) is None:
            await asyncio.sleep(0.02)
        refused_at = time.monotonic() - now
        assert await slow.future == "slow"
        queue.close()
        return refusal, refused_at, log

    refusal, refused_at, log = asyncio.run(scenario())
    assert refusal.reason == "engine_behind" and "fell behind" in str(refusal)
    assert 0.7 <= refused_at < 1.0  # as soon as 0.2 s of service could no longer fit
    assert all(name != "waiting" for name, _, _ in log)
