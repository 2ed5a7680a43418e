"""Train the latency-aware test-time-scaling policy on a profile, then evaluate it on MATH-500.

    python train.py                      # the bundled default profile, default settings
    python train.py --profile NAME_OR_DIR --deadlines 2,4,8 --timesteps 200000 --seed 1

Reads top to bottom: arguments; profile (optionally profiling a model first); deadline grid;
featurizer fitted on the training problems; replay environments; PPO; learning with evaluation
and checkpoint callbacks (TensorBoard and Weights & Biases logs); saving the policy; evaluating
it against the baselines on the held-out MATH-500 problems; printing the table and where the
report, plot and policy were written.  Numbers from a synthetic profile say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.utils import set_random_seed

from env.backends.replay import ReplayBackend, choose_spec_method
from env.features import ProblemFeaturizer
from env.profiles.store import load_profile
from env.tts_env import DEFAULT_BUDGET_GRID, DEFAULT_PROFILE, EnvConfig, LatencyTTSEnv
from policies.evaluate import (
    default_deadlines,
    evaluate_policy,
    fit_statics,
    make_live_backend,
    print_report,
    write_report,
)
from policies.ppo_policy import (
    imitate,
    init_wandb,
    load_policy,
    make_callbacks,
    make_vec_env,
    save_policy,
    select_on_validation,
)


@dataclass
class Args:
    profile: str | None = field(
        default=None,
        metadata={
            "help": f"profile name or folder (default {DEFAULT_PROFILE}); with --profile-model, "
            "the folder to record into"
        },
    )
    profile_model: str | None = field(
        default=None,
        metadata={"help": "profile this model (id, folder or 'bundled') on the live engine first"},
    )
    profile_draft: str | None = field(
        default=None, metadata={"help": "with --profile-model: draft model for draft_model"}
    )
    profile_train: int = field(default=24, metadata={"help": "with --profile-model: MATH train"})
    profile_test: int = field(default=24, metadata={"help": "with --profile-model: MATH-500"})
    profile_n_max: int = field(default=8, metadata={"help": "with --profile-model: branches"})
    profile_max_tokens: int = field(
        default=512, metadata={"help": "with --profile-model: tokens per branch"}
    )
    deadlines: str | None = field(
        default=None, metadata={"help": "comma-separated evaluation deadlines, seconds"}
    )
    timesteps: int = field(default=150_000, metadata={"help": "PPO environment steps"})
    train_deadlines: str = field(
        default="grid", metadata={"help": "'grid': the evaluation deadlines; 'range': continuous"}
    )
    seed: int = 0
    wandb: str = field(default="offline", metadata={"help": "online, offline or disabled"})
    wandb_project: str = "latency-tts"
    out: str | None = field(default=None, metadata={"help": "output folder (runs/<name>)"})
    spec_method: str | None = field(
        default=None, metadata={"help": "speculative method (default: the profile's fastest)"}
    )
    latency_cost: float = field(default=0.01, metadata={"help": "reward per latency/deadline"})
    budgets: str = field(
        default=",".join(f"{b:g}" for b in DEFAULT_BUDGET_GRID),
        metadata={"help": "shares of the deadline a call may use (must include 1; '1': none)"},
    )
    n_envs: int = 8
    n_steps: int = 128
    batch_size: int = 256
    n_epochs: int = 5
    learning_rate: float = 1e-4
    ent_coef: float = 0.0
    net_width: int = 64
    val_problems: int = field(default=1000, metadata={"help": "training problems for validation"})
    static_problems: int = field(
        default=2000, metadata={"help": "training problems the static best is chosen on"}
    )
    warm_start: str = field(
        default="static_best",
        metadata={"help": "'static_best': imitate the best static allocation first; 'none'"},
    )
    imitation_samples: int = field(default=30_000, metadata={"help": "warm-start episodes"})
    eval_every: int = field(default=50_000, metadata={"help": "validation every N steps"})
    eval_repeats: int = field(default=4, metadata={"help": "MATH-500 draws per problem"})
    init_policy: str | None = field(
        default=None, metadata={"help": "continue training this saved policy (fine-tuning)"}
    )
    live: bool = field(default=False, metadata={"help": "train and evaluate on the live engine"})
    limit: int | None = field(default=None, metadata={"help": "with --live: problems to use"})


def parse_args() -> Args:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=f.metadata.get("help"))
            continue
        kind = {"int": int, "float": float, "int | None": int}.get(f.type, str)
        parser.add_argument(flag, type=kind, default=f.default, help=f.metadata.get("help"))
    return Args(**vars(parser.parse_args()))


def main() -> None:
    args = parse_args()
    started = time.time()

    def say(*parts: object) -> None:
        print(f"[{time.time() - started:4.0f} s]", *parts, flush=True)

    torch.set_num_threads(1)
    set_random_seed(args.seed)

    if args.profile_model:  # record a real profile of the model first (resumable)
        from env.profiles.record import profile_model, settings_for

        args.profile = str(
            profile_model(
                args.profile_model,
                args.profile,
                draft=args.profile_draft,
                train=args.profile_train,
                test=args.profile_test,
                settings=settings_for(n_max=args.profile_n_max, max_tokens=args.profile_max_tokens),
                seed=args.seed,
                command=f"train.py --profile-model {args.profile_model}",
            )
        )
    profile = load_profile(args.profile or DEFAULT_PROFILE)
    method = args.spec_method or choose_spec_method(profile)
    out = Path(args.out or f"runs/{profile.name}-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    say(f"profile: {profile.label}; speculative method: {method}; output: {out}")

    # Training problems: most fit the featurizer and train; a few validate (model selection).
    train_ids = [r["id"] for r in profile.split("train")]
    rng = np.random.default_rng(args.seed)
    val_ids = set(rng.choice(train_ids, min(args.val_problems, len(train_ids) // 5), replace=False))
    fit_rows = [r for r in profile.split("train") if r["id"] not in val_ids]
    if args.deadlines:
        deadlines = tuple(float(d) for d in args.deadlines.split(","))
    else:
        deadlines = default_deadlines(ReplayBackend(profile, "train", method))
    deadline_range = (min(deadlines) / 1.25, max(deadlines) * 1.25)
    say(f"evaluation deadlines (s): {deadlines}")

    if args.init_policy:
        start = load_policy(args.init_policy)
        featurizer, config = start.featurizer, start.env_config
    else:
        featurizer = ProblemFeaturizer.fit(fit_rows, deadline_range, seed=args.seed)
        config = EnvConfig(
            deadline_range_s=deadline_range,
            deadline_choices_s=deadlines if args.train_deadlines == "grid" else None,
            latency_cost=args.latency_cost,
            budget_grid=tuple(sorted(float(b) for b in args.budgets.split(","))),
        )
    say("featurizer held-out R^2:", json.dumps(featurizer.meta.get("holdout_r2", {})))

    # Environments: PPO trains on replay of the fitting problems (or on the live engine), and
    # validates on a fixed sweep of the held-back training problems at the evaluation deadlines.
    replay_env = LatencyTTSEnv(
        ReplayBackend(profile, "train", method, ids={r["id"] for r in fit_rows}), featurizer, config
    )
    if args.live:  # slow: seconds per step
        train_env = LatencyTTSEnv(make_live_backend(args.limit, "train"), featurizer, config)
    else:
        train_env = replay_env
    vec_env = make_vec_env(train_env.clone, args.n_envs, args.seed)
    val_config = dataclasses.replace(config, sweep_deadlines_s=deadlines, sweep_seed=args.seed)
    val_env = LatencyTTSEnv(ReplayBackend(profile, "train", method, ids=val_ids), featurizer,
                            val_config)  # fmt: skip

    # The baselines to beat, chosen on the training problems: the published static best
    # (n, k) and the static best (n, k, budget), which also teaches the warm start.
    statics = fit_statics(replay_env, deadlines, args.static_problems, args.seed)
    for static in statics:
        say(f"{static.name} (n, k, budget) per deadline:", static.table)

    run = init_wandb(args.wandb, args.wandb_project, out.name, dataclasses.asdict(args), out)
    if args.init_policy:
        model = PPO.load(Path(args.init_policy) / "model.zip", env=vec_env, device="cpu")
        model.tensorboard_log = str(out / "tb")
    else:
        model = PPO(
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
        if args.warm_start == "static_best":
            agreement = imitate(
                model, replay_env, statics[-1], deadlines, args.imitation_samples, seed=args.seed
            )
            say(f"warm start: the actor gives {statics[-1].name}'s actions p = {agreement:.2f}")
    model.save(out / "start_model.zip")  # before any PPO update, for the selection below
    eval_every = args.timesteps + 1 if args.live else args.eval_every  # live: no mid-run eval
    callbacks = make_callbacks(val_env, out, eval_every, args.eval_every, args.n_envs)
    model.learn(args.timesteps, callback=callbacks, tb_log_name="ppo", progress_bar=True)
    trained_s = time.time() - started

    # Keep a fine-tuned model only if paired validation shows it beats where training started.
    candidates = {"start": PPO.load(out / "start_model.zip", device="cpu"), "final": model}
    if (out / "best_model.zip").is_file():
        candidates["best_validation"] = PPO.load(out / "best_model.zip", device="cpu")
    started_from_policy = args.warm_start != "none" or args.init_policy
    chosen, validation = select_on_validation(
        candidates, val_env, deadlines, "start" if started_from_policy else None, seed=args.seed
    )
    say("validation:", json.dumps(validation), f"-> keeping {chosen!r}")
    model = candidates[chosen]
    policy_dir = save_policy(
        out / "policy",
        model,
        featurizer,
        val_env.resolved_config,
        info={
            "spec_method": method,
            "profile": {"name": profile.name, "path": str(Path(profile.path).resolve()),
                        "synthetic": profile.synthetic},
            "deadlines_s": list(deadlines),
            "selection": {"kept": chosen, "validation": validation},
            "train": {"timesteps": args.timesteps, "seed": args.seed,
                      "seconds": round(trained_s, 1), "args": dataclasses.asdict(args)},
        },
    )  # fmt: skip

    live = make_live_backend(args.limit, "test") if args.live else None
    repeats = 1 if args.live else args.eval_repeats
    report = evaluate_policy(
        load_policy(policy_dir), profile, deadlines, repeats, args.seed, live, statics
    )
    report["train_seconds"] = round(trained_s, 1)
    json_path, png_path = write_report(report, out)
    print_report(report)
    run.summary.update(
        {
            "gap_closed": report["summary"].get("gap_closed"),
            "policy_never_below_static": report["summary"]["policy_never_below_static"],
        }
    )
    run.finish()
    print(f"report: {json_path}\nplot:   {png_path}\npolicy: {policy_dir}")
    say("done")


if __name__ == "__main__":
    main()
