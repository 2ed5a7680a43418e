"""Accuracy-latency frontiers, and how much latency a method saves at equal accuracy.

Comparing two controllers at one deadline mixes two effects: one may be more accurate, the
other faster.  The fair question is "how long does the reference need to reach this accuracy?".
A reference's frontier is built from its (mean latency, accuracy) points over all its deadlines:
the least latency at which it reaches each accuracy, linear between points.  A method's saving
at a deadline is ``1 - its mean latency / frontier latency at its accuracy``.

Outside the frontier's range the comparison is made conservative: below the reference's least
accurate point the frontier runs in a straight line to (0 s, accuracy 0), so a method cannot
look fast by being inaccurate; an accuracy above the reference's best is compared with the best
point's latency (the method is then more accurate *and* judged only on time).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def frontier(latencies: Sequence[float], accuracies: Sequence[float]) -> np.ndarray:
    """The reference's frontier as (latency, accuracy) rows, latency ascending, accuracy
    strictly rising: points that are slower but not more accurate than another are dropped."""
    points = sorted(zip(latencies, accuracies, strict=True), key=lambda p: (p[0], -p[1]))
    kept: list[tuple[float, float]] = []
    for latency, accuracy in points:
        if not kept or accuracy > kept[-1][1]:
            kept.append((float(latency), float(accuracy)))
    return np.asarray(kept).reshape(-1, 2)


def latency_at_accuracy(front: np.ndarray, accuracy: float) -> float:
    """Least latency at which the frontier reaches ``accuracy`` (see the module docstring for
    accuracies outside its range)."""
    lat, acc = front[:, 0], front[:, 1]
    if accuracy <= acc[0]:
        return float(lat[0] * max(accuracy, 0.0) / acc[0]) if acc[0] > 0 else float(lat[0])
    if accuracy >= acc[-1]:
        return float(lat[-1])
    return float(np.interp(accuracy, acc, lat))


def latency_saving(
    latencies: Sequence[float],
    accuracies: Sequence[float],
    front: np.ndarray,
) -> np.ndarray:
    """Per point, ``1 - latency / frontier latency at the point's accuracy`` (positive: the
    method needs less time than the reference for the same accuracy)."""
    return np.asarray([
        1.0 - latency / latency_at_accuracy(front, accuracy)
        for latency, accuracy in zip(latencies, accuracies, strict=True)
    ])  # fmt: skip
