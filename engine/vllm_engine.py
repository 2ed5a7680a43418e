"""The live engine: one call runs one problem as n sampled branches with k speculative drafts.

``VLLMEngine.run(prompt, n, k, deadline_s)`` is all the rest of the project needs from vLLM.
It drives ``LLMEngine.step()`` itself rather than calling ``LLM.generate`` so that it can

* stop at a wall-clock deadline (unfinished branches are aborted; the finished ones return),
* stop early when the caller says the outcome is decided (``should_stop``),
* record when each branch finished, and
* change k between calls on the running engine.

vLLM fixes ``num_speculative_tokens`` (k_max) at start-up and has no per-request draft length.
Its scheduler, however, consults a dynamic-speculation table (``dynamic_sd_lookup``, indexed by
batch size) every step; setting it to a constant k between calls makes every step draft exactly
k tokens (``None`` restores k_max).  That table is internal state, so the vLLM release is
pinned and ``tests/engine`` checks with vLLM's own counters that drafted tokens follow k.
The engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the scheduler is then
a plain attribute, the CPU fix in ``engine.cpu_fixes`` reaches the sampler, and start-up is
about three times faster on CPU.  All engine compute (start-up, steps, shutdown) runs on one
process-wide thread (``engine.engine_thread``; on CPU another thread steps it far slower).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine import engine_thread
from engine.cpu_fixes import apply_cpu_fixes, guard_llvmlite_for_kernel_scan
from engine.model_assets import DEFAULT_DRAFT_LAYERS, resolve_draft, resolve_model
from engine.rollout import BranchResult, Rollout

log = logging.getLogger(__name__)

SPEC_METHODS = ("ngram", "draft_model", "eagle", "eagle3")
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
    :param max_tokens: generation limit per branch.
    :param max_model_len: context length the engine is sized for.
    :param dtype: weights/activations dtype; float32 keeps greedy speculation exact.
    :param gpu_memory_utilization: fraction of GPU memory vLLM may use (GPU only).
    :param kv_cache_gb: KV cache size; explicit so that on CPU several engines can live in one
        process (vLLM's automatic CPU sizing subtracts the whole process's memory).
    :param seed: engine-wide seed (per-request seeds are never used: they crash the CPU build
        when a prompt is chunked).
    """

    model: str | None = None
    spec_method: str | None = "draft_model"
    draft_model: str | None = None
    draft_layers: int = DEFAULT_DRAFT_LAYERS
    k_max: int = 4
    max_n: int = 16
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
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.spec_method in ("eagle", "eagle3") and not self.draft_model:
            raise ValueError(f"spec_method {self.spec_method!r} needs draft_model (the EAGLE head)")

    @property
    def method_name(self) -> str:
        return self.spec_method or "none"


class VLLMEngine:
    """A running vLLM engine that answers one problem per ``run`` call."""

    _alive = 0  # engines started and not shut down, in this process

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        engine_thread.call(self._start)
        VLLMEngine._alive += 1
        self._engine = self.llm.llm_engine
        self.tokenizer = self.llm.get_tokenizer()
        self._ids = itertools.count()
        self._k: int | None = None
        self._lock = threading.Lock()  # held from a call's start until its abort is done

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
            max_num_seqs=max(cfg.max_n, 1),
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            kv_cache_memory_bytes=int(cfg.kv_cache_gb * 2**30),
            seed=cfg.seed,
            speculative_config=speculative,
            disable_log_stats=False,
            per_request_spec_decode_metrics="summary" if speculative else "none",
            enforce_eager=cfg.enforce_eager,
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
        return self._engine.engine_core.engine_core.scheduler

    def set_k(self, k: int) -> None:
        """Draft exactly k tokens per step from the next step on (k_max restores the default)."""
        self._check_k(k)
        if self.config.k_max == 0 or k == self._k:
            return
        scheduler = self._scheduler
        table_len = self.config.max_n + 1
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

    def has_unfinished_requests(self) -> bool:
        """Whether any request is in the engine (waits for an in-flight call's clean-up)."""
        with self._lock:
            return self._engine.has_unfinished_requests()

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
                self._engine.engine_core.shutdown()
            finally:
                core.cleanup_dist_env_and_memory = teardown

        with self._lock:
            engine_thread.call(stop, VLLMEngine._alive <= 1)
            VLLMEngine._alive -= 1
            del self.llm, self._engine
        engine_thread.call(gc.collect)

    # ----------------------------------------------------------------------------- validation
    def _check_k(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.config.k_max:
            hint = "speculation is off in this engine" if self.config.k_max == 0 else ""
            raise ValueError(
                f"k must be an int in 0..{self.config.k_max}, got {k!r} {hint}".strip()
            )

    def _check_n(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.config.max_n:
            raise ValueError(f"n must be an int in 1..{self.config.max_n}, got {n!r}")

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
        """Chat-format a user message and tokenize it; rejects empty and over-long prompts."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        messages = [{"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        ids = self.tokenizer.encode(text, add_special_tokens=False)
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
        prompt: str,
        n: int,
        k: int,
        deadline_s: float | None = None,
        should_stop: Callable[[list[BranchResult]], bool] | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        ignore_eos: bool = False,
        cancel: threading.Event | None = None,
    ) -> Rollout:
        """Sample n branches of ``prompt`` with k drafts per step, until done or the deadline.

        The deadline counts from the moment ``run`` is called.  Engine steps run on the engine
        thread (``engine.engine_thread``) because a step (a long prefill, say) cannot be
        interrupted: at the deadline
        ``run`` returns at once with the branches finished by then, and the worker aborts the
        rest as soon as the step in flight ends.  The engine lock is held until that abort is
        done, so the next call and ``has_unfinished_requests`` never see a leftover request.
        ``should_stop(finished_branches)`` is called whenever a branch finishes; returning
        True aborts the remaining branches (early stop once a vote is decided).
        ``temperature`` and ``max_tokens`` override the configured values for this call (0 =
        greedy); ``ignore_eos`` makes every branch generate exactly max_tokens (timing runs).
        Setting ``cancel`` (e.g. when a client disconnects) aborts the call after the current
        step; it then returns what finished, with ``stopped_by == "cancelled"``.
        """
        start = time.monotonic()
        self._check_n(n)
        self._check_k(k)
        deadline = self.check_deadline(deadline_s)
        if temperature is not None and not (
            isinstance(temperature, int | float) and 0 <= temperature <= 2
        ):
            raise ValueError(f"temperature must be a number in 0..2, got {temperature!r}")
        limit = self.config.max_tokens
        if max_tokens is not None and (
            isinstance(max_tokens, bool)
            or not isinstance(max_tokens, int)
            or not 1 <= max_tokens <= limit
        ):
            raise ValueError(f"max_tokens must be an int in 1..{limit}, got {max_tokens!r}")
        ids = self.prompt_token_ids(prompt)
        call = _Call(
            rollout=Rollout(
                n=n,
                k=k,
                method=self.config.method_name,
                prompt_tokens=len(ids),
                deadline_s=deadline,
                branches=[BranchResult(index=i) for i in range(n)],
            ),
            prompt_ids=ids,
            start=start,
            temperature=self.config.temperature if temperature is None else float(temperature),
            max_tokens=max_tokens or self.config.max_tokens,
            ignore_eos=ignore_eos,
            should_stop=should_stop,
            cancel=cancel,
        )
        self._lock.acquire()
        try:
            engine_thread.submit(self._drive, call)  # releases the lock when done
        except BaseException:
            self._lock.release()
            raise
        try:
            remaining = None if deadline is None else max(0.0, start + deadline - time.monotonic())
            call.done.wait(remaining)
        finally:
            with call.mutex:
                call.cancelled = True
                result = call.snapshot(time.monotonic() - start)
            if not call.done.is_set() and sys.exc_info()[0] is not None:
                call.done.wait()  # interrupted (e.g. Ctrl-C): leave a clean engine behind
        if call.error is not None:
            raise call.error
        return result

    def _drive(self, call: _Call) -> None:
        """Engine thread: add the branches, step the engine, abort what is left, release."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        rollout = call.rollout
        request_ids = [f"c{next(self._ids)}-b{i}" for i in range(rollout.n)]
        branch_of = dict(zip(request_ids, rollout.branches, strict=True))
        pieces: dict[str, list[str]] = {rid: [] for rid in request_ids}
        live = set(request_ids)
        counters_before: dict[str, float] = {}
        try:
            self.set_k(rollout.k)
            counters_before = self.spec_counters() if self.config.k_max else {}
            params = SamplingParams(
                n=1,
                temperature=call.temperature,
                top_p=self.config.top_p if call.temperature > 0 else 1.0,
                max_tokens=min(call.max_tokens, self.config.max_model_len - len(call.prompt_ids)),
                output_kind=RequestOutputKind.DELTA,
                ignore_eos=call.ignore_eos,
            )
            for rid in request_ids:
                self._engine.add_request(rid, {"prompt_token_ids": call.prompt_ids}, params)
            deadline = rollout.deadline_s
            while live and not call.cancelled:
                step_start = time.monotonic()
                outputs = self._engine.step()
                now = time.monotonic()
                elapsed = now - call.start
                newly_finished = False
                with call.mutex:
                    for out in outputs:
                        rid = out.request_id
                        if rid not in branch_of:
                            continue
                        branch = branch_of[rid]
                        for completion in out.outputs:
                            pieces[rid].append(completion.text)
                            branch.token_count += len(completion.token_ids)
                            if rollout.ttft_s is None and completion.token_ids:
                                rollout.ttft_s = elapsed
                            if out.finished:
                                _record_finish(branch, completion, elapsed, "".join(pieces[rid]))
                        if out.finished:
                            live.discard(rid)
                            newly_finished = True
                    if not live or call.cancelled:
                        break
                    if call.cancel is not None and call.cancel.is_set():
                        rollout.stopped_by = "cancelled"
                        break
                    if newly_finished and call.should_stop and call.should_stop(rollout.finished):
                        rollout.stopped_by = "early_stop"
                        break
                    # A step cannot be interrupted: if the next one would end past the deadline
                    # its tokens could not be used, so stop now instead of computing them.
                    if deadline is not None and elapsed + (now - step_start) > deadline:
                        rollout.stopped_by = "deadline"
                        break
        except BaseException as exc:  # re-raised by run() in the caller's thread
            call.error = exc
        finally:
            try:
                if live:
                    self._engine.abort_request(sorted(live))
                after = self.spec_counters() if counters_before else {}
                with call.mutex:
                    rollout.spec_counters = {
                        key: after[key] - counters_before[key] for key in after
                    }
                    for rid in live:
                        branch_of[rid].text = "".join(pieces[rid])
            finally:
                call.done.set()
                self._lock.release()


@dataclass
class _Call:
    """State shared between ``run`` (caller thread) and ``_drive`` (engine worker thread)."""

    rollout: Rollout
    prompt_ids: list[int]
    start: float
    temperature: float
    max_tokens: int
    ignore_eos: bool
    should_stop: Callable[[list[BranchResult]], bool] | None
    cancel: threading.Event | None = None
    cancelled: bool = False
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    mutex: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self, elapsed: float) -> Rollout:
        """Copy of the rollout as of now: branches not finished yet count as aborted."""
        result = copy.deepcopy(self.rollout)
        result.wall_s = elapsed
        for branch in result.branches:
            if not branch.finished:
                branch.finish_reason = "aborted"
        if result.stopped_by == "complete" and any(not b.finished for b in result.branches):
            result.stopped_by = "deadline" if self.error is None else "error"
        return result


def _record_finish(branch: BranchResult, completion, elapsed: float, text: str) -> None:
    branch.finish_s = elapsed
    branch.text = text
    branch.finish_reason = completion.finish_reason or "stop"
    metrics = getattr(completion, "spec_decode_metrics", None)
    if metrics is not None and metrics.histogram:
        branch.verify_steps = int(sum(metrics.histogram))
        branch.accepted_tokens = int(sum(j * c for j, c in enumerate(metrics.histogram)))
        branch.drafted_tokens = int(metrics.num_draft_tokens)
