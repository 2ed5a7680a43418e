"""DecodingController: policy/engine compatibility checks, and live answers on the real engine.

The policy is a tiny PPO trained in seconds on the FAKE test profile (grids n in (1, 2, 4), k
in (0, 1, 2)), so its choices mean nothing; what is tested is the machinery around them.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.vllm_engine import EngineConfig
from env.allocation import Allocation
from env.backends.replay import ReplayBackend
from env.config import EnvConfig
from env.features import ProblemFeaturizer
from env.profiles.store import load_profile
from env.task.voting import VoteTally
from env.tts_env import LatencyTTSEnv
from policies.controller import DecodingController
from policies.saved_policy import load_policy, save_policy
from tests.fake_profile import make_fake_profile

N_GRID, K_GRID = (1, 2, 4), (0, 1, 2)
PROBLEM = "What is $12 + 30$?"
LONG = "Write a long story about a cat who learns algebra."
SHORT_REPLY = "Reply with exactly \\boxed{7} and nothing else."


def train_tiny_policy(folder: Path) -> Path:
    """A PPO policy on the fake profile with grids the test engine can run (a few seconds)."""
    from stable_baselines3 import PPO

    profile = load_profile(make_fake_profile(folder.parent / "fake-profile", 120, 10, 16))
    featurizer = ProblemFeaturizer.fit(profile.split("train"), (0.5, 10.0))
    config = EnvConfig(n_grid=N_GRID, k_grid=K_GRID, deadline_range_s=(0.5, 10.0))
    env = LatencyTTSEnv(ReplayBackend(profile, "train", "draft_model"), featurizer, config)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=64,
        batch_size=64,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs={"net_arch": [16, 16]},
    )
    model.learn(128)
    return save_policy(
        folder, model, featurizer, env.resolved_config, {"spec_method": "draft_model"}
    )


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return train_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny")


def _unanimous_vote_decided(votes: int, running: int) -> bool:
    """Whether ``votes`` branches agreeing, with ``running`` still to come, decide the vote."""
    tally = VoteTally(votes + running)
    for _ in range(votes):
        tally.add(0)
    return tally.decided


def _stub_engine(**config) -> SimpleNamespace:
    """Construction only reads ``engine.config``."""
    return SimpleNamespace(config=EngineConfig(**config))


def test_schema_mismatch_is_a_clear_error(policy_dir, tmp_path):
    copy = Path(shutil.copytree(policy_dir, tmp_path / "old-schema"))
    manifest = json.loads((copy / "policy.json").read_text())
    manifest["feature_schema_version"] = 0
    (copy / "policy.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"feature schema version 0.*Retrain"):
        DecodingController(copy, _stub_engine())
    policy = load_policy(policy_dir)  # also when handed an already loaded policy
    policy.info["feature_schema_version"] = 99
    with pytest.raises(ValueError, match=r"feature schema version 99.*Retrain"):
        DecodingController(policy, _stub_engine())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"max_n": 2}, r"n from \(1, 2, 4\).*max_n >= 4"),
        ({"k_max": 1}, r"k from \(0, 1, 2\).*k_max >= 2"),
        ({"spec_method": None}, r"k in 0..0.*speculation on"),
    ],
)
def test_grids_must_fit_the_engine(policy_dir, config, message):
    with pytest.raises(ValueError, match=message):
        DecodingController(policy_dir, _stub_engine(**config))


def test_policy_that_fits_is_accepted(policy_dir):
    controller = DecodingController(policy_dir, _stub_engine(max_n=4, k_max=2))
    assert (controller.n_grid, controller.k_grid) == (N_GRID, K_GRID)


@pytest.fixture(scope="module")
def controller(policy_dir, draft_engine) -> DecodingController:
    return DecodingController(policy_dir, draft_engine)


@pytest.mark.engine
def test_choose_maps_actions_to_grids_at_any_deadline(controller):
    for deadline in (0.01, 0.5, 3.0, 10.0, 1e6, None, float("inf")):
        n, k, budget = controller.choose(PROBLEM, deadline)
        assert n in N_GRID and k in K_GRID and budget in controller.budget_grid
        if deadline is None or deadline == float("inf"):
            assert budget == 1.0  # no deadline, no share of it
    assert controller.choose(PROBLEM, 1e6) == controller.choose(PROBLEM, 10.0)  # clipped


@pytest.mark.engine
@pytest.mark.parametrize(
    ("problem", "deadline", "message"),
    [
        ("", 1.0, "non-empty"),
        ("   ", 1.0, "non-empty"),
        ("word " * 5000, 1.0, "context allows at most"),
        (PROBLEM, -1.0, "deadline_s must be > 0"),
        (PROBLEM, float("nan"), "deadline_s must be > 0"),
    ],
)
def test_bad_input_is_rejected_before_the_engine(controller, problem, deadline, message):
    with pytest.raises(ValueError, match=message):
        controller.solve(problem, deadline)


@pytest.mark.engine
@pytest.mark.parametrize("deadline", [0.3, 1.5])
def test_solve_honours_the_deadline_and_reports_the_call(controller, deadline):
    started = time.monotonic()
    solution = controller.solve(PROBLEM, deadline, max_tokens=48)
    elapsed = time.monotonic() - started
    assert elapsed <= deadline + 0.1 and solution.latency_s <= elapsed
    assert solution.deadline_s == deadline
    assert (solution.n, solution.k, solution.budget) == controller.choose(PROBLEM, deadline)
    assert solution.latency_s <= solution.budget * deadline + 0.1
    assert solution.stopped_by in ("complete", "early_stop", "deadline")
    assert [b["index"] for b in solution.branches] == list(range(solution.n))
    for branch in solution.branches:
        if branch["finish_s"] is None:
            assert branch["finish_reason"] == "aborted" and branch["answer"] is None
        else:
            assert branch["finish_s"] <= deadline and branch["finish_reason"] in ("stop", "length")
    answered = [b["answer"] for b in solution.branches if b["answer"] is not None]
    assert sum(solution.votes.values()) == len(answered)
    assert (solution.answer is None) == (not answered)
    assert solution.prompt_tokens > 10
    assert not controller.engine.has_unfinished_requests()


@pytest.mark.engine
def test_early_stop_once_the_vote_is_decided(controller, monkeypatch):
    """16 branches; the call stops as soon as the unfinished branches can no longer change the
    winner.  The bundled 135M model rarely boxes an answer, so grading is stubbed (every
    finished branch answers "5"); the engine, the finish times and the stop decision are real.
    The prompt draws replies of varied length and k = 2 spreads the steps at which branches
    reach max_tokens (with k = 0 those would all finish in the same step)."""
    monkeypatch.setattr("env.backends.sample_vote.extract_boxed_answer", lambda text: "5")
    monkeypatch.setattr(controller, "_choose", lambda *args: Allocation(16, 2, 1.0))
    for _ in range(3):  # sampling is random: a few tries
        solution = controller.solve(SHORT_REPLY, 60.0, max_tokens=24)
        if solution.stopped_by == "early_stop":
            break
    assert solution.stopped_by == "early_stop", solution.branches
    unfinished = sum(b["finish_s"] is None for b in solution.branches)
    assert solution.answer == "5" and solution.votes == {"5": 16 - unfinished}
    assert unfinished > 0 and _unanimous_vote_decided(16 - unfinished, unfinished)
    last = max(b["finish_s"] for b in solution.branches if b["finish_s"] is not None)
    before = sum(b["finish_s"] is not None and b["finish_s"] < last for b in solution.branches)
    assert not _unanimous_vote_decided(before, 16 - before)  # not one engine step earlier
    assert not controller.engine.has_unfinished_requests()


@pytest.mark.engine
def test_cancel_aborts_the_call(controller):
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    solution = controller.solve(LONG, 30.0, cancel=cancel)
    assert solution.stopped_by == "cancelled" and solution.latency_s < 5.0
    assert not controller.engine.has_unfinished_requests()


@pytest.mark.engine
def test_a_problem_is_tokenized_once_per_call(controller, monkeypatch):
    """Choosing needs the prompt's length and the engine needs its ids: one tokenization serves
    both, and a prepared problem (the server prepares before queueing) is not tokenized again."""
    calls = []
    tokenize = controller.engine.prompt_token_ids
    monkeypatch.setattr(
        controller.engine,
        "prompt_token_ids",
        lambda message: calls.append(message) or tokenize(message),
    )
    controller.solve(PROBLEM, 5.0, max_tokens=4)
    assert len(calls) == 1
    prepared = controller.prepare(PROBLEM)
    solution = controller.solve(prepared, 5.0, max_tokens=4)
    assert len(calls) == 2 and solution.prompt_tokens == prepared.prompt_tokens
