"""The live engine: one call runs one problem as n sampled branches with k speculative drafts.

``VLLMEngine.run(prompt, n, k, deadline_s)`` is all the rest of the project needs from vLLM.
It drives ``LLMEngine.step()`` itself rather than calling ``LLM.generate`` so that it can

* stop at a wall-clock deadline (unfinished branches are aborted; the finished ones return),
* stop early when the caller says the outcome is decided (``should_stop``),
* record when each branch finished (and, on request, each sampled token's log-probability),
* change k between calls on the running engine, and
* hand every step to the caller (``on_step``), who may stop the call or change k for the steps
  that follow: the hook an online controller drives a call through (``env.backends.live_race``).

vLLM fixes ``num_speculative_tokens`` (k_max) at start-up and has no per-request draft length.
Its scheduler, however, consults a dynamic-speculation table (``dynamic_sd_lookup``, indexed by
batch size) every step; setting it to a constant k between calls makes every step draft exactly
k tokens (``None`` restores k_max).  That table is internal state, so the vLLM release is
pinned and ``tests/engine`` checks with vLLM's own counters that drafted tokens follow k.
Mid-call, a change made after step t shows in the drafted tokens of step t + 2: the drafts
verified in step t + 1 were proposed during step t, under the old k (measured here).
The engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the scheduler is then
a plain attribute, the CPU fix in ``engine.cpu_fixes`` reaches the sampler, and start-up is
about three times faster on CPU.  All engine compute (start-up, steps, shutdown) runs on one
process-wide thread (``engine.engine_thread``; on CPU another thread steps it far slower); the
state a call shares between that thread and the caller's is ``engine.call_state``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine import engine_thread
from engine.batch_loop import BatchLoop, BatchStep
from engine.call_state import CallState, StepControl, StepReport
from engine.cpu_fixes import apply_cpu_fixes, guard_llvmlite_for_kernel_scan
from engine.distributed import check_distributed_options, distributed_kwargs
from engine.model_assets import DEFAULT_DRAFT_LAYERS, resolve_draft, resolve_model
from engine.rollout import NO_SPECULATION, BranchResult, Rollout

log = logging.getLogger(__name__)

SPEC_METHODS = ("ngram", "draft_model", "eagle", "eagle3")
WARMUP_PROMPT = "What is 2 + 2? Put the final answer in \\boxed{}."
_COUNTERS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
}


@dataclass
class EngineConfig:
    """How the engine is built; everything a call may vary (n, k, deadline) is checked against it.

    :param model: Hugging Face id or local folder; ``None`` = the bundled SmolLM2-135M-Instruct.
    :param spec_method: ``"ngram"``, ``"draft_model"``, ``"eagle"``, ``"eagle3"`` or ``None``.
    :param draft_model: draft / EAGLE head id or folder; ``None`` with ``draft_model`` = the
        bundled self-speculative draft (first ``draft_layers`` layers of the target).
    :param k_max: largest number of draft tokens per step (fixed at start-up).
    :param max_n: largest number of parallel branches a call may ask for.
    :param max_batch: most sequences the engine steps at once, over all concurrent calls
        (vLLM's ``max_num_seqs``; more wait in its queue).
    :param max_tokens: generation limit per branch.
    :param max_model_len: context length the engine is sized for.
    :param dtype: weights/activations dtype; float32 keeps greedy speculation exact.
    :param gpu_memory_utilization: fraction of GPU memory vLLM may use (GPU only).
    :param kv_cache_gb: KV cache size; explicit so that on CPU several engines can live in one
        process (vLLM's automatic CPU sizing subtracts the whole process's memory).
    :param seed: engine-wide seed (per-request seeds are never used: they crash the CPU build
        when a prompt is chunked).
    :param tensor_parallel_size: GPUs a layer is split over (vLLM's tensor parallelism).
    :param pipeline_parallel_size: GPUs the layers are split over (pipeline stages).
    :param distributed_executor_backend: ``"mp"`` or ``"ray"`` (vLLM's executors for more than
        one GPU), ``None`` = vLLM's choice.  ``engine.distributed`` checks the combination,
        including what per-call k needs.
    """

    model: str | None = None
    spec_method: str | None = "draft_model"
    draft_model: str | None = None
    draft_layers: int = DEFAULT_DRAFT_LAYERS
    k_max: int = 4
    max_n: int = 16
    max_batch: int = 64
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 512
    max_model_len: int = 2048
    dtype: str = "float32"
    gpu_memory_utilization: float = 0.4
    kv_cache_gb: float = 1.0
    seed: int = 0
    ngram_min: int = 2
    ngram_max: int = 4
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None

    def __post_init__(self) -> None:
        if self.spec_method not in (None, *SPEC_METHODS):
            raise ValueError(
                f"spec_method must be None or one of {SPEC_METHODS}, got {self.spec_method!r}"
            )
        if self.spec_method is None:
            self.k_max = 0
        elif not 1 <= self.k_max <= 16:
            raise ValueError(f"k_max must be in 1..16 with speculation on, got {self.k_max}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if self.max_batch < self.max_n:
            raise ValueError(f"max_batch must be >= max_n ({self.max_n}), got {self.max_batch}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.spec_method in ("eagle", "eagle3") and not self.draft_model:
            raise ValueError(f"spec_method {self.spec_method!r} needs draft_model (the EAGLE head)")
        check_distributed_options(self)

    @property
    def method_name(self) -> str:
        """The speculative method, ``NO_SPECULATION`` (``"none"``) without one."""
        return self.spec_method or NO_SPECULATION


class VLLMEngine:
    """A running vLLM engine; ``run`` answers one problem, and concurrent ``run`` calls share
    its batch (``engine.batch_loop``)."""

    _alive = 0  # engines started and not shut down, in this process

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        engine_thread.call(self._start)
        VLLMEngine._alive += 1
        self.llm_engine = self.llm.llm_engine
        self.tokenizer = self.llm.get_tokenizer()
        self._ids = itertools.count()
        self._k: int | None = None
        self.batch = BatchLoop(self)
        self.warmup_s = self.warm_up()

    def warm_up(self) -> float:
        """Run one short call with log-probabilities; return its seconds.

        Why at start: the engine's first call, and its first with log-probabilities, pay
        one-time costs inside their first step, which no deadline can interrupt.  Measured on
        this 2-core CPU: the first call with log-probabilities took 2.4-3.5 s and the same call
        after it 0.6-0.8 s (any k after one warm call at k = 0); a fresh server's first engine
        step took 2.7 s, so its first two requests, with 1.5 s deadlines, ended unanswered at
        their deadlines and the next ones waited behind it.  Timing runs (profiling, start-up
        calibration, validation) need no warm-up of their own.
        """
        started = time.monotonic()
        self.run(WARMUP_PROMPT, n=1, k=0, max_tokens=min(4, self.config.max_tokens), logprobs=True)
        return time.monotonic() - started

    def _start(self) -> None:
        """Build the vLLM engine (on the engine thread, which will also step it)."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.cpu_fix_applied = apply_cpu_fixes()
        guard_llvmlite_for_kernel_scan()
        from vllm import LLM

        cfg = self.config
        self.model_path = resolve_model(cfg.model)
        speculative = self._speculative_config()
        self.llm = LLM(
            model=self.model_path,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_batch,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            kv_cache_memory_bytes=int(cfg.kv_cache_gb * 2**30),
            seed=cfg.seed,
            speculative_config=speculative,
            disable_log_stats=False,
            per_request_spec_decode_metrics="summary" if speculative else "none",
            enforce_eager=cfg.enforce_eager,
            **distributed_kwargs(cfg),
        )

    def _speculative_config(self) -> dict | None:
        cfg = self.config
        if cfg.spec_method is None:
            return None
        spec: dict = {"method": cfg.spec_method, "num_speculative_tokens": cfg.k_max}
        if cfg.spec_method == "ngram":
            spec.update(prompt_lookup_min=cfg.ngram_min, prompt_lookup_max=cfg.ngram_max)
        elif cfg.spec_method == "draft_model":
            spec["model"] = resolve_draft(cfg.draft_model, cfg.draft_layers)
        else:
            spec["model"] = cfg.draft_model
        return spec

    # ----------------------------------------------------------------------------- controls
    @property
    def _scheduler(self):
        return self.llm_engine.engine_core.engine_core.scheduler

    def set_k(self, k: int) -> None:
        """Draft exactly k tokens per step from the next step on (k_max restores the default)."""
        self.check_k(k)
        if self.config.k_max == 0 or k == self._k:
            return
        scheduler = self._scheduler
        table_len = self.config.max_batch + 1
        scheduler.dynamic_sd_lookup = None if k == self.config.k_max else [k] * table_len
        self._k = k

    def spec_counters(self) -> dict[str, float]:
        """vLLM's own cumulative speculative-decoding counters (drafts, tokens, accepted)."""
        totals = dict.fromkeys(_COUNTERS.values(), 0.0)
        for metric in self.llm.get_metrics():
            key = _COUNTERS.get(metric.name)
            if key is not None:
                totals[key] += float(getattr(metric, "value", 0.0))
        return totals

    def has_unfinished_requests(self, timeout: float | None = 60.0) -> bool:
        """Whether any request is in the engine once no call is in flight (waits up to
        ``timeout`` for the calls in flight to end and their aborts to be done)."""
        self.batch.wait_idle(timeout)
        return engine_thread.call(self.llm_engine.has_unfinished_requests)

    def add_step_listener(self, listener: Callable[[BatchStep], None]) -> None:
        """Call ``listener(step)`` on the engine thread after every engine step (all calls)."""
        self.batch.listeners.append(listener)

    def shutdown(self) -> None:
        """Stop the engine core and free its memory (the object is unusable afterwards).

        vLLM's in-process engine core tears down the process-wide distributed state when it
        shuts down (``cleanup_dist_env_and_memory``), which every other engine in the process
        still uses: their next step fails with "pipeline model parallel group is not
        initialized".  So that teardown only runs when this is the last live engine.
        """
        import gc

        from vllm.v1.engine import core

        def stop(last: bool) -> None:
            teardown = core.cleanup_dist_env_and_memory
            if not last:
                core.cleanup_dist_env_and_memory = gc.collect
            try:
                self.llm_engine.engine_core.shutdown()
            finally:
                core.cleanup_dist_env_and_memory = teardown

        self.batch.wait_idle()
        engine_thread.call(stop, VLLMEngine._alive <= 1)
        VLLMEngine._alive -= 1
        del self.llm, self.llm_engine
        engine_thread.call(gc.collect)

    # ----------------------------------------------------------------------------- validation
    def check_k(self, k: int) -> None:
        """Raise ValueError unless 0 <= k <= k_max."""
        hint = " speculation is off in this engine" if self.config.k_max == 0 else ""
        _require_int("k", k, 0, self.config.k_max, hint)

    @staticmethod
    def check_deadline(deadline_s: float | None) -> float | None:
        """Normalise a deadline: None or +inf mean none; otherwise a finite number > 0."""
        if deadline_s is None:
            return None
        if isinstance(deadline_s, bool) or not isinstance(deadline_s, int | float):
            raise ValueError(f"deadline_s must be a number > 0, None or inf, got {deadline_s!r}")
        if math.isnan(deadline_s) or deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0 (or None/inf for none), got {deadline_s!r}")
        return None if math.isinf(deadline_s) else float(deadline_s)

    def prompt_token_ids(self, prompt: str) -> list[int]:
        """Chat-format a user message and tokenize it; rejects empty and over-long prompts.

        ``run`` accepts the result in place of the message, so a prompt that is measured
        before it runs (the controller's features) is tokenized once.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        messages = [{"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return self._check_prompt_length(self.tokenizer.encode(text, add_special_tokens=False))

    def _check_prompt_length(self, ids: list[int]) -> list[int]:
        limit = self.config.max_model_len - 1
        if len(ids) > limit:
            raise ValueError(
                f"prompt is {len(ids)} tokens after the chat template; the model's context "
                f"allows at most {limit} (max_model_len={self.config.max_model_len})"
            )
        return ids

    # ----------------------------------------------------------------------------- the call
    def run(
        self,
        prompt: str | Sequence[int],
        n: int,
        k: int,
        deadline_s: float | None = None,
        should_stop: Callable[[list[BranchResult]], bool] | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        ignore_eos: bool = False,
        cancel: threading.Event | None = None,
        on_step: Callable[[StepReport], StepControl | None] | None = None,
        logprobs: bool = False,
        on_queued: Callable[[], None] | None = None,
    ) -> Rollout:
        """Sample n branches of ``prompt`` with k drafts per step, until done or the deadline.

        ``prompt`` is the user message, or its token ids from ``prompt_token_ids``.  The
        deadline counts from the moment ``run`` is called.  Calls made at the same time from
        several threads run in the same engine batch (``engine.batch_loop``: each keeps its own
        branches, stops and deadline; k is shared per step).  Engine steps run on the engine
        thread (``engine.engine_thread``) because a step (a long prefill, say) cannot be
        interrupted: at the deadline ``run`` returns at once with the branches finished by
        then, and the loop aborts the rest as soon as the step in flight ends
        (``has_unfinished_requests`` waits for that).
        ``should_stop(finished_branches)`` is called whenever a branch finishes; returning
        True aborts the remaining branches (early stop once a vote is decided).
        ``temperature`` and ``max_tokens`` override the configured values for this call (0 =
        greedy); ``ignore_eos`` makes every branch generate exactly max_tokens (timing runs).
        Setting ``cancel`` (e.g. when a client disconnects) aborts the call after the current
        step; it then returns what finished, with ``stopped_by == "cancelled"``.
        ``on_step(report)`` runs on the engine thread after every step of this call (not once
        the caller has returned at the deadline); it may return a ``StepControl``: ``stop``
        aborts the remaining branches (``stopped_by == "early_stop"``), ``k`` (0..k_max) asks
        for that many drafts per step from the next step on (recorded in
        ``Rollout.k_changes``; exact while the call is alone in the engine).
        ``logprobs`` records each sampled token's log-probability in
        ``BranchResult.token_logprobs``.  ``on_queued()`` is called on the caller's thread
        once the call is queued in the batch, from when ``batch.calls_in_flight`` counts it
        (a server's admission stops reserving room for it then; it must not raise).

        :raises ValueError: for a bad argument, before the engine runs.
        """
        start = time.monotonic()
        call = self._new_call(prompt, n, k, deadline_s, temperature, max_tokens, start)
        call.ignore_eos, call.should_stop, call.cancel = ignore_eos, should_stop, cancel
        call.on_step, call.logprobs = on_step, logprobs
        self.batch.submit(call)
        if on_queued is not None:
            on_queued()
        return self._wait_for(call)

    def _new_call(
        self,
        prompt: str | Sequence[int],
        n: int,
        k: int,
        deadline_s: float | None,
        temperature: float | None,
        max_tokens: int | None,
        start: float,
    ) -> CallState:
        """Check a call's arguments and set up its state (caller thread)."""
        _require_int("n", n, 1, self.config.max_n)
        self.check_k(k)
        deadline = self.check_deadline(deadline_s)
        if temperature is not None and not (
            isinstance(temperature, int | float) and 0 <= temperature <= 2
        ):
            raise ValueError(f"temperature must be a number in 0..2, got {temperature!r}")
        if max_tokens is not None:
            _require_int("max_tokens", max_tokens, 1, self.config.max_tokens)
        if isinstance(prompt, str):
            ids = self.prompt_token_ids(prompt)
        elif prompt:
            ids = self._check_prompt_length(list(prompt))
        else:
            raise ValueError("prompt must be a non-empty string or its token ids")
        rollout = Rollout(
            n=n,
            k=k,
            method=self.config.method_name,
            prompt_tokens=len(ids),
            deadline_s=deadline,
            branches=[BranchResult(index=i) for i in range(n)],
        )
        request_ids = [f"c{next(self._ids)}-b{i}" for i in range(n)]
        return CallState(
            rollout=rollout,
            prompt_ids=ids,
            start=start,
            temperature=self.config.temperature if temperature is None else float(temperature),
            max_tokens=max_tokens or self.config.max_tokens,
            branch_of=dict(zip(request_ids, rollout.branches, strict=True)),
        )

    def _wait_for(self, call: CallState) -> Rollout:
        """Caller thread: wait until the call ends or its deadline, and return what finished."""
        deadline = call.rollout.deadline_s
        try:
            remaining = (
                None if deadline is None else max(0.0, call.start + deadline - time.monotonic())
            )
            call.done.wait(remaining)
        finally:
            with call.mutex:
                call.cancelled = True
                result = call.snapshot(time.monotonic() - call.start)
            if not call.done.is_set() and sys.exc_info()[0] is not None:
                call.done.wait()  # interrupted (e.g. Ctrl-C): leave a clean engine behind
        if call.error is not None:
            raise call.error
        return result

    def add_branches(self, call: CallState) -> None:
        """Engine thread: note the counters and add one request per branch (the batch loop)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        call.counters_before = self.spec_counters() if self.config.k_max else {}
        params = SamplingParams(
            n=1,
            temperature=call.temperature,
            top_p=self.config.top_p if call.temperature > 0 else 1.0,
            max_tokens=min(call.max_tokens, self.config.max_model_len - len(call.prompt_ids)),
            output_kind=RequestOutputKind.DELTA,
            ignore_eos=call.ignore_eos,
            logprobs=0 if call.logprobs else None,  # 0: the sampled token's only
        )
        for request_id in call.branch_of:
            self.llm_engine.add_request(request_id, {"prompt_token_ids": call.prompt_ids}, params)

    def end_call(self, call: CallState) -> None:
        """Engine thread: abort the call's branches still running and record the counters
        (engine-wide: with other calls in the batch they include their drafts too)."""
        if call.live:
            self.llm_engine.abort_request(sorted(call.live))
        before = call.counters_before
        after = self.spec_counters() if before else {}
        with call.mutex:
            call.rollout.spec_counters = {key: after[key] - before[key] for key in after}
            for request_id in call.live:
                call.branch_of[request_id].text = "".join(call.pieces[request_id])


def _require_int(name: str, value: int, low: int, high: int, hint: str = "") -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) in ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}{hint}")
