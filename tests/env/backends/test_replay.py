"""The replay backend: finish times from the latency model, the deadline, the vote's rules."""

import numpy as np
import pytest

from env.backends.protocol import Backend
from env.backends.replay import ReplayBackend
from env.profiles.store import load_profile, save_profile
from env.task.voting import VoteTally
from tests.fake_profile import make_fake_profile


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    return load_profile(make_fake_profile(tmp_path_factory.mktemp("replay") / "fake", 40, 40, 16))


def test_replay_backend_implements_the_protocol(profile):
    assert isinstance(ReplayBackend(profile, "test"), Backend)


def _handmade_profile(folder, classes, correct_class=1, max_call_branches=None):
    """One problem, branches of 100, 200, ... tokens finishing at 1, 2, ... s (k = 0)."""
    n = len(classes)
    latency_model = {
        "source": "test", "prefill_base_s": 0.0, "prefill_per_token_s": 0.0,
        "call_overhead_s": 0.0,
        "steps": {"none": {"0": {"batch": [1, 64], "seconds": [0.01, 0.01]}}},
    }  # fmt: skip
    row = {
        "id": "p0", "split": "test", "problem": "What is $1+1$?", "answer": "2", "level": 1,
        "subject": "Algebra", "prompt_tokens": 20, "branch_text": [""] * n,
        "branch_answer": [None if c < 0 else f"a{c}" for c in classes],
        "branch_class": list(classes), "branch_correct": [c == correct_class for c in classes],
        "branch_tokens": [100 * (i + 1) for i in range(n)],
        "branch_finish_s": [float(i + 1) for i in range(n)],
        "branch_finish_reason": ["stop"] * n, "accept": {},
    }  # fmt: skip
    manifest = {"name": "handmade", "synthetic": True, "latency_model": latency_model}
    if max_call_branches is not None:
        manifest["max_call_branches"] = max_call_branches
    return ReplayBackend(save_profile(folder, manifest, [row]), "test")


def test_finish_times_follow_latency_model(profile):
    backend = ReplayBackend(profile, "test")
    model, row = backend.latency_model, profile.split("test")[3]
    branches = np.array([5, 0, 9, 2])
    for k in backend.k_grid:
        method, table_k = backend.step_table_key(k)
        expected = model.branch_finish_times(
            row["branch_tokens"][branches], table_k, method,
            profile.acceptance(row, backend.method), row["prompt_tokens"],
        )  # fmt: skip
        np.testing.assert_allclose(backend.finish_times(3, branches, k), expected)


def test_deadline_cuts_off_unfinished_branches(tmp_path):
    backend = _handmade_profile(tmp_path / "p", [0, 1, 1, 1])
    rng = np.random.default_rng(0)
    early = backend.run(0, 4, 0, 1.5, rng)  # only the 1 s branch (a wrong answer) finished
    assert (early.branches_finished, early.answer_class, early.correct) == (1, 0, False)
    assert early.latency_s == 1.5 and not early.deadline_missed and early.answer == "a0"
    nothing = backend.run(0, 4, 0, 0.5, rng)
    assert nothing.deadline_missed and not nothing.answered and nothing.latency_s == 0.5
    full = backend.run(0, 4, 0, 10.0, rng)
    assert (full.branches_finished, full.correct, full.latency_s) == (4, True, 4.0)
    assert full.generated_tokens == 1000


def test_vote_stops_once_decided(tmp_path):
    backend = _handmade_profile(tmp_path / "p", [1, 1, 1, 0])
    outcome = backend.run(0, 4, 0, 10.0, np.random.default_rng(0))
    assert outcome.correct and outcome.branches_finished == 3 and outcome.latency_s == 3.0
    assert outcome.generated_tokens == 100 + 200 + 300 + 300  # the last one was aborted


def test_tie_goes_to_class_finished_first(tmp_path):
    backend = _handmade_profile(tmp_path / "p", [0, 1], correct_class=0)
    outcome = backend.run(0, 2, 0, 10.0, np.random.default_rng(0))
    assert outcome.answer_class == 0 and outcome.correct


def test_n_beyond_recorded_branches_is_rejected(tmp_path):
    backend = _handmade_profile(tmp_path / "p", [0, 1])
    with pytest.raises(ValueError, match="recorded branches"):
        backend.run(0, 3, 0, 10.0, np.random.default_rng(0))


def test_a_call_cap_below_the_recorded_branches_makes_every_draw_a_new_sample(tmp_path):
    """With 8 recorded branches and calls capped at 4, a 4-branch call draws a different set of
    branches from different generators (with no cap, n = every branch is one race on every
    draw), and more than 4 is refused."""
    backend = _handmade_profile(tmp_path / "p", list(range(8)), max_call_branches=4)
    assert (backend.max_branches, backend.recorded_branches) == (4, 8)
    sets = {frozenset(backend.branch_order(np.random.default_rng(s))[:4].tolist())
            for s in range(20)}  # fmt: skip
    assert len(sets) > 5 and all(len(s) == 4 for s in sets)
    assert set().union(*sets) == set(range(8))
    latencies = {backend.run(0, 4, 0, 10.0, np.random.default_rng(s)).latency_s for s in range(20)}
    assert len(latencies) > 1  # the draw changes the race, not just the order of one race
    with pytest.raises(ValueError, match="at most 4 of the 8 recorded branches"):
        backend.run(0, 5, 0, 10.0, np.random.default_rng(0))


def test_replay_votes_by_the_voting_rules_in_finish_order(profile):
    """Replay's outcome is VoteTally's over the drawn branches as they finish in time."""
    backend = ReplayBackend(profile, "test")
    rows, rng = profile.split("test"), np.random.default_rng(1)
    for _ in range(300):
        p, n = int(rng.integers(len(rows))), int(rng.integers(1, 17))
        k, deadline, seed = int(rng.choice(backend.k_grid)), float(rng.uniform(0.1, 6.0)), 7
        outcome = backend.run(p, n, k, deadline, np.random.default_rng(seed))
        drawn = backend.branch_order(np.random.default_rng(seed))[:n]
        finish = backend.finish_times(p, drawn, k)
        tally, last_finish = VoteTally(n), 0.0
        for b in np.argsort(finish, kind="stable"):
            if finish[b] > deadline or tally.decided:
                break
            tally.add(rows[p]["branch_class"][drawn[b]])
            last_finish = finish[b]
        assert (outcome.branches_finished, outcome.answer_class) == (tally.finished, tally.leader)
        assert outcome.latency_s == pytest.approx(last_finish if tally.decided else deadline)
        classes, correct = list(rows[p]["branch_class"]), rows[p]["branch_correct"]
        assert outcome.correct == (tally.leader >= 0 and correct[classes.index(tally.leader)])
