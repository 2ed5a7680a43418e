"""Live backend: runs test-time-scaling calls on the real vLLM engine, with the replay's vote.

The replay backend votes with answer classes recorded in a profile; here the classes are built
as branches finish (``env.backends.sample_vote``, shared with the deployable controller), and
the voting rules are the same ones (``env.task.voting``).  This module adds the MATH problems
(``env.task.problems``, which loads them with ``datasets``) and grading against their gold
answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.vllm_engine import EngineConfig, VLLMEngine
from env.backends.protocol import Outcome, ProblemInfo
from env.backends.sample_vote import sample_and_vote
from env.task.grading import matches_gold
from env.task.problems import load_problems
from env.task.prompt import build_user_message


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
        # tokenized once here; every call on a problem reuses its ids
        self._prompt_ids = [
            self.engine.prompt_token_ids(build_user_message(p.problem)) for p in problems
        ]
        self._gold = [p.answer for p in problems]
        self._problems = [
            ProblemInfo(
                index=i,
                id=p.id,
                problem=p.problem,
                prompt_tokens=len(ids),
                level=p.level,
                subject=p.subject,
            )
            for i, (p, ids) in enumerate(zip(problems, self._prompt_ids, strict=True))
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
        call = sample_and_vote(self.engine, self._prompt_ids[problem_index], n, k, deadline_s)
        rollout, winner = call.rollout, call.vote.winner
        return Outcome(
            correct=winner is not None and matches_gold(self._gold[problem_index], winner),
            answered=winner is not None,
            answer_class=call.vote.winner_class,
            answer=winner,
            latency_s=rollout.wall_s,
            n=n,
            k=k,
            branches_finished=len(rollout.finished),
            generated_tokens=rollout.generated_tokens,
            deadline_missed=winner is None and rollout.stopped_by == "deadline",
        )
