"""The race state: votes, measured progress and the observation every controller reads."""

from __future__ import annotations

import numpy as np
import pytest

from env.race import RACE_FEATURES, BranchConfidence, RaceState


def test_state_follows_events():
    state = RaceState(deadline_s=2.0, n_max=16, k_max=4)
    assert state.observation()[RACE_FEATURES.index("is_start")] == 1.0
    state.start(4, 2)
    state.record_steps(0.5, steps=10, tokens=80, decode_s=0.4)
    state.record_finish(3, 0.5)
    state.record_finish(-1, 0.5)
    state.record_finish(3, 0.6)
    assert (state.running, state.tally.leader, state.tally.margin) == (1, 3, 2)
    assert state.seconds_per_step == pytest.approx(0.04)
    assert state.remaining_s == pytest.approx(1.4)
    obs = dict(zip(RACE_FEATURES, state.observation(), strict=True))
    assert obs["is_start"] == 0.0 and obs["elapsed_fraction"] == pytest.approx(0.3)
    assert obs["finished_fraction"] == pytest.approx(0.75)
    assert obs["answered_fraction"] == pytest.approx(2 / 3)
    assert obs["leader_share"] == 1.0 and obs["margin"] == pytest.approx(0.5)
    assert obs["log_steps_left"] == pytest.approx(np.log1p(1.4 / 0.04) / np.log(4097), rel=1e-5)
    assert obs["has_confidence"] == 0.0  # no log-probabilities given
    assert np.all(np.abs(state.observation()) <= 1.0)
    state.stop("controller", 0.6)
    assert state.running == 0 and state.stopped == "controller"


def test_confidence_is_exposed_when_present():
    state = RaceState(deadline_s=1.0, n_max=4, k_max=2)
    state.start(2, 0)
    state.record_finish(0, 0.2, BranchConfidence(mean_logprob=-0.4, lowest_window_logprob=-1.5))
    obs = dict(zip(RACE_FEATURES, state.observation(), strict=True))
    assert state.leader_confidence() == pytest.approx(-0.4)
    assert obs["has_confidence"] == 1.0 and obs["leader_confidence"] == pytest.approx(-0.2)


@pytest.mark.parametrize(
    ("call", "match"),
    [(lambda s: s.start(0, 0), "n=0"), (lambda s: s.start(9, 0), "n=9"),
     (lambda s: s.set_k(5), "k=5"), (lambda s: s.stop("bored", 0.1), "stop reason")],
)  # fmt: skip
def test_bad_events_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call(RaceState(deadline_s=1.0, n_max=8, k_max=4))


def test_confidence_summary_of_token_logprobs():
    assert BranchConfidence.from_logprobs([]) is None
    assert BranchConfidence.from_logprobs(None) is None
    short = BranchConfidence.from_logprobs([-1.0, -3.0], window=4)  # shorter than a window
    assert short == BranchConfidence(-2.0, -2.0)
    values = [-0.1] * 10 + [-2.0] * 3 + [-0.1] * 10
    summary = BranchConfidence.from_logprobs(values, window=3)
    assert summary.mean_logprob == pytest.approx(np.mean(values))
    assert summary.lowest_window_logprob == pytest.approx(-2.0)  # the unsure stretch


def test_observation_scales_can_be_overridden():
    """A learned controller reads any race with the scales it was trained with."""
    state = RaceState(deadline_s=1.0, n_max=16, k_max=4)
    state.start(4, 2)
    wide, narrow = state.observation(), state.observation(n_max=4, k_max=2)
    assert wide[RACE_FEATURES.index("k_fraction")] == 0.5
    assert narrow[RACE_FEATURES.index("k_fraction")] == 1.0
    assert narrow[RACE_FEATURES.index("log2_n")] == 1.0
    np.testing.assert_array_equal(RaceState(1.0, 4, 2).observation(), RaceState(1.0, 9, 9)
                                  .observation(4, 2))  # fmt: skip
