"""Calibration targets of the synthetic profile (issues 5 and 12), checked on a freshly
generated one.

The profile is generated once per module with all 500 MATH-500 problems (the calibration set)
and a few train problems; a second generation with the same seed checks determinism. The
targets and tolerances are pinned here, not imported, so that moving a target fails a test.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from itertools import pairwise

import numpy as np
import pytest

from env.latency_model import tokens_per_step
from env.paths import profiles_dir
from env.profiles.store import PROBLEM_COLUMNS, load_profile
from env.synthetic.answers import simulate_votes, stored_vote_curve
from env.synthetic.branches import PARAMETERS, SAMPLING, base_length_model
from env.synthetic.generate import (
    MAJORITY_FILE,
    PLOT_NAME,
    PROFILE_NAME,
    TARGET_MODEL,
    _load_problems,
    generate,
    load_published,
    train_success_rates,
)
from env.synthetic.lengths import LengthDraws, session_metrics, simulate_sessions
from env.synthetic.report import calibration_table, format_summary, length_statistics, main
from env.synthetic.roofline import K_GRID, SPEC_METHODS, RooflineModel, published_checks
from env.task.problems import load_math500, load_math_train

SEED = 0
TRAIN_PROBLEMS = 120
N_MAX = 64
N_MAX_BUNDLED = 256
CURVE_TOLERANCE = 0.02  # issue 5: +-2 points at every N
EFFECTIVE_TOLERANCE = 0.15  # relative, "close to the published median"
# issue 12: real Llama-3.2-1B-Instruct samples (rlc-audit 'bon' arms, 5 sessions of 256)
AUC_TARGET, AUC_TOLERANCE = 0.445, 0.01  # within-problem AUC of length for correctness
CORRELATION_TARGET, CORRELATION_TOLERANCE = -0.29, 0.03  # pooled length-correctness r
PASS1_TARGET, PASS1_TOLERANCE = 0.2386, 0.01  # data/llama32_1b_math500_counts.json


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("profiles") / "synthetic-test"
    return generate(out, seed=SEED, n_max=N_MAX, train_problems=TRAIN_PROBLEMS, progress=False)


@pytest.fixture(scope="module")
def profile(generated):
    return load_profile(generated.path)


@pytest.fixture(scope="module")
def published():
    return load_published()


def gold_class(row) -> int:
    correct = np.asarray(row["branch_correct"], dtype=bool)
    return int(np.asarray(row["branch_class"])[correct][0]) if correct.any() else -1


def test_a_call_cap_above_the_recorded_branches_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"max_call_branches=65 must lie in 1..n_max=64"):
        generate(tmp_path / "x", n_max=64, max_call_branches=65, progress=False)
    assert not (tmp_path / "x").exists()


def test_the_bundled_profile_draws_its_calls_from_four_times_as_many_branches():
    """256 recorded per problem, calls of at most 64: repeated MATH-500 draws of a 64-branch
    call are different samples, not one race replayed."""
    manifest = json.loads((profiles_dir() / PROFILE_NAME / "manifest.json").read_text())
    assert (manifest["n_max"], manifest["max_call_branches"]) == (N_MAX_BUNDLED, 64)


def test_manifest_marks_synthetic_and_sources_every_parameter(generated, profile):
    manifest = profile.manifest
    assert manifest["synthetic"] is True
    assert manifest["target_model"] == TARGET_MODEL
    assert manifest["hardware"] == "NVIDIA H100 SXM (roofline)"
    assert manifest["n_max"] == N_MAX and manifest["k_grid"] == list(K_GRID)
    assert manifest["max_call_branches"] == min(N_MAX, 64)
    assert manifest["spec_methods"] == list(SPEC_METHODS)
    assert "synthetic profile" in profile.label
    for field in ("created", "command", "duration_s", "sampling", "seed"):
        assert field in manifest
    for name, entry in manifest["parameters"].items():
        assert set(entry) == {"value", "source"}, name
        assert isinstance(entry["source"], str) and len(entry["source"]) > 10, name
    assert set(PARAMETERS) <= set(manifest["parameters"])
    latency = profile.latency_model()
    assert latency.source == "roofline"
    assert latency.methods() == sorted(SPEC_METHODS)
    assert all(latency.k_grid(m) == list(K_GRID) for m in SPEC_METHODS)


def test_rows_have_the_profile_format(profile, published):
    rates, _ = published
    test_rows, train_rows = profile.split("test"), profile.split("train")
    assert len(test_rows) == 500 and len(train_rows) == TRAIN_PROBLEMS
    assert [r["id"] for r in test_rows] == [p.id for p in load_math500(source="bundled")]
    latency = profile.latency_model()
    for row in profile.rows:
        assert set(row) == set(PROBLEM_COLUMNS)
        classes, tokens = row["branch_class"], row["branch_tokens"]
        assert len(classes) == len(tokens) == len(row["branch_finish_s"]) == N_MAX
        assert row["branch_text"] == [""] * N_MAX
        gold = gold_class(row)
        assert np.array_equal(row["branch_correct"], classes == gold) or gold == -1
        for answer, correct in zip(row["branch_answer"], row["branch_correct"], strict=True):
            assert (answer == row["answer"]) if correct else answer != row["answer"]
        truncated = np.asarray(row["branch_finish_reason"]) == "length"
        assert np.array_equal(truncated, classes == -1)
        assert np.all(tokens[truncated] == SAMPLING["max_tokens"])
        assert np.all(tokens[~truncated] < SAMPLING["max_tokens"])
        expected = latency.branch_finish_times(tokens, 0, "ngram", 0.0, row["prompt_tokens"])
        assert np.allclose(row["branch_finish_s"], expected, atol=1e-6)
        assert set(row["accept"]) == set(SPEC_METHODS)
        assert all(0.0 < a < 1.0 for a in row["accept"].values())
    stored_rate = np.mean([np.mean(r["branch_correct"]) for r in test_rows])
    assert np.mean(list(rates.values())) == pytest.approx(PASS1_TARGET, abs=1e-4)
    assert abs(stored_rate - PASS1_TARGET) <= PASS1_TOLERANCE


def test_distributions_carry_the_published_success_rates(generated, published):
    rates, _ = published
    expected = [rates[p.id] for p in load_math500(source="bundled")]
    assert np.allclose(generated.test_answers.p_correct, expected)
    assert np.allclose(generated.test_answers.category_probs().sum(axis=1), 1.0)


def test_majority_vote_curve_matches_published_at_every_n(generated, published):
    _, majority = published
    grid = tuple(majority["sel_grid"])
    draws = np.random.default_rng(12345).random((500, 32, grid[-1]))
    accuracy, _ = simulate_votes(generated.test_answers, draws, grid)
    errors = accuracy.mean(axis=0) - np.asarray(majority["selection"])
    assert np.all(np.abs(errors) <= CURVE_TOLERANCE), dict(
        zip(grid, np.round(errors, 4), strict=True)
    )


def test_stored_branches_vote_like_their_distribution(generated, profile):
    """Subsets of the stored branches (N <= N_max) reproduce the simulated curve up to the
    sampling noise of one draw of N_max branches per problem (3 standard errors)."""
    vote = generated.manifest["calibration"]["majority_vote"]
    rows = profile.split("test")
    grid = tuple(vote["stored_n"])
    stored = stored_vote_curve(
        [r["branch_class"] for r in rows],
        [gold_class(r) for r in rows],
        grid,
        np.random.default_rng(7),
    )
    simulated = np.asarray(vote["simulated"][: len(grid)])
    limit = 3 * np.asarray(vote["stored_standard_error"]) + 0.005
    assert np.all(np.abs(stored - simulated) <= limit), (stored, simulated, limit)
    assert np.all(np.abs(stored - np.asarray(vote["published"][: len(grid)]))[:5] <= 0.02)


def test_effective_answers_close_to_published_median(generated, published):
    _, majority = published
    draws = np.random.default_rng(99).random((500, 8, 256))
    _, effective = simulate_votes(generated.test_answers, draws, (256,))
    target = majority["eff_answers_median"]
    assert abs(np.median(effective) / target - 1.0) <= EFFECTIVE_TOLERANCE


def test_length_statistics(profile):
    rows = profile.split("test")
    stats = length_statistics(rows)
    by_level = [stats["median_tokens_by_level"][str(level)] for level in range(1, 6)]
    assert all(a < b for a, b in pairwise(by_level)), by_level  # harder -> longer
    assert by_level[-1] > 1.8 * by_level[0]
    assert 450 <= stats["mean_tokens"] <= 900  # stated plausibility band (assumption)
    assert 0.002 <= stats["truncated_share"] <= 0.10
    assert stats == profile.manifest["calibration"]["lengths"]


def test_wrong_answers_barely_longer_within_a_problem(profile):
    """The fitted model: answered-wrong responses only a few percent longer than right ones of
    the same problem (the old assumed 1.4x is what the real samples ruled out)."""
    ratio = profile.manifest["parameters"]["length_wrong_ratio"]["value"]
    assert 1.0 < ratio < 1.15
    ratios = []
    for row in profile.split("test"):
        answered = row["branch_class"] >= 0
        correct, wrong = row["branch_correct"], answered & ~row["branch_correct"]
        if correct.sum() >= 8 and wrong.sum() >= 8:
            ratios.append(
                np.median(row["branch_tokens"][wrong]) / np.median(row["branch_tokens"][correct])
            )
    assert 0.95 < np.median(ratios) < 1.2


def test_length_correctness_matches_the_real_samples(generated):
    """Fresh sessions of the fitted model (256 samples per MATH-500 problem, as in the audit)
    give the published within-problem AUC and pooled correlation."""
    rates, _ = load_published()
    data = _load_problems(rates, SEED, train_problems=0)
    parameters = generated.manifest["parameters"]
    model = replace(
        base_length_model(),
        wrong_ratio=parameters["length_wrong_ratio"]["value"],
        difficulty_slope=parameters["length_difficulty_slope"]["value"],
    )
    draws = LengthDraws.draw(data.n_test, np.random.default_rng(2024))
    metrics = simulate_sessions(model, data.length_inputs(slice(0, data.n_test)), draws)
    assert abs(metrics.auc - AUC_TARGET) <= AUC_TOLERANCE, metrics
    assert abs(metrics.correlation - CORRELATION_TARGET) <= CORRELATION_TOLERANCE, metrics
    assert 430 <= metrics.problems_with_both <= 460  # the audit: 436-439 of 500


def test_stored_branches_carry_the_length_correctness(profile):
    """The 64 stored branches per problem: same correlation; the AUC within sampling noise
    (fewer problems have both classes among 64 branches than among 256)."""
    rows = profile.split("test")
    tokens = np.array([r["branch_tokens"] for r in rows])[:, None, :]
    correct = np.array([r["branch_correct"] for r in rows])[:, None, :]
    truncated = np.array([np.asarray(r["branch_finish_reason"]) == "length" for r in rows])
    truncated = truncated[:, None, :]
    stored = session_metrics(tokens, correct, truncated)
    assert abs(stored.correlation - CORRELATION_TARGET) <= CORRELATION_TOLERANCE, stored
    assert abs(stored.auc - AUC_TARGET) <= 2 * AUC_TOLERANCE, stored


def test_manifest_lists_every_target_with_its_achieved_value(generated):
    targets = {t["name"]: t for t in generated.manifest["calibration_targets"]}
    for t in targets.values():
        assert set(t) == {"name", "target", "tolerance", "achieved", "ok", "source"}
        assert t["ok"] and abs(t["achieved"] - t["target"]) <= t["tolerance"] + 1e-9, t
        assert len(t["source"]) > 10
    _, majority = load_published()
    for n, published in zip(majority["sel_grid"], majority["selection"], strict=True):
        vote = targets[f"majority vote accuracy, N = {n}"]
        assert vote["target"] == pytest.approx(published) and vote["tolerance"] == CURVE_TOLERANCE
    effective = targets["effective distinct answers, median over problems"]
    assert effective["tolerance"] == pytest.approx(EFFECTIVE_TOLERANCE * effective["target"], 1e-3)
    auc = targets["within-problem AUC of length for correctness"]
    assert auc["target"] == pytest.approx(AUC_TARGET, abs=0.001)
    assert auc["tolerance"] == AUC_TOLERANCE
    corr = targets["pooled correlation of length and correctness"]
    assert corr["target"] == pytest.approx(CORRELATION_TARGET, abs=0.001)
    assert corr["tolerance"] == CORRELATION_TOLERANCE
    pass1 = targets["success rate of stored MATH-500 branches"]
    assert pass1["target"] == pytest.approx(PASS1_TARGET, abs=1e-4)
    assert pass1["tolerance"] == PASS1_TOLERANCE
    assert len(targets) == len(majority["sel_grid"]) + 4


def test_acceptance_around_cited_means(profile):
    rows = profile.split("test")
    for method in SPEC_METHODS:
        mean = np.mean([r["accept"][method] for r in rows])
        cited = PARAMETERS[f"accept_{method}_mean"][0]
        assert abs(mean - cited) <= 0.05, (method, mean)
        assert np.std([r["accept"][method] for r in rows]) > 0.02  # varies per problem


def test_roofline_agrees_with_published_h100_measurements(profile):
    checks = published_checks()
    assert len(checks) >= 3
    for check in checks:
        assert abs(check["relative_error"]) <= check["tolerance"], check
    assert all(c["ok"] for c in profile.manifest["calibration"]["latency_checks"])


def test_roofline_is_memory_bound_at_small_batch_and_k_shrinks_with_n():
    model = RooflineModel()
    assert model.step_s(16, 0, "ngram") / model.step_s(1, 0, "ngram") < 1.25

    def best_k(batch: int) -> int:
        per_token = [
            model.step_s(batch, k, "draft_model") / tokens_per_step(0.65, k) for k in K_GRID
        ]
        return K_GRID[int(np.argmin(per_token))]

    assert best_k(1) > best_k(256)


def test_train_rates_come_from_the_same_subject_and_level(published):
    rates, _ = published
    test = load_math500(source="bundled")
    train = load_math_train(limit=300)
    test_rates = np.array([rates[p.id] for p in test])
    pools = defaultdict(set)
    for problem, rate in zip(test, test_rates, strict=True):
        pools[(problem.subject, problem.level)].add(rate)
    drawn = train_success_rates(train, test, test_rates, np.random.default_rng(3))
    for problem, rate in zip(train, drawn, strict=True):
        if problem.level:
            assert rate in pools[(problem.subject, problem.level)]


def test_generation_is_deterministic(generated, tmp_path):
    again = generate(
        tmp_path / "again", seed=SEED, n_max=N_MAX, train_problems=TRAIN_PROBLEMS, progress=False
    )
    first = json.loads((generated.path / "manifest.json").read_text())
    second = json.loads((again.path / "manifest.json").read_text())
    for volatile in ("created", "duration_s", "command", "name"):
        first.pop(volatile), second.pop(volatile)
    assert first == second
    assert (generated.path / "problems.parquet").read_bytes() == (
        again.path / "problems.parquet"
    ).read_bytes()


def test_summary_labels_every_table_synthetic(generated):
    summary = format_summary(generated.manifest)
    headers = [line for line in summary.splitlines() if line and not line.startswith(" ")]
    assert headers and all("synthetic profile" in line for line in headers)
    assert MAJORITY_FILE in json.dumps(generated.manifest["parameters"])


def test_report_prints_every_target_and_draws_the_plot(generated, tmp_path, capsys):
    table = calibration_table(generated.manifest)
    assert table.row_count == len(generated.manifest["calibration_targets"]) + len(
        generated.manifest["calibration"]["latency_checks"]
    )
    assert "synthetic profile" in str(table.title)
    plot = tmp_path / PLOT_NAME
    main(["--profile", str(generated.path), "--plot", str(plot)])
    printed = capsys.readouterr().out
    assert "within-problem AUC of length for correctness" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
