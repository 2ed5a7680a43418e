"""Decision time of race controllers: what one decision costs inside the engine's step loop.

    python -m policies.bench_decisions [--policy DIR] [--races 300] [--out FILE.json]

The live race (``env.backends.live_race``) asks its controller at every branch finish and
checkpoint, on the engine thread, between two engine steps: a decision delays the next step,
so it must stay far below a step's time (target: under 1 ms).  This replays races of the
real CPU profile (``smollm2-135m-cpu``, test problems, deadlines spread over the policy's
range) with a fixed (n, k) and no early stop, so every decision point of the call is visited,
and at each one times ``decide(state)`` (the observation from the race state, then inference)
of every controller on the same state:

- the learned race controller as served (``LearnedController``: the actor network called
  directly under ``torch.inference_mode`` on a preallocated tensor);
- the same model through SB3's ``model.predict`` (what the fast path replaces);
- the rule controllers (margin, ESC, Adaptive-Consistency, static).

``begin`` (prompt features from the text, then inference) runs once per call, before the
engine starts; it is reported too.  So is the server's admission decision
(``policies.admission``, on the same profile's latency model) with 10 to 60 calls in flight
that leave no room: the refusal path, its most expensive (it also predicts when to retry),
predicted afresh and reused (``policies.admission.REFUSAL_REUSE_S``).
The server takes it on its event loop for each request, and a burst of refusals queues behind
it (target: a refusal within 50 ms of 50 clients arriving at once).

The learned policy is ``--policy`` or the default serving policy when that is a race policy;
otherwise an untrained PPO race policy of ``train.py``'s network size on the CPU profile
(timing does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from env.backends.replay import ReplayBackend
from env.backends.replay_race import ReplayRace
from env.paths import policies_dir
from env.profiles.store import load_profile
from policies.learned_controller import LearnedController
from policies.race_controllers import RuleController
from policies.saved_policy import load_race_policy, policy_profile

PROFILE = "smollm2-135m-cpu"
RULES = {
    "margin (m=2)": RuleController("margin", 8, 0, 2),
    "esc (w=3)": RuleController("esc", 8, 0, 3),
    "adaptive_consistency (c=0.9)": RuleController("adaptive_consistency", 8, 0, 0.9),
    "static_best": RuleController("static_best", 8, 0),
}


def learned_policy(folder: str | None) -> tuple[LearnedController, str, ReplayBackend]:
    """The race controller to time, what it is, and the test races to replay: those of the
    profile and speculative method the policy was trained on (a stop-value policy decides at
    branch finishes, and under another profile's timing few branches may finish inside its
    deadlines); of ``PROFILE`` for the untrained stand-in (see the module docstring)."""
    candidate = folder or str(policies_dir() / "default")
    try:
        policy = load_race_policy(candidate)
    except (ValueError, FileNotFoundError):
        if folder:
            raise
        untrained = f"untrained PPO race policy ({candidate}: not v1)"
        return untrained_controller(), untrained, ReplayBackend(PROFILE, "test", "draft_model")
    races = ReplayBackend(policy_profile(policy), "test", policy.info.get("spec_method"))
    return LearnedController.from_saved(policy), f"saved race policy {candidate}", races


def untrained_controller(width: int = 128) -> LearnedController:
    """A PPO race policy as ``train.py`` builds it (MLP width x width), not trained."""
    from stable_baselines3 import PPO

    from env.config import RaceEnvConfig
    from env.features import ProblemFeaturizer
    from env.race_env import RaceEnv

    backend = ReplayBackend(load_profile(PROFILE), "train", "draft_model")
    featurizer = ProblemFeaturizer.fit(backend.profile.split("train"), (2.0, 60.0))
    env = RaceEnv(backend, featurizer, RaceEnvConfig())
    model = PPO("MlpPolicy", env, policy_kwargs={"net_arch": [width, width]}, device="cpu")
    return LearnedController(model, env)


def _timed(fn: Callable[..., object], *args, **kwargs) -> float:
    """Microseconds one call of ``fn(*args, **kwargs)`` took."""
    started = time.perf_counter_ns()
    fn(*args, **kwargs)
    return (time.perf_counter_ns() - started) / 1e3


def time_decisions(
    controller: LearnedController, races: int, seed: int, backend: ReplayBackend
) -> tuple[dict[str, list[float]], list[float]]:
    """Per controller, the microseconds of each ``decide``; and of each learned ``begin``.  For
    a stop-value policy also of its decisions at branch finishes alone (``at finishes``): the
    others return at once, and only these run its network."""
    low, high = controller.featurizer.deadline_range_s
    rng = np.random.default_rng(seed)
    model = controller.model
    sb3 = hasattr(model, "predict")  # a PPO policy; a stop-value policy is only ever served
    extra = "learned (SB3 predict)" if sb3 else "learned (served), at finishes"
    timings: dict[str, list[float]] = {"learned (served)": [], extra: []}
    timings.update({name: [] for name in RULES})
    begins: list[float] = []
    for race_index in range(races):
        p = int(rng.integers(len(backend.problems)))
        deadline = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        race = ReplayRace(backend, p, deadline, np.random.default_rng(race_index))
        begins.append(_timed(controller.begin, backend.problems[p], deadline))
        race.begin(int(rng.choice([2, 4, 8])), int(rng.choice(backend.k_grid)))
        finished = 0
        while not race.done:
            state = race.advance()
            took = _timed(controller.decide, state)
            timings["learned (served)"].append(took)
            if sb3:
                obs = controller.observation(state)
                timings[extra].append(_timed(model.predict, obs, deterministic=True))
            elif state.tally.finished > finished:
                timings[extra].append(took)
            finished = state.tally.finished
            for name, rule in RULES.items():
                timings[name].append(_timed(rule.decide, state))
    return timings, begins


ADMISSION_CALLS = (10, 20, 40, 60)


def time_admission(repeats: int = 50) -> dict[str, list[float]]:
    """Per number of calls in flight, the microseconds of each refused ``Admission.decide``
    (predicted, then reused):
    one-branch calls with 2 to 62 tokens written of 64, each due at its predicted finish plus
    the margin, so none has room for a newcomer."""
    from engine.batch_loop import CallLoad
    from policies.admission import Admission

    model = load_profile(PROFILE).latency_model()

    def admission(loads: list[CallLoad], margin_s: float) -> Admission:
        return Admission(lambda: model, "ngram", lengths=64.0, acceptance=0.2,
                         n_grid=(1, 2, 4, 8), max_batch=64, margin_s=margin_s,
                         in_flight=lambda: loads)  # fmt: skip

    timings = {}
    for count in ADMISSION_CALLS:
        running = [CallLoad(1, 2 + i % 61, 64, 0, float("inf")) for i in range(count)]
        finish = admission([], 0.0).finish_times(running)
        loads = [CallLoad(1, c.tokens_done, 64, 0, t + 0.5) for c, t in zip(running, finish,
                                                                          strict=True)]  # fmt: skip
        busy = admission(loads, 0.5)
        if busy.decide(100, 0, 64, 8.0).admitted:
            raise RuntimeError("the busy engine built for timing admitted a call")
        # a second apart: each refusal predicted afresh; a microsecond apart: reused
        timings[f"admission refusal, {count} calls"] = [
            _timed(busy.decide, 100, 0, 64, 8.0, now=float(i)) for i in range(repeats)
        ]
        timings[f"admission refusal reused, {count} calls"] = [
            _timed(busy.decide, 100, 0, 64, 8.0, now=repeats + i * 1e-6) for i in range(repeats)
        ]
    return timings


def summary(values: list[float], warmup: int = 20) -> dict:
    """Median and 99th percentile in microseconds, after the first ``warmup`` calls."""
    kept = np.asarray(values[warmup:] if len(values) > 2 * warmup else values)
    return {"count": len(kept), "median_us": round(float(np.median(kept)), 1),
            "p99_us": round(float(np.percentile(kept, 99)), 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    """Command line: time the controllers, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", help="race policy folder (default: data/policies/default)")
    parser.add_argument("--races", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    controller, what, backend = learned_policy(args.policy)
    timings, begins = time_decisions(controller, args.races, args.seed, backend)
    timings.update(time_admission())
    report = {
        "policy": what,
        "profile": backend.profile.name,
        "machine": {"processor": platform.processor(), "torch_threads": torch.get_num_threads()},
        "decide": {name: summary(values) for name, values in timings.items()},
        "begin": summary(begins),
    }
    print(f"decision time, {report['decide']['learned (served)']['count']} decision points of "
          f"{args.races} replayed races ({backend.profile.name}); policy: {what}")  # fmt: skip
    print(f"  {'decide (observation + inference)':36s} {'median':>10s} {'p99':>10s}")
    for name, figures in report["decide"].items():
        print(f"  {name:36s} {figures['median_us']:8.1f}us {figures['p99_us']:8.1f}us")
    begin = report["begin"]
    print(f"  {'learned begin (prompt features + inference)':36s}"
          f" {begin['median_us']:8.1f}us {begin['p99_us']:8.1f}us")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
