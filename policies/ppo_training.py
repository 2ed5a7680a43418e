"""Training the race controller: Stable-Baselines3 PPO on ``LatencyTTS-v1``.

The policy acts at every decision point of a replayed call (``env.race_env.RaceEnv``): at the
start it picks (n, k), later it continues or answers and sets k.  A call's reward arrives at its
end and is 0 or 1 minus a small latency cost, so PPO from scratch spends most of a short
training run rediscovering what the tuned heuristics already know.  Training therefore starts by
cloning a teacher (``teach``: a tuned heuristic per deadline) into the actor and the teacher's
returns into the critic, fine-tunes with PPO, and keeps the fine-tuned model only when a paired
comparison on validation problems shows it beats the warm start (``select_on_validation``).

This module holds the pieces ``train.py`` assembles: the vectorised environments, the callback
that logs accuracy and latency, the warm start, model selection and Weights & Biases set-up.
Saving and loading the result is ``policies.saved_policy``'s job, and running it
``policies.learned_controller``'s (the serving path needs those without any of this).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor

from env.backends.replay import ReplayBackend
from env.config import call_reward
from env.race_env import RaceEnv
from policies.race_controllers import RaceController
from policies.race_eval import evaluate_controller


def make_vec_env(make_env: Callable[[], RaceEnv], n_envs: int, seed: int) -> VecEnv:
    """``n_envs`` environments stepped in this process, with episode statistics for logging.

    Replayed decisions take tens of microseconds, so subprocesses would only add IPC.
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


def teacher_episodes(
    env: RaceEnv, teacher: RaceController, episodes: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observations, the teacher's actions and the episode returns of ``episodes`` races.

    Deadlines and problems are drawn as the environment draws them for training.
    """
    obs, actions, returns = [], [], []
    env.reset(seed=seed)
    for _ in range(episodes):
        o, info = env.reset()
        problem = env.backend.problems[info["problem_index"]]
        n, k = teacher.begin(problem, info["deadline_s"])
        action = np.array([env.n_grid.index(n), env.k_grid.index(k), 0])
        start = len(obs)
        while True:
            obs.append(o)
            actions.append(action)
            o, reward, done, _, _ = env.step(action)
            if done:
                returns.extend([reward] * (len(obs) - start))
                break
            decision = teacher.decide(env.race_state)
            k = env.k_grid.index(decision.k) if decision.k is not None else action[1]
            action = np.array([action[0], k, int(decision.stop)])
    return np.stack(obs), np.stack(actions), np.asarray(returns, dtype=np.float32)


def teach(
    model: BaseAlgorithm,
    env: RaceEnv,
    teacher: RaceController,
    episodes: int = 4000,
    epochs: int = 8,
    batch_size: int = 512,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> float:
    """Warm start: clone ``teacher``'s actions into the actor and its returns into the critic.

    Returns the share of decisions where the actor's most likely action then equals the
    teacher's (every component).
    """
    obs, actions, returns = teacher_episodes(env, teacher, episodes, seed)
    generator = torch.Generator().manual_seed(seed)
    fit_actor_critic(model, obs, actions, returns, epochs, batch_size, learning_rate, generator)
    predicted, _ = model.predict(obs, deterministic=True)
    return float((predicted == actions).all(axis=1).mean())


def validation_rewards(
    controllers: dict[str, RaceController],
    backend: ReplayBackend,
    deadlines_s: Sequence[float],
    latency_cost: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """Each controller's reward per (deadline, validation problem), on the same draws."""
    rewards = {}
    for name, controller in controllers.items():
        rewards[name] = np.array([
            call_reward(outcome, deadline, latency_cost)
            for deadline in deadlines_s
            for outcome in evaluate_controller(backend, controller, deadline, 1, seed)
        ])  # fmt: skip
    return rewards


def select_on_validation(
    rewards: dict[str, np.ndarray], reference: str, z: float = 2.0
) -> tuple[str, dict[str, dict]]:
    """The candidate to keep: the ``reference`` (where training started) unless another beats
    its mean reward by ``z`` standard errors of the paired difference (fine-tuning must show
    it helps beyond noise).  Returns the name and per-candidate statistics."""
    stats: dict[str, dict] = {}
    for name, r in rewards.items():
        diff = r - rewards[reference]
        se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
        stats[name] = {"mean_reward": float(r.mean()),
                       "z_vs_reference": float(diff.mean() / se) if se > 0 else 0.0}  # fmt: skip
    eligible = [n for n in rewards if n == reference or stats[n]["z_vs_reference"] >= z]
    return max(eligible, key=lambda n: stats[n]["mean_reward"]), stats
