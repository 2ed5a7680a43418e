"""Spec sheets the roofline prices: GPU peaks and Llama-style model shapes, each with its
source. Kept apart from `env.synthetic.roofline` (the cost model) and imported from there."""

from __future__ import annotations

from dataclasses import dataclass

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

H200_SXM = GPUSpec(
    name="NVIDIA H200 SXM",
    hbm_bytes_per_s=4.8e12,
    dense_flops={"bf16": 989.4e12, "fp8": 1978.9e12},
    source=(
        "NVIDIA H200 Tensor Core GPU datasheet, SXM column: 4.8 TB/s HBM3e; the H100's 1,979 "
        "TFLOPS BF16 and 3,958 TFLOPS FP8 with sparsity (989 and 1,979 dense)"
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
