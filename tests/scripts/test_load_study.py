"""Load-aware controllers: the learned controller starts from the observation the environment
shows under load, a policy saved before the ``load`` feature is refused with what to do, and
the load study runs end to end (fake profile, tiny settings)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from stable_baselines3 import PPO

from env.backends.replay import ReplayBackend
from env.config import RaceEnvConfig
from env.features import ProblemFeaturizer
from env.race import RACE_FEATURES
from env.race_env import RaceEnv
from policies.learned_controller import LearnedController
from policies.saved_policy import load_race_policy, save_race_policy
from scripts.load_study import Args, main
from tests.fake_profile import make_fake_profile


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A race environment under the mixed load on a fake profile's test problems."""
    profile = make_fake_profile(tmp_path_factory.mktemp("study") / "fake", 200, 30, 8)
    backend = ReplayBackend(profile, "test", method="ngram")
    featurizer = ProblemFeaturizer.fit(backend.profile.split("train"), (0.5, 4.0))
    config = RaceEnvConfig(n_grid=(1, 2, 4, 8), k_grid=backend.k_grid, load_distribution="mixed")
    return RaceEnv(backend, featurizer, config)


def test_the_learned_controller_starts_from_the_loaded_observation(env):
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, seed=0, device="cpu")
    controller = LearnedController(model, env)
    for load in (0, 16, 128):
        obs, _ = env.reset(options={"problem_index": 2, "deadline_s": 1.0,
                                    "background_branches": load})  # fmt: skip
        controller.begin(env.backend.problems[2], 1.0, background_branches=load)
        np.testing.assert_array_equal(controller._net.obs, obs)  # what the actor acts on
        np.testing.assert_array_equal(controller.observation(env.race_state), obs)


def test_a_policy_saved_without_the_load_feature_is_refused(env, tmp_path):
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, seed=0, device="cpu")
    folder = save_race_policy(tmp_path / "policy", model, env.featurizer, env.config, {})
    assert load_race_policy(folder).env_config.load_distribution == "mixed"
    info = json.loads((folder / "policy.json").read_text())
    info["race_feature_names"] = [n for n in RACE_FEATURES if n != "load"]  # before the load
    (folder / "policy.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"other race features\. Retrain"):
        load_race_policy(folder)


def test_the_load_study_runs_end_to_end(env, tmp_path):
    profile = str(env.backend.profile.path)
    args = Args(profile=profile, timesteps=128, n_envs=2, n_steps=64, batch_size=64,
                val_problems=20, tune_problems=30, teach_episodes=60, eval_repeats=1,
                deadlines=(0.5, 2.0), out=str(tmp_path / "study"))  # fmt: skip
    report = main(args)
    written = json.loads((tmp_path / "study" / "load_study.json").read_text())
    assert written["profile"] == {"label": "fake (synthetic profile)", "synthetic": True}
    assert [row["deadline_s"] for row in written["deadlines"]] == [0.5, 2.0]
    names = ["policy (aware)", "policy (blind)", "margin per load", "margin on mixture"]
    assert report["methods"] == names
    for row in report["deadlines"]:
        for name in names:
            assert 0.0 <= row[name]["accuracy"] <= 1.0
            assert row[name]["mean_latency_s"] <= row["deadline_s"] + 1e-9
    assert set(report["accuracy_by_load"]) == {0, 8, 16, 32, 64, 128}
    assert set(report["aware_minus_blind"]) == {"accuracy", "reward"}
