"""The hindsight bound on the latency saving (``policies.saving_bound``) and its candidates
(``policies.bound_candidates``)."""

from __future__ import annotations

import numpy as np
import pytest

from policies.bound_candidates import Candidates, with_shorter_horizons
from policies.frontier import frontier
from policies.saving_bound import ahead_bound, best_saving, cross_validate, saving_bound


def test_the_bound_takes_the_largest_saving_among_settings_that_keep_the_accuracy():
    front = frontier([1.0, 2.0], [0.4, 0.6])
    cands = [
        # 0.5 @ 0.75 s saves 50% (frontier: 1.5 s) but is 0.1 below the reference 0.6
        Candidates(np.array([0.5, 0.598, 0.6]), np.array([0.75, 1.8, 2.0])),
        Candidates(np.array([0.3]), np.array([0.2])),  # nothing keeps the accuracy
    ]
    rows = best_saving(cands, [0.6, 0.6], front, slack=0.005)
    assert rows[0]["accuracy"] == 0.598 and rows[0]["saving"] == pytest.approx(1 - 1.8 / 1.99)
    assert rows[0]["setting"] == 1
    assert rows[1] == {"saving": None, "accuracy": None, "mean_latency_s": None, "setting": None}
    loose = best_saving(cands[:1], [0.6], front, slack=0.2)
    assert loose[0]["saving"] == pytest.approx(0.5)


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a train\.py run folder"):
        saving_bound(tmp_path)
    with pytest.raises(ValueError, match=r"accuracy slack -0\.1 must be a share of accuracy"):
        saving_bound(tmp_path, slack=-0.1)


def test_a_deadline_also_offers_every_setting_of_the_shorter_ones():
    grid = [Candidates(np.array([0.1]), np.array([0.2])),
            Candidates(np.array([0.3, 0.4]), np.array([0.5, 0.6]))]  # fmt: skip
    widened = with_shorter_horizons(grid)
    assert widened[0].accuracy.tolist() == [0.1]
    assert widened[1].accuracy.tolist() == [0.1, 0.3, 0.4]
    assert widened[1].latency.tolist() == [0.2, 0.5, 0.6]


def _rows(*points: tuple[float, float]) -> list[dict]:
    return [{"accuracy": a, "mean_latency_s": t} for a, t in points]


def test_the_ahead_bound_keeps_both_accuracy_targets_and_measures_against_the_heuristics():
    report = {
        "deadlines_s": [1.0, 2.0],
        "methods": {
            "static_best": _rows((0.40, 0.9), (0.50, 1.8)),
            "margin": _rows((0.38, 0.5), (0.46, 1.0)),
            "esc": _rows((0.41, 0.8), (0.45, 0.9)),
        },
    }
    family = [
        # the floor is esc's 0.41 less 0.003 (above static_best's 0.40 less 0.005): 0.40 @ 0.1 s
        # is too inaccurate, 0.42 @ 0.9 s slower than the heuristics' frontier there
        Candidates(np.array([0.408, 0.40, 0.42]), np.array([0.4, 0.1, 0.9])),
        # at 2 s the floor is static_best's 0.495: 0.47 @ 0.2 s is too inaccurate
        Candidates(np.array([0.47, 0.50]), np.array([0.2, 1.2])),
    ]
    bound = ahead_bound(report, {"mine": family})
    assert bound["heuristics"] == ["esc", "margin"]
    rows = bound["families"]["mine"]["per_deadline"]
    # the joint frontier: 0.38 @ 0.5, 0.41 @ 0.8, 0.45 @ 0.9, 0.46 @ 1.0 s
    assert rows[0]["accuracy"] == 0.408
    assert rows[0]["saving"] == pytest.approx(1 - 0.4 / (0.5 + 0.3 * 0.028 / 0.03))
    # above the heuristics' best accuracy: judged against their most accurate point's time
    assert rows[1]["accuracy"] == 0.50 and rows[1]["saving"] == pytest.approx(1 - 1.2 / 1.0)
    assert [r["accuracy_lead"] for r in rows] == pytest.approx([0.01, 0.04])
    assert bound["families"]["mine"]["mean_accuracy_lead"] == pytest.approx(0.025)


def test_a_run_without_heuristics_has_no_ahead_bound():
    report = {"deadlines_s": [1.0], "methods": {"static_best": _rows((0.4, 0.9))}}
    assert ahead_bound(report, {"mine": [Candidates(np.array([0.4]), np.array([0.5]))]}) == {}


def test_cross_validation_scores_each_halfs_choice_on_the_other_half():
    """The setting chosen on one half (largest saving there) is scored on the other: a setting
    that only looks fast on the half it was chosen on does not count at its own figure."""
    static = {"static_best": _rows((0.40, 1.0))}
    lucky = Candidates(np.array([0.40, 0.40]), np.array([0.5, 0.8]))  # setting 0 looks faster
    plain = Candidates(np.array([0.38, 0.40]), np.array([0.9, 0.8]))  # setting 0: slow, wrong
    result = cross_validate([(static, {"mine": [lucky]}), (static, {"mine": [plain]})], 0.005)
    row = result["static"]["mine"]["per_deadline"][0]
    # half 0 picks setting 0, scored on half 1: 0.38 @ 0.9 s against 0.40 @ 1.0 s
    # half 1 picks setting 1, scored on half 0: 0.40 @ 0.8 s
    scored_on_1 = 1 - 0.9 / (1.0 * 0.38 / 0.40)
    assert row["saving"] == pytest.approx((scored_on_1 + (1 - 0.8)) / 2)
    assert row["above_floor"] == pytest.approx(((0.38 - 0.395) + (0.40 - 0.395)) / 2)
    assert "ahead" not in result  # no heuristic rows, no lead target
    assert result["tuned_rows"] == [static, static]
