"""Benchmark: replay environment steps per second in one process (target >= 5,000).

Training's budget depends on it: PPO needs a few hundred thousand episodes within minutes.
One step here is a full episode, ``reset()`` plus ``step()`` with a uniformly random
(n, k, budget), through ``gymnasium.make("LatencyTTS-v0")`` (so Gymnasium's wrappers are
included) and on the bare environment.

    python -m env.bench_replay [--profile NAME_OR_DIR] [--steps 50000]
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np

from env.backends.replay import ReplayBackend
from env.config import ENV_ID, EnvConfig
from env.features import ProblemFeaturizer
from env.profiles.store import load_profile
from env.tts_env import DEFAULT_PROFILE  # importing env.tts_env registers LatencyTTS-v0


def steps_per_second(environment: gym.Env, steps: int, seed: int = 0) -> float:
    """Episodes (reset + step) per second with random actions drawn in advance."""
    rng = np.random.default_rng(seed)
    actions = rng.integers(
        0, environment.action_space.nvec, size=(steps, len(environment.action_space.nvec))
    )
    environment.reset(seed=seed)
    start = time.perf_counter()
    for action in actions:
        environment.reset()
        environment.step(action)
    return steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default=DEFAULT_PROFILE, help="profile name or folder")
    parser.add_argument("--steps", type=int, default=50_000)
    args = parser.parse_args(argv)

    profile = load_profile(args.profile)
    backend = ReplayBackend(profile, "train")
    featurizer = ProblemFeaturizer.fit(profile.split("train")[:1000], (1.0, 60.0))
    made = gym.make(ENV_ID, backend=backend, featurizer=featurizer, config=EnvConfig())
    results = {
        "gymnasium.make": steps_per_second(made, args.steps),
        "bare env": steps_per_second(made.unwrapped, args.steps),
    }
    print(f"profile: {profile.label}; {len(backend.problems)} problems, "
          f"{backend.max_branches} branches each, method {backend.method}")  # fmt: skip
    for name, value in results.items():
        print(f"{name:>15}: {value:,.0f} env steps/s (one step = reset + step)")
    return results


if __name__ == "__main__":
    main()
