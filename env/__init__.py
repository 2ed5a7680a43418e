"""The Gymnasium environment and everything it runs on: backends, profiles, features, grading.

Importing ``env`` registers ``LatencyTTS-v0`` with Gymnasium; the environment module itself is
imported only when ``gymnasium.make`` builds one, so ``import env.grading`` stays light.
"""

from gymnasium.envs.registration import register

register(id="LatencyTTS-v0", entry_point="env.tts_env:LatencyTTSEnv")
