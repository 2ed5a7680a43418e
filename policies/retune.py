"""Re-tune a trained stop-value policy for the lead over the heuristics, and score it.

``train.py`` tunes the value network's settings for the fastest one at the static table's full
training accuracy.  Issue 13's lead target asks something else: less latency than the tuned
heuristics at equal accuracy, keeping within 0.5 point of ``static_best`` and 0.3 of the best
heuristic.  This command keeps the run's value network and chooses, per deadline, the setting
(n, k, price, budget) with the largest saving against the heuristics' frontier on the training
draws the run tuned on, among those keeping both floors there (the choice
``policies.saving_bound --transfer`` scores).  It writes the re-tuned policy (served like any
race policy) and its report: the re-tuned policy on the test draws of the run, beside the run's
own baselines, so every target compares the same draws.

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
from env.race_env import RaceEnv
from policies.bound_candidates import STOP_VALUE
from policies.evaluate import evaluate_methods, policy_profile, summarize_targets, write_report
from policies.learned_controller import LearnedController
from policies.report_plots import print_report
from policies.saved_policy import SavedRacePolicy, load_race_policy, save_race_policy
from policies.saving_bound import ACCURACY_SLACK, best_saving, heuristic_yardstick, training_draws
from policies.stop_value import StopSetting, StopValuePolicy

MAX_FLOOR_MARGIN = 0.05
"""The largest margin above the training floors ``retune`` accepts (5 points: far beyond any
accuracy difference between the tuned controllers)."""


def lead_settings(
    policy: SavedRacePolicy, report: dict, floor_margin: float = 0.0
) -> tuple[list[StopSetting], dict]:
    """Per deadline of the run, the setting with the largest saving against the heuristics'
    training frontier among those at least ``floor_margin`` above both floors there (the run's
    own setting where none is); and what was chosen: ``retuned`` (per deadline), the training
    ``floors`` and the chosen settings' ``tuning_accuracy`` (None where kept)."""
    if not isinstance(policy.model, StopValuePolicy):
        raise ValueError(f"{policy.folder} is not a stop-value policy: only its settings can be "
                         "re-tuned (train with --learner stop_value)")  # fmt: skip
    if not 0.0 <= floor_margin <= MAX_FLOOR_MARGIN:
        raise ValueError(f"floor margin {floor_margin} must be a share of accuracy in "
                         f"[0, {MAX_FLOOR_MARGIN}], e.g. 0.002 for 0.2 point")  # fmt: skip
    tuning = training_draws(policy, policy_profile(policy), report)
    methods, families = tuning.world(report)
    stick = heuristic_yardstick(methods, ACCURACY_SLACK)
    if stick is None:
        raise ValueError("the run's report has no tuned heuristics to measure the lead against")
    floors = [f + floor_margin for f in stick.floors]
    chosen = best_saving(families[STOP_VALUE], floors, stick.front, 0.0)
    retuned = [row["setting"] is not None for row in chosen]
    settings = [tuning.replay.setting(row["setting"], d) if moved else policy.model.settings[d]
                for d, (row, moved) in enumerate(zip(chosen, retuned, strict=True))]  # fmt: skip
    return settings, {"retuned": retuned, "floors": stick.floors, "floor_margin": floor_margin,
                      "tuning_accuracy": [row["accuracy"] for row in chosen]}  # fmt: skip


def retune(run: Path, out: Path, floor_margin: float = 0.0) -> dict:
    """Write ``out/policy`` (the re-tuned policy) and ``out/report.json`` (its figures beside
    the run's baselines and targets); returns the report."""
    report_path = run / "report.json"
    if not report_path.is_file() or not (run / "policy").is_dir():
        raise FileNotFoundError(f"{run} is not a train.py run folder (needs report.json and "
                                "policy/)")  # fmt: skip
    report = json.loads(report_path.read_text())
    policy = load_race_policy(run / "policy")
    settings, chosen = lead_settings(policy, report, floor_margin)
    deadlines = report["deadlines_s"]
    note = {"objective": "lead over the heuristics", "from": str(run), **chosen,
            "settings_before": [dataclasses.asdict(s) for s in policy.model.settings]}  # fmt: skip
    model = dataclasses.replace(policy.model, settings=settings,
                                info={**policy.model.info, "retune": note})  # fmt: skip
    folder = out / "policy"
    save_race_policy(folder, model, policy.featurizer, policy.env_config, policy.info)
    if (run / "policy" / "confidence.json").is_file():
        shutil.copy(run / "policy" / "confidence.json", folder / "confidence.json")
    config = policy.env_config
    test = ReplayBackend(policy_profile(policy), "test", report["spec_method"])
    controller = LearnedController(model, RaceEnv(test, policy.featurizer, config))
    mine = evaluate_methods({"policy": controller}, test, deadlines, report["repeats"],
                            report["seed"], config.latency_cost, n_grid=config.n_grid,
                            k_grid=config.k_grid)  # fmt: skip
    methods = {**report["methods"], "policy": mine["methods"]["policy"]}
    note["settings"] = [dataclasses.asdict(s) for s in settings]
    merged = {**report, "methods": methods, "retune": note}
    merged["targets"] = summarize_targets(merged)
    write_report(merged, out)
    return merged


@dataclass
class Args:
    """Re-tune a train.py run's stop-value policy for the lead over the heuristics."""

    run: str
    """train.py output folder (report.json and policy/)"""
    out: str
    """where the re-tuned policy/ and its report.json and report.png go"""
    floor_margin: float = 0.0
    """how far above both accuracy floors a setting must be on the training draws, as a share
    of accuracy (0.002: 0.2 point), to leave room for the test draws' noise"""


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
