"""Allocation policies: RL training, baselines, evaluation (later: the deployed controller)."""
