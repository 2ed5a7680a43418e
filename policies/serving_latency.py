"""The latency model the server predicts with: the policy's profile, fitted to this machine at
start-up and corrected by every step the engine reports while it serves.

A profile's timings belong to the machine that recorded it (the shipped CPU profile predicted a
quiet machine of the same kind 2.9x too slow).  At start the server runs a bounded timing run
(``env.profiles.online_calibration.quick_calibration``, at most about a minute, with a
progress bar), then every decode step of every call feeds an ``OnlineCorrection`` (engine step
listener, ``engine.batch_loop.BatchStep``).  Admission (``policies.admission``) asks ``model()``
for the corrected model at each decision; it is rebuilt at most every ``refresh_s``.

The profile also gives admission its other two inputs: how long answers are and the draft
acceptance rate of the engine's method.  Lengths are a Kaplan-Meier estimate
(``policies.answer_lengths``) over a window of recent branches: ``PROFILE_PRIOR_LENGTHS``
spread over the profile's at start, then the served ones (``observe``: finished branches are
lengths, branches cut by their limit or aborted are lower bounds).  The prior is kept small on
purpose: a small profile can be far off (the shipped CPU profile's 24 problems put half of its
branches at its 256-token limit, while the MATH-500 answers served here mostly stop near 180
tokens), and a prior of the whole profile's 192 branches took the first hundred served answers
to give way, refusing calls that would have been on time meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from engine.batch_loop import BatchStep
from env.latency_model import LatencyModel
from env.profiles.online_calibration import OnlineCorrection, quick_calibration
from env.profiles.store import Profile, load_profile
from policies.answer_lengths import AnswerLengths

DEFAULT_LENGTH_QUANTILE = 0.5
"""Quantile of a branch's (remaining) length that admission plans with."""
LENGTH_WINDOW = 96
"""Branches the length estimate is taken over (the most recent ones)."""
PROFILE_PRIOR_LENGTHS = 16
"""Profile branches (evenly spread over its sorted lengths) the window starts with."""
CORRECTION_HALF_LIFE_S = 60.0
"""Half-life of an online ratio without engine steps: a server that learnt it was slow (and so
refuses the work that would show otherwise) trusts its start-up calibration again within
minutes."""


@dataclass
class ServingLatency:
    """The corrected latency model and the profile figures admission predicts with.

    :param correction: the online correction over the (start-calibrated) profile model.
    :param method: the engine's speculative method (its step tables).
    :param lengths: recent branches as (tokens, finished), the profile's first.
    :param acceptance: the method's mean per-token draft acceptance in the profile.
    :param length_quantile: the quantile of the (remaining) length admission plans with.
    :param refresh_s: how often ``model()`` rebuilds the corrected model.
    """

    correction: OnlineCorrection
    method: str
    lengths: deque[tuple[float, bool]]
    acceptance: float
    length_quantile: float = DEFAULT_LENGTH_QUANTILE
    refresh_s: float = 1.0
    _cached: tuple[float, LatencyModel] | None = field(default=None, repr=False)
    _fitted_lengths: AnswerLengths | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_profile(
        cls,
        profile: Profile | str,
        engine=None,
        method: str | None = None,
        calibrate_s: float = 60.0,
        length_quantile: float = DEFAULT_LENGTH_QUANTILE,
        progress: bool = True,
    ) -> ServingLatency:
        """Build it from a profile (name, folder or loaded), calibrated on ``engine`` for up to
        ``calibrate_s`` seconds (0: no start-up calibration, the online correction only) and
        listening to its steps.

        :raises ValueError: when the profile has no step tables for the engine's method, or for
            a quantile outside (0, 1).
        """
        if not 0 < length_quantile < 1:
            raise ValueError(f"length_quantile must be in (0, 1), got {length_quantile!r}")
        profile = profile if isinstance(profile, Profile) else load_profile(profile)
        method = method or (engine.config.method_name if engine is not None else None)
        model = profile.latency_model()
        if method not in model.methods():
            raise ValueError(f"profile {profile.name} has no step tables for method {method!r} "
                             f"(it has {model.methods()}): serve with one of those")  # fmt: skip
        if engine is not None and calibrate_s > 0:
            texts = [row["problem"] for row in profile.rows[:40]]
            model = quick_calibration(engine, model, calibrate_s, progress, texts=texts)
        accept = [profile.acceptance(row, method) for row in profile.rows]
        latency = cls(
            OnlineCorrection(model, half_life_s=CORRECTION_HALF_LIFE_S),
            method,
            deque(profile_prior(profile), LENGTH_WINDOW),
            float(np.mean(accept)) if accept else 0.0,
            length_quantile,
        )
        if engine is not None:
            engine.add_step_listener(latency.on_step)
        return latency

    def on_step(self, step: BatchStep) -> None:
        """Engine step listener: a decode step corrects its (method, k) table (steps that
        prefilled new prompts are not plain decode steps and are left out, as are ks the
        profile has no table for)."""
        known = step.k in self.correction.base.steps[self.method]  # a k the profile timed
        if not step.prefill and step.batch > 0 and known:
            self.correction.update(self.method, step.k, step.batch, step.step_s)

    def answer_lengths(self) -> AnswerLengths:
        """The length estimate of the current window (refitted after each ``observe``)."""
        with self._lock:
            if self._fitted_lengths is None:
                self._fitted_lengths = AnswerLengths.fit(self.lengths, self.length_quantile)
            return self._fitted_lengths

    def observe(self, branches: Iterable[dict]) -> None:
        """Add a served call's branches (``Solution.branches``): one that stopped gives its
        length; one cut by its token limit or aborted (deadline, early stop) was at least as
        long as what it wrote."""
        new = [(float(b["tokens"]), b["finish_reason"] == "stop") for b in branches]
        with self._lock:
            self.lengths.extend(new)
            self._fitted_lengths = None

    def model(self) -> LatencyModel:
        """The corrected model as of at most ``refresh_s`` ago."""
        now = time.monotonic()
        with self._lock:
            if self._cached is None or now - self._cached[0] > self.refresh_s:
                self._cached = (now, self.correction.corrected())
            return self._cached[1]


def profile_prior(profile: Profile) -> list[tuple[float, bool]]:
    """``PROFILE_PRIOR_LENGTHS`` of the profile's branches, evenly spread over its sorted
    lengths, as (tokens, finished): a branch at the profile's token limit was cut there."""
    limit = float(profile.manifest["sampling"]["max_tokens"])
    lengths = np.sort(np.concatenate([np.asarray(r["branch_tokens"], float)
                                      for r in profile.rows]))  # fmt: skip
    if not len(lengths):
        return []
    picks = lengths[np.linspace(0, len(lengths) - 1, PROFILE_PRIOR_LENGTHS).round().astype(int)]
    return [(float(t), bool(t < limit)) for t in picks]
