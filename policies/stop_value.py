"""The stop-value controller: a learned estimate of what waiting is worth, at every branch finish.

Why not only PPO: a call's reward is 0 or 1, so policy-gradient updates that must tell apart
stopping rules half a point apart drown in noise (PPO fine-tuning lowered the validation reward
of its warm start).  Replay, however, is exact: for every decision point of a replayed race we
can compute what *would* happen if the call answered now (is the current leader right, at what
time) and if it went on without stopping (the leader at the deadline or the decided vote, and
when).  Those counterfactual pairs turn "when to stop" into supervised regression with far less
variance than a 0/1 return:

- ``gain``: E[correct at the end - correct now | race state], the accuracy that waiting can
  still add (near 0 both when the vote is settled and when the problem is hopeless, which the
  vote-margin rules cannot tell apart from an open race);
- ``wait``: E[(end time - now) / deadline | race state], the share of the deadline waiting costs.

The controller stops at a branch finish when ``gain <= price * wait``: it answers once the
expected accuracy still to gain is worth less than the time it costs.  ``price`` (and the
call's n and k) are tuned per deadline on training problems exactly as generously as the
heuristics' thresholds are (``policies.stop_value_training``).

This module is the serving half (numpy only): the features, the value network, the policy
(network + per-deadline table) and its files.  Fitting and tuning live in
``policies.stop_value_training``, which needs the replay backend.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from env.race import STEPS_SCALE, RaceState

STOP_VALUE_ALGORITHM = "StopValue"
"""``policy.json``'s ``algorithm`` of a stop-value policy (a PPO policy says ``PPO``)."""
STOP_FEATURES = (
    "elapsed_fraction",
    "log_steps_left",
    "log_steps_done",
    "log2_n",
    "finished_fraction",
    "answered_fraction",
    "leader_share",
    "leader_votes_fraction",
    "runner_up_fraction",
    "margin_fraction",
    "distinct_fraction",
    "log_leader_votes",
    "log_runner_up_votes",
    "log_answered",
    "log_distinct",
    "leader_posterior",
    "remaining_over_margin",
)
"""The race part of the value network's input (the prompt features follow).  Counts appear
both as fractions of n and as log counts: the posterior that a leader is real depends on the
counts, how much the rest of the race can change depends on the fractions."""
POSTERIOR_TABLE_SIZE = 257


@functools.lru_cache(maxsize=1)
def _posterior_table() -> np.ndarray:
    """P[p > 1/2] for p ~ Beta(v1 + 1, v2 + 1) for all v1, v2 < ``POSTERIOR_TABLE_SIZE``
    (Adaptive-Consistency's statistic), by the binomial identity, in log space."""
    size = POSTERIOR_TABLE_SIZE
    table = np.zeros((size, size))
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, 2 * size + 2)))])
    for v1 in range(size):
        for v2 in range(size):
            total = v1 + v2 + 1  # a + b - 1 with a = v1 + 1, b = v2 + 1
            i = np.arange(v1 + 1)
            log_terms = log_fact[total] - log_fact[i] - log_fact[total - i] - total * math.log(2)
            table[v1, v2] = min(float(np.exp(log_terms).sum()), 1.0)
    return table


def race_feature_rows(
    elapsed_s: np.ndarray,
    deadline_s: np.ndarray,
    seconds_per_step: np.ndarray,
    steps: np.ndarray,
    n: np.ndarray,
    finished: np.ndarray,
    answered: np.ndarray,
    leader_votes: np.ndarray,
    runner_up_votes: np.ndarray,
    distinct: np.ndarray,
) -> np.ndarray:
    """``STOP_FEATURES`` for many decision points at once (every argument one value per row).

    The one implementation: ``state_features`` (a live or replayed race) and the training
    traces both call it, so the network reads the same numbers in training and in serving.
    Time is relative to the deadline and to the measured seconds per step, as in
    ``RaceState.observation``, so decisions carry over to a faster or slower machine.
    """
    elapsed, deadline = np.asarray(elapsed_s, float), np.asarray(deadline_s, float)
    per_step = np.asarray(seconds_per_step, float)
    n, finished = np.maximum(np.asarray(n, float), 1.0), np.asarray(finished, float)
    answered, v1 = np.asarray(answered, float), np.asarray(leader_votes, float)
    v2, distinct = np.asarray(runner_up_votes, float), np.asarray(distinct, float)
    remaining = np.maximum(deadline - elapsed, 0.0)
    steps_left = np.where(per_step > 0, remaining / np.where(per_step > 0, per_step, 1.0), 0.0)
    table = _posterior_table()
    top = POSTERIOR_TABLE_SIZE - 1
    posterior = table[np.minimum(v1, top).astype(int), np.minimum(v2, top).astype(int)]
    running = n - finished
    columns = (
        np.minimum(elapsed / deadline, 1.0),
        np.minimum(np.log1p(steps_left) / STEPS_SCALE, 1.0),
        np.minimum(np.log1p(np.asarray(steps, float)) / STEPS_SCALE, 1.0),
        np.log2(n) / 8.0,
        finished / n,
        answered / np.maximum(finished, 1.0),
        v1 / np.maximum(answered, 1.0),
        v1 / n,
        v2 / n,
        (v1 - v2) / n,
        distinct / np.maximum(answered, 1.0),
        np.log1p(v1) / 4.0,
        np.log1p(v2) / 4.0,
        np.log1p(answered) / 4.0,
        np.log1p(distinct) / 4.0,
        np.where(answered > 0, posterior, 0.0),
        np.minimum(running / np.maximum(v1 - v2, 1.0), n) / n,
    )
    return np.column_stack(columns).astype(np.float32)


def state_features(state: RaceState) -> np.ndarray:
    """``STOP_FEATURES`` of one race in flight (one row)."""
    t = state.tally
    per_step = state.seconds_per_step or 0.0
    return race_feature_rows(
        *([v] for v in (state.elapsed_s, state.deadline_s, per_step, state.steps, state.n,
                        t.finished, t.answered, t.leader_votes, t.runner_up_votes, t.distinct))
    )[0]  # fmt: skip


FORWARD_CHUNK_ROWS = 8192
"""Rows per forward pass of ``ValueNet``: 10 MB of hidden activations for an average of five
64-unit networks.  Why so few: glibc serves allocations above 32 MB with fresh pages from the
kernel every time, and with chunks of 65,536 rows (84 MB) page faults took about a fifth of
``./run train`` (200 s of system time, 4 million minor faults); at 8,192 rows the buffers are
reused, and a tuning sweep of 1,000 problems x 2 draws at 12 deadlines took 9.1 s instead of
14.4 (the same table; 6.2 s with the features built per chunk too,
``policies.stop_value_training.scores``, against 22.2 s before this round)."""


@dataclass
class ValueNet:
    """A small MLP (tanh hidden layers, linear output) on standardized inputs, in numpy.

    Outputs are (gain, wait) as described in the module docstring.  A trained policy's network
    is an average of several (``average``), stored as one wider MLP.

    :param weights: one (in, out) matrix per layer.
    :param biases: one vector per layer.
    :param mean: input means (standardization).
    :param scale: input standard deviations (1 where constant).
    """

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    mean: np.ndarray
    scale: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(gain, wait) per row of ``x`` (rows of race features then prompt features).

        Rows go through in chunks of ``FORWARD_CHUNK_ROWS``: a tuning sweep scores millions of
        decision points at once, and the hidden layers of an averaged network (five members of
        64 units: 320) would otherwise hold gigabytes (``./run train`` peaked at 8.0 GB of
        resident memory before, and 13 GB killed it at 4,900 tuning problems), and small chunks
        reuse their buffers (``FORWARD_CHUNK_ROWS``)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim < 2 or len(x) <= FORWARD_CHUNK_ROWS:
            return self._forward(x)
        return np.concatenate([self._forward(x[i : i + FORWARD_CHUNK_ROWS])
                               for i in range(0, len(x), FORWARD_CHUNK_ROWS)])  # fmt: skip

    def _forward(self, x: np.ndarray) -> np.ndarray:
        h = (x - self.mean) / self.scale
        for i, (w, b, blocks) in enumerate(zip(self.weights, self.biases, self._blocks,
                                               strict=True)):  # fmt: skip
            if blocks is None:
                h = h @ w
            else:  # an averaged network's members side by side: no products with the zeros
                h = np.concatenate([h[..., s] @ w[s, s] for s in blocks], axis=-1)
            h += b
            if i < len(self.weights) - 1:
                np.tanh(h, out=h)
        return h

    @functools.cached_property
    def _blocks(self) -> list[list[slice] | None]:
        """Per layer, the diagonal blocks of a block-diagonal square weight matrix (None for any
        other).  An averaged network's hidden-to-hidden layer is one (``average``): five
        members of 64 units make it 320 x 320 with four fifths zeros, and multiplying by the
        blocks alone took a tuning sweep from 18.9 to 14.4 s (``FORWARD_CHUNK_ROWS``)."""
        return [_diagonal_blocks(w) for w in self.weights]

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self.mean, "scale": self.scale}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            out[f"w{i}"], out[f"b{i}"] = w, b
        return out

    @classmethod
    def average(cls, nets: Sequence[ValueNet]) -> ValueNet:
        """One network whose output is the mean of ``nets``' outputs (same depth, same input
        standardization): their hidden units side by side, no weights between members, the
        output layer divided by their number.  An ensemble thus serves, saves and loads as one
        MLP (``StopValuePolicy`` and its files need not know it is one)."""
        first = nets[0]
        if any(not (np.array_equal(n.mean, first.mean) and np.array_equal(n.scale, first.scale))
               for n in nets):  # fmt: skip
            raise ValueError("only networks with the same input standardization can be averaged")
        depth = len(first.weights)
        weights, biases = [], []
        for i in range(depth):
            layer, bias = [n.weights[i] for n in nets], [n.biases[i] for n in nets]
            if i == depth - 1:
                w = np.mean(layer, axis=0) if i == 0 else np.concatenate(layer) / len(nets)
                b = np.mean(bias, axis=0)
            else:
                w = np.concatenate(layer, axis=1) if i == 0 else _block_diagonal(layer)
                b = np.concatenate(bias)
            weights.append(w.astype(np.float32))
            biases.append(b.astype(np.float32))
        return cls(weights, biases, first.mean, first.scale)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ValueNet:
        layers = sum(1 for key in arrays if key.startswith("w"))
        return cls([np.asarray(arrays[f"w{i}"], np.float32) for i in range(layers)],
                   [np.asarray(arrays[f"b{i}"], np.float32) for i in range(layers)],
                   np.asarray(arrays["mean"], np.float32),
                   np.asarray(arrays["scale"], np.float32))  # fmt: skip


@dataclass(frozen=True)
class StopSetting:
    """What the stop-value controller does under one deadline of its grid.

    :param n: branches to start.
    :param k: drafts per step (held for the whole call).
    :param price: stop once predicted gain <= price x predicted wait (a negative price stops
        only where waiting is predicted to lose accuracy).
    :param budget: share of its grid deadline the call may use (the call's own deadline is
        budget x that grid deadline, at most the caller's).  A longer deadline can only help
        if its controller may act as under a shorter one: on this profile the full vote of
        late, longer (more often wrong) branches is slightly *less* accurate than the vote at a
        mid deadline.
    """

    n: int
    k: int
    price: float
    budget: float = 1.0


@dataclass
class StopValuePolicy:
    """The value network with one ``StopSetting`` per deadline of a grid (any other deadline is
    served by the longest grid deadline not longer than it: ``serving_index``).

    :param net: the value network.
    :param deadlines_s: the grid the settings were tuned at.
    :param settings: one per grid deadline.
    :param prompt_width: how many prompt features follow the race features in the input.
    :param info: how it was fitted and tuned (sizes, fit losses, tuning tolerance).
    """

    net: ValueNet
    deadlines_s: tuple[float, ...]
    settings: list[StopSetting]
    prompt_width: int
    info: dict = field(default_factory=dict)

    def setting(self, deadline_s: float) -> StopSetting:
        """The setting of the longest grid deadline at most ``deadline_s`` (``serving_index``)."""
        return self.settings[serving_index(self.deadlines_s, deadline_s)]

    def call_deadline(self, deadline_s: float) -> float:
        """When a call under ``deadline_s`` ends at the latest: the grid deadline its setting
        was tuned for x its budget (an absolute horizon, so that a deadline between grid points
        acts as under the tuned one), never after ``deadline_s``."""
        index = serving_index(self.deadlines_s, deadline_s)
        horizon = self.settings[index].budget * self.deadlines_s[index]
        return min(deadline_s, horizon) if self.settings[index].budget < 1.0 else deadline_s

    def stop(self, state: RaceState, prompt: np.ndarray, price: float) -> bool:
        """Whether to answer now: predicted gain of waiting <= ``price`` x predicted wait."""
        if state.tally.answered == 0:
            return False
        x = np.concatenate([state_features(state), prompt])[None, :]
        gain, wait = self.net(x)[0]
        return bool(gain <= price * max(float(wait), 0.0))

    # -- files ---------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """``stop_value.npz`` (the network) and ``stop_value.json`` (grid, settings, info)."""
        folder = Path(folder)
        np.savez(folder / "stop_value.npz", **self.net.arrays())
        manifest = {
            "race_features": list(STOP_FEATURES),
            "prompt_width": self.prompt_width,
            "deadlines_s": list(self.deadlines_s),
            "settings": [[s.n, s.k, s.price, s.budget] for s in self.settings],
            "info": self.info,
        }
        (folder / "stop_value.json").write_text(json.dumps(manifest, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> StopValuePolicy:
        """Read what ``save`` wrote; refuses other race features (retrain)."""
        folder = Path(folder)
        manifest = json.loads((folder / "stop_value.json").read_text())
        if manifest.get("race_features") != list(STOP_FEATURES):
            raise ValueError(f"stop-value policy {folder} was fitted on other race features; "
                             "retrain it (python train.py)")  # fmt: skip
        with np.load(folder / "stop_value.npz") as arrays:
            net = ValueNet.from_arrays(dict(arrays))
        settings = [StopSetting(int(n), int(k), float(p), float(b))
                    for n, k, p, b in manifest["settings"]]  # fmt: skip
        return cls(net, tuple(manifest["deadlines_s"]), settings, int(manifest["prompt_width"]),
                   manifest.get("info", {}))  # fmt: skip


def _diagonal_blocks(w: np.ndarray) -> list[slice] | None:
    """The most equal square blocks along the diagonal of ``w`` outside which it is all zeros
    (None when ``w`` is not square or has one block)."""
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        return None
    width = w.shape[0]
    for count in range(width // 2, 1, -1):  # most blocks first; a trained block has no zero row
        if width % count:
            continue
        size = width // count
        inside = np.kron(np.eye(count, dtype=bool), np.ones((size, size), dtype=bool))
        if not w[~inside].any():
            return [slice(start, start + size) for start in range(0, width, size)]
    return None


def _block_diagonal(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """The matrices of ``blocks`` along the diagonal of one, zeros elsewhere."""
    out = np.zeros((sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)), np.float32)
    row = col = 0
    for block in blocks:
        out[row : row + block.shape[0], col : col + block.shape[1]] = block
        row, col = row + block.shape[0], col + block.shape[1]
    return out


def stop_mask(gain: np.ndarray, wait: np.ndarray, price: float) -> np.ndarray:
    """``StopValuePolicy.stop``'s rule on many rows (the tuning sweep uses it)."""
    return gain <= price * np.maximum(wait, 0.0)


def serving_index(deadlines_s: Sequence[float], deadline_s: float) -> int:
    """Index of the longest of ``deadlines_s`` at most ``deadline_s``; of the shortest when
    ``deadline_s`` is below them all.

    Why not the nearest one: an (n, k) tuned for a longer deadline counts on time the call does
    not have.  Synthetic profile, learner seed 0, settings checked on validation, MATH-500 x 16
    draws: at 0.29 s the nearest tuned deadline, 0.303 s, took 32 branches and lost 0.64 point
    to a static table tuned at 0.29 s (16 branches), the setting of 0.27 s 0.14 point.  At the
    grid's midpoints (0.29 ... 2.37 s), learner seeds 0-3, two tuning deadlines between grid
    deadlines, the worst deadline against static_best went from -0.64, -0.64, -0.69 and -0.58
    point to -0.53, -0.44, -0.29 and -0.21.
    """
    values = np.asarray(deadlines_s, dtype=float)
    fits = values <= deadline_s * (1 + 1e-9)
    return int(np.where(fits, values, -np.inf).argmax()) if fits.any() else int(values.argmin())
