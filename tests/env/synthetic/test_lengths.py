"""The length model and its calibration measures (env.synthetic.lengths), on small inputs."""

from __future__ import annotations

import json
from dataclasses import replace
from statistics import NormalDist

import numpy as np
import pytest

from env.paths import data_dir
from env.synthetic.lengths import (
    AUDIT_FILE,
    SENSITIVITY,
    LengthDraws,
    LengthInputs,
    LengthModel,
    fit_lengths,
    load_targets,
    normal_cdf,
    normal_quantile,
    simulate_sessions,
    within_problem_auc,
)
from env.synthetic.report import format_sensitivity


def test_normal_quantile_and_cdf_match_the_standard_library():
    p = np.array([1e-12, 1e-4, 0.02, 0.024, 0.3, 0.5, 0.77, 0.976, 0.999, 1 - 1e-9])
    expected = [NormalDist().inv_cdf(x) for x in p]
    assert np.allclose(normal_quantile(p), expected, rtol=1e-8, atol=1e-8)
    z = np.array([[-6.0, -1.0], [0.0, 2.5]])
    assert np.allclose(normal_cdf(z), np.vectorize(NormalDist().cdf)(z), atol=1e-12)


def brute_force_auc(tokens: np.ndarray, correct: np.ndarray) -> float:
    pos, neg = tokens[correct], tokens[~correct]
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return float(wins.mean())


def test_within_problem_auc_is_the_mann_whitney_mean_over_rows_with_both_classes():
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 30, size=(40, 25))  # many ties
    correct = rng.random((40, 25)) < 0.3
    correct[0] = True  # one row without wrong samples, one without right ones
    correct[1] = False
    rows = range(2, 40)
    auc, both = within_problem_auc(tokens, correct)
    assert both == 38
    assert auc == pytest.approx(np.mean([brute_force_auc(tokens[i], correct[i]) for i in rows]))
    keep = rng.random((40, 25)) < 0.8
    kept, _ = within_problem_auc(tokens, correct, keep)
    expected = [
        brute_force_auc(tokens[i][keep[i]], correct[i][keep[i]])
        for i in rows
        if correct[i][keep[i]].any() and not correct[i][keep[i]].all()
    ]
    assert kept == pytest.approx(np.mean(expected))


def test_lengths_follow_the_log_normal_below_the_cap():
    model = LengthModel(branch_sigma=0.5, max_tokens=2048)
    uniforms = np.random.default_rng(1).random(200_000)
    short = model.tokens(np.full(uniforms.shape, 300.0), uniforms)
    assert np.median(short) == pytest.approx(300, rel=0.01)
    assert np.std(np.log(short)) == pytest.approx(0.5, rel=0.02)
    long = model.tokens(np.full(uniforms.shape, 1800.0), uniforms)
    assert long.max() <= 2047 and long.min() >= model.min_tokens
    # conditioned below the cap: the median is the cap-censored law's, not 1800
    below = model.below_cap(np.array([1800.0]))[0]
    expected = 1800 * np.exp(0.5 * NormalDist().inv_cdf(below / 2))
    assert np.median(long) == pytest.approx(expected, rel=0.01)


def test_no_answer_only_from_wrong_branches_past_the_cap():
    model = LengthModel(branch_sigma=0.45, wrong_ratio=1.2)
    medians, rates = np.array([300.0, 1500.0]), np.array([0.9, 0.1])
    p_none = model.no_answer_rates(medians, rates)
    tail = 1 - np.vectorize(NormalDist().cdf)(np.log(2048 / (1.2 * medians)) / 0.45)
    assert np.allclose(p_none, (1 - rates) * tail)


def test_audit_figures_are_the_quoted_ones():
    audit = json.loads((data_dir() / AUDIT_FILE).read_text())
    assert audit["seeds"] == [0, 1, 2, 3, 4]
    auc, corr = audit["auc_len_construct_within"], audit["r_len_construct"]
    assert round(min(auc), 3) == 0.442 and round(max(auc), 3) == 0.447
    assert round(min(corr), 3) == -0.296 and round(max(corr), 3) == -0.287
    targets = load_targets()
    assert targets.auc == pytest.approx(0.4448, abs=1e-4) and targets.auc_tolerance == 0.01
    assert targets.correlation == pytest.approx(-0.2895, abs=1e-4)
    assert targets.correlation_tolerance == 0.03
    assert "rlc-audit" in targets.source and "max_tokens-2048" in audit["dataset"]


@pytest.fixture(scope="module")
def toy_problems():
    """200 problems spanning success rates, with solution lengths and length noise."""
    rng = np.random.default_rng(5)
    rates = np.clip(rng.beta(0.5, 1.3, 200), 0.0, 0.97)
    solution_tokens = np.exp(rng.normal(5.0, 0.6, 200))
    return LengthInputs(solution_tokens, rates, rng.standard_normal(200))


def test_fit_reaches_both_targets_and_a_fresh_draw_agrees(toy_problems):
    targets = load_targets()
    draws = LengthDraws.draw(200, np.random.default_rng(6))
    fit = fit_lengths(LengthModel(), toy_problems, draws, targets)
    assert abs(fit.metrics.auc - targets.auc) <= targets.auc_tolerance / 10
    assert abs(fit.metrics.correlation - targets.correlation) <= targets.correlation_tolerance / 10
    assert fit.evaluations <= 40
    fresh_draws = LengthDraws.draw(200, np.random.default_rng(7))
    fresh = simulate_sessions(fit.model, toy_problems, fresh_draws)
    assert abs(fresh.auc - targets.auc) <= targets.auc_tolerance
    assert abs(fresh.correlation - targets.correlation) <= targets.correlation_tolerance


def test_longer_wrong_answers_lower_the_auc(toy_problems):
    draws = LengthDraws.draw(200, np.random.default_rng(8))
    aucs = [
        simulate_sessions(LengthModel(wrong_ratio=ratio), toy_problems, draws).answered_auc
        for ratio in (1.0, 1.2, 1.4)
    ]
    assert aucs[0] == pytest.approx(0.5, abs=0.01) and aucs[0] > aucs[1] > aucs[2]


def test_sensitivity_variants_and_their_printout():
    assert SENSITIVITY[0] == ("as generated", {})
    fields = set(LengthModel.__dataclass_fields__)
    assert all(set(change) <= fields for _, change in SENSITIVITY)
    replace(LengthModel(), **SENSITIVITY[1][1])  # each variant is a valid model
    row = {
        "variant": "as generated",
        "wrong_ratio": 1.09,
        "difficulty_slope": 0.6,
        "auc": 0.445,
        "correlation": -0.289,
        "answered_auc": 0.449,
        "problems_with_both": 447.0,
        "truncated_share": 0.011,
        "mean_tokens": 580.0,
    }
    text = format_sensitivity([row])
    assert "synthetic profile" in text.splitlines()[0] and "1.090" in text
