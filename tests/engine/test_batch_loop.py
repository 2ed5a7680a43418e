"""Concurrent calls on one real engine (bundled model): they share the batch, each keeps its own
stops, deadline and cancel, and the shared k follows the stated rule (``batch_k``)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.batch_loop import BatchStep, batch_k

PROMPT = "What is 12 + 30? Put the final answer in \\boxed{}."
LONG = "Write a long, detailed story about a cat who learns algebra."


@pytest.mark.parametrize(
    ("requests", "k"),
    [
        ([], None),
        ([(3, 0)], None),  # no live branch
        ([(4, 1)], 4),  # alone: exactly its k
        ([(0, 3), (4, 2)], 0),  # most branches asked for 0
        ([(0, 2), (4, 3)], 4),
        ([(0, 1), (4, 1)], 0),  # a tie goes to the smaller k
        ([(1, 1), (2, 1), (4, 1)], 2),
        ([(4, 5), (0, 0)], 4),  # a call without live branches has no say
    ],
)
def test_batch_k_is_the_branch_weighted_lower_median(requests, k):
    assert batch_k(requests) == k


def _concurrently(*calls):
    """Start every call (a function) at the same moment; their results, in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


@pytest.mark.engine
def test_concurrent_calls_run_in_one_batch(draft_engine):
    """Three calls of 2 branches at once: the engine steps all 6 together, each call gets its
    own branches back whole, and nothing is left in the engine."""
    steps: list[BatchStep] = []
    draft_engine.add_step_listener(steps.append)
    try:

        def call():
            return draft_engine.run(LONG, n=2, k=0, max_tokens=24, ignore_eos=True)

        rollouts = _concurrently(call, call, call)
    finally:
        draft_engine.batch.listeners.remove(steps.append)
    for rollout in rollouts:
        assert rollout.stopped_by == "complete"
        assert [b.token_count for b in rollout.branches] == [24, 24]
        assert rollout.batch_max >= 4  # it shared steps with another call
    assert max(step.batch for step in steps) == 6
    assert max(step.calls for step in steps) == 3
    # far fewer steps than three calls in turn (3 x 25): most steps served all three
    assert len(steps) < 2 * 25
    assert not draft_engine.has_unfinished_requests()


@pytest.mark.engine
def test_a_calls_deadline_and_cancel_abort_only_its_own_branches(draft_engine):
    """Beside a long call: one with a 1 s deadline returns on time, one cancelled after 0.5 s
    stops; the long call still finishes every branch."""
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()

    def long_call():
        return draft_engine.run(LONG, n=2, k=0, max_tokens=40, ignore_eos=True)

    def short_deadline():
        started = time.monotonic()
        rollout = draft_engine.run(LONG, n=2, k=0, deadline_s=1.0)
        return rollout, time.monotonic() - started

    def cancelled():
        return draft_engine.run(LONG, n=2, k=0, cancel=cancel)

    long, (short, short_s), gone = _concurrently(long_call, short_deadline, cancelled)
    assert long.stopped_by == "complete"
    assert [b.token_count for b in long.branches] == [40, 40]
    assert short.stopped_by == "deadline" and short_s <= 1.1
    assert gone.stopped_by == "cancelled"
    assert all(not b.finished for b in gone.branches)
    assert not draft_engine.has_unfinished_requests()


@pytest.mark.engine
def test_shared_steps_draft_the_batch_k(draft_engine):
    """A 3-branch call at k=0 and a 1-branch call at k=2 start together: while both run, every
    step drafts 0 (most branches asked for 0), so the k=2 call drafts only in steps it ran
    alone (the engine may step once before the other call joins: the two threads start a
    moment apart, which CI saw under load); alone, the k=2 call drafts 2 per step (vLLM's
    per-request counters)."""
    steps: list[BatchStep] = []
    draft_engine.add_step_listener(steps.append)
    try:
        wide, narrow = _concurrently(
            lambda: draft_engine.run(LONG, n=3, k=0, max_tokens=40, ignore_eos=True),
            lambda: draft_engine.run(LONG, n=1, k=2, max_tokens=12, ignore_eos=True),
        )
    finally:
        draft_engine.batch.listeners.remove(steps.append)
    assert narrow.branches[0].token_count == 12
    ran_alone = [step for step in steps if step.batch == 1]  # the 3-branch call is never 1
    assert narrow.branches[0].drafted_tokens == 2 * len(ran_alone)
    shared = [step for step in steps if step.batch == 4]
    assert len(shared) > len(ran_alone) and all(step.k == 0 for step in shared)
    alone = draft_engine.run(LONG, n=1, k=2, max_tokens=12, ignore_eos=True).branches[0]
    assert alone.drafted_tokens == 2 * alone.verify_steps > 0
    assert wide.stopped_by == "complete"


@pytest.mark.engine
def test_a_failing_hook_ends_only_its_call(draft_engine):
    def boom(report):
        raise RuntimeError("hook failed")

    def failing():
        with pytest.raises(RuntimeError, match="hook failed"):
            draft_engine.run(PROMPT, n=2, k=0, on_step=boom)
        return True

    ok, other = _concurrently(
        failing, lambda: draft_engine.run(LONG, n=1, k=0, max_tokens=16, ignore_eos=True)
    )
    assert ok and other.branches[0].token_count == 16
    assert not draft_engine.has_unfinished_requests()
