"""Heuristic stop rules (margin, ESC, Adaptive-Consistency) and their tuning per deadline."""

from __future__ import annotations

import numpy as np
import pytest

from env.backends.replay import ReplayBackend
from env.race import RaceState
from policies.race_controllers import (
    RULE_FAMILIES,
    BatchKDrafting,
    BatchKSchedule,
    Decision,
    RuleController,
    adaptive_consistency_rule,
    esc_rule,
    leader_posterior,
    margin_rule,
)
from policies.race_eval import (
    draw_rng,
    run_race,
    run_race_with_state,
    sweep_rules,
    tune_controllers,
)
from tests.fake_profile import make_fake_profile


def _state(classes) -> RaceState:
    state = RaceState(deadline_s=10.0, n_max=16, k_max=4)
    state.start(16, 0)
    for c in classes:
        state.record_finish(c, 1.0)
    return state


def test_margin_rule():
    assert not margin_rule(2)(_state([0, 1, 0]))
    assert margin_rule(2)(_state([0, 1, 0, 0]))
    assert not margin_rule(1)(_state([-1, -1]))  # nothing answered yet


def test_esc_rule_looks_at_the_last_answers_only():
    assert esc_rule(3)(_state([1, 0, -1, 0, 0]))
    assert not esc_rule(3)(_state([0, 0, 1, 0]))
    assert not esc_rule(3)(_state([0, 0]))


def test_leader_posterior_is_the_beta_tail():
    rng = np.random.default_rng(0)
    samples = rng.beta(5 + 1, 2 + 1, 200_000)
    assert leader_posterior(5, 2) == pytest.approx((samples > 0.5).mean(), abs=0.005)
    assert leader_posterior(3, 3) == pytest.approx(0.5)
    assert adaptive_consistency_rule(0.9)(_state([0] * 4))  # P = 1 - 1/32
    assert not adaptive_consistency_rule(0.9)(_state([0, 0, 1]))


@pytest.mark.parametrize(("factory", "bad"), [(margin_rule, 0), (esc_rule, 0),
                                              (adaptive_consistency_rule, 1.0)])  # fmt: skip
def test_bad_thresholds_are_refused(factory, bad):
    with pytest.raises(ValueError):
        factory(bad)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    folder = make_fake_profile(tmp_path_factory.mktemp("rules") / "fake", n_train=30, n_test=10)
    return ReplayBackend(folder, "train", method="ngram")


def test_sweep_agrees_with_running_each_race(backend):
    """The tuning sweep replays each (n, k) draw once for every rule and deadline; it must give
    exactly what the evaluation loop gives for each controller."""
    deadlines = (0.3, 0.8, 3.0)
    problems = list(range(12))
    sweep = sweep_rules(backend, deadlines, problems, 2, 5, (1, 4, 16), (0, 2), progress=False)
    for family, (_, thresholds) in RULE_FAMILIES.items():
        for threshold in thresholds[:3]:
            for n, k in ((4, 0), (16, 2)):
                controller = RuleController(family, n, k, threshold)
                for d, deadline in enumerate(deadlines):
                    outcomes = [run_race(backend, controller, p, deadline, draw_rng(5, p, r))
                                for p in problems for r in range(2)]  # fmt: skip
                    key = (family, threshold, n, k)
                    assert [o.correct for o in outcomes] == sweep.correct[key][d].tolist()
                    assert np.allclose([o.latency_s for o in outcomes], sweep.latency[key][d])


def test_tuned_heuristics_keep_static_accuracy_on_training_draws(backend):
    deadlines = (0.3, 3.0)
    sweep = sweep_rules(backend, deadlines, range(30), 2, 0, (1, 4, 16), (0, 2), progress=False)
    tuned = tune_controllers(sweep)
    assert set(tuned) == {*RULE_FAMILIES, "plain"}
    for d in range(len(deadlines)):
        static = tuned["static_best"][d]
        static_acc = sweep.accuracy(("static_best", None, static.n, static.k), d)
        for name in ("margin", "esc", "adaptive_consistency"):
            c = tuned[name][d]
            key = (name, c.threshold, c.n, c.k)
            assert sweep.accuracy(key, d) >= static_acc - 0.005 or all(
                sweep.accuracy(other, d) < static_acc - 0.005
                for other in sweep.correct if other[0] == name)  # fmt: skip
        assert tuned["plain"][d].n == 1


def test_a_deadline_is_tuned_alike_whatever_other_deadlines_the_sweep_covers(backend):
    """train.py tunes the baselines at the grid and between its points in one sweep and reports
    those at the grid: they must be what a sweep of the grid alone tunes."""
    grid = tune_controllers(sweep_rules(backend, (0.3, 3.0), range(30), 2, 0, (1, 4, 16), (0, 2),
                                        progress=False))  # fmt: skip
    dense = tune_controllers(sweep_rules(backend, (0.3, 1.0, 3.0), range(30), 2, 0, (1, 4, 16),
                                         (0, 2), progress=False))  # fmt: skip
    for name, table in grid.items():
        assert [dense[name][0], dense[name][2]] == table, name


def test_batch_k_schedule_drafts_more_as_the_batch_shrinks():
    """A memory-bound step (cost flat in batch) rewards drafting; a compute-bound one (cost
    grows with batch x verified tokens) punishes it: k must fall as the batch grows."""
    batch = np.arange(65)
    k_grid = (0, 1, 2, 4)
    step = np.stack([0.005 + 2e-4 * batch * (k + 1) for k in k_grid])
    tps = np.array([1.0, 1.6, 1.9, 2.2])
    schedule = BatchKSchedule(k_grid, step, tps)
    ks = [schedule.k_for(b) for b in (1, 4, 16, 64)]
    assert ks[0] == 4 and ks[-1] == 0 and ks == sorted(ks, reverse=True)
    per_token = step[:, 16] / tps
    assert schedule.k_for(16) == k_grid[int(per_token.argmin())]


def test_batch_k_drafting_keeps_the_stops_and_drafts_the_fastest_k_for_the_live_batch(backend):
    """At every decision point the wrapped controller's stop is kept and, when it goes on, k
    becomes the schedule's for the branches still running (on the problem's own acceptance)."""
    seen: list[tuple[int, int, Decision]] = []

    class Spy(BatchKDrafting):
        def decide(self, state: RaceState) -> Decision:
            decision = super().decide(state)
            seen.append((self._problem, state.running, decision))
            return decision

        def begin(self, problem, deadline_s):
            self._problem = problem.index
            return super().begin(problem, deadline_s)

    base = RuleController("margin", 16, 0, 3)
    spy = Spy(base, backend)
    changed = 0
    for p in range(10):
        outcome, state = run_race_with_state(backend, spy, p, 3.0, draw_rng(0, p, 0))
        changed += state.k != 0
        plain = run_race(backend, base, p, 3.0, draw_rng(0, p, 0))
        assert outcome.n == plain.n == 16
    for p, running, decision in seen:
        schedule = BatchKSchedule(backend.k_grid, backend.step_seconds, backend.tokens_per_step[p])
        if not decision.stop:
            assert decision.k == schedule.k_for(running)
    assert any(d.stop for *_, d in seen) and changed > 0
