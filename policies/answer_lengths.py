"""How many tokens a branch still has to write: a Kaplan-Meier estimate of answer lengths.

Admission (``policies.admission``) predicts when each call in flight will be done, so it needs
the tokens each one still has to write.  Branch lengths are *censored* data: a branch cut by its
token limit, or aborted by an early stop or a deadline, only says "at least this long".  Taking
a quantile of the lengths seen, with cut ones as "unbounded", made the shipped CPU profile's
median the token limit (half of its 24 problems' branches reach 256 tokens), so admission took
every call to need the request's whole ``max_tokens`` (512 by default) while the MATH-500 answers
served here mostly stop near 180 tokens, and it refused calls that would have been on time.
The product-limit (Kaplan-Meier) estimator uses every branch for what it says: finished ones as
lengths, the others as lower bounds.

The estimate is conditional too: a call that has written ``done`` tokens is still running, so
what it still needs is a quantile of ``length - done`` given ``length > done``, which grows
past the unconditional median for long answers instead of collapsing to a constant.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

MIN_REMAINING_TOKENS = 8
"""Tokens a running branch is taken to still need once no recorded length is longer."""


@dataclass(frozen=True)
class AnswerLengths:
    """A survival curve of branch lengths: ``survival[i]`` = P[length > ``times[i]``].

    :param times: ascending lengths at which some branch finished.
    :param survival: the product-limit estimate just after each of ``times``.
    :param quantile: the quantile of the (conditional) length predictions take.
    """

    times: np.ndarray
    survival: np.ndarray
    quantile: float = 0.5

    @classmethod
    def fit(cls, lengths: Iterable[tuple[float, bool]], quantile: float = 0.5) -> AnswerLengths:
        """Estimate from (tokens, finished) pairs: finished branches are lengths, the others
        (cut by a limit, aborted) lower bounds.

        :raises ValueError: for a quantile outside (0, 1).
        """
        if not 0 < quantile < 1:
            raise ValueError(f"length quantile must be in (0, 1), got {quantile!r}")
        pairs = np.asarray(list(lengths), float).reshape(-1, 2)
        tokens, finished = pairs[:, 0], pairs[:, 1] > 0
        order = np.lexsort((~finished, tokens))  # at a tie, finishes before lower bounds
        tokens, finished = tokens[order], finished[order]
        at_risk = len(tokens) - np.arange(len(tokens))
        survival = np.cumprod(np.where(finished, 1.0 - 1.0 / at_risk, 1.0))
        return cls(tokens[finished], survival[finished], quantile)

    @classmethod
    def fixed(cls, tokens: float) -> AnswerLengths:
        """Every branch writes exactly ``tokens`` (a known length, e.g. in tests).

        :raises ValueError: unless ``tokens`` > 0.
        """
        if not tokens > 0:
            raise ValueError(f"expected answer length must be > 0 tokens, got {tokens!r}")
        return cls(np.asarray([float(tokens)]), np.asarray([0.0]))

    def _survival_at(self, tokens: float) -> float:
        i = int(np.searchsorted(self.times, tokens, side="right"))
        return 1.0 if i == 0 else float(self.survival[i - 1])

    def remaining(self, done: float, limit: float) -> float:
        """Tokens a branch with ``done`` tokens written still needs, at most ``limit`` in all:
        the quantile of its length given it is longer than ``done``, less ``done``.  When the
        recorded lengths do not reach that quantile, the branch is taken to run to ``limit``;
        when none is longer than ``done``, it needs a few more tokens."""
        left = max(limit - done, 1.0)
        alive = self._survival_at(done)
        if alive <= 0.0:
            return float(min(MIN_REMAINING_TOKENS, left))
        target = alive * (1.0 - self.quantile)
        past = np.flatnonzero((self.times > done) & (self.survival <= target + 1e-12))
        if not len(past):
            return float(left)
        return float(min(self.times[past[0]] - done, left))

    def expected(self, limit: float = math.inf) -> float:
        """The quantile length of a new branch (``limit`` when the records do not reach it)."""
        return self.remaining(0.0, limit)
