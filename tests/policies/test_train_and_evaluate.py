"""train.py end to end on a fake profile, the saved policy folder, and evaluation's report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from env.features import FEATURE_SCHEMA_VERSION
from policies.evaluate import main as evaluate_main
from policies.saved_policy import load_policy
from tests.fake_profile import make_fake_profile

ROOT = Path(__file__).resolve().parents[2]
METHODS = {"policy", "static_best", "static_budget", "plain", "max_fit", "oracle"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short train.py run (a few hundred PPO steps, W&B disabled)."""
    root = tmp_path_factory.mktemp("train")
    profile = make_fake_profile(root / "fake-train", n_train=200, n_test=30, n_branches=8)
    out = root / "run"
    command = [
        sys.executable, "train.py", "--profile", str(profile), "--timesteps", "512",
        "--wandb", "disabled", "--out", str(out), "--deadlines", "1", "2", "4", "8",
        "--n-envs", "2", "--n-steps", "64", "--batch-size", "64", "--eval-every", "256",
        "--val-problems", "30", "--static-problems", "60", "--imitation-samples", "1000",
        "--eval-repeats", "1",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_train_writes_report_plot_and_policy(trained):
    out, stdout = trained
    for name in ("report.json", "report.png", "policy/policy.json", "policy/model.zip"):
        assert (out / name).is_file(), name
    assert f"report: {out / 'report.json'}" in stdout and "synthetic profile" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["synthetic"] is True and report["profile"] == "fake-train"
    assert report["deadlines_s"] == [1.0, 2.0, 4.0, 8.0]
    assert set(report["methods"]) == METHODS
    for rows in report["methods"].values():
        assert [r["deadline_s"] for r in rows] == report["deadlines_s"]
        for row in rows:
            assert 0 <= row["accuracy"] <= 1 and row["mean_latency_s"] <= row["deadline_s"]
            assert {"p95_latency_s", "deadline_miss_rate", "mean_generated_tokens"} <= set(row)
    assert "gap_closed" in report["summary"] and "vs_static_budget" in report["summary"]
    for name in ("static_best", "static_budget"):
        actions = report[f"{name}_actions"]
        assert set(actions) == {str(d) for d in report["deadlines_s"]}
        assert all(len(a) == 3 and 0 < a[2] <= 1 for a in actions.values())
    assert all(a[2] == 1.0 for a in report["static_best_actions"].values())
    assert all(0 < r["mean_budget"] <= 1 for r in report["methods"]["policy"])


def test_saved_policy_reloads_and_refuses_another_feature_schema(trained, tmp_path):
    out, _ = trained
    policy = load_policy(out / "policy")
    assert policy.info["feature_schema_version"] == FEATURE_SCHEMA_VERSION
    assert policy.env_config.n_grid == (1, 2, 4, 8) and policy.env_config.k_grid
    assert policy.info["selection"]["kept"] in {"start", "final", "best_validation"}

    stale = tmp_path / "stale"
    stale.mkdir()
    for file in (out / "policy").iterdir():
        (stale / file.name).write_bytes(file.read_bytes())
    info = json.loads((stale / "policy.json").read_text())
    info["feature_schema_version"] = FEATURE_SCHEMA_VERSION - 1
    (stale / "policy.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="feature schema version"):
        load_policy(stale)


def test_evaluate_command_reuses_a_saved_policy(trained, tmp_path):
    out, _ = trained
    report = evaluate_main(
        ["--policy", str(out / "policy"), "--deadlines", "2", "8", "--repeats", "1",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert report["deadlines_s"] == [2.0, 8.0] and set(report["methods"]) == METHODS
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report.png").is_file()


def test_live_evaluation_without_live_backend_is_a_clear_error(trained, monkeypatch):
    out, _ = trained
    monkeypatch.setitem(sys.modules, "env.backends.live", None)  # as if it were missing
    with pytest.raises(RuntimeError, match="LiveBackend"):
        evaluate_main(["--policy", str(out / "policy"), "--live", "--limit", "2"])
