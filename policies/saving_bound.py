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
from policies.race_eval import sweep_rules
from policies.report_plots import plot_saving_bound
from policies.saved_policy import load_race_policy
from policies.stop_value import StopValuePolicy
from policies.stop_value_training import (
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
    ``slack`` below ``reference_accuracy`` there (None where no candidate keeps it)."""
    rows = []
    for cands, floor in zip(per_deadline, reference_accuracy, strict=True):
        keep = cands.accuracy >= floor - slack - 1e-12
        if not keep.any():
            rows.append({"saving": None, "accuracy": None, "mean_latency_s": None})
            continue
        saving = latency_saving(cands.latency[keep], cands.accuracy[keep], front)
        i = int(np.argmax(saving))
        rows.append({"saving": float(saving[i]), "accuracy": float(cands.accuracy[keep][i]),
                     "mean_latency_s": float(cands.latency[keep][i])})  # fmt: skip
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
    backend: ReplayBackend,
    deadlines: Sequence[float],
    repeats: int,
    seed: int,
    n_grid: Sequence[int],
    k_grid: Sequence[int],
) -> dict[str, list[Candidates]]:
    """Every vote-rule family's settings on every test draw (``policies.race_eval.sweep_rules``
    on all problems of ``backend``), with shorter horizons."""
    sweep = sweep_rules(backend, deadlines, range(len(backend.problems)), repeats, seed, n_grid,
                        k_grid)  # fmt: skip
    out: dict[str, list[Candidates]] = {}
    for family in {config[0] for config in sweep.correct}:
        configs = [c for c in sweep.correct if c[0] == family]
        out[family] = with_shorter_horizons([
            Candidates(np.array([sweep.accuracy(c, d) for c in configs]),
                       np.array([sweep.mean_latency(c, d) for c in configs]))
            for d in range(len(deadlines))
        ])  # fmt: skip
    return out


def stop_value_candidates(
    model: StopValuePolicy,
    featurizer: ProblemFeaturizer,
    backend: ReplayBackend,
    deadlines: Sequence[float],
    repeats: int,
    seed: int,
    n_grid: Sequence[int],
) -> list[Candidates]:
    """The value network's settings on every test draw: every (n, k, price), with shorter
    horizons (as its tuning)."""
    n_min = model.info.get("args", {}).get("n_min", min(n_grid))
    configs = stop_value_configs(n_grid, backend.k_grid, n_min)
    traces = race_traces(backend, range(len(backend.problems)), repeats, seed, configs)
    table = sweep_stop_value(model.net, traces, prompt_table(backend, featurizer), featurizer,
                             deadlines)  # fmt: skip
    return with_shorter_horizons([
        Candidates(table.accuracy[:, :, d].ravel(), table.latency[:, :, d].ravel())
        for d in range(len(deadlines))
    ])  # fmt: skip


def saving_bound(run: Path, slack: float = ACCURACY_SLACK) -> dict:
    """The bound for a train.py run folder (its ``report.json`` and ``policy``), per family and
    over all families together, beside what the run's policy reached."""
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
    reference = report["methods"][REFERENCE]
    ref_acc = [row["accuracy"] for row in reference]
    front = frontier([row["mean_latency_s"] for row in reference], ref_acc)
    backend = ReplayBackend(policy_profile(policy), "test", report["spec_method"])
    config = policy.env_config
    families = rule_candidates(backend, deadlines, repeats, seed, config.n_grid, config.k_grid)
    if isinstance(policy.model, StopValuePolicy):
        families[STOP_VALUE] = stop_value_candidates(
            policy.model, policy.featurizer, backend, deadlines, repeats, seed, config.n_grid
        )
    families["all"] = [
        Candidates(np.concatenate([f[d].accuracy for f in families.values()]),
                   np.concatenate([f[d].latency for f in families.values()]))
        for d in range(len(deadlines))
    ]  # fmt: skip
    bound = {name: best_saving(cands, ref_acc, front, slack) for name, cands in families.items()}
    achieved = report.get("targets", {}).get("per_deadline", [])
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
    }


def ahead_bound(
    report: dict, families: dict[str, list[Candidates]], slack: float = ACCURACY_SLACK
) -> dict:
    """The bound on being ahead of the heuristics (the module docstring), per family, beside
    what the run's policy reached (empty when the report has no heuristic rows)."""
    methods = report["methods"]
    names = [h for h in HEURISTICS if h in methods]
    if not names:
        return {}
    deadlines = range(len(report["deadlines_s"]))
    best = [max(methods[h][d]["accuracy"] for h in names) for d in deadlines]
    floors = [max(methods[REFERENCE][d]["accuracy"] - slack, b - HEURISTIC_SLACK)
              for d, b in zip(deadlines, best, strict=True)]  # fmt: skip
    joint = frontier([row["mean_latency_s"] for h in names for row in methods[h]],
                     [row["accuracy"] for h in names for row in methods[h]])  # fmt: skip
    out: dict[str, dict] = {}
    for name, cands in sorted(families.items()):
        rows = best_saving(cands, floors, joint, slack=0.0)
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

    static = with_policy(result["families"], "saving", result["policy_saving"])
    _print_table(f"hindsight bound on the latency saving vs {REFERENCE} ({label}; settings tuned "
                 f"on the test draws, accuracy within {100 * result['accuracy_slack']:.1f} point)",
                 deadlines, *static)  # fmt: skip
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
