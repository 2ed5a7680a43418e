"""The voting rules of a call, in one place: every backend, controller and report imports them.

A call starts ``n`` branches; as they finish, they vote:

- a finished branch votes for its answer class; a branch without an answer (class -1) does not
  vote, and branches still running (or aborted at the deadline) do not vote either;
- the leader is the class with the most votes; a tie goes to the class whose first member
  finished earliest;
- the vote is decided when no branch is left running, or when the leader is ahead of the
  runner-up by more than the branches still running: then no class, existing or new, can even
  tie it.  A tie is not counted as decided although the tie-break might already fix it; this
  errs on the side of waiting.

``VoteTally`` applies these rules incrementally, one finished branch at a time, for every
source of a call (replay, live engine, server).  ``AnswerClasses`` turns answer texts into the
integer classes it counts, by math equivalence (``env.task.grading.same_answer``).
``vote_in_finish_order`` is replay's one-shot form over the classes recorded in a profile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from env.task.grading import same_answer

NO_ANSWER = -1
"""Answer class of a branch that finished without an answer (it does not vote)."""


class VoteTally:
    """The vote of one call, updated as its branches finish (the rules in the module docstring).

    ``add`` costs O(1): the leader and the runner-up's votes are kept as branches arrive
    instead of ranking the counts after every branch.

    :param n_started: branches the call started; those not added yet are still running.
    """

    __slots__ = (
        "_answered",
        "_counts",
        "_finished",
        "_first_rank",
        "_leader",
        "_leader_votes",
        "_n_started",
        "_runner_up_votes",
    )

    def __init__(self, n_started: int) -> None:
        if n_started < 0:
            raise ValueError(f"n_started must be >= 0, got {n_started}")
        self._n_started = n_started
        self._finished = 0
        self._answered = 0
        self._counts: dict[int, int] = {}  # insertion order = first-finish order
        self._first_rank: dict[int, int] = {}  # class -> rank of its first member's finish
        self._leader = NO_ANSWER
        self._leader_votes = 0
        self._runner_up_votes = 0

    def add(self, answer_class: int) -> None:
        """A branch finished with ``answer_class`` (``NO_ANSWER``, -1: it does not vote).

        :raises ValueError: when more branches finish than were started.
        """
        if self._finished >= self._n_started:
            raise ValueError(f"all {self._n_started} started branches have already finished")
        self._finished += 1
        if answer_class < 0:
            return
        self._answered += 1
        counts = self._counts
        votes = counts.get(answer_class, 0) + 1
        if votes == 1:
            self._first_rank[answer_class] = len(counts)
        counts[answer_class] = votes
        if answer_class == self._leader:
            self._leader_votes = votes
        elif votes > self._leader_votes or (
            votes == self._leader_votes
            and self._first_rank[answer_class] < self._first_rank[self._leader]
        ):
            self._runner_up_votes = self._leader_votes
            self._leader, self._leader_votes = answer_class, votes
        elif votes > self._runner_up_votes:
            self._runner_up_votes = votes

    @property
    def n_started(self) -> int:
        """Branches the call started."""
        return self._n_started

    @property
    def finished(self) -> int:
        """Branches finished so far (with or without an answer)."""
        return self._finished

    @property
    def answered(self) -> int:
        """Finished branches that gave an answer (the votes cast)."""
        return self._answered

    @property
    def remaining(self) -> int:
        """Branches still running."""
        return self._n_started - self._finished

    @property
    def leader(self) -> int:
        """The leading class (ties to the earliest-finished class); -1 before any vote."""
        return self._leader

    @property
    def leader_votes(self) -> int:
        return self._leader_votes

    @property
    def runner_up_votes(self) -> int:
        """Votes of the best class other than the leader; 0 when there is none."""
        return self._runner_up_votes

    @property
    def margin(self) -> int:
        """How many votes the leader is ahead of the runner-up."""
        return self._leader_votes - self._runner_up_votes

    @property
    def distinct(self) -> int:
        """Number of classes with at least one vote."""
        return len(self._counts)

    @property
    def share(self) -> float:
        """The leader's share of the votes cast; 0.0 before any vote."""
        return self._leader_votes / self._answered if self._answered else 0.0

    @property
    def decided(self) -> bool:
        """Whether the leader is final whatever the branches still running answer."""
        remaining = self._n_started - self._finished
        return remaining <= 0 or self._leader_votes - self._runner_up_votes > remaining

    @property
    def counts(self) -> dict[int, int]:
        """Votes per class, classes in first-finish order (a copy)."""
        return dict(self._counts)

    def __repr__(self) -> str:
        return (
            f"VoteTally(n_started={self._n_started}, finished={self._finished}, "
            f"counts={self._counts}, leader={self._leader})"
        )


@dataclass(frozen=True)
class PrefixVote:
    """Result of voting over the finished prefix of a call.

    :param used: finished branches the answer was taken from (the decision came with the last).
    :param winner: winning class, -1 when no used branch answered.
    :param decided: the winner is final (the unfinished branches cannot change it, or none are
        left); False when the finished prefix ran out first, i.e. the deadline cut the call.
    """

    used: int
    winner: int
    decided: bool


def vote_in_finish_order(classes: Sequence[int], n_started: int) -> PrefixVote:
    """Vote over ``classes`` (finished branches, in finish order) of a call of ``n_started``,
    stopping at the first branch after which the vote is decided.

    :param classes: answer class per finished branch in finish order, -1 for no answer.
    :param n_started: branches started; those not in ``classes`` may still finish.
    """
    tally = VoteTally(n_started)
    for answer_class in classes:
        tally.add(answer_class)
        if tally.decided:
            break
    return PrefixVote(tally.finished, tally.leader, tally.decided)


class AnswerClasses:
    """Answer texts -> integer answer classes, numbered in order of first appearance.

    An answer joins the first class whose representative (its first member) it matches,
    ``same(representative, answer)``, or opens a new class; ``None`` (no answer) is class -1.
    Profiles store these classes so that replay votes with integers instead of re-grading text.

    :param same: when two answers count as one vote; default ``env.task.grading.same_answer``.
    """

    def __init__(self, same: Callable[[str, str], bool] = same_answer) -> None:
        self._same = same
        self._representatives: list[str] = []

    def class_of(self, answer: str | None) -> int:
        """The class of ``answer`` (a new one if it matches none so far); -1 for None."""
        if answer is None:
            return NO_ANSWER
        for answer_class, representative in enumerate(self._representatives):
            if self._same(representative, answer):
                return answer_class
        self._representatives.append(answer)
        return len(self._representatives) - 1

    def representative(self, answer_class: int) -> str:
        """The first answer seen in ``answer_class``."""
        if answer_class < 0:
            raise IndexError(f"class {answer_class} has no representative (no answer)")
        return self._representatives[answer_class]

    def __len__(self) -> int:
        return len(self._representatives)


def answer_classes(
    answers: Sequence[str | None], same: Callable[[str, str], bool] = same_answer
) -> list[int]:
    """The class of each answer (``AnswerClasses`` over the list, in order); -1 for None."""
    classes = AnswerClasses(same)
    return [classes.class_of(answer) for answer in answers]
