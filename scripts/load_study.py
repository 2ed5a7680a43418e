"""Does a policy that sees the engine's load answer more in time than one blind to it?

Served calls share the engine batch with other calls' branches (the load L).  Every step of a
call then runs at batch live + L, which slows it and changes which k pays (speculation pays
less in a big batch; k is engine-wide), so the best (n, k) and stopping point depend on L.
This study replays calls under a load distribution (``env.config.LoadDistribution``, default
``mixed``) and trains two race policies exactly alike, as ``train.py`` does (same featurizer,
environments, PPO settings, seeds and draws), except for what they see and whom they clone:

- load-aware: the observation's ``load`` feature reports L; the warm start clones the tuned
  stopping rule (default ``margin``) tuned per deadline *and load level* (``LoadTable``);
- load-blind: the feature stays 0 (``observe_load=False``); the warm start clones the same
  rule tuned per deadline on the load mixture (the best a controller that cannot see L can
  be told).  It can still infer the load from the measured step time once the call runs.

Both keep the fine-tuned model only when validation under load supports it (as ``train.py``),
and are evaluated on the held-out test problems at the default deadlines, every method under
the same load and branch draws (``policies.race_eval.evaluate_controller``), beside the two
tuned rules they cloned.  Results: a table on the console and ``load_study.json``; numbers from
a synthetic profile carry its label.

    python -m scripts.load_study [--timesteps 100000] [--load mixed] [--profile NAME_OR_DIR]

It lives beside ``train.py`` (in ``scripts/``, not in ``policies/``, which ``train.py`` builds on)
because it reuses ``train.py``'s steps (arguments, validation split, featurizer, model) so both
policies are trained the way the main job trains; like ``train.py`` it is an experiment on top
of ``policies``, and nothing in the package imports it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.utils import set_random_seed

import train
from env.backends.protocol import Outcome, ProblemInfo
from env.backends.replay import ReplayBackend, choose_spec_method
from env.config import LoadDistribution, RaceEnvConfig, call_reward
from env.features import ProblemFeaturizer
from env.profiles.store import load_profile, write_json
from env.race import RaceState
from env.race_env import RaceEnv
from policies.learned_controller import LearnedController
from policies.ppo_training import make_vec_env, select_on_validation, teach
from policies.race_controllers import DeadlineTable, Decision, RaceController
from policies.race_eval import (
    SweepResult,
    default_deadlines,
    evaluate_controller,
    load_rng,
    sweep_rules,
    training_backends,
    tune_controllers,
)

VARIANTS = ("aware", "blind")


@dataclass
class Args(train.Args):
    """Train a load-aware and a load-blind race policy alike; compare them under load."""

    load: str = "mixed"
    """background load distribution (``env.config.LoadDistribution`` spec or preset name)"""
    teacher: Literal["margin", "esc", "adaptive_consistency", "static_best"] = "margin"
    """the stopping rule both warm starts clone (tuned per load level for the aware one)"""
    tune_problems: int = 400
    """training problems the rules are tuned on (at every load level)"""
    val_problems: int = 300
    eval_repeats: int = 2
    wandb: Literal["online", "offline", "disabled"] = "disabled"
    """unused here (the study logs to TensorBoard under <out>/<variant>/tb only)"""


@dataclass
class LoadTable:
    """One controller table per load level, used at the level nearest the call's load (in
    log2(1 + L)): the load-aware tuned rule and teacher.

    :param levels: the load levels (background branches) the tables were tuned at.
    :param tables: a per-deadline controller table per level (stop rules: no budget).
    :param env: replay only: the environment whose current race's load ``begin`` reads when
        not told it (``policies.ppo_training.teach`` asks ``begin(problem, deadline)``).
    """

    levels: Sequence[int]
    tables: Sequence[DeadlineTable]
    name: str = "table"
    env: RaceEnv | None = None
    reads_load = True

    def at(self, background_branches: int) -> DeadlineTable:
        scale = np.log2(1.0 + np.asarray(self.levels, dtype=float))
        return self.tables[int(np.abs(scale - math.log2(1 + background_branches)).argmin())]

    def begin(
        self, problem: ProblemInfo, deadline_s: float, background_branches: int | None = None
    ) -> tuple[int, int]:
        if background_branches is None:
            if self.env is None or self.env.race_state is None:
                raise ValueError("LoadTable.begin needs the load, or an env with a race")
            background_branches = self.env.race_state.background_branches
        self._current = self.at(background_branches)
        return self._current.begin(problem, deadline_s)

    def decide(self, state: RaceState) -> Decision:
        return self._current.decide(state)

    def call_deadline(self, deadline_s: float) -> float:
        return self.tables[0].call_deadline(deadline_s)


def draw_loads(load: LoadDistribution, problems: Sequence[int], repeats: int, seed: int) -> list:
    """The load of every (problem, repeat) draw, in the order the sweeps and evaluations use."""
    return [load.draw(load_rng(seed, p, r)) for p in problems for r in range(repeats)]


def mixture_sweep(sweeps: dict[int, SweepResult], loads: Sequence[int]) -> SweepResult:
    """The sweep of calls under the load mixture: draw j's results come from the sweep at its
    drawn load ``loads[j]`` (every level was swept on the same draws)."""
    loads = np.asarray(loads)
    first = next(iter(sweeps.values()))
    correct, latency = {}, {}
    for config in first.correct:
        correct[config] = first.correct[config].copy()
        latency[config] = first.latency[config].copy()
        for level, sweep in sweeps.items():
            at = loads == level
            correct[config][:, at] = sweep.correct[config][:, at]
            latency[config][:, at] = sweep.latency[config][:, at]
    return SweepResult(first.deadlines_s, correct, latency)


def tune_under_load(
    args: Args,
    backend: ReplayBackend,
    load: LoadDistribution,
    deadlines: Sequence[float],
    config: RaceEnvConfig,
) -> tuple[LoadTable, DeadlineTable, np.ndarray]:
    """The teacher rule tuned per deadline at every load level (the aware table) and on the
    load mixture (the blind table), all on the same training draws, and per deadline how much
    more accurate the aware table is there (``tuned_gain``)."""
    rng = np.random.default_rng(args.seed)
    problems = rng.permutation(len(backend.problems))[: args.tune_problems].tolist()
    sweeps = {
        level: sweep_rules(backend.under_load(level), deadlines, problems, 1, args.seed,
                           config.n_grid, config.k_grid, progress=False)
        for level in load.levels
    }  # fmt: skip
    loads = draw_loads(load, problems, 1, args.seed)
    mixture = mixture_sweep(sweeps, loads)
    name = args.teacher
    tables = [DeadlineTable(deadlines, tune_controllers(sweeps[level])[name], name)
              for level in load.levels]  # fmt: skip
    aware = LoadTable(load.levels, tables, f"{name} per load")
    blind = DeadlineTable(deadlines, tune_controllers(mixture)[name], f"{name} on the mixture")
    return aware, blind, tuned_gain(sweeps, loads, aware, blind)


def tuned_gain(
    sweeps: dict[int, SweepResult], loads: Sequence[int], aware: LoadTable, blind: DeadlineTable
) -> np.ndarray:
    """Per deadline, the accuracy of the per-load tables minus the mixture table's on the
    tuning draws, each draw under its drawn load: in-sample, so about the most that knowing
    the load adds to the tuned rule (what the aware warm start can inherit)."""

    def right(table: DeadlineTable, level: int, d: int, j: int) -> bool:
        c = table.controllers[d]
        return bool(sweeps[level].correct[(c.family, c.threshold, c.n, c.k)][d, j])

    deadlines = range(len(blind.deadlines_s))
    return np.array([np.mean([right(aware.at(level), level, d, j) - right(blind, level, d, j)
                              for j, level in enumerate(loads)]) for d in deadlines])  # fmt: skip


def outcomes_under_load(
    controller: RaceController,
    backend: ReplayBackend,
    deadlines: Sequence[float],
    load: LoadDistribution,
    repeats: int,
    seed: int,
    observe_load: bool = True,
) -> list[list[Outcome]]:
    """Per deadline, the controller's outcomes on every problem x ``repeats`` draws, each
    under its drawn load (the same for every method)."""
    return [evaluate_controller(backend, controller, d, repeats, seed, None, load, observe_load)
            for d in deadlines]  # fmt: skip


def rewards_of(
    outcomes: list[list[Outcome]], deadlines: Sequence[float], cost: float
) -> np.ndarray:
    """Each outcome's reward, flattened over (deadline, draw)."""
    return np.array([call_reward(o, d, cost) for d, row in zip(deadlines, outcomes, strict=True)
                     for o in row])  # fmt: skip


@dataclass
class Study:
    """What both variants share: the replayed splits, featurizer, settings, draws and output.

    :param config: the load-aware environment settings (``load_distribution`` set); the blind
        variant's differ only in ``observe_load``.
    """

    args: Args
    fit: ReplayBackend
    val: ReplayBackend
    test: ReplayBackend
    featurizer: ProblemFeaturizer
    config: RaceEnvConfig
    deadlines: tuple[float, ...]
    load: LoadDistribution
    out: Path
    clock: train.Stopwatch

    def config_of(self, variant: str) -> RaceEnvConfig:
        return dataclasses.replace(self.config, observe_load=variant == "aware")


def build_study(args: Args, clock: train.Stopwatch) -> Study:
    """The profile's splits (the fitting and validation parts of the training problems as in
    ``train.py``, the test problems), deadlines, featurizer and settings under load."""
    load = LoadDistribution.parse(args.load)
    if load is None:
        raise ValueError(f"--load {args.load!r} is no load; the study needs one")
    profile = load_profile(args.profile)
    method = args.spec_method or choose_spec_method(profile)
    out = Path(args.out or f"runs/load-study-{profile.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    fit, val = training_backends(profile, method, args.val_problems, args.seed)
    test = ReplayBackend(profile, "test", method)
    deadlines = tuple(args.deadlines or default_deadlines(fit))
    featurizer, config = train.featurizer_and_config(args, profile, deadlines, fit)
    config = dataclasses.replace(config, load_distribution=args.load)
    pairs = zip(load.levels, load.weights, strict=True)
    shares = ", ".join(f"{level}: {w:.0%}" for level, w in pairs)
    clock.say(f"profile: {profile.label}; method {method}; deadlines {deadlines}; "
              f"load {args.load!r}, background branches {shares}")  # fmt: skip
    return Study(args, fit, val, test, featurizer, config, deadlines, load, out, clock)


def train_variant(study: Study, variant: str, teacher: RaceController) -> BaseAlgorithm:
    """One policy as ``train.py`` trains it: clone ``teacher`` into PPO, fine-tune, and keep
    the fine-tuned model only if validation under load supports it."""
    args, config, out = study.args, study.config_of(variant), study.out / variant
    set_random_seed(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    env = RaceEnv(study.fit, study.featurizer, config)
    if isinstance(teacher, LoadTable):
        teacher = dataclasses.replace(teacher, env=env)
    make_env = functools.partial(RaceEnv, study.fit, study.featurizer, config)
    model = train.build_model(args, make_vec_env(make_env, args.n_envs, args.seed), out)
    agree = teach(model, env, teacher, args.teach_episodes, seed=args.seed)
    study.clock.say(f"{variant}: the warm start repeats {teacher.name!r} {agree:.1%}")
    model.save(out / "start_model.zip")
    model.learn(args.timesteps, tb_log_name="ppo")
    candidates = {"start": PPO.load(out / "start_model.zip", device="cpu"), "final": model}
    val_env = RaceEnv(study.val, study.featurizer, config)
    rewards = {}
    for name, candidate in candidates.items():
        outcomes = outcomes_under_load(LearnedController(candidate, val_env), study.val,
                                       study.deadlines, study.load, 1, args.seed,
                                       config.observe_load)  # fmt: skip
        rewards[name] = rewards_of(outcomes, study.deadlines, config.latency_cost)
    chosen, stats = select_on_validation(rewards, "start")
    study.clock.say(f"{variant}: validation {stats} -> keeping {chosen!r}")
    return candidates[chosen]


def paired(diff: np.ndarray) -> dict:
    """Mean and standard error of paired per-draw differences (the last axis: draws)."""
    return {"mean": float(diff.mean()), "se": float(diff.std(ddof=1) / math.sqrt(diff.size))}


def evaluate_study(study: Study, methods: dict[str, tuple[RaceController, bool]]) -> dict:
    """Every method on the test problems at every deadline under the same load and branch
    draws: accuracy, latency and reward per deadline, accuracy per load level, and the paired
    differences aware - blind of the two policies (standard errors over draws)."""
    args, test, deadlines = study.args, study.test, study.deadlines
    loads = np.asarray(draw_loads(study.load, range(len(test.problems)), args.eval_repeats,
                                  args.seed))  # fmt: skip
    correct, latency, reward = {}, {}, {}
    for name, (controller, observe) in methods.items():
        outcomes = outcomes_under_load(controller, test, deadlines, study.load,
                                       args.eval_repeats, args.seed, observe)  # fmt: skip
        correct[name] = np.array([[o.correct for o in row] for row in outcomes], dtype=float)
        latency[name] = np.array([[o.latency_s for o in row] for row in outcomes])
        reward[name] = rewards_of(outcomes, deadlines, study.config.latency_cost)
        reward[name] = reward[name].reshape(correct[name].shape)
    aware, blind = (f"policy ({v})" for v in VARIANTS)
    rows = [{"deadline_s": d,
             **{name: {"accuracy": float(correct[name][i].mean()),
                       "mean_latency_s": float(latency[name][i].mean()),
                       "mean_reward": float(reward[name][i].mean())} for name in methods},
             "aware_minus_blind": {"accuracy": paired(correct[aware][i] - correct[blind][i]),
                                   "reward": paired(reward[aware][i] - reward[blind][i])}}
            for i, d in enumerate(deadlines)]  # fmt: skip
    by_load = {int(level): {name: float(correct[name][:, loads == level].mean())
                            for name in methods} for level in study.load.levels}  # fmt: skip
    over_deadlines = {"accuracy": paired((correct[aware] - correct[blind]).mean(axis=0)),
                      "reward": paired((reward[aware] - reward[blind]).mean(axis=0))}  # fmt: skip
    return {"profile": {"label": test.name, "synthetic": test.synthetic},
            "load": {"spec": args.load, "levels": list(study.load.levels),
                     "weights": list(study.load.weights)},
            "methods": list(methods),
        "draws_per_deadline": len(loads), "deadlines": rows, "accuracy_by_load": by_load,
            "aware_minus_blind": over_deadlines, "args": dataclasses.asdict(args)}  # fmt: skip


def print_study(report: dict) -> None:
    """The accuracy table per deadline (with the policies' mean latency), then per load."""
    rows = report["deadlines"]
    names = report["methods"]
    print(
        f"\nAccuracy within the deadline under load {report['load']['spec']!r} "
        f"({report['draws_per_deadline']} draws per deadline), {report['profile']['label']}"
    )
    print(f"{'deadline s':>10} " + " ".join(f"{n:>18}" for n in names)
          + "   aware - blind (pts)   latency s aware / blind")  # fmt: skip
    for row in rows:
        cells = " ".join(f"{row[n]['accuracy']:>18.3f}" for n in names)
        gap = row["aware_minus_blind"]["accuracy"]
        times = "/".join(f"{row[f'policy ({v})']['mean_latency_s']:.3f}" for v in VARIANTS)
        print(f"{row['deadline_s']:>10.3g} {cells}   "
              f"{100 * gap['mean']:+6.2f} +- {100 * gap['se']:.2f}   {times:>22}")  # fmt: skip
    for what, gap in report["aware_minus_blind"].items():
        print(f"mean over deadlines, aware - blind {what}: "
              f"{100 * gap['mean']:+.2f} +- {100 * gap['se']:.2f} pts")  # fmt: skip
    if "tuned_gain_in_sample" in report:
        gain = 100 * report["tuned_gain_in_sample"]["mean"]
        print(
            f"tuned rule per load - on the mixture, accuracy on the tuning draws: {gain:+.2f} pts"
        )
    print("\nAccuracy by background load (mean over deadlines)")
    for level, accuracy in report["accuracy_by_load"].items():
        print(f"{level:>10} " + " ".join(f"{accuracy[n]:>18.3f}" for n in names))


def main(args: Args) -> dict:
    """Tune, train both variants, evaluate, report (see the module docstring)."""
    clock = train.Stopwatch()
    torch.set_num_threads(1)
    study = build_study(args, clock)
    aware_rule, blind_rule, gain = tune_under_load(args, study.fit, study.load, study.deadlines,
                                                   study.config)  # fmt: skip
    clock.say(f"tuned {args.teacher} per load and on the mixture; per load is "
              f"{100 * gain.mean():+.2f} pts more accurate on the tuning draws")  # fmt: skip
    teachers = {"aware": aware_rule, "blind": blind_rule}
    methods: dict[str, tuple[RaceController, bool]] = {}
    for variant in VARIANTS:
        model = train_variant(study, variant, teachers[variant])
        test_env = RaceEnv(study.test, study.featurizer, study.config_of(variant))
        name = f"policy ({variant})"
        methods[name] = (LearnedController(model, test_env, name=name), variant == "aware")
    methods[f"{args.teacher} per load"] = (aware_rule, True)
    methods[f"{args.teacher} on mixture"] = (blind_rule, False)
    report = evaluate_study(study, methods)
    report["tuned_gain_in_sample"] = {"per_deadline": gain.tolist(), "mean": float(gain.mean())}
    report["seconds"] = round(clock.elapsed(), 1)
    print_study(report)
    path = study.out / "load_study.json"
    write_json(path, report)
    print(f"\nreport: {path}")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
