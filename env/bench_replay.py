"""Benchmark: replayed race decisions per second in one process (target >= 5,000).

Training's budget depends on it: PPO needs a few hundred thousand decisions within minutes.
One decision is one ``step()`` of ``LatencyTTS-v1`` (the start, or a decision point later in
the race) with a uniformly random action; ``reset()`` is counted in the time but not as a
decision.  Measured through ``gymnasium.make`` (so Gymnasium's wrappers are included) and on
the bare environment.

    python -m env.bench_replay [--profile NAME_OR_DIR] [--decisions 50000]
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np

from env.backends.replay import ReplayBackend
from env.config import RACE_ENV_ID, RaceEnvConfig
from env.features import ProblemFeaturizer
from env.profiles.store import load_profile
from env.race_env import DEFAULT_PROFILE  # importing env.race_env registers LatencyTTS-v1


def decisions_per_second(environment: gym.Env, decisions: int, seed: int = 0) -> float:
    """Decisions per second with random actions drawn in advance (resets included in time)."""
    rng = np.random.default_rng(seed)
    nvec = environment.action_space.nvec
    actions = rng.integers(0, nvec, size=(decisions, len(nvec)))
    environment.reset(seed=seed)
    done = True
    start = time.perf_counter()
    for action in actions:
        if done:
            environment.reset()
        done = environment.step(action)[2]
    return decisions / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default=DEFAULT_PROFILE, help="profile name or folder")
    parser.add_argument("--decisions", type=int, default=50_000)
    args = parser.parse_args(argv)

    profile = load_profile(args.profile)
    backend = ReplayBackend(profile, "train")
    featurizer = ProblemFeaturizer.fit(profile.split("train")[:1000], (0.2, 3.0))
    config = RaceEnvConfig(deadline_range_s=(0.2, 3.0))
    made = gym.make(RACE_ENV_ID, backend=backend, featurizer=featurizer, config=config)
    results = {
        "gymnasium.make": decisions_per_second(made, args.decisions),
        "bare env": decisions_per_second(made.unwrapped, args.decisions),
    }
    print(f"profile: {profile.label}; {len(backend.problems)} problems, "
          f"calls of up to {backend.max_branches} of {backend.recorded_branches} recorded "
          f"branches, method {backend.method}")  # fmt: skip
    for name, value in results.items():
        print(f"{name:>15}: {value:,.0f} decisions/s ({RACE_ENV_ID}, random actions)")
    return results


if __name__ == "__main__":
    main()
