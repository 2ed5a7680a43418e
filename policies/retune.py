"""Tune a stop-value policy's settings for the lead over the heuristics, and re-tune a run.

Issue 13's lead target asks for less latency than the tuned heuristics at equal accuracy,
keeping within 0.5 point of ``static_best`` and 0.3 of the best heuristic.  ``tune_for_lead``
keeps the value network and chooses, per deadline, the setting (n, k, price, budget) with the
largest saving against the heuristics' frontier on the training draws the baselines were tuned
on, among those clearing both floors there by a margin (the choice ``policies.saving_bound
--transfer`` scores, with the margin).  ``train.py`` applies it by default (``--value.objective
lead``) to the settings the stop-value tuning chose for accuracy, which stay wherever no
setting clears the floors.

The command re-tunes a saved run (for example one trained with ``--value.objective accuracy``,
or to try another margin): it writes the re-tuned policy (served like any race policy) and its
report, the re-tuned policy on the test draws of the run beside the run's own baselines, so
every target compares the same draws.  It re-tunes at every deadline the policy's settings were
tuned at (the run's grid and those between its points), against the baselines tuned there on
the same draws, as ``train.py`` does.

    python -m policies.retune --run RUN_FOLDER --out DIR [--floor-margin 0.002]
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tyro

from env.backends.replay import ReplayBackend
from env.config import RaceEnvConfig
from env.features import ProblemFeaturizer
from env.race_env import RaceEnv
from policies.bound_candidates import STOP_VALUE, Draws
from policies.evaluate import (
    evaluate_methods,
    policy_profile,
    summarize_targets,
    targets_by_method,
    write_report,
)
from policies.learned_controller import LearnedController
from policies.race_controllers import RuleController
from policies.race_eval import (
    BASELINE_TUNING_REPEATS,
    SweepResult,
    sweep_rules,
    tune_controllers,
)
from policies.report_plots import print_report
from policies.saved_policy import load_race_policy, save_race_policy
from policies.saving_bound import (
    ACCURACY_SLACK,
    best_saving,
    heuristic_yardstick,
    tuning_problems,
)
from policies.stop_value import StopSetting, StopValuePolicy
from policies.stop_value_training import LEAD_FLOOR_MARGIN, check_floor_margin


def tune_for_lead(
    model: StopValuePolicy,
    featurizer: ProblemFeaturizer,
    config: RaceEnvConfig,
    backend: ReplayBackend,
    problems: Sequence[int],
    seed: int,
    sweep: SweepResult,
    tuned: dict[str, list[RuleController]],
    floor_margin: float = LEAD_FLOOR_MARGIN,
) -> StopValuePolicy:
    """``model`` with, per deadline it was tuned at, the setting that has the largest saving
    against the tuned heuristics' frontier on the tuning draws (``problems`` x
    ``BASELINE_TUNING_REPEATS`` of ``backend``, the run's ``seed``: the draws the baselines
    were tuned on) among those at least ``floor_margin`` above both floors there (0.5 point
    below ``static_best``, 0.3 below the best heuristic); the accuracy tuning's setting where
    none is (``accuracy_settings``).  ``sweep``: the rules' sweep of those draws at the model's
    deadlines (``policies.race_eval.tuning_sweep``); ``tuned``: the baselines tuned on it
    (``tune_controllers``).  What was chosen goes into ``info["lead_tuning"]``: ``retuned``
    (per deadline), the training ``floors``, the chosen settings' ``tuning_accuracy`` (None
    where kept) and the accuracy tuning's settings (``settings_before``)."""
    check_floor_margin(floor_margin)
    before = accuracy_settings(model)
    tuning = Draws.of(model, featurizer, config, backend, problems, sweep.deadlines_s,
                      BASELINE_TUNING_REPEATS, seed, sweep)  # fmt: skip
    controllers = {name: [dataclasses.asdict(c) for c in table] for name, table in tuned.items()}
    methods, families = tuning.world({"controllers": controllers})
    stick = heuristic_yardstick(methods, ACCURACY_SLACK)
    if stick is None:
        raise ValueError("no tuned heuristics among the baselines to measure the lead against")
    floors = [f + floor_margin for f in stick.floors]
    chosen = best_saving(families[STOP_VALUE], floors, stick.front, 0.0)
    retuned = [row["setting"] is not None for row in chosen]
    settings = [tuning.setting(row["setting"], d) if moved else before[d]
                for d, (row, moved) in enumerate(zip(chosen, retuned, strict=True))]  # fmt: skip
    note = {"objective": "lead over the heuristics", "floor_margin": floor_margin,
            "floors": stick.floors, "retuned": retuned,
            "tuning_accuracy": [row["accuracy"] for row in chosen],
            "settings_before": [dataclasses.asdict(s) for s in before]}  # fmt: skip
    return dataclasses.replace(model, settings=settings,
                               info={**model.info, "lead_tuning": note})  # fmt: skip


def accuracy_settings(model: StopValuePolicy) -> list[StopSetting]:
    """The settings the accuracy tuning chose (``policies.stop_value_training.tune_settings``):
    the model's own, or those it had before a lead tuning.  Why: re-tuning a lead-tuned policy
    with another margin must fall back where ``train.py`` with that margin would."""
    before = model.info.get("lead_tuning", {}).get("settings_before")
    return model.settings if before is None else [StopSetting(**s) for s in before]


def retune(run: Path, out: Path, floor_margin: float = LEAD_FLOOR_MARGIN) -> dict:
    """Write ``out/policy`` (the re-tuned policy) and ``out/report.json`` (its figures beside
    the run's baselines and targets); returns the report."""
    check_floor_margin(floor_margin)
    report_path = run / "report.json"
    if not report_path.is_file() or not (run / "policy").is_dir():
        raise FileNotFoundError(f"{run} is not a train.py run folder (needs report.json and "
                                "policy/)")  # fmt: skip
    report = json.loads(report_path.read_text())
    policy = load_race_policy(run / "policy")
    if not isinstance(policy.model, StopValuePolicy):
        raise ValueError(f"{policy.folder} is not a stop-value policy: only its settings can be "
                         "re-tuned (train with --learner stop_value)")  # fmt: skip
    profile, config = policy_profile(policy), policy.env_config
    backend, problems, seed = tuning_problems(policy, profile, report)
    grid = policy.model.deadlines_s  # the run's grid and the deadlines tuned between its points
    sweep = sweep_rules(backend, grid, problems, BASELINE_TUNING_REPEATS, seed, config.n_grid,
                        config.k_grid)  # fmt: skip
    model = tune_for_lead(policy.model, policy.featurizer, config, backend, problems, seed, sweep,
                          tune_controllers(sweep), floor_margin)  # fmt: skip
    folder = out / "policy"
    save_race_policy(folder, model, policy.featurizer, config, policy.info)
    if (run / "policy" / "confidence.json").is_file():
        shutil.copy(run / "policy" / "confidence.json", folder / "confidence.json")
    deadlines = report["deadlines_s"]
    test = ReplayBackend(profile, "test", report["spec_method"])
    controller = LearnedController(model, RaceEnv(test, policy.featurizer, config))
    mine = evaluate_methods({"policy": controller}, test, deadlines, report["repeats"],
                            report["seed"], config.latency_cost, n_grid=config.n_grid,
                            k_grid=config.k_grid)  # fmt: skip
    methods = {**report["methods"], "policy": mine["methods"]["policy"]}
    note = {**model.info["lead_tuning"], "from": str(run),
            "settings": [dataclasses.asdict(s) for s in model.settings]}  # fmt: skip
    merged = {**report, "methods": methods, "retune": note}
    merged["targets"] = summarize_targets(merged)
    merged["targets_by_method"] = targets_by_method(merged)
    write_report(merged, out)
    return merged


@dataclass
class Args:
    """Re-tune a train.py run's stop-value policy for the lead over the heuristics."""

    run: str
    """train.py output folder (report.json and policy/)"""
    out: str
    """where the re-tuned policy/ and its report.json and report.png go"""
    floor_margin: float = LEAD_FLOOR_MARGIN
    """how far above both accuracy floors a setting must be on the training draws, as a share
    of accuracy (0.002: 0.2 point, train.py's default), to leave room for the test draws'
    noise"""


def main(args: Args) -> dict:
    out = Path(args.out)
    report = retune(Path(args.run), out, args.floor_margin)
    print_report(report)
    settings = [(s["n"], s["k"], s["price"], round(s["budget"], 3))
                for s in report["retune"]["settings"]]  # fmt: skip
    print(f"re-tuned settings (n, k, price, budget): {settings}")
    print(f"policy: {out / 'policy'}\nreport: {out / 'report.json'} {out / 'report.png'}")
    return report


def cli(argv: Sequence[str] | None = None) -> dict:
    return main(tyro.cli(Args, args=sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    cli()
