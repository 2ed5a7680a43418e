"""Running controllers on replayed races, and tuning the heuristics per deadline.

``run_race`` is the one loop every controller is evaluated with: start the call with the
controller's (n, k), run the replay to each decision point, apply the controller's decision.
Draws are keyed by (seed, problem, repeat) (``draw_rng``), so every method at every deadline
sees the same recorded branches and differences come from the decisions.

Tuning searches every (n, k, threshold) of each heuristic family on the training problems.  A
heuristic with a fixed k decides on votes only, so one replay per (problem, n, k, draw) serves
every threshold and every deadline: ``sweep_rules`` replays the finish sequence once, updates
a ``RaceState`` after each engine step in which branches finished (exactly the race's decision
points) and records when each rule would stop.  Tests check it against ``run_race``.

Under background load (``env.config.LoadDistribution``) every draw also draws its load from its
own stream (``load_rng``), so every method meets the same load on the same draw, and the draws
of branches are those of the idle evaluation.  Tuning at a fixed load needs no parameter: sweep
the backend's view under that load (``ReplayBackend.under_load``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from env.backends.protocol import Outcome
from env.backends.replay import ReplayBackend
from env.backends.replay_race import ReplayRace
from env.config import LoadDistribution
from env.profiles.store import Profile
from env.race import RaceState, begin_call
from policies.race_controllers import RULE_FAMILIES, RaceController, RuleController, StopRule

TUNING_TOLERANCE = 0.005
"""A heuristic's tuned configuration may be this much (0.5 point) less accurate on the
training problems than the static table's best; within that, the fastest wins."""


RULE_SWEEP_LABEL = "tuning sweep (n, k)"
"""``sweep_rules``' progress bar unless its caller names another."""

BASELINE_TUNING_REPEATS = 2
"""Draws per training problem the baselines are tuned on (``train.py``)."""


def draw_rng(seed: int, problem: int, repeat: int) -> np.random.Generator:
    """The generator of one evaluation draw; equal keys give equal branches for every method
    (and every deadline)."""
    return np.random.default_rng([seed, problem, repeat])


def load_rng(seed: int, problem: int, repeat: int) -> np.random.Generator:
    """The generator of one evaluation draw's background load (apart from ``draw_rng``, so
    adding load changes no branch draw)."""
    return np.random.default_rng([seed, problem, repeat, 1])


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


def run_race(
    backend: ReplayBackend,
    controller: RaceController,
    problem: int,
    deadline_s: float,
    rng: np.random.Generator,
    observe_load: bool = True,
) -> Outcome:
    """One call of ``controller`` on a replayed race (the evaluation loop of every method);
    under load when ``backend`` is a view ``under_load(L)``, the controller told L unless
    ``observe_load`` is off."""
    return run_race_with_state(backend, controller, problem, deadline_s, rng, observe_load)[0]


def run_race_with_state(
    backend: ReplayBackend,
    controller: RaceController,
    problem: int,
    deadline_s: float,
    rng: np.random.Generator,
    observe_load: bool = True,
) -> tuple[Outcome, RaceState]:
    """``run_race``, also returning the race's final state (the votes, which ``Outcome``
    does not keep; answer confidence is computed from them)."""
    deadline = controller.call_deadline(deadline_s)
    race = ReplayRace(backend, problem, deadline, rng, observe_load=observe_load)
    n, k = begin_call(controller, backend.problems[problem], deadline_s, race.state)
    race.begin(n, k)
    while not race.done:
        race.advance()
        if race.done:
            break
        decision = controller.decide(race.state)
        if decision.stop:
            race.stop()
        elif decision.k is not None:
            race.set_k(decision.k)
    return race.outcome(), race.state


def evaluate_controller(
    backend: ReplayBackend,
    controller: RaceController,
    deadline_s: float,
    repeats: int,
    seed: int,
    problems: Sequence[int] | None = None,
    load: LoadDistribution | None = None,
    observe_load: bool = True,
) -> list[Outcome]:
    """Outcomes of ``controller`` on every problem (or ``problems``) x ``repeats`` draws, each
    under a background load drawn from ``load`` (None: an idle engine)."""
    problems = range(len(backend.problems)) if problems is None else problems

    def loaded(p: int, r: int) -> ReplayBackend:
        return backend if load is None else backend.under_load(load.draw(load_rng(seed, p, r)))

    return [
        run_race(loaded(p, r), controller, p, deadline_s, draw_rng(seed, p, r), observe_load)
        for p in problems
        for r in range(repeats)
    ]


@dataclass
class SweepResult:
    """Correctness and latency of every rule configuration at every deadline, per draw.

    ``correct[config][d]`` and ``latency[config][d]`` are arrays over (problem, repeat) draws;
    a config is ``(family, threshold, n, k)``.
    """

    deadlines_s: tuple[float, ...]
    correct: dict[tuple, np.ndarray]
    latency: dict[tuple, np.ndarray]

    def accuracy(self, config: tuple, d: int) -> float:
        return float(self.correct[config][d].mean())

    def mean_latency(self, config: tuple, d: int) -> float:
        return float(self.latency[config][d].mean())


def _vote_rules() -> list[tuple[str, float, StopRule]]:
    """(family, threshold, rule) of every family that stops on the votes, built once per sweep."""
    return [(f, t, factory(t)) for f, (factory, ts) in RULE_FAMILIES.items()
            if factory is not None for t in ts]  # fmt: skip


def _stops_of_draw(
    backend: ReplayBackend,
    problem: int,
    n: int,
    k: int,
    rng: np.random.Generator,
    rules: list[tuple[str, float, StopRule]],
) -> tuple[np.ndarray, np.ndarray, dict[tuple, tuple[float, bool]]]:
    """Replay one draw without early stops: the end time of each finishing engine step, whether
    the leader is right after it, and per (family, threshold) the first (time, correct) at
    which its rule stops (the decided vote counts as a stop for every rule)."""
    drawn = backend.branch_order(rng)[:n]
    finish = backend.finish_times(problem, drawn, k)
    order = np.argsort(finish, kind="stable")
    finish, classes = finish[order], backend.branch_classes[problem, drawn[order]]
    right = backend.class_correct[problem]
    state = RaceState(float("inf"), backend.max_branches, max(backend.k_grid))
    state.start(n, k)
    pending = list(rules)
    stops: dict[tuple, tuple[float, bool]] = {}
    times, correct = [], []
    i = 0
    while i < n:
        at = finish[i]
        while i < n and finish[i] == at and not state.tally.decided:
            state.record_finish(int(classes[i]), float(at))
            i += 1
        leader = state.tally.leader
        times.append(float(at))
        correct.append(leader >= 0 and bool(right[leader]))
        if state.tally.decided:
            break
        for entry in list(pending):
            if entry[2](state):
                stops[(entry[0], entry[1])] = (float(at), correct[-1])
                pending.remove(entry)
    decided_at = (times[-1], correct[-1]) if state.tally.decided else (np.inf, False)
    for f, t, _ in pending:
        stops[(f, t)] = decided_at
    stops[("static_best", None)] = decided_at
    return np.asarray(times), np.asarray(correct, dtype=bool), stops


def sweep_rules(
    backend: ReplayBackend,
    deadlines_s: Sequence[float],
    problems: Sequence[int],
    repeats: int,
    seed: int,
    n_grid: Sequence[int],
    k_grid: Sequence[int],
    progress: bool = True,
    pairs: Sequence[tuple[int, int]] | None = None,
    label: str = RULE_SWEEP_LABEL,
) -> SweepResult:
    """Every (family, threshold, n, k) of ``RULE_FAMILIES`` at every deadline, on the draws
    (problem, repeat) of ``problems`` (see the module docstring).  ``pairs``: replay only these
    (n, k) (every pair of the grids when None), for a caller that needs a few configurations
    only; ``label``: the progress bar's."""
    deadlines = np.asarray(deadlines_s, dtype=float)
    draws = [(p, r) for p in problems for r in range(repeats)]
    correct: dict[tuple, np.ndarray] = {}
    latency: dict[tuple, np.ndarray] = {}
    grid = [(n, k) for n in n_grid for k in k_grid] if pairs is None else list(pairs)
    rules = _vote_rules()
    for n, k in tqdm(grid, desc=label, disable=not progress):
        for j, (p, r) in enumerate(draws):
            times, right, stops = _stops_of_draw(backend, p, n, k, draw_rng(seed, p, r), rules)
            for budget in RULE_FAMILIES["static_budget"][1]:
                stops[("static_budget", budget)] = stops[("static_best", None)]
            for (family, threshold), (stop_s, stop_right) in stops.items():
                key = (family, threshold, n, k)
                if key not in correct:
                    correct[key] = np.zeros((len(deadlines), len(draws)), dtype=bool)
                    latency[key] = np.zeros((len(deadlines), len(draws)))
                ends = deadlines * (threshold if family == "static_budget" else 1.0)
                last = times.searchsorted(ends, side="right") - 1
                at_end = np.where(last >= 0, right[np.maximum(last, 0)], False)
                early = stop_s <= ends
                correct[key][:, j] = np.where(early, stop_right, at_end)
                latency[key][:, j] = np.where(early, stop_s, ends)
    return SweepResult(tuple(float(d) for d in deadlines), correct, latency)


def tune_controllers(sweep: SweepResult) -> dict[str, list[RuleController]]:
    """Per family, the tuned controller at each deadline of the sweep.

    ``static_best`` is the most accurate (n, k) (ties: the faster), as the published method
    picks it.  Every other family takes its fastest configuration whose accuracy is within
    ``TUNING_TOLERANCE`` of the static best's on the same draws, or its most accurate one
    when none is; ``plain`` is ``static_best`` restricted to n = 1.
    """
    tuned: dict[str, list[RuleController]] = {name: [] for name in (*RULE_FAMILIES, "plain")}
    for d in range(len(sweep.deadlines_s)):

        def score(c: tuple, d: int = d) -> tuple[float, float]:
            return (sweep.accuracy(c, d), -sweep.mean_latency(c, d))

        statics = [c for c in sweep.correct if c[0] == "static_best"]
        best_static = max(statics, key=score)
        floor = sweep.accuracy(best_static, d) - TUNING_TOLERANCE
        for name in RULE_FAMILIES:
            configs = [c for c in sweep.correct if c[0] == name]
            good = [c for c in configs if sweep.accuracy(c, d) >= floor]
            pick = min(good, key=lambda c, d=d: sweep.mean_latency(c, d)) if good else max(
                configs, key=score)  # fmt: skip
            if name == "static_best":
                pick = best_static
            tuned[name].append(RuleController(pick[0], pick[2], pick[3], pick[1]))
        plain = max((c for c in statics if c[2] == 1), key=score)
        tuned["plain"].append(RuleController("static_best", 1, plain[3]))
    return tuned


def tuning_problem_indices(count: int, total: int, seed: int) -> list[int]:
    """The problems the baselines (``tuning_sweep``) and the stop-value settings are tuned
    on: the first ``count`` of a random permutation of the ``total`` training problems."""
    return np.random.default_rng(seed).permutation(total)[:count].tolist()


def tuning_sweep(
    backend: ReplayBackend,
    deadlines_s: Sequence[float],
    problems: int,
    repeats: int,
    seed: int,
    n_grid: Sequence[int],
    k_grid: Sequence[int],
    progress: bool = True,
) -> SweepResult:
    """Every rule configuration on ``problems`` training problems drawn at random from
    ``backend`` (``tuning_problem_indices``; all of them when it has fewer) x ``repeats``
    draws: what the baselines are tuned on (``tune_controllers``).  A caller that replays the
    same draws again keeps it (``train.py``'s lead tuning)."""
    chosen = tuning_problem_indices(problems, len(backend.problems), seed)
    return sweep_rules(backend, deadlines_s, chosen, repeats, seed, n_grid, k_grid, progress)


def training_backends(
    profile: Profile, method: str | None, val_problems: int, seed: int
) -> tuple[ReplayBackend, ReplayBackend]:
    """The two parts of the training split ``train.py`` keeps apart: the problems it fits and
    tunes on, and those it holds back for validation (``hold_out_validation``)."""
    fit_ids, val_ids = hold_out_validation(profile, val_problems, seed)
    return (ReplayBackend(profile, "train", method, ids=fit_ids),
            ReplayBackend(profile, "train", method, ids=val_ids))  # fmt: skip


def run_training_backends(
    profile: Profile, method: str | None, train_args: dict
) -> tuple[ReplayBackend, ReplayBackend]:
    """``training_backends`` of a saved run, from its recorded ``train.py`` arguments: so a
    re-tuning or an evaluation reads the very problems the run tuned and validated on."""
    return training_backends(profile, method, train_args["val_problems"], train_args["seed"])


def hold_out_validation(
    profile: Profile, val_problems: int, seed: int
) -> tuple[set[str], set[str]]:
    """Ids of the training problems to fit and train on, and of those held back for validation
    (``val_problems``, at most a fifth of them)."""
    train_ids = [r["id"] for r in profile.split("train")]
    rng = np.random.default_rng(seed)
    val_ids = set(rng.choice(train_ids, min(val_problems, len(train_ids) // 5), replace=False))
    return {i for i in train_ids if i not in val_ids}, val_ids
