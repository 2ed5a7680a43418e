"""The learned race controller: an SB3 model deciding at every decision point of a race.

It is the one controller code for every source of a race: the replayed race in training and
evaluation (``policies.race_eval``), and the live engine in serving (``env.backends.live_race``
through ``policies.controller``).  So this module stays on the serving path's diet: numpy and
torch, no Gymnasium, no training code, and Stable-Baselines3 only through the model it is
handed.

Its observation is the prompt features (``env.features.ProblemFeaturizer``) followed by the
race features (``env.race.RaceState.observation``).  The prompt features come from either
source: an environment's precomputed table (``RaceEnv.prompt_observation``, fast for replay),
or the featurizer on the problem's text and prompt length (any prompt, live); tests check the
two agree.  The race features are read with the scales (largest n and k) the policy was trained
with, whoever built the state.

Decisions sit inside the engine's step loop, so they must be cheap: ``PolicyNetwork`` runs the
actor directly under ``torch.inference_mode`` on a preallocated tensor instead of SB3's
``predict`` (which converts and checks the observation and builds a distribution object every
call); ``python -m policies.bench_decisions`` measures both.

A policy may also be a ``policies.stop_value.StopValuePolicy`` (a value network fitted on
counterfactual replays, with n, k, a stop price and a budget per deadline) in place of an SB3
model: the controller then takes (n, k) from the setting of the call's deadline and, at each
decision point where branches finished, stops when the predicted accuracy still to gain is
worth less than the time it costs.  Both kinds are served by this one class, so every caller
(evaluation, answer confidence, the live controller) handles either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from env.backends.protocol import ProblemInfo
from env.features import ProblemFeaturizer
from env.race import STOP, RaceState
from policies.race_controllers import CONTINUE, Decision
from policies.stop_value import StopValuePolicy, state_features

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm

    from policies.saved_policy import SavedRacePolicy


class PolicyNetwork:
    """The most likely action of an SB3 actor-critic with ``MultiDiscrete`` actions, computed
    with the actor alone (equal to ``model.predict(obs, deterministic=True)``; tested).

    :param model: the SB3 model (its ``policy`` is put in evaluation mode).
    """

    def __init__(self, model: BaseAlgorithm) -> None:
        from stable_baselines3.common.preprocessing import preprocess_obs

        self._policy = policy = model.policy
        policy.set_training_mode(False)
        self._preprocess = lambda obs: preprocess_obs(obs, policy.observation_space)
        nvec = getattr(model.action_space, "nvec", None)
        if nvec is None:
            raise ValueError(f"expected MultiDiscrete actions, got {model.action_space}")
        self._sizes = [int(x) for x in nvec]
        width = int(np.prod(model.observation_space.shape))
        self._tensor = torch.zeros((1, width), dtype=torch.float32)
        self.obs = self._tensor.numpy()[0]
        """The observation to act on: write it in place, then call ``act``."""

    def act(self) -> list[int]:
        """The most likely index of each action component for ``obs``."""
        policy = self._policy
        with torch.inference_mode():
            features = policy.pi_features_extractor(self._preprocess(self._tensor))
            logits = policy.action_net(policy.mlp_extractor.forward_actor(features))[0]
            chunks = torch.split(logits, self._sizes)
            # as SB3's deterministic MultiCategorical: argmax of each component's probabilities
            return [int(torch.softmax(chunk, -1).argmax()) for chunk in chunks]


class LearnedController:
    """An SB3 race model as a ``RaceController``: its most likely action at every decision.

    Build it from an environment (``LearnedController(model, env)``: the env's featurizer,
    grids, race scales and prompt table) or from a saved policy (``from_saved``).

    :param model: the trained model (actions ``MultiDiscrete([n, k, stop])``), or a
        ``StopValuePolicy``.
    :param env: a race environment (``env.race_env.RaceEnv``) the model was trained with;
        optional when the keyword arguments are given.
    :param featurizer: computes the prompt features of any prompt.
    :param n_grid: branch counts the first action component indexes.
    :param k_grid: draft lengths the second component indexes.
    :param race_scales: (n_max, k_max) the race features were scaled by in training.
    :param name: the method's name in reports.
    """

    reads_load = True
    """``begin`` takes the engine's background load (``env.race.begin_call``)."""

    def __init__(
        self,
        model: BaseAlgorithm,
        env=None,
        *,
        featurizer: ProblemFeaturizer | None = None,
        n_grid: Sequence[int] | None = None,
        k_grid: Sequence[int] | None = None,
        race_scales: tuple[int, int] | None = None,
        name: str = "policy",
    ) -> None:
        if env is not None:
            featurizer = featurizer or env.featurizer
            n_grid, k_grid = n_grid or env.n_grid, k_grid or env.k_grid
            race_scales = race_scales or (env.backend.max_branches, max(env.backend.k_grid))
        if featurizer is None or n_grid is None or k_grid is None or race_scales is None:
            raise ValueError("LearnedController needs an env, or featurizer, grids and scales")
        self.model, self.env, self.featurizer, self.name = model, env, featurizer, name
        self.n_grid, self.k_grid = tuple(n_grid), tuple(k_grid)
        self.race_scales = (int(race_scales[0]), int(race_scales[1]))
        self._prompt_width = len(featurizer.feature_names)
        self.stop_value = model if isinstance(model, StopValuePolicy) else None
        if self.stop_value is None:
            self._net = PolicyNetwork(model)
        else:
            self._prompt = np.zeros(self._prompt_width, dtype=np.float32)
            self._seen = 0

    @classmethod
    def from_saved(cls, policy: SavedRacePolicy, name: str = "policy") -> LearnedController:
        """The controller of a loaded race policy (``policies.saved_policy.load_race_policy``).

        The race scales are the ones recorded in ``policy.json`` (``race_scales``); a policy
        without them was trained on a backend whose largest n and k are its grids' (as
        ``train.py`` sets them).
        """
        config = policy.env_config
        scales = policy.info.get("race_scales") or (max(config.n_grid), max(config.k_grid))
        return cls(policy.model, featurizer=policy.featurizer, n_grid=config.n_grid,
                   k_grid=config.k_grid, race_scales=tuple(scales), name=name)  # fmt: skip

    def prompt_features(self, problem: ProblemInfo, deadline_s: float) -> np.ndarray:
        """The prompt part of the observation: the env's table when ``problem`` is one of its
        backend's, else the featurizer on the problem's text (no deadline reads as the longest
        deadline the featurizer was fitted for)."""
        problems = () if self.env is None else self.env.backend.problems
        if 0 <= problem.index < len(problems) and problems[problem.index].id == problem.id:
            return self.env.prompt_observation(problem.index, deadline_s)
        if not math.isfinite(deadline_s):
            deadline_s = self.featurizer.deadline_range_s[1]
        return self.featurizer.transform(problem.problem, problem.prompt_tokens, deadline_s)

    def observation(self, race: RaceState) -> np.ndarray:
        """The full observation of ``race`` (after ``begin``): prompt features, race features
        (for a stop-value policy: its value network's input, race features first)."""
        if self.stop_value is not None:
            return np.concatenate([state_features(race), self._prompt])
        self._net.obs[self._prompt_width :] = race.observation(*self.race_scales)
        return self._net.obs.copy()

    def begin(
        self, problem: ProblemInfo, deadline_s: float, background_branches: int = 0
    ) -> tuple[int, int]:
        """(n, k) for the call; ``background_branches``: other calls' branches in the engine
        batch (the observation's ``load``, as the race state will report it; a stop-value
        policy does not read it)."""
        if self.stop_value is not None:
            setting = self.stop_value.setting(deadline_s)
            # the value network was fitted with the call's own deadline (its horizon)
            call_deadline = self.stop_value.call_deadline(deadline_s)
            self._prompt = self.prompt_features(problem, call_deadline)
            self._price, self._seen = setting.price, 0
            return setting.n, setting.k
        self._net.obs[: self._prompt_width] = self.prompt_features(problem, deadline_s)
        start = RaceState(deadline_s, *self.race_scales, background_branches=background_branches)
        self._net.obs[self._prompt_width :] = start.observation()
        action = self._net.act()
        return self.n_grid[action[0]], self.k_grid[action[1]]

    def decide(self, state: RaceState) -> Decision:
        if self.stop_value is not None:
            # only where branches finished: a checkpoint changes nothing but the time, and the
            # stop prices were tuned on the finish points alone
            if state.tally.finished == self._seen:
                return CONTINUE
            self._seen = state.tally.finished
            return Decision(stop=self.stop_value.stop(state, self._prompt, self._price))
        self._net.obs[self._prompt_width :] = state.observation(*self.race_scales)
        action = self._net.act()
        return Decision(stop=action[2] == STOP, k=self.k_grid[action[1]])

    def call_deadline(self, deadline_s: float) -> float:
        """The deadline, or for a stop-value policy its setting's horizon when that is sooner."""
        if self.stop_value is not None:
            return self.stop_value.call_deadline(deadline_s)
        return deadline_s
