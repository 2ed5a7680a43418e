"""LatencyTTS-v0: checkers, replay rules (deadline cut-off, early stop, ties), reward, resets."""

import time

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from env.allocation import Allocation
from env.backends.protocol import Backend
from env.backends.replay import ReplayBackend
from env.config import ENV_ID, LIVE_ENV_ID, EnvConfig
from env.features import ProblemFeaturizer
from env.profiles.store import load_profile, save_profile
from env.task.voting import VoteTally
from env.tts_env import LatencyTTSEnv  # importing it registers the Gymnasium ids
from tests.fake_profile import make_fake_profile


@pytest.fixture(scope="module")
def profile_folder(tmp_path_factory):
    return make_fake_profile(tmp_path_factory.mktemp("profiles") / "fake-env", 200, 40, 16)


@pytest.fixture(scope="module")
def profile(profile_folder):
    return load_profile(profile_folder)


@pytest.fixture(scope="module")
def featurizer(profile):
    return ProblemFeaturizer.fit(profile.split("train"), (0.5, 10.0))


@pytest.fixture
def train_env(profile, featurizer):
    return LatencyTTSEnv(ReplayBackend(profile, "train"), featurizer, EnvConfig())


def _handmade_profile(folder, classes, correct_class=1):
    """One problem, branches of 100, 200, ... tokens finishing at 1, 2, ... s (k = 0)."""
    n = len(classes)
    latency_model = {
        "source": "test", "prefill_base_s": 0.0, "prefill_per_token_s": 0.0,
        "call_overhead_s": 0.0,
        "steps": {"none": {"0": {"batch": [1, 64], "seconds": [0.01, 0.01]}}},
    }  # fmt: skip
    row = {
        "id": "p0", "split": "test", "problem": "What is $1+1$?", "answer": "2", "level": 1,
        "subject": "Algebra", "prompt_tokens": 20, "branch_text": [""] * n,
        "branch_answer": [None if c < 0 else f"a{c}" for c in classes],
        "branch_class": list(classes), "branch_correct": [c == correct_class for c in classes],
        "branch_tokens": [100 * (i + 1) for i in range(n)],
        "branch_finish_s": [float(i + 1) for i in range(n)],
        "branch_finish_reason": ["stop"] * n, "accept": {},
    }  # fmt: skip
    manifest = {"name": "handmade", "synthetic": True, "latency_model": latency_model}
    return ReplayBackend(save_profile(folder, manifest, [row]), "test")


def test_checkers_and_registration(profile, featurizer):
    made = gym.make(ENV_ID, backend=ReplayBackend(profile, "train"), featurizer=featurizer)
    gymnasium_check_env(made.unwrapped)
    sb3_check_env(made.unwrapped)
    obs, _ = made.reset(seed=0)
    assert made.observation_space.contains(obs)
    assert made.unwrapped.n_grid == (1, 2, 4, 8, 16)


def test_make_with_defaults_fits_a_featurizer_explicitly(profile_folder):
    made = gym.make(ENV_ID, profile=profile_folder, split="test")
    assert len(made.unwrapped.problems) == 40
    assert made.unwrapped.featurizer.meta["num_problems"] == 200  # the profile's training split
    with pytest.raises(TypeError, match="featurizer"):
        LatencyTTSEnv(made.unwrapped.backend, None)


def test_replay_backend_implements_the_protocol_and_clones_share_it(train_env):
    assert isinstance(train_env.backend, Backend)
    twin = train_env.clone()
    assert twin.backend is train_env.backend and twin is not train_env
    twin.reset(seed=1)
    train_env.reset(seed=2)
    assert twin.np_random is not train_env.np_random


class _UnpromisingBackend:
    """Replay without the determinism promise, as a live backend would be."""

    def __init__(self, replay):
        self._replay = replay

    def __getattr__(self, name):
        if name in ("deterministic", "_replay") or name.startswith("__"):  # __deepcopy__ too
            raise AttributeError(name)
        return getattr(self._replay, name)


def test_spec_is_nondeterministic_unless_the_backend_promises_otherwise(profile, featurizer):
    replay = ReplayBackend(profile, "test")
    unpromising = _UnpromisingBackend(replay)
    assert not gym.make(ENV_ID, backend=replay, featurizer=featurizer).spec.nondeterministic
    live = gym.make(LIVE_ENV_ID, backend=unpromising, featurizer=featurizer)
    assert live.spec.nondeterministic and live.unwrapped.spec.nondeterministic
    with pytest.raises(ValueError, match=LIVE_ENV_ID):  # the replay id promises determinism
        gym.make(ENV_ID, backend=unpromising, featurizer=featurizer)


def test_finish_times_follow_latency_model(profile):
    backend = ReplayBackend(profile, "test")
    model, row = backend.latency_model, profile.split("test")[3]
    branches = np.array([5, 0, 9, 2])
    for k in backend.k_grid:
        method, table_k = backend.step_table_key(k)
        expected = model.branch_finish_times(
            row["branch_tokens"][branches], table_k, method,
            profile.acceptance(row, backend.method), row["prompt_tokens"],
        )  # fmt: skip
        np.testing.assert_allclose(backend.finish_times(3, branches, k), expected)


def test_deadline_cuts_off_unfinished_branches(tmp_path):
    backend = _handmade_profile(tmp_path / "p", [0, 1, 1, 1])
    rng = np.random.default_rng(0)
    early = backend.run(0, 4, 0, 1.5, rng)  # only the 1 s branch (a wrong answer) finished
    assert (early.branches_finished, early.answer_class, early.correct) == (1, 0, False)
    assert early.latency_s == 1.5 and not early.deadline_missed and early.answer == "a0"
    nothing = backend.run(0, 4, 0, 0.5, rng)
    assert nothing.deadline_missed and not nothing.answered and nothing.latency_s == 0.5
    full = backend.run(0, 4, 0, 10.0, rng)
    assert (full.branches_finished, full.correct, full.latency_s) == (4, True, 4.0)
    assert full.generated_tokens == 1000


def test_vote_stops_once_decided(tmp_path):
    backend = _handmade_profile(tmp_path / "p", [1, 1, 1, 0])
    outcome = backend.run(0, 4, 0, 10.0, np.random.default_rng(0))
    assert outcome.correct and outcome.branches_finished == 3 and outcome.latency_s == 3.0
    assert outcome.generated_tokens == 100 + 200 + 300 + 300  # the last one was aborted


def test_tie_goes_to_class_finished_first(tmp_path):
    backend = _handmade_profile(tmp_path / "p", [0, 1], correct_class=0)
    outcome = backend.run(0, 2, 0, 10.0, np.random.default_rng(0))
    assert outcome.answer_class == 0 and outcome.correct


def test_n_beyond_recorded_branches_is_rejected(tmp_path):
    backend = _handmade_profile(tmp_path / "p", [0, 1])
    with pytest.raises(ValueError, match="recorded branches"):
        backend.run(0, 3, 0, 10.0, np.random.default_rng(0))


@pytest.mark.parametrize("grid", [(0.5,), (0.0, 1.0), (0.5, 1.2, 1.0)])
def test_budget_grid_must_lie_in_0_1_and_include_1(profile, featurizer, grid):
    with pytest.raises(ValueError, match="budget_grid"):
        LatencyTTSEnv(ReplayBackend(profile, "test"), featurizer, EnvConfig(budget_grid=grid))


def test_replay_votes_by_the_voting_rules_in_finish_order(profile):
    """Replay's outcome is VoteTally's over the drawn branches as they finish in time."""
    backend = ReplayBackend(profile, "test")
    rows, rng = profile.split("test"), np.random.default_rng(1)
    for _ in range(300):
        p, n = int(rng.integers(len(rows))), int(rng.integers(1, 17))
        k, deadline, seed = int(rng.choice(backend.k_grid)), float(rng.uniform(0.1, 6.0)), 7
        outcome = backend.run(p, n, k, deadline, np.random.default_rng(seed))
        drawn = np.random.default_rng(seed).permutation(backend.max_branches)[:n]
        finish = backend.finish_times(p, drawn, k)
        tally, last_finish = VoteTally(n), 0.0
        for b in np.argsort(finish, kind="stable"):
            if finish[b] > deadline or tally.decided:
                break
            tally.add(rows[p]["branch_class"][drawn[b]])
            last_finish = finish[b]
        assert (outcome.branches_finished, outcome.answer_class) == (tally.finished, tally.leader)
        assert outcome.latency_s == pytest.approx(last_finish if tally.decided else deadline)
        classes, correct = list(rows[p]["branch_class"]), rows[p]["branch_correct"]
        assert outcome.correct == (tally.leader >= 0 and correct[classes.index(tally.leader)])


def test_reward_and_info(train_env):
    train_env.config.latency_cost = 0.05
    rewards = []
    for seed in range(200):
        train_env.reset(seed=seed)
        _, reward, terminated, truncated, info = train_env.step(train_env.action_space.sample())
        assert terminated and not truncated
        assert info["latency_s"] <= info["deadline_s"] + 1e-9
        expected = float(info["correct"]) - 0.05 * info["latency_s"] / info["deadline_s"]
        assert reward == pytest.approx(expected)
        rewards.append(reward)
        assert {"correct", "n", "k", "budget", "branches_finished", "generated_tokens"} <= set(info)
        assert info["latency_s"] <= info["budget"] * info["deadline_s"] + 1e-9
    assert 0 < np.mean([r > 0.5 for r in rewards]) < 1


def test_run_episode_is_the_step_transition(train_env):
    """Evaluation's entry (run_episode) applies the budget and the reward exactly as step."""
    options = {"problem_index": 3, "deadline_s": 2.0, "draw_seed": 5}
    train_env.reset(options=options)
    _, reward, _, _, info = train_env.step(train_env.action_of(8, 1, 0.5))
    outcome, episode_reward = train_env.run_episode(
        3, Allocation(8, 1, 0.5), 2.0, np.random.default_rng(5)
    )
    assert episode_reward == reward and outcome.to_info().items() <= info.items()
    stopped_early = train_env.backend.run(3, 8, 1, 1.0, np.random.default_rng(5))
    assert outcome == stopped_early  # the budget: the call stops at 0.5 x 2.0 s


def test_reset_options_fix_problem_deadline_and_draw(train_env):
    options = {"problem_index": 7, "deadline_s": 3.0, "draw_seed": 11}
    obs, info = train_env.reset(options=options)
    assert info == {"problem_index": 7, "deadline_s": 3.0}
    first = train_env.step(train_env.action_of(4, 2))[4]
    again_obs, _ = train_env.reset(options=options)
    assert train_env.step(train_env.action_of(4, 2))[4] == first
    np.testing.assert_array_equal(obs, again_obs)
    with pytest.raises(RuntimeError, match="reset"):
        train_env.step(train_env.action_of(4, 2))


def test_sweep_walks_every_problem_at_every_deadline(profile, featurizer):
    config = EnvConfig(sweep_deadlines_s=(1.0, 4.0))
    sweep = LatencyTTSEnv(ReplayBackend(profile, "test"), featurizer, config)
    seen = [tuple(sweep.reset()[1].values()) for _ in range(2 * 40)]
    assert len(set(seen)) == 80 and tuple(sweep.reset()[1].values()) == seen[0]


def test_replay_is_fast(train_env):
    nvec = train_env.action_space.nvec
    actions = np.random.default_rng(0).integers(0, nvec, (3000, len(nvec)))
    train_env.reset(seed=0)
    start = time.perf_counter()
    for action in actions:
        train_env.reset()
        train_env.step(action)
    # the benchmark (python -m env.bench_replay) shows >= 5,000/s; this only catches collapses
    assert len(actions) / (time.perf_counter() - start) > 1000
