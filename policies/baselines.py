"""Baselines a learned allocation policy is measured against, and the bound it cannot pass.

- ``plain``: one branch, no speculation; what a caller gets without test-time scaling.
- ``static_best``: one (n, k) per deadline, the most accurate on the training problems (ties:
  the faster).  This is the published method (Wang et al. 2025 pick one configuration per
  latency budget by search); the learned policy must match or beat it at every deadline.
- ``max_fit``: the largest n, with its fastest k, whose predicted latency fits the deadline,
  predicting latency from the latency model with the featurizer's predicted response length and
  acceptance.  A hand-written per-problem rule that needs no training beyond the featurizer.
- ``oracle``: per problem and draw, the best action in hindsight (every action replayed on the
  same branches).  Not deployable; an upper bound for the gap-closed figure.

An allocator maps problems and a deadline to one (n, k) per problem; ``run_allocation`` runs
the chosen actions with per-(problem, repeat) seeded draws, so every method at every deadline
sees the same recorded branches (common random numbers) and differences come from the actions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from tqdm import tqdm

from env.backend import Outcome
from env.latency_model import LatencyModel, tokens_per_step
from env.replay_backend import ReplayBackend
from env.tts_env import LatencyTTSEnv


class Allocator(Protocol):
    """Chooses (n, k) per problem for one deadline."""

    name: str

    def choose(
        self, env: LatencyTTSEnv, problems: Sequence[int], deadline_s: float
    ) -> list[tuple[int, int]]: ...


def draw_rng(seed: int, problem: int, repeat: int) -> np.random.Generator:
    """The generator of one evaluation draw; equal keys give equal branches for every action
    (and every deadline)."""
    return np.random.default_rng([seed, problem, repeat])


def run_allocation(
    env: LatencyTTSEnv,
    actions: Sequence[tuple[int, int]],
    problems: Sequence[int],
    deadline_s: float,
    repeats: int,
    seed: int,
) -> list[Outcome]:
    """Outcomes of running ``actions[i]`` on ``problems[i]``, ``repeats`` draws each."""
    return [
        env.backend.run(p, n, k, deadline_s, draw_rng(seed, p, r))
        for p, (n, k) in zip(problems, actions, strict=True)
        for r in range(repeats)
    ]


def reward_of(outcome: Outcome, deadline_s: float, latency_cost: float) -> float:
    """The environment's reward for an outcome."""
    return float(outcome.correct) - latency_cost * outcome.latency_s / deadline_s


class PlainAllocator:
    """One branch without speculation (the smallest k when 0 is not offered)."""

    name = "plain"

    def choose(self, env: LatencyTTSEnv, problems: Sequence[int], deadline_s: float):
        return [(1, min(env.k_grid))] * len(problems)


class StaticBestAllocator:
    """One (n, k) per deadline, chosen on training problems (see module docstring).

    :param table: deadline seconds -> (n, k).  A deadline between table entries uses the entry
        of the largest deadline below it (or the smallest entry).
    """

    name = "static_best"

    def __init__(self, table: dict[float, tuple[int, int]]) -> None:
        self.table = dict(sorted(table.items()))

    @classmethod
    def fit(
        cls,
        env: LatencyTTSEnv,
        deadlines_s: Sequence[float],
        max_problems: int = 2000,
        seed: int = 0,
    ) -> StaticBestAllocator:
        """Pick, per deadline, the most accurate action on up to ``max_problems`` of env's.

        ``env`` must replay (``ReplayBackend``): every action runs on the same draw per problem.
        """
        backend: ReplayBackend = env.backend
        rng = np.random.default_rng(seed)
        count = len(backend.problems)
        problems = np.sort(rng.permutation(count)[: min(max_problems, count)]).tolist()
        actions = [(n, k) for n in env.n_grid for k in env.k_grid]
        correct = np.zeros((len(deadlines_s), len(actions)))
        latency = np.zeros_like(correct)
        for p in tqdm(problems, desc="static best (training problems)", leave=False):
            for j, (n, k) in enumerate(actions):
                outcomes = backend.run_deadlines(p, n, k, deadlines_s, draw_rng(seed, p, 0))
                correct[:, j] += [o.correct for o in outcomes]
                latency[:, j] += [o.latency_s for o in outcomes]
        table = {}
        for i, deadline in enumerate(deadlines_s):
            best = min(range(len(actions)), key=lambda j: (-correct[i, j], latency[i, j]))
            table[float(deadline)] = actions[best]
        return cls(table)

    def action_for(self, deadline_s: float) -> tuple[int, int]:
        below = [d for d in self.table if d <= deadline_s + 1e-9]
        return self.table[max(below) if below else min(self.table)]

    def choose(self, env: LatencyTTSEnv, problems: Sequence[int], deadline_s: float):
        return [self.action_for(deadline_s)] * len(problems)


class MaxFitAllocator:
    """Largest n (with its fastest k) whose predicted latency fits the deadline.

    Latency is predicted as if all n branches generate the predicted mean response length at
    the predicted acceptance; when nothing fits, one branch at its fastest k.

    :param latency_model: the engine's latency model (the profile's).
    :param timing: maps k to the (method, k) table timing it (``ReplayBackend.timing``).
    :param accept_method: speculative method whose predicted acceptance applies.
    """

    name = "max_fit"

    def __init__(
        self,
        latency_model: LatencyModel,
        timing: Callable[[int], tuple[str, int]],
        accept_method: str,
    ) -> None:
        self.latency_model, self.timing, self.accept_method = latency_model, timing, accept_method

    def predicted_latency(self, env: LatencyTTSEnv, problems: Sequence[int]) -> np.ndarray:
        """Predicted seconds per problem, n and k: shape (problems, len(n_grid), len(k_grid))."""
        names = env.featurizer.target_names
        pred = env.predictions[list(problems)]
        tokens = np.exp(pred[:, names.index("log_mean_tokens")])
        column = f"accept_{self.accept_method}"
        alpha = pred[:, names.index(column)] if column in names else np.zeros(len(problems))
        prompt = np.array([env.backend.problems[p].prompt_tokens for p in problems], float)
        model = self.latency_model
        out = np.empty((len(problems), len(env.n_grid), len(env.k_grid)))
        for j, k in enumerate(env.k_grid):
            method, table_k = self.timing(k)
            steps = np.ceil(tokens / np.array([tokens_per_step(a, table_k) for a in alpha]))
            for i, n in enumerate(env.n_grid):
                step_s = float(model.step_time(n, table_k, method))
                prefill = np.array([model.prefill_time(p, n) for p in prompt])
                out[:, i, j] = model.call_overhead_s + prefill + steps * step_s
        return out

    def choose(self, env: LatencyTTSEnv, problems: Sequence[int], deadline_s: float):
        latency = self.predicted_latency(env, problems)
        fastest_k = latency.argmin(axis=2)  # (problems, n)
        best = latency.min(axis=2)
        actions = []
        for row, ks in zip(best, fastest_k, strict=True):
            fitting = np.flatnonzero(row <= deadline_s)
            i = int(fitting.max()) if len(fitting) else int(np.argmin(env.n_grid))
            actions.append((env.n_grid[i], env.k_grid[int(ks[i])]))
        return actions


def oracle_outcomes(
    env: LatencyTTSEnv,
    problems: Sequence[int],
    deadlines_s: Sequence[float],
    repeats: int,
    seed: int,
) -> list[list[Outcome]]:
    """Per deadline, per problem and draw, the outcome of the best action in hindsight.

    Best by the environment's reward (correct first, then faster); ``env`` must replay.
    """
    backend: ReplayBackend = env.backend
    actions = [(n, k) for n in env.n_grid for k in env.k_grid]
    cost = env.config.latency_cost
    best: list[list[Outcome]] = [[] for _ in deadlines_s]
    for p in tqdm(problems, desc="oracle", leave=False):
        for r in range(repeats):
            runs = [backend.run_deadlines(p, n, k, deadlines_s, draw_rng(seed, p, r))
                    for n, k in actions]  # fmt: skip
            for i, deadline in enumerate(deadlines_s):
                candidates = [outcomes[i] for outcomes in runs]
                best[i].append(max(candidates, key=lambda o: reward_of(o, deadline, cost)))
    return best
