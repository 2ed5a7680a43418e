"""Evaluation on MATH-500 (held out): every controller of the race on the same draws, per deadline.

The product claim is comparative: the learned race controller against the published static
(n, k) table and the best tuned stopping rules, at every deadline.  A comparison only means
something when the methods face the same luck, so every method runs through the one loop
(``policies.race_eval.evaluate_controller``) with draws keyed by (seed, problem, repeat): all of
them vote over the same recorded branches and differences come from their decisions.

Beside the methods the report carries an ``oracle`` (``oracle_outcomes``: the best static
(n, k) and stop point in hindsight, an upper bound no controller of the grids can pass) and the
issue's targets (``summarize_targets``), each with its value, threshold and whether it is met.
Accuracy alone would hide a slower method and latency alone a less accurate one, so latency is
also compared "at equal accuracy" on accuracy-latency frontiers (``policies.frontier``).

Output: a table on the console (``print_report``), ``report.json`` and ``report.png``
(``write_report``) and a plot of a few races; the table and figures are drawn by
``policies.report_plots``.  Numbers from a synthetic profile
carry the synthetic label wherever they appear.

    python -m policies.evaluate --policy DIR [--deadlines 0.3 0.6 ...] [--repeats 16] [--out DIR]
        [--batch-k]
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from tqdm import tqdm

from env.backends.protocol import Outcome
from env.backends.replay import ReplayBackend
from env.config import call_reward
from env.profiles.store import write_json
from env.race_env import RaceEnv
from env.task.voting import VoteTally
from policies.frontier import frontier, latency_saving
from policies.learned_controller import LearnedController
from policies.race_controllers import BatchKDrafting, RaceController, RuleController
from policies.race_eval import (
    draw_rng,
    evaluate_controller,
    run_training_backends,
    tune_controllers,
    tuning_sweep,
)
from policies.report_plots import plot_races, plot_report, print_report
from policies.saved_policy import load_race_policy, policy_profile

REFERENCE = "static_best"
"""The published method (one static (n, k) per deadline) every target is measured against."""
HEURISTICS = ("esc", "adaptive_consistency", "margin")
"""The tuned stopping rules the policy must also beat (the best of them at each deadline)."""
ORACLE = "oracle"
TOLERANCE = 1e-9
"""Slack when comparing a value with its threshold (accuracies are sums of 0/1 floats)."""
TARGETS = {
    "accuracy_vs_static_best": -0.005,
    "latency_saving_vs_static_best": 0.25,
    "accuracy_vs_best_heuristic": -0.003,
    "ahead_of_heuristics": {"accuracy_gain": 0.01, "latency_saving": 0.10},
}
"""Issue 13's targets: the least value each must reach (``ahead_of_heuristics``: either one)."""

EVAL_REPEATS = 16
"""Draws per MATH-500 problem and deadline in the evaluation (issue 13 asks for at least 4).
Why 16: at 4 the paired standard error of an accuracy difference was 0.6-0.9 point at the long
deadlines of the synthetic profile, about the size of the floors the targets set, and the
default run's worst deadline against static_best read -0.45 point there but -0.63 at 16 draws;
16 draws bring the errors to 0.4-0.6 point for about 75 s more of replay."""

Methods = dict[str, RaceController | Sequence[RaceController]]


def check_deadlines(deadlines_s: Sequence[float]) -> tuple[float, ...]:
    """The deadlines as floats; refuses an empty grid or a deadline that is not > 0."""
    deadlines = tuple(float(d) for d in deadlines_s)
    if not deadlines or not all(d > 0 and math.isfinite(d) for d in deadlines):
        raise ValueError(f"deadlines must be a non-empty list of seconds > 0, got {deadlines_s}")
    return deadlines


def _per_deadline(name: str, method, count: int) -> list[RaceController]:
    """One controller per deadline: a sequence as given (in deadline order), a single
    controller repeated."""
    if not isinstance(method, Sequence):
        return [method] * count
    if len(method) != count:
        raise ValueError(f"method {name!r} has {len(method)} controllers for {count} deadlines")
    return list(method)


def method_row(
    outcomes: Sequence[Outcome], deadline_s: float, repeats: int, latency_cost: float
) -> dict:
    """One method at one deadline, over its draws in (problem, repeat) order.

    ``accuracy_se`` is the standard error over problems (each problem's draws averaged first:
    draws of one problem are correlated, so treating them as independent would understate it).
    ``correct_per_problem`` counts the right draws of each problem, so that two methods of the
    same report can be compared draw for draw (``paired_se``).
    """
    correct = np.array([o.correct for o in outcomes], dtype=float)
    latency = np.array([o.latency_s for o in outcomes])
    per_problem = correct.reshape(-1, repeats).mean(axis=1)
    return {
        "deadline_s": float(deadline_s),
        "accuracy": float(correct.mean()),
        "accuracy_se": _se_of_mean(per_problem),
        "correct_per_problem": correct.reshape(-1, repeats).sum(axis=1).astype(int).tolist(),
        "mean_latency_s": float(latency.mean()),
        "p95_latency_s": float(np.percentile(latency, 95)),
        "mean_n": float(np.mean([o.n for o in outcomes])),
        "mean_k_final": float(np.mean([o.k for o in outcomes])),
        "mean_branches_finished": float(np.mean([o.branches_finished for o in outcomes])),
        "mean_tokens": float(np.mean([o.generated_tokens for o in outcomes])),
        "answered": float(np.mean([o.answered for o in outcomes])),
        "reward": float(np.mean([call_reward(o, deadline_s, latency_cost) for o in outcomes])),
    }


def _se_of_mean(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def paired_se(a: dict, b: dict, repeats: int) -> float | None:
    """Standard error of ``a``'s accuracy minus ``b``'s (two rows of one report, on the same
    draws), over problems: each problem's difference over its draws first, as ``accuracy_se``.

    Why paired: both methods vote over the same drawn branches, so most of their luck is shared
    and cancels in the difference; the unpaired errors would overstate its noise several times
    over.  None when a row lacks ``correct_per_problem`` (reports written before it) or the
    rows cover different problems.
    """
    if "correct_per_problem" not in a or "correct_per_problem" not in b:
        return None
    mine, theirs = np.asarray(a["correct_per_problem"]), np.asarray(b["correct_per_problem"])
    if mine.shape != theirs.shape:
        return None
    return _se_of_mean((mine - theirs) / repeats)


# -- the oracle --------------------------------------------------------------------------------


def _earliest_correct(
    backend: ReplayBackend, problem: int, drawn: np.ndarray, k: int, horizon_s: float
) -> Outcome | None:
    """The first decision point of the static race (``drawn`` branches, fixed k, no early stop)
    at which the leader is right, if one comes by ``horizon_s``.

    Decision points are the engine steps in which branches finish: branches finishing at the
    same time are counted together, in draw order, and the race ends once the vote is decided
    (exactly as ``ReplayRace`` replays it).
    """
    finish = backend.finish_times(problem, drawn, k)
    order = np.argsort(finish, kind="stable")
    finish = finish[order]
    classes = backend.branch_classes[problem, drawn[order]]
    right = backend.class_correct[problem]
    tally, i, count = VoteTally(len(drawn)), 0, int(finish.searchsorted(horizon_s, "right"))
    while i < count and not tally.decided:
        at = finish[i]
        while i < count and finish[i] == at and not tally.decided:
            tally.add(int(classes[i]))
            i += 1
        if tally.leader >= 0 and right[tally.leader]:
            return _right_at(backend, problem, drawn, k, order[i - 1], tally, float(at))
    return None


def _right_at(
    backend: ReplayBackend,
    problem: int,
    drawn: np.ndarray,
    k: int,
    last: int,
    tally: VoteTally,
    at_s: float,
) -> Outcome:
    """The static race stopped at ``at_s``, right after draw position ``last`` finished.

    With k fixed every live branch has run as many steps as the last one to finish, so each
    has decoded min(its tokens, those steps x tokens per step), as ``ReplayRace`` counts them.
    """
    tokens = backend.branch_tokens[problem, drawn]
    per_step = backend.tokens_per_step[problem, backend.k_slot(k)]
    decoded = math.ceil(max(float(tokens[last]), 1.0) / per_step) * per_step
    return Outcome(
        correct=True,
        answered=True,
        answer_class=tally.leader,
        answer=backend.class_answer[problem][tally.leader],
        latency_s=at_s,
        n=len(drawn),
        k=k,
        branches_finished=tally.finished,
        generated_tokens=int(np.minimum(tokens, decoded).sum()),
        deadline_missed=False,
    )


def oracle_draw(
    backend: ReplayBackend,
    problem: int,
    rng: np.random.Generator,
    n_grid: Sequence[int],
    k_grid: Sequence[int],
    horizon_s: float,
) -> Outcome | None:
    """The hindsight-best call of one draw: over every static (n, k) of the grids (the first n
    branches of the draw's permutation, as every controller gets them) and every stop point,
    the earliest moment a right leader exists; None when none does by ``horizon_s``.

    The search is pruned by the best time so far, so a draw costs a few small replays.
    """
    permutation = backend.branch_order(rng)
    best: Outcome | None = None
    for n in sorted(n_grid):
        for k in k_grid:
            limit = horizon_s if best is None else best.latency_s
            found = _earliest_correct(backend, problem, permutation[:n], k, limit)
            if found is not None and (best is None or found.latency_s < best.latency_s):
                best = found
    return best


def _unanswered(deadline_s: float) -> Outcome:
    return Outcome(False, False, -1, None, deadline_s, 0, 0, 0, 0, True)


def oracle_outcomes(
    backend: ReplayBackend,
    deadlines_s: Sequence[float],
    repeats: int,
    seed: int,
    n_grid: Sequence[int],
    k_grid: Sequence[int],
    fallback: Sequence[Sequence[Outcome]] | None = None,
    progress: bool = True,
) -> list[list[Outcome]]:
    """The oracle's outcomes per deadline, on the draws ``evaluate_controller`` uses.

    A draw is right at a deadline when ``oracle_draw`` found a right leader by then (at that
    time, with that (n, k)); otherwise it takes ``fallback``'s outcome of the same draw and
    deadline (the evaluation passes ``static_best``'s, which is then wrong: "wrong at the static
    table's latency"), or, without one, an unanswered call at the deadline.  One search per
    draw serves every deadline.
    """
    deadlines = check_deadlines(deadlines_s)
    draws = [(p, r) for p in range(len(backend.problems)) for r in range(repeats)]
    result: list[list[Outcome]] = [[] for _ in deadlines]
    for j, (p, r) in enumerate(tqdm(draws, desc="oracle", disable=not progress, leave=False)):
        best = oracle_draw(backend, p, draw_rng(seed, p, r), n_grid, k_grid, max(deadlines))
        for d, deadline in enumerate(deadlines):
            if best is not None and best.latency_s <= deadline:
                result[d].append(best)
            else:
                result[d].append(fallback[d][j] if fallback else _unanswered(deadline))
    return result


# -- evaluation --------------------------------------------------------------------------------


def _describe(controller: RaceController) -> dict:
    """What a controller was (a tuned rule's family, n, k and threshold) for the report."""
    if isinstance(controller, RuleController):
        return dataclasses.asdict(controller)
    return {"controller": type(controller).__name__}


def evaluate_methods(
    controllers: Methods,
    backend: ReplayBackend,
    deadlines_s: Sequence[float],
    repeats: int,
    seed: int,
    latency_cost: float,
    progress: bool = True,
    n_grid: Sequence[int] | None = None,
    k_grid: Sequence[int] | None = None,
) -> dict:
    """Every method at every deadline on every problem of ``backend`` x ``repeats`` draws, plus
    the oracle, as the report dict (see the module docstring).

    :param controllers: name -> one controller per deadline (in deadline order), or one
        controller used at every deadline.
    :param latency_cost: the reward's latency cost (``env.config.call_reward``).
    :param n_grid: branch counts the oracle searches (default: powers of two up to the
        backend's ``max_branches``, the race environment's default).
    :param k_grid: draft lengths the oracle searches (default: the backend's).
    """
    deadlines = check_deadlines(deadlines_s)
    n_grid = n_grid or tuple(2**i for i in range(backend.max_branches.bit_length()))
    k_grid = k_grid or backend.k_grid
    per_deadline = {name: _per_deadline(name, c, len(deadlines)) for name, c in controllers.items()}
    outcomes: dict[str, list[list[Outcome]]] = {name: [] for name in per_deadline}
    jobs = [(name, d) for name in per_deadline for d in range(len(deadlines))]
    for name, d in tqdm(jobs, desc="evaluate", disable=not progress, leave=False):
        controller = per_deadline[name][d]
        outcomes[name].append(evaluate_controller(backend, controller, deadlines[d], repeats, seed))
    outcomes[ORACLE] = oracle_outcomes(backend, deadlines, repeats, seed, n_grid, k_grid,
                                       outcomes.get(REFERENCE), progress)  # fmt: skip
    report = {
        "profile": {
            "name": backend.profile.name,
            "label": backend.name,
            "synthetic": backend.synthetic,
        },
        "split": "test",
        "num_problems": len(backend.problems),
        "spec_method": backend.method,
        "deadlines_s": list(deadlines),
        "repeats": repeats,
        "seed": seed,
        "latency_cost": latency_cost,
        "oracle_grid": {"n": list(n_grid), "k": list(k_grid)},
        "methods": {
            name: [
                method_row(o, d, repeats, latency_cost)
                for o, d in zip(rows, deadlines, strict=True)
            ]
            for name, rows in outcomes.items()
        },
        "controllers": {name: [_describe(c) for c in cs] for name, cs in per_deadline.items()},
    }
    report["targets"] = summarize_targets(report)
    report["targets_by_method"] = targets_by_method(report)
    return report


# -- targets -----------------------------------------------------------------------------------


def _target(value: float, threshold: float, **beside) -> dict:
    return {"value": float(value), "threshold": threshold,
            "met": bool(value >= threshold - TOLERANCE), **beside}  # fmt: skip


def _points(rows: Sequence[dict]) -> tuple[list[float], list[float]]:
    return [r["mean_latency_s"] for r in rows], [r["accuracy"] for r in rows]


def _best_heuristic(methods: dict, names: Sequence[str], d: int) -> str:
    """The most accurate heuristic at deadline index ``d`` (ties: the faster)."""
    return max(names, key=lambda h: (methods[h][d]["accuracy"], -methods[h][d]["mean_latency_s"]))


def summarize_targets(report: dict, policy: str = "policy") -> dict:
    """Issue 13's targets for method ``policy`` (skipped when the report has no such method):

    - ``accuracy_vs_static_best``: the least, over deadlines, of policy minus static_best
      accuracy (at least -0.005);
    - ``latency_saving_vs_static_best``: per deadline ``1 - policy latency / static_best's
      frontier latency at the policy's accuracy`` (the frontier over all static_best's
      deadlines), averaged over the grid (at least 0.25); the same-deadline latency ratio
      policy / static_best is reported beside it;
    - ``accuracy_vs_best_heuristic``: the least, over deadlines, of policy minus the best tuned
      heuristic's accuracy (esc, adaptive_consistency, margin; best = most accurate, ties the
      faster), at least -0.003;
    - ``ahead_of_heuristics``: on average +0.01 accuracy over the best heuristic, or at least
      10% latency saving against the heuristics' joint frontier (all their points).
    """
    methods = report["methods"]
    if policy not in methods or REFERENCE not in methods:
        return {"policy": policy, "evaluated": False,
                "reason": f"no {policy!r} or {REFERENCE!r} method in the report"}  # fmt: skip
    mine, static = methods[policy], methods[REFERENCE]
    lat, acc = _points(mine)
    saving = latency_saving(lat, acc, frontier(*_points(static)))
    ratio = [p / max(s, 1e-12) for p, s in zip(lat, _points(static)[0], strict=True)]
    vs_static = [a - s["accuracy"] for a, s in zip(acc, static, strict=True)]
    rows = [{"deadline_s": r["deadline_s"], "accuracy_minus_static_best": v,
             "latency_saving_vs_static_best": float(s), "latency_ratio_to_static_best": q}
            for r, v, s, q in zip(mine, vs_static, saving, ratio, strict=True)]  # fmt: skip
    repeats = report["repeats"]
    for row, m, s in zip(rows, mine, static, strict=True):
        _add_se(row, "accuracy_minus_static_best", paired_se(m, s, repeats))
    worst = int(np.argmin(vs_static))
    targets = {
        "accuracy_vs_static_best": _target(
            min(vs_static),
            TARGETS["accuracy_vs_static_best"],
            **_noise(rows, worst, "accuracy_minus_static_best", TARGETS["accuracy_vs_static_best"]),
        ),
        "latency_saving_vs_static_best": _target(
            saving.mean(),
            TARGETS["latency_saving_vs_static_best"],
            same_deadline_latency_ratio=float(np.mean(ratio)),
        ),
    }
    heuristics = [h for h in HEURISTICS if h in methods]
    if heuristics:
        targets.update(_heuristic_targets(methods, mine, heuristics, rows, repeats))
    return {"policy": policy, "evaluated": True, "all_met": all(t["met"] for t in targets.values()),
            "targets": targets, "per_deadline": rows}  # fmt: skip


def targets_by_method(report: dict) -> dict[str, dict]:
    """Issue 13's target figures with each controller of the report in the policy's place (all
    but ``static_best``, ``plain`` and the oracle): name -> target -> value.

    Why: "keep the best controller as the default" needs every controller held to the same
    bars on the same draws.  A heuristic's lead is measured against the heuristics' frontier it
    is part of, so it cannot be positive there by much.
    """
    out = {}
    for name in report["methods"]:
        if name in (REFERENCE, ORACLE, "plain"):
            continue
        summary = summarize_targets(report, name)
        out[name] = {key: t["value"] for key, t in summary.get("targets", {}).items()}
    return out


def _add_se(row: dict, key: str, se: float | None) -> None:
    if se is not None:
        row[f"{key}_se"] = se


def _noise(rows: list[dict], worst: int, key: str, threshold: float) -> dict:
    """How precise an accuracy target's measurement is, when the paired errors are known:
    ``se_at_worst``, the standard error of ``key`` at the worst deadline, and
    ``miss_chance_if_equal``, the chance that a method whose outcomes differ from the compared
    one's as much as the policy's do, but which is exactly as accurate in expectation, misses
    the target by noise alone at one deadline or more (normal errors, deadlines taken as
    independent: 1 - prod_d Phi(-threshold / se_d)).

    Why: a floor of a few tenths of a point over 500 problems x a few draws is close to the
    measurement's own noise; this says how close.
    """
    errors = [row.get(f"{key}_se") for row in rows]
    if any(e is None for e in errors):
        return {}
    held = [0.5 * (1.0 + math.erf(-threshold / (e * math.sqrt(2.0)))) if e > 0 else 1.0
            for e in errors]  # fmt: skip
    return {"se_at_worst": errors[worst], "miss_chance_if_equal": float(1.0 - np.prod(held))}


def _heuristic_targets(
    methods: dict, mine: list[dict], names: list[str], rows: list[dict], repeats: int
) -> dict:
    """The two targets against the tuned heuristics (adds their per-deadline figures to
    ``rows``).

    Beside the accuracy target, ``baselines_worst``: the same figure for ``static_best`` and
    each heuristic (its worst accuracy minus the best heuristic's), the bar held to the
    baselines themselves, to read the policy's figure against.
    """
    best = [_best_heuristic(methods, names, d) for d in range(len(mine))]
    gap = [
        row["accuracy"] - methods[b][d]["accuracy"]
        for d, (row, b) in enumerate(zip(mine, best, strict=True))
    ]
    joint = frontier(*_points([row for h in names for row in methods[h]]))
    saving = latency_saving(*_points(mine), joint)
    for d, (row, b, g, s) in enumerate(zip(rows, best, gap, saving, strict=True)):
        row.update(best_heuristic=b, accuracy_minus_best_heuristic=g,
                   latency_saving_vs_heuristics=float(s))  # fmt: skip
        _add_se(row, "accuracy_minus_best_heuristic", paired_se(mine[d], methods[b][d], repeats))
    wanted = TARGETS["ahead_of_heuristics"]
    ahead = {"accuracy_gain": float(np.mean(gap)), "latency_saving": float(saving.mean())}
    met = any(ahead[key] >= wanted[key] - TOLERANCE for key in wanted)
    baselines = {
        name: float(min(methods[name][d]["accuracy"] - methods[b][d]["accuracy"]
                        for d, b in enumerate(best)))
        for name in (REFERENCE, *names) if name in methods
    }  # fmt: skip
    threshold = TARGETS["accuracy_vs_best_heuristic"]
    noise = _noise(rows, int(np.argmin(gap)), "accuracy_minus_best_heuristic", threshold)
    return {
        "accuracy_vs_best_heuristic": _target(
            min(gap), threshold, baselines_worst=baselines, **noise
        ),
        "ahead_of_heuristics": {"value": ahead, "threshold": wanted, "met": met},
    }


# -- files -----------------------------------------------------------------------------------------


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """``report.json`` (written atomically: a temporary file renamed into place) and
    ``report.png`` in folder ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    return out / "report.json", plot_report(report, out / "report.png")


# -- command line ------------------------------------------------------------------------------


@dataclass
class Args:
    """Evaluate a saved race policy (LatencyTTS-v1) on MATH-500 against the tuned baselines."""

    policy: str
    """policy folder written by train.py"""
    deadlines: tuple[float, ...] | None = None
    """deadlines in seconds (default: the policy's evaluation deadlines)"""
    repeats: int = EVAL_REPEATS
    """draws per problem and deadline"""
    seed: int | None = None
    """seed of the draws and of the baselines' tuning (default: the policy's run's seed, so
    that at its own deadlines the report is the run's)"""
    out: str | None = None
    """output folder (default: <policy>/../eval)"""
    tune_problems: int | None = None
    """training problems the baselines are tuned on (default: as many as the policy's run
    tuned them on, else 2,000)"""
    tune_repeats: int = 2
    """draws per training problem when tuning"""
    batch_k: bool = False
    """also evaluate the policy re-drafting with the k fastest for its live batch at every
    decision point (``policy_batch_k``, on each problem's recorded acceptance: the most that
    changing k within a call could add to its stops)"""


def main(args: Args) -> dict:
    """Load the policy, tune the baselines on the training problems ``train.py`` tuned them on
    (``run_training_backends``: so at the run's own deadlines, seed and draws they are the
    run's baselines), evaluate on MATH-500, print and write the report and the races plot;
    returns the report."""
    if args.deadlines is not None:
        check_deadlines(args.deadlines)  # before the slow part
    policy = load_race_policy(args.policy)
    deadlines = check_deadlines(args.deadlines or policy.info.get("deadlines_s") or ())
    profile, config = policy_profile(policy), policy.env_config
    method = policy.info.get("spec_method")
    test = ReplayBackend(profile, "test", method)
    controller = LearnedController(policy.model, RaceEnv(test, policy.featurizer, config))
    train_args = policy.info.get("train", {}).get("args") or {}
    if train_args:
        train, _ = run_training_backends(profile, method, train_args)
    else:  # a policy that records no training arguments: the whole training split
        train = ReplayBackend(profile, "train", method)
    problems = train_args.get("tune_problems", 2000) if args.tune_problems is None else (
        args.tune_problems)  # fmt: skip
    seed = train_args.get("seed", 0) if args.seed is None else args.seed
    tuned = tune_controllers(tuning_sweep(train, deadlines, problems, args.tune_repeats,
                                          seed, config.n_grid, config.k_grid))  # fmt: skip
    methods = {"policy": controller, **tuned}
    if args.batch_k:
        methods["policy_batch_k"] = BatchKDrafting(controller, test, "policy_batch_k")
    report = evaluate_methods(methods, test, deadlines, args.repeats, seed, config.latency_cost,
                              n_grid=config.n_grid, k_grid=config.k_grid)  # fmt: skip
    report["policy"] = {"folder": str(policy.folder), "algorithm": policy.info.get("algorithm")}
    report["tuning"] = {"split": "train", "problems": problems,
                        "repeats": args.tune_repeats, "seed": seed}  # fmt: skip
    out = Path(args.out) if args.out else Path(args.policy).resolve().parent / "eval"
    json_path, png_path = write_report(report, out)
    races = plot_middle_races(test, controller, tuned, deadlines, out, seed)
    print_report(report)
    print(f"report: {json_path}\nplots:  {png_path} {races}")
    return report


def plot_middle_races(
    backend: ReplayBackend,
    policy: RaceController,
    tuned: dict[str, list[RuleController]],
    deadlines: Sequence[float],
    out: Path,
    seed: int,
) -> Path:
    """``races.png`` in ``out``: a few races at the middle deadline of the grid, the policy
    beside the static table and the margin rule, to show where and why each stopped."""
    mid = len(deadlines) // 2
    controllers = {"policy": policy, REFERENCE: tuned[REFERENCE][mid]}
    if "margin" in tuned:
        controllers["margin"] = tuned["margin"][mid]
    return plot_races(backend, controllers, deadlines[mid], out / "races.png", seed=seed)


def cli(argv: Sequence[str] | None = None) -> dict:
    """``main`` on parsed command-line arguments."""
    return main(tyro.cli(Args, args=argv, description=Args.__doc__))


if __name__ == "__main__":
    try:
        cli()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
