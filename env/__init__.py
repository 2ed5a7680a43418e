"""The Gymnasium environment and everything it runs on.

Top level: the environment (``tts_env``), its settings and reward (``config``), what a call gets
and what a controller sees (``allocation``), its observation features (``features``) and the
latency model (``latency_model``).  Sub-packages own one concern each: ``backends`` (protocol,
replay, live), ``task`` (MATH data, prompt, grading, voting), ``profiles`` (store, record,
calibrate, validate) and ``synthetic`` (the calibrated synthetic profile generator).

Importing ``env.tts_env`` registers the environment's Gymnasium ids (``LatencyTTS-v0`` for
replay, ``LatencyTTSLive-v0`` for the live engine; ``gymnasium.make("env.tts_env:LatencyTTS-v0")``
imports it for you).  This package itself imports nothing, so the serving path, which needs
``env.allocation``, ``env.config`` and ``env.features``, loads neither Gymnasium nor the data
stack.
"""
