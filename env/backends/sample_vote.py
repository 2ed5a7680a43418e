"""Run n branches on the live engine and vote as they finish: the one "sample and vote" that the
live backend (validation) and the deployed controller (serving) share.

Each branch the engine reports finished has its answer extracted from its text
(``env.task.grading``), is given the class of the answers it matches (``AnswerClasses``) and
votes (``VoteTally``, which owns the rules: ``env.task.voting``); the engine's early-stop
callback ends the call as soon as the vote is decided.  This module imports neither
``datasets`` nor training code, so the serving path can use it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from engine.rollout import BranchResult, Rollout
from engine.vllm_engine import VLLMEngine
from env.task.grading import extract_boxed_answer
from env.task.voting import AnswerClasses, VoteTally


class RolloutVote:
    """The vote over a live call's branches, fed the engine's finished branches in finish order.

    :param n_started: branches the call started.
    """

    def __init__(self, n_started: int) -> None:
        self.tally = VoteTally(n_started)
        self.classes = AnswerClasses()
        self.answers: dict[int, str | None] = {}  # branch index -> extracted answer
        self.branch_classes: dict[int, int] = {}  # branch index -> answer class, -1 = none

    def classify(self, branch: BranchResult) -> int:
        """Extract a finished branch's answer and give it its class (-1: none), without
        counting it (the live race counts it in its ``RaceState``, whose tally this shares)."""
        answer = extract_boxed_answer(branch.text)
        answer_class = self.classes.class_of(answer)
        self.answers[branch.index] = answer
        self.branch_classes[branch.index] = answer_class
        return answer_class

    def add(self, branches: Sequence[BranchResult]) -> None:
        """Grade the branches not seen yet, in the given order (finish order), and count them."""
        for branch in branches:
            if branch.index not in self.answers:
                self.tally.add(self.classify(branch))

    def should_stop(self, finished: Sequence[BranchResult]) -> bool:
        """The engine's early-stop callback: True once the vote is decided."""
        self.add(finished)
        return self.tally.decided

    @property
    def winner_class(self) -> int:
        """The leading class, -1 when no finished branch answered."""
        return self.tally.leader

    @property
    def winner(self) -> str | None:
        """The leading class's representative answer, None when no finished branch answered."""
        leader = self.tally.leader
        return None if leader < 0 else self.classes.representative(leader)

    @property
    def votes(self) -> dict[str, int]:
        """Representative answer -> votes, in the order the classes first finished."""
        return {self.classes.representative(c): v for c, v in self.tally.counts.items()}


@dataclass(frozen=True)
class VotedRollout:
    """A live call and the vote among its finished branches."""

    rollout: Rollout
    vote: RolloutVote


def sample_and_vote(
    engine: VLLMEngine,
    prompt: str | Sequence[int],
    n: int,
    k: int,
    deadline_s: float | None,
    max_tokens: int | None = None,
    cancel: threading.Event | None = None,
) -> VotedRollout:
    """Sample ``n`` branches of ``prompt`` with ``k`` drafts per step until the vote is decided,
    every branch finished, or the deadline (``VLLMEngine.run``'s semantics), and vote.

    :param prompt: the user message, or its token ids (``VLLMEngine.prompt_token_ids``).
    :param deadline_s: seconds from now; None for none.
    :param max_tokens: per-branch cap (at most the engine's ``max_tokens``).
    :param cancel: set to abort the call after the engine step in flight.
    :raises ValueError: for a bad argument, before the engine runs.
    """
    vote = RolloutVote(n)
    rollout = engine.run(
        prompt,
        n=n,
        k=k,
        deadline_s=deadline_s,
        should_stop=vote.should_stop,
        max_tokens=max_tokens,
        cancel=cancel,
    )
    vote.add(rollout.finished)
    return VotedRollout(rollout, vote)
