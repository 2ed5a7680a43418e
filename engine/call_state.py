"""The state of one engine call in flight, shared by the caller's thread and the engine thread.

``VLLMEngine.run`` builds it and waits on it; the engine thread adds the branches, records
each step's outputs into it (``record_outputs``, which returns a ``StepReport``), hands the
report to the caller's per-step hook (``on_step``, which may answer with a ``StepControl``: stop,
or a new k) and decides whether the call goes on (``stops_after_step``); at the deadline the
caller takes a ``snapshot`` while the engine thread finishes the step in flight.  Kept apart
from ``engine.vllm_engine`` so that module holds what is specific to vLLM.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.rollout import BranchResult, Rollout


@dataclass(frozen=True)
class StepReport:
    """What one engine step did for a call, handed to the call's ``on_step`` hook.

    :param at: ``time.monotonic()`` when the step ended (callers keep their own clock origin).
    :param elapsed_s: seconds from the call's start to the end of the step.
    :param step_s: wall seconds of the step.
    :param new_tokens: tokens this call's branches generated in the step.
    :param finished: branches that finished in the step, in the engine's output order.
    :param live: branches still running after the step.
    """

    at: float
    elapsed_s: float
    step_s: float
    new_tokens: int
    finished: list[BranchResult]
    live: int


@dataclass(frozen=True)
class StepControl:
    """The ``on_step`` hook's answer: stop the call now, and/or draft ``k`` tokens per step
    from the next step on (None keeps the current k)."""

    stop: bool = False
    k: int | None = None


@dataclass
class CallState:
    """One call in flight, shared between ``VLLMEngine.run`` (caller thread) and its driver
    (engine thread).

    Fields the worker updates while the call runs are read by the caller under ``mutex``.
    """

    rollout: Rollout
    prompt_ids: list[int]
    start: float
    temperature: float
    max_tokens: int
    branch_of: dict[str, BranchResult]  # request id -> its branch
    ignore_eos: bool = False
    should_stop: Callable[[list[BranchResult]], bool] | None = None
    on_step: Callable[[StepReport], StepControl | None] | None = None
    logprobs: bool = False
    cancel: threading.Event | None = None
    cancelled: bool = False
    error: BaseException | None = None
    counters_before: dict[str, float] = field(default_factory=dict)
    k_wanted: int = field(init=False)  # the k this call asks the batch for
    live: set[str] = field(init=False)  # request ids still running
    pieces: dict[str, list[str]] = field(init=False)  # request id -> text deltas so far
    done: threading.Event = field(default_factory=threading.Event)
    mutex: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.live = set(self.branch_of)
        self.pieces = {request_id: [] for request_id in self.branch_of}
        self.k_wanted = self.rollout.k

    def want_k(self, k: int, elapsed_s: float) -> None:
        """Ask for k drafts per step from the next step on (recorded in ``k_changes``)."""
        if k != self.k_wanted:
            self.k_wanted = k
            self.rollout.k_changes.append((elapsed_s, k))

    def record_outputs(self, outputs: list, at: float, step_s: float) -> StepReport:
        """Add one step (ended at monotonic time ``at``) to its branches (under mutex)."""
        elapsed = at - self.start
        finished, new_tokens = [], 0
        for out in outputs:
            branch = self.branch_of.get(out.request_id)
            if branch is None:
                continue
            pieces = self.pieces[out.request_id]
            for completion in out.outputs:
                pieces.append(completion.text)
                branch.token_count += len(completion.token_ids)
                new_tokens += len(completion.token_ids)
                if self.logprobs:
                    _record_logprobs(branch, completion)
                if self.rollout.ttft_s is None and completion.token_ids:
                    self.rollout.ttft_s = elapsed
                if out.finished:
                    _record_finish(branch, completion, elapsed, "".join(pieces))
            if out.finished:
                self.live.discard(out.request_id)
                finished.append(branch)
        return StepReport(at, elapsed, step_s, new_tokens, finished, len(self.live))

    def stops_after_step(self, report: StepReport, control: StepControl | None) -> bool:
        """Whether to stop stepping after the step of ``report``, given the ``on_step`` hook's
        ``control``; sets ``rollout.stopped_by`` when the stop is not the natural end (under
        mutex)."""
        if not self.live or self.cancelled:
            return True
        rollout = self.rollout
        elapsed, step_s = report.elapsed_s, report.step_s
        if self.cancel is not None and self.cancel.is_set():
            rollout.stopped_by = "cancelled"
        elif (control is not None and control.stop) or (
            report.finished and self.should_stop and self.should_stop(rollout.finished)
        ):
            rollout.stopped_by = "early_stop"
        # A step cannot be interrupted: if the next one would end past the deadline its tokens
        # could not be used, so stop now instead of computing them.
        elif rollout.deadline_s is not None and elapsed + step_s > rollout.deadline_s:
            rollout.stopped_by = "deadline"
        else:
            return False
        return True

    def snapshot(self, elapsed: float) -> Rollout:
        """Copy of the rollout as of now: branches not finished yet count as aborted."""
        result = copy.deepcopy(self.rollout)
        result.wall_s = elapsed
        for branch in result.branches:
            if not branch.finished:
                branch.finish_reason = "aborted"
        if result.stopped_by == "complete" and any(not b.finished for b in result.branches):
            result.stopped_by = "deadline" if self.error is None else "error"
        return result


def _record_logprobs(branch: BranchResult, completion) -> None:
    """Append the sampled tokens' log-probabilities (``SamplingParams(logprobs=0)`` returns,
    per new token, a dict holding at least the sampled token's ``Logprob``)."""
    if branch.token_logprobs is None:
        branch.token_logprobs = []
    for token, candidates in zip(completion.token_ids, completion.logprobs or (), strict=False):
        branch.token_logprobs.append(float(candidates[token].logprob))


def _record_finish(branch: BranchResult, completion, elapsed: float, text: str) -> None:
    branch.finish_s = elapsed
    branch.text = text
    branch.finish_reason = completion.finish_reason or "stop"
    metrics = getattr(completion, "spec_decode_metrics", None)
    if metrics is not None and metrics.histogram:
        branch.verify_steps = int(sum(metrics.histogram))
        branch.accepted_tokens = int(sum(j * c for j, c in enumerate(metrics.histogram)))
        branch.drafted_tokens = int(metrics.num_draft_tokens)
