"""Evaluation on MATH-500 (held out from training): the policy against every baseline per deadline.

For each deadline of a grid, every method answers every test problem ``repeats`` times; draws
are seeded per (problem, repeat), so all methods vote over the same recorded branches and
differences come from the actions, not the luck of the draw.  Reported per method and
deadline: accuracy within the deadline, mean and p95 latency, deadline misses (no answer by the
deadline), mean generated tokens and the mean n, k and budget chosen.  Output: a table on the
console, ``report.json`` and ``report.png`` (accuracy and latency against deadline).  Numbers from a
synthetic profile say "synthetic profile" wherever they appear.

Runs on replay by default; ``--live`` runs the policy and the deployable baselines on the live
engine (``env.backends.live.LiveBackend``) for the first ``--limit`` problems.

    python -m policies.evaluate --policy runs/<name>/policy [--profile P] [--deadlines 2,4,8]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from env.backends.protocol import Backend, Outcome
from env.backends.replay import ReplayBackend
from env.profiles.store import Profile, load_profile, write_json
from env.tts_env import LatencyTTSEnv
from policies.baselines import (
    Allocator,
    MaxFitAllocator,
    PlainAllocator,
    StaticBestAllocator,
    oracle_outcomes,
    reward_of,
    run_allocation,
)
from policies.ppo_policy import SavedPolicy, load_policy

SYNTHETIC_NOTE = "synthetic profile"


def default_deadlines(backend: ReplayBackend, count: int = 8) -> tuple[float, ...]:
    """A geometric deadline grid spanning where (n, k) matters on this profile.

    From the 20th percentile of the fastest single-branch latency (below it nearly nothing can
    answer) to the 90th percentile of the fastest all-branch latency (above it everything fits),
    over up to 300 problems; rounded to two significant digits.
    """
    problems = range(min(len(backend.problems), 300))
    everything = np.arange(backend.max_branches)
    single = [min(backend.finish_times(p, everything[:1], k)[0] for k in backend.k_grid)
              for p in problems]  # fmt: skip
    full = [min(backend.finish_times(p, everything, k).max() for k in backend.k_grid)
            for p in problems]  # fmt: skip
    grid = np.geomspace(np.quantile(single, 0.2), np.quantile(full, 0.9), count)
    return tuple(float(f"{d:.2g}") for d in grid)


def outcome_metrics(
    outcomes: Sequence[Outcome],
    deadline_s: float,
    latency_cost: float,
    budgets: Sequence[float] | None = None,
) -> dict:
    """Accuracy, latency, misses, tokens and chosen n/k/budget of one method at one deadline
    (``budgets``: the budget behind each outcome; None where unknown, as for the oracle)."""
    latency = np.array([o.latency_s for o in outcomes])
    return {
        "deadline_s": deadline_s,
        "accuracy": float(np.mean([o.correct for o in outcomes])),
        "mean_latency_s": float(latency.mean()),
        "p95_latency_s": float(np.percentile(latency, 95)),
        "deadline_miss_rate": float(np.mean([o.deadline_missed for o in outcomes])),
        "mean_generated_tokens": float(np.mean([o.generated_tokens for o in outcomes])),
        "mean_n": float(np.mean([o.n for o in outcomes])),
        "mean_k": float(np.mean([o.k for o in outcomes])),
        "mean_budget": float(np.mean(budgets)) if budgets is not None else None,
        "mean_branches_finished": float(np.mean([o.branches_finished for o in outcomes])),
        "mean_reward": float(np.mean([reward_of(o, deadline_s, latency_cost) for o in outcomes])),
    }


def evaluate_methods(
    env: LatencyTTSEnv,
    allocators: Sequence[Allocator],
    deadlines_s: Sequence[float],
    repeats: int,
    seed: int,
    oracle: bool,
) -> dict[str, list[dict]]:
    """Per method, one metrics dict per deadline over all of ``env``'s problems."""
    problems = list(range(len(env.backend.problems)))
    results: dict[str, list[dict]] = {a.name: [] for a in allocators}
    cost = env.config.latency_cost
    progress = tqdm(total=len(deadlines_s) * len(allocators), desc="evaluate", leave=False)
    for deadline in deadlines_s:
        for allocator in allocators:
            actions = allocator.choose(env, problems, deadline)
            outcomes = run_allocation(env, actions, problems, deadline, repeats, seed)
            budgets = [a.budget for a in actions for _ in range(repeats)]
            results[allocator.name].append(outcome_metrics(outcomes, deadline, cost, budgets))
            progress.update()
    progress.close()
    if oracle:
        best = oracle_outcomes(env, problems, deadlines_s, repeats, seed)
        pairs = zip(best, deadlines_s, strict=True)
        results["oracle"] = [outcome_metrics(outcomes, d, cost) for outcomes, d in pairs]
    return results


def compare(policy: list[dict], other: list[dict]) -> dict:
    """Policy against another method per deadline: accuracy difference, latency ratio, and
    whether it is never below."""
    pairs = list(zip(policy, other, strict=True))
    minus = [p["accuracy"] - o["accuracy"] for p, o in pairs]
    ratios = [p["mean_latency_s"] / max(o["mean_latency_s"], 1e-12) for p, o in pairs]
    return {
        "never_below": all(d >= 0 for d in minus),
        "accuracy_minus": minus,
        "latency_ratio": ratios,
        "mean_latency_ratio": float(np.mean(ratios)),
    }


def summarize(methods: dict[str, list[dict]]) -> dict:
    """Policy against static best: accuracy difference, latency ratio, share of gap closed;
    and against the static budget baseline when there is one."""
    policy, static = methods["policy"], methods["static_best"]
    oracle = methods.get("oracle")
    vs_static = compare(policy, static)
    per_deadline = []
    for i, p in enumerate(policy):
        row = {
            "deadline_s": p["deadline_s"],
            "accuracy_minus_static": vs_static["accuracy_minus"][i],
            "latency_ratio_to_static": vs_static["latency_ratio"][i],
        }
        if oracle:
            gap = oracle[i]["accuracy"] - static[i]["accuracy"]
            row["gap_closed"] = vs_static["accuracy_minus"][i] / gap if gap > 0 else None
        per_deadline.append(row)
    summary = {
        "policy_never_below_static": vs_static["never_below"],
        "mean_accuracy": {
            m: float(np.mean([r["accuracy"] for r in rows])) for m, rows in methods.items()
        },
        "mean_latency_ratio_to_static": vs_static["mean_latency_ratio"],
        "per_deadline": per_deadline,
    }
    if oracle:
        total_gap = sum(o["accuracy"] - s["accuracy"] for o, s in zip(oracle, static, strict=True))
        gained = sum(vs_static["accuracy_minus"])
        summary["gap_closed"] = gained / total_gap if total_gap > 0 else None
    if "static_budget" in methods:
        summary["vs_static_budget"] = compare(policy, methods["static_budget"])
    return summary


def evaluate_policy(
    policy: SavedPolicy,
    profile: Profile,
    deadlines_s: Sequence[float],
    repeats: int = 4,
    seed: int = 0,
    live_backend: Backend | None = None,
    statics: Sequence[StaticBestAllocator] | None = None,
) -> dict:
    """Evaluate a saved policy and all baselines on MATH-500; returns the report dict.

    The static baselines are chosen on the profile's training problems (``static_budget`` only
    when the policy has budgets below 1); max-fit predicts latency with the profile's latency
    model.  With ``live_backend`` the methods run on it and the oracle (which needs every
    action replayed) is left out.  ``statics`` reuses static baselines already chosen for
    these deadlines.
    """
    method = policy.info.get("spec_method")
    if statics is None:
        train = LatencyTTSEnv(
            ReplayBackend(profile, "train", method=method), policy.featurizer, policy.env_config
        )
        statics = fit_statics(train, deadlines_s, seed=seed)
    replay = ReplayBackend(profile, "test", method=method)
    backend = live_backend or replay
    env = LatencyTTSEnv(backend, policy.featurizer, policy.env_config)
    max_fit = MaxFitAllocator(replay.latency_model, replay.timing, replay.method)
    allocators = [policy, *statics, PlainAllocator(), max_fit]
    methods = evaluate_methods(env, allocators, deadlines_s, repeats, seed, live_backend is None)
    return {
        "profile": profile.name,
        "profile_label": profile.label,
        "synthetic": profile.synthetic or backend.synthetic,
        "backend": backend.name,
        "live": live_backend is not None,
        "split": "test",
        "num_problems": len(backend.problems),
        "repeats": repeats,
        "seed": seed,
        "spec_method": replay.method,
        "latency_cost": policy.env_config.latency_cost,
        "policy": {"folder": str(policy.folder), "algorithm": policy.info.get("algorithm")},
        "deadlines_s": [float(d) for d in deadlines_s],
        **{f"{s.name}_actions": {str(d): list(a) for d, a in s.table.items()} for s in statics},
        "methods": methods,
        "summary": summarize(methods),
    }


def fit_statics(
    env: LatencyTTSEnv, deadlines_s: Sequence[float], max_problems: int = 2000, seed: int = 0
) -> list[StaticBestAllocator]:
    """The published static best (waits until the deadline) and, when ``env`` offers budgets
    below 1, the static best over (n, k, budget); both chosen on ``env``'s (training) problems."""
    budget_sets = [(1.0,)] + ([None] if len(env.budget_grid) > 1 else [])
    return StaticBestAllocator.fit_many(env, deadlines_s, budget_sets, max_problems, seed)


def _label(report: dict) -> str:
    label = report["profile_label"]
    if report["synthetic"] and SYNTHETIC_NOTE not in label:
        label += f" ({SYNTHETIC_NOTE})"
    where = "live engine" if report["live"] else "replay"
    return f"{label} [{where}, {report['num_problems']} problems x {report['repeats']} draws]"


def print_report(report: dict, console: Console | None = None) -> None:
    """The per-deadline table and the policy-vs-static summary."""
    console = console or Console(width=max(Console().width, 100))
    table = Table(title=f"MATH-500 within deadline: {_label(report)}")
    for column in ("deadline s", "method", "accuracy", "mean lat s", "p95 lat s", "missed",
                   "tokens", "mean n", "mean k", "budget"):  # fmt: skip
        table.add_column(column, justify="right" if column != "method" else "left")
    for i, deadline in enumerate(report["deadlines_s"]):
        for name, rows in report["methods"].items():
            r = rows[i]
            table.add_row(
                f"{deadline:g}" if name == "policy" else "", name, f"{r['accuracy']:.3f}",
                f"{r['mean_latency_s']:.2f}", f"{r['p95_latency_s']:.2f}",
                f"{r['deadline_miss_rate']:.3f}", f"{r['mean_generated_tokens']:.0f}",
                f"{r['mean_n']:.1f}", f"{r['mean_k']:.1f}", _budget(r),
                end_section=name == list(report["methods"])[-1],
            )  # fmt: skip
    console.print(table)
    s = report["summary"]
    gap = s.get("gap_closed")
    console.print(
        f"policy >= static best at every deadline: {s['policy_never_below_static']}; "
        f"mean accuracy policy {s['mean_accuracy']['policy']:.3f} vs static best "
        f"{s['mean_accuracy']['static_best']:.3f}; mean latency ratio policy/static "
        f"{s['mean_latency_ratio_to_static']:.2f}"
        + (f"; static-to-oracle gap closed {gap:.1%}" if gap is not None else "")
        + (f" ({SYNTHETIC_NOTE})" if report["synthetic"] else "")
    )
    budget = s.get("vs_static_budget")
    if budget:
        console.print(
            f"against static_budget (the static search over the policy's (n, k, budget)): "
            f"never below {budget['never_below']}, mean latency ratio "
            f"{budget['mean_latency_ratio']:.2f}"
        )


def _budget(row: dict) -> str:
    return "" if row.get("mean_budget") is None else f"{row['mean_budget']:.2f}"


def plot_report(report: dict, path: Path) -> Path:
    """Accuracy and mean latency against deadline, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, lat_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in report["methods"].items():
        deadlines = [r["deadline_s"] for r in rows]
        acc_ax.plot(deadlines, [r["accuracy"] for r in rows], marker="o", label=name)
        lat_ax.plot(deadlines, [r["mean_latency_s"] for r in rows], marker="o", label=name)
    for ax, ylabel in ((acc_ax, "accuracy within deadline"), (lat_ax, "mean latency (s)")):
        ax.set_xscale("log")
        ax.set_xticks(report["deadlines_s"], [f"{d:g}" for d in report["deadlines_s"]])
        ax.minorticks_off()
        ax.set_xlabel("deadline (s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8)
    fig.suptitle(f"MATH-500: {_label(report)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    json_path = out_dir / "report.json"
    write_json(json_path, report)
    return json_path, plot_report(report, out_dir / "report.png")


def make_live_backend(limit: int | None, split: str = "test") -> Backend:
    """The live engine backend on the first ``limit`` problems of ``split`` (test: MATH-500)."""
    try:
        from env.backends.live import LiveBackend
    except ImportError as error:
        raise RuntimeError(
            "--live needs env.backends.live.LiveBackend (the vLLM engine backend), which could "
            f"not be imported: {error}"
        ) from error
    return LiveBackend(split=split, limit=limit)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", required=True, help="policy folder written by train.py")
    parser.add_argument("--profile", help="profile name or folder (default: the policy's)")
    parser.add_argument("--deadlines", help="comma-separated seconds (default: the policy's)")
    parser.add_argument("--repeats", type=int, default=4, help="draws per problem and deadline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="output folder (default: <policy>/../eval)")
    parser.add_argument("--live", action="store_true", help="run on the live engine")
    parser.add_argument("--limit", type=int, help="with --live: first N MATH-500 problems")
    args = parser.parse_args(argv)

    policy = load_policy(args.policy)
    trained_on = policy.info["profile"]
    if args.profile:
        profile = load_profile(args.profile)
    elif Path(trained_on["path"], "manifest.json").is_file():
        profile = load_profile(trained_on["path"])
    else:  # the policy moved: find its profile by name under data/profiles
        profile = load_profile(trained_on["name"])
    if args.deadlines:
        deadlines = [float(d) for d in args.deadlines.split(",")]
    else:
        deadlines = policy.info.get("deadlines_s") or default_deadlines(
            ReplayBackend(profile, "train", method=policy.info.get("spec_method"))
        )
    live = make_live_backend(args.limit) if args.live else None
    repeats = 1 if args.live else args.repeats
    report = evaluate_policy(policy, profile, deadlines, repeats, args.seed, live)
    out_dir = Path(args.out) if args.out else Path(args.policy).resolve().parent / "eval"
    json_path, png_path = write_report(report, out_dir)
    print_report(report)
    print(f"report: {json_path}\nplot:   {png_path}")
    return report


if __name__ == "__main__":
    main()
