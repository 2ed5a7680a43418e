"""A trained race policy on disk: the folder format, its one compatibility check, loading.

Training writes it (``train.py``), evaluation and the deployed controller read it.  The serving
path imports this module, so it imports no training code, no Gymnasium environment module and
no ``datasets``; Stable-Baselines3 is imported only when a policy is loaded or saved.

A saved policy is a folder (written to a temporary sibling and renamed into place)::

    policy.json       format version, algorithm, env id (LatencyTTS-v1), feature schema
                      version, race feature names, env config (grids, deadline range, latency
                      cost), race scales, speculative method, profile, evaluation deadlines,
                      the tuned baselines, model selection and training settings
    model.zip         the SB3 model (``PPO.save``), or for a stop-value policy
    stop_value.json   (``algorithm`` "StopValue", ``policies.stop_value``) its per-deadline
    stop_value.npz    settings and its value network instead
    featurizer.json   the observation featurizer (``env.features``), with
    featurizer.npz    its weights
    confidence.json   the calibrated answer confidence (``policies.confidence``), when fitted

A policy only means something with the observations it was trained on, so ``load_race_policy``
checks, and nothing else does, the format version (a one-decision policy of LatencyTTS-v0 is
refused with "retrain"), the feature schema version, the race feature names, and that prompt
and race features are as wide as the model's observations.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from env.config import RACE_ENV_ID, RaceEnvConfig
from env.features import FEATURE_SCHEMA_VERSION, ProblemFeaturizer, check_feature_schema
from env.profiles.store import Profile, load_profile
from env.race import RACE_FEATURES
from policies.stop_value import STOP_VALUE_ALGORITHM, StopValuePolicy

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm

    RaceModel = BaseAlgorithm | StopValuePolicy

RACE_POLICY_FORMAT_VERSION = 3  # 3: the race (LatencyTTS-v1); 2 was one (n, k, budget) per call
RETRAIN = "Retrain the policy (python train.py)."


def _write_policy_folder(
    folder: Path, model: RaceModel, featurizer: ProblemFeaturizer, manifest: dict
) -> Path:
    """Write model, featurizer and ``policy.json`` to a temporary sibling, then rename it into
    place (an existing folder is replaced only once the new one is complete)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        if isinstance(model, StopValuePolicy):
            model.save(tmp)
        else:
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
    if info.get("algorithm") == STOP_VALUE_ALGORITHM:
        return StopValuePolicy.load(folder), ProblemFeaturizer.load(folder)
    from stable_baselines3 import PPO

    algorithms: dict[str, type[BaseAlgorithm]] = {"PPO": PPO}
    algorithm = algorithms.get(info.get("algorithm", ""))
    if algorithm is None:
        raise ValueError(f"policy {folder}: unknown algorithm {info.get('algorithm')!r}")
    return algorithm.load(folder / "model.zip", device="cpu"), ProblemFeaturizer.load(folder)


@dataclass
class SavedRacePolicy:
    """A loaded race policy (``LatencyTTS-v1``): the model, its featurizer and env settings.

    :param model: the SB3 model (actions ``MultiDiscrete([n, k, stop])``), or a
        ``StopValuePolicy`` (``policies.stop_value``).
    :param featurizer: computes the prompt part of its observations.
    :param env_config: the race environment settings it was trained with.
    :param info: the rest of ``policy.json`` (profile, deadlines, tuned baselines, training).
    :param folder: where it was loaded from.
    """

    model: RaceModel
    featurizer: ProblemFeaturizer
    env_config: RaceEnvConfig
    info: dict
    folder: Path


def policy_profile(policy: SavedRacePolicy) -> Profile:
    """The profile a policy was trained on: its recorded path, else its name under
    data/profiles (the policy or the profile moved)."""
    trained_on = policy.info.get("profile") or {}
    path = trained_on.get("path")
    if path and Path(path, "manifest.json").is_file():
        return load_profile(path)
    if not trained_on.get("name"):
        raise ValueError(f"policy {policy.folder} does not record its profile")
    return load_profile(trained_on["name"])


def _check_stop_value_fits(policy: StopValuePolicy, featurizer, env_config, where: str) -> None:
    """A stop-value policy's settings must lie in the grids and read the featurizer's width."""
    for s in policy.settings:
        if s.n not in env_config.n_grid or s.k not in env_config.k_grid:
            raise ValueError(f"{where}: setting (n={s.n}, k={s.k}) outside the grids "
                             f"{env_config.n_grid} x {env_config.k_grid}")  # fmt: skip
    if policy.prompt_width != len(featurizer.feature_names):
        raise ValueError(f"{where} reads {policy.prompt_width} prompt features, its featurizer "
                         f"gives {len(featurizer.feature_names)}. {RETRAIN}")  # fmt: skip


def save_race_policy(
    folder: Path,
    model: RaceModel,
    featurizer: ProblemFeaturizer,
    env_config: RaceEnvConfig,
    info: dict,
) -> Path:
    """Write a race policy folder atomically (the layout of the module docstring)."""
    if env_config.n_grid is None or env_config.k_grid is None:
        raise ValueError("save_race_policy needs an env config with explicit n_grid and k_grid")
    grids = (len(env_config.n_grid), len(env_config.k_grid), 2)
    if isinstance(model, StopValuePolicy):
        _check_stop_value_fits(model, featurizer, env_config, "save_race_policy")
    elif tuple(model.action_space.nvec) != grids:
        raise ValueError(f"model actions {tuple(model.action_space.nvec)} != env grids {grids}")
    manifest = {
        "format_version": RACE_POLICY_FORMAT_VERSION,
        "algorithm": (
            STOP_VALUE_ALGORITHM if isinstance(model, StopValuePolicy) else type(model).__name__
        ),
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
    env_config = RaceEnvConfig.from_dict(info["env_config"])
    if isinstance(model, StopValuePolicy):
        _check_stop_value_fits(model, featurizer, env_config, f"policy {folder}")
        return SavedRacePolicy(model, featurizer, env_config, info, folder)
    if tuple(model.observation_space.shape) != (expected,):
        raise ValueError(
            f"policy {folder} expects observations of shape {model.observation_space.shape}, "
            f"its featurizer and the race give {expected}. {RETRAIN}"
        )
    return SavedRacePolicy(model, featurizer, env_config, info, folder)
