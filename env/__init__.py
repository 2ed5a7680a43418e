"""The Gymnasium environment and everything it runs on.

Top level: the environment (``race_env``, ``LatencyTTS-v1``), the state of a call in flight
that every controller reads (``race``), the environment's settings and the one reward
(``config``), the prompt features (``features``) and the latency model (``latency_model``).
Sub-packages own one concern each: ``backends`` (the protocol; replay and the replayed race;
the live race, sample-and-vote on the engine), ``task`` (MATH data, prompt, grading, voting),
``profiles`` (store, record, calibrate, validate) and ``synthetic`` (the calibrated synthetic
profile generator).

Importing ``env.race_env`` registers the environment's Gymnasium id ``LatencyTTS-v1`` (replay
of a recorded profile, event by event; deterministic, so Gymnasium's checker tests that equal
seeds give equal episodes).  Importing ``env`` itself, or the light modules (``env.race``,
``env.config``, ``env.features``), loads neither Gymnasium nor the data stack, so the serving
path stays lean.
"""
