"""The serving path is lean: importing the server loads neither the data stack nor training code.

Checked in a fresh interpreter (``tests.fresh_imports``).  Loading a saved policy (an SB3 PPO
zip) needs ``stable_baselines3`` (``PPO.load``), so the saved-policy module imports it when a
policy is loaded, not when the server module is imported; answering needs only torch and the
policy network.
"""

from __future__ import annotations

from tests.fresh_imports import modules_loaded_by

NOT_ON_THE_SERVING_PATH = (
    "datasets",  # MATH loading (env.task.problems); serving formats prompts with env.task.prompt
    "stable_baselines3",  # imported when a saved policy is loaded
    "gymnasium",  # registered by env.race_env, which serving never imports
    "wandb",
    "env.race_env",
    "env.task.problems",
    "env.backends.replay",
    "policies.ppo_training",
    "policies.race_eval",
    "policies.evaluate",
    "policies.confidence_fit",
    "train",
)


def test_importing_the_server_loads_no_training_code_and_no_datasets():
    loaded = modules_loaded_by("policies.server")
    assert "policies.server" in loaded and "env.backends.sample_vote" in loaded
    assert sorted(loaded.intersection(NOT_ON_THE_SERVING_PATH)) == []
