"""Predictive admission on the shipped CPU profile's latency model (no engine): admit, degrade,
refuse with a reason and a retry time that would work, and count reserved calls."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from engine.batch_loop import CallLoad
from env.profiles.store import load_profile
from policies.admission import REFUSAL_REUSE_S, Admission

METHOD = "ngram"


@pytest.fixture(scope="module")
def model():
    return load_profile("smollm2-135m-cpu").latency_model()


def _admission(model, in_flight=(), n_grid=(1, 2, 4, 8), margin_s=0.5, max_batch=64):
    return Admission(lambda: model, METHOD, lengths=100.0, acceptance=0.5,
                     n_grid=n_grid, max_batch=max_batch, margin_s=margin_s,
                     in_flight=lambda: list(in_flight))  # fmt: skip


def test_an_idle_engine_admits_the_most_branches(model):
    verdict = _admission(model).decide(prompt_tokens=100, k=0, max_tokens=256, deadline_s=60.0)
    assert verdict.admitted and verdict.max_n == 8 and verdict.reason == "fits"
    # 100 tokens at about 0.1-0.2 s per step, plus prefill
    assert 100 * float(model.step_time(8, 0, METHOD)) < verdict.predicted_s < 60.0


def test_a_deadline_no_engine_can_meet_is_refused_for_good(model):
    verdict = _admission(model).decide(prompt_tokens=100, k=0, max_tokens=256, deadline_s=2.0)
    assert not verdict.admitted and verdict.reason == "deadline_unmeetable"
    assert math.isinf(verdict.retry_after_s) and "even on an idle engine" in verdict.message


def test_the_answer_length_is_capped_by_max_tokens(model):
    """A 4-token request is quick whatever the expected length."""
    verdict = _admission(model).decide(prompt_tokens=100, k=0, max_tokens=4, deadline_s=2.0)
    assert verdict.admitted and verdict.predicted_s < 2.0


def _with_slack(model, live: list[int], slack_s: float) -> list[CallLoad]:
    """Calls in flight (``live`` branches each, 100 tokens to go) whose deadlines leave
    ``slack_s`` after their predicted finish (margin included) as they run now."""
    calls = [CallLoad(n, 0, 256, 0, math.inf) for n in live]
    finish = _admission(model, margin_s=0.0).finish_times(calls)
    return [CallLoad(c.live, 0, 256, 0, t + 0.5 + slack_s) for c, t in zip(calls, finish,
                                                                        strict=True)]  # fmt: skip


def test_a_busy_engine_degrades_before_it_refuses(model):
    """Calls in flight with 2 s to spare: 8 more branches would make them late (each branch
    adds about 8 ms to each of their ~100 steps), one branch does not."""
    verdict = _admission(model, _with_slack(model, [4] * 6, 2.0)).decide(100, 0, 256, 600.0)
    assert verdict.admitted and verdict.reason == "capped" and 1 <= verdict.max_n < 8


def test_a_full_engine_refuses_with_a_retry_time_that_works(model):
    """Calls in flight with no time to spare: refused as busy, and the retry time is when
    enough of them are predicted done."""
    busy = _with_slack(model, [8, 8, 4, 2], 0.0)
    verdict = _admission(model, busy).decide(100, 0, 256, deadline_s=120.0)
    assert not verdict.admitted and verdict.reason == "engine_busy"
    assert 0 < verdict.retry_after_s <= max(c.seconds_left for c in busy)
    assert "server busy" in verdict.message
    # at the retry time, the calls that are still running leave room
    later = [CallLoad(c.live, 0, 256, 0, c.seconds_left - verdict.retry_after_s)
             for c in busy if c.seconds_left - 0.5 > verdict.retry_after_s + 1e-6]  # fmt: skip
    assert len(later) < len(busy)


def test_a_refusal_stands_briefly_for_requests_that_ask_no_less(model):
    """While the engine's calls and branches stay the same, an engine_busy refusal is reused for
    REFUSAL_REUSE_S (its retry time counting down) by requests with no more time and the same
    k (and a prompt whose saved prefill could not make up the lateness); anything else is
    predicted afresh.  The calls' deadlines are moved far out after the first refusal, so a
    fresh prediction admits: that tells the two apart."""
    in_flight = _with_slack(model, [8, 8, 4, 2], 0.0)
    admission = _admission(model, in_flight)
    admission.in_flight = lambda: list(in_flight)
    first = admission.decide(100, 0, 256, deadline_s=120.0, now=10.0)
    assert not first.admitted and first.reason == "engine_busy"
    in_flight[:] = [replace(c, seconds_left=1e4) for c in in_flight]
    reused = admission.decide(150, 0, 256, deadline_s=119.0, now=10.05)
    assert not reused.admitted
    assert reused.retry_after_s == pytest.approx(first.retry_after_s - 0.05)
    assert not admission.decide(50, 0, 256, 119.0, now=10.06).admitted  # 0.1 s less prefill
    assert admission.decide(150, 0, 256, 121.0, now=10.07).admitted  # more time
    assert admission.decide(150, 2, 256, 119.0, now=10.08).admitted  # another k
    assert admission.decide(150, 0, 256, 119.0, now=10.001 + REFUSAL_REUSE_S).admitted
    # a call that leaves makes room sooner than predicted: no reuse either
    in_flight[:] = _with_slack(model, [8, 8, 4, 2], 0.0)
    assert not admission.decide(100, 0, 256, 120.0, now=20.0).admitted
    in_flight[:] = [replace(c, seconds_left=1e4) for c in in_flight[1:]]
    assert admission.decide(150, 0, 256, 119.0, now=20.05).admitted


def test_a_refusal_stands_for_shorter_prompts_only_while_their_prefill_cannot_make_it_fit(
    model,
):
    """A 2,000-token prompt is refused as predicted late, by less than the 3 s of prefill a
    100-token prompt saves: a prompt 100 tokens shorter (0.2 s less prefill) is refused with
    it, the 100-token one is predicted afresh (admitted: the calls' deadlines were moved out
    meanwhile)."""
    in_flight = _with_slack(model, [8, 8, 4, 2], 2.5)
    admission = _admission(model, in_flight)
    first = admission.decide(2000, 0, 256, deadline_s=120.0, now=10.0)
    assert not first.admitted and first.reason == "engine_busy"
    saved = model.prefill_time(2000, 1) - model.prefill_time(100, 1)
    assert saved > 3.0
    in_flight[:] = [replace(c, seconds_left=1e4) for c in in_flight]
    assert not admission.decide(1900, 0, 256, 120.0, now=10.01).admitted
    assert admission.decide(100, 0, 256, 120.0, now=10.02).admitted


def test_a_reserved_call_counts_until_released(model):
    admission = _admission(model, max_batch=10)
    first = admission.decide(100, 0, 32, 60.0)
    assert first.max_n == 8
    ticket = admission.reserve(first, 0, 32, deadline_at=1e9)
    assert admission.decide(100, 0, 32, 60.0).max_n == 2  # 8 of the 10 sequences are held
    admission.release(ticket)
    assert admission.decide(100, 0, 32, 60.0).max_n == 8
    # a call expected to start 2 branches holds 2 (never more than its cap)
    ticket = admission.reserve(first, 0, 32, deadline_at=1e9, branches=2)
    assert admission.decide(100, 0, 32, 60.0).max_n == 8
    admission.release(ticket)
    admission.reserve(replace(first, max_n=4), 0, 32, deadline_at=1e9, branches=8)
    assert admission.decide(100, 0, 32, 60.0).max_n == 4


def test_bad_settings_are_refused(model):
    with pytest.raises(ValueError, match="length must be > 0"):
        Admission(lambda: model, METHOD, 0.0, 0.5, (1,), 8, 0.5, list)
