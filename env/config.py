"""The environment's settings that a saved policy depends on, and the reward they define.

Kept apart from the Gymnasium environment (``env.tts_env``) because a saved policy stores them
(``policies.saved_policy``) and the serving path reads them back without importing Gymnasium or
the training code.  ``call_reward`` is the one place the reward is computed: both
environments' configs, the evaluation and the oracle baseline call it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from env.race import DEFAULT_CHECKPOINTS

if TYPE_CHECKING:
    from env.backends.protocol import Outcome

ENV_ID = "LatencyTTS-v0"
"""Gymnasium id of the environment replaying a recorded profile (deterministic); a saved policy
records it as the layout of its observations and actions."""
LIVE_ENV_ID = "LatencyTTSLive-v0"
"""Gymnasium id of the same environment on the live engine (registered nondeterministic)."""
RACE_ENV_ID = "LatencyTTS-v1"
"""Gymnasium id of the sequential environment (``env.race_env``): the policy decides while the
call runs; policies of v0 (one decision per problem) must be retrained for it."""
DEFAULT_BUDGET_GRID = (0.25, 0.35, 0.5, 0.7, 1.0)


def call_reward(outcome: Outcome, deadline_s: float, latency_cost: float) -> float:
    """``1{voted answer correct} - latency_cost * latency_s / deadline_s``: the one reward of a
    call.  Right in time first, then faster (only branches finished in time vote, so a correct
    answer is in time; the penalty is at most ``latency_cost``)."""
    return float(outcome.correct) - latency_cost * outcome.latency_s / deadline_s


def _to_dict(config) -> dict:
    return asdict(config)


def _from_dict(cls, data: dict):
    """The config a ``to_dict`` wrote (lists back to tuples; unknown keys ignored)."""
    known = {f.name for f in fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
    return cls(**values)


@dataclass
class EnvConfig:
    """Settings of ``LatencyTTSEnv`` that a saved policy depends on (stored beside it).

    :param n_grid: branch counts the first action component selects from; None: powers of two
        up to the backend's ``max_branches`` (1, 2, 4, ..., 64 for 64 recorded branches).
    :param k_grid: draft lengths the second component selects from; None: the backend's.
    :param budget_grid: shares of the deadline the third component selects from, in (0, 1]
        and including 1.0; the call stops at ``budget * deadline``.
    :param deadline_range_s: (low, high): deadlines are drawn log-uniformly from it; None: the
        featurizer's ``deadline_range_s``.
    :param deadline_choices_s: when set, deadlines are drawn uniformly from these values (e.g.
        the evaluation grid) instead of from the range; the range still scales the feature.
    :param latency_cost: reward penalty per unit of ``latency_s / deadline_s``.
    :param sweep_deadlines_s: when set, ``reset()`` without options walks every problem at each
        of these deadlines in a fixed order with fixed draws instead of sampling, so repeated
        evaluations (e.g. SB3's ``EvalCallback``) score the same episodes.
    :param sweep_seed: seed of the sweep's draws.
    """

    n_grid: tuple[int, ...] | None = None
    k_grid: tuple[int, ...] | None = None
    budget_grid: tuple[float, ...] = DEFAULT_BUDGET_GRID
    deadline_range_s: tuple[float, float] | None = None
    deadline_choices_s: tuple[float, ...] | None = None
    latency_cost: float = 0.01
    sweep_deadlines_s: tuple[float, ...] | None = None
    sweep_seed: int = 0

    def reward(self, outcome: Outcome, deadline_s: float) -> float:
        """The call's reward (``call_reward``)."""
        return call_reward(outcome, deadline_s, self.latency_cost)

    to_dict = _to_dict
    from_dict = classmethod(_from_dict)


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
    """

    n_grid: tuple[int, ...] | None = None
    k_grid: tuple[int, ...] | None = None
    deadline_range_s: tuple[float, float] | None = None
    deadline_choices_s: tuple[float, ...] | None = None
    latency_cost: float = 0.1
    checkpoints: tuple[float, ...] = DEFAULT_CHECKPOINTS

    def reward(self, outcome: Outcome, deadline_s: float) -> float:
        """The call's reward (``call_reward``)."""
        return call_reward(outcome, deadline_s, self.latency_cost)

    to_dict = _to_dict
    from_dict = classmethod(_from_dict)
