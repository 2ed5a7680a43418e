"""train.py end to end on a fake profile: the saved race policy, the report, and evaluation."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from env.config import RACE_ENV_ID
from policies.bench_decisions import main as bench_decisions_main
from policies.bound_candidates import Draws
from policies.evaluate import Args
from policies.evaluate import main as evaluate_main
from policies.frontier import frontier, latency_saving
from policies.race_eval import (
    BASELINE_TUNING_REPEATS,
    sweep_rules,
    tune_controllers,
)
from policies.retune import Args as RetuneArgs
from policies.retune import floor_pairs, lead_yardstick, tune_for_lead, validation_draws
from policies.retune import main as retune_main
from policies.saved_policy import load_race_policy, policy_profile
from policies.saving_bound import Args as SavingBoundArgs
from policies.saving_bound import main as saving_bound_main
from policies.saving_bound import tuning_problems
from policies.stop_value_training import LEAD_FLOOR_MARGIN, StopValueArgs, tuning_deadlines
from tests.fake_profile import make_fake_profile

ROOT = Path(__file__).resolve().parents[2]
METHODS = {"policy", "static_best", "static_budget", "margin", "esc", "adaptive_consistency",
           "plain", "oracle"}  # fmt: skip


def _train(root: Path, *extra: str) -> tuple[Path, str]:
    """One short train.py run on a fake profile (W&B disabled); returns its folder and output."""
    profile = make_fake_profile(root / "fake-train", n_train=200, n_test=30, n_branches=8)
    out = root / "run"
    command = [
        sys.executable, "train.py", "--profile", str(profile), *extra, "--timesteps", "512",
        "--wandb", "disabled", "--out", str(out), "--deadlines", "0.5", "1", "2", "4",
        "--n-envs", "2", "--n-steps", "64", "--batch-size", "64", "--val-problems", "30",
        "--tune-problems", "60", "--value.tune-problems", "60", "--teach-episodes", "200",
        "--eval-repeats", "1",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short train.py run with the default learner (stop-value), under a seed other than
    the default (commands that reuse the run must take its seed from it)."""
    return _train(tmp_path_factory.mktemp("train"), "--seed", "3")


def test_the_ppo_learner_still_trains_and_saves_an_sb3_policy(tmp_path):
    out, _ = _train(tmp_path, "--learner", "ppo")
    policy = load_race_policy(out / "policy")
    assert policy.info["algorithm"] == "PPO" and (out / "policy/model.zip").is_file()
    assert policy.info["selection"]["kept"] in {"start", "final"}


def test_train_writes_report_plot_and_policy(trained):
    out, stdout = trained
    for name in (
        "report.json",
        "report.png",
        "races.png",
        "policy/policy.json",
        "policy/stop_value.json",  # the default learner's policy (policies.stop_value)
    ):
        assert (out / name).is_file(), name
    assert "synthetic profile" in stdout and str(out / "report.json") in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["profile"]["synthetic"] is True and report["profile"]["name"] == "fake-train"
    assert report["deadlines_s"] == [0.5, 1.0, 2.0, 4.0]
    assert set(report["methods"]) == METHODS
    for rows in report["methods"].values():
        assert [r["deadline_s"] for r in rows] == report["deadlines_s"]
        for row in rows:
            assert 0 <= row["accuracy"] <= 1 and row["mean_latency_s"] <= row["deadline_s"]
            assert row["p95_latency_s"] <= row["deadline_s"] + 1e-9
    oracle = report["methods"]["oracle"]
    for rows in report["methods"].values():
        assert all(o["accuracy"] >= r["accuracy"] for o, r in zip(oracle, rows, strict=True))
    assert report["targets"]["evaluated"] and "latency_saving_vs_static_best" in str(report)
    assert 0 <= report["confidence"]["ece"] <= 1 and (out / "policy/confidence.json").is_file()


def test_saved_policy_is_a_race_policy_with_its_baselines(trained):
    out, _ = trained
    policy = load_race_policy(out / "policy")
    assert policy.info["env_id"] == RACE_ENV_ID
    assert policy.env_config.n_grid == (1, 2, 4, 8) and policy.env_config.k_grid
    assert policy.info["selection"]["kept"] == "stop_value"
    assert policy.info["algorithm"] == "StopValue"  # the default learner
    assert set(policy.info["baselines"]) >= {"static_best", "margin", "esc"}


def test_evaluate_command_reuses_a_saved_policy(trained, tmp_path):
    out, _ = trained
    report = evaluate_main(Args(policy=str(out / "policy"), deadlines=(0.7, 3.0), repeats=1,
                                out=str(tmp_path), tune_problems=40, batch_k=True))  # fmt: skip
    assert report["deadlines_s"] == [0.7, 3.0] and "policy" in report["methods"]
    assert len(report["methods"]["policy_batch_k"]) == 2  # --batch-k: the policy re-drafting
    assert "policy_batch_k" in report["targets_by_method"]
    assert (tmp_path / "report.json").is_file() and (tmp_path / "races.png").is_file()


def test_evaluate_at_the_runs_own_deadlines_reproduces_its_report(trained, tmp_path):
    """The command tunes the baselines on the problems train.py tuned them on (the training
    split less the validation problems, as many as the run tuned on), so at the run's
    deadlines, draws and seed every row of its report comes back, the policy's included."""
    out, _ = trained
    run = json.loads((out / "report.json").read_text())
    args = Args(
        policy=str(out / "policy"),
        deadlines=tuple(run["deadlines_s"]),
        repeats=run["repeats"],
        out=str(tmp_path),
    )  # tune_problems and seed: the run's (60 and 3)
    again = evaluate_main(args)
    assert again["tuning"]["seed"] == 3
    for name, rows in run["methods"].items():
        assert again["methods"][name] == rows, name


def test_the_saving_bound_covers_the_policy_and_every_tuned_baseline(trained, tmp_path):
    """Each family's hindsight bound is at least what its tuned controller reached on the same
    test draws (the tuned setting is one of the bound's candidates) wherever that controller
    kept the accuracy target; "all" is at least every family's."""
    out, _ = trained
    result = saving_bound_main(SavingBoundArgs(run=str(out), out=str(tmp_path)))
    assert (tmp_path / "saving_bound.json").is_file() and (tmp_path / "saving_bound.png").is_file()
    report = json.loads((out / "report.json").read_text())
    static = report["methods"]["static_best"]
    front = frontier([r["mean_latency_s"] for r in static], [r["accuracy"] for r in static])
    families = result["families"]
    assert {"static_best", "margin", "esc", "adaptive_consistency", "stop_value", "all"} <= set(
        families
    )
    reached = {name: report["methods"][name] for name in ("margin", "esc", "static_best")}
    reached["stop_value"] = report["methods"]["policy"]
    checked = 0
    for name, rows in reached.items():
        for d, row in enumerate(rows):
            if row["accuracy"] < static[d]["accuracy"] - 0.005:
                continue
            saving = latency_saving([row["mean_latency_s"]], [row["accuracy"]], front)[0]
            assert families[name]["per_deadline"][d]["saving"] >= saving - 1e-9, (name, d)
            checked += 1
    assert checked >= len(static)  # static_best keeps its own accuracy at every deadline
    for d in range(len(static)):
        values = [f["per_deadline"][d]["saving"] for f in families.values()]
        assert families["all"]["per_deadline"][d]["saving"] == max(
            v for v in values if v is not None
        )
    halves = result["cross_validated"]["tuned_rows"]  # 30 test problems: two halves of 15
    for name in ("static_best", "margin", "esc", "adaptive_consistency"):
        for d, row in enumerate(report["methods"][name]):  # the sweep replays the evaluation
            split = [half[name][d]["accuracy"] for half in halves]
            assert np.mean(split) == pytest.approx(row["accuracy"], abs=1e-9), (name, d)
    for name in ("static", "ahead"):
        assert set(result["cross_validated"][name]) == set(families)
    moved = saving_bound_main(SavingBoundArgs(run=str(out), out=str(tmp_path), transfer=True))
    tuning = moved["transferred"]["tuned_rows"]["static_best"]  # the draws train.py tuned on
    model = load_race_policy(out / "policy").model
    by_deadline = dict(
        zip(model.deadlines_s, model.info["tuning"]["static_best_accuracy"], strict=True)
    )  # the policy's tuning deadlines: more than the grid's
    recorded = [by_deadline[d] for d in report["deadlines_s"]]
    chosen, n_min = report["controllers"]["static_best"], model.info["args"]["n_min"]
    for d, row in enumerate(tuning):  # its tuning took the most accurate (n, k) on these draws
        assert row["accuracy"] >= recorded[d] - 1e-9  # recorded: the best with n >= n_min
        if chosen[d]["n"] >= n_min:
            assert row["accuracy"] == pytest.approx(recorded[d], abs=1e-9)
    assert set(moved["transferred"]["ahead"]) == set(families)
    assert set(moved["validated"]["ahead"]) == set(families)
    # the policy's own settings on the validation draws, read off the bound's candidates, agree
    # with what the lead tuning recorded of its check on the same draws (another code path)
    check, margin = (
        model.info["lead_tuning"]["validation"],
        model.info["lead_tuning"]["floor_margin"],
    )
    own = moved["validated"]["policy"]["ahead"]
    compared = 0
    for d, deadline in enumerate(report["deadlines_s"]):
        i = model.deadlines_s.index(deadline)
        if check["accuracy"][i] is not None:
            recorded_above = check["accuracy"][i] - (check["floors"][i] - margin)
            assert own[d]["above_floor"] == pytest.approx(recorded_above, abs=1e-9), d
            compared += 1
    assert compared > 0  # the lead tuning moved at least one grid deadline of this run
    strict = saving_bound_main(SavingBoundArgs(run=str(out), out=str(tmp_path), accuracy_slack=0))
    assert strict["accuracy_slack"] == 0
    for name, family in strict["families"].items():  # fewer settings count: never more room
        for d, row in enumerate(family["per_deadline"]):
            loose = families[name]["per_deadline"][d]["saving"]
            assert row["saving"] is None or row["saving"] <= loose + 1e-12
    ahead = result["ahead_of_heuristics"]
    joint = frontier(
        [r["mean_latency_s"] for h in ahead["heuristics"] for r in report["methods"][h]],
        [r["accuracy"] for h in ahead["heuristics"] for r in report["methods"][h]],
    )
    best = [max(report["methods"][h][d]["accuracy"] for h in ahead["heuristics"])
            for d in range(len(static))]  # fmt: skip
    for d, row in enumerate(report["methods"]["policy"]):
        lead = ahead["families"]["stop_value"]["per_deadline"][d]["accuracy_lead"]
        assert lead >= row["accuracy"] - best[d] - 1e-9
        if row["accuracy"] >= max(static[d]["accuracy"] - 0.005, best[d] - 0.003):
            saving = latency_saving([row["mean_latency_s"]], [row["accuracy"]], joint)[0]
            assert ahead["families"]["stop_value"]["per_deadline"][d]["saving"] >= saving - 1e-9


def test_retuning_for_the_lead_keeps_the_network_and_scores_on_the_runs_draws(trained, tmp_path):
    """``policies.retune`` keeps the value network, changes only the settings, writes a policy
    that loads and serves, and reports it beside the run's own baselines (same rows)."""
    out, _ = trained
    report = retune_main(RetuneArgs(run=str(out), out=str(tmp_path)))
    run_report = json.loads((out / "report.json").read_text())
    for name, rows in run_report["methods"].items():
        if name != "policy":
            assert report["methods"][name] == rows  # the run's baselines, untouched
    assert report["targets"]["evaluated"] and len(report["methods"]["policy"]) == len(rows)
    before, after = load_race_policy(out / "policy"), load_race_policy(tmp_path / "policy")
    assert np.array_equal(before.model.net.weights[0], after.model.net.weights[0])
    kept = [s for s, moved in zip(after.model.settings, report["retune"]["retuned"], strict=True)
            if not moved]  # fmt: skip
    assert all(s in before.model.settings for s in kept)
    assert all(0 < s.budget <= 1 for s in after.model.settings)
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report.png").is_file()


def test_retuning_with_a_floor_margin_keeps_it_on_the_training_draws(trained, tmp_path):
    """Every re-tuned setting clears both training floors by the margin, and a deadline
    re-tuned with a margin is re-tuned without one (a setting that clears floor + margin clears
    the floor); a negative margin is refused."""
    out, _ = trained
    margin = 0.01
    wide = retune_main(RetuneArgs(run=str(out), out=str(tmp_path / "a"), floor_margin=margin))
    plain = retune_main(RetuneArgs(run=str(out), out=str(tmp_path / "b"), floor_margin=0.0))
    wide, plain = wide["retune"], plain["retune"]
    assert wide["floors"] == plain["floors"] and wide["floor_margin"] == margin
    for moved, accuracy, floor in zip(wide["retuned"], wide["tuning_accuracy"], wide["floors"],
                                      strict=True):  # fmt: skip
        assert (accuracy is not None) == moved
        assert not moved or accuracy >= floor + margin - 1e-12
    assert all(p for w, p in zip(wide["retuned"], plain["retuned"], strict=True) if w)
    # where nothing clears the margin, the accuracy tuning's setting, as train.py would keep it
    first = load_race_policy(out / "policy").model.info["lead_tuning"]["settings_before"]
    assert wide["settings_before"] == plain["settings_before"] == first
    for moved, setting, accurate in zip(wide["retuned"], wide["settings"], first, strict=True):
        assert moved or setting == accurate
    with pytest.raises(ValueError, match=r"floor margin -0\.01 must be a share"):
        retune_main(RetuneArgs(run=str(out), out=str(tmp_path / "c"), floor_margin=-0.01))


def test_train_tunes_for_the_lead_as_the_retune_command_does(trained, tmp_path):
    """train.py's default objective (lead) chooses what ``policies.retune`` chooses on the saved
    run with the same margin: the same tuning draws, the same candidates, the same floors."""
    out, _ = trained
    policy = load_race_policy(out / "policy")
    note = policy.model.info["lead_tuning"]
    assert note["floor_margin"] == LEAD_FLOOR_MARGIN
    grid = json.loads((out / "report.json").read_text())["deadlines_s"]
    tuned_at = tuning_deadlines(grid, StopValueArgs().between)
    assert policy.model.deadlines_s == tuned_at and len(tuned_at) == 16  # 4 + 4 x 3 between
    assert len(note["retuned"]) == len(tuned_at)
    again = retune_main(RetuneArgs(run=str(out), out=str(tmp_path)))
    assert load_race_policy(tmp_path / "policy").model.settings == policy.model.settings
    assert again["retune"]["floors"] == note["floors"]
    assert again["retune"]["tuning_accuracy"] == note["tuning_accuracy"]
    assert again["retune"]["tuning_saving"] == note["tuning_saving"]
    for moved, saving in zip(note["retuned"], note["tuning_saving"], strict=True):
        assert (saving is not None) == moved
    assert again["retune"]["validation"] == note["validation"]


def test_lead_tuned_settings_clear_both_floors_on_the_validation_draws_too(trained, tmp_path):
    """With the validation check (train.py's default), every re-tuned setting clears both floors
    on the held-out problems' draws as well as on the tuning draws; without it (0 draws) the
    check is absent, and a deadline re-tuned with it is re-tuned without it."""
    out, stdout = trained
    assert "each clearing both floors on 240 validation draws too" in stdout  # train.py says so
    checked = retune_main(RetuneArgs(run=str(out), out=str(tmp_path / "a")))["retune"]
    plain = retune_main(RetuneArgs(run=str(out), out=str(tmp_path / "b"), validation_repeats=0))
    plain = plain["retune"]
    check = checked["validation"]
    assert plain["validation"] is None
    assert check["draws"] == 30 * StopValueArgs().validation_repeats  # --val-problems 30
    rows = zip(checked["retuned"], check["accuracy"], check["floors"], check["passed"],
               strict=True)  # fmt: skip
    for moved, accuracy, floor, passed in rows:
        assert (accuracy is not None) == moved
        assert not moved or (accuracy >= floor - 1e-12 and passed >= 1)
    for moved, unchecked in zip(checked["retuned"], plain["retuned"], strict=True):
        assert not moved or unchecked  # a setting the check passes was a candidate without it
    with pytest.raises(ValueError, match=r"validation draws per problem must be an integer"):
        StopValueArgs(validation_repeats=-1)


def test_validation_draws_at_other_deadlines_than_the_tuning_draws_are_refused(trained):
    """The check compares candidates by their index, so both sets of draws must replay the same
    deadlines (else the same index would be another setting)."""
    out, _ = trained
    policy = load_race_policy(out / "policy")
    report = json.loads((out / "report.json").read_text())
    profile, config, model = policy_profile(policy), policy.env_config, policy.model
    backend, problems, seed, held_out = tuning_problems(policy, profile, report)
    sweep = sweep_rules(backend, model.deadlines_s, problems, BASELINE_TUNING_REPEATS, seed,
                        config.n_grid, config.k_grid, progress=False)  # fmt: skip
    shorter = dataclasses.replace(model, deadlines_s=model.deadlines_s[:-1],
                                  settings=model.settings[:-1])  # fmt: skip
    tuned = tune_controllers(sweep)
    validation = validation_draws(shorter, policy.featurizer, config, held_out, 1, seed, tuned)
    with pytest.raises(ValueError, match="validation draws cover the deadlines"):
        tune_for_lead(model, policy.featurizer, config, backend, problems, seed, sweep, tuned,
                      validation=validation)  # fmt: skip


def test_the_validation_check_replays_only_the_baselines_pairs_and_reads_the_same(trained):
    """``validation_draws`` replays the vote rules only at the tuned baselines' (n, k): the
    floors, the heuristics' frontier and the value network's candidates it gives the check are
    those of every configuration replayed."""
    out, _ = trained
    policy = load_race_policy(out / "policy")
    report = json.loads((out / "report.json").read_text())
    profile, config, model = policy_profile(policy), policy.env_config, policy.model
    backend, problems, seed, held_out = tuning_problems(policy, profile, report)
    tuned = tune_controllers(sweep_rules(backend, model.deadlines_s, problems,
                                         BASELINE_TUNING_REPEATS, seed, config.n_grid,
                                         config.k_grid, progress=False))  # fmt: skip
    controllers = {name: [dataclasses.asdict(c) for c in rows] for name, rows in tuned.items()}
    few = validation_draws(model, policy.featurizer, config, held_out, 2, seed, tuned)
    every = Draws.of(model, policy.featurizer, config, held_out, range(len(held_out.problems)),
                     model.deadlines_s, 2, seed)  # fmt: skip
    pairs = {key[2:] for key in few.sweep.correct}
    assert pairs == set(floor_pairs(tuned)) < {key[2:] for key in every.sweep.correct}
    (stick, mine), (full_stick, theirs) = (lead_yardstick(d, controllers) for d in (few, every))
    assert stick.floors == full_stick.floors and np.array_equal(stick.front, full_stick.front)
    for a, b in zip(mine, theirs, strict=True):
        assert np.array_equal(a.accuracy, b.accuracy) and np.array_equal(a.latency, b.latency)


def test_the_decision_benchmark_times_a_trained_stop_value_policy_on_its_own_races(trained):
    """``policies.bench_decisions --policy`` on train.py's output (a stop-value policy, no SB3
    ``predict``) replays that run's profile and times the decisions that run its network."""
    out, _ = trained
    report = bench_decisions_main(["--policy", str(out / "policy"), "--races", "20"])
    assert report["profile"] == "fake-train"
    decide = report["decide"]
    assert "learned (SB3 predict)" not in decide
    at_finishes, every = decide["learned (served), at finishes"], decide["learned (served)"]
    assert 0 < at_finishes["count"] < every["count"]
    assert at_finishes["median_us"] > every["median_us"]  # the others return at once


def test_a_floor_margin_out_of_range_is_refused_before_training():
    with pytest.raises(ValueError, match=r"floor margin 0\.5 must be a share of accuracy"):
        StopValueArgs(floor_margin=0.5)


def test_retuning_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a train\.py run folder"):
        retune_main(RetuneArgs(run=str(tmp_path), out=str(tmp_path / "out")))
