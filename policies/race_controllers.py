"""Controllers of a race: who decides n and k at the start and when to answer.

Every method the learned policy is compared with is a controller of the same race
(``env.race.RaceState``), so they are all evaluated by the same code on the same draws:

- ``static_best``: the published method (Wang et al. 2025): one (n, k) per deadline, waiting
  for the deadline or the decided vote;
- ``margin``: answer once the leading answer is ``m`` votes ahead of the runner-up;
- ``esc``: Early-Stopping Self-Consistency (Li et al. 2024, ICLR): answer once the last ``w``
  answers agree (the paper samples in windows of ``w`` and stops at the first unanimous one;
  here branches finish one at a time, so the window slides over finished answers);
- ``adaptive_consistency``: Adaptive-Consistency (Aggarwal et al. 2023, EMNLP): answer once the
  posterior probability that the leader's share exceeds the runner-up's is at least ``c``
  (their Beta stopping criterion: with v1, v2 votes for the top two answers and a uniform
  prior, P[p > 1/2] for p ~ Beta(v1 + 1, v2 + 1));
- ``static_budget``: one (n, k, budget) per deadline: the call answers at budget x deadline
  with the branches finished by then (not published; it shows what stopping early at a fixed
  time, without watching the votes, is worth);
- ``plain``: one branch, the fastest k.
Every rule also stops when the vote is decided and at the deadline (the race does that).
``BatchKDrafting`` keeps any controller's stops and re-drafts with the k fastest for the
shrinking batch (a replay-only measurement of what changing k within a call adds).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from env.backends.protocol import ProblemInfo
from env.race import RaceState

if TYPE_CHECKING:
    from env.backends.replay import ReplayBackend


@dataclass(frozen=True)
class Decision:
    """What a controller does at a decision point.

    :param stop: answer now with the votes so far.
    :param k: drafts per step from now on; None keeps the current k.
    """

    stop: bool = False
    k: int | None = None


CONTINUE = Decision()


class RaceController(Protocol):
    """Chooses (n, k) when a call starts and decides at every decision point of its race."""

    name: str

    def begin(self, problem: ProblemInfo, deadline_s: float) -> tuple[int, int]:
        """(n, k) for a call of ``problem`` under ``deadline_s``."""
        ...

    def decide(self, state: RaceState) -> Decision:
        """What to do now (see ``Decision``)."""
        ...

    def call_deadline(self, deadline_s: float) -> float:
        """When the call must end at the latest: the deadline, or earlier for a fixed budget."""
        ...


StopRule = Callable[[RaceState], bool]


def margin_rule(m: int) -> StopRule:
    """Stop once the leader is at least ``m`` votes ahead of the runner-up."""
    if m < 1:
        raise ValueError(f"margin m must be >= 1, got {m}")
    return lambda state: state.tally.answered > 0 and state.tally.margin >= m


def esc_rule(window: int) -> StopRule:
    """Stop once the last ``window`` answers (of branches that answered) are all the same."""
    if window < 1:
        raise ValueError(f"ESC window must be >= 1, got {window}")

    def rule(state: RaceState) -> bool:
        recent = [c for c in reversed(state.finish_order) if c >= 0][:window]
        return len(recent) == window and len(set(recent)) == 1

    return rule


@functools.lru_cache(maxsize=4096)
def leader_posterior(v1: int, v2: int) -> float:
    """P[p > 1/2] for p ~ Beta(v1 + 1, v2 + 1): the probability that the leader (v1 votes)
    is truly more likely than the runner-up (v2 votes), under a uniform prior.

    For integer parameters, P[Beta(a, b) > 1/2] = P[Binomial(a + b - 1, 1/2) <= a - 1].
    """
    a, b = v1 + 1, v2 + 1
    total = a + b - 1
    return sum(math.comb(total, i) for i in range(a)) / 2.0**total


def adaptive_consistency_rule(confidence: float) -> StopRule:
    """Stop once ``leader_posterior(leader votes, runner-up votes) >= confidence``."""
    if not 0.5 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0.5, 1), got {confidence}")
    return lambda state: (
        state.tally.answered > 0
        and (leader_posterior(state.tally.leader_votes, state.tally.runner_up_votes) >= confidence)
    )


RULE_FAMILIES: dict[str, tuple[Callable[..., StopRule] | None, tuple]] = {
    "static_best": (None, (None,)),
    "static_budget": (None, (0.25, 0.35, 0.5, 0.7, 1.0)),
    "margin": (margin_rule, (1, 2, 3, 4, 5, 6, 8)),
    "esc": (esc_rule, (2, 3, 4, 5, 6, 8)),
    "adaptive_consistency": (adaptive_consistency_rule, (0.75, 0.85, 0.9, 0.95, 0.98, 0.99)),
}
"""Each heuristic family: its rule factory (None: never stops on votes) and the thresholds its
tuning searches (for ``static_budget``, the share of the deadline the call may use)."""


@dataclass(frozen=True)
class RuleController:
    """A fixed (n, k) with a stop rule (None: wait for the deadline or the decided vote).

    :param family: the rule family, a key of ``RULE_FAMILIES``.
    :param n: branches.
    :param k: drafts per step.
    :param threshold: the rule's parameter (None for ``static_best``; the budget, a share of
        the deadline, for ``static_budget``).
    """

    family: str
    n: int
    k: int
    threshold: float | None = None

    @property
    def name(self) -> str:
        return self.family

    @functools.cached_property
    def rule(self) -> StopRule | None:
        factory = RULE_FAMILIES[self.family][0]
        return None if factory is None else factory(self.threshold)

    def begin(self, problem: ProblemInfo, deadline_s: float) -> tuple[int, int]:
        return self.n, self.k

    def decide(self, state: RaceState) -> Decision:
        return Decision(stop=self.rule is not None and self.rule(state))

    def call_deadline(self, deadline_s: float) -> float:
        budget = self.threshold if self.family == "static_budget" else 1.0
        return budget * deadline_s


@dataclass(frozen=True)
class BatchKSchedule:
    """k per live batch size: the draft length with the least predicted seconds per token.

    Speculation pays at small batches (decoding reads the weights once per step whatever the
    batch, so verifying k + 1 tokens per branch is nearly free) and stops paying as the batch
    grows and verification becomes compute-bound.  vLLM keys its own dynamic speculation on
    the batch size (``num_speculative_tokens_per_batch_size``) in the same way.  For live batch
    b the schedule takes the k minimising ``step_seconds[k, b] / tokens_per_step[k]``
    (``BatchKDrafting`` applies it to a replayed race).

    :param k_grid: draft lengths, one per row of ``step_seconds``.
    :param step_seconds: (len(k_grid), max batch + 1) seconds of one decode step per batch.
    :param tokens_per_step: expected tokens per branch per step for each k (acceptance).
    """

    k_grid: Sequence[int]
    step_seconds: np.ndarray
    tokens_per_step: np.ndarray

    @functools.cached_property
    def _best(self) -> np.ndarray:
        per_token = self.step_seconds / np.asarray(self.tokens_per_step)[:, None]
        return np.asarray(self.k_grid)[per_token.argmin(axis=0)]

    def k_for(self, live_batch: int) -> int:
        """The draft length for ``live_batch`` running branches."""
        return int(self._best[min(max(live_batch, 1), len(self._best) - 1)])


@dataclass
class BatchKDrafting:
    """``base``'s stops, drafting with the k fastest for the live batch at every decision point
    (``BatchKSchedule`` on the replayed problem's own recorded acceptance).

    Why: a controller may raise k as its batch shrinks (issue 13), and this measures what that
    is worth.  Replay only (it reads recorded acceptance, which no controller sees live), so it
    is the most re-drafting could add to ``base``'s stops: ``policies.evaluate --batch-k``
    reports it beside the policy.

    :param base: the controller whose (n, first k) and stops are kept.
    :param backend: the replay backend the races run on.
    """

    base: RaceController
    backend: ReplayBackend
    name: str = "batch_k"

    def begin(self, problem: ProblemInfo, deadline_s: float) -> tuple[int, int]:
        b = self.backend
        self._schedule = BatchKSchedule(b.k_grid, b.step_seconds, b.tokens_per_step[problem.index])
        return self.base.begin(problem, deadline_s)

    def decide(self, state: RaceState) -> Decision:
        decision = self.base.decide(state)
        if decision.stop:
            return decision
        return Decision(stop=False, k=self._schedule.k_for(state.running))

    def call_deadline(self, deadline_s: float) -> float:
        return self.base.call_deadline(deadline_s)


@dataclass
class DeadlineTable:
    """A controller per deadline of a grid, used at the nearest grid deadline (in log time):
    how a heuristic tuned on the evaluation grid acts at any deadline (the teacher)."""

    deadlines_s: Sequence[float]
    controllers: Sequence[RaceController]
    name: str = "table"

    def at(self, deadline_s: float) -> RaceController:
        logs = np.log(np.asarray(self.deadlines_s, dtype=float))
        return self.controllers[int(np.abs(logs - math.log(deadline_s)).argmin())]

    def begin(self, problem: ProblemInfo, deadline_s: float) -> tuple[int, int]:
        self._current = self.at(deadline_s)
        return self._current.begin(problem, deadline_s)

    def decide(self, state: RaceState) -> Decision:
        return self._current.decide(state)

    def call_deadline(self, deadline_s: float) -> float:
        return self.at(deadline_s).call_deadline(deadline_s)
