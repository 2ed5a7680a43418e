"""What one synthetic problem's branches look like: lengths, acceptance, answers.

Split from the generator (`env.synthetic.generate`) so that the per-problem model and every
parameter behind it, each with its source, can be read in one place. Lengths are log-normal
per problem, with a median that grows with the MATH reference solution's length and with
difficulty, longer for wrong answers, and cut at the source run's max_tokens (such a branch has
no answer). Per-token draft acceptance is drawn per problem around cited means.
"""

from __future__ import annotations

import math

import numpy as np

from env.synthetic.answers import N_STICKS, draw_categories
from env.task.prompt import build_user_message

SOURCE_RUN = (
    "HuggingFaceH4/Llama-3.2-1B-Instruct-best-of-N-completions (MATH-500, T=0.8, top_p=1.0, "
    "max_tokens=2048), graded and summarised in github.com/bay-yearick-lab/sampling-ceilings "
    "(data/SOURCES.md)"
)
SAMPLING = {"temperature": 0.8, "top_p": 1.0, "max_tokens": 2048}
# name -> (value, source); every number the generator uses, written into the manifest.
ASSUMED = "assumption (no public figure found for this model and task)"
PARAMETERS: dict[str, tuple[object, str]] = {
    "sampling": (SAMPLING, SOURCE_RUN),
    "chars_per_token": (3.5, "assumption: Llama-3 tokenizer on English/LaTeX text"),
    "chat_template_tokens": (
        40,
        "assumption: Llama-3 chat template (system header with date lines, role headers)",
    ),
    "one_off_share": (
        0.15,
        f"{ASSUMED}: share of answered-wrong responses whose answer no other sample gives",
    ),
    "length_median_correct_tokens": (
        380,
        f"{ASSUMED}: median correct response at the median MATH-500 reference solution",
    ),
    "length_solution_exponent": (
        0.45,
        "responses grow with the reference solution (MATH-500 solution medians rise 4.3x from "
        "level 1 to 5 in data/math500.jsonl); sub-linear exponent is an assumption",
    ),
    "length_difficulty_slope": (
        0.6,
        "harder problems get longer responses (Su et al. 2025, 'Between Underthinking and "
        "Overthinking', arXiv:2505.00127); log-length slope per unit success rate assumed",
    ),
    "length_problem_sigma": (0.25, f"{ASSUMED}: per-problem log-length noise"),
    "length_branch_sigma": (0.45, f"{ASSUMED}: within-problem log-length spread"),
    "length_wrong_ratio": (
        1.4,
        "wrong responses are longer than correct ones on the same question (Su et al. 2025; "
        "Zeng et al. 2025, arXiv:2502.12215); ratio of medians assumed",
    ),
    "min_tokens": (16, "assumption: shortest response that states a boxed answer"),
    "accept_draft_model_mean": (
        0.65,
        "Leviathan et al. 2023 (ICML, arXiv:2211.17192) Table 3: per-token acceptance of small "
        "same-family drafts at T=1 is 0.53-0.74 (T5-small..large for T5-XXL, LaMDA 100M-8B for "
        "LaMDA 137B); mid value for a one-layer draft",
    ),
    "accept_draft_model_difficulty_slope": (
        0.10,
        f"{ASSUMED}: acceptance falls on harder (higher-entropy) problems",
    ),
    "accept_draft_model_concentration": (40, f"{ASSUMED}: Beta concentration across problems"),
    "accept_ngram_mean": (
        0.20,
        "Leviathan et al. 2023 Table 3: n-gram (bigram) drafts reach per-token acceptance "
        "0.05-0.23 at T=0; vLLM's ngram drafts only where the context repeats",
    ),
    "accept_ngram_length_exponent": (
        0.3,
        "repetitive long traces favour n-gram drafting (Sun et al. 2025, 'Scaling Up, Speeding "
        "Up', arXiv:2509.04474); exponent on relative response length assumed",
    ),
    "accept_ngram_concentration": (30, f"{ASSUMED}: Beta concentration across problems"),
}


def value(name: str):
    """The value of a parameter of `PARAMETERS`."""
    return PARAMETERS[name][0]


def prompt_tokens(problem: str) -> int:
    """Estimated chat-formatted prompt tokens: characters / chars_per_token + template."""
    chars = len(build_user_message(problem))
    return math.ceil(chars / value("chars_per_token")) + value("chat_template_tokens")


def length_medians(solution_chars: np.ndarray, rates: np.ndarray, rng: np.random.Generator):
    """Median response tokens per problem when correct (wrong ones are `length_wrong_ratio` x)."""
    solution_tokens = solution_chars / value("chars_per_token")
    reference = np.median(solution_tokens)
    log_median = (
        math.log(value("length_median_correct_tokens"))
        + value("length_solution_exponent") * np.log(np.maximum(solution_tokens, 1) / reference)
        + value("length_difficulty_slope") * (0.5 - rates)
        + value("length_problem_sigma") * rng.standard_normal(len(rates))
    )
    return np.exp(log_median)


def truncation_rate(median_tokens: np.ndarray) -> np.ndarray:
    """P(log-normal length with this median > max_tokens)."""
    z = (math.log(SAMPLING["max_tokens"]) - np.log(median_tokens)) / value("length_branch_sigma")
    return 0.5 * np.array([math.erfc(x / math.sqrt(2)) for x in z])


def draw_lengths(median: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n log-normal lengths below max_tokens (rejection sampling), at least min_tokens."""
    cap, sigma = SAMPLING["max_tokens"], value("length_branch_sigma")
    out = median * np.exp(sigma * rng.standard_normal(n))
    while (over := out >= cap).any():
        out[over] = median * np.exp(sigma * rng.standard_normal(int(over.sum())))
    return np.clip(np.round(out), value("min_tokens"), cap - 1).astype(int)


def acceptance(rate: float, median: float, mean_rate: float, rng: np.random.Generator) -> dict:
    """Per-token acceptance alpha of each speculative method on one problem."""
    draft = value("accept_draft_model_mean") + value("accept_draft_model_difficulty_slope") * (
        rate - mean_rate
    )
    relative = median / value("length_median_correct_tokens")
    ngram = value("accept_ngram_mean") * relative ** value("accept_ngram_length_exponent")
    alphas = {}
    for method, mean, kappa in (
        ("ngram", ngram, value("accept_ngram_concentration")),
        ("draft_model", draft, value("accept_draft_model_concentration")),
    ):
        mean = min(max(mean, 0.02), 0.95)
        alphas[method] = round(float(rng.beta(mean * kappa, (1 - mean) * kappa)), 4)
    return alphas


def sample_branches(
    probs: np.ndarray, gold: str, n_max: int, median: float, rng: np.random.Generator
) -> dict:
    """n_max i.i.d. branches of one problem: classes by first appearance, answers, lengths."""
    cats = draw_categories(probs, rng.random(n_max))
    one_off, none = N_STICKS + 1, N_STICKS + 2
    tokens = np.full(n_max, SAMPLING["max_tokens"])
    correct = cats == 0
    tokens[correct] = draw_lengths(median, int(correct.sum()), rng)
    wrong = (cats > 0) & (cats != none)
    tokens[wrong] = draw_lengths(median * value("length_wrong_ratio"), int(wrong.sum()), rng)
    keys, classes, answers = {}, [], []
    for b, cat in enumerate(cats.tolist()):
        if cat == none:
            classes.append(-1)
            answers.append(None)
            continue
        key = ("once", b) if cat == one_off else cat
        classes.append(keys.setdefault(key, len(keys)))
        answers.append(
            gold if cat == 0 else f"wrong-once-{b}" if cat == one_off else f"wrong-{cat}"
        )
    return {
        "branch_class": classes,
        "branch_correct": correct.tolist(),
        "branch_answer": answers,
        "branch_tokens": tokens.tolist(),
        "branch_finish_reason": ["length" if c == none else "stop" for c in cats.tolist()],
    }
