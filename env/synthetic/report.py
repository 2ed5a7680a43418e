"""Calibration statistics, summary, report table and plot of a synthetic profile.

Kept apart from the generator so that the same numbers can be recomputed from any saved
profile (tests, reports), and so that every table printed from a synthetic profile carries the
words "synthetic profile" beside its numbers.

    python -m env.synthetic.report [--profile NAME_OR_FOLDER] [--plot PATH]

prints every calibration target of a saved profile with its tolerance, achieved value and
source in one table, and draws the calibration plot (response lengths of right and wrong
answers; majority-vote accuracy, published vs simulated).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from env.profiles.store import SYNTHETIC_LABEL as LABEL
from env.profiles.store import load_profile, resolve_profile_path


def length_statistics(rows: list[dict]) -> dict:
    """Aggregate response-length statistics of profile rows (generated tokens per branch)."""
    tokens = np.concatenate([np.asarray(r["branch_tokens"]) for r in rows])
    correct = np.concatenate([np.asarray(r["branch_correct"], dtype=bool) for r in rows])
    answered = np.concatenate([np.asarray(r["branch_class"]) >= 0 for r in rows])
    truncated = np.concatenate([np.asarray(r["branch_finish_reason"]) == "length" for r in rows])
    by_level = {}
    for level in sorted({r["level"] for r in rows}):
        level_tokens = [np.asarray(r["branch_tokens"]) for r in rows if r["level"] == level]
        by_level[str(level)] = float(np.median(np.concatenate(level_tokens)))
    return {
        "mean_tokens": round(float(tokens.mean()), 1),
        "median_tokens": float(np.median(tokens)),
        "median_tokens_correct": float(np.median(tokens[correct])),
        "median_tokens_wrong_answered": float(np.median(tokens[answered & ~correct])),
        "truncated_share": round(float(truncated.mean()), 4),
        "median_tokens_by_level": by_level,
    }


def format_summary(manifest: dict) -> str:
    """Every calibration check of a synthetic profile's manifest as plain-text tables."""
    cal = manifest["calibration"]
    tag = f"({LABEL})"
    lines = [
        f"Calibration of {manifest['name']} {tag}",
        f"  target {manifest['target_model']} on {manifest['hardware']}; "
        f"draft: {manifest['draft_model']}",
        "",
        f"Majority-vote accuracy on MATH-500, published protocol {tag}",
        "     N  published  simulated  diff (sim - pub)  stored branches (+- s.e. bound)",
    ]
    vote = cal["majority_vote"]
    errors = zip(vote["stored"], vote["stored_standard_error"], strict=True)
    stored = dict(zip(vote["stored_n"], errors, strict=True))
    for n, pub, sim in zip(vote["n"], vote["published"], vote["simulated"], strict=True):
        kept = f"{100 * stored[n][0]:5.1f} +- {100 * stored[n][1]:.1f}" if n in stored else ""
        diff = 100 * (sim - pub)
        lines.append(
            f"  {n:4d}  {100 * pub:9.1f}  {100 * sim:9.1f}  {diff:+16.1f}  {kept}".rstrip()
        )
    eff = cal["effective_answers"]
    lines += [
        "",
        f"Effective number of distinct answers, median over problems {tag}: published "
        f"{eff['published_median']:.2f}, simulated {eff['simulated_median']:.2f}",
        "",
        f"Response lengths of MATH-500 branches, tokens {tag}",
    ]
    lengths = cal["lengths"]
    for key in (
        "mean_tokens",
        "median_tokens",
        "median_tokens_correct",
        "median_tokens_wrong_answered",
        "truncated_share",
    ):
        lines.append(f"  {key:30s} {lengths[key]}")
    levels = ", ".join(f"L{k} {v:.0f}" for k, v in lengths["median_tokens_by_level"].items())
    lines += [f"  {'median_tokens_by_level':30s} {levels}", ""]
    if "length_correctness" in cal:
        lines += [*format_length_correctness(manifest), ""]
    lines.append(f"Decode step time, roofline vs published H100 measurements {tag}")
    lines.append("  measurement                                  measured  predicted  error  ok")
    for check in cal["latency_checks"]:
        lines.append(
            f"  {check['name']:44s} {check['measured_ms']:6.2f}ms {check['predicted_ms']:7.2f}ms"
            f" {100 * check['relative_error']:+5.1f}%  {'yes' if check['ok'] else 'NO'}"
        )
    lines += ["  sources:", *sorted({f"    {c['source']}" for c in cal["latency_checks"]})]
    means = ", ".join(f"{m} {a:.3f}" for m, a in cal["acceptance_means"].items())
    lines += ["", f"Mean per-token draft acceptance on MATH-500 {tag}: {means}"]
    return "\n".join(lines)


def target_row(name: str, target: float, tolerance: float, achieved: float, source: str) -> dict:
    """One calibration target as stored in a manifest's ``calibration_targets``."""
    return {
        "name": name,
        "target": round(float(target), 4),
        "tolerance": round(float(tolerance), 4),
        "achieved": round(float(achieved), 4),
        "ok": bool(abs(achieved - target) <= tolerance + 1e-9),
        "source": source,
    }


def format_length_correctness(manifest: dict) -> list[str]:
    """Lines comparing the profile's length-correctness figures with the published ones."""
    check = manifest["calibration"]["length_correctness"]
    published = check["published"]
    lines = [
        f"Length vs correctness on MATH-500 ({LABEL}): published per session vs simulated",
        "  figure                              published (5 sessions)   fitted  simulated  stored",
    ]
    for key, label in (
        ("auc", "within-problem AUC"),
        ("correlation", "pooled correlation r"),
        ("problems_with_both", "problems with both classes"),
    ):
        values = published[key]
        spread = f"{min(values):.4g} .. {max(values):.4g}"
        fit, sim, kept = (check[part][key] for part in ("fit", "simulated", "stored_branches"))
        lines.append(f"  {label:34s}  {spread:>22s}  {fit:7.4g}  {sim:9.4g}  {kept:6.4g}")
    lines.append(
        f"  without truncated branches: AUC {check['simulated']['answered_auc']:.3f}; "
        f"truncated share {check['simulated']['truncated_share']:.4f}"
    )
    return lines


def format_sensitivity(rows: list[dict]) -> str:
    """The length model refitted under other assumptions (`env.synthetic.lengths.sensitivity`)."""
    lines = [
        f"Length model refitted under other unsourced assumptions ({LABEL}); targets: "
        "within-problem AUC and pooled r of the real samples",
        "  variant                               ratio  slope    AUC       r  AUC answered"
        "  truncated  mean tokens",
    ]
    for row in rows:
        lines.append(
            f"  {row['variant']:36s} {row['wrong_ratio']:6.3f} {row['difficulty_slope']:6.3f}"
            f" {row['auc']:6.3f} {row['correlation']:7.3f} {row['answered_auc']:13.3f}"
            f" {row['truncated_share']:10.4f} {row['mean_tokens']:12.0f}"
        )
    return "\n".join(lines)


def calibration_table(manifest: dict) -> Table:
    """Every calibration target of a manifest, and the roofline's published-latency checks,
    in one table: target, tolerance, achieved, within tolerance, source."""
    table = Table(title=f"Calibration of {manifest['name']} ({LABEL})", show_lines=False)
    for column in ("check", "target", "tolerance", "achieved", "ok", "source"):
        justify = "left" if column in ("check", "source") else "right"
        table.add_column(column, justify=justify, overflow="fold")
    for row in manifest.get("calibration_targets", []):
        table.add_row(
            row["name"],
            f"{row['target']:.4g}",
            f"+-{row['tolerance']:.3g}",
            f"{row['achieved']:.4g}",
            "yes" if row["ok"] else "NO",
            row["source"],
        )
    for check in manifest["calibration"].get("latency_checks", []):
        table.add_row(
            f"decode step, {check['name']}",
            f"{check['measured_ms']:.3g} ms",
            f"+-{100 * check['tolerance']:.0f}%",
            f"{check['predicted_ms']:.3g} ms",
            "yes" if check["ok"] else "NO",
            check["source"],
        )
    return table


def _length_panels(axes, rows: list[dict], max_tokens: int) -> None:
    """Token histograms of right and wrong branches (each class sums to 1; wrong includes the
    truncated ones, at max_tokens), pooled and within problems (tokens over the problem's
    median, problems with both classes only)."""
    tokens = [np.asarray(r["branch_tokens"], dtype=float) for r in rows]
    correct = [np.asarray(r["branch_correct"], dtype=bool) for r in rows]
    both = [c.any() and not c.all() for c in correct]
    relative = np.concatenate([t / np.median(t) for t, b in zip(tokens, both, strict=True) if b])
    relative_correct = np.concatenate([c for c, b in zip(correct, both, strict=True) if b])
    tokens, correct = np.concatenate(tokens), np.concatenate(correct)
    truncated = (tokens >= max_tokens)[~correct].mean()
    panels = (
        (axes[0], tokens, correct, np.geomspace(16, max_tokens * 1.05, 40), "generated tokens"),
        (axes[1], relative, relative_correct, np.geomspace(0.2, 5, 40),
         "tokens / the problem's median tokens"),
    )  # fmt: skip
    for ax, values, right, bins, xlabel in panels:
        for mask, label, color in (
            (right, "right", "tab:green"),
            (~right, f"wrong ({truncated:.1%} of them cut at max_tokens)", "tab:red"),
        ):
            ax.hist(values[mask], bins=bins, histtype="step", color=color, label=label,
                    weights=np.full(mask.sum(), 1.0 / mask.sum()))  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("share of the class's MATH-500 branches")
    axes[0].legend(fontsize=7)
    axes[1].set_xticks([0.25, 0.5, 1, 2, 4], labels=["1/4", "1/2", "1", "2", "4"])
    axes[1].set_xticks([], minor=True)


def _vote_panel(ax, manifest: dict) -> None:
    """Majority-vote accuracy, published curve against the simulated and stored ones."""
    vote = manifest["calibration"]["majority_vote"]
    ax.plot(vote["n"], vote["published"], "o-", color="black", label="published (real samples)")
    ax.plot(vote["n"], vote["simulated"], "s--", color="tab:blue", label="simulated")
    ax.errorbar(vote["stored_n"], vote["stored"], yerr=vote["stored_standard_error"], fmt="x",
                color="tab:orange", label="stored branches")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (samples voted)")
    ax.set_ylabel("majority-vote accuracy, MATH-500")
    ax.legend(fontsize=7)


def save_plot(profile: str | Path, out: str | Path) -> Path:
    """Calibration plot of a saved profile (Agg backend, PNG): length distributions of right
    and wrong answers, pooled and within problems, and maj@N published vs simulated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = load_profile(profile)
    manifest, rows = loaded.manifest, loaded.split("test")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    _length_panels(axes[:2], rows, int(manifest["sampling"]["max_tokens"]))
    _vote_panel(axes[2], manifest)
    check = manifest["calibration"].get("length_correctness")
    if check:
        published = check["published"]
        axes[1].set_title(
            f"within-problem AUC {check['simulated']['auc']:.3f} (real "
            f"{min(published['auc']):.3f}-{max(published['auc']):.3f}), pooled r "
            f"{check['simulated']['correlation']:.3f} (real {max(published['correlation']):.3f}"
            f" to {min(published['correlation']):.3f})",
            fontsize=8,
        )
    axes[0].set_title("response lengths, pooled", fontsize=8)
    axes[2].set_title("majority vote", fontsize=8)
    fig.suptitle(f"{manifest['name']} ({LABEL}): calibration", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    from env.synthetic.generate import PLOT_NAME, PROFILE_NAME

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=PROFILE_NAME, help="profile name or folder")
    parser.add_argument(
        "--plot", type=Path, default=None, help=f"PNG path (default <profile>/{PLOT_NAME})"
    )
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    folder = resolve_profile_path(args.profile)
    manifest = json.loads((folder / "manifest.json").read_text())
    console = Console(width=max(Console().width, 140))
    console.print(calibration_table(manifest))
    if "length_correctness" in manifest["calibration"]:
        console.print("\n".join(format_length_correctness(manifest)))
    if not args.no_plot:
        plot = save_plot(folder, args.plot or folder / PLOT_NAME)
        console.print(f"plot: {plot}")


if __name__ == "__main__":
    main()
