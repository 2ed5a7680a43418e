"""Fitting and tuning the stop-value controller (``policies.stop_value``) on replayed races.

1. Traces (``race_traces``): every training draw of every (n, k) replayed once without early
   stops, recording at each decision point (an engine step in which branches finished, the
   points ``ReplayRace`` pauses at) the vote, the time, the measured steps, and whether the
   leader is right.  A trace serves every deadline: under deadline D the race sees the points
   with time <= D, and ends at the decided vote or at D.
2. Fitting (``fit_value_net``): at each decision point under a deadline, the counterfactual
   targets ``gain = correct at the end - correct now`` and ``wait = (end - now) / D``; small
   MLPs regress both (mean squared error: they estimate their conditional means), and their
   average is the value network (``fit_value_ensemble``: the stop fires the first time the
   predicted gain dips below the price, so one network's fitting noise stops calls early).
3. Tuning (``tune_settings``): on other training problems, for every (n, k, price) and
   deadline, the accuracy and mean latency of the rule, read off the traces; per deadline the
   fastest setting within ``tolerance`` of the static table's best training accuracy (as
   ``policies.race_eval.tune_controllers`` tunes the heuristics, whose tolerance is
   ``TUNING_TOLERANCE``), taking a shorter horizon than the deadline only when it is clearly
   faster (``budget_margin``).

Tests check the traces and the tuned accuracies against ``policies.race_eval.run_race``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from env.backends.replay import ReplayBackend
from env.features import ProblemFeaturizer
from env.task.voting import VoteTally
from policies.race_eval import draw_rng, tuning_problem_indices
from policies.stop_value import (
    FORWARD_CHUNK_ROWS,
    StopSetting,
    StopValuePolicy,
    ValueNet,
    race_feature_rows,
    stop_mask,
)

PRICES = (-1.0, 0.0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3, 0.5, 1.0)
"""Prices the tuning searches (accuracy per deadline-share of waiting); -1: never stop early
unless waiting is predicted to lose accuracy, 1: stop almost at the first answer."""


@dataclass
class Traces:
    """Decision points of many no-stop replays, concatenated (see the module docstring).

    Per point: ``time_s``, ``steps`` (engine steps so far), ``finished``, ``answered``,
    ``leader_votes``, ``runner_up_votes``, ``distinct``, ``correct`` (leader right now),
    ``decided`` (the race ends here).  Per trace: ``offsets`` (first point; one more entry at
    the end), ``problem``, ``repeat`` (its draw), ``n``, ``k``, ``start_s`` (decoding
    starts) and ``config`` (index of (n, k) in ``configs``).
    """

    time_s: np.ndarray
    steps: np.ndarray
    finished: np.ndarray
    answered: np.ndarray
    leader_votes: np.ndarray
    runner_up_votes: np.ndarray
    distinct: np.ndarray
    correct: np.ndarray
    decided: np.ndarray
    offsets: np.ndarray
    problem: np.ndarray
    repeat: np.ndarray
    n: np.ndarray
    k: np.ndarray
    start_s: np.ndarray
    config: np.ndarray
    configs: list[tuple[int, int]]

    @property
    def trace_of_point(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.problem)), np.diff(self.offsets))

    def at_deadline(self, deadline_s: np.ndarray | float) -> DeadlineView:
        """What each trace looks like under a deadline (one per trace, or one for all)."""
        deadline = np.broadcast_to(np.asarray(deadline_s, float), self.problem.shape)
        owner = self.trace_of_point
        valid = self.time_s <= deadline[owner] + 1e-12
        count = np.add.reduceat(valid.astype(int), self.offsets[:-1]) if len(valid) else valid
        count = np.where(np.diff(self.offsets) > 0, count, 0)
        last = self.offsets[:-1] + count - 1
        has = count > 0
        safe = np.where(has, last, 0)
        ends_decided = has & self.decided[safe]
        end_s = np.where(ends_decided, self.time_s[safe], deadline)
        end_correct = has & self.correct[safe]
        decision = valid & ~self.decided
        return DeadlineView(np.asarray(deadline), valid, decision, end_s, end_correct, owner)


@dataclass
class DeadlineView:
    """The traces under a deadline: ``valid`` and ``decision`` points, and per trace the end
    of the no-stop race (``end_s``, ``end_correct``)."""

    deadline_s: np.ndarray
    valid: np.ndarray
    decision: np.ndarray
    end_s: np.ndarray
    end_correct: np.ndarray
    owner: np.ndarray


def _trace_of_draw(
    backend: ReplayBackend, problem: int, n: int, k: int, rng: np.random.Generator
) -> tuple[list[tuple], float]:
    """The decision points of one draw replayed without early stops, and its start time."""
    drawn = backend.branch_order(rng)[:n]
    finish = backend.finish_times(problem, drawn, k)
    order = np.argsort(finish, kind="stable")
    finish = finish[order]
    tps = backend.tokens_per_step[problem, backend.k_slot(k)]
    steps = np.ceil(np.maximum(backend.branch_tokens[problem, drawn[order]], 1.0) / tps - 1e-9)
    classes = backend.branch_classes[problem, drawn[order]]
    right = backend.class_correct[problem]
    tally = VoteTally(n)
    points: list[tuple] = []
    i = 0
    while i < n:
        at = finish[i]
        while i < n and finish[i] == at and not tally.decided:
            tally.add(int(classes[i]))
            i += 1
        leader = tally.leader
        points.append((float(at), float(steps[i - 1]), tally.finished, tally.answered,
                       tally.leader_votes, tally.runner_up_votes, tally.distinct,
                       leader >= 0 and bool(right[leader]), tally.decided))  # fmt: skip
        if tally.decided:
            break
    return points, float(backend.start_seconds[problem, n])


def race_traces(
    backend: ReplayBackend,
    problems: Sequence[int],
    repeats: int,
    seed: int,
    configs: Sequence[tuple[int, int]],
    progress: bool = True,
) -> Traces:
    """Traces of every (n, k) of ``configs`` on ``problems`` x ``repeats`` draws (keyed by
    ``draw_rng(seed, problem, repeat)``, the draws the evaluation and tuning use).  With n =
    every recorded branch, one repeat only: all draws then run the same branches."""
    columns: list[list] = [[] for _ in range(9)]
    offsets, meta = [0], []
    for c, (n, k) in enumerate(tqdm(configs, desc="stop-value traces", disable=not progress)):
        reps = 1 if n >= backend.recorded_branches else repeats
        for p in problems:
            for r in range(reps):
                points, start = _trace_of_draw(backend, p, n, k, draw_rng(seed, p, r))
                for column, values in zip(columns, zip(*points, strict=True), strict=True):
                    column.extend(values)
                offsets.append(offsets[-1] + len(points))
                meta.append((p, r, n, k, start, c))
    arrays = [np.asarray(col) for col in columns]
    m = np.asarray(meta, dtype=float).reshape(-1, 6)
    return Traces(
        arrays[0].astype(float), arrays[1].astype(float), *(a.astype(int) for a in arrays[2:7]),
        arrays[7].astype(bool), arrays[8].astype(bool), np.asarray(offsets),
        m[:, 0].astype(int), m[:, 1].astype(int), m[:, 2].astype(int), m[:, 3].astype(int),
        m[:, 4], m[:, 5].astype(int), list(configs),
    )  # fmt: skip


def point_features(
    traces: Traces,
    view: DeadlineView,
    prompt_table: np.ndarray,
    featurizer: ProblemFeaturizer,
    rows: np.ndarray,
) -> np.ndarray:
    """Network inputs (race features, then prompt features with the deadline's) of ``rows``
    (point indices) under ``view``'s deadlines."""
    owner = view.owner[rows]
    t = traces.time_s[rows]
    start = traces.start_s[owner]
    steps = traces.steps[rows]
    per_step = np.where(steps > 0, (t - start) / np.maximum(steps, 1.0), 0.0)
    deadline = view.deadline_s[owner]
    race = race_feature_rows(t, deadline, per_step, steps, traces.n[owner], traces.finished[rows],
                             traces.answered[rows], traces.leader_votes[rows],
                             traces.runner_up_votes[rows], traces.distinct[rows])  # fmt: skip
    prompt = prompt_table[traces.problem[owner]].copy()
    # A sweep reads millions of rows under one deadline: each distinct deadline's feature is
    # computed once (by the serving code's own function, so the values are the same).
    distinct, inverse = np.unique(deadline, return_inverse=True)
    prompt[:, 1] = np.array([featurizer.deadline_feature(d) for d in distinct])[inverse]
    return np.concatenate([race, prompt], axis=1)


def scores(
    net: ValueNet,
    traces: Traces,
    view: DeadlineView,
    prompt_table: np.ndarray,
    featurizer: ProblemFeaturizer,
    rows: np.ndarray,
) -> np.ndarray:
    """``net``'s (gain, wait) at ``rows`` under ``view``'s deadlines, the features built a few
    network chunks at a time: a sweep scores millions of rows per deadline, and their features
    at once allocated gigabytes of fresh pages (the same values: features are per row, and the
    network's own chunks fall at the same rows)."""
    step = 8 * FORWARD_CHUNK_ROWS
    starts = range(0, max(len(rows), 1), step)  # no rows: one empty chunk, the network's width
    return np.concatenate([net(point_features(traces, view, prompt_table, featurizer,
                                              rows[i : i + step])) for i in starts])  # fmt: skip


def prompt_table(backend: ReplayBackend, featurizer: ProblemFeaturizer) -> np.ndarray:
    """Prompt features of every problem of ``backend``, with a 0 deadline column at index 1
    (the layout of ``ProblemFeaturizer.transform``; filled in per deadline)."""
    problems = backend.problems
    table = featurizer.problem_features([p.problem for p in problems],
                                        [p.prompt_tokens for p in problems])  # fmt: skip
    return np.insert(table, 1, 0.0, axis=1).astype(np.float32)


def training_rows(
    traces: Traces,
    prompts: np.ndarray,
    featurizer: ProblemFeaturizer,
    deadline_range_s: tuple[float, float],
    deadlines_per_trace: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and (gain, wait) targets at every decision point of every trace under
    ``deadlines_per_trace`` deadlines drawn log-uniformly from ``deadline_range_s``."""
    xs, ys = [], []
    low, high = (math.log(d) for d in deadline_range_s)
    for _ in range(deadlines_per_trace):
        deadline = np.exp(rng.uniform(low, high, len(traces.problem)))
        view = traces.at_deadline(deadline)
        rows = np.flatnonzero(view.decision)
        owner = view.owner[rows]
        gain = view.end_correct[owner].astype(float) - traces.correct[rows]
        wait = (view.end_s[owner] - traces.time_s[rows]) / deadline[owner]
        xs.append(point_features(traces, view, prompts, featurizer, rows))
        ys.append(np.column_stack([gain, wait]))
    return np.concatenate(xs), np.concatenate(ys).astype(np.float32)


def fit_value_net(
    x: np.ndarray,
    y: np.ndarray,
    hidden: int = 64,
    epochs: int = 4,
    batch_size: int = 2048,
    learning_rate: float = 3e-3,
    seed: int = 0,
) -> tuple[ValueNet, dict]:
    """Regress (gain, wait) on ``x`` with a two-hidden-layer tanh MLP (Adam, squared error);
    returns the network in numpy and the final training losses per output."""
    torch.manual_seed(seed)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    scale = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    xt = torch.as_tensor((x - mean) / scale, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)
    width = x.shape[1]
    layers = [torch.nn.Linear(width, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
              torch.nn.Tanh(), torch.nn.Linear(hidden, y.shape[1])]  # fmt: skip
    net = torch.nn.Sequential(*layers)
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    steps = epochs * math.ceil(len(x) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = ((net(xt[batch]) - yt[batch]) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        residual = ((net(xt) - yt) ** 2).mean(dim=0).tolist()
    linear = [m for m in net if isinstance(m, torch.nn.Linear)]
    value = ValueNet([m.weight.detach().numpy().T.copy() for m in linear],
                     [m.bias.detach().numpy().copy() for m in linear],
                     mean.astype(np.float32), scale)  # fmt: skip
    baseline = y.var(axis=0).tolist()
    return value, {"rows": len(x), "mse": residual, "target_variance": baseline}


def fit_value_ensemble(
    x: np.ndarray,
    y: np.ndarray,
    members: int,
    hidden: int,
    epochs: int,
    seed: int,
    progress: bool = False,
) -> tuple[ValueNet, dict]:
    """``members`` networks fitted by ``fit_value_net`` on the same rows from different
    initializations and batch orders (seeds ``seed``, ``seed + 1``, ...), averaged into one
    (``ValueNet.average``).

    Why: a call stops at the *first* decision point whose predicted gain is at most price x
    wait, so fitting noise that varies from point to point along a race fires stops where
    waiting still pays, and one network's rule moves with its seed.  Measured on the synthetic
    profile over learner seeds (same baselines, same draws): on 2,900 unused training problems
    the average of 5 kept the latency of single networks with +0.1 point more accuracy and a
    worst deadline of -0.07 point instead of -0.17; on MATH-500 it saved 11-28% (mean 19%, 9
    seeds) against the static frontier where single networks saved 8-23% (mean 17%, 5 seeds).
    The seed still moves the result more than averaging does.
    """
    starts = tqdm(range(members), desc="value networks", disable=not progress)
    fits = [fit_value_net(x, y, hidden, epochs, seed=seed + i) for i in starts]
    net = ValueNet.average([value for value, _ in fits])
    info = {"rows": len(x), "members": members, "member_mse": [f["mse"] for _, f in fits],
            "target_variance": fits[0][1]["target_variance"]}  # fmt: skip
    return net, info


@dataclass
class SweepTable:
    """Per (n, k) config, price and deadline: accuracy and mean latency on the tuning draws."""

    configs: list[tuple[int, int]]
    prices: tuple[float, ...]
    deadlines_s: tuple[float, ...]
    accuracy: np.ndarray  # (configs, prices, deadlines)
    latency: np.ndarray
    static_accuracy: np.ndarray  # (configs, deadlines): no early stop
    static_latency: np.ndarray


def sweep_stop_value(
    net: ValueNet,
    traces: Traces,
    prompts: np.ndarray,
    featurizer: ProblemFeaturizer,
    deadlines_s: Sequence[float],
    prices: Sequence[float] = PRICES,
    counted: np.ndarray | None = None,
    progress: bool = True,
) -> SweepTable:
    """Accuracy and latency of every (config, price) at every deadline, read off ``traces``
    (each config's draws weigh equally: a config with one repeat at n = all branches stands
    for the same draws as the others' several); ``counted`` (one flag per trace) limits the
    means to some traces, e.g. half of the problems (``policies.saving_bound``); ``progress``: a
    bar over the deadlines."""
    configs = traces.configs
    shape = (len(configs), len(prices), len(deadlines_s))
    accuracy, latency = np.zeros(shape), np.zeros(shape)
    static_acc, static_lat = np.zeros(shape[::2]), np.zeros(shape[::2])
    n_traces = len(traces.problem)
    members = [(traces.config == c) & (True if counted is None else counted)
               for c in range(len(configs))]  # fmt: skip
    bar = tqdm(deadlines_s, desc="stop-value sweep (deadlines)", disable=not progress)
    for d, deadline in enumerate(bar):
        view = traces.at_deadline(deadline)
        rows = np.flatnonzero(view.decision)
        out = scores(net, traces, view, prompts, featurizer, rows)
        owner = view.owner[rows]
        for c, mine in enumerate(members):
            static_acc[c, d] = view.end_correct[mine].mean()
            static_lat[c, d] = view.end_s[mine].mean()
        for j, price in enumerate(prices):
            fires = stop_mask(out[:, 0], out[:, 1], price)
            first = np.full(n_traces, np.iinfo(np.int64).max)
            np.minimum.at(first, owner[fires], rows[fires])
            stopped = first < np.iinfo(np.int64).max
            where = np.where(stopped, first, 0)
            correct = np.where(stopped, traces.correct[where], view.end_correct)
            time_s = np.where(stopped, traces.time_s[where], view.end_s)
            for c, mine in enumerate(members):
                accuracy[c, j, d] = correct[mine].mean()
                latency[c, j, d] = time_s[mine].mean()
    return SweepTable(list(configs), tuple(prices), tuple(float(d) for d in deadlines_s),
                      accuracy, latency, static_acc, static_lat)  # fmt: skip


def tune_settings(
    table: SweepTable, tolerance: float = 0.0, budget_margin: float = 0.0
) -> list[StopSetting]:
    """Per deadline, the fastest (n, k, price, budget) whose tuning accuracy is at least the
    floor (else the most accurate one).

    The floor is the static table's best tuning accuracy at this deadline *or any shorter one*
    of the grid, less ``tolerance``: the controller must not be less accurate than the static
    table anywhere below this deadline, which it can always match by acting as under the
    shorter deadline (a budget: the grid deadline d' <= d as its own deadline, so the
    candidates at d are every setting tuned at d' <= d, read off the sweep at d').

    A budget below 1 is kept only when it is at least ``budget_margin`` (a share of mean
    latency) faster than the fastest setting at the full deadline that meets the floor too;
    otherwise that full-deadline setting is taken.  Why: once the stop rule ends most calls
    early, a shorter horizon saves little time (2-4% at the long deadlines of the synthetic
    profile), and the accuracy it seems to buy is the winner of a noisy comparison among
    nearly equal settings (the training vote of late branches being slightly less accurate).
    On MATH-500 (synthetic profile, learner seeds 2 and 3) the 1.3 s horizons chosen at 1.9
    and 2.7 s lost 1.0-1.4 points to static_best, the full-deadline settings the margin chose
    instead -0.2 to +0.6 (``StopValueArgs.budget_margin``).
    """
    static = table.static_accuracy.max(axis=0)
    floor = np.maximum.accumulate(static) - tolerance
    deadlines = np.asarray(table.deadlines_s)
    settings = []
    for d in range(len(deadlines)):
        acc, lat = table.accuracy[:, :, : d + 1], table.latency[:, :, : d + 1]
        good = acc >= floor[d] - 1e-12
        if good.any():
            c, j, e = np.unravel_index(np.where(good, lat, np.inf).argmin(), lat.shape)
            full = np.where(good[:, :, d], lat[:, :, d], np.inf)
            if e < d and np.isfinite(full).any():
                c_full, j_full = np.unravel_index(full.argmin(), full.shape)
                if lat[c, j, e] > (1.0 - budget_margin) * full[c_full, j_full]:
                    c, j, e = c_full, j_full, d
        else:
            c, j, e = np.unravel_index(np.lexsort((lat.ravel(), -acc.ravel()))[0], lat.shape)
        n, k = table.configs[c]
        settings.append(StopSetting(n, k, table.prices[j], float(deadlines[e] / deadlines[d])))
    return settings


LEAD_FLOOR_MARGIN = 0.002
"""How far above both accuracy floors the lead tuning (``policies.retune.tune_for_lead``) wants
a setting on the tuning draws: 0.2 point.  Measured on the synthetic profile, learner seeds 0-3,
MATH-500 x 4 draws (``./run policies.retune --run <run> --floor-margin M``): with no margin the
chosen settings sat on the floors and fell 0.25-0.6 point below the best heuristic at every
seed; with 0.2 point, 0.1-0.6 point, and the static table's accuracy stayed within 0.45 point."""
MAX_FLOOR_MARGIN = 0.05
"""The largest margin accepted (5 points: far beyond any accuracy difference between the tuned
controllers)."""


MAX_BETWEEN = 4
"""The most tuning deadlines ``tuning_deadlines`` adds between two grid deadlines."""


def tuning_deadlines(deadlines_s: Sequence[float], between: int) -> tuple[float, ...]:
    """The deadlines the stop-value settings are tuned at (ascending): the grid's, and
    ``between`` more between each two neighbours, evenly in log time (3 significant digits).

    Why: a saved policy serves a deadline with the setting of a deadline it was tuned at near it
    (``StopValuePolicy.setting``: the longest not longer than it; the nearest one until this
    round), and an (n, k) tuned at one grid deadline can be wrong half-way to the next.
    Synthetic profile, learner seed 0, MATH-500 x 16 draws, with ``between`` 0 and the nearest
    deadline serving: at 0.29 s, between grid deadlines 0.24 and 0.34 s, the setting tuned at
    0.34 s (32 branches) lost 0.63 point to a static table tuned at 0.29 s (16 branches); with
    1 or 2, 0.19 point.  With settings at the grid only, neither neighbour's (n, k) was safe:
    the shorter one's lost more than a point at 0.63 s, where the longer one's 64 branches win.
    """
    check_between(between)
    grid = sorted(set(float(d) for d in deadlines_s))
    out = list(grid)
    for low, high in itertools.pairwise(grid):
        inner = np.geomspace(low, high, between + 2)[1:-1]
        out += [r for r in (float(f"{d:.3g}") for d in inner) if low < r < high]
    return tuple(sorted(set(out)))


def check_between(between: int) -> None:
    """Refuse a count of deadlines between grid points outside [0, ``MAX_BETWEEN``]."""
    check_count(between, MAX_BETWEEN, "deadlines tuned between grid points")


def check_count(value: int, most: int, what: str, note: str = "") -> None:
    """Refuse ``value`` unless it is an integer in [0, ``most``], naming ``what`` it counts
    (``note``: what the range means, after it)."""
    if not (isinstance(value, int) and 0 <= value <= most):
        raise ValueError(f"{what} must be an integer in [0, {most}]{note}, got {value}")


MAX_VALIDATION_REPEATS = 64
"""The most validation draws per problem the lead tuning's check replays."""


def check_validation_repeats(repeats: int) -> None:
    """Refuse a count of validation draws outside [0, ``MAX_VALIDATION_REPEATS``] (0: no check)."""
    check_count(repeats, MAX_VALIDATION_REPEATS, "validation draws per problem", " (0: no check)")


def check_floor_margin(margin: float) -> None:
    """Refuse a margin outside [0, ``MAX_FLOOR_MARGIN``] with what is allowed."""
    if not 0.0 <= margin <= MAX_FLOOR_MARGIN:
        raise ValueError(f"floor margin {margin} must be a share of accuracy in "
                         f"[0, {MAX_FLOOR_MARGIN}], e.g. 0.002 for 0.2 point")  # fmt: skip


@dataclass
class StopValueArgs:
    """How the stop-value policy is fitted and tuned (``train.py`` passes its arguments).

    :param fit_problems: training problems whose traces the value network is fitted on (taken
        from those the tuning does not use).
    :param tune_problems: training problems the settings are tuned on (the heuristics' tuning
        problems: the same draws).
    :param tune_repeats: draws per tuning problem (one at n = every recorded branch).
    :param deadlines_per_trace: deadlines each fitting trace is read under.
    :param hidden: units per hidden layer of the value network.
    :param epochs: passes over the fitting rows.
    :param members: value networks averaged into the one the policy serves
        (``fit_value_ensemble``).
    :param tolerance: accuracy the tuned settings may lose against the static table's best on
        the tuning draws (0: none; the heuristics are allowed ``TUNING_TOLERANCE``).
    :param budget_margin: share of mean tuning latency a budget below 1 must save over the
        fastest full-deadline setting that also meets the floor (``tune_settings``).  Measured
        on the synthetic profile over learner seeds 0-4 (same nets, same draws): 0.1 instead of
        0 raised the mean MATH-500 saving from 18.2% to 20.6% and the worst deadline against
        static_best from -1.4 to -1.0 points (against the best heuristic from -1.2 to -0.4);
        0.05 chose the same settings, 0.2 differed at one deadline of one seed.
    :param learner_seed: seed of the fitting rows' deadlines and of the networks' starts
        (None: the run's seed).  Problems, draws and tuning stay the run's, so runs that differ
        only here show how much the learner's own randomness moves its results.
    :param n_min: the least n the settings consider (fewer branches never won on the
        synthetic profile and only slow the sweep).
    :param objective: ``lead``: after the tuning above, ``train.py`` re-tunes each deadline's
        setting for the largest saving against the tuned heuristics' frontier among those
        clearing both accuracy floors by ``floor_margin`` on the tuning draws
        (``policies.retune.tune_for_lead``); ``accuracy``: keep the fastest setting at the
        static table's full tuning accuracy.
    :param floor_margin: the lead tuning's margin above both floors (``LEAD_FLOOR_MARGIN``).
    :param validation_repeats: draws per held-out validation problem on which a lead-tuned
        setting must clear both floors by ``floor_margin`` too (``policies.retune.held_up``; 0:
        no such check, the default until this round).  Synthetic profile, learner seeds 0-3,
        MATH-500 x 16 draws, ``between`` 2: with 8, both accuracy floors held at 7 of the 8
        (seed, floor) pairs instead of 3; the mean saving fell from 13.3% to 11.1% and the 10%
        lead over the heuristics was met at one seed instead of three.
    :param between: deadlines tuned between each two of the evaluation grid (with the
        baselines' floors there: ``tuning_deadlines``), so that every deadline in the grid's
        range is served by a setting tuned near it.  Synthetic profile, learner seeds 0-3,
        MATH-500 x 16 draws, with the validation check: 4 instead of 2 kept the accuracy floors
        at the grid deadlines where they were (7 of 8 held), met the 10% lead at two seeds
        instead of one (mean saving 11.8% instead of 11.1%), and between tuned deadlines lost
        at most 0.50 point at the grid's midpoints and 0.58 at the sixth points (instead of
        0.53 and 0.89): a setting serves a deadline at most a fifth of a grid step longer than
        its own.  Without the check, 2 instead of 1 had raised the mean saving from 12.6% to
        13.3%, the horizons between grid deadlines winning the tuning at the long deadlines.
    """

    fit_problems: int = 2000
    tune_problems: int = 2000
    tune_repeats: int = 2
    deadlines_per_trace: int = 2
    hidden: int = 64
    epochs: int = 4
    members: int = 5
    tolerance: float = 0.0
    budget_margin: float = 0.1
    learner_seed: int | None = None
    n_min: int = 4
    objective: Literal["lead", "accuracy"] = "lead"
    floor_margin: float = LEAD_FLOOR_MARGIN
    between: int = 4
    validation_repeats: int = 8

    def __post_init__(self) -> None:
        check_floor_margin(self.floor_margin)  # before a run spends minutes on the baselines
        check_between(self.between)
        check_validation_repeats(self.validation_repeats)


def stop_value_configs(
    n_grid: Sequence[int], k_grid: Sequence[int], n_min: int
) -> list[tuple[int, int]]:
    """The (n, k) the traces and the tuning cover: every k, n from ``n_min`` (or the largest n
    when the grid stops below it)."""
    return [(n, k) for n in n_grid if n >= min(n_min, max(n_grid)) for k in k_grid]


def fitting_problem_indices(count: int, tuning: int, total: int, seed: int) -> list[int]:
    """The problems the value network is fitted on: the next ``count`` of the permutation the
    tuning problems head (``tuning_problem_indices``), so both are random and disjoint (all
    problems when the tuning takes every one).

    Why random: training problems come in the order of their source (MATH train, grouped by
    subject), and taking the first ones not tuned on fitted the network on Algebra, Counting &
    Probability and Geometry only; its settings then carried over badly to MATH-500's seven
    subjects (``policies.saving_bound --transfer``).
    """
    order = np.random.default_rng(seed).permutation(total)
    rest = order[tuning:] if tuning < total else order
    return rest[:count].tolist()


@dataclass(frozen=True)
class TuningReplay:
    """The tuning draws as ``learn_stop_value`` replayed them: ``problems`` x ``repeats``
    draws under ``seed``, their ``traces``, the ``prompts`` table, and ``net``'s sweep of them
    (``table``, at the tuning deadlines and ``PRICES``).

    Why: the lead tuning (``policies.retune.tune_for_lead``) replays the very same draws with
    the very same network; handed these it reads them instead of replaying them again
    (``policies.bound_candidates.StopValueReplay.on``): one trace pass and one sweep at every
    tuning deadline, about 45 s of the default run.  The backend and featurizer are not
    recorded: only ``train.py``'s own run, which uses one of each, hands these on.
    """

    problems: tuple[int, ...]
    repeats: int
    seed: int
    net: ValueNet
    traces: Traces
    prompts: np.ndarray
    table: SweepTable

    def serves(
        self,
        net: ValueNet,
        problems: Sequence[int],
        repeats: int,
        seed: int,
        deadlines_s: Sequence[float],
        configs: Sequence[tuple[int, int]],
        prices: Sequence[float],
    ) -> bool:
        """Whether these are exactly the draws, network, deadlines, (n, k) and prices asked
        for (anything else must be replayed)."""
        table = self.table
        return (net is self.net and tuple(problems) == self.problems and repeats == self.repeats
                and seed == self.seed and table.deadlines_s == tuple(map(float, deadlines_s))
                and table.configs == list(configs) and table.prices == tuple(prices))  # fmt: skip


def learn_stop_value(
    backend: ReplayBackend,
    featurizer: ProblemFeaturizer,
    n_grid: Sequence[int],
    deadlines_s: Sequence[float],
    deadline_range_s: tuple[float, float],
    args: StopValueArgs,
    seed: int,
    progress: bool = True,
) -> tuple[StopValuePolicy, TuningReplay]:
    """Fit the value network on traces of some training problems and tune its settings per
    deadline on others (the module docstring's steps 1-3); returns the policy and its tuning
    draws' replay (``TuningReplay``)."""
    total = len(backend.problems)
    tune_ids = tuning_problem_indices(args.tune_problems, total, seed)
    fit_ids = fitting_problem_indices(args.fit_problems, args.tune_problems, total, seed)
    configs = stop_value_configs(n_grid, backend.k_grid, args.n_min)
    prompts = prompt_table(backend, featurizer)
    fit_traces = race_traces(backend, fit_ids, 1, seed + 1, configs, progress)
    learner_seed = seed if args.learner_seed is None else args.learner_seed
    draws = np.random.default_rng(learner_seed)
    rows, targets = training_rows(fit_traces, prompts, featurizer, deadline_range_s,
                                  args.deadlines_per_trace, draws)  # fmt: skip
    net, fit_info = fit_value_ensemble(rows, targets, args.members, args.hidden, args.epochs,
                                       learner_seed, progress)  # fmt: skip
    tune_traces = race_traces(backend, tune_ids, args.tune_repeats, seed, configs, progress)
    table = sweep_stop_value(net, tune_traces, prompts, featurizer, deadlines_s,
                             progress=progress)  # fmt: skip
    settings = tune_settings(table, args.tolerance, args.budget_margin)
    chosen = [(table.configs.index((s.n, s.k)), table.prices.index(s.price),
               int(np.argmin(np.abs(np.asarray(deadlines_s) - s.budget * d))))
              for s, d in zip(settings, deadlines_s, strict=True)]  # fmt: skip
    info = {
        "fit": {"problems": len(fit_ids), "traces": len(fit_traces.problem), **fit_info},
        "tuning": {"problems": len(tune_ids), "repeats": args.tune_repeats,
                   "tolerance": args.tolerance, "budget_margin": args.budget_margin,
                   "accuracy": [float(table.accuracy[c, j, e]) for c, j, e in chosen],
                   "mean_latency_s": [float(table.latency[c, j, e]) for c, j, e in chosen],
                   "static_best_accuracy": table.static_accuracy.max(axis=0).tolist()},
        "args": dataclasses.asdict(args),
    }  # fmt: skip
    policy = StopValuePolicy(net, tuple(float(d) for d in deadlines_s), settings,
                             prompts.shape[1], info)  # fmt: skip
    return policy, TuningReplay(tuple(tune_ids), args.tune_repeats, seed, net, tune_traces,
                                prompts, table)  # fmt: skip
