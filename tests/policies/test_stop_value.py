"""The stop-value learner: its traces, features and tuning sweep must agree exactly with the
races the evaluation runs, and a saved stop-value policy must serve like any race policy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from env.backends.replay import ReplayBackend
from env.backends.replay_race import ReplayRace
from env.config import RaceEnvConfig
from env.features import ProblemFeaturizer
from env.race_env import RaceEnv
from policies import stop_value
from policies.bound_candidates import StopValueReplay
from policies.learned_controller import LearnedController
from policies.race_controllers import RuleController, leader_posterior
from policies.race_eval import draw_rng, run_race, tuning_problem_indices
from policies.saved_policy import load_race_policy, save_race_policy
from policies.stop_value import (
    STOP_FEATURES,
    StopSetting,
    StopValuePolicy,
    ValueNet,
    serving_index,
    state_features,
)
from policies.stop_value import _posterior_table as posterior_table
from policies.stop_value_training import (
    StopValueArgs,
    SweepTable,
    TuningReplay,
    fit_value_ensemble,
    fit_value_net,
    fitting_problem_indices,
    learn_stop_value,
    point_features,
    prompt_table,
    race_traces,
    sweep_stop_value,
    tune_settings,
    tuning_deadlines,
)
from tests.fake_profile import make_fake_profile

SEED = 3
DEADLINES = (3.0, 6.0, 12.0)
CONFIGS = [(2, 0), (4, 2), (8, 1)]


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> ReplayBackend:
    folder = make_fake_profile(tmp_path_factory.mktemp("sv") / "fake", n_train=60, n_test=10,
                               n_branches=8)  # fmt: skip
    return ReplayBackend(folder, "train", method="ngram")


@pytest.fixture(scope="module")
def featurizer(backend) -> ProblemFeaturizer:
    return ProblemFeaturizer.fit(backend.profile.split("train"), (2.0, 20.0))


@pytest.fixture(scope="module")
def config(backend) -> RaceEnvConfig:
    return RaceEnvConfig(n_grid=(1, 2, 4, 8), k_grid=backend.k_grid, deadline_range_s=(2.0, 20.0))


@pytest.fixture(scope="module")
def learned(backend, featurizer) -> tuple[StopValuePolicy, TuningReplay]:
    args = StopValueArgs(fit_problems=30, tune_problems=20, epochs=2, hidden=16, n_min=2)
    return learn_stop_value(backend, featurizer, (1, 2, 4, 8), DEADLINES, (2.0, 20.0), args,
                            seed=SEED, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def policy(learned) -> StopValuePolicy:
    return learned[0]


def test_posterior_table_is_adaptive_consistency_statistic():
    table = posterior_table()
    for v1, v2 in [(0, 0), (3, 1), (5, 2), (10, 9), (40, 3)]:
        assert table[v1, v2] == pytest.approx(leader_posterior(v1, v2), abs=1e-9)


def test_trace_points_are_the_races_decision_points(backend, featurizer):
    """At every point where branches finished, the replayed race's state gives the features
    the traces give (same time, steps, votes), and the static race ends where the trace says."""
    problems = list(range(8))
    traces = race_traces(backend, problems, 2, SEED, CONFIGS, progress=False)
    prompts = prompt_table(backend, featurizer)
    deadline = 6.0
    view = traces.at_deadline(deadline)
    checked = 0
    for t in range(len(traces.problem)):
        p, n, k = int(traces.problem[t]), int(traces.n[t]), int(traces.k[t])
        repeat = int(traces.repeat[t])
        race = ReplayRace(backend, p, deadline, draw_rng(SEED, p, repeat))
        race.begin(n, k)
        seen, race_rows = 0, []
        while not race.done:
            state = race.advance()
            if not race.done and state.tally.finished > seen:
                seen = state.tally.finished
                race_rows.append(state_features(state))
        rows = np.arange(traces.offsets[t], traces.offsets[t + 1])
        rows = rows[view.decision[rows]]
        mine = point_features(traces, view, prompts, featurizer, rows)[:, : len(STOP_FEATURES)]
        assert len(race_rows) == len(mine)
        if race_rows:
            np.testing.assert_allclose(np.asarray(race_rows), mine, rtol=1e-5, atol=1e-6)
            checked += 1
        outcome = run_race(backend, RuleController("static_best", n, k), p, deadline,
                           draw_rng(SEED, p, repeat))  # fmt: skip
        assert outcome.correct == view.end_correct[t]
        assert outcome.latency_s == pytest.approx(view.end_s[t])
    assert checked > len(traces.problem) // 2  # most races had decision points


def test_sweep_agrees_with_running_each_race(backend, featurizer, config, policy):
    """The tuning sweep reads every (n, k, price) off the traces; it must give what the
    evaluation loop gives for the learned controller with that setting."""
    problems = list(range(12))
    traces = race_traces(backend, problems, 2, SEED, CONFIGS, progress=False)
    prices = (-1.0, 0.02, 0.3)
    table = sweep_stop_value(policy.net, traces, prompt_table(backend, featurizer), featurizer,
                             DEADLINES, prices)  # fmt: skip
    env = RaceEnv(backend, featurizer, config)
    for c, (n, k) in enumerate(CONFIGS):
        for j, price in enumerate(prices):
            for d, deadline in enumerate(DEADLINES):
                fixed = StopValuePolicy(policy.net, DEADLINES, [StopSetting(n, k, price)] * 3,
                                        policy.prompt_width)  # fmt: skip
                controller = LearnedController(fixed, env)
                reps = 1 if n >= backend.max_branches else 2
                outcomes = [run_race(backend, controller, p, deadline, draw_rng(SEED, p, r))
                            for p in problems for r in range(reps)]  # fmt: skip
                assert table.accuracy[c, j, d] == pytest.approx(
                    np.mean([o.correct for o in outcomes])
                )
                assert table.latency[c, j, d] == pytest.approx(
                    np.mean([o.latency_s for o in outcomes]))  # fmt: skip


def test_tuning_takes_the_fastest_setting_that_keeps_the_static_accuracy():
    """Deadline 1: the fast price loses accuracy, so the slower one; deadline 2: every setting
    is less accurate than the static table was at deadline 1, so it acts as under deadline 1
    (a budget of 1/2) rather than lose accuracy."""
    configs, prices, deadlines = [(4, 0)], (0.0, 0.1), (1.0, 2.0)
    accuracy = np.array([[[0.50, 0.40], [0.45, 0.39]]])  # (configs, prices, deadlines)
    latency = np.array([[[0.9, 1.2], [0.5, 1.0]]])
    static = np.array([[0.50, 0.41]])
    table = SweepTable(configs, prices, deadlines, accuracy, latency, static, static + 1)
    settings = tune_settings(table, tolerance=0.0)
    assert settings[0] == StopSetting(4, 0, 0.0, 1.0)
    assert settings[1] == StopSetting(4, 0, 0.0, 0.5)
    assert tune_settings(table, tolerance=0.06)[0] == StopSetting(4, 0, 0.1, 1.0)


def test_a_budget_must_be_clearly_faster_than_the_full_deadline():
    """At deadline 2 both a budget (acting as under deadline 1) and the full deadline keep the
    floor; the budget is 4% faster, so a margin of 0.1 takes the full deadline, no margin the
    budget; a budget 20% faster is kept either way."""
    configs, prices, deadlines = [(4, 0)], (0.0, 0.1), (1.0, 2.0)
    accuracy = np.array([[[0.50, 0.52], [0.50, 0.50]]])  # (configs, prices, deadlines)
    static = np.array([[0.50, 0.49]])
    close = np.array([[[0.90, 1.00], [0.72, 0.75]]])  # fastest: price 0.1 at deadline 1
    table = SweepTable(configs, prices, deadlines, accuracy, close, static, static + 1)
    assert tune_settings(table, budget_margin=0.0)[1] == StopSetting(4, 0, 0.1, 0.5)
    assert tune_settings(table, budget_margin=0.1)[1] == StopSetting(4, 0, 0.1, 1.0)
    far = close.copy()
    far[0, 1, 0] = 0.60  # the budget now saves 20% against the full deadline's 0.75
    table = SweepTable(configs, prices, deadlines, accuracy, far, static, static + 1)
    assert tune_settings(table, budget_margin=0.1)[1] == StopSetting(4, 0, 0.1, 0.5)
    assert tune_settings(table, budget_margin=0.1)[0] == StopSetting(4, 0, 0.1, 1.0)


def test_value_net_learns_a_conditional_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 3)).astype(np.float32)
    mean = np.column_stack(
        [0.3 * np.tanh(x[:, 0]), 0.5 + 0.2 * x[:, 1] / (1 + np.exp(-2 * x[:, 2]))]
    )
    y = (mean + rng.normal(scale=0.3, size=mean.shape)).astype(np.float32)
    net, info = fit_value_net(x, y, hidden=16, epochs=8, batch_size=256, seed=0)
    error = np.abs(net(x) - mean).mean()
    assert error < 0.03, error  # the noise is 0.3: it learned the mean, not the noise
    assert all(m < v for m, v in zip(info["mse"], info["target_variance"], strict=True))


def test_an_averaged_value_net_is_one_mlp_giving_its_members_mean():
    """The ensemble serves as one network whose output is its members' mean (members: the
    networks ``fit_value_net`` fits with seeds 0, 1, 2), so it errs less than they do on
    average; networks standardizing their inputs differently are refused."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20_000, 3)).astype(np.float32)
    mean = np.column_stack([0.3 * np.tanh(x[:, 0]), 0.2 * x[:, 1]])
    y = (mean + rng.normal(scale=0.5, size=mean.shape)).astype(np.float32)
    net, info = fit_value_ensemble(x, y, members=3, hidden=8, epochs=4, seed=0)
    members = [fit_value_net(x, y, hidden=8, epochs=4, seed=s)[0] for s in range(3)]
    assert len(net.weights) == 3 and net.weights[1].shape == (24, 24)
    assert info["members"] == 3 and len(info["member_mse"]) == 3
    np.testing.assert_allclose(net(x), np.mean([m(x) for m in members], axis=0), atol=1e-5)
    member_error = np.mean([np.abs(m(x) - mean).mean() for m in members])
    assert np.abs(net(x) - mean).mean() < member_error
    other = ValueNet(members[0].weights, members[0].biases, members[0].mean + 1, members[0].scale)
    with pytest.raises(ValueError, match="standardization"):
        ValueNet.average([members[0], other])


def test_an_averaged_net_multiplies_only_its_diagonal_blocks_and_gives_the_dense_product():
    """The forward pass finds the members' blocks in the averaged hidden-to-hidden layer and
    skips the zeros: same outputs as the dense product, one row or many; a dense square
    layer (a single network's) is multiplied whole."""
    rng = np.random.default_rng(2)
    shapes = [(6, 8), (8, 8), (8, 2)]
    standard = (np.zeros(6, np.float32), np.ones(6, np.float32))
    weights = [[rng.normal(size=shape) for shape in shapes] for _ in range(4)]
    biases = [[rng.normal(size=shape[1]) for shape in shapes] for _ in range(4)]
    members = [ValueNet(w, b, *standard) for w, b in zip(weights, biases, strict=True)]
    net = ValueNet.average(members)
    assert [None if b is None else len(b) for b in net._blocks] == [None, 4, None]
    assert members[0]._blocks == [None, None, None]
    x = rng.normal(size=(50, 6)).astype(np.float32)
    dense = x
    for i, (w, b) in enumerate(zip(net.weights, net.biases, strict=True)):
        dense = dense @ w + b
        dense = np.tanh(dense) if i < 2 else dense
    np.testing.assert_allclose(net(x), dense, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net(x[0]), dense[0], rtol=1e-5, atol=1e-6)


def test_fitting_problems_are_a_random_sample_apart_from_the_tuning_ones():
    """Training problems come grouped by subject: the fitting set must be drawn at random (the
    first problems not tuned on were three subjects of seven), and never overlap the tuning."""
    tune = tuning_problem_indices(2000, 6900, seed=0)
    fit = fitting_problem_indices(2000, 2000, 6900, seed=0)
    assert len(fit) == 2000 and not set(fit) & set(tune)
    assert max(fit) > 6000 and min(fit) < 100  # spread over the whole range, not a prefix
    thirds = np.histogram(fit, bins=3, range=(0, 6900))[0]
    assert thirds.min() > 500  # about 667 per third of the source order
    assert sorted(fitting_problem_indices(50, 50, 50, seed=1)) == list(range(50))  # all tuned


def test_many_rows_go_through_the_value_net_in_chunks_with_the_same_outputs(monkeypatch):
    """A sweep's millions of rows are scored a chunk at a time (bounded memory); the outputs
    are those of one pass, row for row, and a single row still works."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1_000, 3)).astype(np.float32)
    y = rng.normal(size=(1_000, 2)).astype(np.float32)
    net, _ = fit_value_net(x, y, hidden=8, epochs=1, seed=0)
    whole = net(x)
    calls = []
    forward = ValueNet._forward
    monkeypatch.setattr(stop_value, "FORWARD_CHUNK_ROWS", 300)
    monkeypatch.setattr(ValueNet, "_forward", lambda self, rows: calls.append(len(rows))
                        or forward(self, rows))  # fmt: skip
    np.testing.assert_allclose(net(x), whole, rtol=1e-6, atol=1e-7)
    assert calls == [300, 300, 300, 100]
    assert net(x[0]).shape == (2,)


def test_saved_stop_value_policy_serves_like_the_trained_one(tmp_path, backend, featurizer,
                                                            config, policy):  # fmt: skip
    folder = save_race_policy(tmp_path / "policy", policy, featurizer, config,
                              {"profile": {"name": "fake"}, "race_scales": [8, 4]})  # fmt: skip
    loaded = load_race_policy(folder)
    assert loaded.info["algorithm"] == "StopValue" and isinstance(loaded.model, StopValuePolicy)
    assert loaded.model.settings == policy.settings
    served = LearnedController.from_saved(loaded)  # prompt features from the text, as live
    replayed = LearnedController(policy, RaceEnv(backend, featurizer, config))
    for p in range(6):
        for deadline in (4.0, 9.0):
            a = run_race(backend, served, p, deadline, draw_rng(1, p, 0))
            b = run_race(backend, replayed, p, deadline, draw_rng(1, p, 0))
            assert (a.correct, a.latency_s, a.n, a.k) == (b.correct, b.latency_s, b.n, b.k)
            assert a.latency_s <= served.call_deadline(deadline) + 1e-9


def test_a_setting_outside_the_grids_is_refused(tmp_path, featurizer, config, policy):
    net = ValueNet(policy.net.weights, policy.net.biases, policy.net.mean, policy.net.scale)
    bad = StopValuePolicy(net, (1.0,), [StopSetting(16, 0, 0.0)], policy.prompt_width)
    with pytest.raises(ValueError, match="outside the grids"):
        save_race_policy(tmp_path / "bad", bad, featurizer, config, {})


def test_a_budget_is_an_absolute_horizon_between_grid_points(policy):
    """A setting tuned to act as under a shorter grid deadline keeps that horizon at longer
    deadlines it serves (scaling it with the deadline made 1.6 s act as under 0.8 s)."""
    settings = [StopSetting(4, 0, 0.0, 0.5), StopSetting(4, 0, 0.0, 1.0)]
    fixed = StopValuePolicy(policy.net, (1.0, 2.0), settings, policy.prompt_width)
    assert fixed.call_deadline(1.0) == pytest.approx(0.5)
    assert fixed.call_deadline(1.6) == pytest.approx(0.5)  # served by grid deadline 1.0
    assert fixed.call_deadline(2.0) == pytest.approx(2.0)
    assert fixed.call_deadline(3.0) == pytest.approx(3.0)  # budget 1 at grid deadline 2.0
    assert fixed.call_deadline(0.4) == pytest.approx(0.4)  # below the grid: never past it


def test_a_deadline_is_served_by_the_longest_tuned_deadline_not_longer_than_it(policy):
    """A setting tuned for a longer deadline counts on time the call does not have, so it never
    serves a shorter one, even the nearest (1.9 s is nearer 2.0 than 1.0 in log time)."""
    settings = [StopSetting(4, 0, 0.0), StopSetting(8, 1, 0.0), StopSetting(16, 2, 0.0)]
    fixed = StopValuePolicy(policy.net, (0.5, 1.0, 2.0), settings, policy.prompt_width)
    assert [fixed.setting(d).n for d in (0.3, 0.5, 0.99, 1.0, 1.9, 2.0, 9.0)] == \
        [4, 4, 4, 8, 8, 16, 16]  # fmt: skip
    assert serving_index((2.0, 0.5, 1.0), 1.5) == 2  # order-free


@pytest.mark.engine
def test_a_stop_value_policy_drives_the_live_engine(tmp_path, featurizer, config, policy,
                                                    draft_engine):  # fmt: skip
    """The deployed controller runs a saved stop-value policy on the real engine: it picks
    (n, k) from its table, decides at branch finishes and honours the deadline."""
    import time

    from policies.controller import DecodingController

    folder = save_race_policy(tmp_path / "policy", policy, featurizer, config,
                              {"profile": {"name": "fake"}, "race_scales": [8, 4]})  # fmt: skip
    controller = DecodingController(folder, draft_engine)
    for deadline in (1.5, 6.0):
        started = time.monotonic()
        solution = controller.solve("What is $12 + 30$?", deadline, max_tokens=24)
        assert time.monotonic() - started <= deadline + 0.1
        assert solution.n in config.n_grid and solution.k in config.k_grid
        assert solution.stop_reason in ("decided", "controller", "deadline", "complete")
        assert solution.decisions >= 0 and len(solution.branches) == solution.n
    assert not draft_engine.has_unfinished_requests()


def test_tuning_deadlines_add_points_between_the_grids_evenly_in_log_time():
    assert tuning_deadlines((4.0, 1.0, 2.0), 0) == (1.0, 2.0, 4.0)
    assert tuning_deadlines((1.0, 4.0), 1) == (1.0, 2.0, 4.0)
    assert tuning_deadlines((1.0, 8.0), 2) == (1.0, 2.0, 4.0, 8.0)
    assert tuning_deadlines((0.24, 0.34), 1) == (0.24, 0.286, 0.34)  # 3 significant digits
    assert tuning_deadlines((1.0, 1.0001), 1) == (1.0, 1.0001)  # no room at 3 digits
    assert tuning_deadlines((2.5,), 3) == (2.5,)
    for bad in (-1, 5, 1.5):
        with pytest.raises(ValueError, match=r"between grid points must be an integer in \[0, 4\]"):
            tuning_deadlines((1.0, 2.0), bad)
    with pytest.raises(ValueError, match="between grid points"):
        StopValueArgs(between=9)  # before a run spends minutes on the baselines


def test_the_bounds_candidates_act_as_under_every_deadline_the_policy_was_tuned_at(
    backend, featurizer, config, policy
):
    """A policy tuned between the grid's deadlines may take a horizon there: the hindsight
    bound's candidates at a grid deadline include those horizons, for every family."""
    from policies.bound_candidates import STOP_VALUE, Draws

    between = tuning_deadlines(DEADLINES, 1)
    dense = dataclasses.replace(policy, deadlines_s=between,
                                settings=[policy.settings[0]] * len(between))  # fmt: skip
    grid_only = Draws.of(policy, featurizer, config, backend, range(6), DEADLINES, 1, SEED)
    finer = Draws.of(dense, featurizer, config, backend, range(6), DEADLINES, 1, SEED)
    assert grid_only.at == [0, 1, 2] and finer.at == [0, 2, 4]
    coarse, fine = grid_only.families(), finer.families()
    for name in (STOP_VALUE, "margin", "all"):
        per_horizon = len(coarse[name][0].accuracy)  # the settings read at one deadline
        for d in range(len(DEADLINES)):  # grid deadline d is tuning deadline 2d
            assert len(coarse[name][d].accuracy) == (d + 1) * per_horizon
            assert len(fine[name][d].accuracy) == (2 * d + 1) * per_horizon
            assert set(coarse[name][d].latency.round(9)) <= set(fine[name][d].latency.round(9))


def test_the_lead_tuning_reads_the_learners_replay_only_of_the_very_same_draws(
    learned, backend, featurizer
):
    """``StopValueReplay.on`` reads ``learn_stop_value``'s tuning replay instead of replaying
    the draws again: the candidates must be those of a fresh replay, and other draws (another
    seed, other repeats, another network) must be replayed, not read."""
    policy, tuning = learned
    problems = tuning_problem_indices(20, len(backend.problems), SEED)
    assert tuning.problems == tuple(problems) and tuning.repeats == 2
    n_grid = (1, 2, 4, 8)
    reused = StopValueReplay.on(policy, featurizer, backend, problems, DEADLINES, 2, SEED, n_grid,
                                tuning)  # fmt: skip
    fresh = StopValueReplay.on(policy, featurizer, backend, problems, DEADLINES, 2, SEED, n_grid)
    assert reused.table is tuning.table and fresh.table is None
    for a, b in zip(reused.candidates(), fresh.candidates(), strict=True):
        assert np.array_equal(a.accuracy, b.accuracy) and np.array_equal(a.latency, b.latency)
    other_net = dataclasses.replace(policy, net=ValueNet.from_arrays(policy.net.arrays()))
    for model, repeats, seed in ((policy, 2, SEED + 1), (policy, 1, SEED), (other_net, 2, SEED)):
        again = StopValueReplay.on(model, featurizer, backend, problems, DEADLINES, repeats,
                                   seed, n_grid, tuning)  # fmt: skip
        assert again.table is None and again.traces is not tuning.traces
