"""Latency model: predicts how long a test-time-scaling call takes on a given engine.

Training replays recorded branches instead of running the engine, so it needs the wall time
a call *would* have taken for any (n, k).  The model follows the engine's execution:

    wall = prefill(prompt_tokens, n) + sum over decode steps of step_time(live batch, k)

The n branches of a call share one prompt.  With prefix caching (vLLM's default) the first
branch computes the whole prompt and the others reuse its full KV blocks, so they compute only
the prompt's last, partial block: ``prefill`` is linear in those *unshared* tokens (see
``unshared_prompt_tokens``) plus a small cost per extra branch.  Calibrating this on the CPU
engine showed it plainly: 8 branches of a 138-token prompt prefill faster than 8 of an 81-token
one, because 128 of the 138 tokens are one shared block.

A branch of T tokens needs ceil(T / tokens_per_step) decode steps, where with per-token draft
acceptance alpha and k drafted tokens a verification step yields on average
(1 - alpha^(k+1)) / (1 - alpha) tokens (Leviathan et al. 2023, eq. 1).  The live batch shrinks
as branches finish, so the short branches of a call run at a larger batch than the long ones.

``step_time`` is a table per speculative method and k over batch sizes (linear interpolation
between measured batch sizes, linear extrapolation beyond), filled from a timing calibration of
the real engine (``fit``) or, for synthetic profiles, from a hardware roofline.  The same class
serves both, so the replay environment does not care where the numbers came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

# re-exported: the method key under which the step tables of plain decoding are stored
from engine.rollout import NO_SPECULATION as NO_SPECULATION

SPEC_METHODS = ("ngram", "draft_model")
"""Speculative methods that profiles record and latency models time: vLLM's n-gram prompt lookup
and a separate draft model (the engine accepts more; these are the ones profiled)."""


class StepTableKey(NamedTuple):
    """Which of a latency model's step tables times a decode step: ``steps[method][k]``."""

    method: str
    k: int


def tokens_per_step(alpha: float, k: int) -> float:
    """Expected tokens emitted by one verification step with k drafts and acceptance alpha."""
    if k == 0:
        return 1.0
    alpha = float(min(max(alpha, 0.0), 0.999))
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def unshared_prompt_tokens(prompt_tokens: ArrayLike, n: ArrayLike, block: int | None) -> ArrayLike:
    """Prompt tokens the engine computes for n branches of one prompt (element-wise).

    Without prefix caching (``block`` None) every branch computes the whole prompt.  With it,
    branches after the first reuse the full ``block``-token KV blocks and compute only the
    rest; at least one token per branch, since the last prompt token is always recomputed.
    """
    p, n = np.asarray(prompt_tokens), np.asarray(n)
    if not block:
        return p * n
    tail = p - block * ((p - 1) // block)
    return np.where(n > 0, p + (n - 1) * tail, 0)


def acceptance_from_counts(k: int, drafted: float, accepted: float) -> float:
    """Invert the i.i.d.-acceptance model: per-token alpha from drafted/accepted counts at k.

    With k drafts per step, accepted/drafted = alpha (1 - alpha^k) / (k (1 - alpha)), which is
    increasing in alpha, so bisection finds the unique solution.
    """
    if k <= 0 or drafted <= 0:
        return float("nan")
    target = min(max(accepted / drafted, 0.0), 0.999)

    def rate(a: float) -> float:
        return (tokens_per_step(a, k) - 1.0) / k

    lo, hi = 0.0, 0.999
    for _ in range(50):
        mid = (lo + hi) / 2
        if rate(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass
class StepTable:
    """Decode step seconds at measured batch sizes, for one (method, k)."""

    batch: list[int]
    seconds: list[float]

    def __post_init__(self) -> None:
        if len(self.batch) != len(self.seconds) or not self.batch:
            raise ValueError("StepTable needs equally long, non-empty batch and seconds lists")
        order = np.argsort(self.batch)
        self._b = np.asarray(self.batch, dtype=float)[order]
        self._s = np.asarray(self.seconds, dtype=float)[order]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        b = np.asarray(batch, dtype=float)
        out = np.interp(b, self._b, self._s)
        if len(self._b) >= 2:
            slope = (self._s[-1] - self._s[-2]) / (self._b[-1] - self._b[-2])
            out = np.where(b > self._b[-1], self._s[-1] + slope * (b - self._b[-1]), out)
        return out


@dataclass
class LatencyModel:
    """Wall-time predictor for one engine (target model, draft, hardware).

    :param steps: ``{method: {k: StepTable}}``; method ``"none"`` or any speculative method.
    :param prefill_base_s: fixed prefill cost of a call (scheduling, first forward).
    :param prefill_per_token_s: prefill seconds per computed prompt token.
    :param prefill_per_branch_s: prefill seconds per branch after the first.
    :param prefix_block_tokens: KV block size when the engine shares prompt blocks between
        branches (prefix caching), else None (every branch computes the whole prompt).
    :param call_overhead_s: fixed per-call overhead outside prefill and decode.
    :param source: where the numbers came from ("calibration", "roofline", ...).
    """

    steps: dict[str, dict[int, StepTable]]
    prefill_base_s: float
    prefill_per_token_s: float
    call_overhead_s: float = 0.0
    prefill_per_branch_s: float = 0.0
    prefix_block_tokens: int | None = None
    source: str = "calibration"
    meta: dict = field(default_factory=dict)

    def methods(self) -> list[str]:
        return sorted(self.steps)

    def k_grid(self, method: str) -> list[int]:
        return sorted(self._method(method))

    def _method(self, method: str) -> dict[int, StepTable]:
        if method not in self.steps:
            raise ValueError(f"latency model has no method {method!r}; known: {self.methods()}")
        return self.steps[method]

    def step_time(self, batch: np.ndarray | int, k: int, method: str) -> np.ndarray:
        """Seconds of one decode step with ``batch`` live branches and k drafts each."""
        table = self._method(method)
        if k not in table:
            raise ValueError(f"latency model has no k={k} for {method!r}; known: {sorted(table)}")
        return table[k](batch)

    def prefill_time(self, prompt_tokens: ArrayLike, n: ArrayLike) -> ArrayLike:
        """Seconds from submitting n branches of a prompt until decoding starts (element-wise
        over arrays, a float for scalars)."""
        computed = unshared_prompt_tokens(prompt_tokens, n, self.prefix_block_tokens)
        seconds = (
            self.prefill_base_s
            + self.prefill_per_token_s * computed
            + self.prefill_per_branch_s * np.maximum(np.asarray(n) - 1, 0)
        )
        return float(seconds) if np.ndim(seconds) == 0 else seconds

    def branch_finish_times(
        self,
        tokens: Sequence[int] | np.ndarray,
        k: int,
        method: str,
        alpha: float,
        prompt_tokens: int,
    ) -> np.ndarray:
        """Predicted finish time (s from call start) of each branch generating ``tokens``."""
        tokens = np.asarray(tokens, dtype=float)
        n = len(tokens)
        if n == 0:
            return np.zeros(0)
        steps = np.ceil(np.maximum(tokens, 1.0) / tokens_per_step(alpha, k))
        order = np.argsort(steps, kind="stable")
        sorted_steps = steps[order]
        increments = np.diff(np.concatenate([[0.0], sorted_steps]))
        live = n - np.arange(n)  # branches still decoding during each increment
        seconds = np.cumsum(increments * self.step_time(live, k, method))
        start = self.call_overhead_s + self.prefill_time(prompt_tokens, n)
        finish = np.empty(n)
        finish[order] = start + seconds
        return finish

    def predict_wall_time(
        self,
        tokens: Sequence[int] | np.ndarray,
        k: int,
        method: str,
        alpha: float,
        prompt_tokens: int,
    ) -> float:
        """Predicted wall time of a call that waits for every branch."""
        finish = self.branch_finish_times(tokens, k, method, alpha, prompt_tokens)
        return float(finish.max()) if len(finish) else 0.0

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "prefill_base_s": self.prefill_base_s,
            "prefill_per_token_s": self.prefill_per_token_s,
            "call_overhead_s": self.call_overhead_s,
            "prefill_per_branch_s": self.prefill_per_branch_s,
            "prefix_block_tokens": self.prefix_block_tokens,
            "steps": {
                m: {str(k): {"batch": t.batch, "seconds": t.seconds} for k, t in ks.items()}
                for m, ks in self.steps.items()
            },
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict) -> LatencyModel:
        steps = {
            m: {int(k): StepTable(list(v["batch"]), list(v["seconds"])) for k, v in ks.items()}
            for m, ks in data["steps"].items()
        }
        return cls(
            steps=steps,
            prefill_base_s=float(data["prefill_base_s"]),
            prefill_per_token_s=float(data["prefill_per_token_s"]),
            call_overhead_s=float(data.get("call_overhead_s", 0.0)),
            prefill_per_branch_s=float(data.get("prefill_per_branch_s", 0.0)),
            prefix_block_tokens=data.get("prefix_block_tokens"),
            source=data.get("source", "calibration"),
            meta=dict(data.get("meta", {})),
        )


def relative_errors(predicted: Sequence[float], measured: Sequence[float]) -> np.ndarray:
    """|predicted - measured| / measured, for validation reports."""
    p = np.asarray(predicted, dtype=float)
    m = np.asarray(measured, dtype=float)
    return np.abs(p - m) / np.maximum(m, 1e-9)
