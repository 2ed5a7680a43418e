"""Shared fixtures: real engines on the bundled model, started once per test session.

Engine tests use the real vLLM build and the real SmolLM2-135M-Instruct; they are slow (an
engine starts in ~10-30 s on 2 cores), so each engine is shared by every test that needs it.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def draft_engine():
    """Engine with the bundled self-speculative draft, k_max = 4, float32."""
    from engine.vllm_engine import EngineConfig, VLLMEngine

    return VLLMEngine(EngineConfig(spec_method="draft_model", k_max=4, max_n=16, max_tokens=48))


@pytest.fixture(scope="session")
def ngram_engine():
    """Engine with n-gram (prompt lookup) speculation, k_max = 4."""
    from engine.vllm_engine import EngineConfig, VLLMEngine

    return VLLMEngine(EngineConfig(spec_method="ngram", k_max=4, max_n=16, max_tokens=48))
