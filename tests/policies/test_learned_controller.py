"""The learned race controller reads the same observation from any source of a race.

A tiny untrained race policy on the real CPU profile (``smollm2-135m-cpu``): its choices mean
nothing; what is tested is that the controller built from a saved policy (prompt features from
the featurizer, as on the live engine) sees exactly what ``RaceEnv`` shows the model, and that
its fast actor equals SB3's ``predict``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from stable_baselines3 import PPO

from env.backends.protocol import ProblemInfo
from env.backends.replay import ReplayBackend
from env.config import RaceEnvConfig
from env.features import ProblemFeaturizer
from env.profiles.store import load_profile
from env.race_env import RaceEnv
from policies.learned_controller import LearnedController, PolicyNetwork
from policies.saved_policy import load_race_policy, save_race_policy

PROFILE = "smollm2-135m-cpu"


def tiny_race_policy(
    folder: Path,
    n_grid: tuple[int, ...] = (1, 2, 4, 8),
    k_grid: tuple[int, ...] = (0, 1, 2, 4),
    method: str = "draft_model",
) -> Path:
    """An untrained PPO race policy on the CPU profile, saved in the race format; it records
    the race scales of the backend it was built on."""
    backend = ReplayBackend(load_profile(PROFILE), "train", method)
    featurizer = ProblemFeaturizer.fit(backend.profile.split("train"), (2.0, 60.0))
    config = RaceEnvConfig(n_grid=n_grid, k_grid=k_grid)
    env = RaceEnv(backend, featurizer, config)
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, seed=0, device="cpu")
    scales = [backend.max_branches, max(backend.k_grid)]
    info = {"profile": {"name": PROFILE}, "spec_method": method, "race_scales": scales}
    return save_race_policy(folder, model, featurizer, config, info)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return load_race_policy(tiny_race_policy(tmp_path_factory.mktemp("race") / "policy"))


@pytest.fixture(scope="module")
def env(saved):
    backend = ReplayBackend(load_profile(PROFILE), "test", "draft_model")
    return RaceEnv(backend, saved.featurizer, saved.env_config)


def _anonymous(problem: ProblemInfo) -> ProblemInfo:
    """The problem as the live path sees it: text and prompt length only."""
    return ProblemInfo(-1, "", problem.problem, problem.prompt_tokens)


@pytest.mark.parametrize("deadline", [3.0, 17.5, 60.0])
def test_saved_controller_sees_what_the_env_shows_the_model(saved, env, deadline):
    """Every observation of a race, computed by the live-path controller (featurizer on the
    prompt, the policy's race scales), equals the env's (prompt table, backend scales),
    bit for bit."""
    live = LearnedController.from_saved(saved)
    for p, problem in enumerate(env.backend.problems):
        obs, _ = env.reset(seed=p, options={"problem_index": p, "deadline_s": deadline})
        n, k = live.begin(_anonymous(problem), deadline)
        np.testing.assert_array_equal(live.observation(env.race_state), obs)
        action = np.array([env.n_grid.index(n), env.k_grid.index(k), 0])
        done = False
        while not done:
            obs, _, done, _, _ = env.step(action)
            np.testing.assert_array_equal(live.observation(env.race_state), obs)
            decision = live.decide(env.race_state)
            action = np.array([0, env.k_grid.index(decision.k), int(decision.stop)])


def test_env_and_saved_controllers_act_alike(saved, env):
    from_env = LearnedController(saved.model, env)
    from_saved = LearnedController.from_saved(saved)
    for problem in env.backend.problems:
        assert from_env.begin(problem, 9.0) == from_saved.begin(_anonymous(problem), 9.0)


def test_fast_actor_equals_sb3_predict(saved):
    net = PolicyNetwork(saved.model)
    rng = np.random.default_rng(0)
    observations = rng.uniform(-2, 2, (300, len(net.obs))).astype(np.float32)
    expected, _ = saved.model.predict(observations, deterministic=True)
    for obs, want in zip(observations, expected, strict=True):
        net.obs[:] = obs
        assert net.act() == want.tolist()


def test_race_scales_come_from_the_policy(tmp_path):
    """A policy whose grids are narrower than its backend records the backend's scales."""
    folder = tiny_race_policy(tmp_path / "narrow", n_grid=(1, 2, 4), k_grid=(0, 1, 2))
    policy = load_race_policy(folder)
    assert LearnedController.from_saved(policy).race_scales == (8, 4)
    del policy.info["race_scales"]  # older policies: the grids' largest values
    assert LearnedController.from_saved(policy).race_scales == (4, 2)


def test_no_deadline_reads_as_the_longest_trained_one(saved):
    controller = LearnedController.from_saved(saved)
    problem = ProblemInfo(-1, "", "What is $1 + 1$?", 40)
    high = saved.featurizer.deadline_range_s[1]
    np.testing.assert_array_equal(controller.prompt_features(problem, float("inf")),
                                  controller.prompt_features(problem, high))  # fmt: skip
    assert controller.begin(problem, float("inf")) == controller.begin(problem, high)
