"""Baselines a learned allocation policy is measured against, and the bound it cannot pass.

- ``plain``: one branch, no speculation; what a caller gets without test-time scaling.
- ``static_best``: one (n, k) per deadline, the most accurate on the training problems (ties:
  the faster), waiting until the deadline.  This is the published method (Wang et al. 2025
  pick one configuration per latency budget by search); the learned policy must match or beat
  it at every deadline.
- ``static_budget``: the same search over the policy's whole action space, (n, k, budget):
  one allocation per deadline that may stop before the deadline (only where stopping early is
  more accurate on the training problems by 2 standard errors).  Not published; it shows
  how much of the policy's lead comes from per-problem choices rather than from the budget.
- ``max_fit``: the largest n, with its fastest k, whose predicted latency fits the deadline,
  predicting latency from the latency model with the featurizer's predicted response length and
  acceptance.  A hand-written per-problem rule that needs no training beyond the featurizer.
- ``oracle``: per problem and draw, the best (n, k, budget) in hindsight (every action
  replayed on the same branches).  Not deployable; an upper bound for the gap-closed figure.

An allocator maps problems and a deadline to one ``Allocation`` (n, k, budget) per problem;
``run_allocation`` runs the chosen actions with per-(problem, repeat) seeded draws, so every
method at every deadline sees the same recorded branches (common random numbers) and
differences come from the actions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from tqdm import tqdm

from env.backends.protocol import Outcome
from env.backends.replay import ReplayBackend
from env.latency_model import LatencyModel, tokens_per_step
from env.tts_env import Allocation, LatencyTTSEnv


class Allocator(Protocol):
    """Chooses an allocation (n, k, budget) per problem for one deadline."""

    name: str

    def choose(
        self, env: LatencyTTSEnv, problems: Sequence[int], deadline_s: float
    ) -> list[Allocation]: ...


def draw_rng(seed: int, problem: int, repeat: int) -> np.random.Generator:
    """The generator of one evaluation draw; equal keys give equal branches for every action
    (and every deadline)."""
    return np.random.default_rng([seed, problem, repeat])


def run_allocation(
    env: LatencyTTSEnv,
    actions: Sequence[Allocation],
    problems: Sequence[int],
    deadline_s: float,
    repeats: int,
    seed: int,
) -> list[Outcome]:
    """Outcomes of running ``actions[i]`` on ``problems[i]``, ``repeats`` draws each."""
    return [
        env.run(p, action, deadline_s, draw_rng(seed, p, r))
        for p, action in zip(problems, actions, strict=True)
        for r in range(repeats)
    ]


def all_allocations(env: LatencyTTSEnv, budgets: Sequence[float] | None = None) -> list:
    """Every (n, k, budget) of the environment's grids (``budgets`` restricts the budgets)."""
    return [
        Allocation(n, k, b)
        for n in env.n_grid
        for k in env.k_grid
        for b in (env.budget_grid if budgets is None else budgets)
    ]


def replay_allocations(
    backend: ReplayBackend,
    problem: int,
    allocations: Sequence[Allocation],
    deadlines_s: Sequence[float],
    draw: tuple[int, int, int],
) -> list[list[Outcome]]:
    """Outcomes per allocation per deadline on one problem; every (n, k) replays the draw
    ``draw_rng(*draw)`` at all budgets and deadlines (common random numbers)."""
    by_nk: dict[tuple[int, int], list[Allocation]] = {}
    for allocation in allocations:
        by_nk.setdefault((allocation.n, allocation.k), []).append(allocation)
    outcomes: dict[Allocation, list[Outcome]] = {}
    for (n, k), group in by_nk.items():
        stops = [a.budget * d for a in group for d in deadlines_s]
        flat = backend.run_deadlines(problem, n, k, stops, draw_rng(*draw))
        for i, allocation in enumerate(group):
            outcomes[allocation] = flat[i * len(deadlines_s) : (i + 1) * len(deadlines_s)]
    return [outcomes[a] for a in allocations]


def reward_of(outcome: Outcome, deadline_s: float, latency_cost: float) -> float:
    """The environment's reward for an outcome."""
    return float(outcome.correct) - latency_cost * outcome.latency_s / deadline_s


class PlainAllocator:
    """One branch without speculation (the smallest k when 0 is not offered)."""

    name = "plain"

    def choose(self, env: LatencyTTSEnv, problems: Sequence[int], deadline_s: float):
        return [Allocation(1, min(env.k_grid))] * len(problems)


class StaticBestAllocator:
    """One allocation per deadline, chosen on training problems (see module docstring).

    :param table: deadline seconds -> allocation.  A deadline between table entries uses the
        entry of the largest deadline below it (or the smallest entry).
    :param name: ``static_best`` (budget 1 only, the published method) or ``static_budget``.
    """

    def __init__(self, table: dict[float, Allocation], name: str = "static_best") -> None:
        self.table = {d: Allocation(*a) for d, a in sorted(table.items())}
        self.name = name

    @classmethod
    def fit(
        cls,
        env: LatencyTTSEnv,
        deadlines_s: Sequence[float],
        max_problems: int = 2000,
        seed: int = 0,
        budgets: Sequence[float] | None = (1.0,),
        z: float = 2.0,
    ) -> StaticBestAllocator:
        """Pick, per deadline, the most accurate allocation on up to ``max_problems`` of env's.

        :param budgets: budgets searched: ``(1.0,)`` is the published method; None searches
            the environment's whole budget grid (``static_budget``).
        :param z: with budgets below 1, an allocation that stops early replaces the best one
            that waits only if it is more accurate by ``z`` standard errors of the paired
            per-problem difference: stopping early must be clearly better, not luck of the
            draw on the training problems.

        ``env`` must replay (``ReplayBackend``): every action runs on the same draw per problem.
        """
        return cls.fit_many(env, deadlines_s, [budgets], max_problems, seed, z)[0]

    @classmethod
    def fit_many(
        cls,
        env: LatencyTTSEnv,
        deadlines_s: Sequence[float],
        budget_sets: Sequence[Sequence[float] | None],
        max_problems: int = 2000,
        seed: int = 0,
        z: float = 2.0,
    ) -> list[StaticBestAllocator]:
        """``fit`` for several budget sets from one replay of the training problems."""
        backend: ReplayBackend = env.backend
        rng = np.random.default_rng(seed)
        count = len(backend.problems)
        problems = np.sort(rng.permutation(count)[: min(max_problems, count)]).tolist()
        searched = [tuple(env.budget_grid if b is None else b) for b in budget_sets]
        actions = all_allocations(env, sorted(set().union(*searched)))
        correct = np.zeros((len(problems), len(deadlines_s), len(actions)), dtype=bool)
        latency = np.zeros((len(deadlines_s), len(actions)))
        for row, p in enumerate(tqdm(problems, desc="static baselines", leave=False)):
            runs = replay_allocations(backend, p, actions, deadlines_s, (seed, p, 0))
            for j, outcomes in enumerate(runs):
                correct[row, :, j] = [o.correct for o in outcomes]
                latency[:, j] += [o.latency_s for o in outcomes]
        fitted = []
        for budgets in searched:
            columns = [j for j, a in enumerate(actions) if a.budget in budgets]
            table = {
                float(d): actions[_static_choice(correct[:, i], latency[i], columns, actions, z)]
                for i, d in enumerate(deadlines_s)
            }
            fitted.append(cls(table, "static_best" if budgets == (1.0,) else "static_budget"))
        return fitted

    def action_for(self, deadline_s: float) -> Allocation:
        below = [d for d in self.table if d <= deadline_s + 1e-9]
        return self.table[max(below) if below else min(self.table)]

    def choose(self, env: LatencyTTSEnv, problems: Sequence[int], deadline_s: float):
        return [self.action_for(deadline_s)] * len(problems)


def _static_choice(
    correct: np.ndarray,
    latency: np.ndarray,
    columns: Sequence[int],
    actions: Sequence[Allocation],
    z: float,
) -> int:
    """Column of the most accurate allocation (ties: the faster) among ``columns``, where one
    that stops early must beat the best one that waits by ``z`` paired standard errors.

    :param correct: (problems, allocations) correctness at one deadline.
    :param latency: summed latency per allocation at that deadline.
    """
    accuracy = correct.mean(axis=0)

    def rank(j: int) -> tuple:
        return -accuracy[j], latency[j]

    best = min(columns, key=rank)
    waits = [j for j in columns if actions[j].budget == 1.0]
    if actions[best].budget < 1.0 and waits:
        waiting = min(waits, key=rank)
        diff = correct[:, best].astype(float) - correct[:, waiting]
        se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
        if not (se > 0 and diff.mean() >= z * se):
            best = waiting
    return best


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
        prompt = np.array(
            [env.backend.problems[p].prompt_tokens for p in problems], float
        )
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
            actions.append(Allocation(env.n_grid[i], env.k_grid[int(ks[i])]))
        return actions


def oracle_outcomes(
    env: LatencyTTSEnv,
    problems: Sequence[int],
    deadlines_s: Sequence[float],
    repeats: int,
    seed: int,
) -> list[list[Outcome]]:
    """Per deadline, per problem and draw, the outcome of the best allocation in hindsight.

    Best by the environment's reward (correct first, then faster); ``env`` must replay.
    """
    backend: ReplayBackend = env.backend
    actions = all_allocations(env)
    cost = env.config.latency_cost
    best: list[list[Outcome]] = [[] for _ in deadlines_s]
    for p in tqdm(problems, desc="oracle", leave=False):
        for r in range(repeats):
            runs = replay_allocations(backend, p, actions, deadlines_s, (seed, p, r))
            for i, deadline in enumerate(deadlines_s):
                candidates = [outcomes[i] for outcomes in runs]
                best[i].append(max(candidates, key=lambda o: reward_of(o, deadline, cost)))
    return best
