"""The live race: its bookkeeping on scripted engine steps, then on the real engine (k followed
step by step per vLLM's counters, a controller's stop, the deadline).

The bundled 135M model rarely boxes an answer, so where votes matter grading is stubbed (every
finished branch answers "5"); the engine, the steps, the finish times and the decisions are
real.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from engine.call_state import StepControl, StepReport
from engine.rollout import BranchResult, Rollout
from env.backends.live_race import LiveRace, run_live_race
from env.backends.protocol import ProblemInfo
from env.race import RaceState
from policies.race_controllers import CONTINUE, Decision, RuleController

LONG = "Write a long, detailed story about a cat who learns algebra."
SHORT_REPLY = "Reply with exactly \\boxed{7} and nothing else."


@dataclass
class Scripted:
    """A controller that answers from a script (state -> Decision) and logs its decisions."""

    n: int
    k: int
    script: object = None
    budget: float = 1.0
    seen: list = field(default_factory=list)

    def begin(self, problem: ProblemInfo, deadline_s: float) -> tuple[int, int]:
        return self.n, self.k

    def decide(self, state: RaceState) -> Decision:
        decision = self.script(state) if self.script else CONTINUE
        self.seen.append((state.elapsed_s, state.tally.finished, decision))
        return decision

    def call_deadline(self, deadline_s: float) -> float:
        return self.budget * deadline_s


def _problem(text: str = LONG) -> ProblemInfo:
    return ProblemInfo(-1, "", text, 30)


def _branch(index: int, text: str = "so \\boxed{5}", logprobs=(-0.5, -1.5)) -> BranchResult:
    return BranchResult(index, text, len(logprobs), 0.0, "stop", token_logprobs=list(logprobs))


def _race(controller: Scripted, deadline: float = 10.0, checkpoints=(0.5,)) -> LiveRace:
    state = RaceState(controller.call_deadline(deadline), 8, 4)
    state.start(controller.n, controller.k)
    return LiveRace(controller, state, started_at=100.0, checkpoints=checkpoints)


def _step(at: float, finished=(), tokens: int = 4, step_s: float = 0.1, live: int = 4):
    return StepReport(100.0 + at, at, step_s, tokens, list(finished), live)


def test_prefill_is_the_start_and_decode_steps_are_measured():
    race = _race(Scripted(4, 2))
    assert race.on_step(_step(0.5, tokens=4, step_s=0.5)) is None  # prefill: first tokens
    for i in range(1, 5):
        assert race.on_step(_step(0.5 + 0.1 * i, tokens=8)) is None
    state = race.state
    assert (state.steps, state.tokens_generated) == (4, 36)
    assert state.seconds_per_step == pytest.approx(0.1) and state.elapsed_s == pytest.approx(0.9)


def test_decisions_at_finishes_and_before_checkpoints_only():
    controller = Scripted(4, 2)
    race = _race(controller, deadline=10.0, checkpoints=(0.25, 0.5))
    race.on_step(_step(0.2))  # prefill
    race.on_step(_step(1.0))
    assert controller.seen == []
    race.on_step(_step(2.45))  # the next step would end past 2.5 s: the checkpoint is now
    race.on_step(_step(2.55))  # taken already
    assert len(controller.seen) == 1
    race.on_step(_step(3.0, finished=[_branch(0)], live=3))
    assert len(controller.seen) == 2 and controller.seen[-1][1] == 1
    race.on_step(_step(4.96))  # before 5 s
    assert len(controller.seen) == 3


def test_stop_k_and_decided_vote():
    def script(state: RaceState) -> Decision:
        return Decision(stop=state.tally.finished >= 2, k=1)

    race = _race(Scripted(4, 2, script))
    race.on_step(_step(0.2))
    assert race.on_step(_step(0.5, finished=[_branch(0)], live=3)) == StepControl(k=1)
    assert race.state.k == 1 and race.state.confidences[0][0].mean_logprob == -1.0
    control = race.on_step(_step(0.6, finished=[_branch(1, "no answer")], live=2))
    assert control == StepControl(stop=True) and race.state.stopped == "controller"
    assert race.vote.winner == "5" and race.vote.votes == {"5": 1}

    decided = _race(Scripted(3, 0))  # 2 of 3 agree: the last one cannot change the winner
    decided.on_step(_step(0.2))
    control = decided.on_step(_step(0.5, finished=[_branch(0), _branch(1)], live=1))
    assert control == StepControl(stop=True) and decided.state.stopped == "decided"


def test_a_k_the_engine_cannot_run_is_refused():
    race = _race(Scripted(4, 2, lambda state: Decision(k=5)))
    race.on_step(_step(0.2))
    with pytest.raises(ValueError, match=r"k=5 outside 0\.\.4"):
        race.on_step(_step(0.5, finished=[_branch(0)], live=3))


def test_finish_counts_late_branches_and_ignores_later_steps():
    race = _race(Scripted(3, 0))
    race.on_step(_step(0.2))
    race.on_step(_step(0.5, finished=[_branch(0)], live=2))
    late = _branch(1, "then \\boxed{6}")
    late.finish_s = 0.9
    branches = [_branch(0), late, BranchResult(2, finish_reason="aborted")]
    rollout = Rollout(3, 0, "none", 30, 1.0, branches, wall_s=1.0, stopped_by="deadline")
    result = race.finish(rollout)
    assert result.stop_reason == "deadline" and result.vote.votes == {"5": 1, "6": 1}
    assert race.on_step(_step(1.1, finished=[_branch(2)], live=0)) == StepControl(stop=True)
    assert race.state.tally.finished == 2 and set(result.confidences) == {0, 1}


# ------------------------------------------------------------------------- the real engine
@pytest.fixture(scope="module")
def counted_engine():
    """A draft-model engine of this module's own, so that its counters are the ones vLLM
    reports: each new engine re-registers vLLM's Prometheus metrics, so ``get_metrics`` shows
    only the newest engine's (the session's engines may be older than others built since)."""
    from engine.vllm_engine import EngineConfig, VLLMEngine

    engine = VLLMEngine(EngineConfig(spec_method="draft_model", k_max=4, max_n=16, max_tokens=48))
    yield engine
    engine.shutdown()


@pytest.mark.engine
def test_drafted_tokens_per_step_follow_the_controllers_k(counted_engine, monkeypatch):
    """One call: k = 2, then 1 after the 4th decode step, then 0 after the 10th.  vLLM's
    counters, read after every step, show the drafted tokens per draft of each step: k, with
    one step of lag (drafts verified in step t + 1 were proposed during step t)."""
    per_step: list[tuple[float, float, int]] = []  # (drafts, draft tokens, k in force)
    original = LiveRace.on_step
    last = counted_engine.spec_counters()

    def counting(self, report):
        nonlocal last
        now = counted_engine.spec_counters()
        per_step.append((now["drafts"] - last["drafts"],
                         now["draft_tokens"] - last["draft_tokens"], self.state.k))  # fmt: skip
        last = now
        return original(self, report)

    monkeypatch.setattr(LiveRace, "on_step", counting)
    controller = Scripted(
        2, 2, lambda s: Decision(k=2 if s.steps < 4 else 1 if s.steps < 10 else 0)
    )
    checkpoints = tuple(i / 400 for i in range(1, 400))  # a decision point at every step
    ids = counted_engine.prompt_token_ids(LONG)
    result = run_live_race(
        counted_engine, controller, _problem(), ids, 120.0, checkpoints=checkpoints
    )
    changes = [k for _, k in result.rollout.k_changes]
    assert changes == [1, 0], (result.rollout.k_changes, per_step)
    ratios = [(tokens / drafts if drafts else 0.0, k) for drafts, tokens, k in per_step]
    print("drafted tokens per draft, k in force, per step:", ratios)
    # the k set at step t's decision is in force at step t + 1 and drafted with in step t + 2
    for (ratio, _), (_, k_set) in zip(ratios[2:], ratios[1:], strict=False):
        assert ratio == pytest.approx(k_set)
    assert {k for _, k in ratios} == {0, 1, 2} and not counted_engine.has_unfinished_requests()


@pytest.mark.engine
def test_a_controllers_stop_ends_the_call_at_once_with_the_leader(draft_engine, monkeypatch):
    monkeypatch.setattr("env.backends.sample_vote.extract_boxed_answer", lambda text: "5")
    controller = Scripted(8, 2, lambda state: Decision(stop=state.tally.answered >= 1))
    ids = draft_engine.prompt_token_ids(SHORT_REPLY)
    for _ in range(3):  # sampling is random: a few tries until some branch is still running
        result = run_live_race(draft_engine, controller, _problem(SHORT_REPLY), ids, 60.0,
                               max_tokens=24)  # fmt: skip
        if result.state.tally.finished < 8:
            break
    state, rollout = result.state, result.rollout
    assert result.stop_reason == "controller" and rollout.stopped_by == "early_stop"
    assert result.vote.winner == "5" and state.tally.finished < 8
    assert all(b.finish_reason == "aborted" for b in rollout.branches if not b.finished)
    assert result.latency_s - state.elapsed_s < 0.5  # no engine step after the decision
    assert set(result.confidences) == {b.index for b in rollout.finished}  # log-probs came
    assert not draft_engine.has_unfinished_requests()


@pytest.mark.engine
@pytest.mark.parametrize("deadline", [0.3, 1.5])
def test_the_deadline_is_honoured(draft_engine, deadline):
    controller = RuleController("static_best", 8, 1)
    ids = draft_engine.prompt_token_ids(LONG)
    started = time.monotonic()
    result = run_live_race(draft_engine, controller, _problem(), ids, deadline)
    elapsed = time.monotonic() - started
    assert elapsed <= deadline + 0.1 and result.latency_s <= deadline + 0.1
    assert result.stop_reason == "deadline" and result.state.stopped == "deadline"
    assert all(b.finish_s <= deadline for b in result.rollout.finished)
    assert not draft_engine.has_unfinished_requests()


@pytest.mark.engine
def test_on_start_comes_once_the_engine_counts_the_call(draft_engine):
    """A server's admission stops reserving room for a call at ``on_start``, so the engine's
    own count (``calls_in_flight``, which admission reads) must already have the call then;
    called before the branches were queued, a second request could be admitted in between."""
    seen = []

    def on_start(n: int, k: int) -> None:
        seen.append((n, k, [c.live for c in draft_engine.batch.calls_in_flight()]))

    controller = RuleController("static_best", 4, 1)
    ids = draft_engine.prompt_token_ids(SHORT_REPLY)
    result = run_live_race(draft_engine, controller, _problem(SHORT_REPLY), ids, 30.0,
                           max_tokens=8, max_n=2, on_start=on_start)  # fmt: skip
    assert seen == [(4, 1, [2])]  # the controller's n before the cap; the engine holds the 2
    assert result.rollout.n == 2 and not draft_engine.has_unfinished_requests()
