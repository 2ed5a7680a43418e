"""Time Llama-3.2-1B decode and verification steps on a GPU: the measurement the roofline's
batched-verification cost is fitted to (issue 12).

A speculative step runs the target over w = k + 1 tokens of every live branch (w = 1 is plain
decoding). The roofline priced that as max(memory time, compute time), which predicts almost no
extra cost until batch x w tokens make the step compute-bound; an independent H100 measurement
found batch-64 verification 2-3x a plain step. No vLLM runs here, but the cost in question is the
target's forward, which plain PyTorch reproduces: the real layer shapes, random bf16 weights (the
values do not change the arithmetic), a KV cache holding `context` tokens per branch that each
step appends to and attends over (torch SDPA, GQA, causal among the w new tokens), logits for all
batch x w positions (verification needs every one). As in vLLM, the model is compiled
(`torch.compile` fuses norms, rotary, SiLU and residuals) and each configuration is captured once
as a CUDA graph and replayed. A second stage adds what sampling costs per position (fp32 softmax
over the vocabulary and the exponential race vLLM samples with).

Only torch and the standard library are imported, so the file also runs where the project's
dependencies are absent: ``python env/synthetic/gpu_step_bench.py --out PATH`` (or
``python -m env.synthetic.gpu_step_bench --out PATH`` in the project's environment).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(frozen=True)
class DecoderShape:
    """Layer shapes of a Llama-style decoder with tied embeddings (mirrors the roofline's
    `TransformerSpec` of the same model; a test keeps the two equal)."""

    layers: int = 16
    hidden: int = 2048
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 64
    intermediate: int = 8192
    vocab: int = 128256


LLAMA32_1B_SHAPE = DecoderShape()
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WIDTHS = tuple(range(1, 11))
CONTEXTS = (512, 1024)
STAGES = ("forward", "forward+sampler")


class Decoder:
    """Random-weight decoder and a static KV cache (`allocate_cache`) per batch size."""

    def __init__(self, shape: DecoderShape, device: str) -> None:
        s, dt = shape, torch.bfloat16
        self.shape, self.device = s, device
        qkv_rows = (s.heads + 2 * s.kv_heads) * s.head_dim
        self.embed = self._random(s.vocab, s.hidden)
        self.layers = [
            {
                "qkv": self._random(qkv_rows, s.hidden),
                "o": self._random(s.hidden, s.heads * s.head_dim),
                "gate_up": self._random(2 * s.intermediate, s.hidden),
                "down": self._random(s.hidden, s.intermediate),
                "norm1": torch.ones(s.hidden, device=device, dtype=dt),
                "norm2": torch.ones(s.hidden, device=device, dtype=dt),
            }
            for _ in range(s.layers)
        ]
        self.norm = torch.ones(s.hidden, device=device, dtype=dt)
        half = s.head_dim // 2
        self.inv_freq = 1.0 / (500000.0 ** (torch.arange(half, device=device) / half))
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.step = self.forward

    def compile(self) -> None:
        """Fuse the element-wise work (norms, rotary, SiLU, residuals) with torch.compile, as
        vLLM compiles its models before capturing CUDA graphs; dynamic shapes so that one
        compilation serves every batch and width."""
        self.step = torch.compile(self.forward, dynamic=True)

    def _random(self, *size: int) -> torch.Tensor:
        return torch.randn(*size, device=self.device, dtype=torch.bfloat16) * 0.02

    def allocate_cache(self, batch: int, max_context: int) -> None:
        """A KV cache of random (never zero) entries for `batch` branches."""
        self.k_cache, self.v_cache = [], []  # free the previous batch's cache first
        size = (batch, self.shape.kv_heads, max_context, self.shape.head_dim)
        self.k_cache = [self._random(*size) for _ in range(self.shape.layers)]
        self.v_cache = [self._random(*size) for _ in range(self.shape.layers)]

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [1, width, 1, head_dim] of the rotary embedding, once per step."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], -1)[None, :, None, :]
        return angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)

    def forward(self, ids: torch.Tensor, context: int, attend: Attention) -> torch.Tensor:
        """Logits [batch x width, vocab] of one step over `ids` [batch, width] whose KV is
        appended after `context` cached tokens."""
        s = self.shape
        batch, width = ids.shape
        end = context + width
        cos, sin = self.rotary(torch.arange(context, end, device=ids.device))
        mask = attend.mask(width, end, s.heads // s.kv_heads, ids.device)
        x = self.embed[ids.reshape(-1)]
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (s.hidden,), layer["norm1"], 1e-5)
            qkv = (h @ layer["qkv"].T).view(batch, width, -1, s.head_dim)
            qk = qkv[:, :, : s.heads + s.kv_heads]
            half1, half2 = qk.chunk(2, dim=-1)
            qk = qk * cos + torch.cat([-half2, half1], -1) * sin
            q, k = qk.split([s.heads, s.kv_heads], dim=2)
            self.k_cache[i][:, :, context:end] = k.transpose(1, 2)
            self.v_cache[i][:, :, context:end] = qkv[:, :, s.heads + s.kv_heads :].transpose(1, 2)
            out = attend(q, self.k_cache[i][:, :, :end], self.v_cache[i][:, :, :end], mask)
            x = x + out.reshape(batch * width, -1) @ layer["o"].T
            h = F.rms_norm(x, (s.hidden,), layer["norm2"], 1e-5)
            gate, up = (h @ layer["gate_up"].T).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer["down"].T
        return F.rms_norm(x, (s.hidden,), self.norm, 1e-5) @ self.embed.T


class Attention:
    """SDPA over the KV cache: q [B, w, H, d], keys/values [B, Hkv, S, d] -> [B, w, H, d].
    The w queries are the last w positions of S and see keys causally (lower-right).

    Layout "gqa" passes grouped heads to SDPA (`enable_gqa`); layout "packed" folds the query
    heads of each KV group into the query axis, as decode kernels pack GQA, so each KV head
    is read once. The mask is built once per step (`mask`), not per layer.
    """

    def __init__(self, layout: str, backend: SDPBackend) -> None:
        self.layout, self.backend = layout, backend

    def mask(self, width: int, span: int, per: int, device: torch.device | str):
        """None, or the mask of w queries (x `per` packed heads) over `span` keys."""
        if width == 1:
            return None
        if self.layout == "gqa":
            from torch.nn.attention.bias import causal_lower_right

            return causal_lower_right(width, span)
        row_pos = span - width + torch.arange(width * per, device=device) // per
        return torch.arange(span, device=device)[None, :] <= row_pos[:, None]

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask):
        if self.layout == "gqa":
            with sdpa_kernel(self.backend):
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True
                )
            return out.transpose(1, 2)
        batch, width, heads, dim = q.shape
        groups = keys.shape[1]
        per = heads // groups
        packed = q.view(batch, width, groups, per, dim).permute(0, 2, 1, 3, 4)
        packed = packed.reshape(batch, groups, width * per, dim)
        with sdpa_kernel(self.backend):
            out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask)
        out = out.view(batch, groups, width, per, dim).permute(0, 2, 1, 3, 4)
        return out.reshape(batch, width, heads, dim)


def attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    """fp32 textbook attention, the check every candidate must match."""
    per = q.shape[2] // keys.shape[1]
    k = keys.float().repeat_interleave(per, dim=1)
    v = values.float().repeat_interleave(per, dim=1)
    qt = q.float().transpose(1, 2)
    scores = qt @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    width, span = q.shape[1], keys.shape[2]
    allowed = (
        torch.arange(span, device=q.device)[None, :]
        <= (span - width + torch.arange(width, device=q.device))[:, None]
    )
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def candidate_attentions() -> dict[str, Attention]:
    """Every (layout, SDPA backend) pair worth trying; `choose_attention` keeps the fastest
    that is correct on this machine."""
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return {
        f"{layout}/{name}": Attention(layout, backend)
        for layout in ("gqa", "packed")
        for name, backend in backends.items()
    }


def time_ms(fn: Callable[[], object], replays: int, repeats: int) -> tuple[float, float, float]:
    """Median, min and max over `repeats` of the mean ms per call of `replays` calls (CUDA
    events on a GPU, the host clock on CPU)."""
    samples = []
    for _ in range(repeats):
        if not torch.cuda.is_available():
            started = time.perf_counter()
            for _ in range(replays):
                fn()
            samples.append((time.perf_counter() - started) * 1e3 / replays)
            continue
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            fn()
        stop.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(stop) / replays)
    return statistics.median(samples), min(samples), max(samples)


def choose_attention(device: str) -> tuple[str, list[dict]]:
    """Check each candidate against the fp32 reference (w = 1 and w = 4) and time it at batch
    64, w = 4, 1,024 context; return the fastest correct one and the whole survey."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device, generator=gen).to(torch.bfloat16)

    survey = []
    for name, attend in candidate_attentions().items():
        row: dict = {"name": name}
        try:
            for width in (1, 4):
                q, k, v = (
                    rand(3, width, 32, 64),
                    rand(3, 8, 37 + width, 64),
                    rand(3, 8, 37 + width, 64),
                )
                ref = attention_reference(q, k, v)
                out = attend(q, k, v, attend.mask(width, k.shape[2], 4, device))
                err = (out.float() - ref).norm() / ref.norm()
                if not err < 2e-2:
                    raise ValueError(f"relative error {float(err):.3g} at w={width}")
            q, k, v = rand(64, 4, 32, 64), rand(64, 8, 1028, 64), rand(64, 8, 1028, 64)
            mask = attend.mask(4, k.shape[2], 4, device)
            call = lambda f=attend, q=q, k=k, v=v, m=mask: f(q, k, v, m)  # noqa: E731
            row["ms_b64_w4_ctx1024"] = round(time_ms(call, 20, 3)[0], 4)
            row["ok"] = True
        except Exception as error:  # a backend may refuse a layout: record why
            row.update(ok=False, error=f"{type(error).__name__}: {error}"[:300])
        survey.append(row)
    good = [r for r in survey if r["ok"]]
    if not good:
        raise RuntimeError(f"no attention candidate works here: {survey}")
    return min(good, key=lambda r: r["ms_b64_w4_ctx1024"])["name"], survey


def sample(logits: torch.Tensor) -> torch.Tensor:
    """One token per position as vLLM's sampler draws it: fp32 softmax at temperature 0.8,
    then the exponential race argmax(p / Exp(1)); rejection sampling reads the same probs."""
    probs = (logits.float() / 0.8).softmax(-1)
    race = torch.empty_like(probs).exponential_()
    return (probs / race).argmax(-1)


def graphed_step(
    model: Decoder, batch: int, width: int, context: int, attend: Attention, stage: str
) -> Callable[[], None]:
    """A replay of one step captured as a CUDA graph (on CPU: the step itself)."""
    ids = torch.randint(0, model.shape.vocab, (batch, width), device=model.device)

    def step() -> torch.Tensor:
        logits = model.step(ids, context, attend)
        return sample(logits) if stage == "forward+sampler" else logits

    if model.device == "cpu":
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def check_graph_matches_eager(model: Decoder, attend: Attention) -> float:
    """Relative difference between a graph replay of the step (compiled where compiled) and
    the eager forward on the same inputs: bf16 rounding differs, a wrong kernel would not."""
    ids = torch.randint(0, model.shape.vocab, (4, 3), device=model.device)
    eager = model.forward(ids, 100, attend).float()
    static_ids = ids.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model.step(static_ids, 100, attend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model.step(static_ids, 100, attend)
    graph.replay()
    torch.cuda.synchronize()
    return float((out.float() - eager).norm() / eager.norm())


def ceilings(device: str) -> dict:
    """Achieved copy bandwidth (bytes read + written) and large bf16 GEMM rate, the two
    ceilings the fitted efficiencies are read against."""
    src = torch.randn(2**30, device=device, dtype=torch.float32)  # 4 GiB
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), 5, 3)[0]
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = time_ms(lambda: a @ b, 10, 3)[0]
    return {
        "copy_bytes_per_s": round(2 * 4 * 2**30 / (copy_ms / 1e3), -9),
        "bf16_matmul_flops_8192": round(2 * 8192**3 / (mm_ms / 1e3), -11),
    }


def device_info(device: str) -> dict:
    """What ran: GPU, driver clocks as nvidia-smi reports them, torch and CUDA versions."""
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device != "cpu":
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, sms=props.multi_processor_count)
        query = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit"
        try:
            smi = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            info["nvidia_smi"] = {"query": query, "answer": smi.stdout.strip()}
        except OSError as error:
            info["nvidia_smi"] = {"error": str(error)}
    return info


def time_config(
    model: Decoder, batch: int, width: int, context: int, attend: Attention, stage: str
) -> dict:
    """One row of the grid: ms per step, replays sized to ~30 ms per timed block."""
    replay = graphed_step(model, batch, width, context, attend, stage)
    estimate = time_ms(replay, 3, 1)[0]
    replays = max(3, min(50, int(30 / max(estimate, 1e-3))))
    median, low, high = time_ms(replay, replays, 5)
    return {
        "batch": batch,
        "width": width,
        "context": context,
        "stage": stage,
        "ms": round(median, 5),
        "ms_min": round(low, 5),
        "ms_max": round(high, 5),
        "replays": replays,
    }


def run_grid(model: Decoder, attend: Attention, grid: dict, out_path: str, result: dict) -> None:
    """Every (batch, context, width, stage) of `grid`, saved after each batch size so that a
    run cut short keeps what it measured."""
    max_context = max(grid["contexts"]) + max(grid["widths"])
    for batch in grid["batches"]:
        model.allocate_cache(batch, max_context)
        for context in grid["contexts"]:
            stages = grid["stages"] if context == max(grid["contexts"]) else ("forward",)
            for width in grid["widths"]:
                for stage in stages:
                    try:
                        row = time_config(model, batch, width, context, attend, stage)
                    except Exception as error:  # keep the rest of the grid
                        row = {"batch": batch, "width": width, "context": context}
                        row.update(stage=stage, error=f"{type(error).__name__}: {error}"[:500])
                    result["rows"].append(row)
                    if model.device != "cpu":
                        torch.cuda.empty_cache()
        print(f"batch {batch}: done at {time.monotonic() - result['_started']:.0f}s", flush=True)
        save(result, out_path)


def save(result: dict, out_path: str) -> None:
    clean = {k: v for k, v in result.items() if not k.startswith("_")}
    with open(out_path, "w") as f:
        json.dump(clean, f, indent=1)
        f.write("\n")


def print_table(rows: list[dict], context: int, stage: str = "forward") -> None:
    """ms per step at one context, and each width's ratio to the plain (w = 1) step."""
    table = {
        (r["batch"], r["width"]): r["ms"]
        for r in rows
        if r["context"] == context and r["stage"] == stage and "ms" in r
    }
    widths = sorted({w for _, w in table})
    print(f"\n{stage}, context {context}: ms per step (ratio to width 1)")
    print("batch " + "".join(f"{'w=' + str(w):>14s}" for w in widths))
    for batch in sorted({b for b, _ in table}):
        plain = table.get((batch, 1), math.nan)
        times = [table.get((batch, w), math.nan) for w in widths]
        cells = "".join(f"{ms:7.3f} ({ms / plain:4.2f})" for ms in times)
        print(f"{batch:5d} {cells}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--tiny", action="store_true", help="a toy shape, to test on CPU")
    parser.add_argument(
        "--eager", action="store_true", help="skip torch.compile (unfused element-wise kernels)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64  # a few specialisations (batch or width 1)
    shape = DecoderShape(2, 64, 4, 2, 16, 128, 1000) if args.tiny else LLAMA32_1B_SHAPE
    grid = {
        "batches": args.batches,
        "widths": args.widths,
        "contexts": args.contexts,
        "stages": args.stages,
    }
    result: dict = {
        "_started": time.monotonic(),
        "schema": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.argv[0], *sys.argv[1:]]),
        "shape": asdict(shape),
        "grid": grid,
        "device": device_info(device),
        "rows": [],
    }
    if device != "cpu":
        result["ceilings"] = ceilings(device)
    chosen, survey = choose_attention(device)
    result["attention"] = {"chosen": chosen, "survey": survey}
    attend = candidate_attentions()[chosen]
    model = Decoder(shape, device)
    result["compiled"] = not args.eager
    if not args.eager:
        model.compile()
    if device != "cpu":
        model.allocate_cache(4, 128)
        try:
            result["graph_vs_eager_relative_difference"] = check_graph_matches_eager(model, attend)
        except Exception as error:  # compilation can fail on a new stack: measure eager then
            result["compile_error"] = f"{type(error).__name__}: {error}"[:1000]
            result["compiled"], model.step = False, model.forward
            result["graph_vs_eager_relative_difference"] = check_graph_matches_eager(model, attend)
    shown = ("device", "attention", "compiled", "graph_vs_eager_relative_difference")
    print(json.dumps({k: result.get(k) for k in shown}, indent=1), flush=True)
    result["timing"] = (
        "CUDA graph of one step replayed; ms = median over 5 blocks of the mean "
        "per replay (replays per block sized to ~30 ms); forward+sampler only at "
        "the largest context"
    )
    run_grid(model, attend, grid, args.out, result)
    print_table(result["rows"], max(grid["contexts"]))
    return result


if __name__ == "__main__":
    main()
