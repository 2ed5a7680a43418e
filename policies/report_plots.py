"""The evaluation's presentation: the console table, the report plot and a plot of a few races.

The table gives the numbers and the targets, met or missed.  The figures show what a reader
should check at a glance: where a method gains accuracy or saves time as the deadline grows,
whether its accuracy-latency points lie left of (faster than) the static table's, and, for
single calls, *why* a controller stopped where it did (the votes of the leading answers as
branches finish, the deadline).  Kept apart from ``policies.evaluate`` so that module stays
about running and scoring.  Every title carries the synthetic-profile label when the numbers
come from a synthetic profile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from env.backends.protocol import Outcome
from env.backends.replay import ReplayBackend
from env.backends.replay_race import ReplayRace
from env.profiles.store import SYNTHETIC_LABEL
from env.race import RaceState
from policies.race_controllers import RaceController
from policies.race_eval import draw_rng

HIGHLIGHT = {"policy": 2.6, "static_best": 2.0}
"""Line widths of the methods a reader looks for first (others 1.2)."""


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on servers or CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def report_label(report: dict) -> str:
    """The profile and sample size as shown beside the numbers (synthetic profiles say so)."""
    profile = report["profile"]
    label = profile["label"]
    if profile["synthetic"] and SYNTHETIC_LABEL not in label:
        label += f" ({SYNTHETIC_LABEL})"
    return f"{label}, {report['num_problems']} problems x {report['repeats']} draws"


def _deadline_axis(ax, deadlines: Sequence[float]) -> None:
    """Deadline grids are geometric: a log axis with ticks at the deadlines."""
    ax.set_xscale("log")
    ax.set_xticks(deadlines, [f"{d:g}" for d in deadlines])
    ax.minorticks_off()


def plot_report(report: dict, path: Path) -> Path:
    """Three panels: accuracy against deadline, mean latency against deadline, and the
    accuracy-latency frontier (each method's (mean latency, accuracy) points over its deadlines,
    connected in deadline order); a fourth when the targets carry paired standard errors: the
    policy's accuracy differences with their error bars against the floors
    (``_plot_differences``)."""
    plt = _pyplot()
    summary = report.get("targets", {})
    rows = summary.get("per_deadline", []) if summary.get("evaluated") else []
    precise = bool(rows) and "accuracy_minus_static_best_se" in rows[0]
    fig, axes = plt.subplots(1, 4 if precise else 3, figsize=(21 if precise else 16, 4.8))
    if precise:
        _plot_differences(axes[3], summary, report["deadlines_s"])
        axes = axes[:3]
    panels = (("deadline_s", "accuracy"), ("deadline_s", "mean_latency_s"),
              ("mean_latency_s", "accuracy"))  # fmt: skip
    for name, rows in report["methods"].items():
        style = {"ls": "--", "color": "grey"} if name == "oracle" else {}
        for ax, (x, y) in zip(axes, panels, strict=True):
            ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o", ms=3.5,
                    lw=HIGHLIGHT.get(name, 1.2), label=name, **style)  # fmt: skip
    labels = {"deadline_s": "deadline (s)", "accuracy": "accuracy within the deadline",
              "mean_latency_s": "mean latency (s)"}  # fmt: skip
    for ax, (x, y) in zip(axes, panels, strict=True):
        ax.set_xlabel(labels[x])
        ax.set_ylabel(labels[y])
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        _deadline_axis(ax, report["deadlines_s"])
    axes[2].set_title("accuracy-latency frontier (left/up is better)", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"MATH-500: {report_label(report)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _plot_differences(ax, summary: dict, deadlines: Sequence[float]) -> None:
    """The policy's accuracy minus static_best's and minus the best heuristic's, in points, with
    +-1 paired standard error, and each target's floor: where a miss is within the noise."""
    rows = summary["per_deadline"]
    series = (("accuracy_minus_static_best", "accuracy_vs_static_best", "static_best",
               "tab:orange", 0.97),
              ("accuracy_minus_best_heuristic", "accuracy_vs_best_heuristic", "best heuristic",
               "tab:brown", 1.03))  # fmt: skip
    for key, target, name, color, shift in series:
        if f"{key}_se" not in rows[0] or target not in summary["targets"]:
            continue
        label = f"{summary['policy']} - {name} (+-1 s.e.)"
        ax.errorbar([d * shift for d in deadlines], [100 * r[key] for r in rows],
                    yerr=[100 * r[f"{key}_se"] for r in rows], color=color, marker="o", ms=3.5,
                    capsize=3, lw=1.2, label=label)  # fmt: skip
        floor = 100 * summary["targets"][target]["threshold"]
        ax.axhline(floor, color=color, ls=":", lw=1, label=f"floor vs {name} ({floor:+.1f})")
    ax.axhline(0.0, color="grey", lw=0.8)
    _deadline_axis(ax, deadlines)
    ax.set_xlabel("deadline (s)")
    ax.set_ylabel("accuracy difference (points)")
    ax.set_title("accuracy targets, paired standard errors", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _saving_percent(rows: Sequence[dict]) -> list[float]:
    """Per-deadline savings in percent, NaN (a gap in the line) where no setting kept the
    accuracy."""
    return [np.nan if r["saving"] is None else 100 * r["saving"] for r in rows]


def plot_saving_bound(result: dict, path: Path, target: float) -> Path:
    """The hindsight bounds (``policies.saving_bound``) per family against the deadline, beside
    what the policy reached as trained and the targets' lines: the saving against static_best's
    frontier, and (when the run has heuristics) against the heuristics' joint frontier."""
    plt = _pyplot()
    ahead = result.get("ahead_of_heuristics") or {}
    cross = result.get("cross_validated", {})
    panels = [(result, target, "static_best's frontier", cross.get("static", {}))]
    if ahead:
        threshold = ahead["threshold"]["latency_saving"]
        panels.append((ahead, threshold, "the heuristics' joint frontier", cross.get("ahead", {})))
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 4.8), squeeze=False)
    deadlines = result["deadlines_s"]
    for ax, (bound, line, against, validated) in zip(axes[0], panels, strict=True):
        for name, family in bound["families"].items():
            values = _saving_percent(family["per_deadline"])
            wide = name == "all"
            ax.plot(deadlines, values, marker="o", ms=3.5, lw=3.0 if wide else 1.2,
                    alpha=0.6 if wide else 1.0, zorder=3 if wide else 2,
                    label=f"{name} (bound)")  # fmt: skip
        if "all" in validated:
            values = _saving_percent(validated["all"]["per_deadline"])
            ax.plot(deadlines, values, color="tab:orange", ls=":", marker="^", ms=4, lw=2.0,
                    label="all, chosen on half, scored on the other")  # fmt: skip
        mine = bound["policy_saving"]
        if mine and None not in mine:
            ax.plot(deadlines, [100 * v for v in mine], "k--", marker="s", ms=4, lw=2.0,
                    label="policy as trained")  # fmt: skip
        ax.axhline(100 * line, color="red", lw=1, ls=":", label=f"target (grid mean {line:.0%})")
        _deadline_axis(ax, deadlines)
        ax.set_xlabel("deadline (s)")
        ax.set_ylabel(f"latency saving vs {against} (%)")
        ax.set_ylim(bottom=max(ax.get_ylim()[0], -20))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"settings tuned on the test draws (hindsight): {report_label(result)}",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _format(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:+.3f}" for k, v in value.items())
    return f"{value:+.4f}"


def print_report(report: dict, console: Console | None = None) -> None:
    """Per deadline, each method's accuracy and mean latency; then the targets, met or missed."""
    console = console or Console(width=max(Console().width, 140))
    methods = report["methods"]
    table = Table(title=f"MATH-500, accuracy / mean latency within the deadline: "
                        f"{report_label(report)}")  # fmt: skip
    table.add_column("deadline s", justify="right")
    for name in methods:
        table.add_column(name, justify="right")
    for d, deadline in enumerate(report["deadlines_s"]):
        cells = [f"{rows[d]['accuracy']:.3f}\n{rows[d]['mean_latency_s']:.3f} s"
                 for rows in methods.values()]  # fmt: skip
        table.add_row(f"{deadline:g}", *cells, end_section=True)
    console.print(table)
    summary = report["targets"]
    if not summary.get("evaluated"):
        console.print(f"targets not evaluated: {summary.get('reason')}")
        return
    targets = Table(title=f"targets of {summary['policy']!r} ({report_label(report)})")
    for column in ("target", "value", "threshold", "result"):
        targets.add_column(column)
    for name, t in summary["targets"].items():
        result = "[green]met[/green]" if t["met"] else "[red]missed[/red]"
        value = _format(t["value"]) + (f" ± {t['se_at_worst']:.4f}" if "se_at_worst" in t else "")
        targets.add_row(name, value, _format(t["threshold"]), result)
    console.print(targets)
    noisy = {name: t for name, t in summary["targets"].items() if "se_at_worst" in t}
    if noisy:
        console.print("± : standard error of the accuracy difference at the worst deadline, "
                      "paired over the same draws (per problem); chance that a method as "
                      "different but exactly as accurate misses the target by noise alone: "
                      + ", ".join(f"{name} {t['miss_chance_if_equal']:.0%}"
                                  for name, t in noisy.items()))  # fmt: skip
    baselines = summary["targets"].get("accuracy_vs_best_heuristic", {}).get("baselines_worst")
    if baselines:
        console.print(
            "the same bar for the baselines (worst accuracy minus the best heuristic): "
            + ", ".join(f"{name} {v:+.4f}" for name, v in baselines.items())
        )
    console.print(_per_deadline_table(summary))
    if report.get("targets_by_method"):
        console.print(_by_method_table(report["targets_by_method"], summary["policy"]))


def _by_method_table(by_method: dict[str, dict], policy: str) -> Table:
    """Every controller in the policy's place: the same target figures on the same draws."""
    table = Table(title="every controller held to the same targets (the best one should be the "
                        "default)")  # fmt: skip
    columns = ("accuracy_vs_static_best", "latency_saving_vs_static_best",
               "accuracy_vs_best_heuristic", "ahead_of_heuristics")  # fmt: skip
    table.add_column("controller")
    for column in columns:
        table.add_column(column, justify="right")
    for name, values in by_method.items():
        cells = [_format(values[c]) if c in values else "" for c in columns]
        table.add_row(f"[bold]{name}[/bold]" if name == policy else name, *cells)
    return table


def _cell(column: str, row: dict) -> str:
    value = row[column]
    if isinstance(value, str):
        return value
    if column == "latency_ratio_to_static_best":
        return f"{value:.3f}"
    se = row.get(f"{column}_se")
    return f"{value:+.3f}" + (f" ± {se:.3f}" if se is not None else "")


def _per_deadline_table(summary: dict) -> Table:
    """The targets' figures at each deadline (what the minima and averages are taken over)."""
    columns = {
        "accuracy_minus_static_best": "acc - static",
        "latency_saving_vs_static_best": "saving vs static frontier",
        "latency_ratio_to_static_best": "latency / static",
        "best_heuristic": "best heuristic",
        "accuracy_minus_best_heuristic": "acc - heuristic",
        "latency_saving_vs_heuristics": "saving vs heuristics",
    }
    rows = summary["per_deadline"]
    shown = [c for c in columns if c in rows[0]]
    table = Table(title=f"{summary['policy']} per deadline")
    for column in ("deadline s", *(columns[c] for c in shown)):
        table.add_column(column, justify="right")
    for row in rows:
        cells = [_cell(c, row) for c in shown]
        table.add_row(f"{row['deadline_s']:g}", *cells)
    return table


@dataclass
class RaceTimeline:
    """One replayed call as a controller ran it: the votes after every decision point.

    :param times_s: seconds from the call's start of each point (the first: decoding starts).
    :param votes: votes per answer class at each point.
    :param k: drafts per step after each point.
    :param outcome: the call's result.
    :param stop_reason: why it ended (``env.race.STOP_REASONS``).
    """

    times_s: list[float] = field(default_factory=list)
    votes: list[dict[int, int]] = field(default_factory=list)
    k: list[int] = field(default_factory=list)
    outcome: Outcome | None = None
    stop_reason: str | None = None

    def record(self, state: RaceState) -> None:
        self.times_s.append(state.elapsed_s)
        self.votes.append(state.tally.counts)
        self.k.append(state.k)


def record_race(
    backend: ReplayBackend,
    controller: RaceController,
    problem: int,
    deadline_s: float,
    rng: np.random.Generator,
) -> RaceTimeline:
    """Replay one call under ``controller`` (as ``policies.race_eval.run_race`` does), keeping
    the vote at every decision point."""
    race = ReplayRace(backend, problem, controller.call_deadline(deadline_s), rng)
    race.begin(*controller.begin(backend.problems[problem], deadline_s))
    timeline = RaceTimeline()
    timeline.record(race.state)
    while not race.done:
        timeline.record(race.advance())
        decision = None if race.done else controller.decide(race.state)
        if decision is not None and decision.stop:
            race.stop()
        elif decision is not None and decision.k is not None:
            race.set_k(decision.k)
            timeline.k[-1] = decision.k
    timeline.outcome, timeline.stop_reason = race.outcome(), race.state.stopped
    return timeline


def _pick_problems(
    runs: dict[int, list[RaceTimeline]], right: Sequence[Sequence[bool]], count: int
) -> list[int]:
    """The races that explain a difference: contested ones (two or more answers voted in some
    race) where some race saw a right vote, then those where the stop times differ most."""

    def score(p: int) -> tuple[bool, bool, float]:
        voted = {c for t in runs[p] for c in t.votes[-1]}
        stops = [t.outcome.latency_s for t in runs[p]]
        return len(voted) >= 2, any(right[p][c] for c in voted), max(stops) - min(stops)

    return sorted(sorted(runs, key=score, reverse=True)[:count])


def _draw_race(ax, timeline: RaceTimeline, right: Sequence[bool], deadline_s: float) -> None:
    """Votes of the (up to) four leading answers over time, the deadline and the stop."""
    final = timeline.votes[-1]
    leading = sorted(final, key=final.get, reverse=True)[:4]
    wrong_colors = iter(("tab:red", "tab:orange", "tab:purple", "tab:brown"))
    for c in leading:
        votes = [v.get(c, 0) for v in timeline.votes]
        color, name = ("tab:green", "right answer") if right[c] else (next(wrong_colors), "wrong")
        ax.step(timeline.times_s, votes, where="post", color=color, label=f"{name} (class {c})")
    ax.axvline(deadline_s, color="black", ls="--", lw=1, label="deadline")
    outcome = timeline.outcome
    verdict = "right" if outcome.correct else ("wrong" if outcome.answered else "no answer")
    ax.axvline(outcome.latency_s, color="tab:blue", lw=2,
               label=f"stop ({timeline.stop_reason}): {verdict}")  # fmt: skip
    ax.set_xlim(0, deadline_s * 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left")


def plot_races(
    backend: ReplayBackend,
    controllers: Mapping[str, RaceController],
    deadline_s: float,
    path: Path,
    seed: int = 0,
    problems: Sequence[int] | None = None,
    count: int = 4,
    candidates: int = 60,
) -> Path:
    """A grid of races: one row per problem, one column per controller (e.g. the policy and
    ``static_best``), each on the same draw ``draw_rng(seed, problem, 0)``.

    :param problems: which problems; default: ``count`` of the first ``candidates`` problems,
        chosen by ``_pick_problems``.
    """
    pool = list(problems) if problems is not None else range(min(candidates, len(backend.problems)))
    runs = {p: [record_race(backend, c, p, deadline_s, draw_rng(seed, p, 0))
                for c in controllers.values()] for p in pool}  # fmt: skip
    chosen = (
        list(problems)
        if problems is not None
        else _pick_problems(runs, backend.class_correct, count)
    )
    plt = _pyplot()
    fig, axes = plt.subplots(len(chosen), len(controllers), squeeze=False, sharey="row",
                             figsize=(5.5 * len(controllers), 2.6 * len(chosen)))  # fmt: skip
    for row, p in enumerate(chosen):
        for col, (name, timeline) in enumerate(zip(controllers, runs[p], strict=True)):
            ax = axes[row][col]
            _draw_race(ax, timeline, backend.class_correct[p], deadline_s)
            ks = "->".join(str(k) for k in dict.fromkeys(timeline.k))
            ax.set_title(f"{backend.problems[p].id}: {name} (n={timeline.outcome.n}, k={ks})",
                         fontsize=8)  # fmt: skip
            ax.set_ylabel("votes")
        axes[row][0].set_xlabel("seconds since the call started")
    label = f" ({SYNTHETIC_LABEL})" if backend.synthetic else ""
    fig.suptitle(f"races at deadline {deadline_s:g} s: {backend.profile.name}{label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
