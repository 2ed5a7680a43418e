"""Per-problem answer distributions for synthetic profiles, calibrated to published voting data.

Majority voting only helps when the correct answer out-polls the most popular wrong one, so a
synthetic profile needs realistic *wrong* answers, not just success rates. Each problem gets a
categorical distribution over answers:

    correct      p                      (published per-problem success rate)
    distractor j (1 - p - none) (1 - s) w_j,  w ~ GEM(theta) stick-breaking (J sticks)
    one-off      (1 - p - none) s + stick remainder: a new, unique wrong answer every draw
    no answer    none                   (truncated at max_tokens; from the length model)

theta = theta0 (1 + boost exp(-p / 0.05)): near-hopeless problems scatter their wrong answers
more. (theta0, boost) are calibrated by grid search so that majority-vote accuracy, simulated
with the protocol of the published curve, matches that curve at N = 1 ... 256, and the median
effective number of distinct answers is close to the published median. Simulations use common
random numbers, so the fitted curve is a smooth function of the parameters and the search is
deterministic for a seed.

Published protocol (sampling-ceilings, `within_session_curves`): draw N of a problem's answers
with replacement, bucket equal answers, every unparsed answer is its own bucket; the largest
bucket wins and ties go to the first seen (uniform among tied buckets); the effective number of
answers of a problem is 1 / sum_a q_a^2 over its 256 answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_STICKS = 48
"""Named distractors per problem; the stick-breaking remainder becomes one-off answers."""

HOPELESS_SCALE = 0.05
"""Success rate below which a problem counts as near-hopeless in the concentration boost."""

THETA_STEP = 1.0
THETA_GRID = (4.0, 5.0, 6.0, 7.0, 8.0, 9.0)
BOOST_GRID = (0.0, 1.0, 2.0, 3.0, 4.0)
CALIBRATION_EVALUATIONS = len(THETA_GRID) * len(BOOST_GRID) + 2


@dataclass
class AnswerModel:
    """Answer distributions of P problems (arrays over problems).

    :param p_correct: probability of the gold answer.
    :param p_none: probability of no answer (truncated response).
    :param distractors: (P, N_STICKS) probabilities of the named wrong answers.
    :param p_one_off: probability of a wrong answer seen only once.
    """

    p_correct: np.ndarray
    p_none: np.ndarray
    distractors: np.ndarray
    p_one_off: np.ndarray

    def category_probs(self) -> np.ndarray:
        """(P, N_STICKS + 3) over [correct, distractor 1..J, one-off, none]; rows sum to 1."""
        return np.column_stack([self.p_correct, self.distractors, self.p_one_off, self.p_none])

    def take(self, index) -> AnswerModel:
        """The distributions of a subset of problems (any numpy index)."""
        return AnswerModel(
            self.p_correct[index],
            self.p_none[index],
            self.distractors[index],
            self.p_one_off[index],
        )

    @property
    def one_off_index(self) -> int:
        return self.distractors.shape[1] + 1


def stick_breaking(uniforms: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """GEM(theta) weights from uniforms (P, J): v = 1 - (1 - u)^(1/theta), w_j = v_j prod(1 - v)."""
    v = 1.0 - (1.0 - uniforms) ** (1.0 / theta[:, None])
    remaining = np.cumprod(np.column_stack([np.ones(len(v)), 1.0 - v[:, :-1]]), axis=1)
    return v * remaining


def build_answer_model(
    p_correct: np.ndarray,
    p_none: np.ndarray,
    uniforms: np.ndarray,
    theta0: float,
    boost: float,
    one_off_share: float,
) -> AnswerModel:
    """Answer distributions from success rates, no-answer rates and stick uniforms (P, J)."""
    p_correct = np.asarray(p_correct, dtype=float)
    p_none = np.minimum(np.asarray(p_none, dtype=float), 1.0 - p_correct)
    theta = theta0 * (1.0 + boost * np.exp(-p_correct / HOPELESS_SCALE))
    weights = stick_breaking(uniforms, theta)
    wrong = 1.0 - p_correct - p_none
    named = wrong * (1.0 - one_off_share)
    distractors = named[:, None] * weights
    one_off = np.maximum(wrong - distractors.sum(axis=1), 0.0)
    return AnswerModel(p_correct, p_none, distractors, one_off)


def draw_categories(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Category index of each uniform for one problem (inverse CDF of `probs`)."""
    cdf = np.cumsum(probs)
    return np.minimum(np.searchsorted(cdf / cdf[-1], uniforms, side="right"), len(probs) - 1)


def _win_probability(real_counts: np.ndarray, n: int) -> np.ndarray:
    """P(gold bucket wins) over the last axis; index 0 is the gold answer, singletons excluded.

    With a largest real bucket of at least 2 only real buckets can tie for the lead; otherwise
    all n drawn answers are singleton buckets and each wins with probability 1/n.
    """
    top = real_counts.max(axis=-1)
    gold = real_counts[..., 0]
    ties = (real_counts == top[..., None]).sum(axis=-1)
    return np.where(top >= 2, (gold == top) / ties, np.where(gold == 1, 1.0 / n, 0.0))


def simulate_votes(
    model: AnswerModel, draws: np.ndarray, grid: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Majority-vote accuracy at each N of `grid` and per-problem effective answers.

    :param draws: (P, R, D) uniforms, D >= max(grid); the first N of each of the R replicates
        are its N answers (nested samples, each i.i.d.).
    :returns: (P, len(grid)) probability that the vote is right per problem and N, and the
        effective number of answers per problem from all D draws; both averaged over replicates.
    """
    probs = model.category_probs()
    n_problems, reps, n_draws = draws.shape
    n_cat = probs.shape[1]
    n_real = model.one_off_index  # gold + named distractors
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]
    # One search for all problems: problem i's CDF and uniforms are shifted by 2 i.
    shift = 2.0 * np.arange(n_problems)
    flat_cdf = (cdf + shift[:, None]).ravel()
    position = np.searchsorted(flat_cdf, (draws + shift[:, None, None]).ravel(), side="right")
    cats = position.reshape(draws.shape) - n_cat * np.arange(n_problems)[:, None, None]
    cats = np.minimum(cats, n_cat - 1)
    base = (np.arange(n_problems)[:, None] * reps + np.arange(reps)[None, :]) * n_cat
    index = cats + base[:, :, None]
    size = n_problems * reps * n_cat
    counts = np.zeros((n_problems, reps, n_cat), dtype=np.int64)
    done = 0
    accuracy = np.zeros((n_problems, len(grid)))
    effective = np.zeros(n_problems)
    for g, n in enumerate(grid):
        if n < done:
            raise ValueError("grid must be increasing")
        counts += np.bincount(index[:, :, done:n].ravel(), minlength=size).reshape(counts.shape)
        done = n
        accuracy[:, g] = _win_probability(counts[..., :n_real], n).mean(axis=1)
        if n == n_draws:
            singles = counts[..., n_real:].sum(axis=-1)
            share = ((counts[..., :n_real] / n) ** 2).sum(axis=-1)
            effective = (1.0 / (share + singles / n**2)).mean(axis=1)
    return accuracy, effective


def stored_vote_curve(
    classes: list[np.ndarray],
    gold_class: list[int],
    grid: tuple[int, ...],
    rng: np.random.Generator,
    reps: int = 200,
) -> np.ndarray:
    """Published-protocol vote accuracy of subsets of stored branches (without replacement).

    Subsets drawn without replacement from i.i.d. branches are i.i.d. samples themselves, so
    this estimates the same curve as `simulate_votes` for N up to the number stored. Class -1
    (no answer) branches are singleton buckets; `gold_class` is -1 when no branch is correct.
    """
    accuracy = np.zeros(len(grid))
    for branch_classes, gold in zip(classes, gold_class, strict=True):
        if gold < 0:
            continue
        branch_classes = np.asarray(branch_classes)
        n_stored = len(branch_classes)
        # gold -> label 0, other answers -> 1.., no answer -> n_cat (a dropped column)
        n_cat = int(branch_classes.max()) + 2
        labels = np.where(branch_classes == gold, 0, branch_classes + 1)
        labels = np.where(branch_classes < 0, n_cat, labels)
        order = np.argsort(rng.random((reps, n_stored)), axis=1)
        offsets = (n_cat + 1) * np.arange(reps)[:, None]
        for g, n in enumerate(grid):
            if n > n_stored:
                raise ValueError(f"N={n} exceeds the {n_stored} stored branches")
            chosen = labels[order[:, :n]] + offsets
            counts = np.bincount(chosen.ravel(), minlength=reps * (n_cat + 1))
            counts = counts.reshape(reps, n_cat + 1)[:, :n_cat]
            accuracy[g] += _win_probability(counts, n).mean()
    return accuracy / len(classes)


@dataclass(frozen=True)
class Calibration:
    """Result of `calibrate`: chosen parameters and the fit they give."""

    theta0: float
    boost: float
    curve: list[float]
    effective_median: float
    max_abs_error: float


def calibrate(
    p_correct: np.ndarray,
    p_none: np.ndarray,
    uniforms: np.ndarray,
    draws: np.ndarray,
    one_off_share: float,
    grid: tuple[int, ...],
    published_curve: np.ndarray,
    published_effective_median: float,
    progress=None,
) -> Calibration:
    """Coarse-to-fine grid search of (theta0, boost).

    Loss: worst absolute curve error plus the relative error of the median effective number of
    answers, weighted 10 points per 100 %. Every boost of `BOOST_GRID` is tried with the whole
    `THETA_GRID` step; then theta0 is refined by half a step around the best pair.
    """

    def evaluate(theta0: float, boost: float) -> tuple[float, Calibration]:
        model = build_answer_model(p_correct, p_none, uniforms, theta0, boost, one_off_share)
        accuracy, effective = simulate_votes(model, draws, grid)
        curve = accuracy.mean(axis=0)
        worst = float(np.abs(curve - published_curve).max())
        median = float(np.median(effective))
        loss = worst + 0.1 * abs(median / published_effective_median - 1.0)
        if progress is not None:
            progress.update(1)
        return loss, Calibration(theta0, boost, curve.tolist(), median, worst)

    tried = [evaluate(t, b) for b in BOOST_GRID for t in THETA_GRID]
    best = min(tried, key=lambda pair: pair[0])[1]
    half = THETA_STEP / 2
    tried += [evaluate(best.theta0 + d, best.boost) for d in (-half, half)]
    return min(tried, key=lambda pair: pair[0])[1]


def gold_class_of(row: dict) -> int:
    """Class id of the correct answer among a row's branches; -1 if no branch is correct."""
    correct = np.asarray(row["branch_correct"], dtype=bool)
    return int(np.asarray(row["branch_class"])[correct][0]) if correct.any() else -1


def vote_check(
    test_rows: list[dict], majority: dict, fit_curve: list, per_problem: np.ndarray, seed: int
) -> dict:
    """Published majority-vote curve against the fitted distributions and the stored branches."""
    grid = tuple(majority["sel_grid"])
    n_max = len(test_rows[0]["branch_class"])
    stored_n = tuple(n for n in grid if n <= n_max)
    stored = stored_vote_curve(
        [np.asarray(r["branch_class"]) for r in test_rows],
        [gold_class_of(r) for r in test_rows],
        stored_n,
        np.random.default_rng([seed, 5]),
    )
    # The stored curve is one draw of n_max branches per problem: a per-problem outcome with
    # success probability q has variance at most q (1 - q).
    q = per_problem[:, : len(stored_n)]
    stored_error = np.sqrt((q * (1 - q)).sum(axis=0)) / len(test_rows)
    return {
        "protocol": "published (sampling-ceilings within_session_curves)",
        "n": list(grid),
        "published": majority["selection"],
        "simulated": np.round(per_problem.mean(axis=0), 4).tolist(),
        "calibration_fit": np.round(fit_curve, 4).tolist(),
        "stored_n": list(stored_n),
        "stored": np.round(stored, 4).tolist(),
        "stored_standard_error": np.round(stored_error, 4).tolist(),
    }
