"""Calibrated synthetic profile: Llama-3.2-1B-Instruct on an H100, built from public figures.

Why: the bundled real model is too weak at math (pass@1 ~3 %) for allocation to matter, and no
GPU or larger model is available here. This generator writes a profile in the format of real
profiles (`env.profiles.store`) whose behaviour follows public per-problem results, so the whole
pipeline (replay, training, evaluation) can be studied on a CPU. It is marked synthetic in its
manifest, and everything shown from it says "synthetic profile".

What is drawn, per problem (MATH-500 test problems, and MATH train problems):
- correctness: MATH-500 success rates of Llama-3.2-1B-Instruct over 1,280 samples
  (data/llama32_1b_math500_counts.json); a train problem takes the rate of a random MATH-500
  problem of the same subject and level;
- wrong answers: `env.synthetic.answers`, concentration calibrated to the published
  majority-vote curve and effective number of answers (data/llama32_1b_math500_majority.json);
- response lengths: `env.synthetic.lengths`, log-normal per problem, scaled by the MATH
  reference solution's length and by difficulty, cut at the source run's max_tokens (no
  answer); the wrong/correct ratio and the difficulty slope are fitted to the real
  within-problem AUC and pooled correlation of length for correctness
  (data/llama32_1b_math500_length_audit.json);
- per-token draft acceptance for ngram and a draft model;
- finish times of all N_max branches of a k = 0 call from the H100 roofline
  (`env.synthetic.roofline`).

Run ``python -m env.synthetic.generate`` (see ``--help``); it prints every calibration check,
lists each target with its achieved value in the manifest (``calibration_targets``) and draws
the calibration plot; ``--sensitivity`` refits the lengths under other values of the
assumptions that have no public figure. ``python -m env.synthetic.report`` shows a saved
profile's calibration.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from env.paths import data_dir, profiles_dir
from env.profiles.store import problem_fields, save_profile
from env.synthetic.answers import (
    CALIBRATION_EVALUATIONS,
    N_STICKS,
    AnswerModel,
    Calibration,
    build_answer_model,
    calibrate,
    simulate_votes,
    vote_check,
)
from env.synthetic.branches import (
    PARAMETERS,
    SAMPLING,
    SOURCE_RUN,
    acceptance,
    base_length_model,
    prompt_tokens,
    sample_branches,
    value,
)
from env.synthetic.lengths import (
    AUDIT_FILE,
    LengthDraws,
    LengthFit,
    LengthInputs,
    LengthMetrics,
    LengthModel,
    LengthTargets,
    fit_lengths,
    length_check,
    load_targets,
    sensitivity,
    simulate_sessions,
)
from env.synthetic.report import (
    format_sensitivity,
    format_summary,
    length_statistics,
    save_plot,
    target_row,
)
from env.synthetic.roofline import H100_SXM, K_GRID, SPEC_METHODS, RooflineModel, published_checks
from env.task.problems import MathProblem, load_math500, load_math_train

PROFILE_NAME = "synthetic-llama32-1b-h100"
TARGET_MODEL = "meta-llama/Llama-3.2-1B-Instruct"
COUNTS_FILE = "llama32_1b_math500_counts.json"
MAJORITY_FILE = "llama32_1b_math500_majority.json"
CALIBRATION_REPS = 12
CHECK_REPS = 64
VOTE_TOLERANCE = 0.02  # issue 5: majority-vote curve within +-2 points at every N
EFFECTIVE_TOLERANCE = 0.15  # relative: "close to the published median" effective answers
PASS1_TOLERANCE = 0.01  # stored branches keep the published mean success rate
PLOT_NAME = "calibration.png"
# 256 branches per problem, as in the public Llama-3.2-1B best-of-256 runs; calls run at most
# 64, so the evaluation's repeated draws of a 64-branch call are different samples (with 64
# recorded, every draw of such a call replayed the same race).
N_MAX = 256
MAX_CALL_BRANCHES = 64


@dataclass
class SyntheticProfile:
    """A generated profile: where it was written, its contents, and the answer distributions
    of its MATH-500 problems (in row order) for checks beyond the stored branches."""

    path: Path
    manifest: dict
    rows: list[dict]
    test_answers: AnswerModel


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a bundled JSON-lines file (for the reference solutions math_data drops)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_published() -> tuple[dict[str, float], dict]:
    """MATH-500 success rate per unique_id (pooled over the 5 sessions) and the curve file."""
    counts = json.loads((data_dir() / COUNTS_FILE).read_text())
    rates = {
        uid: sum(c) / sum(n)
        for uid, c, n in zip(counts["uids"], counts["counts"], counts["ns"], strict=True)
    }
    majority = json.loads((data_dir() / MAJORITY_FILE).read_text())["within_session"]
    return rates, majority


def train_success_rates(train, test, test_rates: np.ndarray, rng: np.random.Generator):
    """Success rate of each train problem: that of a random MATH-500 problem of the same
    subject and level (same subject when the level is unknown)."""
    by_cell, by_subject = defaultdict(list), defaultdict(list)
    for problem, rate in zip(test, test_rates, strict=True):
        by_cell[(problem.subject, problem.level)].append(rate)
        by_subject[problem.subject].append(rate)
    rates = np.empty(len(train))
    for i, problem in enumerate(train):
        pool = by_cell.get((problem.subject, problem.level)) or by_subject[problem.subject]
        rates[i] = pool[rng.integers(len(pool))]
    return rates


@dataclass
class _Problems:
    """MATH-500 problems (first) and the chosen train problems, with per-problem inputs:
    success rates, reference-solution tokens, length noise and stick uniforms; `lengths` and
    what follows from it (medians, no-answer rates) are set once the length model is fitted."""

    problems: list[MathProblem]
    n_test: int
    rates: np.ndarray
    solution_tokens: np.ndarray
    length_normals: np.ndarray
    sticks: np.ndarray
    lengths: LengthModel | None = None

    def length_inputs(self, split: slice = slice(None)) -> LengthInputs:
        """The length model's inputs of the problems in `split` (default all)."""
        return LengthInputs(
            self.solution_tokens[split], self.rates[split], self.length_normals[split]
        )

    @property
    def medians(self) -> np.ndarray:
        return self.lengths.medians(self.length_inputs())

    @property
    def p_none(self) -> np.ndarray:
        return self.lengths.no_answer_rates(self.medians, self.rates)


def _load_problems(rates: dict[str, float], seed: int, train_problems: int) -> _Problems:
    """Problems, success rates, solution lengths, length noise and stick uniforms."""
    streams = [np.random.default_rng([seed, stream]) for stream in range(4)]
    test = load_math500(source="bundled")
    train_all = load_math_train()
    count = min(train_problems, len(train_all))
    picked = np.sort(streams[0].permutation(len(train_all))[:count])
    train = [train_all[i] for i in picked]
    train_solutions = _read_jsonl(data_dir() / "math_train.jsonl.gz")
    solutions = [len(r["solution"]) for r in _read_jsonl(data_dir() / "math500.jsonl")]
    solutions += [len(train_solutions[i]["solution"]) for i in picked]
    test_rates = np.array([rates[p.id] for p in test])
    all_rates = np.concatenate(
        [test_rates, train_success_rates(train, test, test_rates, streams[1])]
    )
    solution_tokens = np.asarray(solutions, dtype=float) / value("chars_per_token")
    normals = streams[2].standard_normal(len(all_rates))
    sticks = streams[3].random((len(test) + len(train), N_STICKS))
    return _Problems(test + train, len(test), all_rates, solution_tokens, normals, sticks)


def _fit_lengths(data: _Problems, seed: int) -> tuple[LengthFit, LengthMetrics, LengthTargets]:
    """Fit the length model on MATH-500 and check it on fresh sessions."""
    targets = load_targets()
    inputs = data.length_inputs(slice(0, data.n_test))
    fit_draws = LengthDraws.draw(data.n_test, np.random.default_rng([seed, 6]))
    fit = fit_lengths(base_length_model(), inputs, fit_draws, targets)
    check_draws = LengthDraws.draw(data.n_test, np.random.default_rng([seed, 7]))
    return fit, simulate_sessions(fit.model, inputs, check_draws), targets


def _calibrated_answers(
    data: _Problems, majority: dict, seed: int, progress: bool
) -> tuple[AnswerModel, Calibration, np.ndarray, np.ndarray]:
    """Answer distributions of all problems with the concentration fitted on MATH-500, and a
    fresh check of the fit: per-problem vote accuracy (P_test, N) and effective answers."""
    rng = np.random.default_rng([seed, 4])
    n = data.n_test
    grid = tuple(majority["sel_grid"])
    share = value("one_off_share")
    draws = rng.random((n, CALIBRATION_REPS, grid[-1]))
    with tqdm(total=CALIBRATION_EVALUATIONS, desc="calibrate", disable=not progress) as bar:
        fit = calibrate(
            data.rates[:n],
            data.p_none[:n],
            data.sticks[:n],
            draws,
            share,
            grid,
            np.asarray(majority["selection"]),
            majority["eff_answers_median"],
            bar,
        )
    answers = build_answer_model(data.rates, data.p_none, data.sticks, fit.theta0, fit.boost, share)
    check_draws = rng.random((n, CHECK_REPS, grid[-1]))
    per_problem, effective = simulate_votes(answers.take(slice(0, n)), check_draws, grid)
    return answers, fit, per_problem, effective


def _rows(data: _Problems, answers: AnswerModel, seed: int, n_max: int, progress: bool):
    """One profile row per problem (finish times are added once the latency model exists)."""
    probs = answers.category_probs()
    medians = data.medians
    mean_rate = float(data.rates[: data.n_test].mean())
    rows = []
    for i, problem in enumerate(tqdm(data.problems, desc="branches", disable=not progress)):
        rng = np.random.default_rng([seed, 10, i])
        row = {
            **problem_fields(problem, "test" if i < data.n_test else "train"),
            "prompt_tokens": prompt_tokens(problem.problem),
            "branch_text": [""] * n_max,
        }
        row.update(sample_branches(probs[i], problem.answer, n_max, medians[i], data.lengths, rng))
        row["accept"] = acceptance(data.rates[i], medians[i], mean_rate, rng)
        rows.append(row)
    return rows


def _parameters(fit: Calibration, lengths: LengthModel, roofline: RooflineModel) -> dict:
    """Every parameter of the profile with its value and source."""
    calibrated = f"calibrated to {MAJORITY_FILE} (majority curve, effective answers)"
    fitted = (
        f"fitted to data/{AUDIT_FILE} (within-problem AUC and pooled correlation of length "
        "for correctness, real Llama-3.2-1B-Instruct MATH-500 samples; rlc-audit)"
    )
    parameters = {name: {"value": v, "source": s} for name, (v, s) in PARAMETERS.items()}
    parameters.update(
        {
            "success_rates": {"value": COUNTS_FILE, "source": SOURCE_RUN},
            "train_success_rates": {
                "value": "MATH-500 rate of a random problem of the same subject and level",
                "source": "issue 5: MATH-500 empirical distribution by level and subject",
            },
            "distractor_sticks": {"value": N_STICKS, "source": "modelling choice"},
            "distractor_theta0": {"value": fit.theta0, "source": calibrated},
            "distractor_hopeless_boost": {"value": fit.boost, "source": calibrated},
            "length_wrong_ratio": {"value": round(lengths.wrong_ratio, 4), "source": fitted},
            "length_difficulty_slope": {
                "value": round(lengths.difficulty_slope, 4),
                "source": f"{fitted}; harder problems get longer responses (Su et al. 2025, "
                "arXiv:2505.00127)",
            },
            **roofline.parameters(),
        }
    )
    return parameters


def _calibration_targets(
    calibration: dict, targets: LengthTargets, published_rate: float, stored_rate: float
) -> list[dict]:
    """Every calibration target with its tolerance, achieved value and source."""
    vote, eff = calibration["majority_vote"], calibration["effective_answers"]
    lengths = calibration["length_correctness"]["simulated"]
    curve_source = f"sampling-ceilings, data/{MAJORITY_FILE}"
    length_source = f"rlc-audit 'bon' arms, data/{AUDIT_FILE}"
    rows = [
        target_row(f"majority vote accuracy, N = {n}", pub, VOTE_TOLERANCE, sim, curve_source)
        for n, pub, sim in zip(vote["n"], vote["published"], vote["simulated"], strict=True)
    ]
    effective = eff["published_median"]
    others = (
        ("effective distinct answers, median over problems", effective,
         EFFECTIVE_TOLERANCE * effective, eff["simulated_median"], curve_source),
        ("within-problem AUC of length for correctness", targets.auc, targets.auc_tolerance,
         lengths["auc"], length_source),
        ("pooled correlation of length and correctness", targets.correlation,
         targets.correlation_tolerance, lengths["correlation"], length_source),
        ("success rate of stored MATH-500 branches", published_rate, PASS1_TOLERANCE,
         stored_rate, f"sampling-ceilings, data/{COUNTS_FILE}"),
    )  # fmt: skip
    return rows + [target_row(*spec) for spec in others]


def _add_finish_times(rows: list[dict], n_test: int) -> tuple[RooflineModel, dict]:
    """Roofline at the test split's typical context, and k = 0 finish times for every row."""
    test_rows = rows[:n_test]
    mean_prompt = np.mean([r["prompt_tokens"] for r in test_rows])
    mean_tokens = np.mean([np.mean(r["branch_tokens"]) for r in test_rows])
    roofline = RooflineModel(context_tokens=round(float(mean_prompt + mean_tokens / 2)))
    latency = roofline.latency_model()
    for row in rows:
        tokens, prompt = row["branch_tokens"], row["prompt_tokens"]
        finish = latency.branch_finish_times(tokens, 0, "ngram", 0.0, prompt)
        row["branch_finish_s"] = np.round(finish, 6).tolist()
    return roofline, latency.to_dict()


def generate(
    out: Path | None = None,
    seed: int = 0,
    n_max: int = N_MAX,
    train_problems: int = 7500,
    progress: bool = True,
    command: str | None = None,
    max_call_branches: int = MAX_CALL_BRANCHES,
) -> SyntheticProfile:
    """Generate, calibrate, check and save the synthetic profile; deterministic for a seed.

    ``n_max`` branches are recorded per problem and a replayed call runs at most
    ``max_call_branches`` of them (``ReplayBackend`` reads it from the manifest), so every
    draw of even the largest call is a new sample of the problem's branches.

    A little over 60 lines: the steps (fit, draw, check, save) are listed in the order the
    manifest records them, each a call or two."""
    if not 1 <= max_call_branches <= n_max:
        raise ValueError(f"max_call_branches={max_call_branches} must lie in 1..n_max={n_max}")
    started = time.monotonic()
    out = Path(out) if out is not None else profiles_dir() / PROFILE_NAME
    rates, majority = load_published()
    data = _load_problems(rates, seed, train_problems)
    length_fit, length_fresh, targets = _fit_lengths(data, seed)
    data.lengths = length_fit.model
    answers, fit, per_problem, effective = _calibrated_answers(data, majority, seed, progress)
    rows = _rows(data, answers, seed, n_max, progress)
    roofline, latency = _add_finish_times(rows, data.n_test)
    test_rows = rows[: data.n_test]
    calibration = {
        "majority_vote": vote_check(test_rows, majority, fit.curve, per_problem, seed),
        "effective_answers": {
            "published_median": majority["eff_answers_median"],
            "simulated_median": round(float(np.median(effective)), 3),
        },
        "length_correctness": length_check(test_rows, length_fit, length_fresh, targets),
        "lengths": length_statistics(test_rows),
        "latency_checks": published_checks(roofline),
        "acceptance_means": {
            m: round(float(np.mean([r["accept"][m] for r in test_rows])), 4) for m in SPEC_METHODS
        },
    }
    stored_rate = float(np.mean([np.mean(r["branch_correct"]) for r in test_rows]))
    published_rate = float(data.rates[: data.n_test].mean())
    manifest = {
        "name": out.name,
        "synthetic": True,
        "label": "synthetic profile",
        "target_model": TARGET_MODEL,
        "draft_model": roofline.draft.name,
        "hardware": H100_SXM.name,
        "vllm_version": None,
        "sampling": SAMPLING,
        "n_max": n_max,
        "max_call_branches": max_call_branches,
        "k_grid": list(K_GRID),
        "spec_methods": list(SPEC_METHODS),
        "token_logprobs": {
            "recorded": False,
            "why": "synthetic branches have no sampled tokens, so no log-probabilities: the "
            "race's confidence features read 0",
        },
        "seed": seed,
        "splits": {"test": data.n_test, "train": len(rows) - data.n_test},
        "latency_model": latency,
        "parameters": _parameters(fit, length_fit.model, roofline),
        "calibration_targets": _calibration_targets(
            calibration, targets, published_rate, stored_rate
        ),
        "calibration": calibration,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command or f"python -m env.synthetic.generate --out {out} --seed {seed}",
    }
    manifest["duration_s"] = round(time.monotonic() - started, 2)
    save_profile(out, manifest, rows)
    saved = json.loads((out / "manifest.json").read_text())
    return SyntheticProfile(out, saved, rows, answers.take(slice(0, data.n_test)))


def length_sensitivity(seed: int = 0) -> list[dict]:
    """`env.synthetic.lengths.sensitivity` on the MATH-500 problems, with the fit's draws."""
    rates, _ = load_published()
    data = _load_problems(rates, seed, train_problems=0)
    draws = LengthDraws.draw(data.n_test, np.random.default_rng([seed, 6]))
    inputs = data.length_inputs(slice(0, data.n_test))
    return sensitivity(base_length_model(), inputs, draws, load_targets())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=None, help=f"folder (default data/profiles/{PROFILE_NAME})"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-max", type=int, default=N_MAX, help="branches recorded per problem")
    parser.add_argument(
        "--max-call-branches",
        type=int,
        default=MAX_CALL_BRANCHES,
        help="most branches a replayed call runs (fewer than recorded: draws differ)",
    )
    parser.add_argument("--train-problems", type=int, default=7500, help="MATH train problems")
    parser.add_argument(
        "--sensitivity",
        action="store_true",
        help="only refit the length model under other values of its unsourced assumptions",
    )
    args = parser.parse_args(argv)
    if args.sensitivity:
        print(format_sensitivity(length_sensitivity(args.seed)))
        return
    command = "python -m env.synthetic.generate " + " ".join(sys.argv[1:] if argv is None else argv)
    profile = generate(args.out, args.seed, args.n_max, args.train_problems, True,
                       command.strip(), args.max_call_branches)  # fmt: skip
    print(format_summary(profile.manifest))
    plot = save_plot(profile.path, profile.path / PLOT_NAME)
    print(f"wrote {profile.path} in {profile.manifest['duration_s']:.1f} s; plot {plot}")


if __name__ == "__main__":
    main()
