"""Calibration statistics and the printed summary of a synthetic profile.

Kept apart from the generator so that the same numbers can be recomputed from any saved
profile (tests, reports), and so that every table printed from a synthetic profile carries the
words "synthetic profile" beside its numbers.
"""

from __future__ import annotations

import numpy as np

LABEL = "synthetic profile"


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
