"""The replayed race: exact against the one-shot replay, and sound when k changes or it stops."""

from __future__ import annotations

import numpy as np
import pytest

from env.backends.replay import ReplayBackend
from env.backends.replay_race import ReplayRace
from tests.fake_profile import make_fake_profile


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    folder = make_fake_profile(tmp_path_factory.mktemp("race") / "fake", n_train=40, n_test=20)
    return ReplayBackend(folder, "test", method="ngram")


def _run_to_end(race: ReplayRace) -> int:
    decisions = 0
    while not race.done:
        race.advance()
        decisions += 1
    return decisions


@pytest.mark.parametrize("n", [1, 3, 8, 16])
@pytest.mark.parametrize("k", [0, 1, 4])
@pytest.mark.parametrize("deadline", [0.05, 0.6, 5.0])
def test_fixed_k_race_equals_one_shot_replay(backend, n, k, deadline):
    for p in range(len(backend.problems)):
        expected = backend.run(p, n, k, deadline, np.random.default_rng(p))
        race = ReplayRace(backend, p, deadline, np.random.default_rng(p))
        race.begin(n, k)
        _run_to_end(race)
        got = race.outcome()
        assert (got.correct, got.answer_class, got.branches_finished, got.answered) == (
            expected.correct, expected.answer_class, expected.branches_finished,
            expected.answered)  # fmt: skip
        assert got.latency_s == pytest.approx(expected.latency_s, rel=1e-9, abs=1e-12)
        assert got.latency_s <= deadline + 1e-12


def test_checkpoints_pause_the_race_when_nothing_finishes(backend):
    race = ReplayRace(backend, 0, 5.0, np.random.default_rng(0), checkpoints=(0.01, 0.02))
    race.begin(1, 0)
    race.advance()
    assert not race.done and race.state.tally.finished == 0
    assert race.state.elapsed_s <= 0.05 + 1e-12  # paused at the end of a step before 0.05 s


def test_raising_k_as_the_batch_shrinks_changes_timing_not_votes(backend):
    p, n = 3, 8
    fixed = ReplayRace(backend, p, 50.0, np.random.default_rng(1), checkpoints=())
    fixed.begin(n, 0)
    _run_to_end(fixed)
    switched = ReplayRace(backend, p, 50.0, np.random.default_rng(1), checkpoints=())
    switched.begin(n, 0)
    while not switched.done:
        switched.advance()
        if not switched.done and switched.state.running <= n // 2:
            switched.set_k(4)
            assert switched.state.k == 4
    a, b = fixed.outcome(), switched.outcome()
    assert b.latency_s < a.latency_s  # n-gram drafts with acceptance > 0 save steps
    assert b.k == 4 and a.answered == b.answered


def test_stop_answers_with_the_votes_so_far(backend):
    race = ReplayRace(backend, 5, 50.0, np.random.default_rng(2), checkpoints=())
    race.begin(16, 1)
    race.advance()
    first = race.state.tally.finished
    race.stop()
    outcome = race.outcome()
    assert race.state.stopped == "controller" and outcome.branches_finished == first >= 1
    assert outcome.latency_s == race.state.elapsed_s < 50.0


def test_bad_actions_are_refused(backend):
    race = ReplayRace(backend, 0, 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="k=3"):
        race.begin(2, 3)
    with pytest.raises(ValueError, match="n=99"):
        race.begin(99, 0)
    with pytest.raises(ValueError, match="deadline_s"):
        ReplayRace(backend, 0, 0.0, np.random.default_rng(0))
    race.begin(2, 0)
    with pytest.raises(RuntimeError, match="still running"):
        race.outcome()
