"""Evaluation of race controllers (``policies.evaluate``) on a FAKE profile: the report, common
random numbers, the oracle, the targets, the files and the command line."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
from rich.console import Console
from stable_baselines3 import PPO

from env.backends.replay import ReplayBackend
from env.config import RaceEnvConfig
from env.features import ProblemFeaturizer
from env.profiles.store import SYNTHETIC_LABEL
from env.race import RaceState
from env.race_env import RaceEnv
from policies.evaluate import (
    HEURISTICS,
    Args,
    check_deadlines,
    cli,
    evaluate_methods,
    main,
    oracle_draw,
    paired_se,
    print_report,
    summarize_targets,
    write_report,
)
from policies.race_controllers import CONTINUE, Decision, RuleController
from policies.race_eval import draw_rng, run_race, tune_controllers, tuning_sweep
from policies.report_plots import plot_races, record_race
from policies.saved_policy import save_race_policy
from tests.fake_profile import make_fake_profile

DEADLINES = (0.4, 1.0, 2.5)
N_GRID = (1, 2, 4, 8, 16)
K_GRID = (0, 1, 2, 4)
ROW_FIELDS = {"deadline_s", "accuracy", "accuracy_se", "mean_latency_s", "p95_latency_s",
              "mean_n", "mean_k_final", "mean_branches_finished", "mean_tokens", "answered",
              "reward", "correct_per_problem"}  # fmt: skip


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    return make_fake_profile(tmp_path_factory.mktemp("evaluate") / "fake", n_train=60, n_test=12)


@pytest.fixture(scope="module")
def test_backend(profile_dir):
    return ReplayBackend(profile_dir, "test", method="ngram")


@pytest.fixture(scope="module")
def tuned(profile_dir):
    train = ReplayBackend(profile_dir, "train", method="ngram")
    return tune_controllers(tuning_sweep(train, DEADLINES, 40, 1, 0, N_GRID, K_GRID, False))


@pytest.fixture(scope="module")
def report(tuned, test_backend):
    return evaluate_methods(tuned, test_backend, DEADLINES, 2, 0, 0.1, progress=False,
                            n_grid=N_GRID, k_grid=K_GRID)  # fmt: skip


def test_report_structure(report, tuned, test_backend):
    assert set(report["methods"]) == {*tuned, "oracle"}
    assert report["deadlines_s"] == list(DEADLINES) and report["repeats"] == 2
    assert report["profile"]["synthetic"] and SYNTHETIC_LABEL in report["profile"]["label"]
    assert report["num_problems"] == len(test_backend.problems)
    for rows in report["methods"].values():
        assert [r["deadline_s"] for r in rows] == list(DEADLINES)
        for row in rows:
            assert set(row) == ROW_FIELDS
            assert 0 <= row["accuracy"] <= 1 and row["accuracy_se"] >= 0
            counts = row["correct_per_problem"]
            assert len(counts) == len(test_backend.problems) and set(counts) <= {0, 1, 2}
            assert sum(counts) / (2 * len(counts)) == pytest.approx(row["accuracy"])
            assert 0 < row["mean_latency_s"] <= row["deadline_s"] + 1e-9
    assert report["controllers"]["margin"][0]["family"] == "margin"
    assert not report["targets"]["evaluated"]  # no policy: baselines only
    json.dumps(report)  # plain JSON types only


def test_same_draws_for_every_method(test_backend):
    """Common random numbers: two identical controllers (one given per deadline, one given
    once) score identically, row for row."""
    rule = RuleController("margin", 8, 2, 2)
    methods = {"a": rule, "b": [RuleController("margin", 8, 2, 2)] * len(DEADLINES)}
    result = evaluate_methods(methods, test_backend, DEADLINES, 2, 3, 0.1, progress=False)
    assert result["methods"]["a"] == result["methods"]["b"]
    with pytest.raises(ValueError, match="2 controllers for 3 deadlines"):
        evaluate_methods({"a": [rule, rule]}, test_backend, DEADLINES, 1, 0, 0.1, progress=False)


def test_oracle_is_never_below_any_method(report):
    oracle = report["methods"]["oracle"]
    for name, rows in report["methods"].items():
        for row, best in zip(rows, oracle, strict=True):
            assert best["accuracy"] >= row["accuracy"], (name, row["deadline_s"])


@dataclass
class StopAt:
    """Starts (n, k) and answers at the first decision point at or after ``at_s``."""

    n: int
    k: int
    at_s: float
    name: str = "stop_at"

    def begin(self, problem, deadline_s):
        return self.n, self.k

    def decide(self, state: RaceState) -> Decision:
        return Decision(stop=True) if state.elapsed_s >= self.at_s - 1e-9 else CONTINUE

    def call_deadline(self, deadline_s):
        return deadline_s


def test_oracle_calls_are_real_races(test_backend):
    """What the oracle finds is a call a controller could make: replaying its (n, k) and
    stopping at its time gives a right answer at that time, with the same votes and tokens."""
    found = 0
    for p in range(len(test_backend.problems)):
        best = oracle_draw(test_backend, p, draw_rng(0, p, 0), N_GRID, K_GRID, 3.0)
        if best is None:
            continue
        found += 1
        replayed = run_race(test_backend, StopAt(best.n, best.k, best.latency_s), p, 3.0,
                            draw_rng(0, p, 0))  # fmt: skip
        assert replayed.correct and replayed.latency_s == pytest.approx(best.latency_s)
        assert replayed.branches_finished == best.branches_finished
        assert replayed.generated_tokens == pytest.approx(best.generated_tokens, rel=0.01)
    assert found > 0


def test_oracle_is_the_earliest_right_stop(test_backend):
    """Brute force with replay's one-shot vote (``run_one_draw``): stopping every static (n, k)
    of the grids at each of its finish times, the earliest right answer is the oracle's."""
    horizon = 2.0
    for p in range(len(test_backend.problems)):
        earliest = np.inf
        for n in N_GRID:
            drawn = test_backend.branch_order(draw_rng(0, p, 0))[:n]
            for k in K_GRID:
                times = np.unique(test_backend.finish_times(p, drawn, k))
                times = times[times <= horizon]
                outcomes = test_backend.run_one_draw(p, n, k, times, draw_rng(0, p, 0))
                right = [t for t, o in zip(times, outcomes, strict=True) if o.correct]
                earliest = min([earliest, *right])
        best = oracle_draw(test_backend, p, draw_rng(0, p, 0), N_GRID, K_GRID, horizon)
        assert (best.latency_s if best else np.inf) == earliest


def _rows(points):
    return [{"deadline_s": d, "accuracy": a, "mean_latency_s": t}
            for d, (a, t) in zip((1.0, 2.0, 4.0), points, strict=True)]  # fmt: skip


def _hand_report(policy):
    methods = {
        "static_best": _rows([(0.50, 1.0), (0.60, 2.0), (0.70, 4.0)]),
        "margin": _rows([(0.50, 0.9), (0.60, 1.8), (0.70, 3.0)]),
        "esc": _rows([(0.49, 0.8), (0.61, 1.9), (0.69, 2.8)]),
        "adaptive_consistency": _rows([(0.45, 0.5), (0.55, 1.0), (0.65, 2.0)]),
        "policy": _rows(policy),
    }
    return {"methods": methods, "repeats": 2}


def test_targets_met_on_a_hand_made_report():
    summary = summarize_targets(_hand_report([(0.50, 0.6), (0.61, 1.2), (0.70, 2.0)]))
    targets = summary["targets"]
    assert summary["evaluated"] and summary["all_met"]
    assert targets["accuracy_vs_static_best"]["value"] == pytest.approx(0.0)
    # static frontier latency at 0.5, 0.61, 0.7: 1.0, 2.2, 4.0 -> savings 0.4, 0.4545, 0.5
    saving = np.mean([0.4, 1 - 1.2 / 2.2, 0.5])
    assert targets["latency_saving_vs_static_best"]["value"] == pytest.approx(saving)
    ratio = np.mean([0.6, 0.6, 0.5])
    assert targets["latency_saving_vs_static_best"]["same_deadline_latency_ratio"] == (
        pytest.approx(ratio))  # fmt: skip
    # the most accurate heuristic per deadline: margin 0.50, esc 0.61, margin 0.70
    assert [r["best_heuristic"] for r in summary["per_deadline"]] == ["margin", "esc", "margin"]
    assert targets["accuracy_vs_best_heuristic"]["value"] == pytest.approx(0.0)
    # the heuristics' joint frontier reaches 0.5, 0.61, 0.7 at 0.9, 1.9, 3.0 s
    saving = np.mean([1 - 0.6 / 0.9, 1 - 1.2 / 1.9, 1 - 2.0 / 3.0])
    assert targets["ahead_of_heuristics"]["value"]["latency_saving"] == pytest.approx(saving)
    assert targets["ahead_of_heuristics"]["value"]["accuracy_gain"] == pytest.approx(0.0)
    assert targets["ahead_of_heuristics"]["met"]


def test_targets_missed_on_a_hand_made_report():
    summary = summarize_targets(_hand_report([(0.49, 0.9), (0.60, 2.0), (0.70, 3.9)]))
    targets = summary["targets"]
    assert not summary["all_met"]
    assert not targets["accuracy_vs_static_best"]["met"]  # -0.01 < -0.005
    assert targets["accuracy_vs_static_best"]["value"] == pytest.approx(-0.01)
    assert not targets["latency_saving_vs_static_best"]["met"]
    assert not targets["accuracy_vs_best_heuristic"]["met"]  # 0.60 vs esc's 0.61
    assert not targets["ahead_of_heuristics"]["met"]
    assert targets["accuracy_vs_static_best"]["threshold"] == -0.005


def test_targets_exactly_at_the_threshold_are_met():
    """-0.005 computed in floating point (0.495 - 0.5) still counts as -0.005."""
    summary = summarize_targets(_hand_report([(0.495, 0.5), (0.60, 1.0), (0.70, 2.0)]))
    assert summary["targets"]["accuracy_vs_static_best"]["met"]


def test_every_controller_is_held_to_the_same_targets(report):
    """``targets_by_method`` puts each controller in the policy's place on the same draws."""
    by = report["targets_by_method"]
    assert set(by) == set(report["methods"]) - {"static_best", "plain", "oracle"}
    static = [r["accuracy"] for r in report["methods"]["static_best"]]
    for name, values in by.items():
        mine = [r["accuracy"] for r in report["methods"][name]]
        worst = min(a - s for a, s in zip(mine, static, strict=True))
        assert values["accuracy_vs_static_best"] == pytest.approx(worst)
        if name in HEURISTICS:  # measured against the best of a group it belongs to
            assert values["accuracy_vs_best_heuristic"] <= 1e-12
    console = Console(record=True, width=200)
    print_report({**report, "targets": summarize_targets({**report, "methods": {
        **report["methods"], "policy": report["methods"]["margin"]}})}, console)  # fmt: skip
    assert "every controller held to the same targets" in console.export_text()


def test_paired_standard_error_is_over_problems_of_the_difference():
    a = {"correct_per_problem": [2, 1, 0, 2]}
    b = {"correct_per_problem": [1, 1, 0, 2]}
    # per-problem differences 0.5, 0, 0, 0: sample std 0.25 over 4 problems
    assert paired_se(a, b, repeats=2) == pytest.approx(0.25 / 2)
    assert paired_se(a, a, repeats=2) == 0.0
    assert paired_se(a, {"accuracy": 0.5}, repeats=2) is None  # a report written before
    assert paired_se(a, {"correct_per_problem": [1, 1]}, repeats=2) is None


def test_targets_carry_paired_errors_and_the_baselines_own_bar(report):
    """A policy that replays static_best exactly differs from it by 0 with no noise; against the
    best heuristic its error is the paired one; every baseline is held to the heuristic bar."""
    methods = report["methods"]
    copied = {
        **report,
        "methods": {**methods, "policy": json.loads(json.dumps(methods["static_best"]))},
    }
    summary = summarize_targets(copied)
    rows, targets = summary["per_deadline"], summary["targets"]
    assert all(r["accuracy_minus_static_best_se"] == 0.0 for r in rows)
    assert targets["accuracy_vs_static_best"]["se_at_worst"] == 0.0
    assert targets["accuracy_vs_static_best"]["miss_chance_if_equal"] == 0.0  # no noise at all
    chance = targets["accuracy_vs_best_heuristic"]["miss_chance_if_equal"]
    errors = [r["accuracy_minus_best_heuristic_se"] for r in rows]
    assert (chance > 0.0) == any(e > 0 for e in errors) and chance < 1.0
    for d, row in enumerate(rows):
        best = methods[row["best_heuristic"]][d]
        expected = paired_se(methods["static_best"][d], best, report["repeats"])
        assert row["accuracy_minus_best_heuristic_se"] == pytest.approx(expected)
    bar = targets["accuracy_vs_best_heuristic"]["baselines_worst"]
    assert set(bar) == {"static_best", *HEURISTICS}
    assert bar["static_best"] == pytest.approx(targets["accuracy_vs_best_heuristic"]["value"])
    for name in HEURISTICS:
        worst = min(methods[name][d]["accuracy"] - methods[r["best_heuristic"]][d]["accuracy"]
                    for d, r in enumerate(rows))  # fmt: skip
        assert bar[name] == pytest.approx(worst) and bar[name] <= 0.0
    console = Console(record=True, width=200)
    print_report({**copied, "targets": summary}, console)
    text = console.export_text()
    assert "±" in text and "the same bar for the baselines" in text


def _png_width(path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")


def test_the_report_plot_shows_the_paired_errors_when_it_has_them(report, tmp_path):
    """A fourth panel (the accuracy differences with error bars) when the targets carry paired
    standard errors; three without a policy to compare."""
    methods = report["methods"]
    with_policy = {**report, "methods": {**methods, "policy": methods["margin"]}}
    with_policy["targets"] = summarize_targets(with_policy)
    _, four = write_report(with_policy, tmp_path / "four")
    _, three = write_report(report, tmp_path / "three")
    assert _png_width(four) > _png_width(three) * 1.2


def test_miss_chance_of_an_equal_method_follows_the_normal_errors():
    """Two deadlines with a noisy difference (per problem +-1: SE 0.577) and one with none: an
    equal method holds the -0.5-point floor at each noisy one with Phi(0.005 / 0.577), both
    with its square, the quiet one always."""
    report = _hand_report([(0.50, 0.6), (0.61, 1.2), (0.70, 2.0)])
    counts = {"a": [2, 0] * 2, "b": [0, 2] * 2}  # differences +-1 per problem
    for rows in report["methods"].values():
        for row in rows:
            row["correct_per_problem"] = counts["a"]
    for row in report["methods"]["policy"][:2]:
        row["correct_per_problem"] = counts["b"]
    # per-problem differences of +-1 over 4 problems: SE = std(ddof=1) / 2 = 1.1547 / 2
    target = summarize_targets(report)["targets"]["accuracy_vs_static_best"]
    se = np.std([1, -1, 1, -1], ddof=1) / 2
    held = 0.5 * (1 + math.erf(0.005 / (se * math.sqrt(2))))
    assert target["miss_chance_if_equal"] == pytest.approx(1 - held**2)


def test_targets_without_heuristics_keep_the_static_ones():
    report = _hand_report([(0.5, 0.5), (0.6, 1.0), (0.7, 2.0)])
    for name in HEURISTICS:
        del report["methods"][name]
    assert set(summarize_targets(report)["targets"]) == {
        "accuracy_vs_static_best", "latency_saving_vs_static_best"}  # fmt: skip


def test_write_report_and_races_plot(report, tuned, test_backend, tmp_path):
    json_path, png_path = write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report))
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob("*.tmp"))
    controllers = {"margin": tuned["margin"][1], "static_best": tuned["static_best"][1]}
    races = plot_races(test_backend, controllers, DEADLINES[1], tmp_path / "races.png")
    assert races.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    console = Console(record=True, width=160)
    print_report(report, console)
    assert SYNTHETIC_LABEL in console.export_text()


def test_recorded_race_matches_the_evaluation_loop(tuned, test_backend):
    controller = tuned["margin"][1]
    for p in range(4):
        timeline = record_race(test_backend, controller, p, DEADLINES[1], draw_rng(0, p, 0))
        outcome = run_race(test_backend, controller, p, DEADLINES[1], draw_rng(0, p, 0))
        assert timeline.outcome == outcome
        assert timeline.times_s == sorted(timeline.times_s)
        assert sum(timeline.votes[-1].values()) <= outcome.branches_finished


@pytest.fixture(scope="module")
def policy_dir(profile_dir, tmp_path_factory):
    """A tiny untrained race policy saved in the race format (format 3)."""
    train = ReplayBackend(profile_dir, "train", method="ngram")
    featurizer = ProblemFeaturizer.fit(train.profile.split("train"), (0.1, 5.0))
    config = RaceEnvConfig(n_grid=N_GRID, k_grid=K_GRID)
    model = PPO("MlpPolicy", RaceEnv(train, featurizer, config), n_steps=64, batch_size=64,
                seed=0, device="cpu")  # fmt: skip
    info = {"profile": {"name": "fake", "path": str(profile_dir), "synthetic": True},
            "spec_method": "ngram", "deadlines_s": list(DEADLINES)}  # fmt: skip
    return save_race_policy(tmp_path_factory.mktemp("policy") / "policy", model, featurizer,
                            config, info)  # fmt: skip


def test_command_line_end_to_end(policy_dir, tmp_path):
    out = tmp_path / "eval"
    report = cli(["--policy", str(policy_dir), "--deadlines", "0.5", "1.5", "--repeats", "1",
                  "--tune-problems", "20", "--tune-repeats", "1", "--out", str(out)])  # fmt: skip
    assert report["deadlines_s"] == [0.5, 1.5]
    assert "policy" in report["methods"] and "oracle" in report["methods"]
    assert report["targets"]["evaluated"]
    assert set(report["targets"]["targets"]) == {
        "accuracy_vs_static_best", "latency_saving_vs_static_best",
        "accuracy_vs_best_heuristic", "ahead_of_heuristics"}  # fmt: skip
    for name in ("report.json", "report.png", "races.png"):
        assert (out / name).is_file()


def test_command_line_refuses_a_v0_policy_garbage_and_bad_deadlines(policy_dir, tmp_path):
    v0 = tmp_path / "v0"
    v0.mkdir()
    (v0 / "policy.json").write_text(json.dumps({"format_version": 2, "env_id": "LatencyTTS-v0"}))
    with pytest.raises(ValueError, match="Retrain"):
        main(Args(policy=str(v0)))
    with pytest.raises(FileNotFoundError, match="not a policy folder"):
        main(Args(policy=str(tmp_path)))
    with pytest.raises(ValueError, match="> 0"):
        main(Args(policy=str(policy_dir), deadlines=(1.0, 0.0)))
    with pytest.raises(ValueError, match="> 0"):
        check_deadlines([])
