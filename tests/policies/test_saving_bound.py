"""The hindsight bound on the latency saving (``policies.saving_bound``)."""

from __future__ import annotations

import numpy as np
import pytest

from policies.frontier import frontier
from policies.saving_bound import Candidates, best_saving, saving_bound, with_shorter_horizons


def test_the_bound_takes_the_largest_saving_among_settings_that_keep_the_accuracy():
    front = frontier([1.0, 2.0], [0.4, 0.6])
    cands = [
        # 0.5 @ 0.75 s saves 50% (frontier: 1.5 s) but is 0.1 below the reference 0.6
        Candidates(np.array([0.5, 0.598, 0.6]), np.array([0.75, 1.8, 2.0])),
        Candidates(np.array([0.3]), np.array([0.2])),  # nothing keeps the accuracy
    ]
    rows = best_saving(cands, [0.6, 0.6], front, slack=0.005)
    assert rows[0]["accuracy"] == 0.598 and rows[0]["saving"] == pytest.approx(1 - 1.8 / 1.99)
    assert rows[1] == {"saving": None, "accuracy": None, "mean_latency_s": None}
    loose = best_saving(cands[:1], [0.6], front, slack=0.2)
    assert loose[0]["saving"] == pytest.approx(0.5)


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a train\.py run folder"):
        saving_bound(tmp_path)


def test_a_deadline_also_offers_every_setting_of_the_shorter_ones():
    grid = [Candidates(np.array([0.1]), np.array([0.2])),
            Candidates(np.array([0.3, 0.4]), np.array([0.5, 0.6]))]  # fmt: skip
    widened = with_shorter_horizons(grid)
    assert widened[0].accuracy.tolist() == [0.1]
    assert widened[1].accuracy.tolist() == [0.1, 0.3, 0.4]
    assert widened[1].latency.tolist() == [0.2, 0.5, 0.6]
