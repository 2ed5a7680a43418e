"""What one synthetic problem's branches look like: answers, lengths, acceptance.

Split from the generator (`env.synthetic.generate`) so that the per-problem model and every
parameter behind it, each with its source, can be read in one place. Lengths follow
`env.synthetic.lengths` (log-normal per problem, cut at the source run's max_tokens, where a
branch has no answer); the length parameters without a public figure are listed here, the two
fitted to the real length-correctness figures are added by the generator. Per-token draft
acceptance is drawn per problem around cited means.
"""

from __future__ import annotations

import math

import numpy as np

from env.synthetic.answers import N_STICKS, draw_categories
from env.synthetic.lengths import LengthModel
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
        f"{ASSUMED}: median correct response at the median MATH-500 reference solution; "
        "sensitivity: python -m env.synthetic.generate --sensitivity",
    ),
    "length_solution_exponent": (
        0.45,
        "responses grow with the reference solution (MATH-500 solution medians rise 4.3x from "
        "level 1 to 5 in data/math500.jsonl); sub-linear exponent is an assumption",
    ),
    "length_problem_sigma": (
        0.25,
        f"{ASSUMED}: per-problem log-length noise; sensitivity: --sensitivity",
    ),
    "length_branch_sigma": (
        0.45,
        f"{ASSUMED}: within-problem log-length spread (coefficient of variation ~0.47); no "
        "public per-problem spread found for Llama-3.2-1B-Instruct; sensitivity: --sensitivity",
    ),
    "max_tokens": (
        SAMPLING["max_tokens"],
        "search-and-learn default max_tokens=2048 (github.com/huggingface/search-and-learn "
        "src/sal/config.py), named in the source run's config (...--max_tokens-2048--...); "
        "a branch that reaches it has no answer",
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


def base_length_model() -> LengthModel:
    """The length model with the listed values; the generator fits its ratio and slope."""
    return LengthModel(
        median_correct_tokens=value("length_median_correct_tokens"),
        solution_exponent=value("length_solution_exponent"),
        problem_sigma=value("length_problem_sigma"),
        branch_sigma=value("length_branch_sigma"),
        max_tokens=value("max_tokens"),
        min_tokens=value("min_tokens"),
    )


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
    probs: np.ndarray,
    gold: str,
    n_max: int,
    median: float,
    lengths: LengthModel,
    rng: np.random.Generator,
) -> dict:
    """n_max i.i.d. branches of one problem: classes by first appearance, answers, lengths."""
    cats = draw_categories(probs, rng.random(n_max))
    one_off, none = N_STICKS + 1, N_STICKS + 2
    correct = cats == 0
    pair = np.array([median, lengths.wrong_ratio * median])
    below = lengths.below_cap(pair)
    tokens = lengths.tokens(
        np.where(correct, pair[0], pair[1]), rng.random(n_max), np.where(correct, *below)
    )
    tokens[cats == none] = lengths.max_tokens
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
