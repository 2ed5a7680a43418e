"""The deployable decoding controller: a race controller driving the live engine.

Training and evaluation score a controller on replayed races; deployment runs the same
controller on the live engine (``env.backends.live_race``): given a problem's text and a
deadline it picks (n, k) at the start, then watches the call step by step and, at every branch
finish and at a few fractions of the deadline, answers now or goes on with the k it sets.  The
controller is the learned race policy of a saved ``LatencyTTS-v1`` policy
(``policies.learned_controller``), or any other ``RaceController`` (e.g. a tuned
``RuleController``).  It returns the voted answer with enough bookkeeping (start (n, k), k
changes, why it stopped, votes, branches with their confidence) to explain it.
``policies.server`` serves this over HTTP.  A problem is checked and tokenized once
(``prepare``); the server does that before queueing a request and hands the prepared problem on.

A policy is only meaningful with the observations it was trained on and can only be served by
an engine that can run its actions, so both are checked when the controller is built: the
saved race policy's checks (``policies.saved_policy.load_race_policy``), and the n and k grids
against the engine's ``max_n`` and ``k_max`` (``check_policy_fits``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.vllm_engine import VLLMEngine
from env.backends.live_race import LiveRaceResult, run_live_race
from env.backends.protocol import ProblemInfo
from env.race import DEFAULT_CHECKPOINTS
from env.task.prompt import build_user_message
from policies.confidence import ConfidenceModel
from policies.learned_controller import LearnedController
from policies.race_controllers import RaceController
from policies.saved_policy import SavedRacePolicy, load_race_policy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedProblem:
    """A problem checked and tokenized for the engine once (``DecodingController.prepare``).

    :param text: the problem statement (the policy's features read it).
    :param prompt_ids: the chat-formatted prompt's token ids, as the engine will run them.
    """

    text: str
    prompt_ids: list[int]

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass
class Solution:
    """What ``DecodingController.solve`` returns.

    :param answer: the voted answer (content of the winning class's ``\\boxed{}``), or None
        when no branch finished with an answer in time.
    :param n: branches sampled (the controller's choice at the start).
    :param k: draft tokens verified per step at the start (later changes in ``k_changes``).
    :param budget: share of the deadline the controller may spend (its ``call_deadline``;
        1.0 for the learned policy and when there is no deadline).
    :param latency_s: seconds from the ``solve`` call to its return.
    :param deadline_s: the deadline the call honoured (None: none).
    :param batch_max: the largest engine batch (branches of every call in flight) it ran in.
    :param stopped_by: ``"complete"``, ``"early_stop"`` (the vote was decided or the
        controller answered), ``"deadline"`` or ``"cancelled"`` (the engine's
        ``Rollout.stopped_by``).
    :param stop_reason: why the race ended: ``"decided"``, ``"controller"``, ``"deadline"``,
        ``"complete"`` or ``"cancelled"``.
    :param k_changes: ``[seconds, k]`` for each change of k (seconds from the engine call's
        start, as the branches' ``finish_s``).
    :param decisions: decision points at which the controller was asked.
    :param votes: answer (its class's representative) -> number of finished branches that
        gave it, in the order the classes first finished (the vote: ``env.task.voting``).
    :param branches: per branch: index, answer, finish_s (None if aborted), tokens,
        finish_reason (``"stop"``, ``"length"`` or ``"aborted"``), mean_logprob and
        lowest_window_logprob (None when not recorded).
    :param prompt_tokens: prompt length after the chat template.
    :param completion_tokens: tokens generated over all branches.
    :param confidence: the probability that ``answer`` is right, from the policy's calibrated
        confidence model (``policies.confidence``; fitted on the profile the policy was
        trained on); None when the policy has none (or no answer: then 0.0).
    """

    answer: str | None
    n: int
    k: int
    budget: float
    latency_s: float
    deadline_s: float | None
    stopped_by: str
    stop_reason: str
    k_changes: list[list[float]]
    decisions: int
    votes: dict[str, int]
    branches: list[dict]
    prompt_tokens: int
    completion_tokens: int
    confidence: float | None = None
    batch_max: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class DecodingController:
    """Answers math problems under a deadline with a race controller on a live engine.

    :param policy: a saved race policy (loaded, or its folder: ``load_race_policy``), or a
        ``RaceController`` (e.g. ``RuleController``).
    :param engine: the running engine; its ``max_n`` and ``k_max`` must cover the policy's
        grids.
    :param checkpoints: fractions of the deadline that are decision points when no branch
        finished (the race environment's default).
    :param logprobs: record sampled-token log-probabilities (the branches' confidence).
    :raises ValueError: when the policy is not a race policy this code reads (retrain), or does
        not fit this engine (its grids).
    """

    def __init__(
        self,
        policy: SavedRacePolicy | RaceController | str | Path,
        engine: VLLMEngine,
        checkpoints: tuple[float, ...] = DEFAULT_CHECKPOINTS,
        logprobs: bool = True,
    ) -> None:
        if isinstance(policy, str | Path):
            policy = load_race_policy(policy)
        self.engine, self.checkpoints, self.logprobs = engine, tuple(checkpoints), logprobs
        self.last_start: tuple[int, int] | None = None
        """(n, k) the race controller chose for the latest call (before any cap): what the next
        call most likely asks, which the server's admission plans with before it starts."""
        config = engine.config
        if isinstance(policy, SavedRacePolicy):
            self.policy = policy
            self.n_grid, self.k_grid = check_policy_fits(policy, engine)
            self.race_controller: RaceController = LearnedController.from_saved(policy)
            self.confidence = ConfidenceModel.load_if_present(policy.folder)
            _warn_if_other_method(policy, engine)
        else:
            self.policy, self.confidence = None, None
            self.n_grid = tuple(range(1, config.max_n + 1))
            self.k_grid = tuple(range(config.k_max + 1))
            self.race_controller = policy

    def prepare(self, problem: str | PreparedProblem) -> PreparedProblem:
        """Check ``problem`` and tokenize its prompt as the engine will run it (once).

        :raises ValueError: for a non-string or blank problem, or one too long for the model.
        """
        if isinstance(problem, PreparedProblem):
            return problem
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError("problem must be a non-empty string")
        return PreparedProblem(problem, self.engine.prompt_token_ids(build_user_message(problem)))

    def solve(
        self,
        problem: str | PreparedProblem,
        deadline_s: float | None,
        cancel: threading.Event | None = None,
        max_tokens: int | None = None,
        max_n: int | None = None,
        on_start: Callable[[int, int], None] | None = None,
    ) -> Solution:
        """Run the race on the live engine and return the majority vote of the branches
        finished when it ended.

        The deadline counts from this call (the controller's decisions are included) with the
        engine's semantics: the call returns by the controller's call deadline with the
        branches finished by then; None or inf mean no deadline.  The call stops as soon as
        the controller answers or the unfinished branches can no longer change the winner.
        Setting ``cancel`` aborts the call after the current engine step.  ``max_tokens`` caps
        each branch (at most the engine's ``max_tokens``), ``max_n`` the branches (the server's
        admission); ``on_start(n, k)`` is called with the controller's choice (before the
        cap) once its branches are queued in the engine.  Calls made at the same time (from
        several threads) share the engine's batch.

        :raises ValueError: for a bad problem, deadline or max_tokens (before the engine runs).
        """
        start = time.monotonic()
        deadline = self.engine.check_deadline(deadline_s)
        prepared = self.prepare(problem)
        info = ProblemInfo(-1, "", prepared.text, prepared.prompt_tokens)

        def started(n: int, k: int) -> None:
            self.last_start = (n, k)
            if on_start is not None:
                on_start(n, k)

        race = run_live_race(self.engine, self.race_controller, info, prepared.prompt_ids,
                             deadline, checkpoints=self.checkpoints, max_tokens=max_tokens,
                             cancel=cancel, logprobs=self.logprobs, started_at=start,
                             max_n=max_n, on_start=started)  # fmt: skip
        call_deadline = race.state.deadline_s
        budget = 1.0 if deadline is None else call_deadline / deadline
        solution = _solution(race, budget, time.monotonic() - start, deadline)
        if self.confidence is not None:
            solution.confidence = self.confidence.predict(race.state)
        return solution


def _solution(
    race: LiveRaceResult, budget: float, latency_s: float, deadline: float | None
) -> Solution:
    """The controller's report of a finished race."""
    rollout, vote = race.rollout, race.vote
    branches = []
    for b in rollout.branches:
        confidence = race.confidences.get(b.index)
        branches.append({
            "index": b.index,
            "answer": vote.answers.get(b.index),
            "finish_s": b.finish_s,
            "tokens": b.token_count,
            "finish_reason": b.finish_reason,
            "mean_logprob": None if confidence is None else confidence.mean_logprob,
            "lowest_window_logprob": None if confidence is None
            else confidence.lowest_window_logprob,
        })  # fmt: skip
    return Solution(
        answer=vote.winner,
        n=rollout.n,
        k=rollout.k,
        budget=budget,
        latency_s=latency_s,
        deadline_s=deadline,
        stopped_by=rollout.stopped_by,
        stop_reason=race.stop_reason,
        k_changes=[[at, k] for at, k in rollout.k_changes],
        decisions=len(race.decision_s),
        votes=vote.votes,
        branches=branches,
        prompt_tokens=rollout.prompt_tokens,
        completion_tokens=rollout.generated_tokens,
        batch_max=rollout.batch_max,
    )


def _warn_if_other_method(policy: SavedRacePolicy, engine: VLLMEngine) -> None:
    trained_for = policy.info.get("spec_method")
    if trained_for and trained_for != engine.config.method_name:
        log.warning(
            "policy %s was trained for speculative method %r but the engine runs %r: its "
            "k choices assume the other method's speed",
            policy.folder,
            trained_for,
            engine.config.method_name,
        )


def check_policy_fits(
    policy: SavedRacePolicy, engine: VLLMEngine
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The policy's (n_grid, k_grid) after checking that this engine can run its actions
    (whether its observations mean what this code computes is
    ``policies.saved_policy.load_race_policy``'s check).

    :raises ValueError: naming what does not fit and what would.
    """
    where = f"policy {policy.folder}"
    n_grid, k_grid = policy.env_config.n_grid, policy.env_config.k_grid
    if not n_grid or not k_grid:
        raise ValueError(f"{where} does not record its n_grid and k_grid")
    config = engine.config
    if min(n_grid) < 1 or max(n_grid) > config.max_n:
        raise ValueError(
            f"{where} chooses n from {tuple(n_grid)} but the engine allows n in 1..{config.max_n}:"
            f" start the engine with max_n >= {max(n_grid)}"
        )
    if min(k_grid) < 0 or max(k_grid) > config.k_max:
        raise ValueError(
            f"{where} chooses k from {tuple(k_grid)} but the engine ({config.method_name}) allows"
            f" k in 0..{config.k_max}: start it with k_max >= {max(k_grid)} and speculation on"
        )
    return tuple(n_grid), tuple(k_grid)
