"""The server's latency inputs from the shipped CPU profile (no engine): expected answer length,
acceptance, and the online correction fed by engine steps."""

from __future__ import annotations

import math

import pytest

from engine.batch_loop import BatchStep
from policies.serving_latency import ServingLatency

PROFILE = "smollm2-135m-cpu"


def test_expected_length_is_a_quantile_and_the_token_limit_means_unbounded():
    """Half of the profile's branches hit its 256-token limit: the median says "as long as the
    request allows"; the lower quartile is a length."""
    assert math.isinf(ServingLatency.from_profile(PROFILE, method="ngram").expected_tokens())
    quartile = ServingLatency.from_profile(PROFILE, method="ngram", length_quantile=0.25)
    assert 100 < quartile.expected_tokens() < 256
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
    assert float(latency.model().step_time(8, 0, "ngram")) == pytest.approx(predicted / 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"method": "eagle"}, "no step tables for method 'eagle'"),
     ({"method": "ngram", "length_quantile": 1.0}, "length_quantile")],
)  # fmt: skip
def test_bad_settings_name_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServingLatency.from_profile(PROFILE, **kwargs)


def test_served_lengths_replace_the_profiles():
    """Served answers that stop at about 120 tokens pull the median down from the profile's
    token limit; answers cut by their limit count as unbounded; aborted ones say nothing."""
    latency = ServingLatency.from_profile(PROFILE, method="ngram")
    for _ in range(120):
        latency.observe([{"tokens": 120, "finish_reason": "stop"},
                         {"tokens": 30, "finish_reason": "aborted"}])  # fmt: skip
    assert latency.expected_tokens() == 120
    for _ in range(150):
        latency.observe([{"tokens": 64, "finish_reason": "length"}])
    assert math.isinf(latency.expected_tokens())
