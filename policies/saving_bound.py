"""The hindsight bound on issue 13's latency saving: how much room the test draws leave.

A missed saving target can mean a weak learner or a profile with little room.  This module
tells the two apart.  It replays every setting of every controller family *on the test draws
themselves* (the draws the report was measured on) and keeps, per deadline, the largest latency
saving against the reference's frontier among the settings that also keep the accuracy target
(at most ``ACCURACY_SLACK`` below the reference at that deadline); any setting may also act as
under a shorter deadline of the grid (``with_shorter_horizons``).  Tuning on the draws it is
scored on is hindsight, so the figure is optimistic: no controller of a family, with one setting
per deadline tuned anywhere else, reaches more on these draws while keeping the accuracy target.

Families: the vote rules of ``policies.race_controllers.RULE_FAMILIES`` (static (n, k), budget,
margin, ESC, Adaptive-Consistency, each over its thresholds and (n, k)), and, when the run's
policy is a stop-value policy, its own value network under every (n, k, price, budget) the
tuning searches (``policies.stop_value_training``).  The reference is the run's ``static_best``
rows (the published method as the report measured it), so the bound is on the same scale as the
report's ``latency_saving_vs_static_best``.

The same candidates bound the target of being ahead of the heuristics: per deadline, the largest
saving against the tuned heuristics' joint frontier (the report's esc, adaptive_consistency and
margin rows) among the settings that keep both accuracy targets (against ``static_best`` and
against the best heuristic there), and the largest accuracy lead over the best heuristic.

    python -m policies.saving_bound --run RUN_FOLDER [--out DIR] [--accuracy-slack 0.005]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

from env.backends.replay import ReplayBackend
from env.features import ProblemFeaturizer
from env.profiles.store import write_json
from policies.evaluate import HEURISTICS, REFERENCE, TARGETS, policy_profile
from policies.frontier import frontier, latency_saving
from policies.race_eval import SweepResult, sweep_rules
from policies.report_plots import plot_saving_bound
from policies.saved_policy import load_race_policy
from policies.stop_value import StopValuePolicy
from policies.stop_value_training import (
    Traces,
    prompt_table,
    race_traces,
    stop_value_configs,
    sweep_stop_value,
)

ACCURACY_SLACK = -TARGETS["accuracy_vs_static_best"]
"""How far below the reference a setting may be and still count (the accuracy target)."""
HEURISTIC_SLACK = -TARGETS["accuracy_vs_best_heuristic"]
"""How far below the best heuristic a setting may be and still count (the heuristic target)."""
STOP_VALUE = "stop_value"


@dataclass(frozen=True)
class Candidates:
    """A family's settings at one deadline: mean accuracy and mean latency of each."""

    accuracy: np.ndarray
    latency: np.ndarray


def best_saving(
    per_deadline: Sequence[Candidates],
    reference_accuracy: Sequence[float],
    front: np.ndarray,
    slack: float = ACCURACY_SLACK,
) -> list[dict]:
    """Per deadline, the candidate with the largest saving against ``front`` among those at most
    ``slack`` below ``reference_accuracy`` there (None where no candidate keeps it); ``setting``
    is its index among the deadline's candidates."""
    rows = []
    for cands, floor in zip(per_deadline, reference_accuracy, strict=True):
        keep = cands.accuracy >= floor - slack - 1e-12
        if not keep.any():
            rows.append({"saving": None, "accuracy": None, "mean_latency_s": None,
                         "setting": None})  # fmt: skip
            continue
        saving = latency_saving(cands.latency[keep], cands.accuracy[keep], front)
        i = int(np.argmax(saving))
        rows.append({"saving": float(saving[i]), "accuracy": float(cands.accuracy[keep][i]),
                     "mean_latency_s": float(cands.latency[keep][i]),
                     "setting": int(np.flatnonzero(keep)[i])})  # fmt: skip
    return rows


def best_lead(per_deadline: Sequence[Candidates], best_accuracy: Sequence[float]) -> list[float]:
    """Per deadline, the most accurate candidate's lead over ``best_accuracy``."""
    return [float(c.accuracy.max() - b) for c, b in zip(per_deadline, best_accuracy, strict=True)]


def with_shorter_horizons(per_deadline: Sequence[Candidates]) -> list[Candidates]:
    """At each deadline, the settings there and every setting read at a shorter deadline of the
    grid: any controller may act as under a shorter deadline (a budget, as the stop-value
    tuning allows)."""
    return [
        Candidates(np.concatenate([c.accuracy for c in per_deadline[: d + 1]]),
                   np.concatenate([c.latency for c in per_deadline[: d + 1]]))
        for d in range(len(per_deadline))
    ]  # fmt: skip


def rule_candidates(
    sweep: SweepResult, draws: np.ndarray | None = None
) -> dict[str, list[Candidates]]:
    """Every vote-rule family's settings (a ``policies.race_eval.sweep_rules`` sweep) on the
    flagged draws (all when None), with shorter horizons."""
    keep = slice(None) if draws is None else draws
    out: dict[str, list[Candidates]] = {}
    for family in {config[0] for config in sweep.correct}:
        configs = [c for c in sweep.correct if c[0] == family]
        out[family] = with_shorter_horizons([
            Candidates(np.array([sweep.correct[c][d][keep].mean() for c in configs]),
                       np.array([sweep.latency[c][d][keep].mean() for c in configs]))
            for d in range(len(sweep.deadlines_s))
        ])  # fmt: skip
    return out


@dataclass
class StopValueReplay:
    """The run's value network replayed on every test draw under every (n, k) it tunes over."""

    model: StopValuePolicy
    featurizer: ProblemFeaturizer
    traces: Traces
    prompts: np.ndarray
    deadlines: Sequence[float]

    @classmethod
    def on(
        cls,
        model: StopValuePolicy,
        featurizer: ProblemFeaturizer,
        backend: ReplayBackend,
        deadlines: Sequence[float],
        repeats: int,
        seed: int,
        n_grid: Sequence[int],
    ) -> StopValueReplay:
        n_min = model.info.get("args", {}).get("n_min", min(n_grid))
        configs = stop_value_configs(n_grid, backend.k_grid, n_min)
        traces = race_traces(backend, range(len(backend.problems)), repeats, seed, configs)
        return cls(model, featurizer, traces, prompt_table(backend, featurizer), deadlines)

    def candidates(self, problems: np.ndarray | None = None) -> list[Candidates]:
        """Every (n, k, price) on the draws of the flagged problems (all when None), with
        shorter horizons (as its tuning)."""
        counted = None if problems is None else problems[self.traces.problem]
        table = sweep_stop_value(self.model.net, self.traces, self.prompts, self.featurizer,
                                 self.deadlines, counted=counted)  # fmt: skip
        return with_shorter_horizons([
            Candidates(table.accuracy[:, :, d].ravel(), table.latency[:, :, d].ravel())
            for d in range(len(self.deadlines))
        ])  # fmt: skip


def rows_on(sweep: SweepResult, controllers: Sequence[dict], draws: np.ndarray) -> list[dict]:
    """A tuned rule controller's rows (accuracy, mean latency per deadline; ``controllers``: its
    report entries) on the flagged draws, read off the sweep."""
    rows = []
    for d, c in enumerate(controllers):
        key = (c["family"], c["threshold"], c["n"], c["k"])
        rows.append({"accuracy": float(sweep.correct[key][d][draws].mean()),
                     "mean_latency_s": float(sweep.latency[key][d][draws].mean())})  # fmt: skip
    return rows


def saving_bound(run: Path, slack: float = ACCURACY_SLACK) -> dict:
    """The bound for a train.py run folder (its ``report.json`` and ``policy``), per family and
    over all families together, beside what the run's policy reached; and the cross-validated
    figures (``cross_validate``)."""
    if not 0.0 <= slack < 1.0:
        raise ValueError(f"accuracy slack {slack} must be a share of accuracy in [0, 1), e.g. "
                         "0.005 for half a point")  # fmt: skip
    report_path = run / "report.json"
    if not report_path.is_file() or not (run / "policy").is_dir():
        raise FileNotFoundError(f"{run} is not a train.py run folder (needs report.json and "
                                "policy/)")  # fmt: skip
    report = json.loads(report_path.read_text())
    if REFERENCE not in report["methods"]:
        raise ValueError(f"{report_path} has no {REFERENCE!r} rows to measure against")
    policy = load_race_policy(run / "policy")
    deadlines, repeats, seed = report["deadlines_s"], report["repeats"], report["seed"]
    backend = ReplayBackend(policy_profile(policy), "test", report["spec_method"])
    config = policy.env_config
    count = len(backend.problems)
    sweep = sweep_rules(backend, deadlines, range(count), repeats, seed, config.n_grid,
                        config.k_grid)  # fmt: skip
    replay = None
    if isinstance(policy.model, StopValuePolicy):
        replay = StopValueReplay.on(policy.model, policy.featurizer, backend, deadlines, repeats,
                                    seed, config.n_grid)  # fmt: skip
    problem_of_draw = np.repeat(np.arange(count), repeats)  # the sweep's draw order

    def families_on(problems: np.ndarray | None) -> dict[str, list[Candidates]]:
        families = rule_candidates(sweep, None if problems is None else problems[problem_of_draw])
        if replay is not None:
            families[STOP_VALUE] = replay.candidates(problems)
        families["all"] = [
            Candidates(np.concatenate([f[d].accuracy for f in families.values()]),
                       np.concatenate([f[d].latency for f in families.values()]))
            for d in range(len(deadlines))
        ]  # fmt: skip
        return families

    families = families_on(None)
    static = static_yardstick(report["methods"], slack)
    bound = {name: best_saving(cands, static.floors, static.front, 0.0)
             for name, cands in families.items()}  # fmt: skip
    achieved = report.get("targets", {}).get("per_deadline", [])
    halves = []
    for half in range(2):
        problems = np.arange(count) % 2 == half
        tuned = {name: rows_on(sweep, report["controllers"][name], problems[problem_of_draw])
                 for name in (REFERENCE, *HEURISTICS) if name in report["controllers"]}  # fmt: skip
        halves.append((tuned, families_on(problems)))
    return {
        "run": str(run),
        "profile": report["profile"],
        "deadlines_s": deadlines,
        "num_problems": report["num_problems"],
        "repeats": repeats,
        "accuracy_slack": slack,
        "families": {
            name: {"per_deadline": rows, "mean_saving": _mean(rows)}
            for name, rows in sorted(bound.items())
        },
        "policy_saving": [row["latency_saving_vs_static_best"] for row in achieved],
        "ahead_of_heuristics": ahead_bound(report, families, slack),
        "cross_validated": cross_validate(halves, slack),
    }


@dataclass(frozen=True)
class Yardstick:
    """What a setting is held to at each deadline: the accuracy it must keep (``floors``) and
    the frontier its latency is measured against (``front``)."""

    floors: list[float]
    front: np.ndarray


def static_yardstick(methods: dict, slack: float) -> Yardstick:
    """The saving target's: within ``slack`` of static_best, against its frontier."""
    rows = methods[REFERENCE]
    accuracy = [row["accuracy"] for row in rows]
    front = frontier([row["mean_latency_s"] for row in rows], accuracy)
    return Yardstick([a - slack for a in accuracy], front)


def heuristic_yardstick(methods: dict, slack: float) -> Yardstick | None:
    """The lead target's: within ``slack`` of static_best and ``HEURISTIC_SLACK`` of the best
    heuristic, against the heuristics' joint frontier (None without heuristic rows)."""
    names = [h for h in HEURISTICS if h in methods]
    if not names:
        return None
    best = _best_heuristic_accuracy(methods, names)
    floors = [max(s - slack, b - HEURISTIC_SLACK) for s, b in
              zip(static_yardstick(methods, 0.0).floors, best, strict=True)]  # fmt: skip
    joint = frontier([row["mean_latency_s"] for h in names for row in methods[h]],
                     [row["accuracy"] for h in names for row in methods[h]])  # fmt: skip
    return Yardstick(floors, joint)


def _best_heuristic_accuracy(methods: dict, names: Sequence[str]) -> list[float]:
    return [max(methods[h][d]["accuracy"] for h in names) for d in range(len(methods[names[0]]))]


def ahead_bound(
    report: dict, families: dict[str, list[Candidates]], slack: float = ACCURACY_SLACK
) -> dict:
    """The bound on being ahead of the heuristics (the module docstring), per family, beside
    what the run's policy reached (empty when the report has no heuristic rows)."""
    methods = report["methods"]
    stick = heuristic_yardstick(methods, slack)
    if stick is None:
        return {}
    names = [h for h in HEURISTICS if h in methods]
    best = _best_heuristic_accuracy(methods, names)
    out: dict[str, dict] = {}
    for name, cands in sorted(families.items()):
        rows = best_saving(cands, stick.floors, stick.front, slack=0.0)
        lead = best_lead(cands, best)
        for row, gain in zip(rows, lead, strict=True):
            row["accuracy_lead"] = gain
        out[name] = {"per_deadline": rows, "mean_saving": _mean(rows),
                     "mean_accuracy_lead": float(np.mean(lead))}  # fmt: skip
    achieved = report.get("targets", {}).get("per_deadline", [])
    return {
        "heuristics": names,
        "accuracy_slack": HEURISTIC_SLACK,
        "threshold": TARGETS["ahead_of_heuristics"],
        "families": out,
        "policy_saving": [row.get("latency_saving_vs_heuristics") for row in achieved],
        "policy_accuracy_lead": [row.get("accuracy_minus_best_heuristic") for row in achieved],
    }


def cross_validate(
    halves: Sequence[tuple[dict, dict[str, list[Candidates]]]], slack: float
) -> dict:
    """How much of the bound survives choosing on other draws: per family and deadline, the
    setting the bound would choose on one half of the problems, scored on the other half (its
    saving, and its accuracy above the floor there: negative where it misses the target),
    averaged over both ways.

    Why: the bound picks the best of thousands of settings on the draws it scores, so part of
    it is noise; the cross-validated figure is what a controller would reach if it could tune
    on draws like the test draws but not on them.  ``halves``: per half, the tuned baselines'
    rows there (``rows_on``; kept as ``tuned_rows``) and the families' candidates there."""
    out: dict[str, dict] = {"tuned_rows": [methods for methods, _ in halves]}
    for target, yardstick in (("static", static_yardstick), ("ahead", heuristic_yardstick)):
        sticks = [yardstick(methods, slack) for methods, _ in halves]
        if any(stick is None for stick in sticks):
            continue
        families = {}
        for name in sorted(halves[0][1]):
            ways = []
            for pick, other in ((0, 1), (1, 0)):
                chosen = best_saving(halves[pick][1][name], sticks[pick].floors,
                                     sticks[pick].front, 0.0)  # fmt: skip
                ways.append([_score(halves[other][1][name][d], row["setting"], sticks[other], d)
                             for d, row in enumerate(chosen)])  # fmt: skip
            rows = [
                {"saving": None, "above_floor": None} if a is None or b is None
                else {"saving": (a[0] + b[0]) / 2, "above_floor": (a[1] + b[1]) / 2}
                for a, b in zip(*ways, strict=True)
            ]  # fmt: skip
            families[name] = {"per_deadline": rows, "mean_saving": _mean(rows)}
        out[target] = families
    return out


def _score(
    cands: Candidates, setting: int | None, stick: Yardstick, d: int
) -> tuple[float, float] | None:
    """A chosen setting's saving against ``stick``'s frontier and its accuracy above the floor."""
    if setting is None:
        return None
    accuracy, latency = cands.accuracy[setting], cands.latency[setting]
    saving = latency_saving([latency], [accuracy], stick.front)[0]
    return float(saving), float(accuracy - stick.floors[d])


def _mean(rows: list[dict]) -> float | None:
    """Mean saving over the grid, None when a deadline has no setting that keeps the accuracy."""
    return _mean_of([row["saving"] for row in rows])


def _mean_of(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def _pct(v: float | None) -> str:
    return "  n/a" if v is None else f"{100 * v:5.1f}"


def _print_table(
    title: str, deadlines: Sequence[float], rows: dict[str, list], mean: dict[str, float | None]
) -> None:
    """One line per family (percent, or points for accuracy) and its grid mean."""
    print(title)
    print(f"{'family':22s} " + " ".join(f"{d:>5g}" for d in deadlines) + "   mean")
    for name, values in rows.items():
        print(f"{name:22s} " + " ".join(_pct(v) for v in values) + f"  {_pct(mean[name])}")


def print_bound(result: dict) -> None:
    """The bounds as tables: per family and deadline, and the grid mean; the policy as trained
    last."""
    label, deadlines = result["profile"]["label"], result["deadlines_s"]
    policy = "policy (as trained)"

    def with_policy(fams: dict, key: str, mine: list) -> tuple[dict, dict]:
        rows = {name: [r[key] for r in fam["per_deadline"]] for name, fam in fams.items()}
        means = {name: _mean_of(values) for name, values in rows.items()}
        if mine and None not in mine:
            rows[policy], means[policy] = mine, float(np.mean(mine))
        return rows, means

    cross = result.get("cross_validated", {})

    def cross_table(target: str, mine: list, against: str) -> None:
        if target in cross:
            _print_table(f"cross-validated: the bound's choice on one half of the problems, "
                         f"scored on the other (saving vs {against})", deadlines,
                         *with_policy(cross[target], "saving", mine))  # fmt: skip

    static = with_policy(result["families"], "saving", result["policy_saving"])
    _print_table(f"hindsight bound on the latency saving vs {REFERENCE} ({label}; settings tuned "
                 f"on the test draws, accuracy within {100 * result['accuracy_slack']:.1f} point)",
                 deadlines, *static)  # fmt: skip
    cross_table("static", result["policy_saving"], REFERENCE)
    ahead = result.get("ahead_of_heuristics")
    if not ahead:
        return
    both = (f"within {100 * result['accuracy_slack']:.1f} point of {REFERENCE} and "
            f"{100 * ahead['accuracy_slack']:.1f} of the best heuristic")  # fmt: skip
    _print_table(f"hindsight bound on the latency saving vs the heuristics' joint frontier "
                 f"(accuracy {both})", deadlines,
                 *with_policy(ahead["families"], "saving", ahead["policy_saving"]))  # fmt: skip
    _print_table("hindsight bound on the accuracy lead over the best heuristic (points)",
                 deadlines, *with_policy(ahead["families"], "accuracy_lead",
                                         ahead["policy_accuracy_lead"]))  # fmt: skip
    cross_table("ahead", ahead["policy_saving"], "the heuristics' joint frontier")


@dataclass
class Args:
    """The hindsight bound on the latency saving for a train.py run folder."""

    run: str
    """train.py output folder (report.json and policy/)"""
    out: str | None = None
    """where saving_bound.json and saving_bound.png go (default: the run folder)"""
    accuracy_slack: float = ACCURACY_SLACK
    """how far below static_best a setting may be and still count, as a share of accuracy
    (default 0.005: the target's half point; 0 asks what room is left without giving up any
    accuracy)"""


def main(args: Args) -> dict:
    run = Path(args.run)
    result = saving_bound(run, args.accuracy_slack)
    print_bound(result)
    out = Path(args.out or run)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "saving_bound.json", result)
    target = TARGETS["latency_saving_vs_static_best"]
    plot = plot_saving_bound(result, out / "saving_bound.png", target)
    print(f"written: {out / 'saving_bound.json'} {plot}")
    return result


def cli(argv: Sequence[str] | None = None) -> dict:
    return main(tyro.cli(Args, args=sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    cli()
