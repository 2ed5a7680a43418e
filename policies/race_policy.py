"""The learned race controller: Stable-Baselines3 PPO on ``LatencyTTS-v1``.

The policy acts at every decision point of a replayed call (``env.race_env.RaceEnv``): at the
start it picks (n, k), later it continues or answers and sets k.  A call's reward arrives at its
end and is 0 or 1 minus a small latency cost, so PPO from scratch spends most of a short
training run discovering what the tuned heuristics already know.  Training therefore starts by
cloning a teacher (``teach``: the tuned heuristic of each deadline, e.g. the margin rule) into
the actor and the teacher's returns into the critic, then fine-tunes with PPO, and the caller
keeps the fine-tuned model only where validation shows it is better (``policies.race_eval``).

``LearnedController`` runs a model as a ``RaceController``, so the learned policy is evaluated
by the same loop (``policies.race_eval.run_race``) as every heuristic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm

from env.backends.protocol import ProblemInfo
from env.backends.replay import ReplayBackend
from env.config import call_reward
from env.race import RaceState
from env.race_env import STOP, RaceEnv
from policies.ppo_training import fit_actor_critic
from policies.race_controllers import Decision, RaceController


@dataclass
class LearnedController:
    """An SB3 model as a ``RaceController``: its most likely action at every decision point.

    :param model: the trained model (actions ``MultiDiscrete([n, k, stop])``).
    :param env: the race environment whose grids and prompt features the model was trained
        with (only its grids and ``prompt_observation`` are used).
    :param name: the method's name in reports.
    """

    model: BaseAlgorithm
    env: RaceEnv
    name: str = "policy"

    def __post_init__(self) -> None:
        self._prompt: np.ndarray | None = None

    def _act(self, race_obs: np.ndarray) -> np.ndarray:
        obs = np.concatenate([self._prompt, race_obs])
        action, _ = self.model.predict(obs, deterministic=True)
        return action

    def begin(self, problem: ProblemInfo, deadline_s: float) -> tuple[int, int]:
        env = self.env
        self._prompt = env.prompt_observation(problem.index, deadline_s)
        fresh = RaceState(deadline_s, env.backend.max_branches, max(env.backend.k_grid))
        action = self._act(fresh.observation())
        return env.n_grid[int(action[0])], env.k_grid[int(action[1])]

    def decide(self, state: RaceState) -> Decision:
        action = self._act(state.observation())
        return Decision(stop=int(action[2]) == STOP, k=self.env.k_grid[int(action[1])])

    def call_deadline(self, deadline_s: float) -> float:
        return deadline_s


@dataclass
class DeadlineTable:
    """A controller per deadline of a grid, used at the nearest grid deadline (in log time):
    how a heuristic tuned on the evaluation grid acts at any deadline (the teacher)."""

    deadlines_s: Sequence[float]
    controllers: Sequence[RaceController]
    name: str = "table"

    def at(self, deadline_s: float) -> RaceController:
        logs = np.log(np.asarray(self.deadlines_s, dtype=float))
        return self.controllers[int(np.abs(logs - math.log(deadline_s)).argmin())]

    def begin(self, problem: ProblemInfo, deadline_s: float) -> tuple[int, int]:
        self._current = self.at(deadline_s)
        return self._current.begin(problem, deadline_s)

    def decide(self, state: RaceState) -> Decision:
        return self._current.decide(state)

    def call_deadline(self, deadline_s: float) -> float:
        return self.at(deadline_s).call_deadline(deadline_s)


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
    from policies.race_eval import evaluate_controller

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
