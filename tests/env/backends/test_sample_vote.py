"""The vote over a live call's branches as the engine reports them finished (unit; no engine)."""

from __future__ import annotations

from engine.rollout import BranchResult
from env.backends.sample_vote import RolloutVote


def _branch(index: int, text: str, finish_s: float) -> BranchResult:
    return BranchResult(
        index=index, text=text, token_count=5, finish_s=finish_s, finish_reason="stop"
    )


def test_vote_groups_equivalent_answers_and_ignores_missing():
    vote = RolloutVote(n_started=5)
    vote.add([_branch(0, "so \\boxed{0.5}", 1.0), _branch(1, "no box", 1.1)])
    vote.add([_branch(2, "\\boxed{\\frac{1}{2}}", 1.2), _branch(3, "\\boxed{3}", 1.3)])
    assert vote.tally.counts == {0: 2, 1: 1}
    assert vote.branch_classes == {0: 0, 1: -1, 2: 0, 3: 1}
    assert vote.answers == {0: "0.5", 1: None, 2: "\\frac{1}{2}", 3: "3"}
    assert vote.winner == "0.5"
    assert vote.votes == {"0.5": 2, "3": 1}


def test_vote_tie_goes_to_first_finished_class():
    vote = RolloutVote(n_started=2)
    vote.add([_branch(1, "\\boxed{7}", 0.5), _branch(0, "\\boxed{8}", 0.9)])
    assert vote.winner == "7"


def test_should_stop_once_decided():
    vote = RolloutVote(n_started=4)
    assert not vote.should_stop([_branch(0, "\\boxed{2}", 1.0)])
    assert not vote.should_stop([_branch(0, "\\boxed{2}", 1.0), _branch(1, "\\boxed{2}", 1.1)])
    done = [_branch(i, "\\boxed{2}", 1.0 + i) for i in range(3)]
    assert vote.should_stop(done)  # 3 votes vs at most 1 remaining


def test_empty_vote_has_no_winner():
    vote = RolloutVote(n_started=3)
    assert vote.winner is None and vote.winner_class == -1 and vote.votes == {}
