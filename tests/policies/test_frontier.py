"""Accuracy-latency frontiers and the latency saving at equal accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from policies.frontier import frontier, latency_at_accuracy, latency_saving


def test_frontier_drops_dominated_points():
    front = frontier([1.0, 2.0, 3.0, 2.5], [0.4, 0.5, 0.45, 0.6])
    assert front.tolist() == [[1.0, 0.4], [2.0, 0.5], [2.5, 0.6]]


def test_latency_at_accuracy_interpolates_and_clamps():
    front = frontier([1.0, 2.0], [0.4, 0.6])
    assert latency_at_accuracy(front, 0.5) == pytest.approx(1.5)
    assert latency_at_accuracy(front, 0.3) == pytest.approx(0.75)  # below: towards (0, 0)
    assert latency_at_accuracy(front, 0.7) == 2.0  # above: the best point's latency


def test_saving_is_relative_to_the_frontier():
    front = frontier([1.0, 2.0], [0.4, 0.6])
    saving = latency_saving([0.75, 2.0], [0.5, 0.4], front)
    assert saving == pytest.approx(np.array([0.5, -1.0]))
