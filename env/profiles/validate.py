"""Validation of a real profile's latency model against live calls it was not fitted on.

    python -m env.profiles.validate --profile smollm2-135m-cpu --calls 16 [--seed 0]

Replay trusts the latency model for every wall time, so it has to predict calls it has not
seen.  This starts the profile's engines with the profile's settings and runs calls on
MATH-500 problems that are not in the profile, at random (method, n, k) from the profile's
grids, with natural response lengths.  Each call's wall time is predicted from what replay
knows about a call: n, k, the branches' token counts, the prompt length and the acceptance
(here measured from the call's own per-branch vLLM metrics, as the profiler measures it per
problem).
It prints a table and the median and 90th-percentile relative error, and writes them to
``validation.json`` in the profile folder.  Targets: median <= 10 %, p90 <= 25 %.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from env.latency_model import NO_SPECULATION, LatencyModel, relative_errors
from env.profiles.calibrate import effective_acceptance
from env.profiles.record import ProfileSettings, build_engines
from env.profiles.store import Profile, load_profile, write_json
from env.task.problems import load_math500
from env.task.prompt import build_user_message

TARGETS = {"median": 0.10, "p90": 0.25}


def profile_settings(profile: Profile) -> ProfileSettings:
    """The settings a profile was recorded with (lists back to tuples)."""
    stored = profile.manifest["settings"]
    return ProfileSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})


def profile_models(profile: Profile) -> tuple[str | None, str | None]:
    """(target, draft) a profile was recorded with; None where it used the bundled ones.

    Reads both manifest spellings: the current one (``model_identity`` records) and the
    earlier one (absolute paths into the local model cache, readable as "bundled" when the
    folder is the cache's bundled model).
    """
    from engine.model_assets import TARGET_NAME

    def bundled_or_name(record: dict | str | None) -> str | None:
        if not record:
            return None
        if isinstance(record, dict):
            return None if record.get("bundled") else record["name"]
        name = Path(record).name  # earlier manifests: a path into the model cache
        return None if name.startswith(TARGET_NAME) else record

    model = bundled_or_name(profile.manifest["model"])
    draft = profile.manifest.get("draft") or {}
    if isinstance(draft, dict) and "path" in draft:  # earlier manifests
        draft = draft["path"]
    return model, bundled_or_name(draft)


def profile_engines(profile: Profile, kv_cache_gb: float, seed: int) -> dict:
    """Start the engines a real profile was recorded with (its methods, settings and models),
    ``{method: VLLMEngine}``; a synthetic profile has none and is refused."""
    if profile.synthetic:
        raise SystemExit(f"{profile.label} has no engine to validate against")
    methods = list(profile.manifest["spec_methods"])
    return build_engines(
        methods, profile_settings(profile), kv_cache_gb, seed, *profile_models(profile)
    )


def plan_calls(profile: Profile, methods: list[str], calls: int, seed: int) -> list[dict]:
    """Random (problem, method, n, k) on MATH-500 problems absent from the profile."""
    rng = np.random.default_rng(seed)
    profiled = {r["id"] for r in profile.rows}
    fresh = [p for p in load_math500() if p.id not in profiled]
    n_max = int(profile.manifest["n_max"])
    n_grid = sorted({n for n in (1, 2, 4, 8, 16, 32) if n <= n_max} | {n_max})
    k_grid = [int(k) for k in profile.manifest["k_grid"]]
    plan = []
    for index in rng.permutation(len(fresh))[:calls]:
        method = methods[rng.integers(len(methods))]
        ks = [0] if method == NO_SPECULATION else k_grid
        plan.append(
            {
                "problem": fresh[index],
                "method": method,
                "n": int(n_grid[rng.integers(len(n_grid))]),
                "k": int(ks[rng.integers(len(ks))]),
            }
        )
    return plan


def predict_call(model: LatencyModel, rollout, method: str) -> dict:
    """The model's wall time for a finished call, and the acceptance it used."""
    tokens = [b.token_count for b in rollout.branches]
    alpha = 0.0
    if rollout.k > 0:
        accepted = sum(b.accepted_tokens for b in rollout.branches)
        alpha = effective_acceptance([(rollout.k, sum(tokens), accepted)])
    predicted = model.predict_wall_time(tokens, rollout.k, method, alpha, rollout.prompt_tokens)
    first_token = (
        model.call_overhead_s
        + model.prefill_time(rollout.prompt_tokens, rollout.n)
        + float(model.step_time(rollout.n, rollout.k, method))
    )
    return {"alpha": round(alpha, 4), "predicted_s": predicted, "predicted_ttft_s": first_token}


def summarize(records: list[dict]) -> dict:
    """Median and p90 relative error of the predictions, and whether they meet the targets."""
    errors = relative_errors(
        [r["predicted_s"] for r in records], [r["measured_s"] for r in records]
    )
    signed = np.array([r["predicted_s"] / r["measured_s"] - 1 for r in records])
    summary = {
        "calls": len(records),
        "median_rel_error": float(np.median(errors)),
        "p90_rel_error": float(np.quantile(errors, 0.9)),
        "mean_signed_error": float(signed.mean()),
        "targets": TARGETS,
    }
    summary["meets_targets"] = bool(
        summary["median_rel_error"] <= TARGETS["median"]
        and summary["p90_rel_error"] <= TARGETS["p90"]
    )
    return summary


def format_table(records: list[dict], summary: dict) -> str:
    head = (
        f"{'method':<12}{'n':>3}{'k':>3}{'prompt':>7}{'tokens max/mean':>17}{'alpha':>7}"
        f"{'ttft s':>8}{'pred':>7}{'wall s':>9}{'pred':>8}{'error':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        tokens = f"{max(r['tokens'])}/{np.mean(r['tokens']):.0f}"
        error = r["predicted_s"] / r["measured_s"] - 1
        lines.append(
            f"{r['method']:<12}{r['n']:>3}{r['k']:>3}{r['prompt_tokens']:>7}{tokens:>17}"
            f"{r['alpha']:>7.2f}{r['ttft_s']:>8.2f}{r['predicted_ttft_s']:>7.2f}"
            f"{r['measured_s']:>9.2f}{r['predicted_s']:>8.2f}{error:>+8.1%}"
        )
    lines.append(
        f"relative error over {summary['calls']} calls: median {summary['median_rel_error']:.1%}"
        f" (target <= {TARGETS['median']:.0%}), p90 {summary['p90_rel_error']:.1%} (target <= "
        f"{TARGETS['p90']:.0%}); mean signed {summary['mean_signed_error']:+.1%}"
    )
    return "\n".join(lines)


def validate(profile: Profile, engines: dict, plan: list[dict], progress: bool = True) -> dict:
    """Run the planned calls, predict each, and return the records and summary."""
    model = profile.latency_model()
    max_tokens = int(profile.manifest["sampling"]["max_tokens"])
    records = []
    for call in tqdm(plan, desc="validate", unit="call", disable=not progress):
        prompt = build_user_message(call["problem"].problem)
        rollout = engines[call["method"]].run(
            prompt, n=call["n"], k=call["k"], max_tokens=max_tokens
        )
        records.append(
            {
                "id": call["problem"].id,
                "method": call["method"],
                "n": call["n"],
                "k": call["k"],
                "prompt_tokens": rollout.prompt_tokens,
                "tokens": [b.token_count for b in rollout.branches],
                "measured_s": rollout.wall_s,
                "ttft_s": rollout.ttft_s,
                **predict_call(model, rollout, call["method"]),
            }
        )
    return {"records": records, "summary": summarize(records)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True, help="profile name or folder")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-gb", type=float, default=1.0)
    args = parser.parse_args(argv)
    command = "python -m env.profiles.validate " + " ".join(sys.argv[1:] if argv is None else argv)
    profile = load_profile(args.profile)
    engines = profile_engines(profile, args.kv_cache_gb, args.seed)
    started, load_at_start = time.monotonic(), os.getloadavg()
    try:
        result = validate(
            profile, engines, plan_calls(profile, list(engines), args.calls, args.seed)
        )
    finally:
        for engine in engines.values():
            engine.shutdown()
    print(format_table(result["records"], result["summary"]))
    result.update(
        profile=profile.name,
        command=command.strip(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        duration_s=round(time.monotonic() - started, 1),
        load_average_at_start=[round(x, 2) for x in load_at_start],
        load_average_at_end=[round(x, 2) for x in os.getloadavg()],
        calibration_started=(profile.manifest.get("calibrations") or [{}])[-1].get("started"),
    )
    write_json(profile.path / "validation.json", result)
    print(f"wrote {profile.path / 'validation.json'}")


if __name__ == "__main__":
    main()
