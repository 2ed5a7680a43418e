"""Live backend: runs test-time-scaling calls on the real vLLM engine, with the replay's vote.

The replay backend votes with answer classes recorded in a profile; here the classes are built
as branches finish, by grading each new answer against the representatives seen so far
(``env.task.grading.is_equiv_pair``), so the same rules hold (see
``env.backends.protocol``): only finished
branches vote, ties go to the class that finished first, and the call is stopped as soon as the
remaining branches can no longer change the winner.  ``BranchVote`` is that incremental vote;
the deployable controller (``policies.controller``) reuses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.rollout import BranchResult, Rollout
from engine.vllm_engine import EngineConfig, VLLMEngine
from env.backends.protocol import Outcome, ProblemInfo
from env.task.grading import decided, extract_boxed_answer, is_equiv_pair, is_equivalent
from env.task.problems import load_problems
from env.task.prompt import build_user_message


class BranchVote:
    """Majority vote over branches in finish order, updated as they finish.

    Use ``should_stop`` as the engine's early-stop callback; afterwards ``winner`` and
    ``counts`` describe the vote among the finished branches.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.representatives: list[str] = []
        self.counts: list[int] = []
        self.answers: dict[int, str | None] = {}  # branch index -> extracted answer
        self.classes: dict[int, int] = {}  # branch index -> class, -1 = no answer

    def add(self, branches: Sequence[BranchResult]) -> None:
        """Grade branches not seen yet (in the given order, i.e. finish order)."""
        for branch in branches:
            if branch.index in self.classes:
                continue
            answer = extract_boxed_answer(branch.text)
            self.answers[branch.index] = answer
            self.classes[branch.index] = self._class_of(answer)

    def _class_of(self, answer: str | None) -> int:
        if answer is None:
            return -1
        for class_id, representative in enumerate(self.representatives):
            if is_equiv_pair(representative, answer):
                self.counts[class_id] += 1
                return class_id
        self.representatives.append(answer)
        self.counts.append(1)
        return len(self.representatives) - 1

    def should_stop(self, finished: Sequence[BranchResult]) -> bool:
        """Engine callback: True once the unfinished branches cannot change the winner."""
        self.add(finished)
        return bool(self.counts) and decided(self.counts, self.n - len(self.classes))

    @property
    def winner_class(self) -> int:
        if not self.counts:
            return -1
        return max(range(len(self.counts)), key=lambda c: (self.counts[c], -c))

    @property
    def winner(self) -> str | None:
        c = self.winner_class
        return None if c < 0 else self.representatives[c]


def vote_rollout(rollout: Rollout) -> BranchVote:
    """The vote among a finished rollout's branches (in finish order)."""
    vote = BranchVote(rollout.n)
    vote.add(rollout.finished)
    return vote


class LiveBackend:
    """``env.backends.protocol.Backend`` on the live engine over MATH problems.

    :param split: ``"test"`` (MATH-500) or ``"train"``.
    :param limit: use only the first ``limit`` problems.
    :param engine: an already running engine; otherwise one is built from ``engine_options``
        (``engine.vllm_engine.EngineConfig`` fields).
    :param k_grid: draft lengths offered; default 0..k_max.
    """

    def __init__(
        self,
        split: str = "test",
        limit: int | None = None,
        engine: VLLMEngine | None = None,
        k_grid: Sequence[int] | None = None,
        **engine_options,
    ) -> None:
        self.engine = engine or VLLMEngine(EngineConfig(**engine_options))
        problems = load_problems(split)[:limit]
        self._messages = [build_user_message(p.problem) for p in problems]
        self._gold = [p.answer for p in problems]
        self._problems = [
            ProblemInfo(
                index=i,
                id=p.id,
                problem=p.problem,
                prompt_tokens=len(self.engine.prompt_token_ids(message)),
                level=p.level,
                subject=p.subject,
            )
            for i, (p, message) in enumerate(zip(problems, self._messages, strict=True))
        ]
        k_max = self.engine.config.k_max
        self._k_grid = tuple(k_grid) if k_grid is not None else tuple(range(k_max + 1))
        if any(not 0 <= k <= k_max for k in self._k_grid):
            raise ValueError(f"k_grid {self._k_grid} must lie in 0..{k_max} for this engine")

    @property
    def name(self) -> str:
        config = self.engine.config
        return f"live {config.model or 'bundled SmolLM2-135M'} ({config.method_name})"

    @property
    def synthetic(self) -> bool:
        return False

    @property
    def problems(self) -> Sequence[ProblemInfo]:
        return self._problems

    @property
    def max_branches(self) -> int:
        return self.engine.config.max_n

    @property
    def k_grid(self) -> tuple[int, ...]:
        return self._k_grid

    def run(
        self, problem_index: int, n: int, k: int, deadline_s: float, rng: np.random.Generator
    ) -> Outcome:
        """One live call.  ``rng`` is not used: the engine is seeded once at start, because
        per-request seeds crash the CPU build on chunked prompts (DESIGN.md)."""
        vote = BranchVote(n)
        rollout = self.engine.run(
            self._messages[problem_index],
            n=n,
            k=k,
            deadline_s=deadline_s,
            should_stop=vote.should_stop,
        )
        vote.add(rollout.finished)
        winner = vote.winner
        return Outcome(
            correct=winner is not None and is_equivalent(self._gold[problem_index], winner),
            answered=winner is not None,
            answer_class=vote.winner_class,
            answer=winner,
            latency_s=rollout.wall_s,
            n=n,
            k=k,
            branches_finished=len(rollout.finished),
            generated_tokens=rollout.generated_tokens,
            deadline_missed=winner is None and rollout.stopped_by == "deadline",
        )
