"""Live backend: the incremental vote (unit) and real engine calls, including RL training."""

from __future__ import annotations

import numpy as np
import pytest

from engine.rollout import BranchResult
from env.backends.live import BranchVote, LiveBackend


def _branch(index: int, text: str, finish_s: float) -> BranchResult:
    return BranchResult(
        index=index, text=text, token_count=5, finish_s=finish_s, finish_reason="stop"
    )


def test_vote_groups_equivalent_answers_and_ignores_missing():
    vote = BranchVote(n=5)
    vote.add([_branch(0, "so \\boxed{0.5}", 1.0), _branch(1, "no box", 1.1)])
    vote.add([_branch(2, "\\boxed{\\frac{1}{2}}", 1.2), _branch(3, "\\boxed{3}", 1.3)])
    assert vote.counts == [2, 1]
    assert vote.classes == {0: 0, 1: -1, 2: 0, 3: 1}
    assert vote.winner == "0.5"


def test_vote_tie_goes_to_first_finished_class():
    vote = BranchVote(n=2)
    vote.add([_branch(1, "\\boxed{7}", 0.5), _branch(0, "\\boxed{8}", 0.9)])
    assert vote.winner == "7"


def test_should_stop_once_decided():
    vote = BranchVote(n=4)
    assert not vote.should_stop([_branch(0, "\\boxed{2}", 1.0)])
    assert not vote.should_stop([_branch(0, "\\boxed{2}", 1.0), _branch(1, "\\boxed{2}", 1.1)])
    done = [_branch(i, "\\boxed{2}", 1.0 + i) for i in range(3)]
    assert vote.should_stop(done)  # 3 votes vs at most 1 remaining


def test_empty_vote_has_no_winner():
    vote = BranchVote(n=3)
    assert vote.winner is None and vote.winner_class == -1


@pytest.fixture(scope="module")
def live_backend(draft_engine):
    return LiveBackend(split="test", limit=3, engine=draft_engine, k_grid=(0, 1, 2))


@pytest.mark.engine
def test_live_call_outcome(live_backend, draft_engine):
    assert len(live_backend.problems) == 3 and live_backend.problems[0].prompt_tokens > 20
    outcome = live_backend.run(0, n=4, k=1, deadline_s=30.0, rng=np.random.default_rng(0))
    assert outcome.n == 4 and outcome.k == 1
    assert 0 < outcome.latency_s <= 30.1
    assert 0 <= outcome.branches_finished <= 4
    assert outcome.generated_tokens > 0
    assert outcome.answered == (outcome.answer is not None)
    assert not draft_engine.has_unfinished_requests()


@pytest.mark.engine
def test_live_deadline_miss(live_backend):
    outcome = live_backend.run(1, n=8, k=0, deadline_s=0.05, rng=np.random.default_rng(0))
    assert outcome.latency_s <= 0.15
    assert not outcome.correct
    assert outcome.deadline_missed or outcome.answered


@pytest.mark.engine
def test_ppo_trains_a_few_steps_against_the_live_engine(live_backend):
    """Training works against the live backend too (slow; used to fine-tune a replay policy)."""
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3 import PPO

    from env.tts_env import EnvConfig, LatencyTTSEnv

    config = EnvConfig(n_grid=(1, 2), k_grid=(0, 1), deadline_range_s=(2.0, 6.0))
    env = LatencyTTSEnv(backend=live_backend, config=config)
    check_env(env, skip_render_check=True)
    model = PPO("MlpPolicy", env, n_steps=4, batch_size=4, n_epochs=1, seed=0, device="cpu")
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=4)
    after = list(model.policy.parameters())
    assert any(not np.allclose(a.detach(), b) for a, b in zip(after, before, strict=True))
