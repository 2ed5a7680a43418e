"""H100 roofline latency model: GPU-like step times for synthetic profiles, without a GPU.

The allocation policy has to learn the trade-offs of a GPU engine: decoding is memory-bound at
small batch (more branches are nearly free), compute saturates as branches x (k+1) verified
tokens grow, and a draft model costs k extra forward passes per step. None of that can be
measured on the CPU machines here, so this module derives the decode step time from public
figures instead:

    step(batch, k) = fixed step overhead
                   + target forward over k+1 tokens per branch
                   + (k > 0) verification overhead + proposal (k draft forwards, or ngram lookup)
    forward        = per-layer overhead x layers
                   + max(bytes read / achieved HBM bandwidth, FLOPs / achieved peak compute)

where the bytes are the weights plus the KV cache of every live branch at a representative
context length. The result is a `LatencyModel` with the same per-(method, k) step tables over
batch size that a timing calibration of a real engine produces, so replay does not care where
the numbers came from. `published_checks` compares the arithmetic with public H100
measurements; every constant carries its source (or says it is an assumption).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

from env.latency_model import SPEC_METHODS, LatencyModel, StepTable

BATCH_GRID = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
"""Batch sizes (live branches) at which step times are tabulated; `StepTable` interpolates."""

K_GRID = (0, 1, 2, 4)
"""Draft tokens per step. Per-token acceptance here is 0.2-0.7, where expected tokens per step
(1 - a^(k+1)) / (1 - a) gain little beyond k = 4 (a = 0.65: 2.3 at k = 4, 2.5 at k = 8), and
k = 1, 2 are the cheap settings that stay worthwhile once compute saturates at large n."""

HF_CONFIGS = "config.json of the model on the Hugging Face hub"


@dataclass(frozen=True)
class GPUSpec:
    """Peak figures of one accelerator.

    :param hbm_bytes_per_s: peak memory bandwidth.
    :param dense_flops: peak dense tensor-core FLOP/s by compute dtype.
    """

    name: str
    hbm_bytes_per_s: float
    dense_flops: dict[str, float]
    source: str


H100_SXM = GPUSpec(
    name="NVIDIA H100 SXM (roofline)",
    hbm_bytes_per_s=3.35e12,
    dense_flops={"bf16": 989.4e12, "fp8": 1978.9e12},
    source=(
        "NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: 3.35 TB/s HBM3; 1,979 TFLOPS BF16 "
        "and 3,958 TFLOPS FP8 with 2:4 sparsity, i.e. 989 and 1,979 TFLOPS dense"
    ),
)


@dataclass(frozen=True)
class TransformerSpec:
    """Shape and storage precision of a Llama-style decoder.

    :param vocab: rows of the output head (a draft may use a reduced draft vocabulary).
    :param weight_bytes: bytes per parameter of the transformer layers.
    :param head_bytes: bytes per parameter of the output head.
    :param kv_bytes: bytes per cached key/value element.
    :param compute_dtype: key of `GPUSpec.dense_flops` that bounds this model's GEMMs.
    :param extra_params: parameters outside the layers and head that every forward reads.
    """

    name: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    weight_bytes: float
    head_bytes: float
    kv_bytes: float
    compute_dtype: str
    source: str
    extra_params: int = 0

    @property
    def layer_params(self) -> int:
        """q, k, v, o projections plus the gated MLP of one layer."""
        attention = self.hidden * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        return attention + 3 * self.hidden * self.intermediate

    @property
    def body_params(self) -> int:
        return self.n_layers * self.layer_params + self.extra_params

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def weight_bytes_per_forward(self) -> float:
        """Bytes of weights one forward reads (the embedding lookup reads one row; ignored)."""
        return self.body_params * self.weight_bytes + self.head_params * self.head_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes one context token occupies (and each decode step reads)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.kv_bytes

    def flops_per_token(self, context: float) -> float:
        """FLOPs to process one token: GEMMs plus attention scores and mixing over `context`."""
        attention = 4 * self.n_layers * self.n_heads * self.head_dim * context
        return 2 * (self.body_params + self.head_params) + attention


LLAMA32_1B = TransformerSpec(
    name="meta-llama/Llama-3.2-1B-Instruct (bf16)",
    n_layers=16,
    hidden=2048,
    n_heads=32,
    n_kv_heads=8,
    head_dim=64,
    intermediate=8192,
    vocab=128256,
    weight_bytes=2,
    head_bytes=2,
    kv_bytes=2,
    compute_dtype="bf16",
    source=f"{HF_CONFIGS}: 16 layers, hidden 2048, 32 heads, 8 KV heads, MLP 8192, vocab 128256, "
    "tied embeddings (1.24B parameters); served in bf16",
)

LLAMA31_8B_FP8 = TransformerSpec(
    name="meta-llama/Llama-3.1-8B-Instruct (fp8 weights and KV cache, bf16 head)",
    n_layers=32,
    hidden=4096,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    intermediate=14336,
    vocab=128256,
    weight_bytes=1,
    head_bytes=2,
    kv_bytes=1,
    compute_dtype="fp8",
    source=f"{HF_CONFIGS}: 32 layers, hidden 4096, 32 heads, 8 KV heads, MLP 14336, vocab 128256; "
    "fp8 layers as in NVIDIA's FP8 checkpoints (output head kept in bf16)",
)

EAGLE3_DRAFT_1B = TransformerSpec(
    name="one-layer EAGLE-3-style draft for Llama-3.2-1B (bf16, 32k draft vocabulary)",
    n_layers=1,
    hidden=2048,
    n_heads=32,
    n_kv_heads=8,
    head_dim=64,
    intermediate=8192,
    vocab=32000,
    weight_bytes=2,
    head_bytes=2,
    kv_bytes=2,
    compute_dtype="bf16",
    extra_params=3 * 2048 * 2048,
    source="shape of published EAGLE-3 drafts: one decoder layer of the target's shape, a fusion "
    "layer over three target hidden states (3 x hidden -> hidden), draft vocabulary 32000 "
    "(vLLM Speculators v0.3.0 blog, Dec 2025; EAGLE-3 config of Llama-3.1-8B-Instruct on the "
    "Hugging Face hub); hypothetical for the 1B target, no such draft is published",
)


@dataclass(frozen=True)
class EngineOverheads:
    """Costs a roofline does not see, and how far kernels get from peak. All are assumptions,
    checked as a whole against the published measurements in `published_checks`."""

    bandwidth_efficiency: float = 0.85
    compute_efficiency: float = 0.6
    step_s: float = 1.0e-3
    layer_s: float = 15e-6
    spec_step_s: float = 0.2e-3
    draft_forward_s: float = 50e-6
    ngram_propose_s: float = 50e-6
    call_s: float = 5e-3

    SOURCES: ClassVar[dict[str, str]] = {
        "bandwidth_efficiency": "assumption: fraction of peak HBM bandwidth that decode GEMV "
        "kernels achieve",
        "compute_efficiency": "assumption: fraction of dense peak that small-M decode GEMMs "
        "achieve",
        "step_s": "assumption: fixed CPU+GPU cost per engine step (scheduling, input preparation, "
        "sampling); the vLLM v0.6.0 blog (Sep 2024) found such CPU work dominated Llama-3-8B "
        "step time on one H100 before its fixes",
        "layer_s": "assumption: per-layer cost outside the roofline (norms, rotary, launch gaps)",
        "spec_step_s": "assumption: rejection sampling and bookkeeping per step when k > 0",
        "draft_forward_s": "assumption: fixed cost of each sequential draft forward",
        "ngram_propose_s": "assumption: CPU n-gram lookup per step",
        "call_s": "assumption: per-call request handling outside prefill and decode",
    }


@dataclass(frozen=True)
class RooflineModel:
    """Roofline step times of a target (and draft) on one GPU.

    :param context_tokens: representative KV context per live branch (prompt plus half a
        typical response), since a step table has no context axis.
    """

    gpu: GPUSpec = H100_SXM
    target: TransformerSpec = LLAMA32_1B
    draft: TransformerSpec = EAGLE3_DRAFT_1B
    overheads: EngineOverheads = field(default_factory=EngineOverheads)
    context_tokens: float = 400.0

    def forward_s(self, spec: TransformerSpec, batch: float, tokens: int, context: float) -> float:
        """One forward of `batch` sequences, `tokens` new tokens each, over `context` cached."""
        o = self.overheads
        read = spec.weight_bytes_per_forward + batch * context * spec.kv_bytes_per_token
        memory = read / (self.gpu.hbm_bytes_per_s * o.bandwidth_efficiency)
        peak = self.gpu.dense_flops[spec.compute_dtype] * o.compute_efficiency
        compute = batch * tokens * spec.flops_per_token(context) / peak
        return spec.n_layers * o.layer_s + max(memory, compute)

    def step_s(self, batch: float, k: int, method: str) -> float:
        """Seconds of one decode step: `batch` branches each verify k drafts (+1 token)."""
        if method not in SPEC_METHODS:
            raise ValueError(f"method must be one of {SPEC_METHODS}, got {method!r}")
        o = self.overheads
        seconds = o.step_s + self.forward_s(self.target, batch, k + 1, self.context_tokens)
        if k > 0:
            if method == "ngram":
                proposal = o.ngram_propose_s
            else:
                one = self.forward_s(self.draft, batch, 1, self.context_tokens)
                proposal = k * (o.draft_forward_s + one)
            seconds += o.spec_step_s + proposal
        return seconds

    def latency_model(
        self, batches: tuple[int, ...] = BATCH_GRID, k_grid: tuple[int, ...] = K_GRID
    ) -> LatencyModel:
        """The `LatencyModel` of this roofline for both speculative methods.

        k = 0 is decoding without speculation for both methods (on a GPU engine a draft kept
        in sync at k = 0 would cost a little more; not modelled). Prefill is charged per
        prompt token per branch at achieved compute, as `LatencyModel.prefill_time` is linear
        in n (prefix caching would share the prompt; the difference is < 50 ms at n = 64).
        """
        steps = {
            method: {
                k: StepTable(list(batches), [self.step_s(b, k, method) for b in batches])
                for k in k_grid
            }
            for method in SPEC_METHODS
        }
        o = self.overheads
        peak = self.gpu.dense_flops[self.target.compute_dtype] * o.compute_efficiency
        return LatencyModel(
            steps=steps,
            prefill_base_s=o.step_s + self.forward_s(self.target, 1, 1, 0.0),
            prefill_per_token_s=self.target.flops_per_token(0.0) / peak,
            call_overhead_s=o.call_s,
            source="roofline",
            meta={
                "gpu": self.gpu.name,
                "target": self.target.name,
                "draft": self.draft.name,
                "context_tokens": self.context_tokens,
                "formula": "step = step_s + target forward(k+1 tokens) + [k>0] (spec_step_s + "
                "proposal); forward = layers x layer_s + max(bytes / (BW x eff), "
                "FLOPs / (peak x eff))",
            },
        )

    def parameters(self) -> dict[str, dict]:
        """Every constant of this model with its source, for a profile manifest."""
        params = {
            "gpu": {"value": self.gpu.name, "source": self.gpu.source},
            "gpu_hbm_bytes_per_s": {"value": self.gpu.hbm_bytes_per_s, "source": self.gpu.source},
            "gpu_dense_flops": {"value": self.gpu.dense_flops, "source": self.gpu.source},
            "context_tokens": {
                "value": self.context_tokens,
                "source": "mean prompt tokens plus half the mean generated tokens of the "
                "profile's MATH-500 branches",
            },
        }
        for role, spec in (("target", self.target), ("draft", self.draft)):
            params[f"{role}_model"] = {
                "value": {
                    "name": spec.name,
                    "layers": spec.n_layers,
                    "hidden": spec.hidden,
                    "heads": spec.n_heads,
                    "kv_heads": spec.n_kv_heads,
                    "head_dim": spec.head_dim,
                    "intermediate": spec.intermediate,
                    "vocab": spec.vocab,
                    "weight_bytes": spec.weight_bytes,
                    "kv_bytes": spec.kv_bytes,
                    "params": spec.body_params + spec.head_params,
                },
                "source": spec.source,
            }
        for name, source in EngineOverheads.SOURCES.items():
            params[f"overhead_{name}"] = {"value": getattr(self.overheads, name), "source": source}
        return params


@dataclass(frozen=True)
class PublishedMeasurement:
    """A public H100 decode measurement the roofline must reproduce within `tolerance`."""

    name: str
    model: TransformerSpec
    batch: int
    context_tokens: float
    measured_s: float
    tolerance: float
    source: str


NIM_PAGE = (
    "NVIDIA NIM for LLMs benchmarking guide, 'Performance' page "
    "(docs.nvidia.com/nim/benchmarking/llm), Llama-3.1-8b-instruct results on H100"
)

PUBLISHED_MEASUREMENTS = (
    PublishedMeasurement(
        "Llama-3.1-8B ITL, concurrency 1 (NIM 1.8.0)",
        LLAMA31_8B_FP8,
        1,
        1000,
        4.63e-3,
        0.15,
        f"{NIM_PAGE}: ITL 4.63 ms at concurrency 1",
    ),
    PublishedMeasurement(
        "Llama-3.1-8B ITL, concurrency 1 (NIM 1.3.0)",
        LLAMA31_8B_FP8,
        1,
        1000,
        4.37e-3,
        0.15,
        f"{NIM_PAGE}: ITL 4.37 ms at concurrency 1",
    ),
    PublishedMeasurement(
        "Llama-3.1-8B ITL, concurrency 5 (NIM 1.8.0)",
        LLAMA31_8B_FP8,
        5,
        1000,
        4.58e-3,
        0.15,
        f"{NIM_PAGE}: ITL 4.58 ms at concurrency 5",
    ),
    PublishedMeasurement(
        "Llama-3.1-8B ITL, concurrency 25 (NIM 1.8.0)",
        LLAMA31_8B_FP8,
        25,
        1000,
        5.19e-3,
        0.15,
        f"{NIM_PAGE}: ITL 5.19 ms at concurrency 25",
    ),
)
"""The page gives no precision or sequence lengths for these tables. The ITL at concurrency 1
lies below the 4.8 ms that reading 16 GB of bf16 weights takes at 3.35 TB/s, so the weights
cannot be bf16; we model NVIDIA's FP8 checkpoint (fp8 layers and KV cache) and assume a
context of 1,000 tokens. Inter-token latency at steady concurrency c is one decode step at
batch c."""


def published_checks(model: RooflineModel | None = None) -> list[dict]:
    """Roofline predictions against `PUBLISHED_MEASUREMENTS`, with the same engine overheads."""
    model = model or RooflineModel()
    rows = []
    for m in PUBLISHED_MEASUREMENTS:
        check = replace(model, target=m.model, context_tokens=m.context_tokens)
        predicted = check.step_s(m.batch, 0, "ngram")
        error = predicted / m.measured_s - 1.0
        rows.append(
            {
                "name": m.name,
                "measured_ms": m.measured_s * 1e3,
                "predicted_ms": round(predicted * 1e3, 3),
                "relative_error": round(error, 4),
                "tolerance": m.tolerance,
                "ok": abs(error) <= m.tolerance,
                "source": m.source,
            }
        )
    return rows
