"""The vote over a live call's branches as the engine reports them finished (unit; no engine)."""

from __future__ import annotations

from engine.rollout import BranchResult
from env.backends.sample_vote import RolloutVote


def _branch(index: int, text: str, finish_s: float) -> BranchResult:
    return BranchResult(
        index=index, text=text, token_count=5, finish_s=finish_s, finish_reason="stop"
    )


def _count(vote: RolloutVote, branches: list[BranchResult]) -> list[int]:
    """Classify the branches in finish order and count them, as the live race does."""
    classes = [vote.classify(branch) for branch in branches]
    for answer_class in classes:
        vote.tally.add(answer_class)
    return classes


def test_vote_groups_equivalent_answers_and_ignores_missing():
    vote = RolloutVote(n_started=5)
    classes = _count(vote, [_branch(0, "so \\boxed{0.5}", 1.0), _branch(1, "no box", 1.1)])
    later = [_branch(2, "\\boxed{\\frac{1}{2}}", 1.2), _branch(3, "\\boxed{3}", 1.3)]
    classes += _count(vote, later)
    assert classes == [0, -1, 0, 1]
    assert vote.tally.counts == {0: 2, 1: 1}
    assert vote.answers == {0: "0.5", 1: None, 2: "\\frac{1}{2}", 3: "3"}
    assert vote.winner == "0.5"
    assert vote.votes == {"0.5": 2, "3": 1}


def test_vote_tie_goes_to_first_finished_class():
    vote = RolloutVote(n_started=2)
    _count(vote, [_branch(1, "\\boxed{7}", 0.5), _branch(0, "\\boxed{8}", 0.9)])
    assert vote.winner == "7"


def test_empty_vote_has_no_winner():
    vote = RolloutVote(n_started=3)
    assert vote.winner is None and vote.tally.leader == -1 and vote.votes == {}
