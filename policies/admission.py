"""Admit a request when the latency model predicts that it, and every call already running,
still answer before their deadlines; otherwise degrade it or refuse it at once.

The engine batches every call in flight (``engine.batch_loop``), so a new call does not wait
for the others: it slows every step a little (a step's time grows with the batch).  Admitting
by the worst case (each call may hold the engine for its whole deadline) refused a second
user while the engine had room; here the decision is a prediction:

* each call in flight still needs ``remaining`` tokens per branch: a quantile of the answer
  length given what its longest live branch has already written, at most the call's
  ``max_tokens`` (``policies.answer_lengths``: the profile's lengths at start, then the served
  ones);
* the calls then share the batch: at each phase the step time is the latency model's at the
  live batch and the batch's k (``engine.batch_loop.batch_k``), every call advances by the
  tokens a step emits, and the call needing the fewest tokens finishes next and leaves the
  batch (a new call first adds its prefill to every call's time);
* the model is the profile's, corrected on this machine at start-up and from every step the
  engine reports (``env.profiles.online_calibration``), so the prediction follows the machine
  that serves.

Refusals come in bursts (many clients arriving at once while the engine is full), and each one
predicted from scratch holds up the next on the server's event loop.  So an ``engine_busy``
refusal stands, for ``REFUSAL_REUSE_S`` and no longer than its own predicted wait, for every
request that asks no less (the same k, no more tokens, no more time, and a prompt no shorter
than the refusal's predicted lateness allows: a prompt only adds its prefill, to every call in
the batch alike) as long as the engine's calls and live branches are the same: only a call or a
branch leaving makes room sooner than predicted.

A call is admitted with n branches when every call, the new one included, is predicted to be
done at least ``margin_s`` before its deadline.  The controller picks n itself; admission gives
it a cap: the most branches (up to the policy's largest) that keep every prediction on time.
Rule between refusing and degrading: degrade (cap the branches) whenever at least one branch
fits, since that answers this request and, by construction, still every admitted one in
time; refuse only when not even one branch fits, as admitting then is predicted to miss a
deadline, the new call's or an admitted one's (a swap at best).  A refusal says why and when
to retry: the predicted time at which enough of the running calls will have finished.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from engine.batch_loop import CallLoad, batch_k
from env.latency_model import LatencyModel, tokens_per_step
from policies.answer_lengths import AnswerLengths


@dataclass(frozen=True)
class Verdict:
    """Admission's answer for one request.

    :param admitted: whether to run it.
    :param max_n: the most branches it may start (the cap; the controller may pick fewer).
    :param reason: ``"fits"``, ``"capped"`` (the cap is below the policy's largest n; the call
        is degraded only if its controller picks more),
        ``"deadline_unmeetable"`` (not even an idle engine answers in time) or
        ``"engine_busy"`` (the calls in flight leave no room in time).
    :param predicted_s: predicted seconds until the new call answers (with ``max_n``
        branches; the idle-engine prediction when refused).
    :param retry_after_s: when a retry is predicted to fit (refusals only).
    """

    admitted: bool
    max_n: int
    reason: str
    predicted_s: float
    retry_after_s: float = 0.0

    @property
    def message(self) -> str:
        if self.reason == "deadline_unmeetable":
            return (f"deadline cannot be met: even on an idle engine an answer is predicted to "
                    f"take {self.predicted_s:.1f} s")  # fmt: skip
        return (f"server busy: the calls in flight leave no room to answer within the deadline "
                f"(predicted to fit in {self.retry_after_s:.1f} s)")  # fmt: skip


REFUSAL_REUSE_S = 0.2
"""How long an ``engine_busy`` refusal stands for requests that ask no less (see above)."""


@dataclass(frozen=True)
class _Refusal:
    """A recent ``engine_busy`` verdict and what it was asked, with the engine it saw;
    ``min_prompt_tokens``: the shortest prompt whose saved prefill could not make up the
    lateness it predicted."""

    at: float
    verdict: Verdict
    k: int
    min_prompt_tokens: int
    max_tokens: int
    deadline_s: float
    engine: tuple[int, int]  # (calls, branches) in flight or reserved

    def covers(self, now: float, k: int, prompt_tokens: int, max_tokens: int,
               deadline_s: float, engine: tuple[int, int]) -> bool:  # fmt: skip
        age = now - self.at
        return (0 <= age < min(REFUSAL_REUSE_S, self.verdict.retry_after_s)
                and engine == self.engine and k == self.k
                and prompt_tokens >= self.min_prompt_tokens and max_tokens >= self.max_tokens
                and deadline_s <= self.deadline_s)  # fmt: skip


@dataclass(frozen=True)
class _Call:
    branches: int
    remaining: float
    k: int
    seconds_left: float


class Admission:
    """Predictive admission for one engine (see the module docstring).

    :param model: the latency model to predict with now (called per decision, e.g. the online
        corrected one).
    :param method: the engine's speculative method (its step tables).
    :param lengths: how long answers are: a number of tokens (every branch writes that many),
        or a function giving the current estimate (the server learns it while it serves:
        ``ServingLatency.answer_lengths``).
    :param acceptance: the draft acceptance rate (tokens per step at k > 0).
    :param n_grid: the branch counts the controller may pick.
    :param max_batch: the most sequences the engine steps at once.
    :param margin_s: least time each call must be predicted to have left at its answer.
    :param in_flight: the calls in the engine now (``VLLMEngine.batch.calls_in_flight``).
    """

    def __init__(
        self,
        model: Callable[[], LatencyModel],
        method: str,
        lengths: float | Callable[[], AnswerLengths],
        acceptance: float,
        n_grid: Sequence[int],
        max_batch: int,
        margin_s: float,
        in_flight: Callable[[], list[CallLoad]],
    ) -> None:
        if margin_s < 0 or not n_grid:
            raise ValueError(f"margin_s must be >= 0 and n_grid non-empty, got {margin_s!r} "
                             f"and {n_grid!r}")  # fmt: skip
        if not callable(lengths):
            known = AnswerLengths.fixed(lengths)
            lengths = lambda: known  # noqa: E731
        self.model, self.method, self.lengths = model, method, lengths
        self._lengths = lengths()  # refreshed at every decision (``_new_decision``)
        self._step_s: dict[tuple[int, int], float] = {}  # per decision: (batch, k) -> seconds
        self.acceptance, self.n_grid = acceptance, tuple(sorted(set(n_grid)))
        self.max_batch, self.margin_s, self.in_flight = max_batch, margin_s, in_flight
        self._reserved: dict[int, CallLoad] = {}  # admitted, not yet in the engine
        self._ids = 0
        self._lock = threading.Lock()
        self._refusal: _Refusal | None = None

    # --------------------------------------------------------------------- bookkeeping
    def reserve(
        self,
        verdict: Verdict,
        k: int,
        max_tokens: int,
        deadline_at: float,
        branches: int | None = None,
    ) -> int:
        """Hold an admitted call's place until the engine has it (``release`` it then); admission
        decisions in between count it, with ``branches`` (the branches its controller is
        expected to start; at most, and by default, the cap ``verdict.max_n``).

        Holding the cap overstated a burst: ten clients arriving at once each held 8 branches
        for calls whose controller then started one, and six of them were refused."""
        held = verdict.max_n if branches is None else min(branches, verdict.max_n)
        with self._lock:
            self._ids += 1
            self._reserved[self._ids] = CallLoad(held, 0, max_tokens, k, deadline_at)
            return self._ids

    def release(self, ticket: int) -> None:
        with self._lock:
            self._reserved.pop(ticket, None)

    # --------------------------------------------------------------------- the decision
    def decide(
        self,
        prompt_tokens: int,
        k: int,
        max_tokens: int,
        deadline_s: float,
        now: float | None = None,
    ) -> Verdict:
        """Admit (with a branch cap), or refuse, a call of ``prompt_tokens`` asking for answers
        of at most ``max_tokens`` at k drafts within ``deadline_s`` from now."""
        now = time.monotonic() if now is None else now
        with self._lock:
            reserved = [
                CallLoad(c.live, 0, c.max_tokens, c.k, c.seconds_left - now)
                for c in self._reserved.values()
            ]
        loads = [*self.in_flight(), *reserved]
        busy = sum(c.live for c in loads)
        engine = (len(loads), busy)
        memo = self._refusal
        if memo is not None and memo.covers(now, k, prompt_tokens, max_tokens, deadline_s,
                                            engine):  # fmt: skip
            waited = now - memo.at
            return replace(memo.verdict, retry_after_s=memo.verdict.retry_after_s - waited)
        model = self._new_decision()
        calls = [self._as_call(c) for c in loads]
        need = self._remaining(max_tokens, 0)
        lateness = math.inf  # of the fewest branches (none fit the batch: any prompt is refused)
        for n in reversed(self.n_grid):
            if busy + n > self.max_batch:
                continue
            slack, predicted = self._joins(calls, _Call(n, need, k, deadline_s), model,
                                           prompt_tokens)  # fmt: skip
            if slack >= 0:
                reason = "fits" if n == self.n_grid[-1] else "capped"
                return Verdict(True, n, reason, predicted)
            lateness = -slack
        alone = self._finish_times(
            [_Call(self.n_grid[0], need, k, deadline_s)], model,
            float(model.prefill_time(prompt_tokens, self.n_grid[0])),
        )[0]  # fmt: skip
        if alone > deadline_s - self.margin_s:
            return Verdict(False, 0, "deadline_unmeetable", alone, math.inf)
        retry = self._retry_after(calls, model, prompt_tokens, need, k, deadline_s)
        verdict = Verdict(False, 0, "engine_busy", alone, retry)
        # a prompt shorter by one token saves at most one token's prefill per branch
        per_token = model.prefill_per_token_s * self.n_grid[0]
        spare = lateness / per_token if per_token > 0 else math.inf
        shortest = max(prompt_tokens - spare, 0.0)
        self._refusal = _Refusal(now, verdict, k, math.ceil(shortest), max_tokens, deadline_s,
                                 engine)  # fmt: skip
        return verdict

    def _remaining(self, max_tokens: int, done: int) -> float:
        return self._lengths.remaining(done, max_tokens)

    def finish_times(self, loads: list[CallLoad]) -> list[float]:
        """Predicted seconds from now until each of ``loads`` is done, sharing the batch with
        no new call (tests and ``policies.bench_decisions`` build busy engines with it)."""
        model = self._new_decision()
        return self._finish_times([self._as_call(c) for c in loads], model, 0.0)

    def _new_decision(self) -> LatencyModel:
        """The model and lengths to predict with now; step times memoised for them only."""
        self._lengths = self.lengths()
        self._step_s.clear()
        return self.model()

    def _as_call(self, load: CallLoad) -> _Call:
        return _Call(load.live, self._remaining(load.max_tokens, load.tokens_done), load.k,
                     load.seconds_left)  # fmt: skip

    def _joins(
        self, calls: list[_Call], new: _Call, model: LatencyModel, prompt_tokens: int
    ) -> tuple[float, float]:
        """The least time any call (``calls`` and ``new``, which first prefills) is predicted to
        have to spare, margin included, with ``new`` in the batch (>= 0: every call on time),
        and ``new``'s predicted seconds to its answer."""
        everyone = [*calls, new]
        prefill = float(model.prefill_time(prompt_tokens, new.branches))
        finish = self._finish_times(everyone, model, prefill)
        slack = min(c.seconds_left - self.margin_s - t for t, c in zip(finish, everyone,
                                                                        strict=True))  # fmt: skip
        return slack, finish[-1]

    def _finish_times(
        self, calls: list[_Call], model: LatencyModel, prefill_s: float
    ) -> list[float]:
        """Predicted seconds from now until each call is done, the calls sharing the batch."""
        finish = [0.0] * len(calls)
        order = sorted(range(len(calls)), key=lambda i: calls[i].remaining)
        t, advanced = prefill_s, 0.0
        live_by_k = Counter()  # branches asking each k, of the calls still in the batch
        for c in calls:
            live_by_k[c.k] += c.branches
        for i in order:  # calls leave the batch in order of need
            tokens = calls[i].remaining - advanced
            if tokens > 0:
                k = batch_k(live_by_k.items()) or 0
                step_s = self._step_time(model, live_by_k.total(), k)
                t += math.ceil(tokens / tokens_per_step(self.acceptance, k) - 1e-9) * step_s
                advanced = calls[i].remaining
            finish[i] = t
            live_by_k[calls[i].k] -= calls[i].branches
        return finish

    def _step_time(self, model: LatencyModel, batch: int, k: int) -> float:
        """``model``'s step time, memoised for the decision (the phases of its many predictions
        repeat the same batches)."""
        key = (batch, k)
        if key not in self._step_s:
            self._step_s[key] = float(model.step_time(batch, k, self.method))
        return self._step_s[key]

    def _retry_after(
        self,
        calls: list[_Call],
        model: LatencyModel,
        prompt_tokens: int,
        need: float,
        k: int,
        deadline_s: float,
    ) -> float:
        """Predicted seconds until a new call like this one would be admitted: the first finish
        of a call in flight after which the calls left make room.  Found by bisection over the
        finishes in order (room only grows as calls leave: fewer remain, each with less to do),
        so a refusal costs a few predictions, not one per call in flight: refusals come in
        bursts, and each one holds up the next."""
        finish = self._finish_times(calls, model, 0.0)
        order = sorted(range(len(calls)), key=finish.__getitem__)
        new = _Call(self.n_grid[0], need, k, deadline_s)

        def room_after(position: int) -> bool:
            i = order[position]
            done = calls[i].remaining  # every call advanced as many tokens by then
            later = [
                _Call(calls[j].branches, max(calls[j].remaining - done, 1.0), calls[j].k,
                      calls[j].seconds_left - finish[i])
                for j in order[position + 1 :]
            ]  # fmt: skip
            return self._joins(later, new, model, prompt_tokens)[0] >= 0

        low, high = 0, len(order)  # the first position with room is in [low, high]
        while low < high:
            middle = (low + high) // 2
            if room_after(middle):
                high = middle
            else:
                low = middle + 1
        if low < len(order):
            return finish[order[low]]
        return max(finish, default=0.0)
