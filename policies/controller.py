"""The deployable decoding controller: a trained allocation policy driving the live engine.

Training and evaluation score a policy on replayed or live *environments*; deployment needs
the same decision without an environment: given a problem's text and a deadline, compute the
observation from the prompt alone (``env.features``), let the policy pick (n, k, budget) from
the grids it was trained on, run that call on the engine until budget x deadline with the
vote's early stop (``env.backends.sample_vote``, shared with the live backend), and return the
voted answer with enough bookkeeping (allocation, timings, votes, branches) to explain it.
``policies.server`` serves this over HTTP.  A problem is checked and tokenized once
(``prepare``); the server does that before queueing a request and hands the prepared problem on.

A policy is only meaningful with the observations it was trained on and can only be served by
an engine that can run its actions, so both are checked when the controller is built: the
saved policy's one compatibility check (``policies.saved_policy.check_compatible``), and the
n and k grids against the engine's ``max_n`` and ``k_max`` (``check_policy_fits``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engine import engine_thread
from engine.vllm_engine import VLLMEngine
from env.allocation import Allocation
from env.backends.sample_vote import VotedRollout, sample_and_vote
from env.task.prompt import build_user_message
from policies.saved_policy import SavedPolicy, check_compatible, load_policy

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
    :param n: branches sampled (the policy's choice).
    :param k: draft tokens verified per step (the policy's choice).
    :param budget: share of the deadline the policy chose to spend (the call stops at
        budget x deadline; 1.0 when there is no deadline).
    :param latency_s: seconds from the ``solve`` call to its return.
    :param deadline_s: the deadline the call honoured (None: none).
    :param stopped_by: ``"complete"``, ``"early_stop"`` (vote decided), ``"deadline"`` or
        ``"cancelled"`` (the engine's ``Rollout.stopped_by``).
    :param votes: answer (its class's representative) -> number of finished branches that
        gave it, in the order the classes first finished (the vote: ``env.task.voting``).
    :param branches: per branch: index, answer, finish_s (None if aborted), tokens,
        finish_reason (``"stop"``, ``"length"`` or ``"aborted"``).
    :param prompt_tokens: prompt length after the chat template.
    :param completion_tokens: tokens generated over all branches.
    """

    answer: str | None
    n: int
    k: int
    budget: float
    latency_s: float
    deadline_s: float | None
    stopped_by: str
    votes: dict[str, int]
    branches: list[dict]
    prompt_tokens: int
    completion_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


class DecodingController:
    """Answers math problems under a deadline with a trained allocation policy on a live engine.

    :param policy: a loaded policy or its folder (``policies.saved_policy.load_policy``).
    :param engine: the running engine; its ``max_n`` and ``k_max`` must cover the policy's
        grids.
    :raises ValueError: when the policy does not fit this code (``check_compatible``: format,
        feature schema, observation width) or this engine (its grids).
    """

    def __init__(self, policy: SavedPolicy | str | Path, engine: VLLMEngine) -> None:
        if isinstance(policy, SavedPolicy):  # loaded elsewhere (load_policy checks its own)
            check_compatible(policy.info, policy.folder, policy.model, policy.featurizer)
        else:
            policy = load_policy(policy)
        self.policy = policy
        self.engine = engine
        self.n_grid, self.k_grid = check_policy_fits(self.policy, engine)
        self.budget_grid = tuple(self.policy.env_config.budget_grid)
        self.deadline_range_s = self.policy.featurizer.deadline_range_s
        trained_for = self.policy.info.get("spec_method")
        if trained_for and trained_for != engine.config.method_name:
            log.warning(
                "policy %s was trained for speculative method %r but the engine runs %r: its "
                "k choices assume the other method's speed",
                self.policy.folder,
                trained_for,
                engine.config.method_name,
            )

    def prepare(self, problem: str | PreparedProblem) -> PreparedProblem:
        """Check ``problem`` and tokenize its prompt as the engine will run it (once).

        :raises ValueError: for a non-string or blank problem, or one too long for the model.
        """
        if isinstance(problem, PreparedProblem):
            return problem
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError("problem must be a non-empty string")
        return PreparedProblem(problem, self.engine.prompt_token_ids(build_user_message(problem)))

    def choose(self, problem: str | PreparedProblem, deadline_s: float | None) -> Allocation:
        """The policy's (n, k, budget) for this problem and deadline (deterministic)."""
        deadline = self.engine.check_deadline(deadline_s)
        return engine_thread.call(self._choose, self.prepare(problem), deadline)

    def _choose(self, problem: PreparedProblem, deadline: float | None) -> Allocation:
        # The policy has only seen deadlines inside its training range: clip the deadline fed to
        # the features there (no deadline = the longest it knows) rather than extrapolate.
        low, high = self.deadline_range_s
        seen = high if deadline is None else min(max(deadline, low), high)
        obs = self.policy.featurizer.transform(problem.text, problem.prompt_tokens, seen)
        action, _ = self.policy.model.predict(obs, deterministic=True)
        allocation = Allocation.from_action(action, self.n_grid, self.k_grid, self.budget_grid)
        return allocation if deadline is not None else allocation._replace(budget=1.0)

    def solve(
        self,
        problem: str | PreparedProblem,
        deadline_s: float | None,
        cancel: threading.Event | None = None,
        max_tokens: int | None = None,
    ) -> Solution:
        """Choose (n, k, budget), run it live, and return the majority vote of the finished
        branches.

        The deadline counts from this call (choosing is included) with the engine's semantics:
        the call returns by budget x deadline with the branches finished by then; None or inf
        mean no deadline (and no budget).
        The engine is stopped as soon as the unfinished branches can no longer change the
        winner.  Setting ``cancel`` aborts the call after the current engine step.
        ``max_tokens`` caps each branch (at most the engine's ``max_tokens``).

        :raises ValueError: for a bad problem, deadline or max_tokens (before the engine runs).
        """
        start = time.monotonic()
        deadline = self.engine.check_deadline(deadline_s)
        prepared = self.prepare(problem)
        # torch work on the engine's thread only (see engine.engine_thread)
        allocation = engine_thread.call(self._choose, prepared, deadline)
        # Whatever choosing cost comes out of the engine's share; it returns at once if none is
        # left (its deadline must be > 0).
        elapsed = time.monotonic() - start
        remaining = None if deadline is None else max(allocation.stop_s(deadline) - elapsed, 1e-6)
        n, k = allocation.n, allocation.k
        call = sample_and_vote(
            self.engine, prepared.prompt_ids, n, k, remaining, max_tokens=max_tokens, cancel=cancel
        )
        return _solution(call, allocation, time.monotonic() - start, deadline)


def _solution(
    call: VotedRollout, allocation: Allocation, latency_s: float, deadline: float | None
) -> Solution:
    """The controller's report of a finished call."""
    rollout, vote = call.rollout, call.vote
    branches = [
        {
            "index": b.index,
            "answer": vote.answers.get(b.index),
            "finish_s": b.finish_s,
            "tokens": b.token_count,
            "finish_reason": b.finish_reason,
        }
        for b in rollout.branches
    ]
    return Solution(
        answer=vote.winner,
        n=allocation.n,
        k=allocation.k,
        budget=allocation.budget,
        latency_s=latency_s,
        deadline_s=deadline,
        stopped_by=rollout.stopped_by,
        votes=vote.votes,
        branches=branches,
        prompt_tokens=rollout.prompt_tokens,
        completion_tokens=rollout.generated_tokens,
    )


def check_policy_fits(policy: SavedPolicy, engine: VLLMEngine) -> tuple[tuple[int, ...], ...]:
    """The policy's (n_grid, k_grid) after checking that this engine can run its actions (its
    budgets need nothing from the engine; whether its observations mean what this code computes
    is ``policies.saved_policy.check_compatible``'s).

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
