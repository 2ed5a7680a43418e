"""Bundled model conversion: cached safetensors folders, a smaller self-draft, clear errors."""

from __future__ import annotations

import json

import pytest

from engine.model_assets import ensure_draft_model, ensure_target_model, resolve_model


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
