"""Should the server run one problem at a time or batch several?  Measure it on this engine.

    python -m policies.bench_server [--n 4] [--tokens 32] [--repeats 3]

Two requests (two MATH-500 problems, n branches each, exactly ``tokens`` tokens per branch so
that the work is fixed) are served three ways:

* serial: one call after the other, as ``policies.server`` does;
* threads: both calls issued at once from two threads; the engine's lock serialises them, so
  this shows that concurrency without merging gains nothing;
* merged: one call with 2n branches, the best case for batching two problems together (same
  batch, same lengths; the engine's run takes one prompt, so both halves use problem A's).

It prints when each request finished (the second is the total wall time) and their mean
latency, medians over the repeats.  Batching
only pays when a step with 2n sequences costs much less than two steps with n; even then both
requests finish at the merged time (the first one later than when served alone), and merged
problems must share one k, which defeats choosing k per problem.

The README records the measured figures and the decision they support.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from engine.vllm_engine import EngineConfig, VLLMEngine
from env.task.problems import load_math500
from env.task.prompt import build_user_message


def _fixed_work(engine: VLLMEngine, prompt: str, n: int, tokens: int) -> None:
    """One call of exactly ``tokens`` tokens per branch, without speculation."""
    engine.run(prompt, n=n, k=0, max_tokens=tokens, ignore_eos=True)


def _serial(engine: VLLMEngine, prompts: list[str], n: int, tokens: int) -> list[float]:
    start, done = time.monotonic(), []
    for prompt in prompts:
        _fixed_work(engine, prompt, n, tokens)
        done.append(time.monotonic() - start)
    return done


def _threads(engine: VLLMEngine, prompts: list[str], n: int, tokens: int) -> list[float]:
    start, done = time.monotonic(), [0.0] * len(prompts)

    def call(i: int) -> None:
        _fixed_work(engine, prompts[i], n, tokens)
        done[i] = time.monotonic() - start

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(done)


def _merged(engine: VLLMEngine, prompts: list[str], n: int, tokens: int) -> list[float]:
    start = time.monotonic()
    _fixed_work(engine, prompts[0], n * len(prompts), tokens)
    return [time.monotonic() - start] * len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4, help="branches per request")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per branch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    engine = VLLMEngine(EngineConfig(max_n=2 * args.n, max_tokens=args.tokens))
    prompts = [build_user_message(p.problem) for p in load_math500("bundled")[:2]]
    engine.run(prompts[0], n=2 * args.n, k=0, max_tokens=4)  # warm-up
    modes = {"serial": _serial, "threads": _threads, "merged": _merged}
    times: dict[str, list[list[float]]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):  # interleaved, so load drifts hit every mode alike
        for mode, run in modes.items():
            times[mode].append(run(engine, prompts, args.n, args.tokens))
    print(f"2 requests x n={args.n} branches x {args.tokens} tokens, k=0, median of {args.repeats}")
    print(f"{'mode':8} {'request 1 s':>12} {'request 2 s':>12} {'mean s':>8}")
    for mode, runs in times.items():
        first = statistics.median(r[0] for r in runs)
        second = statistics.median(r[1] for r in runs)
        print(f"{mode:8} {first:12.2f} {second:12.2f} {(first + second) / 2:8.2f}")
    engine.shutdown()


if __name__ == "__main__":
    main()
