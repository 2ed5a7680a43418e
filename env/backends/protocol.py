"""What every source of a call shares: the problem it is asked, and the ``Outcome`` it returns.

A call answers one problem with ``n`` sampled branches, ``k`` draft tokens per verification step
and a wall-clock deadline, aggregating by majority vote.  The replay backend
(``env.backends.replay``) answers from a recorded profile in microseconds, the replayed race
(``env.backends.replay_race``) the same call step by step, the live race
(``env.backends.live_race``) on the vLLM engine; all describe problems with ``ProblemInfo`` and
results with ``Outcome``, so controllers and evaluation never know which one they drive.

Rules every source follows (the replay backend is the reference implementation):

- branches still running at the deadline are aborted and do not vote;
- the finished ones vote by the rules of ``env.task.voting`` (``VoteTally``), and the call
  stops as soon as that vote is decided;
- ``latency_s`` is the time from the call's start until the answer is fixed: the decision, the
  last branch's finish, or the deadline, whichever comes first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class ProblemInfo:
    """What a backend tells the controller about a problem before running it.

    Only ``problem`` and ``prompt_tokens`` may feed the observation (they are known at
    deployment); ``level`` and ``subject`` are for reports.

    :param index: position in ``Backend.problems``.
    :param id: problem id (MATH ``unique_id``).
    :param problem: problem text.
    :param prompt_tokens: tokens of the chat-formatted prompt.
    :param level: MATH difficulty 1..5 (0 unknown).
    :param subject: MATH subject.
    """

    index: int
    id: str
    problem: str
    prompt_tokens: int
    level: int = 0
    subject: str = ""


@dataclass
class Outcome:
    """Result of one test-time-scaling call (not frozen: replay builds thousands per second).

    :param correct: the voted answer is right (always False when nothing was answered).
    :param answered: some finished branch gave an answer, so the call returned one.
    :param answer_class: the winning answer class within the problem, -1 when unanswered.
    :param answer: the winning answer's text (its first member's), None when unanswered.
    :param latency_s: seconds from the call's start until the answer was fixed.
    :param n: branches started.
    :param k: draft tokens per verification step.
    :param branches_finished: branches that finished before the call stopped.
    :param generated_tokens: tokens generated over all branches, aborted ones included.
    :param deadline_missed: the deadline cut the call off before any answer existed.
    """

    correct: bool
    answered: bool
    answer_class: int
    answer: str | None
    latency_s: float
    n: int
    k: int
    branches_finished: int
    generated_tokens: int
    deadline_missed: bool

    def to_info(self) -> dict:
        """The outcome as a plain dict (the environment's ``info``)."""
        return dict(vars(self))


@runtime_checkable
class Backend(Protocol):
    """Runs majority-vote test-time scaling on a fixed list of problems.

    ``env.backends.replay.ReplayBackend`` implements it; a backend sets ``deterministic =
    True`` when equal generators give equal outcomes (replay does), which lets Gymnasium's
    checker test determinism of an environment built on it.
    """

    @property
    def name(self) -> str:
        """What runs the calls, as shown beside numbers (a profile's label for replay)."""
        ...

    @property
    def synthetic(self) -> bool:
        """Whether the numbers come from a synthetic profile rather than an engine."""
        ...

    @property
    def problems(self) -> Sequence[ProblemInfo]:
        """The problems this backend can run, indexed by ``ProblemInfo.index``."""
        ...

    @property
    def max_branches(self) -> int:
        """Largest ``n`` the backend accepts."""
        ...

    @property
    def k_grid(self) -> tuple[int, ...]:
        """Draft lengths ``k`` the backend accepts (0 = no speculation)."""
        ...

    def run(
        self, problem_index: int, n: int, k: int, deadline_s: float, rng: np.random.Generator
    ) -> Outcome:
        """Answer one problem with n branches and k drafts within ``deadline_s`` seconds.

        ``rng`` drives the backend's randomness (which recorded branches replay draws, or the
        engine's sampling seed), so equal generators give equal draws.
        """
        ...
