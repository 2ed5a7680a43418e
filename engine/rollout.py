"""What one engine call produced: per-branch results and per-call timings.

Kept separate from the engine so voting, grading, profiling and the server can consume
rollouts without importing vLLM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

NO_SPECULATION = "none"
"""The method name of plain decoding (no drafts): ``Rollout.method`` and
``EngineConfig.method_name`` of an engine without speculation; its step tables are stored
under it in a latency model (``env.latency_model``), beside those of each speculative method."""


@dataclass
class BranchResult:
    """One sampled branch of a call.

    ``finish_s`` is seconds from the start of the call, ``None`` when the branch was aborted
    (deadline, early stop or error).  ``drafted_tokens``/``accepted_tokens`` come from vLLM's
    per-request speculative metrics and are 0 without speculation or for aborted branches.
    ``token_logprobs`` holds the log-probability of each sampled token when the call asked for
    them (``VLLMEngine.run(logprobs=True)``), else None: the raw material of a confidence signal
    (``env.race.BranchConfidence``), summarised outside the engine.
    """

    index: int
    text: str = ""
    token_count: int = 0
    finish_s: float | None = None
    finish_reason: str = "running"  # "stop", "length", "aborted"
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0
    token_logprobs: list[float] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_s is not None


@dataclass
class Rollout:
    """Result of ``VLLMEngine.run``: all branches, finished or not, and call-level figures."""

    n: int
    k: int
    method: str
    prompt_tokens: int
    deadline_s: float | None
    branches: list[BranchResult]
    wall_s: float = 0.0
    ttft_s: float | None = None
    stopped_by: str = "complete"  # "complete", "deadline", "early_stop", "cancelled", "error"
    spec_counters: dict[str, float] = field(default_factory=dict)
    k_changes: list[tuple[float, int]] = field(default_factory=list)
    """(seconds from the call's start, new k) for each change of k the call asked for during the
    call (``on_step``); a change applies from the engine step after that time (alone in the
    engine; shared with other calls, the step drafts ``engine.batch_loop.batch_k`` of them)."""
    batch_max: int = 0
    """The largest engine batch (live branches of every call) in a step of this call."""

    @property
    def finished(self) -> list[BranchResult]:
        """Branches that finished, in finish order."""
        done = [b for b in self.branches if b.finished]
        return sorted(done, key=lambda b: (b.finish_s, b.index))

    @property
    def generated_tokens(self) -> int:
        return sum(b.token_count for b in self.branches)

    def to_dict(self) -> dict:
        return asdict(self)
