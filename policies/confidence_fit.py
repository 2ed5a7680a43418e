"""Fitting the answer-confidence model on replayed calls, its calibration report, the command.

``policies.confidence`` holds the model the serving path loads; this module replays a policy's
calls on its profile (training split) to fit it, checks it on the test split (expected
calibration error, Brier score, reliability table and plot) and saves it into the policy folder.

    python -m policies.confidence_fit --policy DIR [--out DIR] [--problems 1000] [--repeats 1]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from env.backends.replay import ReplayBackend
    from policies.race_controllers import RaceController
    from policies.saved_policy import SavedRacePolicy

from policies.confidence import (
    CONFIDENCE_FEATURES,
    DEFAULT_L2,
    RELIABILITY_BINS,
    ConfidenceModel,
    confidence_features,
)
from policies.race_eval import draw_rng, run_race_with_state

# -- replayed calls ----------------------------------------------------------------------------


@dataclass
class ReplayedCalls:
    """The calls of one controller on replayed draws, in (deadline, problem, repeat) order.

    :param features: ``confidence_features`` of every call (answered or not).
    :param correct: whether each call's answer was right.
    :param answered: whether each call had an answer.
    :param deadline: each call's deadline index.
    """

    features: np.ndarray
    correct: np.ndarray
    answered: np.ndarray
    deadline: np.ndarray


def _problem_indices(
    backend: ReplayBackend, problems: int | Sequence[int] | None, seed: int
) -> list[int]:
    """``problems`` as indices: all when None, a random subset (by ``seed``, as the baselines'
    tuning draws it) when a count, else as given."""
    if problems is None:
        return list(range(len(backend.problems)))
    if isinstance(problems, int):
        return np.random.default_rng(seed).permutation(len(backend.problems))[:problems].tolist()
    return [int(p) for p in problems]


def replay_calls(
    backend: ReplayBackend,
    controller: RaceController,
    deadlines_s: Sequence[float],
    problems: Sequence[int],
    repeats: int,
    seed: int,
) -> ReplayedCalls:
    """Every (deadline, problem, repeat) call of ``controller``, on the evaluation's draws
    (``policies.race_eval.draw_rng``)."""

    rows, correct, answered, deadline = [], [], [], []
    for d, deadline_s in enumerate(deadlines_s):
        for p in problems:
            for r in range(repeats):
                outcome, state = run_race_with_state(
                    backend, controller, p, deadline_s, draw_rng(seed, p, r)
                )
                rows.append(confidence_features(state))
                correct.append(outcome.correct)
                answered.append(outcome.answered)
                deadline.append(d)
    return ReplayedCalls(
        np.array(rows).reshape(-1, len(CONFIDENCE_FEATURES)),
        np.array(correct, dtype=bool),
        np.array(answered, dtype=bool),
        np.array(deadline, dtype=int),
    )


def _provenance(
    backend: ReplayBackend,
    controller: RaceController,
    deadlines_s,
    problems,
    repeats: int,
    seed: int,
) -> dict:
    """Where calls came from, for the saved model and the report (synthetic profiles say so)."""
    profile = backend.profile
    return {
        "profile": {"name": profile.name, "label": backend.name, "synthetic": backend.synthetic},
        "spec_method": backend.method,
        "controller": getattr(controller, "name", "?"),
        "deadlines_s": [float(d) for d in deadlines_s],
        "num_problems": len(problems),
        "repeats": repeats,
        "seed": seed,
    }


def fit_confidence(
    backend: ReplayBackend,
    controller: RaceController,
    deadlines_s: Sequence[float],
    problems: int | Sequence[int] | None,
    repeats: int,
    seed: int,
    l2: float = DEFAULT_L2,
) -> ConfidenceModel:
    """The confidence of ``controller``'s answers, fitted on its answered calls replayed on
    ``backend`` (the training split of the policy's profile) at every deadline.

    :param problems: problem indices, a count (a random subset by ``seed``) or None (all).
    """
    chosen = _problem_indices(backend, problems, seed)
    calls = replay_calls(backend, controller, deadlines_s, chosen, repeats, seed)
    info = _provenance(backend, controller, deadlines_s, chosen, repeats, seed)
    answered = calls.answered
    info.update(
        split="train",
        calls=len(answered),
        answered_calls=int(answered.sum()),
        accuracy=float(calls.correct[answered].mean()) if answered.any() else None,
    )
    return ConfidenceModel.fit(calls.features[answered], calls.correct[answered], l2, info)


# -- calibration -------------------------------------------------------------------------------


def calibration_metrics(
    probability: np.ndarray, correct: np.ndarray, bins: int = RELIABILITY_BINS
) -> dict:
    """Expected calibration error over ``bins`` equal-width bins of [0, 1] (the count-weighted
    mean of |accuracy - mean probability| per bin), Brier score, and the reliability table
    (per bin: its edges, calls, mean probability, accuracy; empty bins have None)."""
    probability = np.asarray(probability, dtype=float)
    correct = np.asarray(correct, dtype=float)
    if len(probability) == 0:
        return {"calls": 0, "ece": None, "brier": None, "reliability": []}
    which = np.minimum((probability * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        row = {
            "lower": b / bins,
            "upper": (b + 1) / bins,
            "calls": count,
            "mean_probability": None,
            "accuracy": None,
        }
        if count:
            row["mean_probability"] = float(probability[members].mean())
            row["accuracy"] = float(correct[members].mean())
            ece += count / len(probability) * abs(row["accuracy"] - row["mean_probability"])
        table.append(row)
    brier = float(np.mean((probability - correct) ** 2))
    return {"calls": len(probability), "ece": float(ece), "brier": brier, "reliability": table}


def _number(value: float | None) -> str:
    return "n/a (no answered calls)" if value is None else f"{value:.4f}"


def _summary(probability: np.ndarray, correct: np.ndarray) -> dict:
    """Answered calls, their accuracy and mean probability, ECE and Brier (None when empty)."""
    metrics = calibration_metrics(probability, correct)
    empty = len(probability) == 0
    return {
        "answered_calls": metrics["calls"],
        "accuracy": None if empty else float(np.mean(correct)),
        "mean_probability": None if empty else float(np.mean(probability)),
        "ece": metrics["ece"],
        "brier": metrics["brier"],
    }


def calibration_report(
    model: ConfidenceModel,
    backend: ReplayBackend,
    controller: RaceController,
    deadlines_s: Sequence[float],
    problems: int | Sequence[int] | None,
    repeats: int,
    seed: int,
) -> dict:
    """How well ``model`` is calibrated on ``controller``'s answered calls on ``backend`` (the
    test split): ECE, Brier and the reliability table overall, the same per deadline, and two
    references: the raw leader share read as a probability, and the constant base rate (its
    ECE is ~0 by construction, since a constant cannot separate right answers from wrong
    ones; Brier is the comparison that counts there).

    Unanswered calls are left out: their confidence is 0 by definition, which would flatter
    the scores without saying anything about the answers a client receives.
    """
    chosen = _problem_indices(backend, problems, seed)
    calls = replay_calls(backend, controller, deadlines_s, chosen, repeats, seed)
    mask = calls.answered
    features, correct = calls.features[mask], calls.correct[mask].astype(float)
    probability = model.predict_features(features)
    share = features[:, CONFIDENCE_FEATURES.index("leader_share")]
    base_rate = np.full(len(correct), correct.mean() if len(correct) else 0.0)
    overall = calibration_metrics(probability, correct)
    per_deadline = [
        {"deadline_s": float(deadline_s), **_summary(probability[here], correct[here])}
        for d, deadline_s in enumerate(deadlines_s)
        for here in [calls.deadline[mask] == d]
    ]
    return {
        **_provenance(backend, controller, deadlines_s, chosen, repeats, seed),
        "split": "test",
        "calls": len(mask),
        **_summary(probability, correct),
        "reliability": overall["reliability"],
        "references": {
            "leader_share": _summary(share, correct),
            "base_rate": _summary(base_rate, correct),
        },
        "per_deadline": per_deadline,
        "fitted_on": model.info,
    }


def plot_reliability(report: dict, path: Path | str) -> Path:
    """The reliability diagram of ``calibration_report``: accuracy against mean predicted
    probability per bin (a calibrated model lies on the diagonal), with the calls per bin
    below; the title names the profile, with the synthetic label when it is synthetic."""
    from env.profiles.store import SYNTHETIC_LABEL
    from policies.report_plots import _pyplot

    plt = _pyplot()
    rows = [r for r in report["reliability"] if r["calls"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6.5), height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    top.plot(
        [r["mean_probability"] for r in rows],
        [r["accuracy"] for r in rows],
        "o-",
        label=f"confidence (ECE {_number(report['ece'])}, Brier {_number(report['brier'])})",
    )
    top.set(ylabel="accuracy of answered calls", xlim=(0, 1), ylim=(0, 1))
    top.legend(loc="upper left")
    bottom.bar(
        [(r["lower"] + r["upper"]) / 2 for r in report["reliability"]],
        [r["calls"] for r in report["reliability"]],
        width=0.09,
        color="tab:blue",
    )
    bottom.set(xlabel="predicted probability that the answer is right", ylabel="calls")
    label = report["profile"]["label"]
    if report["profile"]["synthetic"] and SYNTHETIC_LABEL not in label:
        label += f" ({SYNTHETIC_LABEL})"
    top.set_title(
        f"Confidence calibration, {report['split']} split\n{label}, "
        f"{report['answered_calls']} answered calls of {report['controller']}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- command line ------------------------------------------------------------------------------


@dataclass
class Args:
    """Fit a race policy's answer confidence on its training profile and check it on the test
    split (writes confidence.json into the policy folder)."""

    policy: str
    """race policy folder written by train.py"""
    out: str | None = None
    """folder for the report and the reliability plot (default: <policy>/../confidence)"""
    deadlines: tuple[float, ...] | None = None
    """deadlines in seconds (default: the policy's evaluation deadlines)"""
    problems: int = 1000
    """training problems the confidence is fitted on (a random subset)"""
    repeats: int = 1
    """draws per training problem and deadline"""
    test_repeats: int = 1
    """draws per test problem and deadline"""
    seed: int = 0


def _learned_controller(policy: SavedRacePolicy, backend: ReplayBackend) -> RaceController:
    """The policy as ``policies.evaluate`` runs it: prompt features from the env's table."""
    from env.race_env import RaceEnv
    from policies.learned_controller import LearnedController

    return LearnedController(policy.model, RaceEnv(backend, policy.featurizer, policy.env_config))


def main(args: Args) -> dict:
    """Load the policy and its profile, fit on the training split, save ``confidence.json``
    into the policy folder, report on the test split; returns the report."""
    from env.backends.replay import ReplayBackend
    from env.profiles.store import write_json
    from policies.evaluate import check_deadlines
    from policies.saved_policy import load_race_policy, policy_profile

    policy = load_race_policy(args.policy)
    deadlines = check_deadlines(args.deadlines or policy.info.get("deadlines_s") or ())
    profile, method = policy_profile(policy), policy.info.get("spec_method")
    train, test = (ReplayBackend(profile, split, method) for split in ("train", "test"))
    started = time.perf_counter()
    model = fit_confidence(
        train, _learned_controller(policy, train), deadlines, args.problems, args.repeats, args.seed
    )
    fitted = time.perf_counter()
    model.info["policy"] = str(policy.folder)
    saved = model.save(policy.folder)
    report = calibration_report(
        model,
        test,
        _learned_controller(policy, test),
        deadlines,
        None,
        args.test_repeats,
        args.seed,
    )
    report["timing_s"] = {"fit": fitted - started, "report": time.perf_counter() - fitted}
    out = Path(args.out) if args.out else Path(args.policy).resolve().parent / "confidence"
    write_json(out / "confidence_report.json", report)
    plot = plot_reliability(report, out / "reliability.png")
    print(
        f"confidence: {saved} ({model.info['answered_calls']} answered training calls, "
        f"{report['timing_s']['fit']:.1f} s)"
    )
    share = report["references"]["leader_share"]
    print(
        f"test split ({report['profile']['label']}): {report['answered_calls']} answered calls, "
        f"ECE {_number(report['ece'])}, Brier {_number(report['brier'])} (leader share as "
        f"probability: ECE {_number(share['ece'])}, Brier {_number(share['brier'])})"
    )
    print(f"report: {out / 'confidence_report.json'}\nplot:   {plot}")
    return report


def cli(argv: Sequence[str] | None = None) -> dict:
    """``main`` on parsed command-line arguments."""
    import tyro

    return main(tyro.cli(Args, args=argv, description=Args.__doc__))


if __name__ == "__main__":
    try:
        cli()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
