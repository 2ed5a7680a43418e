"""The environment's settings that a saved policy depends on, and the reward they define.

Kept apart from the Gymnasium environment (``env.race_env``) because a saved policy stores them
(``policies.saved_policy``) and the serving path reads them back without importing Gymnasium or
the training code.  ``call_reward`` is the one place the reward is computed: the environment's
config, validation and the evaluation call it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from env.race import DEFAULT_CHECKPOINTS

if TYPE_CHECKING:
    from env.backends.protocol import Outcome

RACE_ENV_ID = "LatencyTTS-v1"
"""Gymnasium id of the environment (``env.race_env``): the policy decides while the call runs.
v0 decided once per problem (n, k, budget); its policies must be retrained (a saved policy
records the id as the layout of its observations and actions)."""
LOAD_PRESETS = {"none": "0", "mixed": "0:5,8,16,32,64,128"}
"""Named load distributions (``LoadDistribution.parse``).  ``mixed``: half the calls find the
engine idle, the other half share it with 8, 16, 32, 64 or 128 other branches (equally likely:
from a few single-branch calls to two calls of 64 branches, log-uniform because step time and
the choice of k change with the batch's order of magnitude)."""


def call_reward(outcome: Outcome, deadline_s: float, latency_cost: float) -> float:
    """``1{voted answer correct} - latency_cost * latency_s / deadline_s``: the one reward of a
    call.  Right in time first, then faster (only branches finished in time vote, so a correct
    answer is in time; the penalty is at most ``latency_cost``)."""
    return float(outcome.correct) - latency_cost * outcome.latency_s / deadline_s


@dataclass(frozen=True)
class LoadDistribution:
    """How many other calls' branches (the load L) a replayed call shares the engine with.

    A discrete distribution over load levels, drawn once per call: the load is held for the
    whole call (the background calls are taken to start and finish at a steady rate, so the
    batch they occupy stays about the same while this call runs).  Written as a string so
    that a config stores it as is: ``"L1:w1,L2:w2,..."`` (a level without ``:w`` has weight
    1; weights are normalised), a single level such as ``"64"`` for a fixed load, or a name of
    ``LOAD_PRESETS``.

    :param levels: background branches of each level (>= 0).
    :param weights: each level's probability (normalised by ``parse``).
    """

    levels: tuple[int, ...]
    weights: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str | None) -> LoadDistribution | None:
        """The distribution ``spec`` describes, or None for no load (None, "none", "0")."""
        spec = LOAD_PRESETS.get(spec, spec) if spec is not None else None
        if spec is None or spec.strip() == "0":
            return None
        levels, weights = [], []
        for item in spec.split(","):
            level, _, weight = item.strip().partition(":")
            levels.append(int(level))
            weights.append(float(weight) if weight else 1.0)
        if min(levels) < 0 or min(weights) <= 0 or len(set(levels)) != len(levels):
            raise ValueError(f"load distribution {spec!r}: levels must be distinct and >= 0, "
                             "weights > 0")  # fmt: skip
        total = sum(weights)
        return cls(tuple(levels), tuple(w / total for w in weights))

    def __post_init__(self) -> None:
        object.__setattr__(self, "_cumulative", np.cumsum(self.weights))

    def draw(self, rng: np.random.Generator) -> int:
        """One call's load: a level with its probability (one uniform draw from ``rng``)."""
        slot = int(np.searchsorted(self._cumulative, rng.random() * self._cumulative[-1], "right"))
        return self.levels[min(slot, len(self.levels) - 1)]


def _to_dict(config) -> dict:
    return asdict(config)


def _from_dict(cls, data: dict):
    """The config a ``to_dict`` wrote (lists back to tuples; unknown keys ignored)."""
    known = {f.name for f in fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
    return cls(**values)


@dataclass
class RaceEnvConfig:
    """Settings of ``RaceEnv`` a saved policy depends on (stored beside it).

    :param n_grid: branch counts the first action component selects at the start; None:
        powers of two up to the backend's ``max_branches``.
    :param k_grid: draft lengths the second component selects at every decision; None: the
        backend's.
    :param deadline_range_s: (low, high) log-uniform range of training deadlines; None: the
        featurizer's.
    :param deadline_choices_s: when set, deadlines are drawn uniformly from these values.
    :param latency_cost: reward penalty per unit of ``latency_s / deadline_s``.
    :param checkpoints: fractions of the deadline at which the race pauses for a decision
        when no branch finished since the last one.
    :param load_distribution: background load of the replayed calls (``LoadDistribution``
        spec, e.g. ``"mixed"``), drawn once per episode; None: an idle engine, as recorded.
    :param observe_load: whether the observation's ``load`` feature reports the drawn load
        (False: the race still runs under it, the feature stays 0; a load-blind ablation).
    """

    n_grid: tuple[int, ...] | None = None
    k_grid: tuple[int, ...] | None = None
    deadline_range_s: tuple[float, float] | None = None
    deadline_choices_s: tuple[float, ...] | None = None
    latency_cost: float = 0.1
    checkpoints: tuple[float, ...] = DEFAULT_CHECKPOINTS
    load_distribution: str | None = None
    observe_load: bool = True

    def reward(self, outcome: Outcome, deadline_s: float) -> float:
        """The call's reward (``call_reward``)."""
        return call_reward(outcome, deadline_s, self.latency_cost)

    to_dict = _to_dict
    from_dict = classmethod(_from_dict)
