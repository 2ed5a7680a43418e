"""A FAKE profile for tests: tiny, fast to build, and not calibrated against anything.

Tests of the environment, baselines and training need a profile with the real on-disk layout
(``env.profiles.store.save_profile``) but must not wait for the calibrated synthetic profile or
for an engine run.  This generator writes one from real MATH problem texts (so text features
have something to learn) with made-up branch outcomes: harder levels are less often right and
answer at greater length, wrong answers split over a few classes, and a toy roofline latency
model.  Its manifest says ``synthetic: true`` and ``generator: tests.fake_profile``; never use
its numbers as results.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from env.latency_model import NO_SPECULATION, SPEC_METHODS
from env.profiles.store import problem_fields, save_profile
from env.task.problems import load_math500, load_math_train

FAKE_K_GRID = (0, 1, 2, 4)


def fake_latency_model() -> dict:
    """A toy roofline: a step costs a fixed weight-read time plus compute per verified token."""
    batches = [1, 2, 4, 8, 16, 32, 64]
    steps: dict = {NO_SPECULATION: {"0": _table(batches, 0, draft_s=0.0)}}
    for method, draft_s in (("ngram", 0.0002), ("draft_model", 0.0015)):
        steps[method] = {str(k): _table(batches, k, draft_s) for k in FAKE_K_GRID}
    return {
        "source": "fake roofline (tests only)",
        "prefill_base_s": 0.02,
        "prefill_per_token_s": 2e-6,
        "call_overhead_s": 0.005,
        "steps": steps,
        "meta": {},
    }


def _table(batches: list[int], k: int, draft_s: float) -> dict:
    seconds = [0.006 + draft_s * (k + 1) + 1.5e-5 * b * (k + 1) for b in batches]
    return {"batch": batches, "seconds": seconds}


def _fake_row(problem, split: str, rng: np.random.Generator, n_branches: int) -> dict:
    level = problem.level or 3
    p_correct = float(np.clip(1.05 - 0.2 * level + rng.normal(0, 0.15), 0.0, 0.98))
    mean_tokens = 150 + 90 * level + 0.4 * len(problem.problem)
    tokens = np.maximum(rng.lognormal(np.log(mean_tokens), 0.35, n_branches).astype(int), 8)
    outcome = rng.random(n_branches)
    wrong = rng.choice(4, n_branches, p=[0.5, 0.25, 0.15, 0.1])
    labels = np.where(outcome < p_correct, -1, wrong)  # -1 = the gold answer, 0..3 = wrong ones
    answered = rng.random(n_branches) > 0.05
    answers = [
        None if not a else ("gold" if lab == -1 else f"wrong{lab}")
        for lab, a in zip(labels, answered, strict=True)
    ]
    first_seen: dict[str, int] = {}
    classes = [-1 if a is None else first_seen.setdefault(a, len(first_seen)) for a in answers]
    accept = {
        "ngram": float(np.clip(rng.normal(0.25, 0.1), 0.02, 0.9)),
        "draft_model": float(np.clip(rng.normal(0.6, 0.1), 0.05, 0.95)),
    }
    return {
        **problem_fields(problem, split),
        "prompt_tokens": int(40 + len(problem.problem) / 3.5),
        "branch_text": [""] * n_branches,
        "branch_answer": answers,
        "branch_class": classes,
        "branch_correct": [a == "gold" for a in answers],
        "branch_tokens": tokens.tolist(),
        "branch_finish_s": (tokens * 0.007).tolist(),
        "branch_finish_reason": ["stop"] * n_branches,
        "accept": accept,
    }


def make_fake_profile(
    folder: Path, n_train: int = 400, n_test: int = 100, n_branches: int = 16, seed: int = 0
) -> Path:
    """Write a fake profile of real MATH texts with invented outcomes; returns its folder."""
    rng = np.random.default_rng(seed)
    rows = [_fake_row(p, "train", rng, n_branches) for p in load_math_train(limit=n_train)]
    rows += [_fake_row(p, "test", rng, n_branches) for p in load_math500("bundled")[:n_test]]
    manifest = {
        "name": Path(folder).name,
        "synthetic": True,
        "generator": "tests.fake_profile (fake, for tests only)",
        "n_max": n_branches,
        "methods": list(SPEC_METHODS),
        "k_grid": list(FAKE_K_GRID),
        "latency_model": fake_latency_model(),
    }
    return save_profile(Path(folder), manifest, rows)
