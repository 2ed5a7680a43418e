"""The Gymnasium environment in which a policy learns to allocate test-time compute per problem.

One episode is one decision: the controller sees a problem and its deadline and picks how many
branches to sample (n), how many draft tokens to verify per step (k), and how much of the
deadline to spend (the budget: the call stops at budget x deadline and answers with what has
finished; waiting longer only lets slower branches vote, and on MATH the slow responses are the
wrong ones more often).  The backend
(``env.backends.protocol``; replay for training, live for validation) runs the call and the
reward says
whether the voted answer was right in time.  Keeping the backend behind an interface lets the
same environment, policies and evaluation drive recorded profiles and the real engine.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, NamedTuple

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import EnvSpec

from env.backends.protocol import Backend
from env.features import OBS_BOUND, ProblemFeaturizer
from env.profiles.store import load_profile

ENV_ID = "LatencyTTS-v0"
DEFAULT_PROFILE = "synthetic-llama32-1b-h100"
DEFAULT_DEADLINE_RANGE_S = (1.0, 60.0)
DEFAULT_BUDGET_GRID = (0.25, 0.35, 0.5, 0.7, 1.0)


class Allocation(NamedTuple):
    """What one call gets: n branches, k drafts per verification step, and the share of the
    deadline it may use (1.0: until the deadline; the published static method always waits)."""

    n: int
    k: int
    budget: float = 1.0

    @classmethod
    def from_action(cls, action, n_grid: tuple, k_grid: tuple, budget_grid: tuple) -> Allocation:
        """The allocation a ``MultiDiscrete`` action selects from the grids it indexes."""
        return cls(n_grid[int(action[0])], k_grid[int(action[1])], budget_grid[int(action[2])])


@dataclass
class EnvConfig:
    """Settings of ``LatencyTTSEnv`` that a saved policy depends on (stored beside it).

    :param n_grid: branch counts the first action component selects from; None: powers of two
        up to the backend's ``max_branches`` (1, 2, 4, ..., 64 for 64 recorded branches).
    :param k_grid: draft lengths the second component selects from; None: the backend's.
    :param budget_grid: shares of the deadline the third component selects from, in (0, 1]
        and including 1.0; the call stops at ``budget * deadline``.
    :param deadline_range_s: (low, high): deadlines are drawn log-uniformly from it; None: the
        featurizer's ``deadline_range_s``.
    :param deadline_choices_s: when set, deadlines are drawn uniformly from these values (e.g.
        the evaluation grid) instead of from the range; the range still scales the feature.
    :param latency_cost: reward penalty per unit of ``latency_s / deadline_s``.
    :param sweep_deadlines_s: when set, ``reset()`` without options walks every problem at each
        of these deadlines in a fixed order with fixed draws instead of sampling, so repeated
        evaluations (e.g. SB3's ``EvalCallback``) score the same episodes.
    :param sweep_seed: seed of the sweep's draws.
    """

    n_grid: tuple[int, ...] | None = None
    k_grid: tuple[int, ...] | None = None
    budget_grid: tuple[float, ...] = DEFAULT_BUDGET_GRID
    deadline_range_s: tuple[float, float] | None = None
    deadline_choices_s: tuple[float, ...] | None = None
    latency_cost: float = 0.01
    sweep_deadlines_s: tuple[float, ...] | None = None
    sweep_seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EnvConfig:
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**values)


@dataclass
class _Episode:
    problem_index: int
    deadline_s: float
    rng: np.random.Generator
    obs: np.ndarray = field(repr=False)


class LatencyTTSEnv(gym.Env):
    """Latency-aware test-time scaling: choose (n, k, budget) for one math problem and deadline.

    ## Description

    An episode is one problem and one deadline.  The agent picks n parallel sampling branches
    and k speculative draft tokens per verification step, and a budget: the share of the
    deadline the call may use.  The backend samples the branches, aborts those still running
    at budget x deadline, majority-votes among the finished ones (ties
    to the class that finished first) and stops as soon as the vote is decided.  Speculation
    does not change the answers, only their speed; more branches make the vote more reliable
    but each decoding step slower, and a branch that does not finish in time does not vote.

    ## Action Space

    ``MultiDiscrete([len(n_grid), len(k_grid), len(budget_grid)])``: component 0 indexes
    ``n_grid`` (default 1, 2, 4, ... up to the backend's maximum, 64 on the default profile),
    component 1 indexes ``k_grid`` (default the backend's, e.g. 0, 1, 2, 4; 0 means no
    speculation), component 2 indexes ``budget_grid`` (default 0.25, 0.35, 0.5, 0.7, 1.0).

    ## Observation Space

    ``Box(-5, 5, (6 + profiled speculative methods,), float32)``, computed from the prompt
    and the deadline only (``env.features.ProblemFeaturizer``):

    | index | feature                 | meaning                                            |
    |-------|-------------------------|----------------------------------------------------|
    | 0     | log_prompt_tokens       | ln(prompt tokens), standardised on training data   |
    | 1     | deadline                | ln(deadline); the deadline range maps to [-1, 1]   |
    | 2     | pred_level              | predicted MATH level 1..5 mapped to [-1, 1]        |
    | 3     | pred_log_mean_tokens    | predicted ln(mean response tokens), standardised   |
    | 4     | pred_pass_rate          | predicted single-branch accuracy, to [-1, 1]       |
    | 5     | pred_agreement          | predicted largest-answer share, to [-1, 1]         |
    | 6...  | pred_accept_<method>    | predicted draft acceptance per method, to [-1, 1]  |

    ## Rewards

    ``1{voted answer correct} - latency_cost * latency_s / deadline_s``.  Only branches that
    finished within the budget vote, so a correct answer is always in time; ``latency_s`` never
    exceeds the deadline, so the penalty is at most ``latency_cost`` (default 0.01).

    ## Starting State

    A problem drawn uniformly from the backend's problems and a deadline drawn log-uniformly
    from ``deadline_range_s`` (or uniformly from ``deadline_choices_s`` when configured).
    ``reset(options=...)`` may fix ``problem_index``, ``deadline_s`` and ``draw_seed`` (the
    seed of the backend's draw, for common random numbers across actions); with
    ``EnvConfig.sweep_deadlines_s`` resets walk a fixed schedule.

    ## Episode End

    Every episode terminates after its single step; it is never truncated.

    ## Arguments

    ``gymnasium.make("LatencyTTS-v0", backend=..., featurizer=..., config=EnvConfig(...))``.
    Without a backend the environment replays ``profile`` (default the bundled
    ``synthetic-llama32-1b-h100``) on its ``split``; without a featurizer it fits one on the
    profile's training problems.  ``info`` after a step carries the
    ``env.backends.protocol.Outcome``
    fields (correct, latency_s, n, k, branches_finished, ...) plus the budget, the deadline
    and the problem.

    ## Version History

    * v0: initial version (observation schema ``FEATURE_SCHEMA_VERSION`` 1; actions
      (n, k, budget), read by policy format ``policies.ppo_policy.POLICY_FORMAT_VERSION`` 2).

    :param backend: what runs the calls (``env.backends.replay.ReplayBackend`` or the live one).
    :param featurizer: maps prompt and deadline to the observation.
    :param config: action grids, deadline range, reward and sweep settings.
    :param profile: profile name or folder replayed when ``backend`` is None.
    :param split: that profile's problems to serve (``"train"`` or ``"test"``).
    """

    metadata: ClassVar[dict] = {"render_modes": []}

    def __init__(
        self,
        backend: Backend | None = None,
        featurizer: ProblemFeaturizer | None = None,
        config: EnvConfig | None = None,
        profile: str | Path = DEFAULT_PROFILE,
        split: str = "train",
    ) -> None:
        config = config or EnvConfig()
        if backend is None or featurizer is None:
            from env.backends.replay import ReplayBackend

            backend = backend or ReplayBackend(profile, split=split)
            source = backend.profile if isinstance(backend, ReplayBackend) else None
            featurizer = featurizer or ProblemFeaturizer.fit(
                (source or load_profile(profile)).split("train"),
                config.deadline_range_s or DEFAULT_DEADLINE_RANGE_S,
            )
        self.backend, self.featurizer = backend, featurizer
        self.config = config
        powers = tuple(2**i for i in range(backend.max_branches.bit_length()))
        self.n_grid = tuple(config.n_grid or powers)
        self.k_grid = tuple(config.k_grid or backend.k_grid)
        if max(self.n_grid) > backend.max_branches or min(self.n_grid) < 1:
            raise ValueError(f"n_grid {self.n_grid} must lie in 1..{backend.max_branches}")
        if not set(self.k_grid) <= set(backend.k_grid):
            raise ValueError(f"k_grid {self.k_grid} not supported by backend {backend.k_grid}")
        self.budget_grid = tuple(float(b) for b in config.budget_grid)
        if not all(0 < b <= 1 for b in self.budget_grid) or 1.0 not in self.budget_grid:
            raise ValueError(
                f"budget_grid {self.budget_grid} must lie in (0, 1] and include 1.0 "
                "(waiting until the deadline)"
            )
        low, high = config.deadline_range_s or featurizer.deadline_range_s
        self._log_deadline_range = (math.log(low), math.log(high))
        problems = backend.problems
        texts, prompt_tokens = [p.problem for p in problems], [p.prompt_tokens for p in problems]
        self.predictions = featurizer.predict(texts, prompt_tokens)
        """Featurizer predictions per problem (rows) and ``featurizer.target_names`` (columns)."""
        table = featurizer.problem_features(texts, prompt_tokens, self.predictions)
        self._obs_table = np.insert(table, 1, 0.0, axis=1).astype(np.float32)
        self.action_space = gym.spaces.MultiDiscrete(
            [len(self.n_grid), len(self.k_grid), len(self.budget_grid)]
        )
        self.observation_space = gym.spaces.Box(
            -OBS_BOUND, OBS_BOUND, (self._obs_table.shape[1],), np.float32
        )
        self._sweep_position = 0
        self._episode: _Episode | None = None
        self._deterministic = bool(getattr(backend, "deterministic", False))
        self.spec = EnvSpec(ENV_ID, entry_point="env.tts_env:LatencyTTSEnv")

    @property
    def spec(self) -> EnvSpec | None:
        """Gymnasium's spec; ``nondeterministic`` unless the backend promises determinism
        (replay does; the live engine's wall times and samples differ run to run)."""
        return self._spec

    @spec.setter
    def spec(self, value: EnvSpec | None) -> None:  # gymnasium.make assigns one too
        if value is not None and not self._deterministic:
            value = dataclasses.replace(value, nondeterministic=True)
        self._spec = value

    def clone(self) -> LatencyTTSEnv:
        """Another environment on the same backend and precomputed features, with its own
        random state and no open episode (cheap: vectorised training makes several)."""
        other = copy.copy(self)
        other._np_random, other._np_random_seed = None, None
        other._episode, other._sweep_position = None, 0
        return other

    @property
    def resolved_config(self) -> EnvConfig:
        """The configuration with the grids in use filled in (what a saved policy records)."""
        return dataclasses.replace(
            self.config, n_grid=self.n_grid, k_grid=self.k_grid, budget_grid=self.budget_grid
        )

    def action_of(self, n: int, k: int, budget: float = 1.0) -> np.ndarray:
        """The action selecting branch count ``n``, draft length ``k`` and ``budget``."""
        return np.array(
            [self.n_grid.index(n), self.k_grid.index(k), self.budget_grid.index(budget)]
        )

    def allocation_of(self, action: np.ndarray) -> Allocation:
        """The (n, k, budget) an action selects."""
        return Allocation.from_action(action, self.n_grid, self.k_grid, self.budget_grid)

    def run(self, problem_index: int, allocation: Allocation, deadline_s: float, rng):
        """Run one allocation on the backend: the call stops at ``budget * deadline_s``."""
        n, k, budget = allocation
        return self.backend.run(problem_index, n, k, budget * deadline_s, rng)

    def observation(self, problem_index: int, deadline_s: float) -> np.ndarray:
        """The observation of a problem under a deadline (what the policy sees)."""
        obs = self._obs_table[problem_index].copy()
        obs[1] = self.featurizer.deadline_feature(deadline_s)
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        problem, deadline, draw_seed = self._next_episode(options)
        rng = self.np_random if draw_seed is None else np.random.default_rng(draw_seed)
        obs = self.observation(problem, deadline)
        self._episode = _Episode(problem, deadline, rng, obs)
        return obs, {"problem_index": problem, "deadline_s": deadline}

    def _next_episode(self, options: dict) -> tuple[int, float, int | list | None]:
        sweep = self.config.sweep_deadlines_s
        if sweep and not options:
            position = self._sweep_position
            self._sweep_position = (position + 1) % (len(self.backend.problems) * len(sweep))
            problem, d_index = divmod(position, len(sweep))
            return problem, float(sweep[d_index]), [self.config.sweep_seed, problem, d_index]
        if "problem_index" in options:
            problem = int(options["problem_index"])
        else:
            problem = int(self.np_random.random() * len(self.backend.problems))
        choices = self.config.deadline_choices_s
        if "deadline_s" in options:
            deadline = float(options["deadline_s"])
        elif choices:
            deadline = float(choices[int(self.np_random.random() * len(choices))])
        else:
            low, high = self._log_deadline_range
            deadline = math.exp(low + (high - low) * self.np_random.random())
        return problem, deadline, options.get("draw_seed")

    def step(self, action):
        episode = self._episode
        if episode is None:
            raise RuntimeError("step() needs reset() first: every episode is a single step")
        self._episode = None
        allocation = self.allocation_of(action)
        outcome = self.run(episode.problem_index, allocation, episode.deadline_s, episode.rng)
        reward = float(outcome.correct) - (
            self.config.latency_cost * outcome.latency_s / episode.deadline_s
        )
        info = outcome.to_info()
        info["deadline_s"] = episode.deadline_s
        info["budget"] = allocation.budget
        info["problem_index"] = episode.problem_index
        return episode.obs.copy(), reward, True, False, info
