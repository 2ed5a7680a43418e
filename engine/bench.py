"""Engine benchmark: wrapper overhead against raw ``LLM.generate``, and wall time against k.

    python -m engine.bench [--tokens 64] [--repeats 3] [--out runs/bench/engine.json]

Part 1 runs the same prompt, n, k and sampling through ``VLLMEngine.run`` and through vLLM's
own ``LLM.generate`` on the same engine (called on the thread that built it, as the wrapper
steps it there too: ``engine.engine_thread``), alternating the two so machine noise hits both
alike; every branch generates exactly ``--tokens`` tokens (EOS ignored) so both do the same
work.  Part 2 times ``run`` for n in {1, 4, 16} and every k with n-gram and with the bundled
self-speculative draft, and reports acceptance from vLLM's counters.  Figures are medians over
``--repeats``; this machine is noisy, so compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from engine import engine_thread
from engine.vllm_engine import EngineConfig, VLLMEngine

PROMPT = "Find the sum of all positive divisors of 36. Put the final answer in \\boxed{}."


def _raw_generate(engine: VLLMEngine, n: int, k: int, tokens: int) -> float:
    from vllm import SamplingParams

    cfg = engine.config
    params = SamplingParams(
        n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=tokens, ignore_eos=True
    )
    ids = engine.prompt_token_ids(PROMPT)
    engine.set_k(k)
    start = time.monotonic()  # on the thread that built the engine, as a plain vLLM user would
    engine_thread.call(engine.llm.generate, [{"prompt_token_ids": ids}], params, use_tqdm=False)
    return time.monotonic() - start


def measure_overhead(engine: VLLMEngine, n: int, k: int, repeats: int) -> dict:
    """Median wall time of the wrapper and of raw LLM.generate, alternating."""
    wrapper, raw = [], []
    for _ in range(repeats):
        wrapper.append(engine.run(PROMPT, n=n, k=k, ignore_eos=True).wall_s)
        raw.append(_raw_generate(engine, n, k, engine.config.max_tokens))
    w, r = statistics.median(wrapper), statistics.median(raw)
    return {"n": n, "k": k, "wrapper_s": w, "raw_s": r, "overhead_pct": 100 * (w / r - 1)}


def measure_k_sweep(engine: VLLMEngine, ns: list[int], repeats: int, bar: tqdm) -> list[dict]:
    rows = []
    for n in ns:
        for k in range(engine.config.k_max + 1):
            walls, accepted, drafted = [], 0.0, 0.0
            for _ in range(repeats):
                rollout = engine.run(PROMPT, n=n, k=k, ignore_eos=True)
                walls.append(rollout.wall_s)
                accepted += rollout.spec_counters.get("accepted_tokens", 0.0)
                drafted += rollout.spec_counters.get("draft_tokens", 0.0)
                bar.update()
            rows.append(
                {
                    "method": engine.config.method_name,
                    "n": n,
                    "k": k,
                    "wall_s": statistics.median(walls),
                    "acceptance": accepted / drafted if drafted else None,
                }
            )
    return rows


def _print_tables(result: dict) -> None:
    print("\nWrapper overhead vs raw LLM.generate (same engine, prompt, n, k, sampling)")
    print(f"{'method':<12}{'n':>4}{'k':>4}{'wrapper s':>11}{'raw s':>9}{'overhead':>10}")
    for row in result["overhead"]:
        print(
            f"{row['method']:<12}{row['n']:>4}{row['k']:>4}{row['wrapper_s']:>11.3f}"
            f"{row['raw_s']:>9.3f}{row['overhead_pct']:>9.1f}%"
        )
    print(f"\nWall time (s) against k, {result['tokens']} tokens per branch")
    print(f"{'method':<12}{'n':>4}" + "".join(f"{'k=' + str(k):>9}" for k in range(5)) + "  accept")
    by_key: dict = {}
    for row in result["k_sweep"]:
        by_key.setdefault((row["method"], row["n"]), []).append(row)
    for (method, n), rows in by_key.items():
        walls = "".join(f"{r['wall_s']:>9.2f}" for r in rows)
        acc = [r["acceptance"] for r in rows if r["acceptance"] is not None]
        accept = " ".join(f"{a:.2f}" for a in acc)
        print(f"{method:<12}{n:>4}{walls}  {accept}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per branch (EOS ignored)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--methods", nargs="+", default=["ngram", "draft_model"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/engine.json"))
    args = parser.parse_args(argv)

    result: dict = {
        "tokens": args.tokens,
        "repeats": args.repeats,
        "machine": platform.platform(),
        "overhead": [],
        "k_sweep": [],
    }
    for method in args.methods:
        config = EngineConfig(
            spec_method=method, k_max=4, max_n=max(args.n), max_tokens=args.tokens
        )
        engine = VLLMEngine(config)
        engine.run(PROMPT, n=max(args.n), k=0)  # warm-up
        total = len(args.n) * (config.k_max + 1) * args.repeats
        with tqdm(total=total, desc=f"k sweep ({method})") as bar:
            result["k_sweep"] += measure_k_sweep(engine, args.n, args.repeats, bar)
        for n, k in ((1, 0), (max(args.n), 2)):
            row = measure_overhead(engine, n, k, args.repeats)
            result["overhead"].append({"method": method, **row})
        engine.shutdown()
        _write(result, args.out)  # after each method, so a long run keeps what it measured
    _print_tables(result)
    print(f"\nwrote {args.out}")
    return result


def _write(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)


if __name__ == "__main__":
    main()
