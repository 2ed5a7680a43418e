"""What one call gets, the (n, k, budget) a controller chooses, and what a controller sees.

Kept apart from the Gymnasium environment (``env.tts_env``) so that the deployed controller and
its server can use it without importing Gymnasium or the training code.  ``Allocation.stop_s``
is the one place the budget becomes a stop time; ``ActionGrids`` maps the environment's
``MultiDiscrete`` actions to allocations and back; ``AllocationRequest`` is everything an
allocator (``policies.allocator.Allocator``) may look at: problems as a deployment sees them,
their observations and predicted traits, and the deadline, but never the backend that runs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from env.backends.protocol import ProblemInfo


class Allocation(NamedTuple):
    """What one call gets: n branches, k drafts per verification step, and the share of the
    deadline it may use (1.0: until the deadline; the published static method always waits)."""

    n: int
    k: int
    budget: float = 1.0

    @classmethod
    def from_action(cls, action, n_grid: tuple, k_grid: tuple, budget_grid: tuple) -> Allocation:
        """The allocation a ``MultiDiscrete`` action selects from the grids it indexes."""
        return cls(n_grid[int(action[0])], k_grid[int(action[1])], budget_grid[int(action[2])])

    def stop_s(self, deadline_s: float) -> float:
        """When the call stops: its budget's share of the deadline (the one place the budget is
        applied; replay, the live engine and the baselines' searches all stop calls here)."""
        return self.budget * deadline_s


class ActionGrids(NamedTuple):
    """The values the three components of an environment action index (``LatencyTTSEnv``).

    :param n: branch counts, indexed by action component 0.
    :param k: draft lengths, component 1 (0: no speculation).
    :param budget: shares of the deadline, component 2, in (0, 1] and including 1.0.
    """

    n: tuple[int, ...]
    k: tuple[int, ...]
    budget: tuple[float, ...]

    def allocation(self, action: Sequence[int] | np.ndarray) -> Allocation:
        """The allocation an action selects."""
        return Allocation.from_action(action, self.n, self.k, self.budget)

    def action(self, allocation: Allocation) -> np.ndarray:
        """The action selecting ``allocation``; ValueError when it is off the grids."""
        n, k, budget = allocation
        return np.array([self.n.index(n), self.k.index(k), self.budget.index(budget)])

    def allocations(self, budgets: Sequence[float] | None = None) -> list[Allocation]:
        """Every (n, k, budget) of the grids (``budgets`` restricts the budgets)."""
        chosen = self.budget if budgets is None else budgets
        return [Allocation(n, k, b) for n in self.n for k in self.k for b in chosen]


@dataclass(frozen=True)
class AllocationRequest:
    """What an allocator sees when asked for one allocation per problem under one deadline.

    Built by ``LatencyTTSEnv.allocation_request``; nothing here depends on how the calls will be
    run, so a controller cannot peek at recorded outcomes.

    :param deadline_s: the deadline of every call in the request.
    :param problems: the problems (text and prompt length, as a deployment sees them).
    :param observations: the policy observation of each problem at this deadline (rows).
    :param predictions: the featurizer's raw predictions per problem (rows), columns named by
        ``prediction_names`` (e.g. ``log_mean_tokens``, ``accept_<method>``).
    :param prediction_names: names of the prediction columns.
    """

    deadline_s: float
    problems: tuple[ProblemInfo, ...]
    observations: np.ndarray
    predictions: np.ndarray
    prediction_names: tuple[str, ...]

    def prediction(self, name: str) -> np.ndarray | None:
        """One predicted trait per problem, or None when the featurizer does not predict it."""
        if name not in self.prediction_names:
            return None
        return self.predictions[:, self.prediction_names.index(name)]
