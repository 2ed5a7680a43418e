"""Where the project's bundled data lives, in one place, so every command works from any folder.

Everything the product reads or writes under ``data/`` (MATH copies, calibration figures,
profiles, saved policies) is found through ``data_dir()``: ``$TTS_DATA_DIR`` when set, otherwise
the repository's ``data/`` folder, never the current working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def data_dir() -> Path:
    """Directory of the bundled data: ``$TTS_DATA_DIR`` if set, else the repository's data/."""
    override = os.environ.get("TTS_DATA_DIR")
    return Path(override) if override else REPO_DATA_DIR


def profiles_dir() -> Path:
    """Folder of named profiles (``data/profiles``)."""
    return data_dir() / "profiles"


def policies_dir() -> Path:
    """Folder of named saved policies (``data/policies``)."""
    return data_dir() / "policies"
