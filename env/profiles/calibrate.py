"""Timing calibration of a live engine, and the `LatencyModel` fitted from it.

Replay needs the wall time a call would take for any (n, k).  ``calibrate`` times the real
engine once per profile and ``fit_latency_model`` turns the samples into the model of
``env.latency_model``:

* decode: fixed-length generations (EOS ignored) at each live batch size and k; the per-step
  time is ``(wall - ttft) / decode steps``, the steps counted from vLLM's per-request
  speculative metrics (a step emits one token plus the draft tokens accepted in it).  vLLM's
  cumulative counters are not used: with two engines in one process only the last engine's
  counters are reported.  The table keeps the median over
  repeats, so one slow moment on a shared machine does not move it.
* prefill: one-token generations over a range of prompt lengths and branch counts, fitted by
  non-negative least squares as ``base + per_token * computed tokens + per_branch * (n - 1)``.
  With vLLM's prefix cache the n branches of a call share the prompt's full KV blocks (128
  tokens on CPU), so the computed tokens are the prompt once plus its last partial block for
  every further branch (``unshared_prompt_tokens``).  Such a call also samples the first
  token, which the model counts as a decode step, so one k = 0 step is taken off each sample.

The same bookkeeping defines a problem's acceptance: ``effective_acceptance`` is the per-token
alpha for which the model's tokens per step equal the measured ones.  With a draft model every
step drafts k tokens and this is vLLM's acceptance; n-gram lookup drafts nothing when it finds
no match, and those steps count as steps with nothing accepted, which is what they cost.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from env.latency_model import LatencyModel, StepTable, tokens_per_step, unshared_prompt_tokens

PREFILL_METHOD_KEY = "prefill_method"


def effective_acceptance(samples: Sequence[tuple[int, float, float]]) -> float:
    """Per-token acceptance alpha from ``(k, generated tokens, accepted tokens)`` samples.

    A branch of T tokens of which A were accepted drafts took T - A steps (the first token
    comes from the prefill step).  alpha solves sum_k (T_k - A_k) (tokens_per_step(alpha, k) - 1)
    = sum_k A_k, pooling every k; for one k this is ``tokens_per_step(alpha, k) = T / (T - A)``,
    i.e. ``acceptance_from_counts(k, k (T - A), A)``.  NaN without any k > 0 sample.
    """
    pooled = [(k, t - a, a) for k, t, a in samples if k > 0 and t - a > 0]
    if not pooled:
        return float("nan")
    accepted = sum(a for _, _, a in pooled)

    def predicted(alpha: float) -> float:
        return sum(steps * (tokens_per_step(alpha, k) - 1.0) for k, steps, _ in pooled)

    lo, hi = 0.0, 0.999
    if predicted(hi) <= accepted:
        return hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted(mid) < accepted else (lo, mid)
    return (lo + hi) / 2


def decode_steps(k: int, tokens: int, accepted_per_branch: float) -> float:
    """Decode steps after the first token of a branch of ``tokens`` tokens."""
    return max(tokens - 1 - (accepted_per_branch if k > 0 else 0.0), 1.0)


# ------------------------------------------------------------------------------- measuring
def _unique_prompt(texts: Sequence[str], engine, target_tokens: int) -> str:
    """A user message of about ``target_tokens`` chat-formatted tokens that no earlier call
    shares a cached prefix with (a random tag leads), built from ``texts``."""
    tag = f"[{uuid.uuid4().hex[:8]}] "
    body, i = "", 0
    while len(engine.prompt_token_ids(tag + body or tag)) < target_tokens:
        body += texts[i % len(texts)] + "\n\n"
        i += 1
    ids = engine.tokenizer.encode(tag + body, add_special_tokens=False)
    overhead = len(engine.prompt_token_ids(tag + body)) - len(ids)
    return engine.tokenizer.decode(ids[: max(target_tokens - overhead, 8)])


def prefix_block_tokens(engine) -> int | None:
    """KV block size of an engine with prefix caching on (the unit of prompt sharing), else
    None; read from the vLLM config, as the engine does not expose it."""
    cache = engine.llm.llm_engine.vllm_config.cache_config
    return int(cache.block_size) if cache.enable_prefix_caching else None


def prompt_length_quantiles(engine, texts: Sequence[str]) -> list[int]:
    """The 10/30/50/70/90 % quantiles of the chat-formatted token lengths of ``texts``."""
    lengths = [len(engine.prompt_token_ids(text)) for text in texts]
    return sorted({int(q) for q in np.quantile(lengths, [0.1, 0.3, 0.5, 0.7, 0.9])})


def _time_decode(engine, prompt: str, batch: int, k: int, tokens: int) -> dict:
    """One fixed-length call; its per-step time from (wall - ttft) and the steps it took."""
    rollout = engine.run(prompt, n=batch, k=k, max_tokens=tokens, ignore_eos=True)
    accepted = sum(b.accepted_tokens for b in rollout.branches) / batch
    steps = decode_steps(k, tokens, accepted)
    return {
        "k": k,
        "batch": batch,
        "tokens": tokens,
        "prompt_tokens": rollout.prompt_tokens,
        "wall_s": rollout.wall_s,
        "ttft_s": rollout.ttft_s,
        "accepted_per_branch": accepted,
        "steps": steps,
        "step_s": (rollout.wall_s - rollout.ttft_s) / steps,
    }


def calibrate(
    engines: dict,
    k_grids: dict[str, Sequence[int]],
    texts: Sequence[str],
    batches: Sequence[int] = (1, 2, 4, 8),
    decode_tokens: int = 32,
    context_tokens: int = 256,
    prompt_lengths: Sequence[int] = (64, 192, 384, 768),
    prefill_ns: Sequence[int] = (1, 4, 8),
    repeats: int = 2,
    prefill_method: str | None = None,
    progress: bool = False,
) -> dict:
    """Time the engines; returns the calibration dict ``fit_latency_model`` reads.

    :param engines: ``{method: VLLMEngine}``; method ``"none"`` for an engine without drafts.
    :param k_grids: k values to time per method.
    :param texts: natural text (problem statements) the calibration prompts are cut from.
    :param batches: live batch sizes for the decode step tables.
    :param decode_tokens: tokens per branch of a decode timing call (EOS ignored).
    :param context_tokens: prompt length of decode calls; about a real call's mean context.
    :param prompt_lengths: prompt lengths of the prefill calls (one generated token each).
    :param prefill_ns: branch counts of the prefill calls.
    :param repeats: each configuration is timed this often, interleaved with the others.
    :param prefill_method: engine whose prefill is timed (default: the first of ``engines``);
        the model has one prefill term, and replay's k = 0 runs on this engine.
    :param progress: show a progress bar.

    Longer than the ~60-line guide on purpose: its body is one timing protocol (decode steps
    per method, k and batch, then prefill), and splitting it would scatter the order and the
    warm-up rules that make the timings comparable.
    """
    prefill_method = prefill_method or next(iter(engines))
    decode_plan = [
        (method, k, batch)
        for method, engine in engines.items()
        for k in k_grids[method]
        for batch in batches
        if batch <= engine.config.max_n
    ]
    ns = [n for n in prefill_ns if n <= engines[prefill_method].config.max_n]
    prefill_plan = [(length, n) for length in prompt_lengths for n in ns]
    decode, prefill = [], []
    started = time.monotonic()
    total = repeats * (len(decode_plan) + len(prefill_plan))
    with tqdm(total=total, desc="calibrate", unit="call", disable=not progress) as bar:
        for repeat in range(repeats):
            for method, k, batch in decode_plan:
                engine = engines[method]
                prompt = _unique_prompt(texts, engine, context_tokens - decode_tokens // 2)
                sample = _time_decode(engine, prompt, batch, k, decode_tokens)
                decode.append({"method": method, "repeat": repeat, **sample})
                bar.update()
            engine = engines[prefill_method]
            for length, n in prefill_plan:
                prompt = _unique_prompt(texts, engine, length)
                rollout = engine.run(prompt, n=n, k=0, max_tokens=1, ignore_eos=True)
                prefill.append(
                    {
                        "method": prefill_method,
                        "prompt_tokens": rollout.prompt_tokens,
                        "n": n,
                        "repeat": repeat,
                        "wall_s": rollout.wall_s,
                        "ttft_s": rollout.ttft_s,
                    }
                )
                bar.update()
    return {
        "protocol": {
            "decode": f"{decode_tokens} tokens per branch, EOS ignored, prompt ~"
            f"{context_tokens - decode_tokens // 2} tokens; step = (wall - ttft) / "
            "(tokens - 1 - accepted tokens per branch)",
            "prefill": "max_tokens = 1, fresh prompt each call (no cached prefix); "
            "fitted: wall - one k = 0 step = base + per_token * prompt_tokens * n",
            "repeats": repeats,
            "batches": list(batches),
            "k_grids": {m: list(ks) for m, ks in k_grids.items()},
            "prompt_lengths": list(prompt_lengths),
            "prefill_ns": ns,
        },
        PREFILL_METHOD_KEY: prefill_method,
        "prefix_block_tokens": prefix_block_tokens(engines[prefill_method]),
        "decode": decode,
        "prefill": prefill,
        "duration_s": round(time.monotonic() - started, 2),
    }


# ------------------------------------------------------------------------------- fitting
def _step_tables(decode: list[dict]) -> dict[str, dict[int, StepTable]]:
    """Median step seconds per (method, k, batch) as step tables."""
    samples: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    for s in decode:
        samples[(s["method"], int(s["k"]), int(s["batch"]))].append(float(s["step_s"]))
    steps: dict[str, dict[int, StepTable]] = defaultdict(dict)
    for method, k in sorted({(m, k) for m, k, _ in samples}):
        batch = sorted(b for m, kk, b in samples if (m, kk) == (method, k))
        seconds = [statistics.median(samples[(method, k, b)]) for b in batch]
        steps[method][k] = StepTable(batch, seconds)
    return dict(steps)


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: the best of the fits on column subsets whose
    coefficients are all non-negative (exact, and cheap for the three prefill columns)."""
    best, best_cost = np.zeros(x.shape[1]), float(np.sum(y**2))
    columns = range(x.shape[1])
    for mask in range(1, 2 ** x.shape[1]):
        used = [c for c in columns if mask >> c & 1]
        coef, *_ = np.linalg.lstsq(x[:, used], y, rcond=None)
        if np.any(coef < 0):
            continue
        full = np.zeros(x.shape[1])
        full[used] = coef
        cost = float(np.sum((x @ full - y) ** 2))
        if cost < best_cost - 1e-15:
            best, best_cost = full, cost
    return best


def _prefill_fit(
    prefill: list[dict], one_step: StepTable, block: int | None
) -> tuple[float, float, float]:
    """Non-negative least squares ``base + per_token * computed + per_branch * (n - 1)`` on the
    prefill samples, each less one decode step at its batch.  Returns the three coefficients."""
    n = np.array([s["n"] for s in prefill], dtype=float)
    computed = [unshared_prompt_tokens(int(s["prompt_tokens"]), int(s["n"]), block)
                for s in prefill]  # fmt: skip
    x = np.column_stack([np.ones(len(prefill)), np.array(computed, dtype=float), n - 1])
    y = np.array([s["wall_s"] for s in prefill], dtype=float) - one_step(n)
    base, per_token, per_branch = _nonnegative_lstsq(x, y)
    return float(base), float(per_token), float(per_branch)


def fit_latency_model(calibration: dict) -> LatencyModel:
    """The latency model of a calibration (see the module docstring for the protocol)."""
    if not calibration.get("decode"):
        raise ValueError("calibration has no decode samples")
    steps = _step_tables(calibration["decode"])
    method = calibration.get(PREFILL_METHOD_KEY) or next(iter(steps))
    samples = [s for s in calibration.get("prefill", []) if s["method"] == method]
    if not samples:
        raise ValueError(f"calibration has no prefill samples for method {method!r}")
    if 0 not in steps.get(method, {}):
        raise ValueError(f"calibration has no k = 0 decode samples for method {method!r}")
    block = calibration.get("prefix_block_tokens")
    base, per_token, per_branch = _prefill_fit(samples, steps[method][0], block)
    return LatencyModel(
        steps=steps,
        prefill_base_s=base,
        prefill_per_token_s=per_token,
        prefill_per_branch_s=per_branch,
        prefix_block_tokens=block,
        call_overhead_s=0.0,
        source="calibration",
        meta={
            "prefill_method": method,
            "decode_samples": len(calibration["decode"]),
            "prefill_samples": len(samples),
        },
    )
