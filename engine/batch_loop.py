"""One engine, many calls: the step loop that runs every call in flight in the same vLLM batch.

vLLM exists to batch concurrent requests: on this CPU a decode step of 10 sequences costs
about 2.4x a step of one, so ten calls stepped together finish far sooner than ten calls taken
in turn.  ``VLLMEngine.run`` therefore hands its call to this loop and waits; the loop, on the
engine thread (``engine.engine_thread``), admits the calls that arrived, runs one engine step
for all of them, hands each call the outputs of its own branches (``CallState.record_outputs``)
and its ``on_step`` hook, and ends a call that stopped (its controller, its vote, its deadline,
its client's cancel) by aborting only that call's branches.  One iteration is one task on the
engine thread, re-queued while calls are live, so other engine-thread work (a controller's
``begin``, a counter read) runs between two steps instead of waiting for every call to end.

k is engine-wide: every sequence in a step drafts the same number of tokens (the scheduler's
dynamic-speculation table).  Each call asks for its own k (at the start, then through its
``on_step`` hook); the step drafts ``batch_k`` of those requests: the median over the live
branches (each branch votes with its call's k; ties go to the smaller k).  A call alone in the
engine therefore gets exactly its k, and in a shared batch the k that most branches asked for,
the choice that minimises the total distance between what the branches asked and what they
get; the smaller k on a tie because a step with fewer drafts is cheaper for every sequence in
it, and under load the verification cost grows with the batch (``env.synthetic.roofline``).

Every step is also reported to the engine's step listeners (``BatchStep``: wall time, batch,
k, whether new prompts were prefilled in it): the serving machine's latency model is corrected
from them (``env.profiles.online_calibration``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine import engine_thread
from engine.call_state import CallState

if TYPE_CHECKING:
    from engine.vllm_engine import VLLMEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallLoad:
    """What one call in flight still holds of the engine (``BatchLoop.calls_in_flight``).

    :param live: its branches still running (all n while it waits for its first step).
    :param tokens_done: tokens its longest live branch generated so far.
    :param max_tokens: its per-branch token limit.
    :param k: the k it asks for.
    :param seconds_left: time to its deadline (inf: none).
    """

    live: int
    tokens_done: int
    max_tokens: int
    k: int
    seconds_left: float


@dataclass(frozen=True)
class BatchStep:
    """One engine step as the step listeners see it.

    :param step_s: wall seconds of the step.
    :param batch: live branches (all calls) when the step started.
    :param k: draft tokens per sequence in the step (``batch_k``).
    :param calls: calls in the batch.
    :param prefill: whether calls were added just before the step (their prompts were
        prefilled in it, so it is not a plain decode step).
    :param prompt_tokens: prompt tokens of the calls added (0 without prefill).
    """

    step_s: float
    batch: int
    k: int
    calls: int
    prefill: bool
    prompt_tokens: int


def batch_k(requests: Iterable[tuple[int, int]]) -> int | None:
    """The k one engine step drafts for calls asking ``(k, live branches)``: the branch-weighted
    lower median (None when no branch is live).

    >>> batch_k([(4, 1)]), batch_k([(0, 3), (4, 2)]), batch_k([(0, 1), (4, 1)])
    (4, 0, 0)
    """
    pairs = sorted((k, branches) for k, branches in requests if branches > 0)
    total = sum(branches for _, branches in pairs)
    if total == 0:
        return None
    middle, seen = (total + 1) // 2, 0
    for k, branches in pairs:
        seen += branches
        if seen >= middle:
            return k
    raise AssertionError("unreachable: the weights sum to total")


class BatchLoop:
    """The calls in flight on one engine, stepped together (see the module docstring).

    ``submit`` is called from any thread; everything else runs on the engine thread.
    """

    def __init__(self, engine: VLLMEngine) -> None:
        self._engine = engine
        self._inbox: list[CallState] = []
        self._active: list[CallState] = []
        self._lock = threading.Lock()  # guards _inbox, _scheduled and the counts
        self._scheduled = False
        self._idle = threading.Event()
        self._idle.set()
        self.listeners: list[Callable[[BatchStep], None]] = []
        self.live_branches = 0  # all calls' live branches after the last step
        self.live_calls = 0

    # ----------------------------------------------------------------------- any thread
    def submit(self, call: CallState) -> None:
        """Queue a call; the loop adds its branches before its next step."""
        with self._lock:
            self._inbox.append(call)
            self._idle.clear()
            if not self._scheduled:
                self._scheduled = True
                engine_thread.defer(self._tick)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no call is queued or running (every abort done); False on timeout."""
        return self._idle.wait(timeout)

    @property
    def load(self) -> tuple[int, int]:
        """(calls, live branches) in the engine now, including calls queued for the next step."""
        with self._lock:
            queued = sum(call.rollout.n for call in self._inbox)
            return self.live_calls + len(self._inbox), self.live_branches + queued

    def calls_in_flight(self) -> list[CallLoad]:
        """Each call queued or running, as admission control predicts with it."""
        now = time.monotonic()
        with self._lock:
            calls = [*self._active, *self._inbox]
        loads = []
        for call in calls:
            with call.mutex:
                if call.cancelled or not call.live:
                    continue
                deadline = call.rollout.deadline_s
                done = max((call.branch_of[r].token_count for r in call.live), default=0)
                left = math.inf if deadline is None else call.start + deadline - now
                loads.append(CallLoad(len(call.live), done, call.max_tokens, call.k_wanted, left))
        return loads

    # ----------------------------------------------------------------------- engine thread
    def _tick(self) -> None:
        """One iteration: admit, step once, hand out the outputs; re-queued while calls live."""
        try:
            self._iterate()
        finally:
            with self._lock:
                if self._active or self._inbox:
                    engine_thread.defer(self._tick)
                else:
                    self._scheduled = False
                    self.live_calls = self.live_branches = 0
                    self._idle.set()

    def _iterate(self) -> None:
        added = self._admit_new_calls()
        for call in list(self._active):
            with call.mutex:
                gone = call.cancelled or not call.live
                if call.cancel is not None and call.cancel.is_set() and call.live:
                    call.rollout.stopped_by, gone = "cancelled", True
            if gone:
                self._finish(call)
        if not self._active:
            return
        k = batch_k((call.k_wanted, len(call.live)) for call in self._active)
        batch = sum(len(call.live) for call in self._active)
        try:
            self._engine.set_k(k or 0)
            started = time.monotonic()
            outputs = self._engine.llm_engine.step()
            now = time.monotonic()
        except BaseException as exc:  # every call in the batch fails with the step
            for call in list(self._active):
                call.error = exc
                self._finish(call)
            return
        step = BatchStep(now - started, batch, k or 0, len(self._active), bool(added),
                         sum(len(call.prompt_ids) * call.rollout.n for call in added))  # fmt: skip
        for listener in list(self.listeners):
            try:
                listener(step)
            except Exception:  # an observer's failure must not cost the calls their step
                log.exception("step listener %r failed", listener)
        for call in list(self._active):
            call.rollout.batch_max = max(call.rollout.batch_max, batch)
            self._hand_out(call, outputs, now, step.step_s)
        with self._lock:
            self.live_calls = len(self._active)
            self.live_branches = sum(len(call.live) for call in self._active)

    def _admit_new_calls(self) -> list[CallState]:
        with self._lock:
            new, self._inbox = self._inbox, []
        added = []
        for call in new:
            with call.mutex:
                gone = call.cancelled or (call.cancel is not None and call.cancel.is_set())
                if gone:
                    call.rollout.stopped_by = "cancelled"
            if gone:
                call.live.clear()
                call.done.set()
                continue
            try:
                self._engine.add_branches(call)
            except BaseException as exc:  # re-raised by run() in the caller's thread
                call.error = exc
                self._finish(call)
                continue
            with self._lock:
                self._active.append(call)
            added.append(call)
        return added

    def _hand_out(self, call: CallState, outputs: list, now: float, step_s: float) -> None:
        """Give one call its branches' outputs and its hook; end it if it stopped."""
        try:
            with call.mutex:
                report = call.record_outputs(outputs, now, step_s)
                hook = None if call.cancelled else call.on_step
            control = hook(report) if hook is not None else None  # outside the mutex
            with call.mutex:
                stop = call.stops_after_step(report, control)
                if not stop and control is not None and control.k is not None:
                    self._engine.check_k(control.k)
                    call.want_k(control.k, report.elapsed_s)
        except BaseException as exc:  # a hook's error ends its own call only
            call.error, stop = exc, True
        if stop:
            self._finish(call)

    def _finish(self, call: CallState) -> None:
        """Abort the call's live branches, close its books and wake its caller."""
        try:
            self._engine.end_call(call)
        except BaseException as exc:
            call.error = call.error or exc
        finally:
            with self._lock:
                if call in self._active:
                    self._active.remove(call)
            call.done.set()
