"""The profiler on the real engines and model: a two-problem profile, stopped and resumed.

One profile is recorded per module in two sessions (the first stops after one problem), on the
session's shared engines and with a tiny calibration, so the module costs about a minute of
engine time.  Further tests reuse its journal instead of profiling again.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from engine.model_assets import TARGET_NAME, cache_dir
from env.backends.replay import ReplayBackend
from env.latency_model import LatencyModel
from env.paths import profiles_dir
from env.profiles.record import (
    JOURNAL,
    Journal,
    ProfileSettings,
    default_methods,
    default_profile_dir,
    profile_model,
    profile_problems,
    settings_for,
)
from env.profiles.store import PROBLEM_COLUMNS, SPEC_COLUMNS, load_profile, read_table
from env.task.problems import load_math500, load_math_train
from env.task.prompt import build_user_message

SETTINGS = ProfileSettings(
    n_max=2,
    max_tokens=24,
    k_grid=(0, 1, 2),
    spec_branches=1,
    spec_max_tokens=12,
    calib_batches=(1, 2),
    calib_tokens=8,
    calib_repeats=1,
    calib_prefill_ns=(1, 2),
)
MANIFEST_KEYS = {
    "name", "synthetic", "model", "draft", "spec_methods", "hardware", "vllm_version",
    "sampling", "n_max", "k_grid", "created", "command", "duration_s", "splits",
    "latency_model", "calibration", "format_version", "num_problems",
}  # fmt: skip


class Killed(Exception):
    """Stands in for the process being killed."""


class Recording:
    """An engine that logs every ``run`` and can die at a given call (counted over engines)."""

    def __init__(self, engine, log: list, die_at: int | None = None) -> None:
        self.engine, self.log, self.die_at = engine, log, die_at

    def run(self, prompt: str, **kwargs):
        self.log.append((prompt, kwargs))
        if self.die_at is not None and len(self.log) >= self.die_at:
            raise Killed
        return self.engine.run(prompt, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def recording(draft_engine, ngram_engine, log: list, die_at: int | None = None) -> dict:
    return {
        "draft_model": Recording(draft_engine, log, die_at),
        "ngram": Recording(ngram_engine, log, die_at),
    }


@pytest.fixture(scope="module")
def problems():
    return [("test", load_math500(source="bundled")[3]), ("train", load_math_train(20)[7])]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, draft_engine, ngram_engine, problems):
    """A profile recorded in two sessions; the journal as it was after the first."""
    out = tmp_path_factory.mktemp("profiles") / "tiny-real"
    first, second = [], []
    engines = recording(draft_engine, ngram_engine, first)
    profile_problems(engines, problems, out, SETTINGS, "first", 1.0, limit=1, progress=False)
    after_first = (out / JOURNAL).read_text()
    engines = recording(draft_engine, ngram_engine, second)
    profile_problems(engines, problems, out, SETTINGS, "second", 2.0, progress=False)
    return {"out": out, "first": first, "second": second, "after_first": after_first}


def prompts(log: list) -> set[str]:
    return {prompt for prompt, _ in log}


@pytest.mark.engine
def test_resume_continues_without_redoing_finished_problems(profiled, problems):
    (_, done), (_, rest) = problems
    first, second = profiled["first"], profiled["second"]
    assert build_user_message(done.problem) in prompts(first)
    assert build_user_message(rest.problem) not in prompts(first)
    assert build_user_message(done.problem) not in prompts(second)
    assert build_user_message(rest.problem) in prompts(second)
    # the calibration (fixed-length calls) ran once, in the first session
    assert any(kw.get("ignore_eos") for _, kw in first)
    assert not any(kw.get("ignore_eos") for _, kw in second)
    journal = Journal(profiled["out"] / JOURNAL)
    assert [r["row"]["id"] for r in journal.of_kind("problem")] == [done.id, rest.id]
    assert len(journal.of_kind("calibration")) == 1 and len(journal.of_kind("session")) == 2


@pytest.mark.engine
def test_profile_loads_with_valid_columns(profiled, problems):
    profile = load_profile(profiled["out"])
    assert [r["id"] for r in profile.rows] == [p.id for _, p in problems]
    assert [r["split"] for r in profile.rows] == ["test", "train"]
    for row in profile.rows:
        assert set(PROBLEM_COLUMNS) <= set(row)
        assert row["prompt_tokens"] > 10
        for column in ("branch_text", "branch_answer", "branch_class", "branch_correct",
                       "branch_tokens", "branch_finish_s", "branch_finish_reason"):  # fmt: skip
            assert len(row[column]) == SETTINGS.n_max, column
        assert np.all((row["branch_tokens"] >= 1) & (row["branch_tokens"] <= SETTINGS.max_tokens))
        assert np.all(row["branch_finish_s"] > 0)
        assert set(row["branch_finish_reason"]) <= {"stop", "length"}
        for answer, cls, correct in zip(row["branch_answer"], row["branch_class"],
                                        row["branch_correct"], strict=True):  # fmt: skip
            assert (answer is None) == (cls == -1)
            assert not (correct and answer is None)
        assert set(row["accept"]) == {"draft_model", "ngram"}
        assert all(0.0 <= a < 1.0 for a in row["accept"].values())
        mean, lowest = row["branch_mean_logprob"], row["branch_lowest_window_logprob"]
        assert len(mean) == len(lowest) == SETTINGS.n_max
        assert np.all(mean <= 0.0) and np.all(lowest <= 0.0)  # log-probabilities, all present
    assert profile.has_logprobs
    spec = read_table(profiled["out"] / "spec.parquet")
    assert {(s["id"], s["method"], s["k"]) for s in spec} == {
        (p.id, m, k) for _, p in problems for m in ("draft_model", "ngram") for k in (1, 2)
    }
    for s in spec:
        assert set(SPEC_COLUMNS) <= set(s) and s["wall_s"] > 0
        assert len(s["branch_tokens"]) == SETTINGS.spec_branches
        assert max(s["branch_tokens"]) <= SETTINGS.spec_max_tokens
        assert all(
            0 <= a <= d for a, d in zip(s["branch_accepted"], s["branch_drafted"], strict=True)
        )
    assert any(sum(s["branch_drafted"]) > 0 for s in spec if s["method"] == "draft_model")


@pytest.mark.engine
def test_manifest_records_engine_calibration_and_sessions(profiled):
    manifest = json.loads((profiled["out"] / "manifest.json").read_text())
    assert set(manifest) >= MANIFEST_KEYS
    assert manifest["synthetic"] is False and manifest["complete"] is True
    assert manifest["spec_methods"] == ["draft_model", "ngram"]
    assert manifest["k_grid"] == [0, 1, 2] and manifest["n_max"] == 2
    assert manifest["sampling"]["max_tokens"] == SETTINGS.max_tokens
    assert manifest["draft"]["layers"] >= 1 and manifest["vllm_version"]
    assert manifest["hardware"]["cpu_count"] >= 1
    assert manifest["token_logprobs"]["recorded"] is True
    assert [s["command"] for s in manifest["sessions"]] == ["first", "second"]
    assert manifest["command"] == "second" and manifest["duration_s"] > 3.0
    model = LatencyModel.from_dict(manifest["latency_model"])
    assert model.methods() == ["draft_model", "ngram"]
    for method in model.methods():
        assert model.k_grid(method) == [0, 1, 2]
        assert np.all(model.step_time(np.array([1, 2]), 0, method) > 0)
    decode = manifest["calibration"]["decode"]
    assert {(d["method"], d["k"], d["batch"]) for d in decode} == {
        (m, k, b) for m in ("draft_model", "ngram") for k in (0, 1, 2) for b in (1, 2)
    }
    assert all(d["steps"] <= SETTINGS.calib_tokens - 1 for d in decode)


@pytest.mark.engine
def test_replay_runs_on_the_real_profile(profiled):
    backend = ReplayBackend(profiled["out"], split="all")
    assert backend.k_grid == (0, 1, 2) and backend.max_branches == 2
    outcome = backend.run(0, n=2, k=1, deadline_s=1e6, rng=np.random.default_rng(0))
    assert outcome.latency_s > 0 and outcome.branches_finished == 2
    assert backend.branch_confidence.shape == (2, 2, 2)  # the race state gets them


@pytest.mark.engine
def test_kill_loses_at_most_the_problem_in_flight(
    profiled, problems, draft_engine, ngram_engine, tmp_path
):
    out = tmp_path / "killed"
    out.mkdir()
    (out / JOURNAL).write_text(profiled["after_first"])
    log = []
    with pytest.raises(Killed):  # dies on the second engine call of the second problem
        profile_problems(recording(draft_engine, ngram_engine, log, die_at=2), problems, out,
                         SETTINGS, "killed", progress=False)  # fmt: skip
    with open(out / JOURNAL, "a") as handle:
        handle.write('{"kind": "problem", "row": {"id": "half-writt')  # killed mid-write
    assert len(Journal(out / JOURNAL).of_kind("problem")) == 1
    log = []
    profile_problems(recording(draft_engine, ngram_engine, log), problems, out, SETTINGS,
                     "resumed", progress=False)  # fmt: skip
    assert prompts(log) == {build_user_message(problems[1][1].problem)}
    assert [r["id"] for r in load_profile(out).rows] == [p.id for _, p in problems]


@pytest.mark.engine
def test_resuming_with_other_settings_is_refused(
    profiled, problems, draft_engine, ngram_engine, tmp_path
):
    shutil.copy(profiled["out"] / JOURNAL, tmp_path / JOURNAL)
    log = []
    with pytest.raises(ValueError, match="other settings"):
        profile_problems(recording(draft_engine, ngram_engine, log), problems, tmp_path,
                         replace(SETTINGS, n_max=3), progress=False)  # fmt: skip
    assert not log


@pytest.mark.engine
def test_recalibrate_times_again_and_keeps_every_calibration(
    profiled, problems, draft_engine, ngram_engine, tmp_path
):
    """--recalibrate reruns only the timing (calibration settings may change) and the
    manifest's latency model comes from the newest calibration."""
    shutil.copy(profiled["out"] / JOURNAL, tmp_path / JOURNAL)
    log = []
    settings = replace(SETTINGS, calib_repeats=2, calib_batches=(1,))
    profile_problems(recording(draft_engine, ngram_engine, log), problems, tmp_path, settings,
                     "recalibrate", progress=False, recalibrate=True)  # fmt: skip
    assert log and all(kw.get("ignore_eos") for _, kw in log)  # calibration calls only
    journal = Journal(tmp_path / JOURNAL)
    old, new = journal.of_kind("calibration")
    assert new["settings"]["calib_repeats"] == 2 and len(new["load_average"]) == 6
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["calibration"] == new["calibration"]
    assert {d["batch"] for d in manifest["calibration"]["decode"]} == {1}
    assert manifest["settings"]["calib_repeats"] == 2 and manifest["settings"]["n_max"] == 2
    assert len(manifest["calibrations"]) == 2
    assert manifest["duration_s"] >= old["seconds"] + new["seconds"]


@pytest.mark.engine
def test_profile_model_records_a_model_by_name(tmp_path, ngram_engine):
    """The entry point behind train.py --profile-model: starts its own engines for the named
    model, profiles, shuts them down, returns a loadable profile.  Its n-gram engine starts
    after the session's n-gram engine (which used to fail at start-up), and shutting it down
    must leave the session's engines working."""
    settings = replace(SETTINGS, k_grid=(0, 2), calib_batches=(1,), calib_prefill_ns=(1,))
    path = profile_model("bundled", tmp_path / "p", methods=["ngram"], train=1, test=1,
                         settings=settings, progress=False)  # fmt: skip
    profile = load_profile(path)
    assert path == tmp_path / "p" and profile.manifest["spec_methods"] == ["ngram"]
    assert sorted(r["split"] for r in profile.rows) == ["test", "train"]
    model = profile.manifest["model"]
    assert model["bundled"] and model["name"] == TARGET_NAME and len(model["sha256"]) == 64
    assert "/" not in json.dumps(model["name"]) and str(cache_dir()) not in json.dumps(model)
    assert LatencyModel.from_dict(profile.manifest["latency_model"]).k_grid("ngram") == [0, 2]
    rollout = ngram_engine.run("What is 2 + 3?", n=2, k=1, max_tokens=4)
    assert rollout.stopped_by == "complete" and all(b.token_count >= 1 for b in rollout.branches)


def test_profile_model_defaults():
    assert default_methods(None, None) == ["draft_model", "ngram"]
    assert default_methods("org/other-model", None) == ["ngram"]  # bundled draft won't fit it
    assert default_methods("org/other-model", "org/its-draft") == ["draft_model", "ngram"]
    folder = default_profile_dir("org/Other-Model", SETTINGS)
    assert folder.parent == profiles_dir()  # the repository's data/, whatever the cwd
    assert folder.name.startswith("other-model-") and folder.name.endswith("-n2-t24")
    assert default_profile_dir(None, SETTINGS).name.startswith("smollm2-135m-")
    assert settings_for(n_max=4).calib_batches == (1, 2, 4)
    assert settings_for(n_max=6).calib_batches == (1, 2, 4, 6)


def test_journal_drops_a_half_written_last_line(tmp_path):
    path = tmp_path / JOURNAL
    journal = Journal(path)
    journal.append({"kind": "header", "value": 1})
    journal.append({"kind": "problem", "row": {"id": "a"}})
    with open(path, "a") as handle:
        handle.write('{"kind": "problem", "ro')
    reopened = Journal(path)
    assert [r["kind"] for r in reopened.records] == ["header", "problem"]
    reopened.append({"kind": "problem", "row": {"id": "b"}})
    assert [r["row"]["id"] for r in Journal(path).of_kind("problem")] == ["a", "b"]
