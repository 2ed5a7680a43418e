"""Fit the roofline's efficiencies to a GPU timing of the target's decode steps (issue 12).

`env.synthetic.gpu_step_bench` times Llama-3.2-1B's real layer shapes on a GPU at batch x width
x context; this module finds the `EngineOverheads` values with which `RooflineModel.forward_s`
(the same formula the profile's step tables use) reproduces those times, so that the model can
then be applied with another GPU's bandwidth and peak (the H100's, for the synthetic profile).

The fit, in order of how directly each value is read from the data:
  0. weight bandwidth efficiency: the device copy rate the benchmark measured (weights stream
     like a copy; on one GPU and one model their read time cannot be told from per-layer
     latency, both being constant over batch);
  1. bandwidth efficiency: the KV-cache read rate, from how step time grows with context at
     width 1 and batch >= 32 (below that the attention kernel is latency-bound);
  2. compute efficiency and overlap exponent p: a grid, each point with
  3. per-layer latency, masked-path latency and KV re-reads of verification solved by linear
     least squares on relative error;
  4. sampler bytes per vocabulary entry: (forward+sampler) - forward against positions sampled.
Odd widths are left out of the fit: with the SDPA kernel measured they read the KV cache about
twice as often as even widths (their extra time doubles with context), a kernel-selection
artifact that a verification kernel need not have; their residuals are reported.

    python -m env.synthetic.gpu_step_fit [data/gpu/h200_llama32_1b_steps.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from env.synthetic.hardware import H200_SXM, LLAMA32_1B, GPUSpec, TransformerSpec
from env.synthetic.roofline import EngineOverheads, RooflineModel

H200_MEASUREMENTS = Path(__file__).resolve().parents[2] / "data/gpu/h200_llama32_1b_steps.json"
P_GRID = np.round(np.arange(1.0, 4.0001, 0.05), 2)
COMPUTE_GRID = np.round(np.arange(0.20, 0.9001, 0.005), 3)
MIN_BANDWIDTH_BATCH = 32


@dataclass(frozen=True)
class StepFit:
    """Fitted overheads and how well they reproduce the measurement they came from."""

    overheads: EngineOverheads
    rms_error: float
    max_error: float
    odd_width_mean_error: float
    sampler_rms_error: float
    rows: int


def load_measurements(path: Path | str = H200_MEASUREMENTS) -> dict:
    return json.loads(Path(path).read_text())


def _timed(rows: list[dict], stage: str) -> list[dict]:
    return [r for r in rows if r.get("stage") == stage and "ms" in r]


def fitted_rows(rows: list[dict], stage: str = "forward") -> list[dict]:
    """The timings the fit uses: width 1 and even widths (see the module docstring)."""
    return [r for r in _timed(rows, stage) if r["width"] == 1 or r["width"] % 2 == 0]


def fit_bandwidth(rows: list[dict], spec: TransformerSpec, gpu: GPUSpec) -> float:
    """KV bytes per second over peak, from the context slope of plain (width 1) steps."""
    by_key = {
        (r["batch"], r["context"]): r["ms"] / 1e3
        for r in _timed(rows, "forward")
        if r["width"] == 1
    }
    contexts = sorted({c for _, c in by_key})
    low, high = contexts[0], contexts[-1]
    batches = [
        b for b, c in by_key if c == high and b >= MIN_BANDWIDTH_BATCH and (b, low) in by_key
    ]
    extra_bytes = np.array([b * (high - low) * spec.kv_bytes_per_token for b in batches], float)
    extra_s = np.array([by_key[(b, high)] - by_key[(b, low)] for b in batches])
    seconds_per_byte = float(extra_bytes @ extra_s / (extra_bytes @ extra_bytes))
    return 1.0 / (seconds_per_byte * gpu.hbm_bytes_per_s)


def _columns(model: RooflineModel, rows: list[dict]) -> tuple[np.ndarray, ...]:
    """Per row: measured s, memory s, compute s at efficiency 1, and KV-read s."""
    spec, gpu = model.target, model.gpu
    measured, memory, compute, kv = [], [], [], []
    for r in rows:
        mem, comp = model.memory_compute_s(spec, r["batch"], r["width"], r["context"])
        measured.append(r["ms"] / 1e3)
        memory.append(mem)
        compute.append(comp * model.overheads.compute_efficiency)
        kv_bytes = r["batch"] * r["context"] * spec.kv_bytes_per_token
        kv.append(kv_bytes / (gpu.hbm_bytes_per_s * model.overheads.bandwidth_efficiency))
    return tuple(np.asarray(x) for x in (measured, memory, compute, kv))


def fit_forward(model: RooflineModel, rows: list[dict]) -> EngineOverheads:
    """Grid over (compute efficiency, p); linear least squares for the per-layer terms."""
    measured, memory, compute_at_1, kv = _columns(model, rows)
    verify = np.array([r["width"] > 1 for r in rows], float)
    layers = model.target.n_layers
    design = np.stack([np.full_like(measured, layers), verify * layers, verify * kv], 1)
    design = design / measured[:, None]
    best = None
    for efficiency in COMPUTE_GRID:
        compute = compute_at_1 / efficiency
        for p in P_GRID:
            core = (memory**p + compute**p) ** (1 / p)
            coef, *_ = np.linalg.lstsq(design, 1 - core / measured, rcond=None)
            if (coef < 0).any():
                continue
            error = design @ coef + core / measured - 1
            score = float(np.mean(error**2))
            if best is None or score < best[0]:
                best = (score, efficiency, p, coef)
    if best is None:
        raise ValueError("no (compute efficiency, p) on the grid gives non-negative terms")
    _, efficiency, p, (layer_s, verify_layer_s, rereads) = best
    return replace(
        model.overheads,
        compute_efficiency=float(efficiency),
        overlap_p=float(p),
        layer_s=float(layer_s),
        verify_layer_s=float(verify_layer_s),
        verify_kv_reads=1.0 + float(rereads),
    )


def fit_sampler(model: RooflineModel, rows: list[dict]) -> tuple[float, float]:
    """HBM bytes per vocabulary entry that sampling one position costs (the slope) and the
    fixed latency of a sampling pass (the intercept)."""
    forward = {(r["batch"], r["width"], r["context"]): r["ms"] for r in _timed(rows, "forward")}
    pairs = [
        (r["batch"] * r["width"], (r["ms"] - forward[key]) / 1e3)
        for r in _timed(rows, "forward+sampler")
        if (key := (r["batch"], r["width"], r["context"])) in forward
    ]
    positions, extra_s = (np.array(x, float) for x in zip(*pairs, strict=True))
    design = np.stack([np.ones_like(positions), positions], 1)
    (fixed_s, seconds_per_position), *_ = np.linalg.lstsq(design, extra_s, rcond=None)
    rate = model.gpu.hbm_bytes_per_s * model.overheads.bandwidth_efficiency
    return float(seconds_per_position * rate / model.target.vocab), float(fixed_s)


def relative_errors(model: RooflineModel, rows: list[dict], sampler: bool = False) -> np.ndarray:
    """Predicted / measured - 1 for each row (forward, plus sampling where `sampler`)."""
    out = []
    for r in rows:
        seconds = model.forward_s(model.target, r["batch"], r["width"], r["context"])
        if sampler:
            seconds += model.sampling_s(model.target, r["batch"] * r["width"])
        out.append(seconds / (r["ms"] / 1e3) - 1)
    return np.asarray(out)


def fit_steps(
    measurements: dict | None = None, spec: TransformerSpec = LLAMA32_1B, gpu: GPUSpec = H200_SXM
) -> StepFit:
    """All fitted overheads for `spec` timed on `gpu`, and their errors on the timing."""
    measurements = measurements or load_measurements()
    rows = measurements["rows"]
    copy = measurements["ceilings"]["copy_bytes_per_s"] / gpu.hbm_bytes_per_s
    bandwidth = fit_bandwidth(rows, spec, gpu)
    start = EngineOverheads(bandwidth_efficiency=bandwidth, weight_bandwidth_efficiency=copy)
    model = RooflineModel(gpu=gpu, target=spec, overheads=start)
    model = replace(model, overheads=fit_forward(model, fitted_rows(rows)))
    per_vocab, fixed_s = fit_sampler(model, rows)
    sampling = replace(model.overheads, sampler_bytes_per_vocab=per_vocab, sampler_s=fixed_s)
    model = replace(model, overheads=sampling)
    errors = relative_errors(model, fitted_rows(rows))
    odd = [r for r in _timed(rows, "forward") if r["width"] % 2 == 1 and r["width"] > 1]
    sampled = fitted_rows(rows, "forward+sampler")
    return StepFit(
        overheads=model.overheads,
        rms_error=float(np.sqrt(np.mean(errors**2))),
        max_error=float(np.abs(errors).max()),
        odd_width_mean_error=float(np.mean(relative_errors(model, odd))) if odd else float("nan"),
        sampler_rms_error=float(np.sqrt(np.mean(relative_errors(model, sampled, True) ** 2))),
        rows=len(errors),
    )


def format_fit(fit: StepFit, measurements: dict, context: int = 1024) -> str:
    """The fitted values, and predicted / measured - 1 per batch and width at one context."""
    o = fit.overheads
    lines = [
        f"fitted on {fit.rows} forward timings (width 1 and even widths, both contexts)",
        f"  bandwidth efficiency: KV {o.bandwidth_efficiency:.3f}, weights (copy rate) "
        f"{o.weight_bandwidth_efficiency:.3f}; compute efficiency {o.compute_efficiency:.3f}, "
        f"overlap p {o.overlap_p:.2f}",
        f"  per-layer latency {o.layer_s * 1e6:.1f} us, verification: +{o.verify_layer_s * 1e6:.1f}"
        f" us per layer, KV read {o.verify_kv_reads:.2f}x; sampler {o.sampler_bytes_per_vocab:.1f}"
        f" bytes per vocabulary entry + {o.sampler_s * 1e6:.0f} us",
        f"  error: rms {fit.rms_error:.3f}, max {fit.max_error:.3f}; odd widths (not fitted) "
        f"mean {fit.odd_width_mean_error:+.3f}; forward+sampler (same widths) rms "
        f"{fit.sampler_rms_error:.3f}",
        f"predicted / measured - 1 at context {context} (odd widths not fitted):",
    ]
    model = RooflineModel(gpu=H200_SXM, overheads=o)
    rows = [r for r in _timed(measurements["rows"], "forward") if r["context"] == context]
    widths = sorted({r["width"] for r in rows})
    lines.append("batch " + "".join(f"{'w=' + str(w):>7s}" for w in widths))
    for batch in sorted({r["batch"] for r in rows}):
        cells = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["width"])
        errors = relative_errors(model, cells)
        lines.append(f"{batch:5d} " + "".join(f"{e:+7.2f}" for e in errors))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fit roofline efficiencies to a GPU timing")
    parser.add_argument("path", nargs="?", default=str(H200_MEASUREMENTS))
    args = parser.parse_args(argv)
    measurements = load_measurements(args.path)
    print(format_fit(fit_steps(measurements), measurements))


if __name__ == "__main__":
    main()
