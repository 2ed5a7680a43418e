"""A trained allocation policy on disk: the folder format, its one compatibility check, loading.

Training writes it (``train.py``), evaluation and the deployed controller read it.  The serving
path imports this module, so it imports no training code, no Gymnasium environment module and
no ``datasets``; Stable-Baselines3 is imported only when a policy is loaded or saved.

A saved policy is a folder (written to a temporary sibling and renamed into place)::

    policy.json       format version, algorithm, env id, feature schema version, env config
                      (grids, deadline range, latency cost), speculative method, profile,
                      evaluation deadlines and training settings
    model.zip         the SB3 model (``PPO.save``)
    featurizer.json   the observation featurizer (``env.features``), with
    featurizer.npz    its weights

A policy only means something with the observations it was trained on, so ``load_policy``
checks, in ``check_compatible`` and nowhere else, the format version, the feature schema
version and that the featurizer's features are as wide as the model's observations.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from env.allocation import ActionGrids, Allocation, AllocationRequest
from env.config import ENV_ID, RACE_ENV_ID, EnvConfig, RaceEnvConfig
from env.features import FEATURE_SCHEMA_VERSION, ProblemFeaturizer, check_feature_schema
from env.race import RACE_FEATURES

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm

POLICY_FORMAT_VERSION = 2  # 2: actions (n, k, budget); 1 had (n, k)
RACE_POLICY_FORMAT_VERSION = 3  # 3: the race (LatencyTTS-v1): (n, k) at the start, then stop / k
RETRAIN = "Retrain the policy (python train.py)."


@dataclass
class ModelAllocator:
    """An SB3 model used as an allocator (``policies.allocator.Allocator``): its most likely
    action per problem, read on the grids it was trained on.

    :param model: the SB3 model.
    :param grids: the action grids its actions index.
    :param name: what reports call it.
    """

    model: BaseAlgorithm
    grids: ActionGrids
    name: str = "policy"

    def allocations_for(self, observations: np.ndarray) -> list[Allocation]:
        """The model's (n, k, budget) for each observation row (deterministic)."""
        actions, _ = self.model.predict(observations, deterministic=True)
        return [self.grids.allocation(a) for a in actions]

    def allocate(self, request: AllocationRequest) -> list[Allocation]:
        return self.allocations_for(request.observations)


@dataclass
class SavedPolicy:
    """A loaded policy folder, usable as an allocator (``policies.allocator.Allocator``).

    :param model: the SB3 model.
    :param featurizer: computes its observations.
    :param env_config: the environment settings it was trained with (grids, deadline range).
    :param info: the rest of ``policy.json``.
    :param folder: where it was loaded from.
    :param name: what reports call it.
    """

    model: BaseAlgorithm
    featurizer: ProblemFeaturizer
    env_config: EnvConfig
    info: dict
    folder: Path
    name: str = "policy"

    @property
    def grids(self) -> ActionGrids:
        """The action grids the policy chooses from (recorded in ``policy.json``)."""
        config = self.env_config
        return ActionGrids(config.n_grid, config.k_grid, tuple(config.budget_grid))

    def allocate(self, request: AllocationRequest) -> list[Allocation]:
        """The policy's (n, k, budget) per problem (deterministic: the most likely action).

        ``request.observations`` must come from this policy's featurizer (an environment built
        with ``featurizer``), as evaluation does.
        """
        return ModelAllocator(self.model, self.grids, self.name).allocate(request)


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
    config = dataclasses.replace(env_config, sweep_deadlines_s=None)
    manifest = {
        "format_version": POLICY_FORMAT_VERSION,
        "algorithm": type(model).__name__,
        "env_id": ENV_ID,
        "feature_schema_version": FEATURE_SCHEMA_VERSION,
        "env_config": config.to_dict(),
        **info,
    }
    return _write_policy_folder(folder, model, featurizer, manifest)


def _write_policy_folder(
    folder: Path, model: BaseAlgorithm, featurizer: ProblemFeaturizer, manifest: dict
) -> Path:
    """Write model, featurizer and ``policy.json`` to a temporary sibling, then rename it into
    place (an existing folder is replaced only once the new one is complete)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
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


def _read_manifest(folder: Path) -> dict:
    manifest_path = folder / "policy.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} is not a policy folder (no policy.json)")
    return json.loads(manifest_path.read_text())


def _load_model_and_featurizer(folder: Path, info: dict):
    from stable_baselines3 import PPO

    algorithms: dict[str, type[BaseAlgorithm]] = {"PPO": PPO}
    algorithm = algorithms.get(info.get("algorithm", ""))
    if algorithm is None:
        raise ValueError(f"policy {folder}: unknown algorithm {info.get('algorithm')!r}")
    return algorithm.load(folder / "model.zip", device="cpu"), ProblemFeaturizer.load(folder)


def check_compatible(
    info: dict, folder: Path, model: BaseAlgorithm, featurizer: ProblemFeaturizer
) -> None:
    """The one check that a saved policy's observations and actions mean what this code means:
    the format version and the feature schema version in ``policy.json``, and features as wide
    as the model's observations.

    :raises ValueError: naming the mismatch and what to do (retrain).
    """
    where = f"policy {folder}"
    version = info.get("format_version")
    if version != POLICY_FORMAT_VERSION:
        raise ValueError(
            f"{where} has format version {version}; this code reads {POLICY_FORMAT_VERSION} "
            f"(version 2 added the budget action). {RETRAIN}"
        )
    check_feature_schema(info.get("feature_schema_version"), where, RETRAIN)
    width = len(featurizer.feature_names)
    expected = tuple(model.observation_space.shape)
    if expected != (width,):
        raise ValueError(
            f"{where} expects observations of shape {expected}, its featurizer gives {width} "
            f"features. {RETRAIN}"
        )


def load_policy(folder: Path | str) -> SavedPolicy:
    """Load a policy folder; refuses what ``check_compatible`` refuses, with a clear error."""
    folder = Path(folder)
    info = _read_manifest(folder)
    model, featurizer = _load_model_and_featurizer(folder, info)
    check_compatible(info, folder, model, featurizer)
    config = EnvConfig.from_dict(info["env_config"])
    return SavedPolicy(model, featurizer, config, info, folder)


@dataclass
class SavedRacePolicy:
    """A loaded race policy (``LatencyTTS-v1``): the model, its featurizer and env settings.

    :param model: the SB3 model (actions ``MultiDiscrete([n, k, stop])``).
    :param featurizer: computes the prompt part of its observations.
    :param env_config: the race environment settings it was trained with.
    :param info: the rest of ``policy.json`` (profile, deadlines, tuned baselines, training).
    :param folder: where it was loaded from.
    """

    model: BaseAlgorithm
    featurizer: ProblemFeaturizer
    env_config: RaceEnvConfig
    info: dict
    folder: Path


def save_race_policy(
    folder: Path,
    model: BaseAlgorithm,
    featurizer: ProblemFeaturizer,
    env_config: RaceEnvConfig,
    info: dict,
) -> Path:
    """Write a race policy folder atomically (the layout of the module docstring)."""
    if env_config.n_grid is None or env_config.k_grid is None:
        raise ValueError("save_race_policy needs an env config with explicit n_grid and k_grid")
    grids = (len(env_config.n_grid), len(env_config.k_grid), 2)
    if tuple(model.action_space.nvec) != grids:
        raise ValueError(f"model actions {tuple(model.action_space.nvec)} != env grids {grids}")
    manifest = {
        "format_version": RACE_POLICY_FORMAT_VERSION,
        "algorithm": type(model).__name__,
        "env_id": RACE_ENV_ID,
        "feature_schema_version": FEATURE_SCHEMA_VERSION,
        "race_feature_names": list(RACE_FEATURES),
        "env_config": env_config.to_dict(),
        **info,
    }
    return _write_policy_folder(Path(folder), model, featurizer, manifest)


def load_race_policy(folder: Path | str) -> SavedRacePolicy:
    """Load a race policy folder; a policy of the one-decision environment (v0), another
    format or other features is refused with a clear "retrain" error."""
    folder = Path(folder)
    info = _read_manifest(folder)
    if info.get("format_version") != RACE_POLICY_FORMAT_VERSION:
        raise ValueError(
            f"policy {folder} has format version {info.get('format_version')} "
            f"(env {info.get('env_id')}); this code reads race policies of {RACE_ENV_ID}, "
            f"format {RACE_POLICY_FORMAT_VERSION}, which decide while the call runs. {RETRAIN}"
        )
    if info.get("race_feature_names") != list(RACE_FEATURES):
        raise ValueError(f"policy {folder} was trained on other race features. {RETRAIN}")
    model, featurizer = _load_model_and_featurizer(folder, info)
    expected = len(featurizer.feature_names) + len(RACE_FEATURES)
    check_feature_schema(info.get("feature_schema_version"), f"policy {folder}", RETRAIN)
    if tuple(model.observation_space.shape) != (expected,):
        raise ValueError(
            f"policy {folder} expects observations of shape {model.observation_space.shape}, "
            f"its featurizer and the race give {expected}. {RETRAIN}"
        )
    return SavedRacePolicy(model, featurizer, RaceEnvConfig.from_dict(info["env_config"]),
                           info, folder)  # fmt: skip
