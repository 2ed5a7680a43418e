"""Keep a profile's latency model true on the machine that serves, not only the one that
recorded it.

    python -m env.profiles.online_calibration --profile smollm2-135m-cpu --calls 8 --seed 7

A profile's step tables and prefill fit were timed on the recording machine; a quiet machine of
the same kind ran the shipped CPU profile's calls 2.9x faster than it predicted.  The *shape*
of the model (how a step grows with the batch and k, how prefill grows with the prompt) carries
over between machines far better than its scale, so two corrections rescale it:

* ``quick_calibration``: at engine start, a bounded timing run (a few decode calls at 2-3 batch
  sizes and every k the model has, each timed step by step from the engine's own reports, plus
  prefill calls); each (method, k) step table, and the prefill terms, get one multiplicative
  factor: the median of measured / predicted over their samples.  Medians, so one slow moment
  on a shared machine does not move a factor.
* ``OnlineCorrection``: while the engine serves, every step the engine reports (its
  ``on_step`` hook: wall seconds, live batch) updates a ratio of measured to predicted step
  time per (method, k): slowly while the steps agree with it (one call's steps are noisy and
  do not predict the next call's), at once when they are far off (a changed load);
  ``corrected(model)`` applies them.

The command above starts the profile's engines, calibrates, runs held-out live calls (the plan
and the per-call prediction of ``env.profiles.validate``) and prints the relative errors of the
uncorrected, the start-calibrated and the online-corrected model (each call predicted by the
online state *before* it ran), and writes ``online_calibration.json`` in the profile folder.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace

from tqdm import tqdm

from env.latency_model import LatencyModel, StepTable, StepTableKey
from env.profiles.calibrate import _unique_prompt

PREFILL = StepTableKey("prefill", -1)
"""Factor key of the prefill terms (base, per token, per branch) of a model."""


ONLINE_ALPHA = 0.005
"""Weight of one step in a ratio near its current value: the start-up calibration still weighs
29% after one call's 250 steps.  On a quiet machine whole calls ran 10-25% off the calibrated
model one way or the other, and the next call did not follow: a ratio set by each call's
steps at once (a plain mean over the first 50 steps, then weight 0.02) predicted the held-out
calls of the README's command (``--seed 8``) with median error 12%; this one, together with
the step-timed start-up calibration, 6%."""
FAR_LOG_RATIO = math.log(1.5)
"""When the recent steps and the ratio differ by more than this (factor 1.5), the ratio jumps
to the recent steps: a far-off start-up model (timed while another process held the cores)
or a change of load is not noise."""
RECENT_STEPS = 30
"""Memory of the recent-steps average that detects a far-off ratio; it needs
``RECENT_MIN_STEPS`` steps before it may move the ratio."""
RECENT_MIN_STEPS = 10


# ------------------------------------------------------------------------------- fitting
def rescaled(model: LatencyModel, factors: dict[StepTableKey, float], note: str) -> LatencyModel:
    """``model`` with each step table, and the prefill terms, multiplied by its factor.

    Tables without a factor take the median factor of their method (else of all tables), so a
    k that the calibration had no time for still moves with the machine.
    """
    by_method: dict[str, list[float]] = defaultdict(list)
    for key, f in factors.items():
        if key != PREFILL:
            by_method[key.method].append(f)
    overall = [f for key, f in factors.items() if key != PREFILL] or [1.0]

    def factor(method: str, k: int) -> float:
        default = statistics.median(by_method.get(method) or overall)
        return factors.get(StepTableKey(method, k), default)

    steps = {
        method: {
            k: StepTable(list(t.batch), [s * factor(method, k) for s in t.seconds])
            for k, t in tables.items()
        }
        for method, tables in model.steps.items()
    }
    p = factors.get(PREFILL, statistics.median(overall))
    meta = {
        **model.meta,
        note: {f"{key.method}/{key.k}": round(f, 4) for key, f in factors.items()},
    }
    return replace(
        model,
        steps=steps,
        prefill_base_s=model.prefill_base_s * p,
        prefill_per_token_s=model.prefill_per_token_s * p,
        prefill_per_branch_s=model.prefill_per_branch_s * p,
        meta=meta,
    )


def fit_factors(
    model: LatencyModel, decode: Sequence[dict], prefill: Sequence[dict]
) -> dict[StepTableKey, float]:
    """Median measured / predicted per (method, k) over decode samples (``method``, ``k``,
    ``batch``, ``step_s``) and for prefill over one-token calls (``method``, ``n``,
    ``prompt_tokens``, ``wall_s``), whose prediction is prefill plus one k = 0 step."""
    ratios: dict[StepTableKey, list[float]] = defaultdict(list)
    for s in decode:
        predicted = float(model.step_time(s["batch"], s["k"], s["method"]))
        ratios[StepTableKey(s["method"], int(s["k"]))].append(s["step_s"] / predicted)
    for s in prefill:
        predicted = model.prefill_time(s["prompt_tokens"], s["n"]) + float(
            model.step_time(s["n"], 0, s["method"])
        )
        ratios[PREFILL].append(s["wall_s"] / predicted)
    return {key: statistics.median(r) for key, r in ratios.items() if r}


# ------------------------------------------------------------------------------- start-up
def _calibration_plan(
    engines: dict, model: LatencyModel, batches: Sequence[int]
) -> list[tuple[str, int, int]]:
    """(method, k, batch) decode timings, ordered so that every (method, k) is timed at one
    batch before any gets a second: a budget cut leaves every table with a sample."""
    rounds = []
    for batch in batches:
        rounds.append(
            [
                (method, k, batch)
                for method, engine in engines.items()
                if method in model.steps and batch <= engine.config.max_n
                for k in model.k_grid(method)
                if k <= engine.config.k_max
            ]
        )
    return [item for r in rounds for item in r]


def _default_texts() -> list[str]:
    """Problem statements to cut calibration prompts from (MATH-500, bundled)."""
    from env.task.problems import load_math500

    return [p.problem for p in load_math500()[:40]]


def _time_prefill(engine, method: str, texts: Sequence[str], length: int, n: int) -> dict:
    """One-token call of n branches on a fresh prompt of about ``length`` tokens: prefill plus
    one k = 0 step, as ``fit_factors`` predicts it."""
    n = min(n, engine.config.max_n)
    prompt = _unique_prompt(texts, engine, length)
    rollout = engine.run(prompt, n=n, k=0, max_tokens=1, ignore_eos=True)
    return {
        "method": method,
        "n": n,
        "wall_s": rollout.wall_s,
        "prompt_tokens": rollout.prompt_tokens,
    }


def _time_steps(engine, prompt: str, batch: int, k: int, tokens: int) -> dict:
    """One fixed-length call of ``batch`` branches, timed by the engine's own step reports: the
    median decode step (the first step, which holds the prefill, left out).

    Measured steps need no step count inferred from the drafts' acceptance (16 tokens at k = 4
    take anywhere from 4 to 16 steps, so one step more or less in the count moves the sample by
    6-25%), and their median shrugs off one slow step."""
    steps: list[float] = []
    engine.run(prompt, n=batch, k=k, max_tokens=tokens, ignore_eos=True,
               on_step=lambda report: steps.append(report.step_s))  # fmt: skip
    decode = steps[1:] or steps
    return {"k": k, "batch": batch, "steps": len(decode), "step_s": statistics.median(decode)}


def quick_calibration(
    engine,
    latency_model: LatencyModel,
    budget_s: float = 60.0,
    progress: bool = True,
    texts: Sequence[str] | None = None,
    batches: Sequence[int] = (1, 4, 8),
    decode_tokens: int = 16,
    context_tokens: int = 256,
) -> LatencyModel:
    """The model rescaled to this machine by a timing run of at most about ``budget_s``.

    :param engine: a ``VLLMEngine`` or ``{method: VLLMEngine}`` (the method key is the
        engine's ``config.method_name`` for a single engine); methods the model lacks are
        skipped.
    :param latency_model: the profile's model; its shape is kept, its scale refitted.
    :param budget_s: seconds after which no new timing call starts (one in flight finishes).
    :param texts: text to cut prompts from; default: MATH-500 problem statements.
    :param batches: live batch sizes timed, smallest first (capped by each engine's max_n).
    """
    engines = engine if isinstance(engine, dict) else {engine.config.method_name: engine}
    texts = list(texts) if texts else _default_texts()
    started = time.monotonic()
    plan = _calibration_plan(engines, latency_model, batches)
    prefill_method = latency_model.meta.get("prefill_method") or next(iter(engines))
    prefill_method = prefill_method if prefill_method in engines else next(iter(engines))
    prefill_plan = [(context_tokens, 1), (context_tokens // 2, 4)]
    decode, prefill = [], []
    with tqdm(
        total=len(plan) + len(prefill_plan),
        desc="quick calibration",
        unit="call",
        disable=not progress,
    ) as bar:
        for length, n in prefill_plan:
            prefill.append(_time_prefill(engines[prefill_method], prefill_method, texts, length, n))
            bar.update()
        for method, k, batch in plan:
            if time.monotonic() - started > budget_s:
                break
            e = engines[method]
            prompt = _unique_prompt(texts, e, context_tokens - decode_tokens // 2)
            decode.append({"method": method, **_time_steps(e, prompt, batch, k, decode_tokens)})
            bar.update()
    factors = fit_factors(latency_model, decode, prefill)
    model = rescaled(latency_model, factors, "quick_calibration")
    model.meta["quick_calibration_s"] = round(time.monotonic() - started, 2)
    model.meta["quick_calibration_samples"] = len(decode) + len(prefill)
    model.meta["quick_calibration_timings"] = [
        {key: s[key] for key in ("method", "k", "batch", "n", "step_s", "wall_s") if key in s}
        for s in prefill + decode
    ]
    return model


# ------------------------------------------------------------------------------- serving
class OnlineCorrection:
    """Measured / predicted step-time ratios per (method, k), fed by the engine's per-step
    reports while it serves.

    The ratios multiply ``base`` (the start-calibrated model, usually): ``corrected(base)``
    is the model to predict with now.  Each update is a few float operations under a lock
    (safe from the engine thread while other threads read).  Ratios live in log space and move
    at two speeds:

    * near the current ratio, slowly: an exponential average of weight ``alpha`` that starts
      at the base model (ratio 1); one step's ratio is clipped to ``[1/clip, clip]`` times
      the current one, so a step stalled by a page fault or another process does not swing
      the model.  Whole calls run 10-25% off the model in either direction and the next call
      does not follow, so one call must not set the ratio.
    * far from it, at once: when the mean of the last ``RECENT_STEPS`` steps (after at least
      ``RECENT_MIN_STEPS``) is more than ``FAR_LOG_RATIO`` away, the ratio jumps to it and
      then follows a plain mean of the steps for ``RECENT_STEPS`` steps (the recent mean lags
      a change).  A start-up model timed while another process held the cores, or a load that
      changed, is fixed within a few dozen steps.

    A server that admits by these predictions needs one more thing: a ratio learnt in a slow
    moment must not outlive it.  Once a server believes itself slow it refuses the requests that
    would correct it, so with ``half_life_s`` a key's ratio (and its recent mean) decays towards
    the base model while no step updates it (halving its log every ``half_life_s`` seconds).

    :param base: the model whose predictions the ratios correct.
    :param alpha: weight of a new step near the current ratio (about 1/alpha steps of memory).
    :param clip: largest factor one step may pull towards.
    :param half_life_s: decay of a ratio without updates (None: none).
    """

    def __init__(
        self,
        base: LatencyModel,
        alpha: float = ONLINE_ALPHA,
        clip: float = 3.0,
        half_life_s: float | None = None,
    ) -> None:
        if half_life_s is not None and half_life_s <= 0:
            raise ValueError(f"half_life_s must be > 0 or None, got {half_life_s!r}")
        self.base, self.alpha, self._log_clip = base, alpha, math.log(clip)
        self.half_life_s = half_life_s
        self._log_ratio: dict[StepTableKey, float] = {}
        self._recent: dict[StepTableKey, float] = {}
        self._since_jump: dict[StepTableKey, int] = {}
        self._count: dict[StepTableKey, int] = defaultdict(int)
        self._updated: dict[StepTableKey, float] = {}
        self._lock = threading.Lock()

    def update(self, method: str, k: int, batch: int, step_s: float) -> None:
        """Record one decode step of ``batch`` live branches with k drafts that took
        ``step_s`` seconds."""
        predicted = float(self.base.step_time(batch, k, method))
        if step_s <= 0 or predicted <= 0:
            return
        self._add(StepTableKey(method, k), math.log(step_s / predicted))

    def update_prefill(self, method: str, prompt_tokens: int, n: int, first_step_s: float) -> None:
        """Record a call's first step (prefill and its first token)."""
        predicted = self.base.prefill_time(prompt_tokens, n) + float(
            self.base.step_time(n, 0, method)
        )
        if first_step_s > 0 and predicted > 0:
            self._add(PREFILL, math.log(first_step_s / predicted))

    def _add(self, key: StepTableKey, log_ratio: float) -> None:
        """One step's log ratio into the key's recent mean, then into its ratio: a jump to the
        recent mean when that is far, else a small step towards the (clipped) input."""
        with self._lock:
            now = time.monotonic()
            count = self._count[key] + 1
            current = self._decayed(self._log_ratio, key, now)
            recent = self._decayed(self._recent, key, now)
            # the first step sets the recent mean; later ones are clipped around it
            into_recent = self._clipped(log_ratio, recent) if count > 1 else log_ratio
            recent += max(1.0 / RECENT_STEPS, 1.0 / count) * (into_recent - recent)
            since_jump = self._since_jump.get(key, RECENT_STEPS)  # steps since a jump
            if count >= RECENT_MIN_STEPS and abs(recent - current) > FAR_LOG_RATIO:
                current, since_jump = recent, 1
            else:  # just after a jump, a plain mean: the recent mean it jumped to lags
                weight = 1.0 / (since_jump + 1) if since_jump < RECENT_STEPS else self.alpha
                current += weight * (self._clipped(log_ratio, current) - current)
                since_jump += 1
            self._log_ratio[key], self._recent[key] = current, recent
            self._since_jump[key] = since_jump
            self._count[key], self._updated[key] = count, now

    def _clipped(self, log_ratio: float, around: float) -> float:
        """``log_ratio`` at most ``clip`` (as a factor) away from ``around``."""
        return min(max(log_ratio, around - self._log_clip), around + self._log_clip)

    def _decayed(self, values: dict[StepTableKey, float], key: StepTableKey, now: float) -> float:
        """A key's log value in ``values`` as of ``now`` (decayed since its last update; under
        the lock)."""
        value = values.get(key, 0.0)
        if self.half_life_s is None or key not in self._updated:
            return value
        return value * 0.5 ** ((now - self._updated[key]) / self.half_life_s)

    def factors(self) -> dict[StepTableKey, float]:
        """Current ratio per key that has seen a step."""
        now = time.monotonic()
        with self._lock:
            return {key: math.exp(self._decayed(self._log_ratio, key, now))
                    for key in self._log_ratio}  # fmt: skip

    def corrected(self, model: LatencyModel | None = None) -> LatencyModel:
        """``model`` (default: ``base``; it should be the model the ratios were measured
        against) with the current ratios applied; a table without steps yet takes the median
        ratio of its method's tables that have them (else of all), as ``rescaled`` does: the
        machine's speed shows in every table."""
        factors = self.factors()
        return (
            rescaled(model or self.base, factors, "online_correction")
            if factors
            else (model or self.base)
        )

    def predict_wall_time(self, *args, **kwargs) -> float:
        """``LatencyModel.predict_wall_time`` of the corrected model."""
        return self.corrected().predict_wall_time(*args, **kwargs)

    def hook(
        self, method: str, k: int, n: int, prompt_tokens: int, inner: Callable | None = None
    ) -> Callable:
        """An ``on_step`` hook for one call (n branches at k) that feeds this correction and
        then hands the report to ``inner`` (returning its answer).  The first step is the
        prefill; a step's batch is the branches live before it (live after + finished)."""
        state = {"first": True, "k": k}

        def on_step(report):
            batch = report.live + len(report.finished)
            if state["first"]:
                state["first"] = False
                self.update_prefill(method, prompt_tokens, n, report.step_s)
            elif batch > 0:
                self.update(method, state["k"], batch, report.step_s)
            control = inner(report) if inner is not None else None
            if control is not None and control.k is not None:  # applies from the next step
                state["k"] = control.k
            return control

        return on_step


# ------------------------------------------------------------------------------- validation
def _validate_live(
    engines: dict, plan: list[dict], models: dict, online: OnlineCorrection, max_tokens: int
) -> list[dict]:
    """Run the planned calls, each fed to ``online``; predict each with every model in
    ``models`` and with the online-corrected one as it stood before the call."""
    from env.profiles.validate import predict_call
    from env.task.prompt import build_user_message

    records = []
    for call in tqdm(plan, desc="validate", unit="call"):
        before = online.corrected()
        engine = engines[call["method"]]
        prompt_ids = engine.prompt_token_ids(build_user_message(call["problem"].problem))
        hook = online.hook(call["method"], call["k"], call["n"], len(prompt_ids))
        rollout = engine.run(
            prompt_ids, n=call["n"], k=call["k"], max_tokens=max_tokens, on_step=hook
        )
        record = {
            "id": call["problem"].id,
            "method": call["method"],
            "n": call["n"],
            "k": call["k"],
            "prompt_tokens": rollout.prompt_tokens,
            "tokens": [b.token_count for b in rollout.branches],
            "measured_s": rollout.wall_s,
            "ttft_s": rollout.ttft_s,
        }
        for name, model in {**models, "online": before}.items():
            record[name] = predict_call(model, rollout, call["method"])
        records.append(record)
    return records


def _summaries(records: list[dict], names: Sequence[str]) -> dict:
    """``validate.summarize`` per model name."""
    from env.profiles.validate import summarize

    return {
        name: summarize(
            [
                {"predicted_s": r[name]["predicted_s"], "measured_s": r["measured_s"]}
                for r in records
            ]
        )
        for name in names
    }


def main(argv: list[str] | None = None) -> None:
    """Calibrate the profile's engines at start, then validate on held-out live calls."""
    from datetime import UTC, datetime

    from env.profiles.store import load_profile, write_json
    from env.profiles.validate import plan_calls, profile_engines

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True, help="profile name or folder")
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--kv-cache-gb", type=float, default=1.0)
    args = parser.parse_args(argv)
    profile = load_profile(args.profile)
    started = time.monotonic()
    engines = profile_engines(profile, args.kv_cache_gb, args.seed)
    try:
        shipped = profile.latency_model()
        t0 = time.monotonic()
        calibrated = quick_calibration(engines, shipped, budget_s=args.budget_s)
        calibration_s = time.monotonic() - t0
        online = OnlineCorrection(calibrated)
        plan = plan_calls(profile, list(engines), args.calls, args.seed)
        records = _validate_live(
            engines,
            plan,
            {"uncorrected": shipped, "calibrated": calibrated},
            online,
            int(profile.manifest["sampling"]["max_tokens"]),
        )
    finally:
        for engine in engines.values():
            engine.shutdown()
    summaries = _summaries(records, ("uncorrected", "calibrated", "online"))
    for name, s in summaries.items():
        print(
            f"{name:<12} median {s['median_rel_error']:6.1%}  p90 {s['p90_rel_error']:6.1%}  "
            f"mean signed {s['mean_signed_error']:+6.1%}  meets targets: {s['meets_targets']}"
        )
    out = profile.path / "online_calibration.json"
    write_json(
        out,
        {
            "command": "python -m env.profiles.online_calibration "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "calibration_s": round(calibration_s, 1),
            "duration_s": round(time.monotonic() - started, 1),
            "calibration_factors": calibrated.meta.get("quick_calibration"),
            "online_factors": {
                f"{k.method}/{k.k}": round(v, 4) for k, v in online.factors().items()
            },
            "summaries": summaries,
            "records": records,
        },
    )
    print(f"calibration {calibration_s:.1f} s; wrote {out}")


if __name__ == "__main__":
    main()
