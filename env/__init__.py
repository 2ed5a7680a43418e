"""The Gymnasium environment and everything it runs on.

Top level: the environment (``tts_env``), its observation features (``features``) and the
latency model (``latency_model``).  Sub-packages own one concern each: ``backends`` (protocol,
replay, live), ``task`` (MATH data, prompt, grading, voting), ``profiles`` (store, record,
calibrate, validate) and ``synthetic`` (the calibrated synthetic profile generator).

Importing ``env`` registers ``LatencyTTS-v0`` with Gymnasium; the environment module itself is
imported only when ``gymnasium.make`` builds one, so ``import env.task.grading`` stays light.
"""

from gymnasium.envs.registration import register

register(id="LatencyTTS-v0", entry_point="env.tts_env:LatencyTTSEnv")
