"""DecodingController: policy/engine compatibility checks, and live races on the real engine.

The policy is a tiny untrained race policy (``LatencyTTS-v1``) on the real CPU profile (grids n
in (1, 2, 4), k in (0, 1, 2)), so its choices mean nothing; what is tested is the machinery
around them: the learned race controller deciding inside the live engine's step loop.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.vllm_engine import EngineConfig
from env.task.voting import VoteTally
from policies.controller import DecodingController
from policies.race_controllers import RuleController
from tests.policies.test_learned_controller import tiny_race_policy

N_GRID, K_GRID = (1, 2, 4), (0, 1, 2)
PROBLEM = "What is $12 + 30$?"
LONG = "Write a long story about a cat who learns algebra."
SHORT_REPLY = "Reply with exactly \\boxed{7} and nothing else."


def train_tiny_policy(folder: Path) -> Path:
    """A tiny race policy with grids the test engine can run (untrained: a second or two)."""
    return tiny_race_policy(folder, N_GRID, K_GRID)


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


def test_a_one_decision_policy_is_refused_with_retrain(tmp_path):
    v0 = tiny_race_policy(tmp_path / "v0")
    info = json.loads((v0 / "policy.json").read_text())
    info.update(format_version=2, env_id="LatencyTTS-v0")
    (v0 / "policy.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"format version 2.*LatencyTTS-v1.*Retrain"):
        DecodingController(v0, _stub_engine())


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
    assert controller.race_controller.race_scales == (8, 4)  # the profile's, recorded


def test_a_rule_controller_can_serve():
    rule = RuleController("margin", 4, 1, 2)
    controller = DecodingController(rule, _stub_engine(max_n=4, k_max=2))
    assert controller.race_controller is rule and controller.policy is None
    assert (controller.n_grid, controller.k_grid) == ((1, 2, 3, 4), (0, 1, 2))


@pytest.fixture(scope="module")
def controller(policy_dir, draft_engine) -> DecodingController:
    return DecodingController(policy_dir, draft_engine)


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
@pytest.mark.parametrize("deadline", [0.3, 1.5, 8.0])
def test_the_learned_race_runs_live_and_honours_the_deadline(controller, deadline):
    """The learned race controller end to end on the live engine: (n, k) from its grids, k
    changes from its grid, decisions inside the step loop, the deadline within 100 ms."""
    started = time.monotonic()
    solution = controller.solve(PROBLEM, deadline, max_tokens=48)
    elapsed = time.monotonic() - started
    assert elapsed <= deadline + 0.1 and solution.latency_s <= elapsed
    assert solution.deadline_s == deadline and solution.budget == 1.0
    assert solution.n in N_GRID and solution.k in K_GRID
    assert controller.last_start == (solution.n, solution.k)  # what the server plans with next
    assert all(k in K_GRID for _, k in solution.k_changes)
    assert solution.stopped_by in ("complete", "early_stop", "deadline")
    assert solution.stop_reason in ("decided", "controller", "deadline", "complete")
    assert [b["index"] for b in solution.branches] == list(range(solution.n))
    for branch in solution.branches:
        if branch["finish_s"] is None:
            assert branch["finish_reason"] == "aborted" and branch["answer"] is None
        else:
            assert branch["finish_s"] <= deadline and branch["finish_reason"] in ("stop", "length")
            assert branch["mean_logprob"] <= 0.0 and branch["lowest_window_logprob"] <= 0.0
    answered = [b["answer"] for b in solution.branches if b["answer"] is not None]
    assert sum(solution.votes.values()) == len(answered)
    assert (solution.answer is None) == (not answered)
    assert solution.prompt_tokens > 10
    assert not controller.engine.has_unfinished_requests()


@pytest.mark.engine
def test_no_deadline_runs_the_race_to_its_end(controller):
    solution = controller.solve(PROBLEM, None, max_tokens=4)
    assert solution.deadline_s is None and solution.budget == 1.0
    assert solution.stop_reason in ("decided", "controller", "complete")
    assert not controller.engine.has_unfinished_requests()


@pytest.mark.engine
def test_early_stop_once_the_vote_is_decided(draft_engine, monkeypatch):
    """16 branches; the call stops as soon as the unfinished branches can no longer change the
    winner.  The bundled 135M model rarely boxes an answer, so grading is stubbed (every
    finished branch answers "5"); the engine, the finish times and the stop decision are real.
    The prompt draws replies of varied length and k = 2 spreads the steps at which branches
    reach max_tokens (with k = 0 those would all finish in the same step)."""
    monkeypatch.setattr("env.backends.sample_vote.extract_boxed_answer", lambda text: "5")
    controller = DecodingController(RuleController("static_best", 16, 2), draft_engine)
    for _ in range(3):  # sampling is random: a few tries
        solution = controller.solve(SHORT_REPLY, 60.0, max_tokens=24)
        if solution.stopped_by == "early_stop":
            break
    assert solution.stopped_by == "early_stop", solution.branches
    assert solution.stop_reason == "decided"
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
    """The policy's features need the prompt's length and the engine needs its ids: one
    tokenization serves both, and a prepared problem (the server prepares before queueing) is
    not tokenized again."""
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


@pytest.mark.engine
def test_a_freshly_started_engine_answers_its_first_call_within_a_short_deadline(policy_dir):
    """The engine warms itself up at start (``VLLMEngine.warm_up``).  Without it, the first
    call with log-probabilities spent 2.4-3.5 s in its first engine step on this CPU, so a fresh
    server's first request with a 2 s deadline ended at the deadline with nothing written."""
    from engine.vllm_engine import VLLMEngine

    engine = VLLMEngine(EngineConfig(spec_method="ngram", k_max=4, max_n=16, max_tokens=48))
    try:
        assert engine.warmup_s > 0
        solution = DecodingController(policy_dir, engine).solve(
            "What is 12 + 30?", deadline_s=2.0, max_tokens=4
        )
    finally:
        engine.shutdown()
    assert solution.stopped_by in ("complete", "early_stop"), solution.stopped_by
    assert solution.batch_max >= 1 and solution.latency_s <= 2.0
