"""The prompt-only featurizer: learns from training problems, round-trips, guards its schema."""

import json

import numpy as np
import pytest

from env.features import FEATURE_SCHEMA_VERSION, OBS_BOUND, ProblemFeaturizer
from env.profiles.store import load_profile
from tests.fake_profile import make_fake_profile


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("profiles") / "fake-features"
    return load_profile(make_fake_profile(folder, n_train=1200, n_test=300, n_branches=8))


@pytest.fixture(scope="module")
def featurizer(profile):
    return ProblemFeaturizer.fit(profile.split("train"), (0.5, 10.0))


def _inputs(rows):
    return [r["problem"] for r in rows], [r["prompt_tokens"] for r in rows]


def test_predicted_level_and_length_track_truth_on_held_out_problems(profile, featurizer):
    test = profile.split("test")
    pred = featurizer.predict(*_inputs(test))
    names = featurizer.target_names
    level = pred[:, names.index("level")]
    assert np.corrcoef(level, [r["level"] for r in test])[0, 1] > 0.3
    length = pred[:, names.index("log_mean_tokens")]
    true_length = [np.log(np.mean(r["branch_tokens"])) for r in test]
    assert np.corrcoef(length, true_length)[0, 1] > 0.3
    assert level.min() >= 1 and level.max() <= 5


def test_observation_layout_and_bounds(profile, featurizer):
    row = profile.split("test")[0]
    assert featurizer.feature_names[:4] == [
        "log_prompt_tokens", "deadline", "pred_level", "pred_log_mean_tokens"
    ]  # fmt: skip
    obs = featurizer.transform(row["problem"], row["prompt_tokens"], 10.0)
    assert obs.dtype == np.float32 and obs.shape == (len(featurizer.feature_names),)
    assert obs[1] == pytest.approx(1.0)  # the top of the deadline range
    assert featurizer.transform(row["problem"], row["prompt_tokens"], 0.5)[1] == pytest.approx(-1)
    table = featurizer.problem_features(*_inputs(profile.split("test")))
    assert np.abs(table).max() <= OBS_BOUND


def test_save_load_round_trip_and_schema_guard(featurizer, profile, tmp_path):
    featurizer.save(tmp_path)
    loaded = ProblemFeaturizer.load(tmp_path)
    row = profile.split("test")[5]
    np.testing.assert_allclose(
        loaded.transform(row["problem"], row["prompt_tokens"], 2.0),
        featurizer.transform(row["problem"], row["prompt_tokens"], 2.0),
        rtol=1e-6,
    )
    info = json.loads((tmp_path / "featurizer.json").read_text())
    info["feature_schema_version"] = FEATURE_SCHEMA_VERSION + 1
    (tmp_path / "featurizer.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="feature schema version"):
        ProblemFeaturizer.load(tmp_path)
