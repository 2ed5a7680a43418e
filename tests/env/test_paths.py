"""Every command finds the bundled data from any working directory, and TTS_DATA_DIR moves it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from env.paths import REPO_DATA_DIR, data_dir, policies_dir, profiles_dir
from env.profiles.store import Profile
from env.profiles.validate import profile_models

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_repository_data_folder(monkeypatch):
    monkeypatch.delenv("TTS_DATA_DIR", raising=False)
    assert data_dir() == REPO_DATA_DIR == ROOT / "data"
    assert (profiles_dir() / "synthetic-llama32-1b-h100" / "manifest.json").is_file()
    assert (policies_dir() / "default").is_dir()


def test_override_moves_every_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TTS_DATA_DIR", str(tmp_path))
    assert (data_dir(), profiles_dir(), policies_dir()) == (
        tmp_path, tmp_path / "profiles", tmp_path / "policies")  # fmt: skip


def test_a_profile_loads_by_name_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("TTS_DATA_DIR", raising=False)
    code = (
        "from env.profiles.store import load_profile\n"
        "from env.profiles.record import default_profile_dir, settings_for\n"
        "p = load_profile('synthetic-llama32-1b-h100')\n"
        "print(p.name, len(p.rows), default_profile_dir(None, settings_for(n_max=2)).parent)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    name, rows, parent = done.stdout.split()
    assert name == "synthetic-llama32-1b-h100" and int(rows) > 0
    assert Path(parent) == ROOT / "data" / "profiles"


def _manifest(model, draft) -> Profile:
    return Profile(path=None, manifest={"model": model, "draft": draft}, rows=[])


def test_profile_models_reads_current_and_earlier_manifests():
    bundled = {"name": "smollm2-135m-instruct", "bundled": True, "sha256": "0" * 64}
    draft = {"name": "smollm2-135m-instruct-draft-4l", "bundled": True, "layers": 4}
    assert profile_models(_manifest(bundled, draft)) == (None, None)
    other = {"name": "org/m", "bundled": False}
    assert profile_models(_manifest(other, {"name": "org/d", "bundled": False})) == (
        "org/m", "org/d")  # fmt: skip
    earlier = _manifest("/root/.cache/latency-tts/models/smollm2-135m-instruct",
                        {"path": "/root/.cache/latency-tts/models/smollm2-135m-instruct-draft-4l",
                         "layers": 4})  # fmt: skip
    assert profile_models(earlier) == (None, None)
    assert profile_models(_manifest("org/m", None)) == ("org/m", None)
