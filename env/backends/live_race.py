"""The live race: a race controller drives one call on the live engine, step by step.

The live twin of ``env.backends.replay_race``: the same events (start, engine steps, branch
finishes, stop) update the same ``env.race.RaceState``, and the controller is asked at the same
decision points, so a controller evaluated on replayed races runs unchanged on the engine:

- at the start, ``controller.begin`` picks (n, k);
- after every engine step (``VLLMEngine.run``'s ``on_step`` hook, on the engine thread) the
  state records the measured step (wall time and tokens; the prefill step counts as the start,
  not as a decode step) and each branch that finished: its answer class (``RolloutVote``,
  whose tally is the state's) and, when the engine gave token log-probabilities, its
  confidence (``BranchConfidence``);
- a step in which branches finished is a decision point, and so is the last step that ends
  before a checkpoint fraction of the deadline (as in replay: the next step would end past it);
  the controller may stop the call (the engine aborts the other branches and the leader
  answers) or set k, which the engine applies from its next step (the scheduler's dynamic
  speculation table; only 0 <= k <= k_max);
- the call also ends when the vote is decided, when every branch finished, or at the
  controller's ``call_deadline``: the engine returns then with what finished
  (``VLLMEngine.run``'s deadline), and branches it reports finished that the step hook had not
  seen yet (a step that ended just as the deadline struck) still vote.

This module imports neither ``datasets`` nor training code: the deployed controller
(``policies.controller``) serves through it.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine import engine_thread
from engine.call_state import StepControl, StepReport
from engine.rollout import BranchResult, Rollout
from engine.vllm_engine import VLLMEngine
from env.backends.protocol import ProblemInfo
from env.backends.sample_vote import RolloutVote
from env.race import (
    CONFIDENCE_WINDOW,
    DEFAULT_CHECKPOINTS,
    BranchConfidence,
    RaceState,
    begin_call,
)


class Controller(Protocol):
    """What the live race needs of a controller: structurally
    ``policies.race_controllers.RaceController`` (named here because env does not import
    policies), whose ``decide`` returns a decision with ``stop`` and ``k`` (None: keep)."""

    def begin(self, problem: ProblemInfo, deadline_s: float) -> tuple[int, int]: ...

    def decide(self, state: RaceState): ...

    def call_deadline(self, deadline_s: float) -> float: ...


@dataclass
class LiveRaceResult:
    """A finished live race.

    :param rollout: the engine's call (branches, timings, spec counters, ``k_changes``).
    :param vote: the answers and their classes; its tally is ``state.tally``.
    :param state: the race state at the end (votes, measured progress, k, confidences).
    :param stop_reason: ``"decided"``, ``"controller"``, ``"deadline"``, ``"complete"`` or
        ``"cancelled"``.
    :param latency_s: seconds from the race's start (before ``begin``) until the answer.
    :param decision_s: seconds each ``controller.decide`` took, in order.
    :param confidences: branch index -> its confidence, for finished branches with
        log-probabilities.
    """

    rollout: Rollout
    vote: RolloutVote
    state: RaceState
    stop_reason: str
    latency_s: float
    decision_s: list[float] = field(default_factory=list)
    confidences: dict[int, BranchConfidence] = field(default_factory=dict)


class LiveRace:
    """The bookkeeping of one call between the engine's steps and the controller.

    ``on_step`` is the engine's per-step hook (engine thread); ``finish`` closes the race once
    the engine call returned (caller thread).  A lock keeps the two apart: after ``finish`` the
    hook changes nothing, so the result is not touched by a step still in flight.

    :param controller: decides at every decision point.
    :param state: the started race state (n, k, deadline = the controller's call deadline).
    :param started_at: ``time.monotonic()`` at the race's start: the state's clock origin.
    :param checkpoints: fractions of the state's deadline that are decision points.
    :param window: tokens per window of the branches' lowest windowed log-probability.
    """

    def __init__(
        self,
        controller: Controller,
        state: RaceState,
        started_at: float,
        checkpoints: Sequence[float] = DEFAULT_CHECKPOINTS,
        window: int = CONFIDENCE_WINDOW,
    ) -> None:
        self.controller, self.state, self.started_at, self.window = (
            controller, state, started_at, window)  # fmt: skip
        self.vote = RolloutVote(state.n)
        self.vote.tally = state.tally  # one tally: the vote reads what the race counts
        finite = math.isfinite(state.deadline_s)
        self._checkpoints = sorted(state.deadline_s * c for c in checkpoints) if finite else []
        self._decoding = False
        self._closed = False
        self._lock = threading.Lock()
        self.decision_s: list[float] = []
        self.confidences: dict[int, BranchConfidence] = {}

    def on_step(self, report: StepReport) -> StepControl | None:
        """Record the step, then stop, change k or carry on (engine thread)."""
        with self._lock:
            if self._closed or self.state.stopped:
                return StepControl(stop=True)
            at = report.at - self.started_at
            self._record_progress(report, at)
            for branch in report.finished:
                self._record_finish(branch, at)
            if self.state.tally.decided:
                self.state.stop("decided" if self.state.tally.remaining else "complete", at)
                return StepControl(stop=True)
            if not self._decision_point(report, at):
                return None
            return self._decide(at)

    def _record_finish(self, branch: BranchResult, at: float) -> None:
        """A finished branch votes with its answer class and, when known, its confidence."""
        confidence = BranchConfidence.from_logprobs(branch.token_logprobs, self.window)
        if confidence is not None:
            self.confidences[branch.index] = confidence
        self.state.record_finish(self.vote.classify(branch), at, confidence)

    def _record_progress(self, report: StepReport, at: float) -> None:
        """Measured progress: decode steps with their wall time; the prefill step (before the
        first token) moves the clock and counts its tokens but is not a decode step."""
        if self._decoding:
            self.state.record_steps(at, 1, report.new_tokens, report.step_s)
        else:
            self.state.record_steps(at, 0, report.new_tokens, 0.0)
            self._decoding = report.new_tokens > 0

    def _decision_point(self, report: StepReport, at: float) -> bool:
        """Branches finished in this step, or the next step would end past a checkpoint (the
        checkpoints it passes are then taken)."""
        horizon = at + report.step_s
        passed = 0
        while passed < len(self._checkpoints) and self._checkpoints[passed] <= horizon:
            passed += 1
        del self._checkpoints[:passed]
        return bool(report.finished) or passed > 0

    def _decide(self, at: float) -> StepControl | None:
        started = time.perf_counter()
        decision = self.controller.decide(self.state)
        self.decision_s.append(time.perf_counter() - started)
        if decision.stop:
            self.state.stop("controller", at)
            return StepControl(stop=True)
        if decision.k is not None and decision.k != self.state.k:
            self.state.set_k(decision.k)  # refuses k outside 0..k_max
            return StepControl(k=decision.k)
        return None

    def finish(self, rollout: Rollout) -> LiveRaceResult:
        """Close the race on the engine's result: late finished branches vote, and the stop
        reason is the race's own or, failing one, the engine's (caller thread)."""
        latency = time.monotonic() - self.started_at
        with self._lock:
            self._closed = True
            state, offset = self.state, latency - rollout.wall_s  # race clock - engine clock
            for branch in rollout.finished:
                if branch.index not in self.vote.answers:  # ended as the deadline struck
                    self._record_finish(branch, branch.finish_s + offset)
            if state.stopped is not None:
                reason = state.stopped
            elif rollout.stopped_by == "cancelled":
                reason = "cancelled"
            else:
                reason = "deadline" if state.tally.remaining else "complete"
                state.stop(reason, min(latency, state.deadline_s))
        return LiveRaceResult(rollout, self.vote, state, reason, latency, self.decision_s,
                              self.confidences)  # fmt: skip


def run_live_race(
    engine: VLLMEngine,
    controller: Controller,
    problem: ProblemInfo,
    prompt_ids: Sequence[int],
    deadline_s: float | None,
    *,
    checkpoints: Sequence[float] = DEFAULT_CHECKPOINTS,
    max_tokens: int | None = None,
    cancel: threading.Event | None = None,
    logprobs: bool = True,
    started_at: float | None = None,
    max_n: int | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> LiveRaceResult:
    """Run ``controller`` on one call of ``problem`` (``prompt_ids``: its chat-formatted
    prompt, ``VLLMEngine.prompt_token_ids``) under ``deadline_s`` (None: none).

    Other calls running on the engine share its batch; the branches they hold when this one
    starts are the race's load (``RaceState.background_branches``), which a controller that
    reads it (``env.race.begin_call``) is told.

    The deadline counts from ``started_at`` (default: now) and includes ``begin``.  The state's
    scales are the engine's (largest n and k); a learned controller reads it with its own.

    :param checkpoints: fractions of the deadline that are decision points.
    :param max_tokens: per-branch cap (at most the engine's ``max_tokens``).
    :param cancel: set to abort the call after the engine step in flight.
    :param logprobs: ask the engine for sampled-token log-probabilities (branch confidence).
    :param max_n: most branches the call may start, whatever the controller picks (the
        server's admission degrades a call to fit the engine's load this way).
    :param on_start: called with the controller's (n, k) (n before the ``max_n`` cap) once
        the branches are queued in the engine's batch: the server's admission stops reserving
        room for the call then, and the engine's count of calls in flight has it from that
        moment.  Called before they were queued, it left a gap in which a call was counted
        nowhere, and a second request was admitted beside it on an engine with room for one.
    :raises ValueError: for a bad argument or a controller choice the engine cannot run.
    """
    started = time.monotonic() if started_at is None else started_at
    deadline = math.inf if deadline_s is None else deadline_s
    stop_at = controller.call_deadline(deadline)
    _, load = engine.batch.load  # other calls' branches in the batch: the race's load
    state = RaceState(stop_at, engine.config.max_n, engine.config.k_max, background_branches=load)
    # torch on the engine thread (between two steps of the calls in flight)
    n, k = engine_thread.call(begin_call, controller, problem, deadline, state)
    queued = None if on_start is None else functools.partial(on_start, n, k)
    if max_n is not None:
        n = min(n, max_n)
    state.start(n, k, at_s=time.monotonic() - started)
    race = LiveRace(controller, state, started, checkpoints)
    left = None if math.isinf(stop_at) else max(stop_at - (time.monotonic() - started), 1e-6)
    rollout = engine.run(list(prompt_ids), n, k, left, max_tokens=max_tokens, cancel=cancel,
                         on_step=race.on_step, logprobs=logprobs, on_queued=queued)  # fmt: skip
    return race.finish(rollout)
