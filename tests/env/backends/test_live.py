"""Live backend: real engine calls, including RL training (the vote: test_sample_vote.py)."""

from __future__ import annotations

import numpy as np
import pytest

from env.backends.live import LiveBackend


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
    import gymnasium
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3 import PPO

    from env.config import LIVE_ENV_ID, EnvConfig
    from env.tts_env import make_live_env  # noqa: F401 - importing env.tts_env registers the ids

    config = EnvConfig(n_grid=(1, 2), k_grid=(0, 1), deadline_range_s=(2.0, 6.0))
    env = gymnasium.make(LIVE_ENV_ID, backend=live_backend, config=config).unwrapped
    # The close check would build a second env from the spec, deep-copying the running engine.
    check_env(env, skip_render_check=True, skip_close_check=True)
    model = PPO("MlpPolicy", env, n_steps=4, batch_size=4, n_epochs=1, seed=0, device="cpu")
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=4)
    after = list(model.policy.parameters())
    assert any(not np.allclose(a.detach(), b) for a, b in zip(after, before, strict=True))
