"""Start-up calibration and online correction of a latency model: the factor fit on scripted
timings of a fake engine, the online ratios' convergence and stability, and (engine-marked) a
quick calibration of the real n-gram engine predicting a fresh call."""

from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest

from env.latency_model import LatencyModel, StepTable, StepTableKey
from env.profiles.online_calibration import (
    ONLINE_ALPHA,
    PREFILL,
    OnlineCorrection,
    fit_factors,
    quick_calibration,
    rescaled,
)

KS = (0, 1, 2, 4)


def profile_model() -> LatencyModel:
    """A recorded model: ngram step tables over batches 1..8 and a prefill fit."""
    steps = {
        "ngram": {
            k: StepTable(
                [1, 2, 4, 8], [0.06 + 0.01 * k + 0.008 * b * (k + 1) for b in (1, 2, 4, 8)]
            )
            for k in KS
        }
    }
    return LatencyModel(
        steps=steps,
        prefill_base_s=0.08,
        prefill_per_token_s=0.002,
        prefill_per_branch_s=0.005,
        prefix_block_tokens=128,
        meta={"prefill_method": "ngram"},
    )


class FakeTokenizer:
    """Words as tokens, so prompt lengths are easy to script."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return text.split()

    def decode(self, ids: list[str]) -> str:
        return " ".join(ids)


@dataclass
class FakeEngine:
    """Stands in for ``VLLMEngine`` (a fake: the engine-marked test below calibrates the real
    one): each call takes the wall time ``model`` predicts, times this machine's
    ``step_factor[k]`` (decode) or ``prefill_factor`` (one-token calls), reported step by step
    to ``on_step``; each branch reports ``accepted`` accepted drafts when k > 0."""

    model: LatencyModel
    step_factor: dict[int, float]
    prefill_factor: float
    config: SimpleNamespace = field(
        default_factory=lambda: SimpleNamespace(method_name="ngram", max_n=8, k_max=4)
    )
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    accepted: int = 0
    calls: int = 0

    def prompt_token_ids(self, text: str) -> list[str]:
        return self.tokenizer.encode(text) + ["<chat>"] * 5

    def run(self, prompt, n: int, k: int, max_tokens: int, ignore_eos: bool = False,
            on_step=None, **_):  # fmt: skip
        self.calls += 1
        p = len(self.prompt_token_ids(prompt))
        ttft = 0.01
        if max_tokens == 1:
            wall = self.model.prefill_time(p, n) + float(self.model.step_time(n, 0, "ngram"))
            steps = [wall * self.prefill_factor]
        else:  # one token per step, whatever the reported acceptance says
            step = float(self.model.step_time(n, k, "ngram")) * self.step_factor[k]
            steps = [ttft] + [step] * (max_tokens - 1)
        for step_s in steps if on_step else ():
            on_step(SimpleNamespace(step_s=step_s, live=n, finished=[]))
        branches = [SimpleNamespace(accepted_tokens=self.accepted if k else 0,
                                    token_count=max_tokens) for _ in range(n)]  # fmt: skip
        return SimpleNamespace(wall_s=sum(steps), ttft_s=steps[0], prompt_tokens=p,
                               branches=branches)  # fmt: skip


TEXTS = ["one two three four five six seven eight nine ten " * 4]


def test_quick_calibration_recovers_per_k_factors_and_prefill():
    model = profile_model()
    factors = {0: 0.35, 1: 0.4, 2: 0.5, 4: 0.3}
    engine = FakeEngine(model, factors, prefill_factor=0.45)
    fitted = quick_calibration(engine, model, budget_s=30, progress=False, texts=TEXTS)
    for k, f in factors.items():
        for b in (1, 3, 8):
            got = float(fitted.step_time(b, k, "ngram"))
            assert got == pytest.approx(f * float(model.step_time(b, k, "ngram")), rel=1e-9)
    assert fitted.prefill_time(300, 4) == pytest.approx(0.45 * model.prefill_time(300, 4))
    assert fitted.meta["quick_calibration"]["ngram/1"] == pytest.approx(0.4)


def test_quick_calibration_times_measured_steps_not_steps_inferred_from_acceptance():
    """Drafts the engine reports as accepted do not shorten the steps it actually took: the
    factors come from the step reports (a step count inferred from 5 accepted drafts per branch
    would make each step look 1.4x longer)."""
    model = profile_model()
    factors = {0: 0.5, 1: 0.6, 2: 0.7, 4: 0.8}
    engine = FakeEngine(model, factors, prefill_factor=0.5, accepted=5)
    fitted = quick_calibration(engine, model, budget_s=30, progress=False, texts=TEXTS)
    for k, f in factors.items():
        assert fitted.meta["quick_calibration"][f"ngram/{k}"] == pytest.approx(f)


def test_fit_factors_takes_the_median_so_one_outlier_does_not_move_it():
    model = profile_model()
    decode = [
        {
            "method": "ngram",
            "k": 1,
            "batch": b,
            "step_s": 0.5 * float(model.step_time(b, 1, "ngram")),
        }
        for b in (1, 4, 8)
    ]
    decode[0]["step_s"] *= 6  # one busy moment on a shared machine
    assert fit_factors(model, decode, [])[StepTableKey("ngram", 1)] == pytest.approx(0.5)


def test_tables_without_samples_take_their_methods_median_factor():
    model = profile_model()
    out = rescaled(model, {StepTableKey("ngram", 0): 0.4, StepTableKey("ngram", 1): 0.6}, "t")
    assert float(out.step_time(2, 4, "ngram")) == pytest.approx(
        0.5 * float(model.step_time(2, 4, "ngram"))
    )
    assert out.prefill_per_token_s == pytest.approx(0.5 * model.prefill_per_token_s)


def test_budget_cut_keeps_a_sample_for_every_k_first():
    model = profile_model()
    engine = FakeEngine(model, {k: 0.5 for k in KS}, prefill_factor=0.5)
    slow_run = engine.run

    def run(*args, **kwargs):
        time.sleep(0.05)
        return slow_run(*args, **kwargs)

    engine.run = run
    fitted = quick_calibration(engine, model, budget_s=0.4, progress=False, texts=TEXTS)
    assert set(fitted.meta["quick_calibration"]) >= {f"ngram/{k}" for k in KS}
    assert fitted.meta["quick_calibration_samples"] < 2 + len(KS) * 3  # cut before the plan's end


def test_online_correction_converges_to_a_known_ratio_and_resists_outliers():
    model = profile_model()
    online = OnlineCorrection(model, alpha=0.05)
    rng = np.random.default_rng(0)
    for i in range(400):
        b = int(rng.integers(1, 9))
        step = 0.4 * float(model.step_time(b, 2, "ngram")) * math.exp(0.1 * rng.standard_normal())
        online.update("ngram", 2, b, step * (20 if i % 50 == 7 else 1))  # rare stalls
    assert online.factors()[StepTableKey("ngram", 2)] == pytest.approx(0.4, rel=0.08)
    corrected = online.corrected()
    assert float(corrected.step_time(4, 2, "ngram")) == pytest.approx(
        0.4 * float(model.step_time(4, 2, "ngram")), rel=0.08
    )
    # a k without steps yet moves with the machine too (its method's median ratio)
    assert float(corrected.step_time(4, 0, "ngram")) == pytest.approx(
        0.4 * float(model.step_time(4, 0, "ngram")), rel=0.08
    )
    assert PREFILL not in online.factors()


def test_online_correction_fixes_a_far_off_start_within_one_call():
    model = profile_model()
    online = OnlineCorrection(model, alpha=0.02)
    for _ in range(30):  # one call's worth of steps, the start model 12x too slow
        online.update("ngram", 1, 4, float(model.step_time(4, 1, "ngram")) / 12)
    assert online.factors()[StepTableKey("ngram", 1)] == pytest.approx(1 / 12, rel=0.01)


def test_one_calls_noise_moves_the_ratio_part_way_a_far_off_one_at_once():
    """A call (250 steps) whose steps run 15% slower than the calibrated model moves the ratio
    71% of the way (an average of weight ``ONLINE_ALPHA`` from the calibration); steps 2x off
    make it jump, and then follow them, within a fifth of a call."""
    model = profile_model()
    online = OnlineCorrection(model)
    key = StepTableKey("ngram", 2)
    for _ in range(250):
        online.update("ngram", 2, 4, 1.15 * float(model.step_time(4, 2, "ngram")))
    assert online.factors()[key] == pytest.approx(1.15 ** (1 - (1 - ONLINE_ALPHA) ** 250), rel=1e-6)
    steps = 0
    while online.factors()[key] < 2.0 and steps < 100:
        online.update("ngram", 2, 4, 2.3 * float(model.step_time(4, 2, "ngram")))
        steps += 1
    assert steps <= 50  # a fifth of one call
    assert online.factors()[key] == pytest.approx(2.3, rel=0.15)


def test_online_hook_feeds_prefill_then_decode_steps_at_the_live_batch():
    model = profile_model()
    online = OnlineCorrection(model, alpha=1.0)
    hook = online.hook("ngram", 1, n=4, prompt_tokens=200)
    first = model.prefill_time(200, 4) + float(model.step_time(4, 0, "ngram"))
    hook(SimpleNamespace(step_s=2 * first, live=4, finished=[]))
    hook(SimpleNamespace(step_s=3 * float(model.step_time(4, 1, "ngram")), live=3, finished=[1]))
    factors = online.factors()
    assert factors[PREFILL] == pytest.approx(2.0)
    assert factors[StepTableKey("ngram", 1)] == pytest.approx(3.0)


def test_online_updates_are_thread_safe_and_cheap():
    model = profile_model()
    online = OnlineCorrection(model)

    def feed() -> None:
        for _ in range(2000):
            online.update("ngram", 1, 4, 0.5 * float(model.step_time(4, 1, "ngram")))

    threads = [threading.Thread(target=feed) for _ in range(4)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_update = (time.perf_counter() - started) / 8000
    assert online._count[StepTableKey("ngram", 1)] == 8000
    assert online.factors()[StepTableKey("ngram", 1)] == pytest.approx(0.5)
    assert per_update < 2e-4  # microseconds each; generous for a loaded CI machine


@pytest.mark.engine
def test_quick_calibration_on_the_ngram_engine_predicts_a_fresh_call(ngram_engine):
    """A 15 s calibration predicts the median of three fresh calls within 40%.  A calibration
    that ran through a busy spell of a shared machine (CI once saw every call predicted 1.86x
    too slow) is taken again once: the claim is that calibrating predicts this machine's calls,
    not that the machine stays quiet for half a minute.  Both attempts must miss to fail."""
    from env.profiles.store import load_profile
    from env.profiles.validate import predict_call

    shipped = load_profile("smollm2-135m-cpu").latency_model()
    prompt = "Compute 17 * 23 and explain each step. Put the final answer in \\boxed{}."
    attempts = []
    for _ in range(2):
        started = time.monotonic()
        model = quick_calibration(ngram_engine, shipped, budget_s=15, progress=False,
                                  batches=(1, 4))  # fmt: skip
        assert time.monotonic() - started < 40
        ratios = []  # three calls, so that one busy moment does not decide
        for _ in range(3):
            rollout = ngram_engine.run(prompt, n=2, k=2, max_tokens=48, ignore_eos=True)
            ratios.append(predict_call(model, rollout, "ngram")["predicted_s"] / rollout.wall_s)
        attempts.append(ratios)
        if statistics.median(ratios) == pytest.approx(1.0, rel=0.4):
            break
    assert statistics.median(attempts[-1]) == pytest.approx(1.0, rel=0.4), attempts


def test_a_ratio_without_steps_decays_to_the_base_model(monkeypatch):
    """A server that learnt it was 3x slow and then saw no steps (it refused the work) trusts
    the base model again: the log ratio halves every half-life; a new step is averaged into the
    decayed value."""
    model = profile_model()
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    online = OnlineCorrection(model, alpha=1.0, half_life_s=60.0)
    key = StepTableKey("ngram", 1)
    online.update("ngram", 1, 4, 3.0 * float(model.step_time(4, 1, "ngram")))
    assert online.factors()[key] == pytest.approx(3.0)
    clock[0] += 60.0
    assert online.factors()[key] == pytest.approx(3.0**0.5)
    clock[0] += 540.0
    assert online.factors()[key] == pytest.approx(1.0, abs=0.01)
    assert OnlineCorrection(model).half_life_s is None  # validation runs keep every ratio
    with pytest.raises(ValueError, match="half_life_s"):
        OnlineCorrection(model, half_life_s=0.0)
