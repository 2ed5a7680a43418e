"""Replay backend: answers test-time-scaling calls from a recorded profile in microseconds.

RL needs 10^5+ episodes and a live call takes seconds, so training replays: a call draws ``n``
of the problem's recorded branches, times them for the chosen ``k`` with the profile's latency
model (the live batch shrinks as branches finish, so every branch's finish time depends on the
others), and votes among those finished by the deadline, stopping once the vote is decided (the
rules are in ``env.backends.protocol``).

Everything that does not depend on the draw is precomputed per problem into numpy arrays:
decode steps per branch for every ``k`` (from the problem's draft acceptance), step seconds per
live batch size, answer classes and which class is right.  A call then costs a handful of small
numpy operations, which keeps the environment above 5,000 steps per second.

Draws are the first ``n`` entries of a random permutation of the recorded branches, so two calls
with equally seeded generators share their branches (common random numbers across actions).
``n`` larger than the number of recorded branches is rejected rather than sampled with
replacement: duplicated branches would vote twice with identical answers and overstate
agreement.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from env.backends.protocol import Outcome, ProblemInfo
from env.latency_model import LatencyModel, tokens_per_step
from env.profiles.store import Profile, load_profile
from env.task.voting import vote_in_finish_order

NO_SPECULATION = "none"


def choose_spec_method(profile: Profile) -> str:
    """The speculative method with the lowest predicted wall time on the training problems.

    Each method is scored by its best ``k`` per problem at ``n = 1`` and at all recorded
    branches, summed over (up to 200) training problems, so the default follows the profile's
    measurements instead of assuming which drafter wins on its hardware.
    """
    model = profile.latency_model()
    methods = [m for m in model.methods() if m != NO_SPECULATION]
    if not methods:
        return NO_SPECULATION
    rows = (profile.split("train") or profile.rows)[:200]

    def score(method: str) -> float:
        total = 0.0
        for row in rows:
            alpha = profile.acceptance(row, method)
            for tokens in (row["branch_tokens"][:1], row["branch_tokens"]):
                total += min(
                    model.predict_wall_time(tokens, k, method, alpha, row["prompt_tokens"])
                    for k in model.k_grid(method)
                )
        return total

    return min(methods, key=score)


class ReplayBackend:
    """Replays a profile's recorded branches under its latency model (see module docstring).

    Deterministic: equally seeded generators give equal outcomes.

    :param profile: a loaded ``Profile``, or a profile name or folder.
    :param split: which problems to serve: ``"train"``, ``"test"``, or ``"all"``.
    :param ids: if given, serve only the split's problems with these ids (e.g. a validation
        part of the training problems).
    :param method: speculative method whose ``k`` the actions choose; default: the profile's
        fastest (``choose_spec_method``).  ``k = 0`` uses the method's own k = 0 timing when
        profiled (a draft model still runs), else the profile's no-speculation timing.
    """

    deterministic = True

    def __init__(
        self,
        profile: Profile | str | Path,
        split: str = "train",
        method: str | None = None,
        ids: Collection[str] | None = None,
    ) -> None:
        self.profile = profile if isinstance(profile, Profile) else load_profile(profile)
        rows = self.profile.rows if split == "all" else self.profile.split(split)
        if ids is not None:
            ids = set(ids)
            rows = [r for r in rows if r["id"] in ids]
        if not rows:
            raise ValueError(f"profile {self.profile.name} has no {split!r} problems")
        self.latency_model: LatencyModel = self.profile.latency_model()
        self.method = method or choose_spec_method(self.profile)
        self._problems = tuple(
            ProblemInfo(i, r["id"], r["problem"], int(r["prompt_tokens"]), int(r["level"]),
                        r["subject"])
            for i, r in enumerate(rows)
        )  # fmt: skip
        self._max_branches = min(len(r["branch_tokens"]) for r in rows)
        self._k_grid, self._tables = self._timings()
        self._build_arrays(rows, self._tables)

    def _timings(self) -> tuple[tuple[int, ...], list[tuple[str, int]]]:
        """The k grid and the (method, k) latency table used for each k."""
        model = self.latency_model
        ks = model.k_grid(self.method)
        tables = [(self.method, k) for k in ks]
        if 0 not in ks and NO_SPECULATION in model.methods():
            tables.insert(0, (NO_SPECULATION, 0))
        return tuple(k for _, k in tables), tables

    def _build_arrays(self, rows: list[dict], timings: list[tuple[str, int]]) -> None:
        n_max, model = self._max_branches, self.latency_model
        self._tokens = np.stack([np.asarray(r["branch_tokens"][:n_max], float) for r in rows])
        self._classes = np.stack([np.asarray(r["branch_class"][:n_max], int) for r in rows])
        acceptance = [self.profile.acceptance(r, self.method) for r in rows]
        width = max(int(self._classes.max()) + 1, 1)
        self._class_correct: list[list[bool]] = []
        self._class_answer: list[list[str | None]] = []
        for i, row in enumerate(rows):
            answers: list[str | None] = [None] * width
            correct = [False] * width
            for b in range(n_max):
                c = self._classes[i, b]
                if c >= 0 and answers[c] is None:
                    answers[c] = row["branch_answer"][b]
                    correct[c] = bool(row["branch_correct"][b])
            self._class_answer.append(answers)
            self._class_correct.append(correct)
        self._k_index = {k: j for j, (_, k) in enumerate(timings)}
        self._tps = np.array([[tokens_per_step(a, k) for _, k in timings] for a in acceptance])
        # decode steps each branch needs, one row per (problem, k index)
        steps = np.ceil(np.maximum(self._tokens, 1.0)[:, None, :] / self._tps[:, :, None])
        self._steps = list(steps.reshape(len(rows) * len(timings), n_max))
        self._num_k = len(timings)
        batch = np.arange(n_max + 1)
        self._step_s = np.stack([model.step_time(batch, k, m) for m, k in timings])
        # seconds before decoding starts, per problem and branch count 0..n_max
        prompts = np.array([[p.prompt_tokens] for p in self._problems])
        self._start_s = model.call_overhead_s + model.prefill_time(prompts, np.arange(n_max + 1))

    @property
    def name(self) -> str:
        return self.profile.label

    @property
    def synthetic(self) -> bool:
        return self.profile.synthetic

    @property
    def problems(self) -> tuple[ProblemInfo, ...]:
        return self._problems

    @property
    def max_branches(self) -> int:
        return self._max_branches

    @property
    def k_grid(self) -> tuple[int, ...]:
        return self._k_grid

    def timing(self, k: int) -> tuple[str, int]:
        """The latency model's (method, k) table that times draft length ``k``."""
        return self._tables[self._k_index[k]]

    def _timeline(self, p: int, ki: int, drawn: np.ndarray) -> tuple:
        """Finish order of ``drawn``, sorted decode steps, finish times, step seconds, start."""
        n = len(drawn)
        steps = self._steps[p * self._num_k + ki][drawn]
        order = steps.argsort(kind="stable")
        sorted_steps = steps[order]
        increments = sorted_steps.copy()
        increments[1:] -= sorted_steps[:-1]
        step_s = self._step_s[ki, n:0:-1]  # step seconds while n, n-1, ..., 1 branches run
        start = self._start_s[p, n]
        finish = (increments * step_s).cumsum()
        finish += start
        return order, sorted_steps, finish, step_s, start

    def finish_times(self, problem_index: int, branches: np.ndarray, k: int) -> np.ndarray:
        """Finish time (s from call start) of the given recorded branches run together."""
        order, _, finish, _, _ = self._timeline(problem_index, self._k_index[k], branches)
        out = np.empty(len(branches))
        out[order] = finish
        return out

    def run(
        self, problem_index: int, n: int, k: int, deadline_s: float, rng: np.random.Generator
    ) -> Outcome:
        return self.run_deadlines(problem_index, n, k, (deadline_s,), rng)[0]

    def run_deadlines(
        self,
        problem_index: int,
        n: int,
        k: int,
        deadlines_s: Sequence[float],
        rng: np.random.Generator,
    ) -> list[Outcome]:
        """``run`` at several deadlines on one draw of branches (for hindsight searches)."""
        if not 1 <= n <= self._max_branches:
            raise ValueError(f"n={n} outside 1..{self._max_branches} (recorded branches)")
        if k not in self._k_index:
            raise ValueError(f"k={k} not in this backend's k grid {self._k_grid}")
        p, ki = problem_index, self._k_index[k]
        drawn = rng.permutation(self._max_branches)[:n]
        order, sorted_steps, finish, step_s, start = self._timeline(p, ki, drawn)
        branches = drawn[order]
        classes = self._classes[p, branches].tolist()
        tokens = self._tokens[p, branches]
        finished_tokens = tokens.cumsum()
        in_time = finish.searchsorted(deadlines_s, side="right").tolist()
        outcomes = []
        for deadline_s, finished in zip(deadlines_s, in_time, strict=True):
            vote = vote_in_finish_order(classes[:finished], n)
            done = vote.used
            latency = float(finish[done - 1]) if vote.decided else float(deadline_s)
            generated = float(finished_tokens[done - 1]) if done else 0.0
            if done < n and latency > start:  # aborted branches: tokens decoded until the stop
                since, before = (finish[done - 1], sorted_steps[done - 1]) if done else (start, 0)
                steps_done = (before + (latency - since) / step_s[done]) // 1.0
                decoded = np.minimum(tokens[done:], steps_done * self._tps[p, ki])
                generated += float(decoded.sum())
            answered = vote.winner >= 0
            outcome = Outcome(
                correct=answered and self._class_correct[p][vote.winner],
                answered=answered,
                answer_class=vote.winner,
                answer=self._class_answer[p][vote.winner] if answered else None,
                latency_s=latency,
                n=n,
                k=k,
                branches_finished=done,
                generated_tokens=int(generated),
                deadline_missed=not vote.decided and not answered,
            )
            outcomes.append(outcome)
        return outcomes
