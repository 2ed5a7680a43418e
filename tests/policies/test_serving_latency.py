"""The server's latency inputs from the shipped CPU profile (no engine): expected answer length,
acceptance, and the online correction fed by engine steps."""

from __future__ import annotations

import pytest

from engine.batch_loop import BatchStep
from policies.serving_latency import LENGTH_WINDOW, PROFILE_PRIOR_LENGTHS, ServingLatency

PROFILE = "smollm2-135m-cpu"


def test_the_profile_prior_counts_branches_at_its_limit_as_cut():
    """Half of the profile's branches hit its 256-token limit: the prior keeps them as lower
    bounds, so the median is the longest finished length below the limit."""
    latency = ServingLatency.from_profile(PROFILE, method="ngram")
    assert len(latency.lengths) == PROFILE_PRIOR_LENGTHS
    assert sum(not finished for _, finished in latency.lengths) == PROFILE_PRIOR_LENGTHS // 2
    assert 200 < latency.answer_lengths().expected(limit=512) < 256
    quartile = ServingLatency.from_profile(PROFILE, method="ngram", length_quantile=0.25)
    assert 20 < quartile.answer_lengths().expected(512) < 200
    assert 0 <= quartile.acceptance <= 1


def test_decode_steps_correct_the_model_and_prefill_steps_do_not():
    latency = ServingLatency.from_profile(PROFILE, method="ngram", calibrate_s=0)
    latency.refresh_s = 0.0
    predicted = float(latency.model().step_time(8, 0, "ngram"))
    latency.on_step(BatchStep(step_s=predicted / 2, batch=8, k=0, calls=2, prefill=True,
                              prompt_tokens=300))  # fmt: skip
    assert latency.correction.factors() == {}
    for _ in range(10):
        latency.on_step(BatchStep(predicted / 2, 8, 0, 2, False, 0))
    latency.on_step(BatchStep(predicted / 2, 8, 3, 2, False, 0))  # no table for k=3: ignored
    # rel 1e-3: the correction decays towards the base model (half-life 60 s) while no step
    # arrives, about 1e-5 per millisecond between the last step and this read
    corrected = float(latency.model().step_time(8, 0, "ngram"))
    assert corrected == pytest.approx(predicted / 2, rel=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"method": "eagle"}, "no step tables for method 'eagle'"),
     ({"method": "ngram", "length_quantile": 1.0}, "length_quantile")],
)  # fmt: skip
def test_bad_settings_name_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServingLatency.from_profile(PROFILE, **kwargs)


def test_served_lengths_take_over_from_the_profile_within_a_few_calls():
    """Fifteen served calls whose answers stop at 120 tokens pull the median down from the profile's
    token limit (aborted branches shorter than that only leave the risk set); answers cut by
    their limit are lower bounds, and a window of them says "as long as allowed" again."""
    latency = ServingLatency.from_profile(PROFILE, method="ngram")
    for _ in range(15):
        latency.observe([{"tokens": 120, "finish_reason": "stop"},
                         {"tokens": 30, "finish_reason": "aborted"}])  # fmt: skip
    assert latency.answer_lengths().expected(512) == 120
    for _ in range(LENGTH_WINDOW):
        latency.observe([{"tokens": 64, "finish_reason": "length"}])
    assert latency.answer_lengths().expected(512) == 512
