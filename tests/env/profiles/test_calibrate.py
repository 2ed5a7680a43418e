"""fit_latency_model on calibrations whose true parameters are known, and the acceptance
estimate the profiler stores; no engine needed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from env.latency_model import (
    LatencyModel,
    acceptance_from_counts,
    tokens_per_step,
    unshared_prompt_tokens,
)
from env.profiles.calibrate import decode_steps, effective_acceptance, fit_latency_model

BATCHES = (1, 2, 4, 8)
TRUE_BASE, TRUE_PER_TOKEN = 0.12, 0.004


def true_step(method: str, k: int, batch: float) -> float:
    """A step-time surface with method, k and batch effects (draft model costs more)."""
    fixed = 0.06 if method == "ngram" else 0.09
    return fixed + 0.01 * k + 0.008 * batch * (k + 1)


def calibration(noise: float = 0.0, outlier: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    decode, prefill = [], []
    for method in ("ngram", "draft_model"):
        for k in (0, 1, 2, 4):
            for batch in BATCHES:
                for repeat in range(3):
                    step = true_step(method, k, batch) * (1 + noise * rng.standard_normal())
                    if outlier and repeat == 0:
                        step *= 5  # a busy moment on a shared machine
                    decode.append(
                        {"method": method, "k": k, "batch": batch, "repeat": repeat, "step_s": step}
                    )
        for tokens in (60, 150, 300, 700):
            for n in (1, 4, 8):
                wall = TRUE_BASE + TRUE_PER_TOKEN * tokens * n + true_step(method, 0, n)
                wall *= 1 + noise * rng.standard_normal()
                prefill.append({"method": method, "prompt_tokens": tokens, "n": n, "wall_s": wall})
    return {"prefill_method": "ngram", "decode": decode, "prefill": prefill}


def test_exact_calibration_recovers_every_parameter():
    model = fit_latency_model(calibration())
    assert model.methods() == ["draft_model", "ngram"]
    for method in model.methods():
        assert model.k_grid(method) == [0, 1, 2, 4]
        for k in (0, 1, 2, 4):
            measured = model.step_time(np.array(BATCHES), k, method)
            assert measured == pytest.approx([true_step(method, k, b) for b in BATCHES])
            # between measured batch sizes the table interpolates the (linear) truth
            assert model.step_time(6, k, method) == pytest.approx(true_step(method, k, 6))
    assert model.prefill_base_s == pytest.approx(TRUE_BASE)
    assert model.prefill_per_token_s == pytest.approx(TRUE_PER_TOKEN)
    assert model.call_overhead_s == 0.0 and model.source == "calibration"


def test_medians_ignore_a_slow_repeat_and_noise_averages_out():
    model = fit_latency_model(calibration(noise=0.02, outlier=True, seed=3))
    for method in model.methods():
        for k in model.k_grid(method):
            got = model.step_time(np.array(BATCHES), k, method)
            want = np.array([true_step(method, k, b) for b in BATCHES])
            assert np.all(np.abs(got / want - 1) < 0.06)
    assert model.prefill_per_token_s == pytest.approx(TRUE_PER_TOKEN, rel=0.05)
    assert model.prefill_base_s == pytest.approx(TRUE_BASE, abs=0.1)


def test_prefill_uses_only_the_named_method():
    data = calibration()
    for sample in data["prefill"]:
        if sample["method"] == "draft_model":
            sample["wall_s"] *= 3  # another engine's prefill must not leak into the fit
    model = fit_latency_model(data)
    assert model.prefill_per_token_s == pytest.approx(TRUE_PER_TOKEN)
    assert model.meta["prefill_method"] == "ngram"


def test_prefill_fit_counts_shared_prompt_blocks_once():
    """With prefix caching, branches after the first compute only the prompt's last partial
    block; the fit recovers base, per-token and per-branch costs from such calls."""
    block, per_branch = 128, 0.03
    data = calibration()
    data["prefill"] = []
    for tokens in (81, 138, 268, 700):
        for n in (1, 4, 8):
            shared = block * ((tokens - 1) // block)
            computed = tokens + (n - 1) * (tokens - shared)
            wall = (TRUE_BASE + TRUE_PER_TOKEN * computed + per_branch * (n - 1)
                    + true_step("ngram", 0, n))  # fmt: skip
            data["prefill"].append(
                {"method": "ngram", "prompt_tokens": tokens, "n": n, "wall_s": wall}
            )
    data["prefix_block_tokens"] = block
    model = LatencyModel.from_dict(fit_latency_model(data).to_dict())
    assert model.prefix_block_tokens == block
    assert model.prefill_per_token_s == pytest.approx(TRUE_PER_TOKEN)
    assert model.prefill_base_s == pytest.approx(TRUE_BASE)
    assert model.prefill_per_branch_s == pytest.approx(per_branch)
    # 8 branches of 138 tokens (one shared block) prefill faster than 8 of 81
    assert model.prefill_time(138, 8) < model.prefill_time(81, 8)
    assert model.prefill_time(138, 1) > model.prefill_time(81, 1)


def test_unshared_prompt_tokens():
    assert unshared_prompt_tokens(81, 8, None) == 648
    assert unshared_prompt_tokens(81, 8, 128) == 648  # within one block: nothing shared
    assert unshared_prompt_tokens(128, 3, 128) == 384  # the last token is always recomputed
    assert unshared_prompt_tokens(138, 8, 128) == 138 + 7 * 10
    assert unshared_prompt_tokens(256, 2, 128) == 256 + 128
    got = unshared_prompt_tokens(np.array([[138], [81]]), np.arange(3), 128)
    assert got.tolist() == [[0, 138, 148], [0, 81, 162]]


def test_prefill_coefficients_are_clipped_at_zero():
    data = calibration()
    for sample in data["prefill"]:  # longer prompts faster: a nonsense slope
        sample["wall_s"] = 2.0 - 0.0001 * sample["prompt_tokens"] * sample["n"]
    model = fit_latency_model(data)
    assert model.prefill_per_token_s == 0.0 and model.prefill_base_s > 0
    for sample in data["prefill"]:  # a negative intercept: refit through the origin
        n = sample["n"]
        sample["wall_s"] = 0.01 * sample["prompt_tokens"] * n - 1.0 + true_step("ngram", 0, n)
    model = fit_latency_model(data)
    assert model.prefill_base_s == 0.0 and model.prefill_per_token_s > 0


def test_predicted_call_adds_prefill_and_decode_steps():
    model = LatencyModel.from_dict(fit_latency_model(calibration()).to_dict())
    tokens, prompt = [40, 40], 100
    # k = 0: prefill and one step per token at batch 2
    want = TRUE_BASE + TRUE_PER_TOKEN * prompt * 2 + 40 * true_step("ngram", 0, 2)
    assert model.predict_wall_time(tokens, 0, "ngram", 0.0, prompt) == pytest.approx(want)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"decode": [], "prefill": []}, "no decode samples"),
        (
            {"decode": [{"method": "ngram", "k": 0, "batch": 1, "step_s": 0.1}], "prefill": []},
            "no prefill samples",
        ),
        (
            {
                "decode": [{"method": "ngram", "k": 1, "batch": 1, "step_s": 0.1}],
                "prefill": [{"method": "ngram", "prompt_tokens": 9, "n": 1, "wall_s": 1.0}],
            },
            "no k = 0 decode samples",
        ),
    ],
)
def test_incomplete_calibrations_are_rejected(data, message):
    with pytest.raises(ValueError, match=message):
        fit_latency_model(data)


@pytest.mark.parametrize("alpha", [0.0, 0.15, 0.4, 0.7])
def test_pooled_acceptance_recovers_alpha(alpha):
    samples = []
    for k in (1, 2, 4):
        steps = 1000
        accepted = steps * (tokens_per_step(alpha, k) - 1)
        samples.append((k, steps + accepted, accepted))
    assert effective_acceptance(samples) == pytest.approx(alpha, abs=1e-6)


def test_single_k_acceptance_matches_tokens_per_step():
    k, tokens, accepted = 4, 48, 20
    alpha = effective_acceptance([(k, tokens, accepted)])
    assert alpha == pytest.approx(acceptance_from_counts(k, k * (tokens - accepted), accepted))
    assert tokens_per_step(alpha, k) == pytest.approx(tokens / (tokens - accepted), rel=1e-6)


def test_acceptance_without_speculative_samples_is_nan():
    assert math.isnan(effective_acceptance([]))
    assert math.isnan(effective_acceptance([(0, 30, 0)]))


def test_decode_steps_after_the_first_token():
    assert decode_steps(0, 32, 5.0) == 31  # nothing is accepted at k = 0
    assert decode_steps(2, 32, 10.0) == 21
    assert decode_steps(4, 1, 0.0) == 1.0  # never zero


def test_validation_summary_and_plan_use_unprofiled_problems():
    from env.profiles.store import Profile
    from env.profiles.validate import plan_calls, summarize

    records = [{"predicted_s": p, "measured_s": 10.0} for p in (9.0, 10.5, 11.5, 10.0, 13.0)]
    summary = summarize(records)
    assert summary["median_rel_error"] == pytest.approx(0.1)
    assert summary["mean_signed_error"] == pytest.approx(0.08)
    assert summary["p90_rel_error"] == pytest.approx(0.24)
    assert summary["meets_targets"] is True

    from env.task.problems import load_math500

    first = load_math500(source="bundled")[0].id
    manifest = {"n_max": 8, "k_grid": [0, 1, 2, 4], "base_method": "ngram"}
    profile = Profile(path=None, manifest=manifest, rows=[{"id": first}])
    plan = plan_calls(profile, ["draft_model", "ngram"], calls=40, seed=1)
    assert len(plan) == 40 and first not in {c["problem"].id for c in plan}
    assert {c["n"] for c in plan} <= {1, 2, 4, 8} and {c["k"] for c in plan} <= {0, 1, 2, 4}
    assert {c["method"] for c in plan} == {"draft_model", "ngram"}
