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

Each baseline is a ``policies.allocator.Allocator``.  Those chosen in hindsight (the static
tables, the oracle) search by replaying every action on the same draw of branches, so they take
the ``ReplayBackend`` to search on explicitly.  This module also owns the deadline grid the
baselines and the policy are compared on (``default_deadlines``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from env.allocation import ActionGrids, Allocation, AllocationRequest
from env.backends.protocol import Outcome
from env.backends.replay import ReplayBackend
from env.latency_model import LatencyModel, StepTableKey, tokens_per_step
from policies.allocator import draw_rng


def default_deadlines(backend: ReplayBackend, count: int = 8) -> tuple[float, ...]:
    """A geometric deadline grid spanning where (n, k) matters on this profile.

    From the 20th percentile of the fastest single-branch latency (below it nearly nothing can
    answer) to the 90th percentile of the fastest all-branch latency (above it everything fits),
    over up to 300 problems; rounded to two significant digits.
    """
    problems = range(min(len(backend.problems), 300))
    everything = np.arange(backend.max_branches)
    single = [min(backend.finish_times(p, everything[:1], k)[0] for k in backend.k_grid)
              for p in problems]  # fmt: skip
    full = [min(backend.finish_times(p, everything, k).max() for k in backend.k_grid)
            for p in problems]  # fmt: skip
    grid = np.geomspace(np.quantile(single, 0.2), np.quantile(full, 0.9), count)
    return tuple(float(f"{d:.2g}") for d in grid)


def replay_allocations(
    backend: ReplayBackend,
    problem: int,
    allocations: Sequence[Allocation],
    deadlines_s: Sequence[float],
    draw: tuple[int, int, int],
) -> list[list[Outcome]]:
    """Outcomes per allocation per deadline on one problem; every (n, k) replays the draw
    ``draw_rng(*draw)`` once, stopped at every budget and deadline (common random numbers)."""
    by_nk: dict[tuple[int, int], list[Allocation]] = {}
    for allocation in allocations:
        by_nk.setdefault((allocation.n, allocation.k), []).append(allocation)
    outcomes: dict[Allocation, list[Outcome]] = {}
    for (n, k), group in by_nk.items():
        stops = [a.stop_s(d) for a in group for d in deadlines_s]
        flat = backend.run_one_draw(problem, n, k, stops, draw_rng(*draw))
        for i, allocation in enumerate(group):
            outcomes[allocation] = flat[i * len(deadlines_s) : (i + 1) * len(deadlines_s)]
    return [outcomes[a] for a in allocations]


class PlainAllocator:
    """One branch without speculation (the smallest k when 0 is not offered).

    :param grids: the action grids (only the k grid matters).
    """

    name = "plain"

    def __init__(self, grids: ActionGrids) -> None:
        self.allocation = Allocation(1, min(grids.k))

    def allocate(self, request: AllocationRequest) -> list[Allocation]:
        return [self.allocation] * len(request.problems)


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
        backend: ReplayBackend,
        grids: ActionGrids,
        deadlines_s: Sequence[float],
        max_problems: int = 2000,
        seed: int = 0,
        budgets: Sequence[float] | None = (1.0,),
        z: float = 2.0,
    ) -> StaticBestAllocator:
        """Pick, per deadline, the most accurate allocation on up to ``max_problems`` of the
        backend's problems; every action runs on the same draw per problem.

        :param grids: the action space searched (the environment's ``grids``).
        :param budgets: budgets searched: ``(1.0,)`` is the published method; None searches
            the whole budget grid (``static_budget``).
        :param z: with budgets below 1, an allocation that stops early replaces the best one
            that waits only if it is more accurate by ``z`` standard errors of the paired
            per-problem difference: stopping early must be clearly better, not luck of the
            draw on the training problems.
        """
        return cls.fit_many(backend, grids, deadlines_s, [budgets], max_problems, seed, z)[0]

    @classmethod
    def fit_many(
        cls,
        backend: ReplayBackend,
        grids: ActionGrids,
        deadlines_s: Sequence[float],
        budget_sets: Sequence[Sequence[float] | None],
        max_problems: int = 2000,
        seed: int = 0,
        z: float = 2.0,
    ) -> list[StaticBestAllocator]:
        """``fit`` for several budget sets from one replay of the training problems."""
        rng = np.random.default_rng(seed)
        count = len(backend.problems)
        problems = np.sort(rng.permutation(count)[: min(max_problems, count)]).tolist()
        searched = [tuple(grids.budget if b is None else b) for b in budget_sets]
        actions = grids.allocations(sorted(set().union(*searched)))
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

    def allocate(self, request: AllocationRequest) -> list[Allocation]:
        return [self.action_for(request.deadline_s)] * len(request.problems)


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


@dataclass(frozen=True)
class StaticBaselines:
    """The static tables a policy is compared with, chosen on the same training problems.

    :param best: ``static_best``, the published method (waits until the deadline).
    :param budgeted: ``static_budget``, the search over (n, k, budget); None when the action
        space has no budget below 1.
    """

    best: StaticBestAllocator
    budgeted: StaticBestAllocator | None = None

    @property
    def allocators(self) -> list[StaticBestAllocator]:
        """The tables to evaluate, ``static_best`` first."""
        return [self.best] + ([self.budgeted] if self.budgeted else [])

    @property
    def best_over_all_actions(self) -> StaticBestAllocator:
        """The table searched over the whole action space (what the warm start imitates)."""
        return self.budgeted or self.best


def fit_statics(
    backend: ReplayBackend,
    grids: ActionGrids,
    deadlines_s: Sequence[float],
    max_problems: int = 2000,
    seed: int = 0,
) -> StaticBaselines:
    """The published static best and, when ``grids`` offer budgets below 1, the static best
    over (n, k, budget); both chosen on ``backend``'s (training) problems from one replay."""
    budget_sets = [(1.0,)] + ([None] if len(grids.budget) > 1 else [])
    fitted = StaticBestAllocator.fit_many(
        backend, grids, deadlines_s, budget_sets, max_problems, seed
    )
    return StaticBaselines(*fitted)


class MaxFitAllocator:
    """Largest n (with its fastest k) whose predicted latency fits the deadline.

    Latency is predicted as if all n branches generate the predicted mean response length at
    the predicted acceptance; when nothing fits, one branch at its fastest k.

    :param latency_model: the engine's latency model (the profile's).
    :param step_table_key: maps k to the step table timing it (``ReplayBackend.step_table_key``).
    :param accept_method: speculative method whose predicted acceptance applies.
    :param grids: the action grids it chooses n and k from (budget is always 1).
    """

    name = "max_fit"

    def __init__(
        self,
        latency_model: LatencyModel,
        step_table_key: Callable[[int], StepTableKey],
        accept_method: str,
        grids: ActionGrids,
    ) -> None:
        self.latency_model, self.step_table_key = latency_model, step_table_key
        self.accept_method, self.grids = accept_method, grids

    def predicted_latency(self, request: AllocationRequest) -> np.ndarray:
        """Predicted seconds per problem, n and k: shape (problems, len(n grid), len(k grid))."""
        tokens = np.exp(request.prediction("log_mean_tokens"))
        alpha = request.prediction(f"accept_{self.accept_method}")
        if alpha is None:
            alpha = np.zeros(len(request.problems))
        prompt = np.array([p.prompt_tokens for p in request.problems], float)
        model, n_grid, k_grid = self.latency_model, self.grids.n, self.grids.k
        out = np.empty((len(request.problems), len(n_grid), len(k_grid)))
        for j, k in enumerate(k_grid):
            method, table_k = self.step_table_key(k)
            steps = np.ceil(tokens / np.array([tokens_per_step(a, table_k) for a in alpha]))
            for i, n in enumerate(n_grid):
                step_s = float(model.step_time(n, table_k, method))
                prefill = np.array([model.prefill_time(p, n) for p in prompt])
                out[:, i, j] = model.call_overhead_s + prefill + steps * step_s
        return out

    def allocate(self, request: AllocationRequest) -> list[Allocation]:
        latency = self.predicted_latency(request)
        fastest_k = latency.argmin(axis=2)  # (problems, n)
        best = latency.min(axis=2)
        n_grid, k_grid = self.grids.n, self.grids.k
        actions = []
        for row, ks in zip(best, fastest_k, strict=True):
            fitting = np.flatnonzero(row <= request.deadline_s)
            i = int(fitting.max()) if len(fitting) else int(np.argmin(n_grid))
            actions.append(Allocation(n_grid[i], k_grid[int(ks[i])]))
        return actions


def oracle_outcomes(
    backend: ReplayBackend,
    grids: ActionGrids,
    reward: Callable[[Outcome, float], float],
    problems: Sequence[int],
    deadlines_s: Sequence[float],
    repeats: int,
    seed: int,
) -> list[list[Outcome]]:
    """Per deadline, per problem and draw, the outcome of the best allocation in hindsight.

    Best by ``reward`` (the environment's ``EnvConfig.reward``: correct first, then faster),
    over every allocation of ``grids`` replayed on the draw ``draw_rng(seed, problem, repeat)``.
    """
    actions = grids.allocations()
    best: list[list[Outcome]] = [[] for _ in deadlines_s]
    for p in tqdm(problems, desc="oracle", leave=False):
        for r in range(repeats):
            runs = replay_allocations(backend, p, actions, deadlines_s, (seed, p, r))
            for i, deadline in enumerate(deadlines_s):
                candidates = [outcomes[i] for outcomes in runs]
                best[i].append(max(candidates, key=lambda o: reward(o, deadline)))
    return best
