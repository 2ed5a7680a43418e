"""The saved-policy format: light to import, the bundled default policy loads and allocates, and
the one compatibility check refuses folders of another format version or observation width."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from env.allocation import AllocationRequest
from env.backends.protocol import ProblemInfo
from env.paths import policies_dir
from policies.saved_policy import POLICY_FORMAT_VERSION, load_policy
from tests.fresh_imports import modules_loaded_by

NOT_LOADED_BY_THE_FORMAT = (
    "datasets",
    "stable_baselines3",  # imported by load_policy, not by the module
    "gymnasium",
    "env.tts_env",
    "policies.ppo_training",
    "policies.baselines",
    "policies.evaluate",
)


def test_importing_the_format_loads_no_training_code():
    loaded = modules_loaded_by("policies.saved_policy")
    assert sorted(loaded.intersection(NOT_LOADED_BY_THE_FORMAT)) == []


@pytest.fixture(scope="module")
def default_policy():
    return load_policy(policies_dir() / "default")


def test_the_bundled_default_policy_loads_and_allocates_on_its_grids(default_policy):
    policy = default_policy
    assert policy.info["format_version"] == POLICY_FORMAT_VERSION
    grids = policy.grids
    featurizer = policy.featurizer
    texts = ["What is $1+1$?", "Find all real $x$ with $x^2 = 4$."]
    problems = tuple(ProblemInfo(i, f"p{i}", text, 40 + i) for i, text in enumerate(texts))
    observations = np.stack([featurizer.transform(p.problem, p.prompt_tokens, 20.0)
                             for p in problems])  # fmt: skip
    names = tuple(featurizer.target_names)
    predictions = featurizer.predict(texts, [p.prompt_tokens for p in problems])
    request = AllocationRequest(20.0, problems, observations, predictions, names)
    for n, k, budget in policy.allocate(request):
        assert n in grids.n and k in grids.k and budget in grids.budget


def _copy(folder, tmp_path, **changes):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    info = json.loads((copy / "policy.json").read_text())
    info.update(changes)
    (copy / "policy.json").write_text(json.dumps(info))
    return copy


def test_other_format_versions_are_refused_with_what_to_do(default_policy, tmp_path):
    old = _copy(default_policy.folder, tmp_path, format_version=POLICY_FORMAT_VERSION - 1)
    with pytest.raises(ValueError, match=r"format version .*Retrain"):
        load_policy(old)


def test_features_narrower_than_the_model_are_refused(default_policy, tmp_path):
    narrow = _copy(default_policy.folder, tmp_path)
    meta = json.loads((narrow / "featurizer.json").read_text())
    meta["target_names"] = meta["target_names"][:-1]
    (narrow / "featurizer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="observations of shape"):
        load_policy(narrow)
