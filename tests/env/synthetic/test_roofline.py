"""The roofline's verification cost (issue 12): fitted to the committed GPU timing, checked
against public speculative-decoding measurements and the independent H100 check."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest
import torch

from env.synthetic import gpu_step_bench as bench
from env.synthetic.gpu_step_fit import fit_steps, load_measurements
from env.synthetic.hardware import H200_SXM, LLAMA32_1B
from env.synthetic.roofline import EngineOverheads, RooflineModel, main, published_checks
from env.synthetic.spec_published import (
    EAGLE3_SGLANG_H100,
    LEVIATHAN_TABLE3,
    PROFILE_CONTEXT,
    eagle3_rows,
    specdecode_bench_rows,
    verification_ratio,
)

FIT_RMS = 0.05  # relative error over the 108 fitted timings
FIT_MAX = 0.14
DEFAULT_TOLERANCE = 0.01  # the defaults are the fit, rounded
NOT_FITTED = {"verify_kv_reads"}  # an engine assumption, documented in EngineOverheads.SOURCES


@pytest.fixture(scope="module")
def measurements():
    return load_measurements()


@pytest.fixture(scope="module")
def fit(measurements):
    return fit_steps(measurements)


@pytest.fixture(scope="module")
def profile_model():
    return RooflineModel(context_tokens=PROFILE_CONTEXT)


def test_benchmark_times_the_roofline_target_shape():
    shape = bench.LLAMA32_1B_SHAPE
    spec = LLAMA32_1B
    assert (shape.layers, shape.hidden, shape.intermediate, shape.vocab) == (
        spec.n_layers,
        spec.hidden,
        spec.intermediate,
        spec.vocab,
    )
    assert (shape.heads, shape.kv_heads, shape.head_dim) == (
        spec.n_heads,
        spec.n_kv_heads,
        spec.head_dim,
    )


def test_committed_timing_covers_the_grid(measurements):
    rows = [r for r in measurements["rows"] if "ms" in r]
    assert measurements["device"]["name"] == "NVIDIA H200"
    assert measurements["compiled"] and measurements["graph_vs_eager_relative_difference"] < 0.1
    assert {r["batch"] for r in rows} >= {1, 2, 4, 8, 16, 32, 64}
    assert {r["width"] for r in rows} == set(range(1, 11))
    assert len(rows) == len(measurements["rows"]) == 270


def test_fit_reproduces_the_committed_timing(fit):
    assert fit.rows == 108
    assert fit.rms_error <= FIT_RMS and fit.max_error <= FIT_MAX, fit
    assert fit.sampler_rms_error <= FIT_RMS
    # odd widths are left out: the SDPA kernel measured re-reads the cache there, so the model
    # (fitted on even widths) runs below them
    assert -0.25 <= fit.odd_width_mean_error <= -0.05


def test_default_overheads_are_the_fit(fit):
    fitted, default = fit.overheads, EngineOverheads()
    for name in ("bandwidth_efficiency", "weight_bandwidth_efficiency", "compute_efficiency"):
        assert getattr(default, name) == pytest.approx(getattr(fitted, name), rel=DEFAULT_TOLERANCE)
    for name in ("overlap_p", "layer_s", "verify_layer_s", "sampler_bytes_per_vocab", "sampler_s"):
        assert getattr(default, name) == pytest.approx(getattr(fitted, name), rel=DEFAULT_TOLERANCE)
    assert fitted.verify_kv_reads > 1.5 and default.verify_kv_reads == 1.0


def test_every_overhead_has_a_source():
    fields = {f.name for f in dataclasses.fields(EngineOverheads)}
    assert fields == set(EngineOverheads.SOURCES)
    fitted = [k for k, v in EngineOverheads.SOURCES.items() if "data/gpu" in v or "GPU_FIT" in v]
    assert len(fitted) >= 8


def test_batch64_verification_costs_two_to_three_plain_steps(profile_model):
    # independent H100 check (issue 12): 2-3x at batch 64 verifying 3-9 drafts; the old
    # roofline gave at most ~1.5x. Ours spans 1.7x (w=4) to 3.1x (w=10), mean within 2-3x.
    ratios = [verification_ratio(profile_model, 64, w, step=True) for w in range(4, 11)]
    assert all(1.6 <= r <= 3.3 for r in ratios), ratios
    assert 2.0 <= sum(ratios) / len(ratios) <= 3.0
    assert ratios == sorted(ratios)


def test_small_batch_verification_stays_near_a_plain_step(profile_model, measurements):
    for batch in (1, 2, 4):
        for width in range(2, 11):
            assert verification_ratio(profile_model, batch, width, step=False) <= 1.3
            assert verification_ratio(profile_model, batch, width, step=True) <= 1.4
    # the fitted model on the H200 against the timing itself, batch 1-4: within 30%
    h200 = RooflineModel(gpu=H200_SXM, overheads=fit_steps(measurements).overheads)
    ms = {
        (r["batch"], r["width"], r["context"]): r["ms"]
        for r in measurements["rows"]
        if r["stage"] == "forward"
    }
    for (batch, width, context), t in ms.items():
        if batch <= 4 and width % 2 == 0:
            measured = t / ms[(batch, 1, context)]
            predicted = h200.forward_s(LLAMA32_1B, batch, width, context) / h200.forward_s(
                LLAMA32_1B, batch, 1, context
            )
            assert abs(predicted / measured - 1) <= 0.30


def test_speculation_pays_less_as_the_batch_grows(profile_model):
    def speedup(batch: int, k: int, alpha: float = 0.65) -> float:
        tokens = (1 - alpha ** (k + 1)) / (1 - alpha)
        plain = profile_model.step_s(batch, 0, "draft_model")
        return tokens * plain / profile_model.step_s(batch, k, "draft_model")

    best = {b: max((speedup(b, k), k) for k in (1, 2, 4)) for b in (1, 64, 256)}
    assert best[1][0] > 1.3 > best[64][0] > best[256][0]
    assert best[256][1] < best[1][1]
    assert speedup(256, 4) < 1.0


def test_eagle3_speedup_falls_with_batch_as_published(profile_model):
    rows = {r["batch"]: r for r in eagle3_rows(profile_model)}
    assert rows[64]["predicted"] == pytest.approx(EAGLE3_SGLANG_H100.speedup[64], rel=0.10)
    # batch 16 is the worst check: SGLang loses more between batch 2 and 16 than the model
    assert rows[16]["predicted"] == pytest.approx(EAGLE3_SGLANG_H100.speedup[16], rel=0.20)
    assert rows[16]["predicted"] > rows[64]["predicted"]


def test_verification_ratio_matches_specdecode_bench_vllm_fit(profile_model):
    for row in specdecode_bench_rows(profile_model):
        assert row["predicted"] == pytest.approx(row["published"], rel=0.06), row


def test_published_decode_latencies_still_hold():
    for check in published_checks():
        assert check["ok"], check


def test_leviathan_table3_ranges():
    t1 = [a for row in LEVIATHAN_TABLE3["same_family_t1"].values() for a in row]
    t0 = [a for row in LEVIATHAN_TABLE3["same_family_t0"].values() for a in row]
    assert (min(t1), max(t1)) == (0.53, 0.74)
    assert (min(t0), max(t0)) == (0.61, 0.82)
    assert (min(LEVIATHAN_TABLE3["bigram"]["T=0"]), max(LEVIATHAN_TABLE3["bigram"]["T=0"])) == (
        0.05,
        0.23,
    )


def test_check_spec_command_prints_every_check(capsys):
    main(["--check-spec"])
    out = capsys.readouterr().out
    for needle in ("EAGLE-3, SGLang", "SpecDecode-Bench", "independent H100 check", "H200"):
        assert needle in out
    for batch in (1, 16, 64):
        assert f" {batch:5d} " in out


def test_bench_attention_layouts_match_reference():
    torch.manual_seed(0)
    for layout in ("gqa", "packed"):
        attend = bench.Attention(layout, torch.nn.attention.SDPBackend.MATH)
        for width in (1, 3):
            q = torch.randn(2, width, 8, 16, dtype=torch.bfloat16)
            k, v = (torch.randn(2, 2, 9 + width, 16, dtype=torch.bfloat16) for _ in range(2))
            out = attend(q, k, v, attend.mask(width, 9 + width, 4, "cpu"))
            ref = bench.attention_reference(q, k, v)
            assert ((out.float() - ref).norm() / ref.norm()) < 2e-2


def test_bench_verification_step_equals_sequential_decoding():
    """w tokens in one step give the logits of w one-token steps: the causal mask, rotary
    positions and cache writes of the timed step are right."""
    torch.manual_seed(0)
    model = bench.Decoder(bench.DecoderShape(2, 64, 4, 2, 16, 128, 100), "cpu")
    attend = bench.Attention("packed", torch.nn.attention.SDPBackend.MATH)
    model.allocate_cache(2, 16)
    ids = torch.randint(0, 100, (2, 3))
    batched = model.forward(ids, 5, attend).float().view(2, 3, -1)
    for i in range(3):
        one = model.forward(ids[:, i : i + 1], 5 + i, attend).float().view(2, 1, -1)
        err = (one[:, 0] - batched[:, i]).norm() / batched[:, i].norm()
        assert err < 3e-2, (i, float(err))


def test_profile_step_tables_use_the_calibrated_model():
    latency = replace(RooflineModel(), context_tokens=PROFILE_CONTEXT).latency_model()
    assert latency.step_time(64, 4, "ngram") > 1.8 * latency.step_time(64, 0, "ngram")
    assert latency.step_time(1, 4, "ngram") < 1.4 * latency.step_time(1, 0, "ngram")
