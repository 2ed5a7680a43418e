"""The Gymnasium environment in which a policy learns to allocate test-time compute per problem.

One episode is one decision: the controller sees a problem and its deadline and picks how many
branches to sample (n), how many draft tokens to verify per step (k), and how much of the
deadline to spend (the budget: the call stops at budget x deadline and answers with what has
finished; waiting longer only lets slower branches vote, and on MATH the slow responses are the
wrong ones more often).  The backend (``env.backends.protocol``; replay for training, live for
validation) runs the call and the reward says whether the voted answer was right in time.
Keeping the backend behind an interface lets the same environment, policies and evaluation
drive recorded profiles and the real engine.

``LatencyTTSEnv.run_episode`` is the episode's transition without the action indices: it stops
the call at the allocation's budget (``Allocation.stop_s``) and scores it (``EnvConfig.reward``).
``step`` runs it on the agent's action; evaluation and the baselines run it on theirs, so every
method is scored by the same code.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import register

from env.allocation import ActionGrids, Allocation, AllocationRequest
from env.backends.protocol import Backend, Outcome, ProblemInfo
from env.config import ENV_ID, LIVE_ENV_ID, EnvConfig
from env.features import OBS_BOUND, ProblemFeaturizer
from env.profiles.store import Profile, load_profile

DEFAULT_PROFILE = "synthetic-llama32-1b-h100"
DEFAULT_DEADLINE_RANGE_S = (1.0, 60.0)


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
    at budget x deadline, majority-votes among the finished ones (the rules of
    ``env.task.voting``: ties to the class that finished first) and stops as soon as the vote is
    decided.  Speculation does not change the answers, only their speed; more branches make the
    vote more reliable but each decoding step slower, and a branch that does not finish in time
    does not vote.

    ## Action Space

    ``MultiDiscrete([len(n_grid), len(k_grid), len(budget_grid)])``: component 0 indexes
    ``n_grid`` (default 1, 2, 4, ... up to the backend's maximum, 64 on the default profile),
    component 1 indexes ``k_grid`` (default the backend's, e.g. 0, 1, 2, 4; 0 means no
    speculation), component 2 indexes ``budget_grid`` (default 0.25, 0.35, 0.5, 0.7, 1.0).
    ``grids`` (an ``env.allocation.ActionGrids``) maps actions to allocations and back.

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

    ``1{voted answer correct} - latency_cost * latency_s / deadline_s`` (``EnvConfig.reward``).
    Only branches that finished within the budget vote, so a correct answer is always in time;
    ``latency_s`` never exceeds the deadline, so the penalty is at most ``latency_cost``
    (default 0.01).

    ## Starting State

    A problem drawn uniformly from the backend's problems and a deadline drawn log-uniformly
    from ``deadline_range_s`` (or uniformly from ``deadline_choices_s`` when configured).
    ``reset(options=...)`` may fix ``problem_index``, ``deadline_s`` and ``draw_seed`` (the
    seed of the backend's draw, for common random numbers across actions); with
    ``EnvConfig.sweep_deadlines_s`` resets walk a fixed schedule.

    ## Episode End

    Every episode terminates after its single step; it is never truncated.

    ## Arguments

    ``LatencyTTSEnv(backend, featurizer, config)``: both the backend and the featurizer are
    required (fit one with ``ProblemFeaturizer.fit`` on a profile's training problems, or load
    the one saved with a policy).  The ids that importing ``env.tts_env`` registers build
    them for you:

    - ``gymnasium.make("LatencyTTS-v0")`` replays the bundled profile
      ``synthetic-llama32-1b-h100`` on its training problems; keyword arguments ``profile``,
      ``split``, ``backend`` (a deterministic one), ``featurizer`` and ``config`` override the
      defaults; without ``featurizer`` one is fitted on the profile's training problems over
      ``config.deadline_range_s`` (default 1-60 s), see ``make_replay_env``.
    - ``gymnasium.make("LatencyTTSLive-v0", backend=..., featurizer=..., config=...)`` runs the
      live engine (default ``env.backends.live.LiveBackend`` on the MATH train problems) and is
      registered ``nondeterministic``, see ``make_live_env``.

    ``info`` after a step carries the ``env.backends.protocol.Outcome`` fields (correct,
    latency_s, n, k, branches_finished, ...) plus the budget, the deadline and the problem.

    ## Version History

    * v0: initial version (observation schema ``FEATURE_SCHEMA_VERSION`` 1; actions
      (n, k, budget), read by policy format ``policies.saved_policy.POLICY_FORMAT_VERSION`` 2).

    :param backend: what runs the calls (``env.backends.replay.ReplayBackend`` or the live one).
    :param featurizer: maps prompt and deadline to the observation.
    :param config: action grids, deadline range, reward and sweep settings.
    """

    metadata: ClassVar[dict] = {"render_modes": []}

    def __init__(
        self, backend: Backend, featurizer: ProblemFeaturizer, config: EnvConfig | None = None
    ) -> None:
        if backend is None or featurizer is None:
            raise TypeError(
                "LatencyTTSEnv needs a backend and a featurizer (ProblemFeaturizer.fit on a "
                f"profile's training problems); gymnasium.make({ENV_ID!r}) builds both for the "
                "bundled profile"
            )
        config = config or EnvConfig()
        self.backend, self.featurizer, self.config = backend, featurizer, config
        powers = tuple(2**i for i in range(backend.max_branches.bit_length()))
        self.grids = ActionGrids(
            tuple(config.n_grid or powers),
            tuple(config.k_grid or backend.k_grid),
            tuple(float(b) for b in config.budget_grid),
        )
        self.n_grid, self.k_grid, self.budget_grid = self.grids
        self._check_grids()
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

    def _check_grids(self) -> None:
        max_branches, supported_k = self.backend.max_branches, self.backend.k_grid
        if max(self.n_grid) > max_branches or min(self.n_grid) < 1:
            raise ValueError(f"n_grid {self.n_grid} must lie in 1..{max_branches}")
        if not set(self.k_grid) <= set(supported_k):
            raise ValueError(f"k_grid {self.k_grid} not supported by backend {supported_k}")
        if not all(0 < b <= 1 for b in self.budget_grid) or 1.0 not in self.budget_grid:
            raise ValueError(
                f"budget_grid {self.budget_grid} must lie in (0, 1] and include 1.0 "
                "(waiting until the deadline)"
            )

    def clone(self) -> LatencyTTSEnv:
        """Another environment on the same backend and precomputed features, with its own
        random state and no open episode (cheap: vectorised training makes several)."""
        other = copy.copy(self)
        other._np_random, other._np_random_seed = None, None
        other._episode, other._sweep_position = None, 0
        return other

    @property
    def problems(self) -> Sequence[ProblemInfo]:
        """The problems episodes are drawn from, indexed by ``ProblemInfo.index``."""
        return self.backend.problems

    @property
    def resolved_config(self) -> EnvConfig:
        """The configuration with the grids in use filled in (what a saved policy records)."""
        return dataclasses.replace(
            self.config, n_grid=self.n_grid, k_grid=self.k_grid, budget_grid=self.budget_grid
        )

    def action_of(self, n: int, k: int, budget: float = 1.0) -> np.ndarray:
        """The action selecting branch count ``n``, draft length ``k`` and ``budget``."""
        return self.grids.action(Allocation(n, k, budget))

    def allocation_of(self, action: np.ndarray) -> Allocation:
        """The (n, k, budget) an action selects."""
        return self.grids.allocation(action)

    def observation(self, problem_index: int, deadline_s: float) -> np.ndarray:
        """The observation of a problem under a deadline (what the policy sees)."""
        obs = self._obs_table[problem_index].copy()
        obs[1] = self.featurizer.deadline_feature(deadline_s)
        return obs

    def allocation_request(
        self, problem_indices: Sequence[int], deadline_s: float
    ) -> AllocationRequest:
        """What an allocator is shown for these problems under ``deadline_s``: the problems,
        their observations (as ``observation`` gives them) and the featurizer's predictions."""
        rows = list(problem_indices)
        observations = self._obs_table[rows]  # a copy: fancy indexing
        observations[:, 1] = self.featurizer.deadline_feature(deadline_s)
        return AllocationRequest(
            deadline_s=deadline_s,
            problems=tuple(self.backend.problems[p] for p in rows),
            observations=observations,
            predictions=self.predictions[rows],
            prediction_names=tuple(self.featurizer.target_names),
        )

    def run_episode(
        self,
        problem_index: int,
        allocation: Allocation,
        deadline_s: float,
        rng: np.random.Generator,
    ) -> tuple[Outcome, float]:
        """One episode's transition: run ``allocation`` on the backend until its budget's share
        of ``deadline_s``, and score the outcome.  Returns (outcome, reward)."""
        n, k, _ = allocation
        outcome = self.backend.run(problem_index, n, k, allocation.stop_s(deadline_s), rng)
        return outcome, self.config.reward(outcome, deadline_s)

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
        count = len(self.backend.problems)
        if sweep and not options:
            position = self._sweep_position
            self._sweep_position = (position + 1) % (count * len(sweep))
            problem, d_index = divmod(position, len(sweep))
            return problem, float(sweep[d_index]), [self.config.sweep_seed, problem, d_index]
        if "problem_index" in options:
            problem = int(options["problem_index"])
        else:
            problem = int(self.np_random.random() * count)
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
        outcome, reward = self.run_episode(
            episode.problem_index, allocation, episode.deadline_s, episode.rng
        )
        info = outcome.to_info()
        info["deadline_s"] = episode.deadline_s
        info["budget"] = allocation.budget
        info["problem_index"] = episode.problem_index
        return episode.obs.copy(), reward, True, False, info


def default_featurizer(profile: Profile, config: EnvConfig | None = None) -> ProblemFeaturizer:
    """The featurizer the registered environments fit when given none: on ``profile``'s training
    problems, scaling deadlines over ``config.deadline_range_s`` (default 1-60 s)."""
    deadline_range = (config.deadline_range_s if config else None) or DEFAULT_DEADLINE_RANGE_S
    return ProblemFeaturizer.fit(profile.split("train"), deadline_range)


def make_replay_env(
    backend: Backend | None = None,
    featurizer: ProblemFeaturizer | None = None,
    config: EnvConfig | None = None,
    profile: str | Path = DEFAULT_PROFILE,
    split: str = "train",
) -> LatencyTTSEnv:
    """Entry point of ``LatencyTTS-v0`` (registered deterministic): replay ``profile``'s
    ``split``, or run ``backend`` when given (it must promise ``deterministic = True``);
    without ``featurizer``, fit one with ``default_featurizer`` on the profile's training
    problems (the backend's own profile when it replays one).

    :raises ValueError: for a backend without the determinism promise (make
        ``LatencyTTSLive-v0`` for it instead).
    """
    from env.backends.replay import ReplayBackend

    backend = backend if backend is not None else ReplayBackend(profile, split=split)
    if not getattr(backend, "deterministic", False):
        raise ValueError(
            f"{ENV_ID} is registered deterministic, but backend {backend.name!r} does not promise "
            f"equal outcomes for equal seeds (deterministic = True): make {LIVE_ENV_ID} for it"
        )
    if featurizer is None:
        source = backend.profile if isinstance(backend, ReplayBackend) else load_profile(profile)
        featurizer = default_featurizer(source, config)
    return LatencyTTSEnv(backend, featurizer, config)


def make_live_env(
    backend: Backend | None = None,
    featurizer: ProblemFeaturizer | None = None,
    config: EnvConfig | None = None,
    profile: str | Path = DEFAULT_PROFILE,
    split: str = "train",
    limit: int | None = None,
) -> LatencyTTSEnv:
    """Entry point of ``LatencyTTSLive-v0`` (registered nondeterministic): ``backend``, or the
    live engine (``LiveBackend(split=split, limit=limit)``); without ``featurizer``, fit one with
    ``default_featurizer`` on ``profile``'s training problems."""
    if backend is None:
        from env.backends.live import LiveBackend

        backend = LiveBackend(split=split, limit=limit)
    featurizer = featurizer or default_featurizer(load_profile(profile), config)
    return LatencyTTSEnv(backend, featurizer, config)


# Registered here, with the class, so that ``import env`` stays free of Gymnasium.  Each id
# declares whether equal seeds give equal episodes (Gymnasium's checker tests it when they do).
register(id=ENV_ID, entry_point="env.tts_env:make_replay_env", nondeterministic=False)
register(id=LIVE_ENV_ID, entry_point="env.tts_env:make_live_env", nondeterministic=True)
