"""What profiling 10^5 problems x 64 branches costs for a 1B, 7B and 32B target on H100s.

    python -m env.synthetic.profiling_cost            # print the table
    python -m env.synthetic.profiling_cost --write    # and refresh docs/scale_out.md's table

GPU time comes from the H100 roofline latency model (``env.synthetic.roofline``), not from a
GPU run: per problem the profiler (``env.profiles.record``) makes one call of ``n_max`` branches
at k = 0 on one replica, which lasts the prefill plus one decode step per token of its longest
branch, at a live batch that shrinks as branches finish; then a few short acceptance calls
(``spec_branches`` branches of ``spec_max_tokens`` tokens per k > 0, charged one token per
step, an upper bound).  Branch and prompt lengths are the bundled synthetic profile's
(Llama-3.2-1B-Instruct on MATH at T = 0.8, max 2,048 tokens, calibrated to public per-sample
figures); the larger targets are assumed to write answers of those lengths (an assumption:
no per-sample MATH lengths of them are bundled).  A target too large for one GPU is split
with tensor parallelism over the fewest GPUs that hold its weights and the KV cache of a
whole call (``engine.distributed.gpus_needed``); each GPU then streams and computes 1/tp of
every layer, and every layer adds two all-reduces of the step's activations over NVLink.

Storage is measured, not modelled: bytes per generated token and per branch of the journal
and of problems.parquet in the bundled real profile (data/profiles/smollm2-135m-cpu), scaled
to the run's tokens and branches (assumption: other tokenizers write about as many
characters per token on MATH).  Every constant carries its source or says it is assumed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from engine.distributed import gpus_needed
from env.paths import profiles_dir
from env.synthetic.generate import N_MAX
from env.synthetic.hardware import HF_CONFIGS, LLAMA32_1B, TransformerSpec
from env.synthetic.roofline import H100_SXM, RooflineModel

DOC = Path(__file__).resolve().parents[2] / "docs" / "scale_out.md"
BEGIN, END = "<!-- profiling-cost:begin -->", "<!-- profiling-cost:end -->"

H100_MEMORY_GB = 80.0
"""NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: 80 GB HBM3."""

NVLINK_BYTES_PER_S = 450e9
"""NVIDIA H100 datasheet: NVLink 900 GB/s per GPU, both directions together; 450 GB/s each
way is what a ring all-reduce can use."""

ALLREDUCE_LATENCY_S = 10e-6
"""Assumption: fixed cost of one small all-reduce between GPUs of one node (decode steps
exchange kilobytes to a few megabytes, so latency, not bandwidth, dominates)."""

QWEN25_7B = TransformerSpec(
    name="Qwen/Qwen2.5-7B-Instruct (bf16)",
    n_layers=28,
    hidden=3584,
    n_heads=28,
    n_kv_heads=4,
    head_dim=128,
    intermediate=18944,
    vocab=152064,
    weight_bytes=2,
    head_bytes=2,
    kv_bytes=2,
    compute_dtype="bf16",
    source=f"{HF_CONFIGS}: 28 layers, hidden 3584, 28 heads, 4 KV heads, MLP 18944, vocab "
    "152064, untied embeddings (7.6B parameters); the Qwen2.5-Math-7B shape",
)

QWEN25_32B = TransformerSpec(
    name="Qwen/Qwen2.5-32B-Instruct (bf16)",
    n_layers=64,
    hidden=5120,
    n_heads=40,
    n_kv_heads=8,
    head_dim=128,
    intermediate=27648,
    vocab=152064,
    weight_bytes=2,
    head_bytes=2,
    kv_bytes=2,
    compute_dtype="bf16",
    source=f"{HF_CONFIGS}: 64 layers, hidden 5120, 40 heads, 8 KV heads, MLP 27648, vocab "
    "152064, untied embeddings (32.5B parameters); also DeepSeek-R1-Distill-Qwen-32B's shape",
)

TARGETS = {"1B": LLAMA32_1B, "7B": QWEN25_7B, "32B": QWEN25_32B}
UNTIED_EMBEDDINGS = {"1B": False, "7B": True, "32B": True}
"""Whether the input embedding is a second vocab x hidden matrix in memory (the configs'
``tie_word_embeddings``); a forward reads one row of it, so only memory counts it."""


@dataclass(frozen=True)
class RunShape:
    """What is profiled (the recorder's settings for a large run)."""

    problems: int = 100_000
    branches: int = 64
    max_tokens: int = 2048
    k_grid: tuple[int, ...] = (0, 1, 2, 4)
    spec_branches: int = 2
    spec_max_tokens: int = 48
    methods: int = 1  # n-gram only: a large target has no bundled draft
    gpus_per_node: int = 8


@dataclass(frozen=True)
class ShardedRoofline(RooflineModel):
    """The roofline of one of ``tp`` tensor-parallel GPUs (``target`` is its shard, see
    ``shard``), plus the two all-reduces per layer that tensor parallelism adds.

    :param hidden: the whole model's hidden size (the all-reduced activation width).
    """

    tp: int = 1
    hidden: int = 0

    def step_s(self, batch: float, k: int, method: str) -> float:
        seconds = super().step_s(batch, k, method)
        if self.tp == 1:
            return seconds
        message = batch * (k + 1) * self.hidden * 2  # bf16 activations
        ring = 2 * (self.tp - 1) / self.tp * message / NVLINK_BYTES_PER_S
        return seconds + 2 * self.target.n_layers * (ALLREDUCE_LATENCY_S + ring)


def shard(spec: TransformerSpec, tp: int) -> TransformerSpec:
    """One GPU's share of ``spec`` under tensor parallelism: heads, MLP columns and the
    vocabulary-parallel head split ``tp`` ways (hidden stays whole)."""
    if tp == 1:
        return spec
    return replace(
        spec,
        name=f"{spec.name}, 1/{tp} per GPU",
        n_heads=spec.n_heads // tp,
        n_kv_heads=max(spec.n_kv_heads // tp, 1),
        intermediate=spec.intermediate // tp,
        vocab=spec.vocab // tp,
        extra_params=spec.extra_params // tp,
    )


def lengths_from_synthetic(
    name: str = "synthetic-llama32-1b-h100",
) -> tuple[np.ndarray, np.ndarray]:
    """Branch tokens (problems x branches) and prompt tokens of the bundled synthetic profile."""
    from env.profiles.store import load_profile

    rows = load_profile(name).rows
    tokens = np.array([r["branch_tokens"] for r in rows], dtype=float)
    return tokens, np.array([r["prompt_tokens"] for r in rows], dtype=float)


def storage_rates(profile: str = "smollm2-135m-cpu") -> dict:
    """Journal bytes per generated token, per branch and per problem of a real profile.

    Each problem record is split into its branch texts (per generated token), its other
    per-branch lists (answers, classes, grades, counts, times, log-probabilities: per branch)
    and the rest (problem text, gold answer, acceptance rows: per problem); problems.parquet
    and spec.parquet compress the same rows by their measured ratio to the journal.
    """
    folder = profiles_dir() / profile
    lines = [json.loads(x) for x in (folder / "journal.jsonl").read_text().splitlines() if x]
    records = [r for r in lines if r["kind"] == "problem"]
    total = text = per_branch = tokens = branches = 0
    for record in records:
        row, n = record["row"], len(record["row"]["branch_tokens"])
        total += len(json.dumps(record)) + 1
        text += len(json.dumps(row["branch_text"]))
        lists = [v for c, v in row.items() if c != "branch_text" and isinstance(v, list)]
        per_branch += sum(len(json.dumps(v)) for v in lists if len(v) == n)
        tokens += sum(row["branch_tokens"])
        branches += n
    parquet = sum((folder / f).stat().st_size for f in ("problems.parquet", "spec.parquet"))
    return {
        "profile": profile,
        "journal_bytes_per_token": text / tokens,
        "journal_bytes_per_branch": per_branch / branches,
        "journal_bytes_per_problem": (total - text - per_branch) / len(records),
        "parquet_over_journal": parquet / total,
        "problems_measured": len(records),
    }


def call_seconds(
    model: RooflineModel, tokens: np.ndarray, prompts: np.ndarray, shape: RunShape
) -> np.ndarray:
    """Predicted seconds of each problem's recording calls (k = 0 call + acceptance calls)."""
    latency = model.latency_model(k_grid=shape.k_grid)
    main = np.array([latency.predict_wall_time(t, 0, "ngram", 0.0, int(p))
                     for t, p in zip(tokens, prompts, strict=True)])  # fmt: skip
    spec = 0.0
    for k in (k for k in shape.k_grid if k > 0):
        per_step = float(latency.step_time(shape.spec_branches, k, "ngram"))
        spec += latency.call_overhead_s + shape.spec_max_tokens * per_step
    prefill = np.array([latency.prefill_time(p, shape.spec_branches) for p in prompts])
    return main + shape.methods * (spec + len([k for k in shape.k_grid if k > 0]) * prefill)


def target_cost(label: str, spec: TransformerSpec, tokens: np.ndarray, prompts: np.ndarray,
                shape: RunShape, storage: dict) -> dict:  # fmt: skip
    """One row of the cost table."""
    embedding = spec.vocab * spec.hidden if UNTIED_EMBEDDINGS[label] else 0
    weights_gb = (spec.body_params + spec.head_params + embedding) * spec.weight_bytes / 1e9
    context = float(prompts.max() + shape.max_tokens)
    kv_gb = shape.branches * context * spec.kv_bytes_per_token / 1e9
    tp = gpus_needed(weights_gb, kv_gb, H100_MEMORY_GB, divides=(spec.n_heads, spec.n_kv_heads))
    # scale the profile's 64 branches to the run's branch count by taking the first ones
    branch_tokens = np.minimum(tokens[:, : shape.branches], shape.max_tokens)
    mean_context = float(prompts.mean() + branch_tokens.mean() / 2)
    model = ShardedRoofline(gpu=H100_SXM, target=shard(spec, tp), context_tokens=mean_context,
                            tp=tp, hidden=spec.hidden)  # fmt: skip
    seconds = call_seconds(model, branch_tokens, prompts, shape)
    gpu_hours = shape.problems * float(seconds.mean()) * tp / 3600
    generated = shape.problems * float(branch_tokens.sum(axis=1).mean())
    journal = (generated * storage["journal_bytes_per_token"]
               + shape.problems * shape.branches * storage["journal_bytes_per_branch"]
               + shape.problems * storage["journal_bytes_per_problem"])  # fmt: skip
    replicas_per_node = shape.gpus_per_node // tp
    return {
        "target": label,
        "model": spec.name,
        "weights_gb": round(weights_gb, 1),
        "kv_gb_per_call": round(kv_gb, 1),
        "tensor_parallel": tp,
        "call_s_mean": round(float(seconds.mean()), 2),
        "call_s_p95": round(float(np.percentile(seconds, 95)), 2),
        "gpu_hours": round(gpu_hours, 0),
        "node_days": round(gpu_hours / shape.gpus_per_node / 24, 1),
        "replicas_per_node": replicas_per_node,
        "generated_tokens": generated,
        "journal_gb": round(journal / 1e9, 1),
        "parquet_gb": round(journal * storage["parquet_over_journal"] / 1e9, 1),
    }


def profiling_costs(shape: RunShape | None = None) -> dict:
    """The whole table with its inputs (what ``--write`` stores beside the page)."""
    shape = shape or RunShape()
    tokens, prompts = lengths_from_synthetic()
    if tokens.shape[1] < shape.branches:
        raise ValueError(f"the synthetic profile has {tokens.shape[1]} branches per problem, "
                         f"fewer than branches={shape.branches}")  # fmt: skip
    storage = storage_rates()
    rows = [target_cost(label, spec, tokens, prompts, shape, storage)
            for label, spec in TARGETS.items()]  # fmt: skip
    return {
        "shape": asdict(shape),
        "gpu": H100_SXM.name,
        "gpu_memory_gb": H100_MEMORY_GB,
        "lengths": {
            "source": "data/profiles/synthetic-llama32-1b-h100 (branch_tokens, prompt_tokens)",
            "mean_branch_tokens": round(float(np.minimum(tokens, shape.max_tokens).mean()), 1),
            "mean_prompt_tokens": round(float(prompts.mean()), 1),
        },
        "storage": storage,
        "assumptions": {
            "allreduce_latency_s": ALLREDUCE_LATENCY_S,
            "nvlink_bytes_per_s": NVLINK_BYTES_PER_S,
            "longer_targets_same_lengths": True,
            "acceptance_calls_one_token_per_step": True,
        },
        "rows": rows,
    }


def markdown_table(costs: dict) -> str:
    """The page's table (``docs/scale_out.md`` between the profiling-cost markers)."""
    s = costs["shape"]
    lines = [
        f"{s['problems']:,} problems x {s['branches']} branches (max {s['max_tokens']:,} tokens, "
        f"mean {costs['lengths']['mean_branch_tokens']:.0f}), k grid {s['k_grid']}, "
        f"{costs['gpu']}, {costs['gpu_memory_gb']:.0f} GB:",
        "",
        "| target | weights GB | KV GB per call | GPUs per replica (TP) | call s (mean / p95) "
        "| GPU-hours | days on one 8-GPU node | journal GB | parquet GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in costs["rows"]:
        lines.append(
            f"| {r['target']} ({r['model']}) | {r['weights_gb']:.1f} | {r['kv_gb_per_call']:.1f} "
            f"| {r['tensor_parallel']} | {r['call_s_mean']:.1f} / {r['call_s_p95']:.1f} "
            f"| {r['gpu_hours']:,.0f} | {r['node_days']:.1f} | {r['journal_gb']:.1f} "
            f"| {r['parquet_gb']:.1f} |"
        )
    st = costs["storage"]
    lines += [
        "",
        f"Storage rates measured on `{st['profile']}`: {st['journal_bytes_per_token']:.2f} "
        f"journal bytes per generated token + {st['journal_bytes_per_branch']:.0f} per branch "
        f"+ {st['journal_bytes_per_problem']:,.0f} per problem (problem text, acceptance runs); "
        f"the parquet tables are {st['parquet_over_journal']:.2f}x the journal.",
    ]
    return "\n".join(lines)


def write_doc(costs: dict, doc: Path = DOC) -> Path:
    """Replace the table between the markers of ``doc`` (atomically) and store the JSON."""
    from env.profiles.store import _atomic_write_bytes, write_json

    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{doc} has no {BEGIN} ... {END} block to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{markdown_table(costs)}\n{END}{tail}"
    _atomic_write_bytes(doc, lambda tmp: Path(tmp).write_text(new))
    write_json(doc.with_name("scale_out_costs.json"), costs)
    return doc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=100_000)
    parser.add_argument("--branches", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--write", action="store_true", help="refresh docs/scale_out.md's table")
    args = parser.parse_args(argv)
    if args.problems < 1 or not 1 <= args.branches <= N_MAX or args.max_tokens < 1:
        parser.error(
            f"--problems >= 1, --branches in 1..{N_MAX} (the synthetic profile's), "
            "--max-tokens >= 1"
        )
    costs = profiling_costs(RunShape(problems=args.problems, branches=args.branches,
                                     max_tokens=args.max_tokens))  # fmt: skip
    print(markdown_table(costs))
    if args.write:
        print(f"wrote {write_doc(costs)}")


if __name__ == "__main__":
    main()
