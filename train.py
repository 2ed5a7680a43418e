"""Train the race controller on a profile, then evaluate it on MATH-500 against every baseline.

    python train.py                      # the bundled default profile, default settings
    python train.py --profile NAME_OR_DIR --deadlines 0.3 0.6 1.2 --seed 1
    python train.py --learner ppo --timesteps 200000    # the PPO race policy instead

Reads top to bottom, like CleanRL's ppo.py: the arguments (``Args``, parsed by tyro); the
profile, its deadline grid and the training problems held back for validation; the baselines
tuned per deadline on the training problems (the published static table, the budget table,
ESC, Adaptive-Consistency, the margin rule); the featurizer and the race environments
(``LatencyTTS-v1``: the policy decides while each call runs); the learner; saving the policy;
evaluating everything on the held-out MATH-500 problems; the report.  Numbers from a synthetic
profile say so.

Two learners (``--learner``).  The default, ``stop_value`` (``policies.stop_value``), fits a
value network on counterfactual replays (at each branch finish: what answering now and what
waiting would give) and tunes n, k, a stop price and a budget per deadline on training
problems (at the grid's deadlines and ``--value.between`` more between each two, so that any
deadline in the grid's range has a setting tuned near it), then (``--value.objective lead``,
the default) re-tunes them for the largest saving against the tuned heuristics within both
accuracy floors, on the tuning draws and on the held-out validation problems
(``--value.validation-repeats``); it beat the PPO policy on every target of issue 13 on the
synthetic profile.
``ppo`` is Stable-Baselines3 PPO warm-started by cloning the best tuned heuristic, with
checkpoints, TensorBoard and Weights & Biases logs, keeping the fine-tuned model only when
validation supports it: its 0/1 rewards were too noisy to improve on the clone.

Recording a profile of a real model on the live engine is a job of its own
(``python -m env.profiles.record``, resumable); train on the result with ``--profile FOLDER``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CallbackList, CheckpointCallback
from stable_baselines3.common.utils import set_random_seed

from env.backends.replay import ReplayBackend, choose_spec_method
from env.config import RaceEnvConfig
from env.features import ProblemFeaturizer
from env.profiles.store import Profile, load_profile
from env.race_env import DEFAULT_PROFILE, RaceEnv
from policies.confidence_fit import Args as ConfidenceArgs
from policies.confidence_fit import main as confidence_main
from policies.evaluate import (
    EVAL_REPEATS,
    HEURISTICS,
    evaluate_methods,
    plot_middle_races,
    print_report,
    write_report,
)
from policies.learned_controller import LearnedController
from policies.ppo_training import (
    OutcomeLoggerCallback,
    init_wandb,
    make_vec_env,
    select_on_validation,
    teach,
    validation_rewards,
)
from policies.race_controllers import DeadlineTable
from policies.race_eval import (
    BASELINE_TUNING_REPEATS,
    SweepResult,
    default_deadlines,
    training_backends,
    tune_controllers,
    tuning_problem_indices,
    tuning_sweep,
)
from policies.retune import tune_for_lead, validation_draws
from policies.saved_policy import load_race_policy, save_race_policy
from policies.stop_value import StopValuePolicy
from policies.stop_value_training import (
    StopValueArgs,
    TuningReplay,
    learn_stop_value,
    tuning_deadlines,
)


@dataclass
class Args:
    """Train the race controller with PPO on a replayed profile, then evaluate it on MATH-500."""

    profile: str = DEFAULT_PROFILE
    """profile name (under data/profiles) or folder to replay"""
    learner: Literal["stop_value", "ppo"] = "stop_value"
    """stop_value: value regression on counterfactual replays, settings tuned per deadline;
    ppo: PPO warm-started by cloning a tuned heuristic (the options below marked PPO)"""
    deadlines: tuple[float, ...] | None = None
    """evaluation deadlines in seconds (default: a grid spanning where (n, k) matters)"""
    timesteps: int = 100_000
    """PPO decisions after the warm start (PPO)"""
    seed: int = 0
    wandb: Literal["online", "offline", "disabled"] = "offline"
    """Weights & Biases mode (offline runs are kept under <out>/wandb for `wandb sync`)"""
    wandb_project: str = "latency-tts"
    out: str | None = None
    """output folder (default runs/<profile>-seed<seed>-<time>)"""
    spec_method: str | None = None
    """speculative method whose k the policy chooses (default: the profile's fastest)"""
    latency_cost: float = 0.1
    """reward penalty per unit of latency / deadline (0.1: a tenth of the deadline is worth a
    point of accuracy)"""
    n_envs: int = 8
    n_steps: int = 256
    batch_size: int = 512
    n_epochs: int = 5
    learning_rate: float = 3e-5
    ent_coef: float = 0.0
    net_width: int = 128
    """units in each of the two hidden layers of the actor and the critic"""
    val_problems: int = 600
    """training problems held back for validation (at most a fifth of them)"""
    tune_problems: int = 2000
    """training problems the baselines are tuned on"""
    teacher: Literal[
        "best_heuristic", "margin", "esc", "adaptive_consistency", "static_best", "none"
    ] = "best_heuristic"
    """warm start: clone this tuned controller (best_heuristic: the heuristic with the best
    validation reward; static_best: wait for the deadline or the decided vote)"""
    teach_episodes: int = 6000
    """warm-start races (PPO)"""
    checkpoint_every: int = 50_000
    """save a checkpoint every this many decisions (PPO)"""
    value: StopValueArgs = dataclasses.field(default_factory=StopValueArgs)
    """the stop-value learner's fitting and tuning (stop_value)"""
    eval_repeats: int = EVAL_REPEATS
    """MATH-500 draws per problem and deadline in the final evaluation (``EVAL_REPEATS``)"""


class Stopwatch:
    """Prints progress lines stamped with the seconds since the run started."""

    def __init__(self) -> None:
        self.started = time.time()

    def elapsed(self) -> float:
        return time.time() - self.started

    def say(self, *parts: object) -> None:
        print(f"[{self.elapsed():4.0f} s]", *parts, flush=True)


def main(args: Args) -> dict:
    """The whole run (see the module docstring); returns the evaluation report.

    About 75 lines on purpose: the run should read top to bottom in one place, as in CleanRL;
    each step is one call or a few, and the helpers below hold the details.
    """
    clock = Stopwatch()
    torch.set_num_threads(1)
    set_random_seed(args.seed)

    # Profile, deadlines, and the training problems held back for validation (model selection).
    profile = load_profile(args.profile)
    method = args.spec_method or choose_spec_method(profile)
    out = Path(args.out or f"runs/{profile.name}-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    clock.say(f"profile: {profile.label}; speculative method: {method}; output: {out}")
    fit_backend, val_backend = training_backends(profile, method, args.val_problems, args.seed)
    deadlines = args.deadlines or default_deadlines(fit_backend)
    clock.say(f"evaluation deadlines (s): {deadlines}")

    # The race settings: deadlines log-uniform around the grid so the policy also works between
    # its points; the prompt featurizer fitted on the fitting problems.
    featurizer, config = featurizer_and_config(args, profile, deadlines, fit_backend)

    # The baselines to beat, tuned per deadline on the training problems; for the stop-value
    # settings also at deadlines between the grid's (the floors they are tuned against there).
    between = args.value.between if args.learner == "stop_value" else 0
    tuning_grid = tuning_deadlines(deadlines, between)
    sweep = tuning_sweep(fit_backend, tuning_grid, args.tune_problems, BASELINE_TUNING_REPEATS,
                         args.seed, config.n_grid, config.k_grid)  # fmt: skip
    tuned = tune_controllers(sweep)
    on_grid = [tuning_grid.index(d) for d in deadlines]
    baselines = {name: [rows[i] for i in on_grid] for name, rows in tuned.items()}
    for name, table in baselines.items():
        clock.say(f"{name} (n, k, threshold) per deadline:",
                  [(c.n, c.k, c.threshold) for c in table])  # fmt: skip

    # Learn: the stop-value policy (default) or PPO, then the validation figures.
    run = init_wandb(args.wandb, args.wandb_project, out.name, dataclasses.asdict(args), out)
    if args.learner == "stop_value":
        model, learned = learn_stop_value(fit_backend, featurizer, config.n_grid,
                                          tuning_grid, config.deadline_range_s, args.value,
                                          args.seed)  # fmt: skip
        if args.value.objective == "lead":
            model = lead_tuned(model, args, featurizer, config, fit_backend, val_backend, tuned,
                               sweep, learned)  # fmt: skip
            clock.say(lead_tuning_summary(model.info["lead_tuning"]))
        clock.say("stop-value settings (n, k, price, budget) per tuning deadline:",
                  {d: (s.n, s.k, s.price, round(s.budget, 3))
                   for d, s in zip(tuning_grid, model.settings, strict=True)})  # fmt: skip
        selection = validate_stop_value(model, baselines, val_backend, featurizer, config,
                                        deadlines, args.seed)  # fmt: skip
    else:
        model, selection = learn_ppo(args, fit_backend, val_backend, baselines, featurizer,
                                     config, deadlines, out, clock)  # fmt: skip
    trained_s = clock.elapsed()
    clock.say("validation:", json.dumps(selection))
    info = policy_info(args, profile, method, deadlines, selection, trained_s, baselines)
    info["race_scales"] = [fit_backend.max_branches, max(fit_backend.k_grid)]  # observation scales
    policy_dir = save_race_policy(out / "policy", model, featurizer, config, info)
    calibration = fit_confidence_of(policy_dir, out / "confidence", args.seed)
    clock.say("answer confidence:", calibration["summary"])

    # Evaluate on the held-out MATH-500 problems against every baseline, and report.
    policy = load_race_policy(policy_dir)
    test_backend = ReplayBackend(profile, "test", method)
    test_env = RaceEnv(test_backend, policy.featurizer, policy.env_config)
    methods = {"policy": LearnedController(policy.model, test_env), **baselines}
    report = evaluate_methods(methods, test_backend, deadlines, args.eval_repeats, args.seed,
                              config.latency_cost)  # fmt: skip
    report["train_seconds"] = round(trained_s, 1)
    report["confidence"] = calibration
    races = plot_middle_races(test_backend, methods["policy"], baselines, deadlines, out, args.seed)
    publish(report, out, policy_dir, run, races)
    clock.say("done")
    return report


def learn_ppo(
    args: Args,
    fit_backend: ReplayBackend,
    val_backend: ReplayBackend,
    baselines: dict,
    featurizer: ProblemFeaturizer,
    config: RaceEnvConfig,
    deadlines: tuple[float, ...],
    out: Path,
    clock: Stopwatch,
) -> tuple[PPO, dict]:
    """PPO on the replayed races, warm-started by cloning the teacher, kept over the warm
    start only if paired validation shows it beats it; returns the model and the selection."""
    env = RaceEnv(fit_backend, featurizer, config)
    vec_env = make_vec_env(lambda: RaceEnv(fit_backend, featurizer, config), args.n_envs, args.seed)
    teacher_name = choose_teacher(args, baselines, val_backend, deadlines, config)
    teacher = DeadlineTable(deadlines, baselines[teacher_name], teacher_name)
    model = build_model(args, vec_env, out)
    if args.teacher != "none":
        agree = teach(model, env, teacher, args.teach_episodes, seed=args.seed)
        clock.say(f"warm start: the actor repeats {teacher_name}'s decisions {agree:.1%}")
    model.save(out / "start_model.zip")  # before any PPO update, for the selection below
    checkpoints = CheckpointCallback(max(args.checkpoint_every // args.n_envs, 1),
                                     str(out / "checkpoints"), name_prefix="policy")  # fmt: skip
    callbacks = CallbackList([OutcomeLoggerCallback(), checkpoints])
    model.learn(args.timesteps, callback=callbacks, tb_log_name="ppo", progress_bar=True)
    start = PPO.load(out / "start_model.zip", device="cpu")
    candidates = {"start": start, "final": model}
    controllers = {name: LearnedController(m, RaceEnv(val_backend, featurizer, config))
                   for name, m in candidates.items()}  # fmt: skip
    rewards = validation_rewards(controllers, val_backend, deadlines, config.latency_cost,
                                 args.seed)  # fmt: skip
    chosen, validation = select_on_validation(rewards, "start")
    clock.say(f"PPO: keeping {chosen!r}")
    selection = {"learner": "ppo", "teacher": teacher_name, "kept": chosen,
                 "validation": validation}  # fmt: skip
    return candidates[chosen], selection


def lead_tuned(
    model: StopValuePolicy,
    args: Args,
    featurizer: ProblemFeaturizer,
    config: RaceEnvConfig,
    fit_backend: ReplayBackend,
    val_backend: ReplayBackend,
    tuned: dict,
    sweep: SweepResult,
    learned: TuningReplay,
) -> StopValuePolicy:
    """The stop-value settings re-tuned for the lead over the heuristics on the draws the
    baselines were tuned on (``policies.retune.tune_for_lead``), at the model's tuning
    deadlines (``sweep``: the baselines' tuning sweep there, reused; ``tuned``: the baselines
    tuned on it; ``learned``: the learner's replay of its tuning draws, reused where they are
    these draws), each checked against both floors on the held-out validation problems too
    (``--value.validation-repeats`` draws each)."""
    problems = tuning_problem_indices(args.tune_problems, len(fit_backend.problems), args.seed)
    validation = validation_draws(model, featurizer, config, val_backend,
                                  args.value.validation_repeats, args.seed, tuned)  # fmt: skip
    return tune_for_lead(model, featurizer, config, fit_backend, problems, args.seed, sweep,
                         tuned, args.value.floor_margin, validation, learned)  # fmt: skip


def lead_tuning_summary(note: dict) -> str:
    """One line on what the lead tuning changed (``info["lead_tuning"]``)."""
    moved, check = note["retuned"], note["validation"]
    line = f"lead tuning: {sum(moved)} of {len(moved)} tuning deadlines re-tuned"
    if check is None:
        return line + " (no validation check)"
    return line + f", each clearing both floors on {check['draws']} validation draws too"


def validate_stop_value(
    model,
    baselines: dict,
    val_backend: ReplayBackend,
    featurizer: ProblemFeaturizer,
    config: RaceEnvConfig,
    deadlines: tuple[float, ...],
    seed: int,
) -> dict:
    """The stop-value policy's validation reward beside each tuned heuristic's, on the same
    draws of the held-back problems (a check recorded in ``policy.json``, not a selection:
    the settings were tuned for accuracy and latency, not for this reward)."""
    controllers = {"stop_value": LearnedController(model, RaceEnv(val_backend, featurizer, config))}
    controllers.update({name: DeadlineTable(deadlines, baselines[name], name)
                        for name in HEURISTICS})  # fmt: skip
    rewards = validation_rewards(controllers, val_backend, deadlines, config.latency_cost, seed)
    _, validation = select_on_validation(rewards, "stop_value")
    return {"learner": "stop_value", "kept": "stop_value", "validation": validation}


def featurizer_and_config(
    args: Args,
    profile: Profile,
    deadlines: tuple[float, ...],
    backend: ReplayBackend,
) -> tuple[ProblemFeaturizer, RaceEnvConfig]:
    """The prompt featurizer fitted on the fitting problems (``backend``'s), and the race
    settings: deadlines log-uniform from a little below to a little above the grid, the
    backend's grids."""
    deadline_range = (min(deadlines) / 1.25, max(deadlines) * 1.25)
    fit_ids = {problem.id for problem in backend.problems}
    fit_rows = [r for r in profile.split("train") if r["id"] in fit_ids]
    featurizer = ProblemFeaturizer.fit(fit_rows, deadline_range, seed=args.seed)
    powers = tuple(2**i for i in range(backend.max_branches.bit_length()))
    config = RaceEnvConfig(
        n_grid=powers,
        k_grid=tuple(backend.k_grid),
        deadline_range_s=deadline_range,
        latency_cost=args.latency_cost,
    )
    return featurizer, config


def choose_teacher(
    args: Args,
    baselines: dict,
    backend: ReplayBackend,
    deadlines: tuple[float, ...],
    config: RaceEnvConfig,
) -> str:
    """The heuristic the warm start clones: the one asked for, or the tuned heuristic with the
    highest validation reward (``best_heuristic``)."""
    if args.teacher not in ("best_heuristic", "none"):
        return args.teacher
    tables = {name: DeadlineTable(deadlines, baselines[name], name) for name in HEURISTICS}
    rewards = validation_rewards(tables, backend, deadlines, config.latency_cost, args.seed)
    return max(rewards, key=lambda name: rewards[name].mean())


def build_model(args: Args, vec_env, out: Path) -> PPO:
    """PPO with an MLP actor and critic (undiscounted: the reward comes at the call's end),
    logging to TensorBoard under ``out/tb``."""
    return PPO(
        "MlpPolicy",
        vec_env,
        learning_rate=args.learning_rate,
        n_steps=args.n_steps,
        batch_size=args.batch_size,
        n_epochs=args.n_epochs,
        gamma=1.0,
        ent_coef=args.ent_coef,
        policy_kwargs={"net_arch": [args.net_width, args.net_width]},
        tensorboard_log=str(out / "tb"),
        seed=args.seed,
        device="cpu",
    )


def policy_info(
    args: Args,
    profile: Profile,
    method: str,
    deadlines: tuple[float, ...],
    selection: dict,
    trained_s: float,
    baselines: dict,
) -> dict:
    """What ``policy.json`` records beside the format: where the policy came from and how."""
    return {
        "spec_method": method,
        "profile": {"name": profile.name, "path": str(Path(profile.path).resolve()),
                    "synthetic": profile.synthetic},
        "deadlines_s": list(deadlines),
        "baselines": {name: [[c.n, c.k, c.threshold] for c in table]
                      for name, table in baselines.items()},
        "selection": selection,
        "train": {"timesteps": args.timesteps, "seed": args.seed,
                  "seconds": round(trained_s, 1), "args": dataclasses.asdict(args)},
    }  # fmt: skip


def fit_confidence_of(policy_dir: Path, out: Path, seed: int) -> dict:
    """Fit the saved policy's answer confidence on its training problems (written into the
    policy folder, ``confidence.json``) and check it on the test split; returns the expected
    calibration error and Brier score (reliability plot in ``out``).  A profile on which no
    call is ever answered (the bundled CPU model never reaches a boxed answer) has nothing to
    fit: the policy then carries no confidence and the summary says why."""
    try:
        report = confidence_main(ConfidenceArgs(policy=str(policy_dir), out=str(out), seed=seed))
    except ValueError as error:
        return {"ece": None, "brier": None, "summary": f"not fitted ({error})"}
    summary = f"ECE {report['ece']:.3f}, Brier {report['brier']:.3f} on the test split"
    return {"ece": report["ece"], "brier": report["brier"], "summary": summary}


def publish(report: dict, out: Path, policy_dir: Path, run, races: Path) -> None:
    """Write the report files into ``out``, print the table and where everything went, and
    close the W&B ``run`` with the headline figures."""
    paths = write_report(report, out)
    print_report(report)
    run.summary.update({"targets": report.get("targets", {})})
    run.finish()
    print("report:", *paths, races, f"\npolicy: {policy_dir}")


if __name__ == "__main__":
    main(tyro.cli(Args))
