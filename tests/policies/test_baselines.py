"""Baselines: static best is the training argmax, max-fit fits, the oracle bounds them all."""

import numpy as np
import pytest

from env.allocation import Allocation
from env.backends.replay import ReplayBackend
from env.config import EnvConfig
from env.features import ProblemFeaturizer
from env.profiles.store import load_profile
from env.tts_env import LatencyTTSEnv
from policies.allocator import draw_rng
from policies.baselines import MaxFitAllocator, PlainAllocator, StaticBestAllocator
from policies.evaluate import evaluate_methods
from tests.fake_profile import make_fake_profile

DEADLINES = (1.0, 2.0, 4.0, 8.0)


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("profiles") / "fake-baselines"
    return load_profile(make_fake_profile(folder, n_train=150, n_test=40, n_branches=8))


@pytest.fixture(scope="module")
def envs(profile):
    featurizer = ProblemFeaturizer.fit(profile.split("train"), (0.5, 10.0))
    make = lambda split: LatencyTTSEnv(ReplayBackend(profile, split), featurizer, EnvConfig())  # noqa: E731
    return make("train"), make("test")


def test_static_best_is_the_most_accurate_action_on_training_problems(envs):
    train, _ = envs
    fit = StaticBestAllocator.fit
    static = fit(train.backend, train.grids, DEADLINES, max_problems=60, seed=3)
    budgeted = fit(train.backend, train.grids, DEADLINES, max_problems=60, seed=3, budgets=None)
    assert static.name == "static_best" and budgeted.name == "static_budget"
    problems = np.sort(np.random.default_rng(3).permutation(150)[:60])
    everything = [Allocation(n, k, b) for n in train.n_grid for k in train.k_grid
                  for b in train.budget_grid]  # fmt: skip
    for deadline in DEADLINES:
        correct, scores = {}, {}
        for action in everything:
            outcomes = [train.run_episode(p, action, deadline, draw_rng(3, p, 0))[0]
                        for p in problems]  # fmt: skip
            correct[action] = np.array([o.correct for o in outcomes], dtype=float)
            scores[action] = (-correct[action].mean(), np.mean([o.latency_s for o in outcomes]))
        waiting = min((a for a in everything if a.budget == 1.0), key=scores.__getitem__)
        assert static.table[deadline] == waiting
        assert static.allocate(train.allocation_request([0, 1], deadline)) == [waiting] * 2
        # the budget search stops early only when that is clearly (2 SE) more accurate
        best = min(everything, key=scores.__getitem__)
        diff = correct[best] - correct[waiting]
        clearly = diff.mean() >= 2 * diff.std(ddof=1) / np.sqrt(len(diff)) > 0
        assert budgeted.table[deadline] == (best if best.budget < 1 and clearly else waiting)


def test_budget_stops_the_call_at_its_share_of_the_deadline(envs):
    train, _ = envs
    for p in range(20):
        full, _ = train.run_episode(p, Allocation(8, 0, 1.0), 4.0, draw_rng(0, p, 0))
        quarter, _ = train.run_episode(p, Allocation(8, 0, 0.25), 4.0, draw_rng(0, p, 0))
        same, _ = train.run_episode(p, Allocation(8, 0, 1.0), 1.0, draw_rng(0, p, 0))
        assert quarter.latency_s <= 1.0 + 1e-9 and quarter == same
        assert quarter.branches_finished <= full.branches_finished


def test_oracle_is_an_upper_bound(envs):
    train, test = envs
    static = StaticBestAllocator.fit(train.backend, train.grids, DEADLINES, max_problems=60)
    allocators = [static, PlainAllocator(test.grids)]
    methods = evaluate_methods(test, allocators, DEADLINES, 2, 0, oracle_backend=test.backend)
    for i in range(len(DEADLINES)):
        oracle = methods["oracle"][i]["accuracy"]
        assert oracle >= methods["static_best"][i]["accuracy"]
        assert oracle >= methods["plain"][i]["accuracy"]
    assert methods["plain"][0]["mean_n"] == 1 and methods["plain"][0]["mean_k"] == 0


def test_max_fit_takes_the_largest_n_predicted_to_fit(envs):
    _, test = envs
    backend = test.backend
    max_fit = MaxFitAllocator(
        backend.latency_model, backend.step_table_key, backend.method, test.grids
    )
    problems = list(range(10))

    def choose(deadline):
        return max_fit.allocate(test.allocation_request(problems, deadline))

    latency = max_fit.predicted_latency(test.allocation_request(problems, 1.0)).min(axis=2)
    deadline = float(np.median(latency))  # latency: (problem, n)
    for p, (n, k, budget) in zip(problems, choose(deadline), strict=True):
        assert budget == 1.0
        i = test.n_grid.index(n)
        if latency[p, i] <= deadline:
            assert i == len(test.n_grid) - 1 or latency[p, i + 1] > deadline
        else:
            assert n == 1
        assert k in test.k_grid
    assert {a.n for a in choose(1e6)} == {max(test.n_grid)}
    assert {a.n for a in choose(1e-6)} == {1}
