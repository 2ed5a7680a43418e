"""The interface every allocation controller implements, and the one loop that scores them.

An allocator (the learned policy, the static tables, max-fit, plain) is asked for one
``Allocation`` (n, k, budget) per problem under one deadline and sees only an
``env.allocation.AllocationRequest``: the problems as a deployment sees them, their
observations and the featurizer's predictions.  It never sees the environment or its backend,
so no controller can peek at recorded outcomes and the same controller runs on replay, on the
live engine and behind the server.

``run_episodes`` scores an allocator the way training scores the policy: every allocation runs
through ``LatencyTTSEnv.run_episode`` (the budget and the reward are applied there), with the
draw seeded per (problem, repeat) by ``draw_rng``, so every method at every deadline votes over
the same branches (common random numbers) and differences come from the actions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from env.allocation import Allocation, AllocationRequest
from env.backends.protocol import Outcome
from env.tts_env import LatencyTTSEnv


class Allocator(Protocol):
    """Chooses an allocation (n, k, budget) per problem of a request (one deadline)."""

    name: str
    """What the allocator is called in reports (``policy``, ``static_best``, ...)."""

    def allocate(self, request: AllocationRequest) -> list[Allocation]:
        """One allocation per ``request.problems`` entry, in order."""
        ...


def draw_rng(seed: int, problem: int, repeat: int) -> np.random.Generator:
    """The generator of one evaluation draw; equal keys give equal branches for every action
    (and every deadline)."""
    return np.random.default_rng([seed, problem, repeat])


@dataclass
class Episodes:
    """Scored episodes of one allocator at one deadline: ``repeats`` per problem, in problem
    order (the allocation is repeated for each of its problem's draws)."""

    allocations: list[Allocation]
    outcomes: list[Outcome]
    rewards: list[float]


def run_episodes(
    env: LatencyTTSEnv,
    allocator: Allocator,
    deadline_s: float,
    repeats: int,
    seed: int,
    problems: Sequence[int] | None = None,
) -> Episodes:
    """Ask ``allocator`` once for ``problems`` (default: all of ``env``'s) at ``deadline_s``,
    then run each allocation ``repeats`` times with the draws ``draw_rng(seed, problem, r)``."""
    problems = list(range(len(env.problems))) if problems is None else list(problems)
    chosen = allocator.allocate(env.allocation_request(problems, deadline_s))
    episodes = Episodes([], [], [])
    for p, allocation in zip(problems, chosen, strict=True):
        for r in range(repeats):
            outcome, reward = env.run_episode(p, allocation, deadline_s, draw_rng(seed, p, r))
            episodes.allocations.append(allocation)
            episodes.outcomes.append(outcome)
            episodes.rewards.append(reward)
    return episodes
