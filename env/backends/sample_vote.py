"""The vote over a live call's branches, which the live race (``live_race``: validation and the
deployed controller alike) keeps as the engine reports branches finished.

Each finished branch has its answer extracted from its text (``env.task.grading``) and is given
the class of the answers it matches (``AnswerClasses``); the race counts it in its
``RaceState``, whose tally (``VoteTally``, which owns the rules: ``env.task.voting``) this
shares.  This module imports neither ``datasets`` nor training code, so the serving path can
use it.
"""

from __future__ import annotations

from engine.rollout import BranchResult
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

    def classify(self, branch: BranchResult) -> int:
        """Extract a finished branch's answer and give it its class (-1: none), without
        counting it (the live race counts it in its ``RaceState``, whose tally this shares)."""
        answer = extract_boxed_answer(branch.text)
        answer_class = self.classes.class_of(answer)
        self.answers[branch.index] = answer
        return answer_class

    @property
    def winner(self) -> str | None:
        """The leading class's representative answer, None when no finished branch answered."""
        leader = self.tally.leader
        return None if leader < 0 else self.classes.representative(leader)

    @property
    def votes(self) -> dict[str, int]:
        """Representative answer -> votes, in the order the classes first finished."""
        return {self.classes.representative(c): v for c, v in self.tally.counts.items()}
