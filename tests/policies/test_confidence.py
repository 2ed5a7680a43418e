"""The calibrated answer confidence (``policies.confidence``, fitted by
``policies.confidence_fit``) on a FAKE profile: its features, the logistic fit, the calibration
metrics, the saved file, the command line, and that the serving path can import it without
training code."""

from __future__ import annotations

import json

import numpy as np
import pytest

from env.backends.replay import ReplayBackend
from env.race import BranchConfidence, RaceState
from policies.confidence import (
    CONFIDENCE_FEATURES,
    CONFIDENCE_FILE,
    ConfidenceModel,
    confidence_features,
    fit_logistic,
)
from policies.confidence_fit import (
    calibration_metrics,
    calibration_report,
    cli,
    fit_confidence,
    plot_reliability,
    replay_calls,
)
from policies.race_controllers import RuleController
from policies.race_eval import draw_rng, run_race, run_race_with_state
from tests.fresh_imports import modules_loaded_by

# One tiny saved race policy (and the fake profile it was trained on) for every command-line
# test: the evaluation tests build it; pytest instantiates imported fixtures per module.
from tests.policies.test_evaluate import policy_dir, profile_dir  # noqa: F401

DEADLINES = (1.0, 2.5)
FRACTIONS = [name for name in CONFIDENCE_FEATURES if name not in ("log2_n", "leader_mean_logprob")]


@pytest.fixture(scope="module")
def backends(profile_dir):  # noqa: F811
    return (ReplayBackend(profile_dir, "train", method="ngram"),
            ReplayBackend(profile_dir, "test", method="ngram"))  # fmt: skip


@pytest.fixture(scope="module")
def controller():
    """Eight branches, answering at a margin of 2 (some calls stop on a split vote)."""
    return RuleController("margin", 8, 2, 2)


@pytest.fixture(scope="module")
def model(backends, controller):
    return fit_confidence(backends[0], controller, DEADLINES, None, 4, 0)


def _state(n: int, classes: list[int], elapsed_s: float = 1.0, deadline_s: float = 2.0):
    state = RaceState(deadline_s, 16, 4)
    state.start(n, 2)
    for c in classes:
        state.record_finish(c, elapsed_s)
    return state


def test_features_are_in_range(backends, controller):
    calls = replay_calls(backends[1], controller, (0.4, *DEADLINES), range(12), 2, 0)
    features = calls.features
    assert features.shape == (3 * 12 * 2, len(CONFIDENCE_FEATURES)) and calls.answered.any()
    for name in FRACTIONS:
        column = features[:, CONFIDENCE_FEATURES.index(name)]
        assert ((column >= 0) & (column <= 1)).all(), name
    assert (features[:, CONFIDENCE_FEATURES.index("log2_n")] == 3).all()  # n = 8
    assert (features[:, CONFIDENCE_FEATURES.index("leader_mean_logprob")] == 0).all()


def test_features_of_a_hand_made_race():
    state = _state(8, [0, 0, 1, -1], elapsed_s=0.5, deadline_s=2.0)
    state.record_finish(0, 0.5, BranchConfidence(-0.4, -1.0))
    values = dict(zip(CONFIDENCE_FEATURES, confidence_features(state), strict=True))
    assert values == pytest.approx({
        "leader_share": 0.75, "margin_fraction": 2 / 8, "leader_votes_fraction": 3 / 8,
        "finished_fraction": 5 / 8, "answered_of_finished": 4 / 5, "distinct_of_answered": 2 / 4,
        "elapsed_fraction": 0.25, "log2_n": 3.0, "leader_mean_logprob": -0.4, "has_logprob": 1.0,
    })  # fmt: skip


def test_replayed_outcome_equals_the_evaluation_loop(backends, controller):
    static = RuleController("static_best", 4, 1)
    for c in (controller, static):
        for p in range(6):
            outcome, state = run_race_with_state(backends[1], c, p, 1.0, draw_rng(0, p, 0))
            assert outcome == run_race(backends[1], c, p, 1.0, draw_rng(0, p, 0))
            assert state.stopped is not None and state.tally.leader == outcome.answer_class


def test_logistic_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40_000, 2))
    truth = np.array([0.5, 2.0, -1.0])
    y = rng.random(len(x)) < 1 / (1 + np.exp(-(truth[0] + x @ truth[1:])))
    assert fit_logistic(x, y, l2=1e-3) == pytest.approx(truth, abs=0.08)
    same = fit_logistic(x[:50], np.ones(50))  # one class only: still finite, confident
    assert np.isfinite(same).all() and 1 / (1 + np.exp(-same[0])) > 0.9


def test_unanimous_large_vote_beats_a_split_one(model):
    unanimous = model.predict(_state(8, [0] * 8))
    split = model.predict(_state(8, [0, 0, 0, 1, 1, 1, 2, 2]))
    few = model.predict(_state(8, [0, 0]))
    assert 0 < split < unanimous < 1 and few < unanimous
    assert model.predict(_state(8, [-1, -1])) == 0.0  # no answer: no confidence
    assert model.info["split"] == "train" and model.info["answered_calls"] > 50


def test_save_and_load_round_trip(model, tmp_path):
    path = model.save(tmp_path)
    assert path == tmp_path / CONFIDENCE_FILE and not list(tmp_path.glob("*.tmp"))
    loaded = ConfidenceModel.load(tmp_path)
    state = _state(8, [0, 0, 0, 1])
    assert loaded.predict(state) == model.predict(state)
    assert loaded.to_dict() == model.to_dict() == json.loads(path.read_text())
    stale = {**model.to_dict(), "feature_names": ["leader_share"]}
    with pytest.raises(ValueError, match="Refit"):
        ConfidenceModel.from_dict(stale)
    with pytest.raises(ValueError, match="Refit"):
        ConfidenceModel.from_dict({**model.to_dict(), "format_version": 99})


def test_ece_of_calibrated_and_miscalibrated_sets():
    rng = np.random.default_rng(1)
    probability = rng.random(200_000)
    right = rng.random(len(probability)) < probability
    calibrated = calibration_metrics(probability, right)
    assert calibrated["ece"] < 0.005
    assert calibrated["brier"] == pytest.approx(1 / 6, abs=0.003)  # E[p(1-p)], p ~ U(0, 1)
    overconfident = calibration_metrics(np.full(1000, 0.95), rng.random(1000) < 0.5)
    assert overconfident["ece"] > 0.4
    cubed = calibration_metrics(probability, rng.random(len(probability)) < probability**3)
    assert cubed["ece"] > 0.15


def test_ece_by_hand():
    metrics = calibration_metrics([0.05, 0.05, 0.95, 1.0], [0, 1, 1, 1])
    # bin 0: accuracy 0.5 at 0.05; bin 9 (1.0 included): accuracy 1 at 0.975
    assert metrics["ece"] == pytest.approx(0.5 * 0.45 + 0.5 * 0.025)
    assert metrics["brier"] == pytest.approx((0.05**2 + 0.95**2 + 0.05**2 + 0) / 4)
    table = metrics["reliability"]
    assert len(table) == 10 and [r["calls"] for r in table] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table[1]["accuracy"] is None
    assert calibration_metrics([], [])["ece"] is None


def test_calibration_report_and_plot(model, backends, controller, tmp_path):
    report = calibration_report(model, backends[1], controller, DEADLINES, None, 2, 0)
    assert report["split"] == "test" and report["profile"]["synthetic"]
    assert report["calls"] == 2 * len(backends[1].problems) * 2
    assert report["answered_calls"] == sum(r["answered_calls"] for r in report["per_deadline"])
    assert 0 <= report["ece"] <= 1 and 0 <= report["brier"] <= 1
    assert sum(r["calls"] for r in report["reliability"]) == report["answered_calls"]
    json.dumps(report)  # plain JSON types only
    png = plot_reliability(report, tmp_path / "reliability.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_end_to_end(policy_dir, tmp_path):  # noqa: F811
    out = tmp_path / "confidence"
    report = cli(["--policy", str(policy_dir), "--out", str(out), "--problems", "30"])
    assert (policy_dir / CONFIDENCE_FILE).is_file() and (out / "reliability.png").is_file()
    saved = json.loads((out / "confidence_report.json").read_text())
    assert saved["ece"] == report["ece"] and saved["split"] == "test"
    model = ConfidenceModel.load(policy_dir)
    assert model.info["num_problems"] == 30 and model.info["controller"] == "policy"
    assert report["deadlines_s"] == model.info["deadlines_s"] == [0.4, 1.0, 2.5]


def test_the_serving_path_can_import_it():
    loaded = modules_loaded_by("policies.confidence")
    heavy = {"stable_baselines3", "gymnasium", "datasets", "env.backends.replay",
             "policies.evaluate", "matplotlib"}  # fmt: skip
    assert "policies.confidence" in loaded and not loaded & heavy


def test_the_controller_reports_the_confidence_of_a_policy_that_carries_one(tmp_path, backends):
    """A policy folder with ``confidence.json`` makes ``DecodingController`` load the model (the
    server puts ``Solution.confidence`` in the response's ``tts`` block); without it, None."""
    from types import SimpleNamespace

    from engine.vllm_engine import EngineConfig
    from policies.controller import DecodingController
    from tests.policies.test_learned_controller import tiny_race_policy

    folder = tiny_race_policy(tmp_path / "policy")
    engine = SimpleNamespace(config=EngineConfig(max_n=16, k_max=4))
    assert DecodingController(folder, engine).confidence is None
    controller = RuleController("margin", 4, 0, 2)
    model = fit_confidence(backends[0], controller, DEADLINES, 20, 1, 0)
    model.save(folder)
    loaded = DecodingController(folder, engine).confidence
    state = RaceState(2.0, 16, 4)
    state.start(4, 0)
    for c in (0, 0, 0):
        state.record_finish(c, 1.0)
    assert loaded is not None and loaded.predict(state) == pytest.approx(model.predict(state))
