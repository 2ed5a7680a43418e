"""The sequential environment: the policy watches a replayed call and decides while it runs.

Its first version, ``LatencyTTS-v0``, decided once per problem from the prompt; on the default
profile that policy cannot beat the static (n, k) table, because prompt features explain little
of a problem's difficulty.  What does carry per-problem information is the call as it unfolds:
which branches finished, whether their answers agree, how much time is left.  ``LatencyTTS-v1``
turns the call into a sequence of decisions over ``env.race.RaceState``, replayed event by
event by ``env.backends.replay_race.ReplayRace``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import register

from env.backends.replay import ReplayBackend
from env.backends.replay_race import ReplayRace
from env.config import RACE_ENV_ID, LoadDistribution, RaceEnvConfig
from env.features import OBS_BOUND, ProblemFeaturizer
from env.profiles.store import Profile
from env.race import CONTINUE as CONTINUE  # the stop component's values, re-exported
from env.race import RACE_FEATURES, STOP

DEFAULT_PROFILE = "synthetic-llama32-1b-h100"
DEFAULT_DEADLINE_RANGE_S = (0.2, 3.0)
"""Deadlines the registered environment trains on when its config names none: the range the
default profile's deadline grid spans (a 1B model on an H100 answers in tenths of seconds)."""


class RaceEnv(gym.Env):
    """Latency-aware test-time scaling as a race: start n branches with k drafts, then decide
    at every branch finish whether to answer now and how many tokens to draft next.

    ## Description

    An episode is one problem under one deadline, replayed from a profile.  At the start the
    agent picks n branches and k drafts per step; the replay then runs engine steps until a
    decision point: an engine step in which branches finished (they vote by answer class,
    ``env.task.voting``), or a fixed fraction of the deadline (``checkpoints``) when nothing
    finished.  At each decision point the agent continues or stops (answering with the votes
    so far) and sets k for the following steps, so k can rise as the live batch shrinks.  The
    call also ends when the vote is decided, when every branch finished, or at the deadline.

    ## Action Space

    ``MultiDiscrete([len(n_grid), len(k_grid), 2])``.  Component 0 indexes ``n_grid`` and is
    read only at the start; component 1 indexes ``k_grid`` (drafts per step from now on);
    component 2 is 0 = continue, 1 = stop and answer now, ignored at the start.

    ## Observation Space

    ``Box(-5, 5, (P + 15,), float32)``: the ``P`` prompt features of
    ``env.features.ProblemFeaturizer`` (prompt length, deadline, predicted difficulty, length,
    pass rate, agreement and acceptance), then the race features ``env.race.RACE_FEATURES``
    (each in [-1, 1], see ``RaceState.observation``): is_start, elapsed share of the deadline,
    engine steps left before the deadline at the measured step time, n, finished, answered,
    leader share, leader votes, margin, distinct answers, live batch, k, leader confidence,
    whether confidence is known (the synthetic profile has none), and the background load
    (other calls' branches in the engine batch, log-scaled; 0 on an idle engine or when
    ``observe_load`` is off).

    ## Rewards

    0 at every decision, and at the end ``1{voted answer correct} - latency_cost * latency_s /
    deadline_s`` (``RaceEnvConfig.reward``).  Only finished branches vote, so a correct answer
    is always in time.

    ## Starting State

    A problem drawn uniformly from the backend's problems and a deadline drawn log-uniformly
    from ``deadline_range_s`` (or uniformly from ``deadline_choices_s``); with a
    ``load_distribution``, a background load L drawn from it for the whole call (every engine
    step then runs at batch live + L, ``ReplayBackend.under_load``).  ``reset(options=)`` may
    fix ``problem_index``, ``deadline_s``, ``draw_seed`` (the replay's draw) and
    ``background_branches`` (L).

    ## Episode End

    Terminates when the call ends (stop, decided vote, all finished, deadline); never
    truncated.  ``info`` at the end carries the ``Outcome`` fields plus ``deadline_s``,
    ``problem_index``, ``background_branches`` and ``decisions``.

    ## Arguments

    ``gymnasium.make("LatencyTTS-v1", backend=ReplayBackend(...), featurizer=...,
    config=RaceEnvConfig(...))``; build the featurizer explicitly with
    ``ProblemFeaturizer.fit`` on the training problems.

    ## Version History

    * v1, observation layout 2: a 15th race feature, ``load`` (background branches sharing the
      engine batch), and ``load_distribution`` / ``observe_load`` in the config; policies
      saved with 14 race features are refused (``race_feature_names``) and must be retrained.
    * v1: the sequential race (observation: prompt features + 14 race features; actions
      (n, k, stop)); policies trained on v0 (one decision per problem) must be retrained.
    * v0 (removed): one decision (n, k, budget) per problem from the prompt alone.

    :param backend: the replay backend the races are replayed from.
    :param featurizer: maps prompt and deadline to the prompt features.
    :param config: action grids, deadlines, reward and checkpoints.
    """

    metadata: ClassVar[dict] = {"render_modes": []}

    def __init__(
        self,
        backend: ReplayBackend,
        featurizer: ProblemFeaturizer,
        config: RaceEnvConfig | None = None,
    ) -> None:
        self.backend, self.featurizer = backend, featurizer
        self.config = config = config or RaceEnvConfig()
        powers = tuple(2**i for i in range(backend.max_branches.bit_length()))
        self.n_grid = tuple(config.n_grid or powers)
        self.k_grid = tuple(config.k_grid or backend.k_grid)
        if max(self.n_grid) > backend.max_branches or min(self.n_grid) < 1:
            raise ValueError(f"n_grid {self.n_grid} must lie in 1..{backend.max_branches}")
        if not set(self.k_grid) <= set(backend.k_grid):
            raise ValueError(f"k_grid {self.k_grid} not supported by backend {backend.k_grid}")
        low, high = config.deadline_range_s or featurizer.deadline_range_s
        self._log_deadline_range = (math.log(low), math.log(high))
        self.load = LoadDistribution.parse(config.load_distribution)
        for level in self.load.levels if self.load else ():
            backend.under_load(level)  # refuses a load the step table does not cover
        problems = backend.problems
        texts, prompt_tokens = [p.problem for p in problems], [p.prompt_tokens for p in problems]
        predictions = featurizer.predict(texts, prompt_tokens)
        table = featurizer.problem_features(texts, prompt_tokens, predictions)
        self._prompt_table = np.insert(table, 1, 0.0, axis=1).astype(np.float32)
        width = self._prompt_table.shape[1] + len(RACE_FEATURES)
        self.action_space = gym.spaces.MultiDiscrete([len(self.n_grid), len(self.k_grid), 2])
        self.observation_space = gym.spaces.Box(-OBS_BOUND, OBS_BOUND, (width,), np.float32)
        self._race: ReplayRace | None = None
        self._prompt_obs: np.ndarray | None = None
        self._decisions = 0

    @property
    def race_state(self):
        """The running call's ``env.race.RaceState`` (None before the first reset)."""
        return None if self._race is None else self._race.state

    def prompt_observation(self, problem_index: int, deadline_s: float) -> np.ndarray:
        """The prompt part of the observation (fixed for the whole call)."""
        obs = self._prompt_table[problem_index].copy()
        obs[1] = self.featurizer.deadline_feature(deadline_s)
        return obs

    def _observe(self) -> np.ndarray:
        return np.concatenate([self._prompt_obs, self._race.state.observation()])

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        if "problem_index" in options:
            problem = int(options["problem_index"])
        else:
            problem = int(self.np_random.integers(len(self.backend.problems)))
        deadline = self._draw_deadline(options)
        load = self._draw_load(options)
        draw = options.get("draw_seed")
        rng = self.np_random if draw is None else np.random.default_rng(draw)
        config = self.config
        self._race = ReplayRace(self.backend.under_load(load), problem, deadline, rng,
                                config.checkpoints, config.observe_load)  # fmt: skip
        self._prompt_obs = self.prompt_observation(problem, deadline)
        self._decisions = 0
        info = {"problem_index": problem, "deadline_s": deadline, "background_branches": load}
        return self._observe(), info

    def _draw_load(self, options: dict) -> int:
        """The episode's background load: fixed by ``options``, else drawn (0 without a
        distribution, drawing nothing, so episodes without load are as before)."""
        if "background_branches" in options:
            return int(options["background_branches"])
        return 0 if self.load is None else self.load.draw(self.np_random)

    def _draw_deadline(self, options: dict) -> float:
        if "deadline_s" in options:
            return float(options["deadline_s"])
        choices = self.config.deadline_choices_s
        if choices:
            return float(choices[int(self.np_random.integers(len(choices)))])
        low, high = self._log_deadline_range
        return math.exp(low + (high - low) * self.np_random.random())

    def step(self, action):
        race = self._race
        if race is None or race.done:
            raise RuntimeError("step() needs reset() first (the episode has ended)")
        self._decisions += 1
        k = self.k_grid[int(action[1])]
        if not race.state.started:
            race.begin(self.n_grid[int(action[0])], k)
        elif int(action[2]) == STOP:
            race.stop()
        else:
            race.set_k(k)
        race.advance()  # runs engine steps until the next decision point or the end
        obs = self._observe()
        if not race.done:
            return obs, 0.0, False, False, {}
        outcome = race.outcome()
        state = race.state
        reward = self.config.reward(outcome, state.deadline_s)
        info = outcome.to_info()
        info.update(deadline_s=state.deadline_s, problem_index=race.p, decisions=self._decisions,
                    background_branches=race.backend.background_branches)  # fmt: skip
        return obs, reward, True, False, info


def default_featurizer(profile: Profile, config: RaceEnvConfig | None = None) -> ProblemFeaturizer:
    """The featurizer the registered environment fits when given none: on ``profile``'s
    training problems, scaling deadlines over ``config.deadline_range_s`` (default
    ``DEFAULT_DEADLINE_RANGE_S``)."""
    deadline_range = (config.deadline_range_s if config else None) or DEFAULT_DEADLINE_RANGE_S
    return ProblemFeaturizer.fit(profile.split("train"), deadline_range)


def make_race_env(
    backend: ReplayBackend | None = None,
    featurizer: ProblemFeaturizer | None = None,
    config: RaceEnvConfig | None = None,
    profile: str | Path = DEFAULT_PROFILE,
    split: str = "train",
) -> RaceEnv:
    """Entry point of ``LatencyTTS-v1`` (registered deterministic: replay with equal seeds gives
    equal episodes): replay ``profile``'s ``split`` unless ``backend`` is given; without
    ``featurizer``, fit one explicitly on the replayed profile's training problems
    (``default_featurizer``)."""
    backend = backend if backend is not None else ReplayBackend(profile, split=split)
    if featurizer is None:
        featurizer = default_featurizer(backend.profile, config)
    return RaceEnv(backend, featurizer, config)


register(id=RACE_ENV_ID, entry_point="env.race_env:make_race_env", nondeterministic=False)
