"""Training the allocation policy: Stable-Baselines3 PPO on ``LatencyTTS-v0``.

Choosing (n, k, budget) per problem is a contextual bandit (one step per episode), which PPO
on the ``MultiDiscrete([n choices, k choices, budget choices])`` action handles directly: with
one-step episodes the advantage is the reward minus the value baseline, so ``gamma`` and GAE
play no role.

The reward differences between the best few actions are a point or two of accuracy while a
single episode's reward is 0 or 1, so PPO from scratch settles near, not on, the best action
per deadline.  Training therefore starts from the best static allocation over the same action
space (``imitate``: behaviour cloning of ``static_budget`` chosen on the training problems),
fine-tunes with PPO, and keeps a fine-tuned model only when a paired comparison on validation
problems shows it beats the start (``select_on_validation``).

This module holds the pieces ``train.py`` assembles: the vectorised environments, the
callbacks (SB3's ``EvalCallback``/``CheckpointCallback`` plus one that logs accuracy and
latency), the warm start, model selection and Weights & Biases set-up.  Saving and loading the
result is ``policies.saved_policy``'s job (the serving path needs it without any of this).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CallbackList,
    CheckpointCallback,
    EvalCallback,
)
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor

from env.tts_env import LatencyTTSEnv
from policies.allocator import Allocator, run_episodes
from policies.saved_policy import ModelAllocator


def make_vec_env(make_env: Callable[[], LatencyTTSEnv], n_envs: int, seed: int) -> VecEnv:
    """``n_envs`` environments stepped in this process, with episode statistics for logging.

    One-step replay episodes take tens of microseconds, so subprocesses would only add IPC.
    """
    vec_env = VecMonitor(DummyVecEnv([make_env] * n_envs))
    vec_env.seed(seed)
    return vec_env


class OutcomeLoggerCallback(BaseCallback):
    """Logs accuracy, latency and the chosen n and k of the training episodes per rollout."""

    def __init__(self) -> None:
        super().__init__()
        self._infos: list[dict] = []

    def _on_step(self) -> bool:
        self._infos.extend(i for i in self.locals["infos"] if "correct" in i)  # episode ends
        return True

    def _on_rollout_end(self) -> None:
        if not self._infos:
            return
        keys = ("correct", "latency_s", "n", "k", "budget", "branches_finished", "deadline_missed",
                "decisions")  # fmt: skip
        for key in (k for k in keys if k in self._infos[0]):
            self.logger.record(f"tts/{key}", float(np.mean([i[key] for i in self._infos])))
        relative = [i["latency_s"] / i["deadline_s"] for i in self._infos]
        self.logger.record("tts/latency_over_deadline", float(np.mean(relative)))
        self._infos.clear()


def make_callbacks(
    eval_env: LatencyTTSEnv,
    out_dir: Path,
    eval_freq: int,
    checkpoint_freq: int,
    n_envs: int,
) -> CallbackList:
    """Outcome logging, periodic checkpoints, and evaluation on a fixed validation sweep.

    ``eval_env`` should sweep (``EnvConfig.sweep_deadlines_s``): then every evaluation scores
    the same (problem, deadline, draw) episodes, once each, and the best model is kept in
    ``out_dir/best_model.zip``.  Frequencies are in environment steps.
    """
    sweep = eval_env.config.sweep_deadlines_s or ()
    episodes = len(eval_env.problems) * max(len(sweep), 1)
    evaluation = EvalCallback(
        VecMonitor(DummyVecEnv([lambda: eval_env])),
        n_eval_episodes=episodes,
        eval_freq=max(eval_freq // n_envs, 1),
        best_model_save_path=str(out_dir),
        log_path=str(out_dir / "eval"),
        deterministic=True,
        verbose=0,
    )
    checkpoints = CheckpointCallback(
        save_freq=max(checkpoint_freq // n_envs, 1),
        save_path=str(out_dir / "checkpoints"),
        name_prefix="policy",
    )
    return CallbackList([OutcomeLoggerCallback(), evaluation, checkpoints])


def imitate(
    model: BaseAlgorithm,
    env: LatencyTTSEnv,
    allocator: Allocator,
    deadlines_s: Sequence[float],
    samples: int = 30_000,
    epochs: int = 5,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> float:
    """Warm start: clone ``allocator``'s choices into the actor, its rewards into the critic.

    Episodes are random training problems at the given deadlines, run with the allocator's
    action; the model is then fitted to them (``fit_actor_critic``).
    Returns the mean probability the actor then gives the allocator's actions.
    """
    rng = np.random.default_rng(seed)
    problems = rng.integers(len(env.problems), size=samples)
    deadlines = rng.choice(np.asarray(deadlines_s, dtype=float), size=samples)
    actions = np.zeros((samples, len(env.action_space.nvec)), dtype=np.int64)
    for deadline in np.unique(deadlines):
        chosen = np.flatnonzero(deadlines == deadline)
        request = env.allocation_request(problems[chosen].tolist(), float(deadline))
        actions[chosen] = [env.grids.action(a) for a in allocator.allocate(request)]
    obs = np.zeros((samples, *env.observation_space.shape), dtype=np.float32)
    rewards = np.zeros(samples, dtype=np.float32)
    for i in range(samples):
        obs[i], _ = env.reset(options={"problem_index": problems[i], "deadline_s": deadlines[i]})
        rewards[i] = env.step(actions[i])[1]
    fit_actor_critic(model, obs, actions, rewards, epochs, batch_size, learning_rate)
    policy = model.policy
    with torch.no_grad():
        as_tensors = (torch.as_tensor(x, device=policy.device) for x in (obs, actions))
        _, log_prob, _ = policy.evaluate_actions(*as_tensors)
    return float(log_prob.exp().mean())


def fit_actor_critic(
    model: BaseAlgorithm,
    obs: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    epochs: int = 5,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    generator: torch.Generator | None = None,
) -> None:
    """Supervised fit of an SB3 actor-critic (behaviour cloning): the actor towards ``actions``
    by maximum likelihood, the critic regressing ``rewards`` (one-step episodes: the reward is
    the value), with Adam over shuffled mini-batches (shuffled by ``generator``, default
    torch's global one)."""
    policy = model.policy
    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    policy.set_training_mode(True)
    tensors = [torch.as_tensor(x, device=policy.device) for x in (obs, actions, rewards)]
    for _ in range(epochs):
        for batch in torch.randperm(len(obs), generator=generator).split(batch_size):
            o, a, r = (t[batch] for t in tensors)
            values, log_prob, _ = policy.evaluate_actions(o, a)
            loss = -log_prob.mean() + torch.nn.functional.mse_loss(values.flatten(), r)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    policy.set_training_mode(False)


def select_on_validation(
    candidates: dict[str, BaseAlgorithm],
    env: LatencyTTSEnv,
    deadlines_s: Sequence[float],
    reference: str | None = None,
    z: float = 2.0,
    seed: int = 0,
) -> tuple[str, dict[str, dict]]:
    """Choose the model to keep by its reward on validation problems at every deadline.

    All candidates run on the same draws (common random numbers), so differences are paired.
    With a ``reference`` (the warm start) another candidate replaces it only when its mean
    reward is higher by ``z`` standard errors of the paired difference: fine-tuning must show
    it helps beyond noise.  Returns the chosen name and per-candidate statistics.
    """
    rewards = {}
    for name, model in candidates.items():
        allocator = ModelAllocator(model, env.grids, name)
        rewards[name] = np.array([
            reward
            for deadline in deadlines_s
            for reward in run_episodes(env, allocator, deadline, 1, seed).rewards
        ])  # fmt: skip
    stats = {name: {"mean_reward": float(r.mean())} for name, r in rewards.items()}
    eligible = list(rewards)
    if reference is not None:
        for name, r in rewards.items():
            diff = r - rewards[reference]
            se = diff.std(ddof=1) / np.sqrt(len(diff))
            stats[name]["z_vs_reference"] = float(diff.mean() / se) if se > 0 else 0.0
        eligible = [n for n in rewards if n == reference or stats[n]["z_vs_reference"] >= z]
    return max(eligible, key=lambda n: stats[n]["mean_reward"]), stats


def init_wandb(mode: str, project: str, run_name: str, config: dict, out_dir: Path):
    """Start a Weights & Biases run that mirrors the TensorBoard logs (``mode``: online,
    offline or disabled; offline runs are kept under ``out_dir/wandb`` for ``wandb sync``)."""
    import wandb

    out_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=project,
        name=run_name,
        config=config,
        mode=mode,
        dir=str(out_dir),
        sync_tensorboard=mode != "disabled",
    )
