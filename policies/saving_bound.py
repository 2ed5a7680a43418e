"""The hindsight bound on issue 13's latency saving: how much room the test draws leave.

A missed saving target can mean a weak learner or a profile with little room.  This module
tells the two apart.  It replays every setting of every controller family *on the test draws
themselves* (the draws the report was measured on) and keeps, per deadline, the largest latency
saving against the reference's frontier among the settings that also keep the accuracy target
(at most ``ACCURACY_SLACK`` below the reference at that deadline); any setting may also act as
under a shorter deadline of the grid (``policies.bound_candidates``).  Tuning on the draws it is
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

Part of a bound chosen on the draws it scores is noise, and a controller is tuned on other
problems.  So the same choices are also scored where they were not made: cross-validated (each
half of the test problems chooses, the other half scores) and, with ``transfer``, chosen on the
training draws the run tuned its baselines on and scored on the test draws, and on the
validation draws the run held back (where the run's own stop-value settings are scored too: a
choice between families made on those draws can only follow what they show).

    python -m policies.saving_bound --run RUN_FOLDER [--out DIR] [--transfer]
                                    [--accuracy-slack 0.005]
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tyro

from env.backends.replay import ReplayBackend
from env.profiles.store import Profile, write_json
from policies.bound_candidates import STOP_VALUE, Candidates, Draws, World
from policies.evaluate import HEURISTICS, REFERENCE, TARGETS
from policies.frontier import frontier, latency_saving
from policies.race_eval import (
    BASELINE_TUNING_REPEATS,
    run_training_backends,
    tuning_problem_indices,
)
from policies.report_plots import plot_saving_bound
from policies.saved_policy import SavedRacePolicy, load_race_policy, policy_profile
from policies.stop_value import StopSetting, StopValuePolicy
from policies.stop_value_training import StopValueArgs

ACCURACY_SLACK = -TARGETS["accuracy_vs_static_best"]
"""How far below the reference a setting may be and still count (the accuracy target)."""
HEURISTIC_SLACK = -TARGETS["accuracy_vs_best_heuristic"]
"""How far below the best heuristic a setting may be and still count (the heuristic target)."""


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


def saving_bound(run: Path, slack: float = ACCURACY_SLACK, transfer: bool = False) -> dict:
    """The bound for a train.py run folder (its ``report.json`` and ``policy``), per family and
    over all families together, beside what the run's policy reached; the cross-validated
    figures (``cross_validate``); with ``transfer``, the bound's choices on the training draws
    the run tuned on, scored on the test draws (``choose_and_score``)."""
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
    profile = policy_profile(policy)
    backend = ReplayBackend(profile, "test", report["spec_method"])
    count = len(backend.problems)
    test = Draws.of(policy.model, policy.featurizer, policy.env_config, backend, range(count),
                    deadlines, repeats, seed)  # fmt: skip
    whole = test.world(report)  # every test draw: the report's rows, replayed, and candidates
    families = whole[1]
    static = static_yardstick(report["methods"], slack)
    bound = {name: best_saving(cands, static.floors, static.front, 0.0)
             for name, cands in families.items()}  # fmt: skip
    achieved = report.get("targets", {}).get("per_deadline", [])
    halves = [test.world(report, np.arange(count) % 2 == half) for half in range(2)]
    result = {
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
    if transfer:
        tuning = training_draws(policy, profile, report).world(report)
        scored = choose_and_score([(tuning, whole)], slack)
        result["transferred"] = {"tuned_rows": tuning[0], **scored}
        held = held_out_draws(policy, profile, report)
        held_world = held.world(report)
        validated = choose_and_score([(tuning, held_world)], slack)
        own = policy_scored(held, held_world, policy, slack)
        result["validated"] = {"tuned_rows": held_world[0], **validated, "policy": own}
    return result


class RunProblems(NamedTuple):
    """The training problems a run tuned and validated on, as ``train.py`` chose them: the
    fitting part of the training split (``backend``), the ``tune_problems`` of it the baselines
    were tuned on (``indices``, ``BASELINE_TUNING_REPEATS`` draws each), the run's ``seed``, and
    the problems it held back for validation (``held_out``)."""

    backend: ReplayBackend
    indices: list[int]
    seed: int
    held_out: ReplayBackend


def tuning_problems(policy: SavedRacePolicy, profile: Profile, report: dict) -> RunProblems:
    """The problems the run tuned its baselines on and held back (``RunProblems``)."""
    args = policy.info.get("train", {}).get("args")
    if not args:
        raise ValueError(f"{policy.folder} records no training arguments: cannot rebuild the "
                         "draws it was tuned on")  # fmt: skip
    backend, held_out = run_training_backends(profile, report["spec_method"], args)
    problems = tuning_problem_indices(args["tune_problems"], len(backend.problems), args["seed"])
    return RunProblems(backend, problems, args["seed"], held_out)


def training_draws(policy: SavedRacePolicy, profile: Profile, report: dict) -> Draws:
    """The draws the run tuned its baselines on (``tuning_problems``), every family replayed."""
    backend, problems, seed, _ = tuning_problems(policy, profile, report)
    return Draws.of(policy.model, policy.featurizer, policy.env_config, backend, problems,
                    report["deadlines_s"], BASELINE_TUNING_REPEATS, seed)  # fmt: skip


def held_out_draws(policy: SavedRacePolicy, profile: Profile, report: dict) -> Draws:
    """The validation problems the run held back (``tuning_problems``) x the draws its lead
    tuning checked on each (``--value.validation-repeats``; the default where it ran none),
    every family replayed at the report's deadlines."""
    _, _, seed, held_out = tuning_problems(policy, profile, report)
    value_args = policy.info.get("train", {}).get("args", {}).get("value") or {}
    repeats = value_args.get("validation_repeats") or StopValueArgs.validation_repeats
    return Draws.of(policy.model, policy.featurizer, policy.env_config, held_out,
                    range(len(held_out.problems)), report["deadlines_s"], repeats, seed,
                    label="validation sweep (n, k)")  # fmt: skip


def policy_scored(draws: Draws, world: World, policy: SavedRacePolicy, slack: float) -> dict:
    """The run's own stop-value settings at the report's deadlines on ``draws`` (their
    candidates there), scored as ``choose_and_score`` scores a choice: per target, the saving
    and the accuracy above the floor per deadline (empty for a policy of another kind)."""
    model = policy.model
    if not isinstance(model, StopValuePolicy):
        return {}
    candidates = world[1][STOP_VALUE]
    indices = [
        _candidate_of(draws, candidates[d], model.setting(deadline), d)
        for d, deadline in enumerate(draws.sweep.deadlines_s[i] for i in draws.at)
    ]
    out = {}
    for target, yardstick in (("static", static_yardstick), ("ahead", heuristic_yardstick)):
        stick = yardstick(world[0], slack)
        if stick is not None:
            out[target] = [
                dict(zip(("saving", "above_floor"), _score(c, i, stick, d), strict=True))
                for d, (c, i) in enumerate(zip(candidates, indices, strict=True))
            ]
    return out


def _candidate_of(draws: Draws, cands: Candidates, setting: StopSetting, d: int) -> int:
    """The index of ``setting`` among the stop-value candidates at the ``d``-th deadline."""
    for index in range(len(cands.accuracy)):
        found = draws.setting(index, d)
        same = (found.n, found.k, found.price) == (setting.n, setting.k, setting.price)
        if same and math.isclose(found.budget, setting.budget, rel_tol=1e-9):
            return index
    raise ValueError(f"the setting {setting} is not among the replayed candidates")


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


def cross_validate(halves: Sequence[World], slack: float) -> dict:
    """How much of the bound survives choosing on other draws: per family and deadline, the
    setting the bound would choose on one half of the problems, scored on the other half,
    averaged over both ways (``choose_and_score``).

    Why: the bound picks the best of thousands of settings on the draws it scores, so part of
    it is noise; the cross-validated figure is what a controller would reach if it could tune
    on draws like the test draws but not on them.  ``halves``: the two halves' worlds (their
    tuned baselines' rows are kept as ``tuned_rows``)."""
    first, second = halves
    out = choose_and_score([(first, second), (second, first)], slack)
    return {"tuned_rows": [methods for methods, _ in halves], **out}


def choose_and_score(pairs: Sequence[tuple[World, World]], slack: float) -> dict:
    """Per target (``static``: the saving target's yardstick, ``ahead``: the lead target's),
    family and deadline: the setting the bound chooses in the first world of each pair (the
    largest saving among those keeping the floors there), scored in the second (its saving,
    and its accuracy above the floor there: negative where it misses the target), averaged
    over the pairs."""
    out: dict[str, dict] = {}
    for target, yardstick in (("static", static_yardstick), ("ahead", heuristic_yardstick)):
        sticks = [(yardstick(a[0], slack), yardstick(b[0], slack)) for a, b in pairs]
        if any(x is None or y is None for x, y in sticks):
            continue
        families = {}
        for name in sorted(pairs[0][0][1]):
            ways = []
            for (chosen_in, scored_in), (pick, score) in zip(pairs, sticks, strict=True):
                chosen = best_saving(chosen_in[1][name], pick.floors, pick.front, 0.0)
                ways.append([_score(scored_in[1][name][d], row["setting"], score, d)
                             for d, row in enumerate(chosen)])  # fmt: skip
            rows = []
            for scores in zip(*ways, strict=True):
                if any(x is None for x in scores):
                    rows.append({"saving": None, "above_floor": None})
                else:
                    saving, above = np.mean(scores, axis=0)
                    rows.append({"saving": float(saving), "above_floor": float(above)})
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

    chosen_elsewhere = (
        ("cross_validated", "cross-validated: the bound's choice on one half of the test "
                            "problems, scored on the other"),
        ("transferred", "transferred: the bound's choice on the training draws the run tuned "
                        "on, scored on the test draws"),
        ("validated", "validated: the bound's choice on the training draws, scored on the "
                      "validation draws the run held back (the policy's row: its own settings "
                      "there)"),
    )  # fmt: skip

    def cross_table(target: str, mine: list, against: str) -> None:
        for key, title in chosen_elsewhere:
            if target in result.get(key, {}):
                own = result[key].get("policy", {}).get(target)  # the policy scored there too
                mine_there = mine if own is None else [row["saving"] for row in own]
                _print_table(f"{title} (saving vs {against})", deadlines,
                             *with_policy(result[key][target], "saving", mine_there))  # fmt: skip

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
    transfer: bool = False
    """also choose on the training draws the run tuned on and score on the test draws and on the
    validation draws the run held back (two more replays of every family: 9.2 instead of 6.0
    minutes on the default run, 2 cores)"""
    accuracy_slack: float = ACCURACY_SLACK
    """how far below static_best a setting may be and still count, as a share of accuracy
    (default 0.005: the target's half point; 0 asks what room is left without giving up any
    accuracy)"""


def main(args: Args) -> dict:
    run = Path(args.run)
    result = saving_bound(run, args.accuracy_slack, args.transfer)
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
