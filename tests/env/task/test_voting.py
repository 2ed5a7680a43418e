"""The voting rules (env.task.voting): the incremental tally, replay's prefix vote, and answer
classes by math equivalence (the real math-verify)."""

from __future__ import annotations

import numpy as np
import pytest

from env.task.voting import (
    AnswerClasses,
    PrefixVote,
    VoteTally,
    answer_classes,
    vote_in_finish_order,
)


def tally_of(classes, n_started: int | None = None) -> VoteTally:
    tally = VoteTally(len(classes) if n_started is None else n_started)
    for answer_class in classes:
        tally.add(answer_class)
    return tally


def vote_texts(answers, same=None) -> tuple[str | None, VoteTally, list[int]]:
    """(winning representative, tally, classes) of answers given in finish order."""
    classes = AnswerClasses() if same is None else AnswerClasses(same)
    ids = [classes.class_of(answer) for answer in answers]
    tally = tally_of(ids)
    winner = None if tally.leader < 0 else classes.representative(tally.leader)
    return winner, tally, ids


def test_tally_fields():
    tally = VoteTally(6)
    assert (tally.leader, tally.leader_votes, tally.runner_up_votes, tally.share) == (-1, 0, 0, 0.0)
    for answer_class in (2, -1, 0, 2):
        tally.add(answer_class)
    assert (tally.n_started, tally.finished, tally.answered, tally.remaining) == (6, 4, 3, 2)
    assert (tally.leader, tally.leader_votes, tally.runner_up_votes) == (2, 2, 1)
    assert (tally.margin, tally.distinct, tally.share) == (1, 2, pytest.approx(2 / 3))
    assert tally.counts == {2: 2, 0: 1}  # first-finish order
    assert not tally.decided
    tally.add(2)
    assert tally.margin == 2 and tally.remaining == 1 and tally.decided


def test_tally_refuses_more_branches_than_started():
    tally = tally_of([0, 1])
    with pytest.raises(ValueError, match="already finished"):
        tally.add(0)


def test_groups_equivalent_answers():
    winner, tally, classes = vote_texts(["3", r"\frac12", "0.5", None, "3", r"\dfrac{1}{2}"])
    assert winner == r"\frac12"
    assert tally.leader_votes == 3
    assert tally.counts == {0: 2, 1: 3}
    assert classes == [0, 1, 1, -1, 0, 1]


def test_identical_unparsable_answers_vote_together():
    assert answer_classes(["}{", None, "}{", "4"]) == [0, -1, 0, 1]


def test_tie_goes_to_earliest_class():
    assert vote_texts(["7", "2", "2", "7"])[0] == "7"
    assert vote_texts(["2", "7", "2", "7"])[0] == "2"
    assert vote_texts([None, "b", "a", "a", "b"])[0] == "b"


def test_without_answers():
    assert vote_texts([])[0] is None
    winner, tally, classes = vote_texts([None, None])
    assert (winner, tally.leader_votes, tally.counts, classes) == (None, 0, {}, [-1, -1])
    assert tally.decided  # nothing left to come


def test_custom_equivalence():
    winner, tally, _ = vote_texts(["A", "a", "b"], same=lambda x, y: x.lower() == y.lower())
    assert (winner, tally.counts) == ("A", {0: 2, 1: 1})


def test_answer_classes_keep_representatives():
    classes = AnswerClasses()
    assert [classes.class_of(a) for a in ("0.5", r"\frac{1}{2}", None, "3")] == [0, 0, -1, 1]
    assert (classes.representative(0), classes.representative(1), len(classes)) == ("0.5", "3", 2)
    with pytest.raises(IndexError):
        classes.representative(-1)


@pytest.mark.parametrize(
    ("counts", "remaining", "expected"),
    [
        ([5, 2], 2, True),
        ([5, 2], 3, False),  # 3 more for the runner-up would tie: not decided
        ([3], 2, True),  # a new class could reach 2 only
        ([3], 3, False),
        ([2, 2], 0, True),  # nothing left: the tie-break already decides
        ([], 0, True),
        ([], 1, False),
        ([1, 4, 0], 2, True),
    ],
)
def test_decided(counts, remaining, expected):
    classes = [c for c, votes in enumerate(counts) for _ in range(votes)]
    assert tally_of(classes, len(classes) + remaining).decided is expected


def test_leader_and_runner_up_follow_the_counts():
    """After every branch: the leader has the most votes (ties to the class first finished),
    the runner-up the most among the others, and decided is margin > remaining."""
    rng = np.random.default_rng(1)
    for _ in range(500):
        n = int(rng.integers(1, 12))
        tally = VoteTally(n)
        for answer_class in rng.integers(-1, 4, n).tolist():
            tally.add(answer_class)
            counts = tally.counts
            top = max(counts.values(), default=0)
            leader = next((c for c, v in counts.items() if v == top), -1)
            others = [v for c, v in counts.items() if c != leader]
            assert (tally.leader, tally.leader_votes) == (leader, top)
            assert tally.runner_up_votes == max(others, default=0)
            assert tally.decided == (tally.remaining == 0 or tally.margin > tally.remaining)


def test_prefix_vote_stops_at_the_first_decided_branch():
    assert vote_in_finish_order([1, 1, 1, 0], 4) == PrefixVote(used=3, winner=1, decided=True)
    assert vote_in_finish_order([0, 1], 2) == PrefixVote(used=2, winner=0, decided=True)
    assert vote_in_finish_order([0], 4) == PrefixVote(used=1, winner=0, decided=False)
    assert vote_in_finish_order([-1], 3) == PrefixVote(used=1, winner=-1, decided=False)
    assert vote_in_finish_order([], 0) == PrefixVote(used=0, winner=-1, decided=True)


def test_prefix_vote_is_the_tally_up_to_its_decision():
    rng = np.random.default_rng(2)
    for _ in range(2000):
        n = int(rng.integers(1, 12))
        classes = rng.integers(-1, 4, int(rng.integers(0, n + 1))).tolist()
        vote = vote_in_finish_order(classes, n)
        tally = tally_of(classes[: vote.used], n)
        assert (vote.winner, vote.decided) == (tally.leader, tally.decided)
        if vote.used < len(classes):  # stopped early: decided at exactly that branch
            assert vote.decided and not tally_of(classes[: vote.used - 1], n).decided
