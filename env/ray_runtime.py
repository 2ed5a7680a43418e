"""What a Ray actor of this project needs from the process that starts it.

Profiling replicas (``env.profiles.replicas``) and serving replicas (``policies.serve_replicas``)
both run this repository's code in Ray actors, possibly on other nodes: the actors find the
code through PYTHONPATH (the repository at the same path on every node) and inherit the model
cache, data folder and offline settings.  Kept apart from both so that serving does not import
profiling (and ``datasets``).
"""

from __future__ import annotations

import os
from pathlib import Path

FORWARDED_ENV = ("TTS_CACHE_DIR", "TTS_DATA_DIR", "HF_HOME", "HF_HUB_OFFLINE",
                 "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM")  # fmt: skip
"""Environment variables the actors inherit from the starting process."""


def ray_runtime_env() -> dict:
    """Ray's ``runtime_env`` for this project's actors (see the module docstring)."""
    root = str(Path(__file__).resolve().parents[1])
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    path = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not path else f"{root}{os.pathsep}{path}"
    return {"env_vars": env}
