"""The latency model the server predicts with: the policy's profile, fitted to this machine at
start-up and corrected by every step the engine reports while it serves.

A profile's timings belong to the machine that recorded it (the shipped CPU profile predicted a
quiet machine of the same kind 2.9x too slow).  At start the server runs a bounded timing run
(``env.profiles.online_calibration.quick_calibration``, at most about a minute, with a
progress bar), then every decode step of every call feeds an ``OnlineCorrection`` (engine step
listener, ``engine.batch_loop.BatchStep``).  Admission (``policies.admission``) asks ``model()``
for the corrected model at each decision; it is rebuilt at most every ``refresh_s``.

The profile also gives admission its other two inputs: how long an answer is expected to be and
the draft acceptance rate of the engine's method.  The expected length is a quantile of recent
branch lengths: the profile's at start, then more and more the served ones (``observe``; a
branch cut by its token limit counts as "as long as the request allows", and a quantile there
means just that).  A small profile can be far off: the shipped CPU profile's 24 problems put
the median at its 256-token limit, while the MATH-500 answers served here mostly stop sooner.
"""

from __future__ import annotations

import math
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

DEFAULT_LENGTH_QUANTILE = 0.5
"""Quantile of the profile's branch lengths taken as a call's expected answer length."""
LENGTH_WINDOW = 200
"""Branch lengths the expected-length quantile is taken over (the most recent ones)."""
CORRECTION_HALF_LIFE_S = 60.0
"""Half-life of an online ratio without engine steps: a server that learnt it was slow (and so
refuses the work that would show otherwise) trusts its start-up calibration again within
minutes."""


@dataclass
class ServingLatency:
    """The corrected latency model and the profile figures admission predicts with.

    :param correction: the online correction over the (start-calibrated) profile model.
    :param method: the engine's speculative method (its step tables).
    :param lengths: recent branch lengths (inf: cut by the token limit), the profile's first.
    :param acceptance: the method's mean per-token draft acceptance in the profile.
    :param length_quantile: the quantile of ``lengths`` taken as the expected length.
    :param refresh_s: how often ``model()`` rebuilds the corrected model.
    """

    correction: OnlineCorrection
    method: str
    lengths: deque[float]
    acceptance: float
    length_quantile: float = DEFAULT_LENGTH_QUANTILE
    refresh_s: float = 1.0
    _cached: tuple[float, LatencyModel] | None = field(default=None, repr=False)
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
        lengths = np.concatenate([np.asarray(r["branch_tokens"], float) for r in profile.rows])
        limit = float(profile.manifest["sampling"]["max_tokens"])
        accept = [profile.acceptance(row, method) for row in profile.rows]
        latency = cls(
            OnlineCorrection(model, half_life_s=CORRECTION_HALF_LIFE_S),
            method,
            deque(np.where(lengths >= limit, math.inf, lengths)[-LENGTH_WINDOW:], LENGTH_WINDOW),
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

    def expected_tokens(self) -> float:
        """The expected answer length per branch now (inf: as long as the request allows)."""
        with self._lock:
            lengths = np.fromiter(self.lengths, float)
        if not len(lengths):
            return math.inf
        # quantile over inf values: 'inverted_cdf' picks an observed value, never inf - inf
        return float(np.quantile(lengths, self.length_quantile, method="inverted_cdf"))

    def observe(self, branches: Iterable[dict]) -> None:
        """Add a served call's branches (``Solution.branches``): one that stopped gives its
        length, one cut by its token limit counts as unbounded, an aborted one (deadline, early
        stop) says nothing certain and is left out."""
        new = [b["tokens"] if b["finish_reason"] == "stop" else math.inf for b in branches
               if b["finish_reason"] in ("stop", "length")]  # fmt: skip
        with self._lock:
            self.lengths.extend(new)

    def model(self) -> LatencyModel:
        """The corrected model as of at most ``refresh_s`` ago."""
        now = time.monotonic()
        with self._lock:
            if self._cached is None or now - self._cached[0] > self.refresh_s:
                self._cached = (now, self.correction.corrected())
            return self._cached[1]
