"""The saved-policy format: light to import, the bundled default race policy loads and decides,
and the one compatibility check refuses another format, other race features or a narrower
featurizer with what to do."""

from __future__ import annotations

import json
import shutil

import pytest

from env.backends.protocol import ProblemInfo
from env.config import RACE_ENV_ID
from env.paths import policies_dir
from env.race import RaceState
from policies.learned_controller import LearnedController
from policies.saved_policy import RACE_POLICY_FORMAT_VERSION, load_race_policy
from tests.fresh_imports import modules_loaded_by

NOT_LOADED_BY_THE_FORMAT = (
    "datasets",
    "stable_baselines3",  # imported by load_race_policy, not by the module
    "gymnasium",
    "env.race_env",
    "policies.ppo_training",
    "policies.evaluate",
)


def test_importing_the_format_loads_no_training_code():
    loaded = modules_loaded_by("policies.saved_policy")
    assert sorted(loaded.intersection(NOT_LOADED_BY_THE_FORMAT)) == []


@pytest.fixture(scope="module")
def default_policy():
    return load_race_policy(policies_dir() / "default")


def test_the_bundled_default_policy_loads_and_decides_on_its_grids(default_policy):
    policy = default_policy
    assert policy.info["format_version"] == RACE_POLICY_FORMAT_VERSION
    assert policy.info["env_id"] == RACE_ENV_ID
    controller = LearnedController.from_saved(policy)
    problem = ProblemInfo(0, "p0", "Find all real $x$ with $x^2 = 4$.", 45)
    n, k = controller.begin(problem, 20.0)
    assert n in policy.env_config.n_grid and k in policy.env_config.k_grid
    state = RaceState(20.0, max(policy.env_config.n_grid), max(policy.env_config.k_grid))
    state.start(n, k)
    state.record_finish(0, 3.0)
    decision = controller.decide(state)
    assert decision.k in policy.env_config.k_grid and isinstance(decision.stop, bool)


def _copy(folder, tmp_path, **changes):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    info = json.loads((copy / "policy.json").read_text())
    info.update(changes)
    (copy / "policy.json").write_text(json.dumps(info))
    return copy


def test_a_one_decision_policy_is_refused_with_what_to_do(default_policy, tmp_path):
    old = _copy(default_policy.folder, tmp_path, format_version=2, env_id="LatencyTTS-v0")
    with pytest.raises(ValueError, match=r"format version 2.*LatencyTTS-v1.*Retrain"):
        load_race_policy(old)


def test_other_race_features_are_refused(default_policy, tmp_path):
    other = _copy(default_policy.folder, tmp_path, race_feature_names=["elapsed_fraction"])
    with pytest.raises(ValueError, match=r"other race features.*Retrain"):
        load_race_policy(other)


def test_features_narrower_than_the_model_are_refused(default_policy, tmp_path):
    narrow = _copy(default_policy.folder, tmp_path)
    meta = json.loads((narrow / "featurizer.json").read_text())
    meta["target_names"] = meta["target_names"][:-1]
    (narrow / "featurizer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="observations of shape"):
        load_race_policy(narrow)
