"""Background load: replayed steps slow down as the step table predicts at the larger batch, an
idle engine replays as before, the observation carries the load, and the distribution draws as
documented (``tests/scripts/test_load_study.py``: the controllers and the study)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from env.backends.replay import MAX_ENGINE_BATCH, ReplayBackend
from env.backends.replay_race import ReplayRace
from env.config import LoadDistribution, RaceEnvConfig
from env.features import ProblemFeaturizer
from env.race import LOAD_SCALE_BRANCHES, RACE_FEATURES, RaceState, begin_call
from env.race_env import RaceEnv
from policies.race_controllers import RuleController
from policies.race_eval import evaluate_controller, run_race
from tests.fake_profile import make_fake_profile

LOAD = RACE_FEATURES.index("load")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_fake_profile(tmp_path_factory.mktemp("load") / "fake", n_train=200, n_test=30,
                             n_branches=8)  # fmt: skip


@pytest.fixture(scope="module")
def backend(folder):
    return ReplayBackend(folder, "test", method="ngram")


def _run_to_end(race: ReplayRace) -> None:
    while not race.done:
        race.advance()


@pytest.mark.parametrize("load", [1, 32, 128])
@pytest.mark.parametrize("k", [0, 4])
def test_steps_run_at_the_batch_of_the_call_plus_the_load(backend, load, k):
    """Before any branch finishes, every step takes the step table's time at batch n + L."""
    n = 4
    method = backend.step_table_key(k).method
    expected = float(backend.latency_model.step_time(n + load, k, method))
    race = ReplayRace(backend.under_load(load), 0, 50.0, np.random.default_rng(0), (0.001,))
    race.begin(n, k)
    race.advance()  # to the checkpoint at 0.05 s: nothing has finished yet
    state = race.state
    assert state.tally.finished == 0 and state.steps > 0
    assert state.decode_s / state.steps == pytest.approx(expected, rel=1e-12)
    assert expected > float(backend.latency_model.step_time(n, k, method))


@pytest.mark.parametrize("load", [8, 64])
@pytest.mark.parametrize("n", [1, 8])
def test_race_under_load_equals_the_one_shot_replay_under_load(backend, load, n):
    """Exactness holds at any fixed load, and each call is slower than on the idle engine."""
    loaded = backend.under_load(load)
    for p in range(len(backend.problems)):
        expected = loaded.run(p, n, 1, 50.0, np.random.default_rng(p))
        idle = backend.run(p, n, 1, 50.0, np.random.default_rng(p))
        race = ReplayRace(loaded, p, 50.0, np.random.default_rng(p))
        race.begin(n, 1)
        _run_to_end(race)
        got = race.outcome()
        assert (got.answer_class, got.branches_finished) == (
            expected.answer_class, expected.branches_finished)  # fmt: skip
        assert got.latency_s == pytest.approx(expected.latency_s, rel=1e-9)
        assert got.latency_s > idle.latency_s and race.state.background_branches == load


def test_an_idle_engine_replays_the_recorded_tables(backend):
    model, n_max = backend.latency_model, backend.max_branches
    assert backend.under_load(0) is backend and backend.background_branches == 0
    assert backend.max_batch == MAX_ENGINE_BATCH
    for k in backend.k_grid:
        key = backend.step_table_key(k)
        table = model.step_time(np.arange(n_max + 1), k, key.method)
        np.testing.assert_array_equal(backend.step_seconds[backend.k_slot(k), : n_max + 1], table)
    assert backend.under_load(16) is backend.under_load(16)  # views are cached
    assert backend.under_load(16).under_load(0) is backend  # loads are absolute
    with pytest.raises(ValueError, match="load"):
        backend.under_load(MAX_ENGINE_BATCH - n_max + 1)


def test_the_observation_carries_the_load():
    for load, expected in ((0, 0.0), (15, 0.5), (LOAD_SCALE_BRANCHES, 1.0), (10_000, 1.0)):
        state = RaceState(1.0, 64, 4, background_branches=load)
        assert state.observation()[LOAD] == pytest.approx(expected, abs=1e-7)
    assert math.log2(1 + LOAD_SCALE_BRANCHES) == 8.0


def test_the_env_draws_the_load_and_can_hide_it(folder, backend):
    featurizer = ProblemFeaturizer.fit(backend.profile.split("train"), (0.5, 4.0))
    fixed = RaceEnv(backend, featurizer, RaceEnvConfig(load_distribution="64"))
    obs, info = fixed.reset(seed=0)
    width = len(featurizer.feature_names)
    assert info["background_branches"] == 64 and fixed.race_state.background_branches == 64
    assert obs[width + LOAD] == pytest.approx(math.log2(65) / 8)
    blind = RaceEnv(backend, featurizer, RaceEnvConfig(load_distribution="64", observe_load=False))
    obs, info = blind.reset(seed=0)
    assert info["background_branches"] == 64 and obs[width + LOAD] == 0.0
    assert blind._race.backend.background_branches == 64  # the steps still run under it
    idle = RaceEnv(backend, featurizer)
    obs, info = idle.reset(seed=0, options={"problem_index": 3})
    assert info["background_branches"] == 0 and obs[width + LOAD] == 0.0
    obs, _ = idle.reset(options={"background_branches": 32})
    assert obs[width + LOAD] == pytest.approx(math.log2(33) / 8)
    with pytest.raises(ValueError, match="load"):
        RaceEnv(backend, featurizer, RaceEnvConfig(load_distribution="100000"))


def test_the_mixed_distribution_draws_as_documented():
    mixed = LoadDistribution.parse("mixed")
    assert mixed.levels == (0, 8, 16, 32, 64, 128)
    assert mixed.weights == pytest.approx((0.5, 0.1, 0.1, 0.1, 0.1, 0.1))
    rng = np.random.default_rng(0)
    draws = np.array([mixed.draw(rng) for _ in range(40_000)])
    for level, weight in zip(mixed.levels, mixed.weights, strict=True):
        assert (draws == level).mean() == pytest.approx(weight, abs=0.01)
    again = np.random.default_rng(0)
    assert [mixed.draw(again) for _ in range(100)] == draws[:100].tolist()
    assert LoadDistribution.parse("64") == LoadDistribution((64,), (1.0,))
    assert LoadDistribution.parse("8:1,16:3").weights == pytest.approx((0.25, 0.75))
    assert all(LoadDistribution.parse(s) is None for s in (None, "none", "0"))
    for bad in ("-1", "8:0", "8,8", "x"):
        with pytest.raises(ValueError):
            LoadDistribution.parse(bad)


class _LoadReader(RuleController):
    """A rule controller that records the load it is told at the start."""

    reads_load = True

    def begin(self, problem, deadline_s, background_branches=0):
        object.__setattr__(self, "told", background_branches)
        return super().begin(problem, deadline_s)


def test_controllers_that_read_the_load_are_told_it(backend):
    reader = _LoadReader("margin", 4, 1, 2)
    run_race(backend.under_load(32), reader, 0, 5.0, np.random.default_rng(0))
    assert reader.told == 32
    run_race(backend.under_load(32), reader, 0, 5.0, np.random.default_rng(0), observe_load=False)
    assert reader.told == 0
    plain = RuleController("margin", 4, 1, 2)  # the protocol's begin: not told, still runs
    assert begin_call(plain, backend.problems[0], 5.0, RaceState(5.0, 8, 4, 32)) == (4, 1)


def test_evaluation_meets_the_same_load_per_draw_and_idle_is_unchanged(backend):
    rule = RuleController("margin", 8, 1, 2)
    idle = evaluate_controller(backend, rule, 10.0, 2, seed=3)
    assert evaluate_controller(backend, rule, 10.0, 2, 3, load=None) == idle
    heavy = evaluate_controller(backend, rule, 10.0, 2, 3, load=LoadDistribution.parse("128"))
    assert sum(o.latency_s for o in heavy) > sum(o.latency_s for o in idle)
    mixed = LoadDistribution.parse("mixed")
    first = evaluate_controller(backend, rule, 10.0, 2, 3, load=mixed)
    assert evaluate_controller(backend, rule, 10.0, 2, 3, load=mixed) == first
