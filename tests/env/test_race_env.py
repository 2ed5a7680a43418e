"""``LatencyTTS-v1``: Gymnasium's checks, decision points, reward, and replay speed."""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from env.backends.replay import ReplayBackend
from env.config import RACE_ENV_ID, RaceEnvConfig
from env.features import ProblemFeaturizer
from env.profiles.store import load_profile
from env.race import RACE_FEATURES
from env.race_env import RaceEnv
from tests.fake_profile import make_fake_profile


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    folder = make_fake_profile(tmp_path_factory.mktemp("race_env") / "fake", n_train=60, n_test=10)
    return ReplayBackend(folder, "train", method="ngram")


@pytest.fixture(scope="module")
def featurizer(backend):
    return ProblemFeaturizer.fit(backend.profile.split("train"), (0.05, 5.0))


def test_gymnasium_checks_and_registration(backend, featurizer):
    env = gym.make(RACE_ENV_ID, backend=backend, featurizer=featurizer)
    check_env(env.unwrapped)
    assert env.spec.id == RACE_ENV_ID and not env.spec.nondeterministic
    width = len(featurizer.feature_names) + len(RACE_FEATURES)
    assert env.observation_space.shape == (width,)


def test_episode_decides_at_branch_finishes_and_pays_at_the_end(backend, featurizer):
    env = RaceEnv(backend, featurizer, RaceEnvConfig(latency_cost=0.1, checkpoints=()))
    obs, info = env.reset(seed=0, options={"problem_index": 3, "deadline_s": 50.0})
    assert obs[len(featurizer.feature_names) + RACE_FEATURES.index("is_start")] == 1.0
    action = np.array([env.n_grid.index(8), env.k_grid.index(1), 0])
    rewards, finished = [], []
    done = False
    while not done:
        obs, reward, done, truncated, info = env.step(action)
        rewards.append(reward)
        finished.append(env.race_state.tally.finished)
    assert not truncated and all(r == 0.0 for r in rewards[:-1])
    assert finished == sorted(finished) and len(set(finished)) == len(finished)  # one per step
    expected = float(info["correct"]) - 0.1 * info["latency_s"] / 50.0
    assert rewards[-1] == pytest.approx(expected) and info["decisions"] == len(rewards)


def test_stop_action_ends_the_call_at_once(backend, featurizer):
    env = RaceEnv(backend, featurizer, RaceEnvConfig(checkpoints=()))
    env.reset(seed=1, options={"problem_index": 0, "deadline_s": 50.0})
    env.step(np.array([env.n_grid.index(16), 0, 0]))
    elapsed = env.race_state.elapsed_s
    _, _, done, _, info = env.step(np.array([0, 0, 1]))
    assert done and info["latency_s"] == elapsed and info["branches_finished"] >= 1


def test_replay_speed_on_the_default_profile():
    """The issue's target is >= 5,000 decisions/s through gymnasium.make (``env.bench_replay``
    prints it); here a loose floor that still catches a quadratic slip."""
    profile = load_profile("synthetic-llama32-1b-h100")
    backend = ReplayBackend(profile, "test")
    featurizer = ProblemFeaturizer.fit(profile.split("train")[:300], (0.2, 3.0))
    env = gym.make(RACE_ENV_ID, backend=backend, featurizer=featurizer)
    env.reset(seed=0)
    env.action_space.seed(0)
    decisions, start = 0, time.perf_counter()
    while decisions < 3000:
        env.reset()
        done = False
        while not done:
            _, _, done, _, _ = env.step(env.action_space.sample())
            decisions += 1
    assert decisions / (time.perf_counter() - start) > 1000
