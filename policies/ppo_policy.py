"""The learned allocation policy: Stable-Baselines3 PPO on ``LatencyTTS-v0``, saved as one folder.

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

This module holds what train.py and evaluation share: the vectorised environments, the
callbacks (SB3's ``EvalCallback``/``CheckpointCallback`` plus one that logs accuracy and
latency), the warm start and model selection, Weights & Biases set-up, and saving/loading a
policy together with everything needed to compute its observations.

A saved policy is a folder (written to a temporary sibling and renamed into place)::

    policy.json       format version, algorithm, env id, feature schema version, env config
                      (grids, deadline range, latency cost), speculative method, profile,
                      evaluation deadlines and training settings
    model.zip         the SB3 model (``PPO.save``)
    featurizer.json   the observation featurizer (``env.features``), with
    featurizer.npz    its weights
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CallbackList,
    CheckpointCallback,
    EvalCallback,
)
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecMonitor

from env.features import FEATURE_SCHEMA_VERSION, ProblemFeaturizer
from env.tts_env import ENV_ID, Allocation, EnvConfig, LatencyTTSEnv
from policies.baselines import Allocator, reward_of, run_allocation

POLICY_FORMAT_VERSION = 2  # 2: actions (n, k, budget); 1 had (n, k)
ALGORITHMS: dict[str, type[BaseAlgorithm]] = {"PPO": PPO}


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
        self._infos.extend(self.locals["infos"])
        return True

    def _on_rollout_end(self) -> None:
        if not self._infos:
            return
        keys = ("correct", "latency_s", "n", "k", "budget", "branches_finished", "deadline_missed")
        for key in keys:
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
    episodes = len(eval_env.backend.problems) * max(len(sweep), 1)
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
    action.  The actor is pulled towards that action by maximum likelihood and the critic
    regresses the rewards.
    Returns the mean probability the actor then gives the allocator's actions.
    """
    rng = np.random.default_rng(seed)
    problems = rng.integers(len(env.backend.problems), size=samples)
    deadlines = rng.choice(np.asarray(deadlines_s, dtype=float), size=samples)
    actions = np.zeros((samples, len(env.action_space.nvec)), dtype=np.int64)
    for deadline in np.unique(deadlines):
        chosen = np.flatnonzero(deadlines == deadline)
        allocations = allocator.choose(env, problems[chosen].tolist(), float(deadline))
        actions[chosen] = [env.action_of(*a) for a in allocations]
    obs = np.zeros((samples, *env.observation_space.shape), dtype=np.float32)
    rewards = np.zeros(samples, dtype=np.float32)
    for i in range(samples):
        obs[i], _ = env.reset(options={"problem_index": problems[i], "deadline_s": deadlines[i]})
        rewards[i] = env.step(actions[i])[1]
    policy = model.policy
    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    policy.set_training_mode(True)
    tensors = [torch.as_tensor(x, device=policy.device) for x in (obs, actions, rewards)]
    for _ in range(epochs):
        for batch in torch.randperm(samples).split(batch_size):
            o, a, r = (t[batch] for t in tensors)
            values, log_prob, _ = policy.evaluate_actions(o, a)
            loss = -log_prob.mean() + torch.nn.functional.mse_loss(values.flatten(), r)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    policy.set_training_mode(False)
    with torch.no_grad():
        _, log_prob, _ = policy.evaluate_actions(tensors[0], tensors[1])
    return float(log_prob.exp().mean())


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


def save_policy(
    folder: Path,
    model: BaseAlgorithm,
    featurizer: ProblemFeaturizer,
    env_config: EnvConfig,
    info: dict,
) -> Path:
    """Write a policy folder (see module docstring) atomically; ``info`` adds metadata.

    ``env_config`` must name its grids (the policy's actions index them), as
    ``LatencyTTSEnv.resolved_config`` does.
    """
    folder = Path(folder)
    if env_config.n_grid is None or env_config.k_grid is None:
        raise ValueError("save_policy needs an env config with explicit n_grid and k_grid")
    grids = (len(env_config.n_grid), len(env_config.k_grid), len(env_config.budget_grid))
    if tuple(model.action_space.nvec) != grids:
        raise ValueError(f"model actions {tuple(model.action_space.nvec)} != env grids {grids}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(env_config, sweep_deadlines_s=None)
    manifest = {
        "format_version": POLICY_FORMAT_VERSION,
        "algorithm": type(model).__name__,
        "env_id": ENV_ID,
        "feature_schema_version": FEATURE_SCHEMA_VERSION,
        "env_config": config.to_dict(),
        **info,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save(tmp / "model.zip")
        featurizer.save(tmp)
        (tmp / "policy.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            folder.rename(old / folder.name)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


@dataclass
class ModelAllocator:
    """An SB3 model used as an allocator (``policies.baselines.Allocator``): its most likely
    action per problem."""

    model: BaseAlgorithm
    name: str = "policy"

    def choose(
        self, env: LatencyTTSEnv, problems: Sequence[int], deadline_s: float
    ) -> list[Allocation]:
        obs = np.stack([env.observation(p, deadline_s) for p in problems])
        actions, _ = self.model.predict(obs, deterministic=True)
        return [env.allocation_of(a) for a in actions]


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
    problems = list(range(len(env.backend.problems)))
    cost = env.config.latency_cost
    rewards = {}
    for name, model in candidates.items():
        allocator = ModelAllocator(model)
        rewards[name] = np.array([
            reward_of(outcome, deadline, cost)
            for deadline in deadlines_s
            for outcome in run_allocation(
                env, allocator.choose(env, problems, deadline), problems, deadline, 1, seed
            )
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


@dataclass
class SavedPolicy:
    """A loaded policy folder, usable as an allocator (``policies.baselines.Allocator``).

    :param model: the SB3 model.
    :param featurizer: computes its observations.
    :param env_config: the environment settings it was trained with (grids, deadline range).
    :param info: the rest of ``policy.json``.
    :param folder: where it was loaded from.
    """

    model: BaseAlgorithm
    featurizer: ProblemFeaturizer
    env_config: EnvConfig
    info: dict
    folder: Path
    name: str = "policy"

    def choose(
        self, env: LatencyTTSEnv, problems: Sequence[int], deadline_s: float
    ) -> list[Allocation]:
        """The policy's (n, k, budget) per problem (deterministic: the most likely action)."""
        config = self.env_config
        mine = (config.n_grid, config.k_grid, tuple(config.budget_grid))
        if (env.n_grid, env.k_grid, env.budget_grid) != mine:
            raise ValueError(
                f"environment grids n={env.n_grid} k={env.k_grid} budget={env.budget_grid} "
                f"differ from the policy's n={mine[0]} k={mine[1]} budget={mine[2]}"
            )
        return ModelAllocator(self.model, self.name).choose(env, problems, deadline_s)


def load_policy(folder: Path | str) -> SavedPolicy:
    """Load a policy folder; refuses other format or feature schema versions with a clear error."""
    folder = Path(folder)
    manifest_path = folder / "policy.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} is not a policy folder (no policy.json)")
    info = json.loads(manifest_path.read_text())
    if info.get("format_version") != POLICY_FORMAT_VERSION:
        raise ValueError(
            f"policy {folder} has format version {info.get('format_version')}; this code reads "
            f"{POLICY_FORMAT_VERSION} (version 2 added the budget action). Retrain the policy "
            "(python train.py)."
        )
    schema = info.get("feature_schema_version")
    if schema != FEATURE_SCHEMA_VERSION:
        raise ValueError(
            f"policy {folder} was trained on feature schema version {schema}, but this code "
            f"computes version {FEATURE_SCHEMA_VERSION}: its observations would mean something "
            "else. Retrain the policy (python train.py)."
        )
    algorithm = ALGORITHMS.get(info.get("algorithm", ""))
    if algorithm is None:
        raise ValueError(f"policy {folder}: unknown algorithm {info.get('algorithm')!r}")
    featurizer = ProblemFeaturizer.load(folder)
    model = algorithm.load(folder / "model.zip", device="cpu")
    config = EnvConfig.from_dict(info["env_config"])
    return SavedPolicy(model, featurizer, config, info, folder)
