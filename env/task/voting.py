"""Majority vote over integer answer classes in finish order, stopping once it is decided.

``env.task.grading`` votes over answer *texts* for the live engine and the controller; replay has
the classes precomputed in the profile and must vote thousands of times per second, so it
votes here over integers with the same rules: ties go to the class whose first member finished
earliest, answerless branches (class -1) do not vote, and the vote stops at the first finished
branch after which ``env.task.grading.decided`` holds.  Instead of re-sorting the counts after every
branch as ``decided`` does, the loop keeps the leader's and the runner-up's counts as it goes;
tests check both agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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
    """Vote over ``classes`` (finished branches, in finish order) of a call of ``n_started``.

    :param classes: answer class per finished branch in finish order, -1 for no answer.
    :param n_started: branches started; those not in ``classes`` may still finish.
    """
    counts: dict[int, int] = {}  # insertion order = first-finish order, the tie-break
    leader, top1, top2 = -1, 0, 0
    for used, c in enumerate(classes, start=1):
        if c >= 0:
            count = counts[c] = counts.get(c, 0) + 1
            if c == leader:
                top1 = count
            elif count > top1 or (count == top1 and _seen_before(counts, c, leader)):
                leader, top2, top1 = c, top1, count
            else:
                top2 = max(top2, count)
        remaining = n_started - used
        if remaining <= 0 or top1 > top2 + remaining:
            return PrefixVote(used, leader, True)
    return PrefixVote(len(classes), leader, n_started <= len(classes))


def _seen_before(counts: dict[int, int], first: int, second: int) -> bool:
    """Whether class ``first`` finished a member before class ``second`` did."""
    for c in counts:
        if c == first:
            return True
        if c == second:
            return False
    return False
