"""Response lengths of synthetic branches, and their calibration to real per-sample evidence.

Why a module of its own: lengths are what the latency controller races on, so how length relates
to correctness decides whether "stop early, the slow branches are wrong" can pay. An assumed
ratio (wrong answers 1.4x longer) once made it pay on the synthetic profile, while the real
samples of the same model say otherwise. Here the relation is fitted to the real figures, and
every assumption beside it is explicit and swept (`sensitivity`).

Model, per problem q with success rate p_q (MATH-500 or a same-cell train rate):

    median_q   = m0 (s_q / s_med)^e exp(b (0.5 - p_q) + sigma_p z_q)     correct responses
    correct    ~ LogNormal(median_q, sigma_b)                    conditioned below max_tokens
    wrong      ~ LogNormal(rho median_q, sigma_b)                conditioned below max_tokens
    no answer  : P = (1 - p_q) P[LogNormal(rho median_q, sigma_b) >= max_tokens]; such a
                 branch ran to max_tokens (finish reason "length") and is graded wrong

with s_q the reference solution's length in tokens. The wrong/correct ratio rho and the
difficulty slope b are fitted (`fit_lengths`) to two figures of the real Llama-3.2-1B-Instruct
best-of-256 MATH-500 samples (HuggingFaceH4 search-and-learn, T = 0.8, max_tokens = 2048)
measured by github.com/wdi1024/rlc-audit (data/llama32_1b_math500_length_audit.json, 5
sessions): the within-problem AUC of length for correctness (per problem, P[a correct sample
is longer than a wrong one], ties 1/2, averaged over problems whose 256 samples hold both
classes; 0.442-0.447) and the Pearson correlation of length and correctness pooled over all
samples (-0.287 to -0.296). Lengths there are completion tokens, and completions cut at
max_tokens count, as wrong; `simulate_sessions` measures the model the same way. m0, e,
sigma_p and sigma_b have no public figure for this model and run (nor has the share of
completions cut at max_tokens, which follows from them); `sensitivity` refits under other
values. Draws use inverse CDFs of fixed uniforms, so the metrics are smooth in the parameters
and the fit is deterministic.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from env.paths import data_dir

AUDIT_FILE = "llama32_1b_math500_length_audit.json"
SESSION_SAMPLES = 256
SESSIONS = 5


@dataclass(frozen=True)
class LengthInputs:
    """Per-problem inputs of the length model (arrays over problems): reference-solution
    tokens s_q, success rates p_q and standard-normal length noise z_q."""

    solution_tokens: np.ndarray
    rates: np.ndarray
    normals: np.ndarray


@dataclass(frozen=True)
class LengthModel:
    """Parameters of the length model (module docstring); values are tokens or log-scale.

    :param median_correct_tokens: m0, median correct response at the median reference solution.
    :param solution_exponent: e, growth with the reference solution's length.
    :param difficulty_slope: b, log-length gain per unit of success rate below 0.5.
    :param problem_sigma: sigma_p, per-problem log-length noise.
    :param branch_sigma: sigma_b, within-problem log-length spread.
    :param wrong_ratio: rho, median of answered-wrong over correct responses, same problem.
    :param max_tokens: the source run's generation cap.
    :param min_tokens: shortest response that states a boxed answer.
    """

    median_correct_tokens: float = 380.0
    solution_exponent: float = 0.45
    difficulty_slope: float = 0.6
    problem_sigma: float = 0.25
    branch_sigma: float = 0.45
    wrong_ratio: float = 1.0
    max_tokens: int = 2048
    min_tokens: int = 16

    def medians(self, inputs: LengthInputs) -> np.ndarray:
        """Median correct-response tokens per problem."""
        solution_tokens = np.maximum(inputs.solution_tokens, 1)
        log_median = (
            math.log(self.median_correct_tokens)
            + self.solution_exponent * np.log(solution_tokens / np.median(solution_tokens))
            + self.difficulty_slope * (0.5 - np.asarray(inputs.rates))
            + self.problem_sigma * np.asarray(inputs.normals)
        )
        return np.exp(log_median)

    def below_cap(self, medians: np.ndarray) -> np.ndarray:
        """P[LogNormal(median, sigma_b) < max_tokens], elementwise."""
        z = (math.log(self.max_tokens) - np.log(medians)) / self.branch_sigma
        return normal_cdf(z)

    def no_answer_rates(self, medians: np.ndarray, rates: np.ndarray) -> np.ndarray:
        """Per-problem share of branches that run to max_tokens: wrong ones past the cap."""
        return (1.0 - np.asarray(rates)) * (1.0 - self.below_cap(self.wrong_ratio * medians))

    def tokens(self, medians: np.ndarray, uniforms: np.ndarray, below=None) -> np.ndarray:
        """Answered-branch lengths: the uniforms' quantiles of the log-normal below the cap.

        :param below: `below_cap(medians)` when the caller has it per problem (it is the slow
            part, and constant over a problem's branches).
        """
        below = self.below_cap(medians) if below is None else below
        z = normal_quantile(np.asarray(uniforms) * below)
        out = np.round(medians * np.exp(self.branch_sigma * z))
        return np.clip(out, self.min_tokens, self.max_tokens - 1).astype(int)


def normal_cdf(z: np.ndarray) -> np.ndarray:
    """Standard normal CDF, elementwise (numpy has no erf; the arrays here are per problem)."""
    flat = np.asarray(z, dtype=float).ravel()
    values = [0.5 * math.erfc(-x / math.sqrt(2.0)) for x in flat.tolist()]
    return np.asarray(values).reshape(np.shape(z))


# Rational approximation of the normal quantile (P. J. Acklam, 2003; relative error < 1.2e-9),
# vectorised here because branch lengths need it for every draw.
_CENTRAL_NUM = (-39.69683028665376, 220.9460984245205, -275.9285104469687, 138.3577518672690,
                -30.66479806614716, 2.506628277459239)  # fmt: skip
_CENTRAL_DEN = (-54.47609879822406, 161.5858368580409, -155.6989798598866, 66.80131188771972,
                -13.28068155288572, 1.0)  # fmt: skip
_TAIL_NUM = (-0.007784894002430293, -0.3223964580411365, -2.400758277161838, -2.549732539343734,
             4.374664141464968, 2.938163982698783)  # fmt: skip
_TAIL_DEN = (0.007784695709041462, 0.3224671290700398, 2.445134137142996, 3.754408661907416,
             1.0)  # fmt: skip
_TAIL_P = 0.02425


def normal_quantile(p: np.ndarray) -> np.ndarray:
    """Standard normal quantile of probabilities in (0, 1), elementwise."""
    p = np.clip(np.asarray(p, dtype=float), 1e-300, 1.0 - 1e-16)
    out = np.empty_like(p)
    central = (p >= _TAIL_P) & (p <= 1.0 - _TAIL_P)
    q = p[central] - 0.5
    r = q * q
    out[central] = q * np.polyval(_CENTRAL_NUM, r) / np.polyval(_CENTRAL_DEN, r)
    for tail, sign in ((p < _TAIL_P, 1.0), (p > 1.0 - _TAIL_P, -1.0)):
        small = p[tail] if sign > 0 else 1.0 - p[tail]
        t = np.sqrt(-2.0 * np.log(small))
        out[tail] = sign * np.polyval(_TAIL_NUM, t) / np.polyval(_TAIL_DEN, t)
    return out


@dataclass(frozen=True)
class LengthTargets:
    """Published length-correctness figures (mean over the audit's sessions) and tolerances."""

    auc: float
    auc_tolerance: float
    correlation: float
    correlation_tolerance: float
    source: str


def load_targets() -> LengthTargets:
    """Targets from the bundled audit figures (data/llama32_1b_math500_length_audit.json);
    tolerances are issue 12's: +-0.01 on the AUC, +-0.03 on the correlation."""
    audit = json.loads((data_dir() / AUDIT_FILE).read_text())
    auc = np.asarray(audit["auc_len_construct_within"])
    corr = np.asarray(audit["r_len_construct"])
    return LengthTargets(
        auc=round(float(auc.mean()), 4),
        auc_tolerance=0.01,
        correlation=round(float(corr.mean()), 4),
        correlation_tolerance=0.03,
        source=audit["source"],
    )


@dataclass(frozen=True)
class LengthDraws:
    """Fixed uniforms of simulated sessions, (P, sessions, samples) each: which category a
    sample falls in (correct / no answer / answered wrong) and where in its length law."""

    category: np.ndarray
    length: np.ndarray

    @classmethod
    def draw(cls, n_problems: int, rng: np.random.Generator, sessions: int = SESSIONS):
        shape = (n_problems, sessions, SESSION_SAMPLES)
        return cls(rng.random(shape), rng.random(shape))


@dataclass(frozen=True)
class LengthMetrics:
    """Length-correctness statistics of simulated sessions, each averaged over sessions.

    :param auc: within-problem AUC, P[correct longer than wrong] (ties 1/2), mean over problems
        whose session has both classes.
    :param correlation: Pearson correlation of tokens and correctness pooled over problems.
    :param answered_auc: the same AUC with no-answer (truncated) samples left out.
    :param problems_with_both: problems entering the AUC, per session.
    :param truncated_share: share of samples that ran to max_tokens.
    :param mean_tokens: mean generated tokens per sample.
    """

    auc: float
    correlation: float
    answered_auc: float
    problems_with_both: float
    truncated_share: float
    mean_tokens: float


def within_problem_auc(tokens: np.ndarray, correct: np.ndarray, keep=None) -> tuple[float, int]:
    """Mean Mann-Whitney AUC of (tokens, correct) over rows with both classes, ties counted
    1/2, and the number of such rows; a row is one problem's session, tokens are non-negative
    integers, and `keep` (boolean, like tokens) leaves samples out."""
    tokens = np.asarray(tokens, dtype=np.int64)
    correct = np.asarray(correct, dtype=bool)
    keep = np.ones(tokens.shape, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    # Per row, a histogram over token counts of each class; a correct sample beats the wrong
    # ones below its count and ties with those at it.
    bins, n_rows = int(tokens.max()) + 1, tokens.shape[0]
    cell = tokens + bins * np.arange(n_rows)[:, None]

    def histogram(mask: np.ndarray) -> np.ndarray:
        return np.bincount(cell[mask], minlength=bins * n_rows).reshape(n_rows, bins)

    positive, negative = histogram(correct & keep), histogram(~correct & keep)
    shorter_negatives = np.cumsum(negative, axis=1) - negative
    wins = (positive * (shorter_negatives + 0.5 * negative)).sum(axis=1)
    n_pos, n_neg = positive.sum(axis=1), negative.sum(axis=1)
    both = (n_pos > 0) & (n_neg > 0)
    return float((wins[both] / (n_pos[both] * n_neg[both])).mean()), int(both.sum())


def session_metrics(tokens: np.ndarray, correct: np.ndarray, truncated: np.ndarray):
    """`LengthMetrics` of (P, sessions, samples) arrays, computed per session as the audit
    does (one seed = one session of every problem) and averaged over sessions."""
    stats = []
    for s in range(tokens.shape[1]):
        t, c, cut = tokens[:, s], correct[:, s], truncated[:, s]
        auc, both = within_problem_auc(t, c)
        answered, _ = within_problem_auc(t, c, keep=~cut)
        corr = float(np.corrcoef(t.ravel(), c.ravel().astype(float))[0, 1])
        stats.append((auc, corr, answered, both, float(cut.mean()), float(t.mean())))
    return LengthMetrics(*(float(v) for v in np.mean(stats, axis=0)))


def simulate_sessions(model: LengthModel, inputs: LengthInputs, draws: LengthDraws):
    """`LengthMetrics` of sessions of i.i.d. samples: correct w.p. p_q, no answer w.p. the
    model's no-answer rate, otherwise answered wrong, each with its length law."""
    rates = np.asarray(inputs.rates)
    medians = model.medians(inputs)
    p_none = model.no_answer_rates(medians, rates)
    correct = draws.category < np.asarray(rates)[:, None, None]
    truncated = ~correct & (draws.category < (rates + p_none)[:, None, None])
    # Per problem: (median, P[below the cap]) when correct and when answered wrong.
    right, wrong = medians[:, None, None], model.wrong_ratio * medians[:, None, None]
    scale = np.where(correct, right, wrong)
    below = np.where(correct, model.below_cap(right), model.below_cap(wrong))
    tokens = model.tokens(scale, draws.length, below)
    tokens = np.where(truncated, model.max_tokens, tokens)
    return session_metrics(tokens, correct, truncated)


@dataclass(frozen=True)
class LengthFit:
    """Result of `fit_lengths`: the fitted model and the metrics it gives on the fit's draws."""

    model: LengthModel
    metrics: LengthMetrics
    evaluations: int


def fit_lengths(
    base: LengthModel,
    inputs: LengthInputs,
    draws: LengthDraws,
    targets: LengthTargets,
    max_iterations: int = 12,
) -> LengthFit:
    """Fit (wrong_ratio, difficulty_slope) of `base` to the AUC and correlation targets.

    Newton's method on (log rho, b) with a forward-difference Jacobian: the AUC moves mostly
    with rho and the pooled correlation mostly with b (difficulty couples length to the success
    rate across problems), so the system is well conditioned. Stops within a tenth of each
    tolerance.
    """
    goal = np.array([targets.auc, targets.correlation])
    scale = np.array([targets.auc_tolerance, targets.correlation_tolerance]) / 10
    step = np.array([0.02, 0.05])
    evaluations = 0

    def at(x: np.ndarray) -> tuple[LengthModel, LengthMetrics, np.ndarray]:
        nonlocal evaluations
        evaluations += 1
        model = replace(base, wrong_ratio=float(np.exp(x[0])), difficulty_slope=float(x[1]))
        metrics = simulate_sessions(model, inputs, draws)
        return model, metrics, np.array([metrics.auc, metrics.correlation]) - goal

    x = np.array([math.log(base.wrong_ratio), base.difficulty_slope])
    model, metrics, miss = at(x)
    for _ in range(max_iterations):
        if np.all(np.abs(miss) <= scale):
            break
        jacobian = np.column_stack(
            [(at(x + step * unit)[2] - miss) / step[i] for i, unit in enumerate(np.eye(2))]
        )
        move = np.linalg.solve(jacobian, -miss)
        x = x + np.clip(move, -0.5, 0.5)
        model, metrics, miss = at(x)
    return LengthFit(model, metrics, evaluations)


SENSITIVITY: tuple[tuple[str, dict], ...] = (
    ("as generated", {}),
    ("within-problem spread sigma_b 0.30", {"branch_sigma": 0.30}),
    ("within-problem spread sigma_b 0.60", {"branch_sigma": 0.60}),
    ("median correct m0 300 tokens", {"median_correct_tokens": 300.0}),
    ("median correct m0 480 tokens", {"median_correct_tokens": 480.0}),
    ("per-problem noise sigma_p 0.15", {"problem_sigma": 0.15}),
    ("per-problem noise sigma_p 0.35", {"problem_sigma": 0.35}),
)
"""One-at-a-time changes of the length assumptions that have no public figure. The spread and
the median set how many wrong branches reach max_tokens, i.e. how much of the published AUC
below 1/2 comes from truncated branches rather than from longer answered-wrong ones."""


def sensitivity(
    base: LengthModel, inputs: LengthInputs, draws: LengthDraws, targets: LengthTargets
) -> list[dict]:
    """Refit (rho, b) under each variant of `SENSITIVITY`; one row of results per variant."""
    rows = []
    for label, change in SENSITIVITY:
        fit = fit_lengths(replace(base, **change), inputs, draws, targets)
        rows.append(
            {
                "variant": label,
                "wrong_ratio": fit.model.wrong_ratio,
                "difficulty_slope": fit.model.difficulty_slope,
                **asdict(fit.metrics),
            }
        )
    return rows


def length_check(
    test_rows: list[dict], fit: LengthFit, check: LengthMetrics, targets: LengthTargets
) -> dict:
    """Length-correctness figures: published, fitted, re-simulated, and of the stored branches
    (n_max per problem instead of a 256-sample session, so fewer problems have both classes)."""

    def column(key: str, dtype=None) -> np.ndarray:
        return np.array([r[key] for r in test_rows], dtype=dtype)[:, None, :]

    truncated = column("branch_finish_reason") == "length"
    stored = session_metrics(column("branch_tokens"), column("branch_correct", bool), truncated)
    audit = json.loads((data_dir() / AUDIT_FILE).read_text())

    def rounded(metrics: LengthMetrics) -> dict:
        return {k: round(v, 4) for k, v in asdict(metrics).items()}

    return {
        "protocol": "one session of 256 i.i.d. samples per MATH-500 problem, averaged over 5 "
        "sessions; AUC per problem with ties 1/2, mean over problems with both classes; "
        "Pearson r pooled over all samples; truncated samples count as wrong at max_tokens",
        "published": {
            "auc": audit["auc_len_construct_within"],
            "correlation": audit["r_len_construct"],
            "problems_with_both": audit["within_n"],
            "source": targets.source,
        },
        "fit": rounded(fit.metrics),
        "simulated": rounded(check),
        "stored_branches": rounded(stored),
    }
