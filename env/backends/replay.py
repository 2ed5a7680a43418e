"""Replay backend: answers test-time-scaling calls from a recorded profile in microseconds.

RL needs 10^5+ episodes and a live call takes seconds, so training replays: a call draws ``n``
of the problem's recorded branches, times them for the chosen ``k`` with the profile's latency
model (the live batch shrinks as branches finish, so every branch's finish time depends on the
others), and votes among those finished by the deadline, stopping once the vote is decided (the
rules are ``env.task.voting``'s).

Everything that does not depend on the draw is precomputed per problem into numpy arrays:
decode steps per branch for every ``k`` (from the problem's draft acceptance), step seconds per
live batch size, answer classes and which class is right.  A call then costs a handful of small
numpy operations, which keeps the environment above 5,000 steps per second.

Background load (other calls' branches sharing the engine batch) slows every step of a call:
the step table covers batches up to ``MAX_ENGINE_BATCH``, beyond this call's own branches, and
``under_load(L)`` gives a view of the backend whose steps run at batch ``live + L`` (the same k
for the whole batch: vLLM's k is engine-wide).  With no load the tables are the recorded ones.

Draws are the first ``n`` entries of a random permutation of the recorded branches
(``branch_order``), so two calls with equally seeded generators share their branches (common
random numbers across actions).  ``n`` larger than ``max_branches`` is rejected rather than
sampled with replacement: duplicated branches would vote twice with identical answers and
overstate agreement.  A profile may record more branches per problem than a call may run
(manifest ``max_call_branches``): then even the largest call is a fresh sample of the recorded
ones on every draw, where a call of every recorded branch would replay one race on every draw
and an evaluation's repeated draws would not be independent.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from env.backends.protocol import Outcome, ProblemInfo
from env.latency_model import NO_SPECULATION, LatencyModel, StepTableKey, tokens_per_step
from env.profiles.store import Profile, load_profile
from env.task.voting import vote_in_finish_order

MAX_ENGINE_BATCH = 512
"""The step table covers live batches 0..max(this, recorded branches): a call's own branches
plus background load.  The latency model extrapolates linearly past its largest calibrated
batch (256 on the synthetic H100 profile)."""


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


class FinishSchedule(NamedTuple):
    """When the drawn branches of one call finish if nothing stops it, in finish order."""

    order: np.ndarray
    """Positions in the draw, in finish order (stable: ties keep draw order)."""
    steps: np.ndarray
    """Decode steps each branch needs, in finish order."""
    finish_s: np.ndarray
    """Finish time of each branch, seconds from the call's start, in finish order."""
    step_s: np.ndarray
    """Seconds per decode step while n, n-1, ..., 1 branches run."""
    start_s: float
    """Seconds before decoding starts (call overhead and prefill)."""


class ReplayBackend:
    """Replays a profile's recorded branches under its latency model (see module docstring).

    Deterministic: equally seeded generators give equal outcomes.

    The precomputed tables are public (read-only) so that other replays of the same profile,
    such as a race driven step by step, share them instead of recomputing:

    :ivar branch_tokens: (problems, recorded_branches) tokens each recorded branch generated.
    :ivar branch_classes: (problems, recorded_branches) answer class per branch, -1 for no answer.
    :ivar class_correct: per problem, whether each answer class is right.
    :ivar class_answer: per problem, each answer class's text (its first member's).
    :ivar branch_confidence: (problems, recorded_branches, 2) each branch's mean and lowest windowed
        token log-probability (NaN where unknown), or None when the profile has none.
    :ivar tokens_per_step: (problems, k slots) expected tokens per decode step.
    :ivar step_seconds: (k slots, max_batch + 1) seconds of a decode step per live batch of this
        call (on a view ``under_load(L)``, column b holds the step time at engine batch b + L).
    :ivar background_branches: the load L this view runs under (0: the idle engine).
    :ivar start_seconds: (problems, max_branches + 1) seconds before decoding starts, per n.

    :param profile: a loaded ``Profile``, or a profile name or folder.
    :param split: which problems to serve: ``"train"``, ``"test"``, or ``"all"``.
    :param ids: if given, serve only the split's problems with these ids (e.g. a validation
        part of the training problems).
    :param method: speculative method whose ``k`` the actions choose; default: the profile's
        fastest (``choose_spec_method``).  ``k = 0`` uses the method's own k = 0 timing when
        profiled (a draft model still runs), else the profile's no-speculation timing.
    """

    deterministic = True
    background_branches = 0

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
        self.recorded_branches = min(len(r["branch_tokens"]) for r in rows)
        cap = int(self.profile.manifest.get("max_call_branches", self.recorded_branches))
        self._max_branches = min(self.recorded_branches, cap)
        self._step_table_keys = self._keys_per_k_slot()
        self._k_grid = tuple(key.k for key in self._step_table_keys)
        self._slot_of_k = {k: slot for slot, k in enumerate(self._k_grid)}
        self._build_arrays(rows)

    def _keys_per_k_slot(self) -> list[StepTableKey]:
        """The step table timing each offered k, in k order: the method's own tables, with the
        no-speculation table as k = 0 when the method has none."""
        model = self.latency_model
        keys = [StepTableKey(self.method, k) for k in model.k_grid(self.method)]
        if 0 not in model.k_grid(self.method) and NO_SPECULATION in model.methods():
            keys.insert(0, StepTableKey(NO_SPECULATION, 0))
        return keys

    def _build_arrays(self, rows: list[dict]) -> None:
        n_max, model, keys = self.recorded_branches, self.latency_model, self._step_table_keys
        self.branch_tokens = np.stack([np.asarray(r["branch_tokens"][:n_max], float) for r in rows])
        self.branch_classes = np.stack([np.asarray(r["branch_class"][:n_max], int) for r in rows])
        width = max(int(self.branch_classes.max()) + 1, 1)
        self.class_correct: list[list[bool]] = []
        self.class_answer: list[list[str | None]] = []
        for i, row in enumerate(rows):
            answers: list[str | None] = [None] * width
            correct = [False] * width
            for b in range(n_max):
                c = self.branch_classes[i, b]
                if c >= 0 and answers[c] is None:
                    answers[c] = row["branch_answer"][b]
                    correct[c] = bool(row["branch_correct"][b])
            self.class_answer.append(answers)
            self.class_correct.append(correct)
        self.branch_confidence = (
            np.stack([np.column_stack([r["branch_mean_logprob"][:n_max],
                                       r["branch_lowest_window_logprob"][:n_max]])
                      for r in rows])
            if self.profile.has_logprobs else None
        )  # fmt: skip
        acceptance = [self.profile.acceptance(r, self.method) for r in rows]
        self.tokens_per_step = np.array([[tokens_per_step(a, key.k) for key in keys]
                                         for a in acceptance])  # fmt: skip
        # decode steps each branch needs, one row per (problem, k slot)
        steps = np.ceil(
            np.maximum(self.branch_tokens, 1.0)[:, None, :] / self.tokens_per_step[:, :, None]
        )
        self._steps = list(steps.reshape(len(rows) * len(keys), n_max))
        batch = np.arange(max(MAX_ENGINE_BATCH, n_max) + 1)
        self._engine_step_seconds = np.stack(
            [model.step_time(batch, key.k, key.method) for key in keys]
        )
        self.step_seconds = self._engine_step_seconds
        self._views: dict[int, ReplayBackend] = {0: self}
        prompts = np.array([[p.prompt_tokens] for p in self._problems])
        calls = batch[: self._max_branches + 1]
        self.start_seconds = model.call_overhead_s + model.prefill_time(prompts, calls)

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

    def branch_order(self, rng: np.random.Generator) -> np.ndarray:
        """A random order of the recorded branches; a call of ``n`` runs its first ``n``."""
        return rng.permutation(self.recorded_branches)

    @property
    def k_grid(self) -> tuple[int, ...]:
        return self._k_grid

    @property
    def max_batch(self) -> int:
        """The largest engine batch (this call's branches plus load) the step table covers."""
        return self._engine_step_seconds.shape[1] - 1

    def under_load(self, background_branches: int) -> ReplayBackend:
        """This backend with ``background_branches`` other branches in every engine step.

        A view sharing every table but the step table, which is shifted by the load: a call of
        n branches then replays (``run``, ``finish_times``, ``ReplayRace``) at batches
        n + L, n - 1 + L, ..., 1 + L.  The load is absolute (not added to a view's own);
        prefill is unchanged (it is timed per call, not per batch).  Views are cached.
        """
        view = self._views.get(background_branches)
        if view is None:
            if not 0 <= background_branches <= self.max_batch - self._max_branches:
                raise ValueError(
                    f"load {background_branches} outside 0..{self.max_batch - self._max_branches}"
                    f" (the step table covers batches up to {self.max_batch})"
                )
            view = copy.copy(self)
            view.background_branches = background_branches
            view.step_seconds = self._engine_step_seconds[:, background_branches:]
            self._views[background_branches] = view
        return view

    def k_slot(self, k: int) -> int:
        """The row of ``tokens_per_step``/``step_seconds`` that draft length ``k`` uses."""
        return self._slot_of_k[k]

    def step_table_key(self, k: int) -> StepTableKey:
        """The latency model's step table that times draft length ``k``."""
        return self._step_table_keys[self._slot_of_k[k]]

    def _finish_schedule(self, p: int, slot: int, drawn: np.ndarray) -> FinishSchedule:
        n = len(drawn)
        steps = self._steps[p * len(self._step_table_keys) + slot][drawn]
        order = steps.argsort(kind="stable")
        sorted_steps = steps[order]
        increments = sorted_steps.copy()
        increments[1:] -= sorted_steps[:-1]
        step_s = self.step_seconds[slot, n:0:-1]  # step seconds while n, n-1, ..., 1 branches run
        start = self.start_seconds[p, n]
        finish = (increments * step_s).cumsum()
        finish += start
        return FinishSchedule(order, sorted_steps, finish, step_s, start)

    def finish_times(self, problem_index: int, branches: np.ndarray, k: int) -> np.ndarray:
        """Finish time (s from call start) of the given recorded branches run together."""
        schedule = self._finish_schedule(problem_index, self._slot_of_k[k], branches)
        out = np.empty(len(branches))
        out[schedule.order] = schedule.finish_s
        return out

    def run(
        self, problem_index: int, n: int, k: int, deadline_s: float, rng: np.random.Generator
    ) -> Outcome:
        return self.run_one_draw(problem_index, n, k, (deadline_s,), rng)[0]

    def run_one_draw(
        self,
        problem_index: int,
        n: int,
        k: int,
        stop_times_s: Sequence[float],
        rng: np.random.Generator,
    ) -> list[Outcome]:
        """One draw of ``n`` branches, answered as if the call stopped at each of
        ``stop_times_s``: ``run`` at several deadlines on the same branches, for the searches
        that compare budgets and deadlines in hindsight (one outcome per stop time)."""
        if not 1 <= n <= self._max_branches:
            cap, recorded = self._max_branches, self.recorded_branches
            raise ValueError(
                f"n={n} outside 1..{cap}: a call runs at most {cap} of the {recorded} "
                "recorded branches"
            )
        if k not in self._slot_of_k:
            raise ValueError(f"k={k} not in this backend's k grid {self._k_grid}")
        p, slot = problem_index, self._slot_of_k[k]
        drawn = self.branch_order(rng)[:n]
        order, sorted_steps, finish, step_s, start = self._finish_schedule(p, slot, drawn)
        branches = drawn[order]
        classes = self.branch_classes[p, branches].tolist()
        tokens = self.branch_tokens[p, branches]
        finished_tokens = tokens.cumsum()
        in_time = finish.searchsorted(stop_times_s, side="right").tolist()
        outcomes = []
        for stop_s, finished in zip(stop_times_s, in_time, strict=True):
            vote = vote_in_finish_order(classes[:finished], n)
            done = vote.used
            latency = float(finish[done - 1]) if vote.decided else float(stop_s)
            generated = float(finished_tokens[done - 1]) if done else 0.0
            if done < n and latency > start:  # aborted branches: tokens decoded until the stop
                since, before = (finish[done - 1], sorted_steps[done - 1]) if done else (start, 0)
                steps_done = (before + (latency - since) / step_s[done]) // 1.0
                decoded = np.minimum(tokens[done:], steps_done * self.tokens_per_step[p, slot])
                generated += float(decoded.sum())
            answered = vote.winner >= 0
            outcome = Outcome(
                correct=answered and self.class_correct[p][vote.winner],
                answered=answered,
                answer_class=vote.winner,
                answer=self.class_answer[p][vote.winner] if answered else None,
                latency_s=latency,
                n=n,
                k=k,
                branches_finished=done,
                generated_tokens=int(generated),
                deadline_missed=not vote.decided and not answered,
            )
            outcomes.append(outcome)
        return outcomes
