"""The Kaplan-Meier answer-length estimate admission plans with (``policies.answer_lengths``)."""

from __future__ import annotations

import numpy as np
import pytest

from policies.answer_lengths import MIN_REMAINING_TOKENS, AnswerLengths


def test_survival_is_the_product_limit_estimate():
    """Lengths 10, 20+ (cut), 30, 40: S(10) = 3/4; the branch cut at 20 leaves 2 at risk at 30,
    so S(30) = 3/4 * 1/2 and S(40) = 0 (by hand)."""
    fit = AnswerLengths.fit([(30, True), (10, True), (20, False), (40, True)])
    assert fit.times.tolist() == [10, 30, 40]
    assert fit.survival == pytest.approx([0.75, 0.375, 0.0])


def test_lower_bounds_raise_the_median_where_dropping_them_would_not():
    """Four branches finish at 100 tokens, six are cut at 256: the cut ones are longer than any
    finished one, so the median is not reached before the limit (a plain quantile of the
    finished ones would say 100)."""
    fit = AnswerLengths.fit([(100, True)] * 4 + [(256, False)] * 6)
    assert fit.expected(limit=512) == 512
    assert AnswerLengths.fit([(100, True)] * 6 + [(256, False)] * 4).expected(512) == 100


def test_a_running_branch_needs_the_conditional_quantile():
    """Lengths 1..100 evenly: new branch median 50; one that wrote 60 tokens has median length
    80 given it is past 60, so it needs 20 more; one past every recorded length needs a few."""
    fit = AnswerLengths.fit([(t, True) for t in range(1, 101)])
    assert fit.expected(limit=512) == 50
    assert fit.remaining(60, 512) == 20
    assert fit.remaining(100, 512) == MIN_REMAINING_TOKENS
    assert fit.remaining(90, 95) == 5  # never past the call's own limit


def test_a_fixed_length_and_bad_settings():
    fixed = AnswerLengths.fixed(100)
    assert [fixed.remaining(d, 512) for d in (0, 40, 100, 509)] == [100, 60, 8, 3]
    with pytest.raises(ValueError, match="length must be > 0"):
        AnswerLengths.fixed(0)
    with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\)"):
        AnswerLengths.fit([(1, True)], quantile=1.0)
    assert AnswerLengths.fit([]).expected(64) == 64  # nothing known: the limit
    assert np.isfinite(AnswerLengths.fit([(5, True)]).expected())
