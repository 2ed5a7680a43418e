"""Observation features a deployed controller can compute from the prompt alone.

At deployment the controller sees a problem's text, its prompt length and the deadline, and
nothing about how the model will answer.  What helps choosing (n, k) is how the model tends to
behave on such a problem, so ``ProblemFeaturizer`` learns it from the training problems of a
profile: ridge regressions from the problem text to its difficulty level, its mean response
length, the single-branch pass rate, the answer agreement (share of the largest answer class)
and the draft acceptance of each speculative method.  The text is represented by hashed
unigrams and bigrams of words, numbers and LaTeX commands (no vocabulary to download or store)
plus a few counts.  Everything is numpy; a fitted featurizer is a JSON file and an npz file.

``FEATURE_SCHEMA_VERSION`` is bumped whenever the meaning or order of the features changes; a
saved featurizer and a saved policy record it, and ``check_feature_schema`` refuses to read them
against a different one.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FEATURE_SCHEMA_VERSION = 1
HASH_DIM = 1024
RIDGE_PENALTIES = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
OBS_BOUND = 5.0
"""Every observation feature is clipped to [-OBS_BOUND, OBS_BOUND]."""


def check_feature_schema(version: object, where: str, remedy: str) -> None:
    """Refuse features computed under another ``FEATURE_SCHEMA_VERSION`` (their observations
    would mean something else); ``where`` names the file's owner, ``remedy`` what to do.

    :raises ValueError: when ``version`` is not this code's.
    """
    if version != FEATURE_SCHEMA_VERSION:
        raise ValueError(
            f"{where} was trained on feature schema version {version}, but this code computes "
            f"version {FEATURE_SCHEMA_VERSION}: its observations would mean something else. "
            f"{remedy}"
        )


_TOKEN = re.compile(r"\\[A-Za-z]+|[A-Za-z]+|\d+|[^\sA-Za-z\d]")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_COMMAND = re.compile(r"\\[A-Za-z]+")


def _text_tokens(text: str) -> list[str]:
    tokens = [t.lower() for t in _TOKEN.findall(text)]
    return tokens + [f"{a} {b}" for a, b in itertools.pairwise(tokens)]


def _counts(text: str, prompt_tokens: int) -> list[float]:
    numbers = _NUMBER.findall(text)
    longest = max((len(x) for x in numbers), default=0)
    return [
        np.log1p(len(text)),
        np.log1p(len(numbers)),
        np.log1p(len(_COMMAND.findall(text))),
        np.log1p(text.count("$")),
        np.log1p(longest),
        np.log1p(prompt_tokens),
    ]


def text_design(texts: Sequence[str], prompt_tokens: Sequence[int]) -> np.ndarray:
    """Design rows: L2-normalised log counts of hashed n-grams, then ``_counts``."""
    cells = [
        i * HASH_DIM + zlib.crc32(token.encode()) % HASH_DIM
        for i, text in enumerate(texts)
        for token in _text_tokens(text)
    ]
    counts = np.bincount(cells, minlength=len(texts) * HASH_DIM).astype(float)
    hashed = np.log1p(counts.reshape(len(texts), HASH_DIM))
    hashed /= np.maximum(np.linalg.norm(hashed, axis=1, keepdims=True), 1e-9)
    counts = np.array([_counts(t, p) for t, p in zip(texts, prompt_tokens, strict=True)])
    return np.hstack([hashed, counts])


def training_targets(rows: Sequence[dict], methods: Sequence[str]) -> dict[str, np.ndarray]:
    """What the featurizer learns per profile row: level, length, pass rate, agreement, alpha."""
    targets = {
        "level": [r["level"] if r["level"] else 3 for r in rows],
        "log_mean_tokens": [np.log(max(np.mean(r["branch_tokens"]), 1.0)) for r in rows],
        "pass_rate": [np.mean(r["branch_correct"]) for r in rows],
        "agreement": [_agreement(np.asarray(r["branch_class"])) for r in rows],
    }
    for method in methods:
        values = [r["accept"].get(method) for r in rows]
        targets[f"accept_{method}"] = [
            v if v is not None and np.isfinite(v) else 0.0 for v in values
        ]
    return {name: np.asarray(v, dtype=float) for name, v in targets.items()}


def _agreement(classes: np.ndarray) -> float:
    answered = classes[classes >= 0]
    return float(np.bincount(answered).max() / len(classes)) if len(answered) else 0.0


_TARGET_RANGES = {"level": (1.0, 5.0), "log_mean_tokens": (0.0, np.log(1e5))}


class ProblemFeaturizer:
    """Maps (problem text, prompt tokens, deadline) to the environment's observation vector.

    Observation features, in order (all float32, clipped to [-5, 5]):

    - ``log_prompt_tokens``: ln(prompt tokens), standardised over the training problems.
    - ``deadline``: ln(deadline) mapped linearly so ``deadline_range_s`` becomes [-1, 1].
    - ``pred_level``: predicted MATH level 1..5 mapped to [-1, 1].
    - ``pred_log_mean_tokens``: predicted ln(mean response tokens), standardised.
    - ``pred_pass_rate``, ``pred_agreement``, ``pred_accept_<method>``: predicted fractions
      in [0, 1] mapped to [-1, 1].

    Build with ``fit``, or ``load`` a saved one.

    :param weights: ridge weights, one column per target, for centred design rows.
    :param x_mean: design column means of the training problems.
    :param y_mean: target means of the training problems.
    :param target_names: names of the predicted quantities, in weight-column order.
    :param scales: (mean, std) of ``log_prompt_tokens`` and ``log_mean_tokens``.
    :param deadline_range_s: (low, high) deadline seconds mapped to [-1, 1].
    :param meta: fit diagnostics (held-out R^2 per target, penalties, sizes).
    """

    def __init__(
        self,
        weights: np.ndarray,
        x_mean: np.ndarray,
        y_mean: np.ndarray,
        target_names: Sequence[str],
        scales: dict[str, tuple[float, float]],
        deadline_range_s: tuple[float, float],
        meta: dict | None = None,
    ) -> None:
        self.weights, self.x_mean, self.y_mean = weights, x_mean, y_mean
        self.target_names = list(target_names)
        self.scales = {k: (float(m), float(s)) for k, (m, s) in scales.items()}
        low, high = deadline_range_s
        if not 0 < low < high:
            raise ValueError(
                f"deadline_range_s must satisfy 0 < low < high, got {deadline_range_s}"
            )
        self.deadline_range_s = (float(low), float(high))
        self._log_deadline_range = (math.log(low), math.log(high))
        self.meta = meta or {}

    @property
    def feature_names(self) -> list[str]:
        return ["log_prompt_tokens", "deadline"] + [f"pred_{t}" for t in self.target_names]

    @classmethod
    def fit(
        cls, rows: Sequence[dict], deadline_range_s: tuple[float, float], seed: int = 0
    ) -> ProblemFeaturizer:
        """Fit on profile rows (``problem``, ``prompt_tokens`` and the recorded outcomes).

        Each target's ridge penalty is picked on a random 20% holdout, then all rows are refit.
        """
        methods = sorted({m for r in rows for m in r["accept"]})
        targets = training_targets(rows, methods)
        names = list(targets)
        y = np.column_stack([targets[n] for n in names])
        x = text_design([r["problem"] for r in rows], [r["prompt_tokens"] for r in rows])
        holdout = np.random.default_rng(seed).random(len(rows)) < 0.2
        fit_part = _Ridge(x[~holdout], y[~holdout])
        r2, penalties = [], []
        for j in range(len(names)):
            errors = [
                np.mean((fit_part.predict(x[holdout], lam)[:, j] - y[holdout, j]) ** 2)
                for lam in RIDGE_PENALTIES
            ]
            best = int(np.argmin(errors))
            penalties.append(RIDGE_PENALTIES[best])
            r2.append(1.0 - errors[best] / max(np.var(y[holdout, j]), 1e-12))
        full = _Ridge(x, y)
        weights = np.column_stack([full.weights(lam)[:, j] for j, lam in enumerate(penalties)])
        log_prompt = np.log(np.maximum([r["prompt_tokens"] for r in rows], 1))
        scales = {
            "log_prompt_tokens": (log_prompt.mean(), log_prompt.std() + 1e-6),
            "log_mean_tokens": (
                targets["log_mean_tokens"].mean(),
                targets["log_mean_tokens"].std() + 1e-6,
            ),
        }
        meta = {
            "num_problems": len(rows),
            "holdout_r2": dict(zip(names, map(float, r2), strict=True)),
            "ridge_penalty": dict(zip(names, penalties, strict=True)),
        }
        return cls(weights, full.x_mean, full.y_mean, names, scales, deadline_range_s, meta)

    def predict(self, texts: Sequence[str], prompt_tokens: Sequence[int]) -> np.ndarray:
        """Raw predictions, one row per problem, columns as ``target_names`` (clipped)."""
        raw = (text_design(texts, prompt_tokens) - self.x_mean) @ self.weights + self.y_mean
        for j, name in enumerate(self.target_names):
            low, high = _TARGET_RANGES.get(name, (0.0, 1.0))
            raw[:, j] = np.clip(raw[:, j], low, high)
        return raw

    def problem_features(
        self,
        texts: Sequence[str],
        prompt_tokens: Sequence[int],
        predictions: np.ndarray | None = None,
    ) -> np.ndarray:
        """The observation without its deadline feature: one float32 row per problem.

        ``predictions`` (``predict``'s output for the same problems) saves recomputing them.
        """
        pred = self.predict(texts, prompt_tokens) if predictions is None else predictions
        columns = [self._standard("log_prompt_tokens", np.log(np.maximum(prompt_tokens, 1)))]
        for j, name in enumerate(self.target_names):
            if name == "level":
                columns.append((pred[:, j] - 3.0) / 2.0)
            elif name == "log_mean_tokens":
                columns.append(self._standard(name, pred[:, j]))
            else:
                columns.append(2.0 * pred[:, j] - 1.0)
        out = np.column_stack(columns)
        return np.clip(out, -OBS_BOUND, OBS_BOUND).astype(np.float32)

    def deadline_feature(self, deadline_s: float) -> float:
        low, high = self._log_deadline_range
        value = 2.0 * (math.log(deadline_s) - low) / (high - low) - 1.0
        return min(max(value, -OBS_BOUND), OBS_BOUND)

    def transform(self, problem_text: str, prompt_tokens: int, deadline_s: float) -> np.ndarray:
        """The observation vector of one (problem, deadline), ordered as ``feature_names``."""
        problem = self.problem_features([problem_text], [prompt_tokens])[0]
        return np.insert(problem, 1, self.deadline_feature(deadline_s)).astype(np.float32)

    def _standard(self, name: str, values: np.ndarray) -> np.ndarray:
        mean, std = self.scales[name]
        return (np.asarray(values, dtype=float) - mean) / std

    def save(self, folder: Path) -> None:
        """Write ``featurizer.json`` (schema, names, scales) and ``featurizer.npz`` (weights)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "featurizer.npz", weights=self.weights, x_mean=self.x_mean,
                 y_mean=self.y_mean)  # fmt: skip
        info = {
            "feature_schema_version": FEATURE_SCHEMA_VERSION,
            "hash_dim": HASH_DIM,
            "feature_names": self.feature_names,
            "target_names": self.target_names,
            "scales": self.scales,
            "deadline_range_s": list(self.deadline_range_s),
            "meta": self.meta,
        }
        (folder / "featurizer.json").write_text(json.dumps(info, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> ProblemFeaturizer:
        """Load a saved featurizer; a different feature schema version is an error."""
        info = json.loads((Path(folder) / "featurizer.json").read_text())
        remedy = "Retrain the policy with this code."
        check_feature_schema(info.get("feature_schema_version"), f"featurizer in {folder}", remedy)
        if info.get("hash_dim") != HASH_DIM:
            raise ValueError(
                f"featurizer in {folder} hashes text into {info.get('hash_dim')} buckets; this "
                f"code uses {HASH_DIM}. {remedy}"
            )
        arrays = np.load(Path(folder) / "featurizer.npz")
        return cls(arrays["weights"], arrays["x_mean"], arrays["y_mean"], info["target_names"],
                   {k: tuple(v) for k, v in info["scales"].items()},
                   tuple(info["deadline_range_s"]), info["meta"])  # fmt: skip


class _Ridge:
    """Ridge regression on centred data; the Gram matrix is shared by all penalties."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x_mean, self.y_mean = x.mean(axis=0), y.mean(axis=0)
        xc = x - self.x_mean
        self._gram = xc.T @ xc
        self._xty = xc.T @ (y - self.y_mean)
        self._solved: dict[float, np.ndarray] = {}

    def weights(self, penalty: float) -> np.ndarray:
        if penalty not in self._solved:
            system = self._gram + penalty * np.eye(len(self._gram))
            self._solved[penalty] = np.linalg.solve(system, self._xty)
        return self._solved[penalty]

    def predict(self, x: np.ndarray, penalty: float) -> np.ndarray:
        return (x - self.x_mean) @ self.weights(penalty) + self.y_mean
