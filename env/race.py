"""The race state: one object for a call in flight, read by every controller.

A call is a race: ``n`` branches start together, every engine step advances the live ones, a
branch that finishes casts its vote, and the call ends when the controller stops it, the vote
is decided or the deadline arrives.  The same events come from three sources (the replay of a
profile, the live engine, the server), so the bookkeeping lives here once: each source calls
``start``, ``record_steps``, ``record_finish``, ``set_k`` and ``stop``; each controller reads the
fields and ``observation()``.  The voting rules are ``env.task.voting.VoteTally``'s.

The state reports *measured* progress (seconds per engine step, tokens so far), and the
observation expresses time relative to the deadline and to the measured step time, so a policy
trained on one machine's profile keeps sensible decisions on a faster or slower one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from env.task.voting import VoteTally

RACE_FEATURES = (
    "is_start",
    "elapsed_fraction",
    "log_steps_left",
    "log2_n",
    "finished_fraction",
    "answered_fraction",
    "leader_share",
    "leader_votes",
    "margin",
    "distinct_fraction",
    "live_fraction",
    "k_fraction",
    "leader_confidence",
    "has_confidence",
    "load",
)
"""Names of ``RaceState.observation()``'s entries, in order (see its docstring for ranges).
``load`` came last (observation layout 2 of ``LatencyTTS-v1``), so the others kept their
places; a policy saved with other names is refused (``policies.saved_policy``)."""

STOP_REASONS = ("decided", "deadline", "controller", "complete")
CONTINUE, STOP = 0, 1
"""Values of a race action's stop component (``LatencyTTS-v1``'s third action component)."""
DEFAULT_CHECKPOINTS = (0.25, 0.5, 0.75)
"""Fractions of the deadline at which a race pauses for its controller when no branch has
finished since the last decision point."""
STEPS_SCALE = math.log(4097.0)
"""``log_steps_left`` divides ln(1 + steps left) by this: 4,096 steps map to 1."""
LOAD_SCALE_BRANCHES = 255
"""``load`` is log2(1 + background branches) / log2(1 + this): 255 other branches map to 1.
A fixed scale rather than the training distribution's largest level, so the feature means the
same thing to every policy and to the server, which reports whatever load it has."""
LOAD_LOG_SCALE = math.log2(1 + LOAD_SCALE_BRANCHES)
CONFIDENCE_WINDOW = 32
"""Tokens per window of ``BranchConfidence.lowest_window_logprob``.  DeepConf groups 2,048
tokens of traces thousands of tokens long; the branches here are a few hundred tokens, so the
window is shorter to still single out a locally unsure stretch."""


@dataclass(frozen=True)
class BranchConfidence:
    """A finished branch's token log-probability summary (DeepConf's confidence signals).

    :param mean_logprob: mean log-probability of the branch's sampled tokens.
    :param lowest_window_logprob: the lowest mean over a sliding window of tokens
        (DeepConf's "lowest group confidence"), which flags a locally unsure trace.
    """

    mean_logprob: float
    lowest_window_logprob: float

    @classmethod
    def from_logprobs(
        cls, logprobs: Sequence[float] | None, window: int = CONFIDENCE_WINDOW
    ) -> BranchConfidence | None:
        """The summary of a branch's sampled-token log-probabilities (None without any): the
        mean, and the lowest mean over ``window`` consecutive tokens (over all of them when
        the branch is shorter than a window)."""
        if not logprobs:
            return None
        values = np.asarray(logprobs, dtype=float)
        width = min(window, len(values))
        sums = np.convolve(values, np.ones(width), mode="valid")
        return cls(float(values.mean()), float(sums.min() / width))


@dataclass
class RaceState:
    """One call in flight (see the module docstring).

    :param deadline_s: the call's wall-clock deadline, seconds from its start.
    :param n_max: the largest ``n`` a controller may start (scales the observation).
    :param k_max: the largest ``k`` (scales the observation).
    :param background_branches: other calls' branches sharing the engine batch when this call
        starts (the load; 0 on an idle engine).  Every engine step of this call runs at batch
        ``running + background_branches``, and k is engine-wide: the call's k applies to the
        whole batch.  Set once at the start: the load a controller is told, so a policy can
        start fewer branches or draft less when the engine is busy.
    """

    deadline_s: float
    n_max: int
    k_max: int
    background_branches: int = 0
    n: int = 0
    k: int = 0
    elapsed_s: float = 0.0
    steps: int = 0
    decode_s: float = 0.0
    tokens_generated: float = 0.0
    tally: VoteTally = field(default_factory=lambda: VoteTally(0))
    finish_order: list[int] = field(default_factory=list)
    confidences: dict[int, list[BranchConfidence]] = field(default_factory=dict)
    stopped: str | None = None
    started: bool = False

    def start(self, n: int, k: int, at_s: float = 0.0) -> None:
        """The call starts ``n`` branches with ``k`` drafts per step."""
        if not 1 <= n <= self.n_max:
            raise ValueError(f"n={n} outside 1..{self.n_max}")
        self.n, self.k, self.elapsed_s, self.started = n, k, at_s, True
        self.tally = VoteTally(n)
        self.finish_order = []

    def set_k(self, k: int) -> None:
        """Drafts per step from the next engine step on."""
        if not 0 <= k <= self.k_max:
            raise ValueError(f"k={k} outside 0..{self.k_max}")
        self.k = k

    def record_steps(self, at_s: float, steps: int, tokens: float, decode_s: float) -> None:
        """``steps`` engine steps ended at ``at_s``, generating ``tokens`` over all branches
        in ``decode_s`` seconds of decoding (measured progress)."""
        self.elapsed_s = at_s
        self.steps += steps
        self.tokens_generated += tokens
        self.decode_s += decode_s

    def record_finish(
        self, answer_class: int, at_s: float, confidence: BranchConfidence | None = None
    ) -> None:
        """A branch finished at ``at_s`` with ``answer_class`` (-1: no answer)."""
        self.elapsed_s = max(self.elapsed_s, at_s)
        self.tally.add(answer_class)
        self.finish_order.append(answer_class)
        if confidence is not None and answer_class >= 0:
            self.confidences.setdefault(answer_class, []).append(confidence)

    def stop(self, reason: str, at_s: float) -> None:
        """The call ends at ``at_s`` (one of ``STOP_REASONS``)."""
        if reason not in STOP_REASONS:
            raise ValueError(f"stop reason {reason!r} not in {STOP_REASONS}")
        self.stopped, self.elapsed_s = reason, at_s

    @property
    def remaining_s(self) -> float:
        return max(self.deadline_s - self.elapsed_s, 0.0)

    @property
    def running(self) -> int:
        """Branches still decoding (the live batch of this call)."""
        return 0 if self.stopped else self.n - self.tally.finished

    @property
    def seconds_per_step(self) -> float | None:
        """Measured mean seconds per decode step so far (None before the first step)."""
        return self.decode_s / self.steps if self.steps else None

    def leader_confidence(self) -> float | None:
        """Mean log-probability of the leading class's branches, when the engine gave them."""
        members = self.confidences.get(self.tally.leader)
        if not members:
            return None
        return float(np.mean([c.mean_logprob for c in members]))

    def observation(self, n_max: int | None = None, k_max: int | None = None) -> np.ndarray:
        """The race features ``RACE_FEATURES`` as float32, each in [-1, 1]:

        fractions are in [0, 1]; ``log2_n`` is log2(n) / log2(n_max); ``log_steps_left`` is
        ln(1 + remaining seconds / measured seconds per step) / ln(4097) (0 before any step);
        ``margin`` and ``leader_votes`` are divided by n; ``leader_confidence`` is the leader's
        mean token log-probability / 2 clipped to [-1, 0] (0 without confidence); ``load`` is
        log2(1 + background branches) / log2(1 + ``LOAD_SCALE_BRANCHES``), clipped to 1.

        ``n_max`` and ``k_max`` override the state's scales: a learned controller reads every
        race (replayed, live) with the scales it was trained with, whoever built the state.
        """
        n_max = self.n_max if n_max is None else n_max
        k_max = self.k_max if k_max is None else k_max
        t, n = self.tally, max(self.n, 1)
        per_step = self.seconds_per_step
        steps_left = self.remaining_s / per_step if per_step else 0.0
        confidence = self.leader_confidence()
        values = (
            0.0 if self.started else 1.0,
            min(self.elapsed_s / self.deadline_s, 1.0),
            min(math.log1p(steps_left) / STEPS_SCALE, 1.0),
            math.log2(n) / max(math.log2(n_max), 1.0),
            t.finished / n,
            t.answered / max(t.finished, 1),
            t.share,
            t.leader_votes / n,
            t.margin / n,
            t.distinct / max(t.answered, 1),
            self.running / max(n_max, 1),
            self.k / max(k_max, 1),
            0.0 if confidence is None else max(confidence / 2.0, -1.0),
            0.0 if confidence is None else 1.0,
            min(math.log2(1 + self.background_branches) / LOAD_LOG_SCALE, 1.0),
        )
        return np.asarray(values, dtype=np.float32)


def begin_call(controller, problem, deadline_s: float, state: RaceState) -> tuple[int, int]:
    """The controller's (n, k) for a call whose state is ``state`` (not started yet): a
    controller that reads the load (``reads_load``, e.g. ``policies.LearnedController``) is told
    the state's background branches, the others are asked as the ``RaceController`` protocol
    has it.  Replay (``policies.race_eval``) and the live race (``env.backends.live_race``)
    both start calls through here."""
    if getattr(controller, "reads_load", False):
        return controller.begin(problem, deadline_s, background_branches=state.background_branches)
    return controller.begin(problem, deadline_s)
