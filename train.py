"""Train the latency-aware test-time-scaling policy on a profile, then evaluate it on MATH-500.

    python train.py                      # the bundled default profile, default settings
    python train.py --profile NAME_OR_DIR --deadlines 2 4 8 --timesteps 200000 --seed 1

Reads top to bottom, like CleanRL's ppo.py: the arguments (``Args``, parsed by tyro); the
profile, its deadline grid and the training problems held back for validation; the featurizer
and the replay environments; the static baselines; PPO, warm-started from the best static
allocation; learning with evaluation and checkpoint callbacks (TensorBoard and Weights & Biases
logs); keeping the model validation supports and saving it; evaluating it against the
baselines on the held-out MATH-500 problems; the report.  Numbers from a synthetic profile say
so.

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

import numpy as np
import torch
import tyro
from stable_baselines3 import PPO
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import VecEnv

from env.backends.replay import ReplayBackend, choose_spec_method
from env.config import DEFAULT_BUDGET_GRID, EnvConfig
from env.features import ProblemFeaturizer
from env.profiles.store import Profile, load_profile
from env.tts_env import DEFAULT_PROFILE, LatencyTTSEnv
from policies.baselines import default_deadlines, fit_statics
from policies.evaluate import evaluate_policy, make_live_backend, print_report, write_report
from policies.ppo_training import (
    imitate,
    init_wandb,
    make_callbacks,
    make_vec_env,
    select_on_validation,
)
from policies.saved_policy import load_policy, save_policy


@dataclass
class Args:
    """Train the allocation policy with PPO on a replayed profile, then evaluate it on MATH-500."""

    profile: str = DEFAULT_PROFILE
    """profile name (under data/profiles) or folder to replay"""
    deadlines: tuple[float, ...] | None = None
    """evaluation deadlines in seconds (default: a grid spanning where (n, k) matters)"""
    timesteps: int = 150_000
    """PPO environment steps"""
    train_deadlines: Literal["grid", "range"] = "grid"
    """train on the evaluation deadlines ('grid') or on the continuous range around them"""
    seed: int = 0
    wandb: Literal["online", "offline", "disabled"] = "offline"
    """Weights & Biases mode (offline runs are kept under <out>/wandb for `wandb sync`)"""
    wandb_project: str = "latency-tts"
    out: str | None = None
    """output folder (default runs/<profile>-seed<seed>-<time>)"""
    spec_method: str | None = None
    """speculative method whose k the policy chooses (default: the profile's fastest)"""
    latency_cost: float = 0.01
    """reward penalty per unit of latency / deadline"""
    budgets: tuple[float, ...] = DEFAULT_BUDGET_GRID
    """shares of the deadline a call may use (must include 1; '1' alone: always wait)"""
    n_envs: int = 8
    n_steps: int = 128
    batch_size: int = 256
    n_epochs: int = 5
    learning_rate: float = 1e-4
    ent_coef: float = 0.0
    net_width: int = 64
    """units in each of the two hidden layers of the actor and the critic"""
    val_problems: int = 1000
    """training problems held back for validation (at most a fifth of them)"""
    static_problems: int = 2000
    """training problems the static baselines are chosen on"""
    warm_start: Literal["static_best", "none"] = "static_best"
    """'static_best': first imitate the best static allocation over the whole action space"""
    imitation_samples: int = 30_000
    """warm-start episodes"""
    eval_every: int = 50_000
    """validate (and checkpoint) every this many environment steps"""
    eval_repeats: int = 4
    """MATH-500 draws per problem and deadline in the final evaluation"""
    init_policy: str | None = None
    """continue training this saved policy folder (fine-tuning) instead of starting afresh"""
    live: bool = False
    """train and evaluate on the live engine (slow: seconds per step)"""
    limit: int | None = None
    """with --live: the number of problems to use"""


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

    A little over 60 lines on purpose: the run should read top to bottom in one place, as in
    CleanRL; each step is one call or a few, and the helpers below hold the details.
    """
    clock = Stopwatch()
    torch.set_num_threads(1)
    set_random_seed(args.seed)

    # Profile, deadlines, and the training problems held back for validation (model selection).
    profile = load_profile(args.profile)
    method = args.spec_method or choose_spec_method(profile)
    out = Path(args.out or f"runs/{profile.name}-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    clock.say(f"profile: {profile.label}; speculative method: {method}; output: {out}")
    deadlines = args.deadlines or default_deadlines(ReplayBackend(profile, "train", method))
    clock.say(f"evaluation deadlines (s): {deadlines}")
    fit_ids, val_ids = hold_out_validation(profile, args.val_problems, args.seed)

    # Environments: PPO trains on replay of the fitting problems (or on the live engine), and
    # validates on a fixed sweep of the held-back training problems at the evaluation deadlines.
    featurizer, config = featurizer_and_config(args, profile, fit_ids, deadlines)
    clock.say("featurizer held-out R^2:", json.dumps(featurizer.meta.get("holdout_r2", {})))
    fit_backend = ReplayBackend(profile, "train", method, ids=fit_ids)
    replay_env = train_env = LatencyTTSEnv(fit_backend, featurizer, config)
    if args.live:  # slow: seconds per step
        train_env = LatencyTTSEnv(make_live_backend(args.limit, "train"), featurizer, config)
    vec_env = make_vec_env(train_env.clone, args.n_envs, args.seed)
    val_config = dataclasses.replace(config, sweep_deadlines_s=deadlines, sweep_seed=args.seed)
    val_backend = ReplayBackend(profile, "train", method, ids=val_ids)
    val_env = LatencyTTSEnv(val_backend, featurizer, val_config)

    # The baselines to beat, chosen on the training problems: the published static best
    # (n, k) and the static best (n, k, budget), which also teaches the warm start.
    statics = fit_statics(fit_backend, replay_env.grids, deadlines, args.static_problems, args.seed)
    for static in statics.allocators:
        clock.say(f"{static.name} (n, k, budget) per deadline:", static.table)

    # Model: PPO (or the policy to fine-tune), warm-started by imitating the static table.
    run = init_wandb(args.wandb, args.wandb_project, out.name, dataclasses.asdict(args), out)
    model = build_model(args, vec_env, out)
    if args.warm_start == "static_best" and not args.init_policy:
        teacher = statics.best_over_all_actions
        p = imitate(model, replay_env, teacher, deadlines, args.imitation_samples, seed=args.seed)
        clock.say(f"warm start: the actor gives {teacher.name}'s actions p = {p:.2f}")
    model.save(out / "start_model.zip")  # before any PPO update, for the selection below

    # Learn.
    eval_every = args.timesteps + 1 if args.live else args.eval_every  # live: no mid-run eval
    callbacks = make_callbacks(val_env, out, eval_every, args.eval_every, args.n_envs)
    model.learn(args.timesteps, callback=callbacks, tb_log_name="ppo", progress_bar=True)
    trained_s = clock.elapsed()

    # Keep a fine-tuned model only if paired validation shows it beats where training started.
    chosen, model, validation = keep_validated(args, model, out, val_env, deadlines)
    clock.say("validation:", json.dumps(validation), f"-> keeping {chosen!r}")
    info = policy_info(args, profile, method, deadlines, chosen, validation, trained_s)
    policy_dir = save_policy(out / "policy", model, featurizer, val_env.resolved_config, info)

    # Evaluate on the held-out MATH-500 problems against every baseline, and report.
    live = make_live_backend(args.limit, "test") if args.live else None
    repeats = 1 if args.live else args.eval_repeats
    policy = load_policy(policy_dir)
    report = evaluate_policy(policy, profile, deadlines, repeats, args.seed, live, statics)
    report["train_seconds"] = round(trained_s, 1)
    publish(report, out, policy_dir, run)
    clock.say("done")
    return report


def publish(report: dict, out: Path, policy_dir: Path, run) -> None:
    """Write ``report.json`` and ``report.png`` into ``out``, print the table and where
    everything went, and close the W&B ``run`` with the headline figures."""
    json_path, png_path = write_report(report, out)
    print_report(report)
    summary = report["summary"]
    run.summary.update(
        {
            "gap_closed": summary.get("gap_closed"),
            "policy_never_below_static": summary["policy_never_below_static"],
        }
    )
    run.finish()
    print(f"report: {json_path}\nplot:   {png_path}\npolicy: {policy_dir}")


def hold_out_validation(
    profile: Profile, val_problems: int, seed: int
) -> tuple[set[str], set[str]]:
    """Ids of the training problems to fit and train on, and of those held back for validation
    (``val_problems``, at most a fifth of them)."""
    train_ids = [r["id"] for r in profile.split("train")]
    rng = np.random.default_rng(seed)
    val_ids = set(rng.choice(train_ids, min(val_problems, len(train_ids) // 5), replace=False))
    return {i for i in train_ids if i not in val_ids}, val_ids


def featurizer_and_config(
    args: Args, profile: Profile, fit_ids: set[str], deadlines: tuple[float, ...]
) -> tuple[ProblemFeaturizer, EnvConfig]:
    """The observation featurizer and environment settings: the fine-tuned policy's own, or a
    featurizer fitted on the fitting problems with deadlines scaled a little beyond the grid."""
    if args.init_policy:
        start = load_policy(args.init_policy)
        return start.featurizer, start.env_config
    deadline_range = (min(deadlines) / 1.25, max(deadlines) * 1.25)
    fit_rows = [r for r in profile.split("train") if r["id"] in fit_ids]
    featurizer = ProblemFeaturizer.fit(fit_rows, deadline_range, seed=args.seed)
    config = EnvConfig(
        deadline_range_s=deadline_range,
        deadline_choices_s=deadlines if args.train_deadlines == "grid" else None,
        latency_cost=args.latency_cost,
        budget_grid=tuple(sorted(float(b) for b in args.budgets)),
    )
    return featurizer, config


def build_model(args: Args, vec_env: VecEnv, out: Path) -> PPO:
    """PPO with an MLP actor and critic, or the saved policy to fine-tune, logging to
    TensorBoard under ``out/tb``."""
    if args.init_policy:
        model = PPO.load(Path(args.init_policy) / "model.zip", env=vec_env, device="cpu")
        model.tensorboard_log = str(out / "tb")
        return model
    return PPO(
        "MlpPolicy",
        vec_env,
        learning_rate=args.learning_rate,
        n_steps=args.n_steps,
        batch_size=args.batch_size,
        n_epochs=args.n_epochs,
        ent_coef=args.ent_coef,
        policy_kwargs={"net_arch": [args.net_width, args.net_width]},
        tensorboard_log=str(out / "tb"),
        seed=args.seed,
        device="cpu",
    )


def keep_validated(
    args: Args, model: PPO, out: Path, val_env: LatencyTTSEnv, deadlines: tuple[float, ...]
) -> tuple[str, PPO, dict[str, dict]]:
    """The model to keep, by name and itself, and the validation statistics of each candidate:
    ``start`` (before PPO), ``final``, or ``best_validation`` (the best on the validation sweep
    during training).  A model that started from a policy (warm start or fine-tuning) is
    replaced only when another beats it on paired validation (``select_on_validation``)."""
    candidates = {"start": PPO.load(out / "start_model.zip", device="cpu"), "final": model}
    if (out / "best_model.zip").is_file():
        candidates["best_validation"] = PPO.load(out / "best_model.zip", device="cpu")
    started_from_policy = args.warm_start != "none" or args.init_policy
    reference = "start" if started_from_policy else None
    chosen, stats = select_on_validation(candidates, val_env, deadlines, reference, seed=args.seed)
    return chosen, candidates[chosen], stats


def policy_info(
    args: Args,
    profile: Profile,
    method: str,
    deadlines: tuple[float, ...],
    chosen: str,
    validation: dict,
    trained_s: float,
) -> dict:
    """What ``policy.json`` records beside the format: where the policy came from and how."""
    return {
        "spec_method": method,
        "profile": {"name": profile.name, "path": str(Path(profile.path).resolve()),
                    "synthetic": profile.synthetic},
        "deadlines_s": list(deadlines),
        "selection": {"kept": chosen, "validation": validation},
        "train": {"timesteps": args.timesteps, "seed": args.seed,
                  "seconds": round(trained_s, 1), "args": dataclasses.asdict(args)},
    }  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(Args))
