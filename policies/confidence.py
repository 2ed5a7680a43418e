"""How sure the answer is: the probability that a call's voted answer is right.

A client that gets an answer before its deadline also wants to know whether to trust it (issue
14: the response's ``tts`` block carries a ``confidence``).  The vote itself says much of it:
a unanimous vote over many branches is right far more often than a 3-3-2 split, and a call the
controller stopped early, or the deadline cut, has fewer votes behind it.  Raw vote share is not
a probability, though (a 1-of-1 "unanimous" vote is right much less often than 32-of-32), so it
is *calibrated*: a logistic regression maps the race's final state to P(right), fitted on the
calls of the policy's own controller replayed on the profile it was trained on (training
split), and checked on the test split (expected calibration error, Brier score, reliability
plot).

Why a logistic regression and nothing after it: it is fitted by log-loss, whose optimum matches
the predicted and observed rates of right answers on the training calls (for the calls as a
whole and along every feature, up to the small ridge penalty), and it has eleven parameters
for thousands of calls, so it does not overfit.  A second step (isotonic regression, Platt
scaling or histogram binning) would need held-out calls of its own and buys little when the
reliability table is already flat; ``calibration_report`` shows whether it is (on the default
policy: ECE 0.026 on the test split).  It is fitted by Newton's method (IRLS, a few
iterations) in numpy: no scikit-learn in this venv, and the serving path must stay light.

The serving path imports this module (``ConfidenceModel.load`` and ``predict``), so it imports
numpy and the race state only; fitting it on replayed calls, the calibration report and the
command line are ``policies.confidence_fit``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from env.race import RaceState

if TYPE_CHECKING:
    pass

CONFIDENCE_FILE = "confidence.json"
"""The calibrated model's file inside a race policy folder."""
CONFIDENCE_FORMAT_VERSION = 1
CONFIDENCE_FEATURES = (
    "leader_share",
    "margin_fraction",
    "leader_votes_fraction",
    "finished_fraction",
    "answered_of_finished",
    "distinct_of_answered",
    "elapsed_fraction",
    "log2_n",
    "leader_mean_logprob",
    "has_logprob",
)
"""Names of ``confidence_features``' entries, in order (ranges in its docstring)."""
DEFAULT_L2 = 1.0
"""Ridge penalty on the standardized weights: negligible against thousands of calls, but it keeps
the fit finite when a feature separates the classes (or is constant) on a small profile."""
RELIABILITY_BINS = 10


def confidence_features(state: RaceState) -> np.ndarray:
    """The race at the moment it answered, as ``CONFIDENCE_FEATURES`` (float64).

    Fractions are in [0, 1] (``margin``, ``leader_votes`` and ``finished`` over n;
    ``answered`` over finished; ``distinct`` over answered; elapsed over the deadline, clipped);
    ``log2_n`` is log2(n) >= 0 (not scaled by a grid: the model standardizes); the leader's mean
    token log-probability is <= 0, and 0 with ``has_logprob`` 0 when the engine gave none.
    A model fitted on a profile without log-probabilities (the synthetic ones) has weight 0 on
    both, so a live engine that gives them does not move its answer off what it was fitted on.
    """
    t, n = state.tally, max(state.n, 1)
    logprob = state.leader_confidence()
    return np.array(
        [
            t.share,
            t.margin / n,
            t.leader_votes / n,
            t.finished / n,
            t.answered / max(t.finished, 1),
            t.distinct / max(t.answered, 1),
            min(state.elapsed_s / state.deadline_s, 1.0),
            math.log2(n),
            0.0 if logprob is None else min(logprob, 0.0),
            0.0 if logprob is None else 1.0,
        ]
    )


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + e^-z), without overflow


def fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float = DEFAULT_L2, iterations: int = 100
) -> np.ndarray:
    """L2-penalized logistic regression by Newton's method (IRLS); returns (intercept, weights).

    ``x`` should be standardized (the penalty treats every weight alike).  The intercept gets
    a penalty 1e-4 as small as the weights', enough to keep it finite when every label is the
    same.  The objective is strictly convex, so full Newton steps converge from zero; a step
    is halved while it would raise the objective, as a guard for nearly separable data.
    """
    design = np.column_stack([np.ones(len(x)), x])
    penalty = np.full(design.shape[1], float(l2))
    penalty[0] = l2 * 1e-4
    y = np.asarray(y, dtype=float)

    def objective(w: np.ndarray) -> float:
        z = design @ w
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(penalty * w * w))

    w = np.zeros(design.shape[1])
    for _ in range(iterations):
        p = _sigmoid(design @ w)
        gradient = design.T @ (p - y) + penalty * w
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        before, scale = objective(w), 1.0
        while objective(w - scale * step) > before + 1e-12 and scale > 1e-6:
            scale /= 2
        w = w - scale * step
        if np.max(np.abs(scale * step)) < 1e-8:
            break
    return w


@dataclass
class ConfidenceModel:
    """P(the voted answer is right | the race when it answered): standardized features, then a
    logistic regression (see the module docstring).

    :param intercept: the logistic regression's intercept.
    :param weights: one weight per standardized feature of ``CONFIDENCE_FEATURES``.
    :param mean: the training features' means (standardization).
    :param scale: their standard deviations (1 where a feature was constant).
    :param info: where it was fitted: profile, split, controller, calls, deadlines.
    """

    intercept: float
    weights: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    info: dict = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        correct: np.ndarray,
        l2: float = DEFAULT_L2,
        info: dict | None = None,
    ) -> ConfidenceModel:
        """Fit on rows of ``confidence_features`` (answered calls) and whether each was right."""
        features = np.asarray(features, dtype=float)
        if features.ndim != 2 or features.shape[1] != len(CONFIDENCE_FEATURES):
            raise ValueError(
                f"expected rows of {len(CONFIDENCE_FEATURES)} features, got {features.shape}"
            )
        if len(features) == 0:
            raise ValueError("no answered calls to fit the confidence on")
        mean, std = features.mean(axis=0), features.std(axis=0)
        scale = np.where(std > 1e-12, std, 1.0)
        w = fit_logistic((features - mean) / scale, correct, l2)
        return cls(float(w[0]), w[1:], mean, scale, {"l2": l2, **(info or {})})

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """P(right) for rows of ``confidence_features`` (of answered calls)."""
        z = ((np.asarray(features, dtype=float) - self.mean) / self.scale) @ self.weights
        return _sigmoid(z + self.intercept)

    def predict(self, state: RaceState) -> float:
        """P(right) of the call's voted answer now; 0.0 when it has no answer."""
        if state.tally.leader < 0:
            return 0.0
        return float(self.predict_features(confidence_features(state)[None, :])[0])

    def to_dict(self) -> dict:
        return {
            "format_version": CONFIDENCE_FORMAT_VERSION,
            "feature_names": list(CONFIDENCE_FEATURES),
            "intercept": self.intercept,
            "weights": self.weights.tolist(),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ConfidenceModel:
        """The model of ``to_dict``; refuses another format or other features (refit it)."""
        if data.get("format_version") != CONFIDENCE_FORMAT_VERSION:
            raise ValueError(
                f"confidence format {data.get('format_version')}; this code reads "
                f"{CONFIDENCE_FORMAT_VERSION}. Refit: python -m policies.confidence"
            )
        if data.get("feature_names") != list(CONFIDENCE_FEATURES):
            raise ValueError(
                "the confidence model was fitted on other features. Refit: "
                "python -m policies.confidence"
            )
        arrays = [np.asarray(data[key], dtype=float) for key in ("weights", "mean", "scale")]
        return cls(float(data["intercept"]), *arrays, info=dict(data.get("info", {})))

    def save(self, folder: Path | str) -> Path:
        """Write ``confidence.json`` into ``folder`` atomically (temporary file + rename)."""
        from env.profiles.store import write_json

        path = Path(folder) / CONFIDENCE_FILE
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load_if_present(cls, folder: Path | str) -> ConfidenceModel | None:
        """The model saved in ``folder``, or None when the policy carries none (a profile on
        which no call was ever answered has nothing to fit)."""
        path = Path(folder) / CONFIDENCE_FILE
        return cls.load(folder) if path.is_file() else None

    @classmethod
    def load(cls, folder: Path | str) -> ConfidenceModel:
        """The model saved in ``folder`` (a race policy folder)."""
        return cls.from_dict(json.loads((Path(folder) / CONFIDENCE_FILE).read_text()))
