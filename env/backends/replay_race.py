"""A replayed call, event by event, so a controller can act while the branches run.

``ReplayBackend.run`` answers a whole call at once for a fixed (n, k).  An online controller
decides *during* the call (stop now, change k), so this module replays the same call as a
race: engine steps advance the live branches, a branch finishes when its recorded tokens are
decoded, and the call pauses at decision points (after each engine step in which branches
finished, and at fixed fractions of the deadline when nothing finished) for the controller.

Exactness: with k fixed and no early stop, finish times, votes and latency equal
``ReplayBackend.run`` on the same draw (same permutation of recorded branches, same step
table, same prefill); tests check it.  Branches count decode steps as integers at the current
k; when k changes, the tokens still to decode are converted to steps at the new k (expected
tokens per step of the problem's acceptance, as in the latency model).  Decisions happen at
engine-step boundaries, as on the live engine: a checkpoint fraction of the deadline is taken
at the end of the last step that ends before it.  A finished branch passes its recorded
confidence (token log-probability summary) to the state when the profile has one.

Under background load, replay a view of the backend (``ReplayBackend.under_load``): its step
table is shifted by the load, so every step runs at batch live + L with the call's k for the
whole batch, and the race tells its state the load (``RaceState.background_branches``) unless
``observe_load`` is off.  With no load nothing changes, so the exactness above holds for any
fixed load as well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from env.backends.protocol import Outcome
from env.backends.replay import ReplayBackend
from env.race import DEFAULT_CHECKPOINTS, BranchConfidence, RaceState


class ReplayRace:
    """One call of ``backend`` on ``problem_index`` under ``deadline_s``, replayed as a race.

    Use: ``race = ReplayRace(...)``; ``race.begin(n, k)``; then while ``not race.done``: read
    ``race.state``, optionally ``race.set_k(k)`` or ``race.stop()``, and ``race.advance()``.
    ``race.outcome()`` gives the call's ``Outcome``.

    :param backend: the replay backend whose recorded branches and latency model are replayed.
    :param problem_index: the problem, an index into ``backend.problems``.
    :param deadline_s: the call's deadline; the race always stops there.
    :param rng: draws which recorded branches run (the first n of a permutation, as in
        ``ReplayBackend.run``, so equal generators give equal branches).
    :param checkpoints: fractions of the deadline at which the race pauses when nothing
        finished since the last decision point.
    :param observe_load: whether the state reports ``backend.background_branches`` (False:
        the steps still run under the load, the controller is not told; a load-blind ablation).
    """

    def __init__(
        self,
        backend: ReplayBackend,
        problem_index: int,
        deadline_s: float,
        rng: np.random.Generator,
        checkpoints: Sequence[float] = DEFAULT_CHECKPOINTS,
        observe_load: bool = True,
    ) -> None:
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        self.backend, self.p, self.rng = backend, problem_index, rng
        load = backend.background_branches if observe_load else 0
        self.state = RaceState(deadline_s, backend.max_branches, max(backend.k_grid), load)
        self._checkpoints = [deadline_s * c for c in sorted(checkpoints)]

    # -- the controller's side ---------------------------------------------------------------

    def begin(self, n: int, k: int) -> RaceState:
        """Start n branches with k drafts; returns the state at the first decision point."""
        backend, state = self.backend, self.state
        if k not in backend.k_grid:
            raise ValueError(f"k={k} not in this backend's k grid {backend.k_grid}")
        state.start(n, k)
        drawn = backend.branch_order(self.rng)[:n]
        self._branches = drawn
        self._need = np.maximum(backend.branch_tokens[self.p, drawn], 1.0)
        self._tokens = backend.branch_tokens[self.p, drawn]
        self._classes = backend.branch_classes[self.p, drawn]
        self._done_tokens = np.zeros(n)
        self._live = np.ones(n, dtype=bool)
        self._steps_left = self._steps_at(k)
        start = float(backend.start_seconds[self.p, n])
        state.elapsed_s = min(start, state.deadline_s)
        if start >= state.deadline_s:
            state.stop("deadline", state.deadline_s)
        return state

    def set_k(self, k: int) -> None:
        """Drafts per step from the next step on (k from the backend's grid)."""
        if k == self.state.k:
            return
        if k not in self.backend.k_grid:
            raise ValueError(f"k={k} not in this backend's k grid {self.backend.k_grid}")
        self.state.set_k(k)
        self._steps_left = self._steps_at(k)

    def stop(self) -> None:
        """The controller answers now with the votes so far."""
        if not self.done:
            self.state.stop("controller", self.state.elapsed_s)

    @property
    def done(self) -> bool:
        return self.state.stopped is not None

    def advance(self) -> RaceState:
        """Run engine steps until the next decision point (or the end); returns the state."""
        state = self.state
        if self.done:
            return state
        live = np.flatnonzero(self._live)
        step_s = float(self.backend.step_seconds[self.backend.k_slot(state.k), len(live)])
        to_finish = int(self._steps_left[live].min())
        pause = self._next_checkpoint()
        fits = math.floor((pause - state.elapsed_s) / step_s + 1e-9)
        if fits < to_finish:  # a checkpoint or the deadline comes first
            self._run_steps(live, fits, step_s)
            if pause >= state.deadline_s:
                state.stop("deadline", state.deadline_s)
            else:
                self._checkpoints.pop(0)
            return state
        self._run_steps(live, to_finish, step_s)
        finishing = live[self._steps_left[live] <= 0]  # in draw order: the tie-break
        for b in finishing:
            self._live[b] = False
            state.record_finish(int(self._classes[b]), state.elapsed_s, self._confidence(b))
            if state.tally.decided:
                state.stop("decided" if state.tally.remaining else "complete", state.elapsed_s)
                break
        self._drop_passed_checkpoints()
        return state

    def outcome(self) -> Outcome:
        """The call's result (only once ``done``)."""
        if not self.done:
            raise RuntimeError("the race is still running")
        state, backend = self.state, self.backend
        winner = state.tally.leader
        answered = winner >= 0
        return Outcome(
            correct=answered and backend.class_correct[self.p][winner],
            answered=answered,
            answer_class=winner,
            answer=backend.class_answer[self.p][winner] if answered else None,
            latency_s=state.elapsed_s,
            n=state.n,
            k=state.k,
            branches_finished=state.tally.finished,
            generated_tokens=int(np.minimum(self._done_tokens, self._tokens).sum()),
            deadline_missed=state.stopped == "deadline" and not answered,
        )

    # -- the engine's side -------------------------------------------------------------------

    def _steps_at(self, k: int) -> np.ndarray:
        """Decode steps each branch still needs at draft length k (integers)."""
        tps = self.backend.tokens_per_step[self.p, self.backend.k_slot(k)]
        return np.ceil((self._need - self._done_tokens) / tps - 1e-9)

    def _run_steps(self, live: np.ndarray, steps: int, step_s: float) -> None:
        if steps <= 0:
            return
        tps = self.backend.tokens_per_step[self.p, self.backend.k_slot(self.state.k)]
        self._steps_left[live] -= steps
        self._done_tokens[live] += steps * tps
        seconds = steps * step_s
        self.state.record_steps(
            self.state.elapsed_s + seconds, steps, steps * tps * len(live), seconds
        )

    def _confidence(self, b: int) -> BranchConfidence | None:
        """Drawn branch b's recorded confidence, when the profile has log-probabilities."""
        table = self.backend.branch_confidence
        if table is None:
            return None
        mean, lowest = table[self.p, self._branches[b]]
        return None if np.isnan(mean) else BranchConfidence(float(mean), float(lowest))

    def _next_checkpoint(self) -> float:
        return self._checkpoints[0] if self._checkpoints else self.state.deadline_s

    def _drop_passed_checkpoints(self) -> None:
        while self._checkpoints and self._checkpoints[0] <= self.state.elapsed_s:
            self._checkpoints.pop(0)
