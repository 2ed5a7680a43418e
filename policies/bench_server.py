"""How many requests does the server answer in time as clients grow?  Batched vs one at a time.

    python -m policies.bench_server                      # 1 2 5 10 20 clients, 45 s deadlines
    python -m policies.bench_server --clients 10 --duration 60 --out runs/bench_server

One engine and one policy (the shipped default) serve two ways, in the same run:

* ``batched``: the server as shipped: every admitted call runs at once in the engine's batch
  (``engine.batch_loop``), admitted by predicted latency (``policies.admission``);
* ``serial``: the same server with ``max_calls=1``: one call at a time, any request arriving
  while one runs is refused (429), as a single-call server must.

At each concurrency level each client sends MATH-500 problems one after the other (its own
slice of the 500), each with the same deadline; after a refusal it waits what the server's
``Retry-After`` asks (at most 30 s; ``--pause-s``, 0.5 s, without one), as a polite client does,
and sends its next problem, so in both modes the engine always has work waiting.  A level runs
``--duration`` seconds (requests still in flight then are awaited and counted).  Modes alternate
within each level, so drifts in the machine's load hit both.  The clients run in their own
process.  A stress level follows (``--stress 50:8:32``: 50 clients, 8 s deadlines, answers of at
most 32 tokens, batched only): every request must be answered in time or refused within 50 ms.
Refusals of the clients' first requests, which all arrive at once, are reported apart from the
later ones, with two server-side figures (``ServerClock``): how long the app took to see the
whole burst, and the longest a refusal of it spent inside the app.  Beside it, mode ``floor``
sends the same clients to a bare FastAPI app that refuses every request at once (same error
handlers, no engine, ``FLOOR_DURATION_S``): how fast this machine's HTTP stack and client can
refuse such a burst at all.  The stress level runs once per ``--stress-clients``: "httpx" (one
pooled httpx client for all 50, as at the other levels) and "lean"
(``policies.lean_http_client``, whose docstring says why: 50 clients on one event loop queue
behind each other's client code, which real users on their own machines do not).

The deadline, 45 s by default, fits this CPU: the bundled model writes up to the engine's 256
tokens per answer at about 15 tokens/s alone,
so one call takes up to about 17 s alone and about 35 s in a batch of ten (most answers stop
sooner).

Per level and mode it prints and writes (``bench_server.json``, ``bench_server.png``):
answered in time (200 within deadline + 0.1 s) per minute, how many had an answer and how many
were right (MATH-500's gold answer, ``env.task.grading``), refused and how fast, late,
p50/p95 latency of the answered ones, the largest engine batch, the server's memory before
and after, whether any request was left in the engine, and how ``/health`` answered a probe
sent every second meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

IN_TIME_SLACK_S = 0.1
FAST_REFUSAL_S = 0.05
FLOOR_DURATION_S = 15.0
HEALTH_PERIOD_S = 1.0
ARRIVAL_BURST_S = 1.0
"""Requests sent this soon after a level starts arrive together (every client's first); their
refusals are reported apart from the rest."""


# ------------------------------------------------------------------------ client process
async def _client(http, url: str, problems: list[str], deadline: float, start: float,
                  stop_at: float, pause_s: float, max_tokens: int | None,
                  out: list) -> None:  # fmt: skip
    for problem in problems:
        if time.monotonic() >= stop_at:
            return
        body = {"model": "latency-tts-smollm2", "deadline_s": deadline,
                "messages": [{"role": "user", "content": problem}]}  # fmt: skip
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        sent = time.monotonic()
        retry_after = None
        try:
            response = await http.post(url + "/v1/chat/completions", json=body)
            status, reply = response.status_code, response.json()
            retry_after = response.headers.get("retry-after")
        except Exception as exc:  # a broken connection is a result too
            status, reply = 0, {"error": {"message": repr(exc)}}
        elapsed = time.monotonic() - sent
        tts = reply.get("tts") or {}
        out.append({
            "problem": problem, "status": status, "elapsed_s": elapsed, "sent_s": sent - start,
            "answer": tts.get("answer"), "batch_max": tts.get("batch_max"),
            "admission": (tts.get("admission") or {}).get("reason"),
            "predicted_s": (tts.get("admission") or {}).get("predicted_s"),
            "degraded": (tts.get("admission") or {}).get("degraded"),
            "error": (reply.get("error") or {}).get("code"),
        })  # fmt: skip
        if status != 200:  # as a polite client: wait what the server asks, at most 30 s
            await asyncio.sleep(min(float(retry_after), 30.0) if retry_after else pause_s)


async def _health_probe(http, url: str, start: float, stop_at: float, out: list) -> None:
    """``GET /health`` every ``HEALTH_PERIOD_S`` while the level runs: status and seconds."""
    while time.monotonic() < stop_at:
        sent = time.monotonic()
        try:
            status = (await http.get(url + "/health")).status_code
        except Exception:  # a broken connection is a result too
            status = 0
        out.append({"at_s": sent - start, "status": status, "elapsed_s": time.monotonic() - sent})
        await asyncio.sleep(HEALTH_PERIOD_S)


async def _clients(url: str, slices: list[list[str]], deadline: float, duration: float,
                   pause_s: float, max_tokens: int | None, client: str) -> dict:  # fmt: skip
    """Every client's requests (through ``client``: "httpx", one pooled ``httpx.AsyncClient``
    for all, or "lean", ``policies.lean_http_client``) and the health probe's (httpx)."""
    import httpx

    from policies.lean_http_client import LeanClient

    out: list[dict] = []
    health: list[dict] = []
    limits = httpx.Limits(max_connections=len(slices) + 1)  # one more for the health probe
    async with httpx.AsyncClient(limits=limits, timeout=deadline + 30.0) as http:
        calls = http if client == "httpx" else LeanClient(timeout=deadline + 30.0)
        await http.get(url + "/health")
        start = time.monotonic()
        probe = asyncio.create_task(_health_probe(http, url, start, start + duration, health))
        await asyncio.gather(*(_client(calls, url, s, deadline, start, start + duration,
                                       pause_s, max_tokens,
                                       out) for s in slices))  # fmt: skip
        await probe
    return {"requests": out, "health": health}


def _client_process(url, slices, deadline, duration, pause_s, max_tokens, client, path) -> None:
    results = asyncio.run(_clients(url, slices, deadline, duration, pause_s, max_tokens, client))
    Path(path).write_text(json.dumps(results))


# ------------------------------------------------------------------------ server side
class ServerClock:
    """ASGI middleware: when each HTTP request reached the app and when its response began, on
    the server's monotonic clock.  A refusal that reaches the client late either waited before
    the app saw it (the HTTP intake on the event loop) or in the app: this tells which."""

    def __init__(self, app) -> None:
        self.app, self.records = app, []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = {"path": scope["path"], "in": time.monotonic()}
        self.records.append(record)

        async def timed_send(message) -> None:
            if message["type"] == "http.response.start":
                record["out"], record["status"] = time.monotonic(), message["status"]
            await send(message)

        await self.app(scope, receive, timed_send)


def intake_summary(records: list[dict], path: str = "/v1/chat/completions") -> dict:
    """Of the completions that reached the app within ``ARRIVAL_BURST_S`` of the first (the
    clients' first requests): how long the app took to see all of them (last arrival - first)
    and the longest a refusal among them spent inside the app."""
    calls = [r for r in records if r["path"] == path]
    if not calls:
        return {"burst_intake_s": None, "burst_refusal_in_app_max_s": None}
    first = min(r["in"] for r in calls)
    burst = [r for r in calls if r["in"] < first + ARRIVAL_BURST_S]
    refused = [r["out"] - r["in"] for r in burst if r.get("status") == 429]
    return {"burst_intake_s": max(r["in"] for r in burst) - first,
            "burst_refusal_in_app_max_s": max(refused, default=None)}  # fmt: skip


class _Server:
    """A uvicorn server for an app, in a thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.uv = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        while not self.uv.started:
            time.sleep(0.05)
        port = self.uv.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=60)


def refusal_floor_app():
    """A FastAPI app that refuses every completion at once (429, the server's error shape), with
    no engine behind it: the floor of the stress level's refusal times on this machine."""
    from fastapi import FastAPI
    from starlette.responses import JSONResponse

    from policies.openai_api import APIError, install_error_handlers, read_json

    async def health(_) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def refuse(request) -> None:
        await read_json(request, 1_000_000)
        raise APIError(429, "server busy (floor: every request is refused)", "overloaded_error",
                       "deadline_s", "engine_busy", {"retry-after": "1"})  # fmt: skip

    app = FastAPI()
    install_error_handlers(app)
    # plain routes: this module imports FastAPI lazily, so annotations could not be resolved
    app.router.add_route("/health", health, methods=["GET"])
    app.router.add_route("/v1/chat/completions", refuse, methods=["POST"])
    return app


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _level(app, clients, deadline, duration, pause_s, max_tokens, problems, client,
           workdir) -> dict:  # fmt: skip
    clock = ServerClock(app)
    server = _Server(clock)
    slices = [problems[i::clients] for i in range(clients)]
    path = Path(workdir) / f"clients-{clients}.json"
    ctx = multiprocessing.get_context("spawn")
    work = (server.url, slices, deadline, duration, pause_s, max_tokens, client, str(path))
    proc = ctx.Process(target=_client_process, args=work)
    proc.start()
    proc.join()
    server.stop()
    if proc.exitcode != 0:
        raise SystemExit(f"the client process failed (exit {proc.exitcode})")
    return {**json.loads(path.read_text()), "server": clock.records}


def health_summary(checks: list[dict]) -> dict:
    """How ``/health`` answered during a level: checks, how many said 200, the slowest."""
    return {
        "health_checks": len(checks),
        "health_ok": sum(c["status"] == 200 for c in checks),
        "health_max_s": max((c["elapsed_s"] for c in checks), default=None),
    }


def summarize(results: list[dict], deadline: float, duration: float, gold: dict) -> dict:
    """The figures of one level and mode (see the module docstring)."""
    from env.task.grading import matches_gold

    ok = [r for r in results if r["status"] == 200]
    in_time = [r for r in ok if r["elapsed_s"] <= deadline + IN_TIME_SLACK_S]
    refused = [r for r in results if r["status"] == 429]
    latencies = sorted(r["elapsed_s"] for r in ok)
    ratios = [r["predicted_s"] / r["elapsed_s"] for r in ok if r.get("predicted_s")]
    refusal_s = sorted(r["elapsed_s"] for r in refused)
    burst_s = [r["elapsed_s"] for r in refused if r["sent_s"] < ARRIVAL_BURST_S]
    after_s = [r["elapsed_s"] for r in refused if r["sent_s"] >= ARRIVAL_BURST_S]

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    return {
        "requests": len(results),
        "answered_in_time": len(in_time),
        "answered_in_time_share": len(in_time) / max(len(results), 1),
        "answered_in_time_per_min": 60.0 * len(in_time) / duration,
        "with_answer": sum(r["answer"] is not None for r in in_time),
        "correct": sum(
            matches_gold(gold[r["problem"]], r["answer"])
            for r in in_time
            if r["answer"] is not None
        ),
        "refused": len(refused),
        "refusal_p95_s": pct(refusal_s, 0.95),
        "refusal_max_s": refusal_s[-1] if refusal_s else None,
        "refused_within_50ms": sum(t <= FAST_REFUSAL_S for t in refusal_s),
        "refusal_burst_max_s": max(burst_s, default=None),
        "refusal_after_burst_max_s": max(after_s, default=None),
        "late": len(ok) - len(in_time),
        "errors": sum(r["status"] not in (200, 429) for r in results),
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p95_s": pct(latencies, 0.95),
        "batch_max": max((r["batch_max"] or 0 for r in ok), default=0),
        "degraded": sum(bool(r.get("degraded")) for r in ok),
        "predicted_over_actual_p50": statistics.median(ratios) if ratios else None,
    }


def _mode_label(row: dict) -> str:
    """The mode, and at the stress level the client that measured it."""
    return f"{row['mode']} ({row['client']})" if row.get("stress") else row["mode"]


def _table(rows: list[dict]) -> str:
    head = ("| clients | mode | deadline s | requests | in time | in time / min | with answer | "
            "correct | refused | refusal p95 ms | refusal max ms: arrival burst / after | late | "
            "p50 s | p95 s | batch max |")  # fmt: skip
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        s = r["summary"]

        def ms(v):
            return "-" if v is None else f"{1000 * v:.0f}"

        def sec(v):
            return "-" if v is None else f"{v:.1f}"

        lines.append(
            f"| {r['clients']} | {_mode_label(r)} | {r['deadline_s']:g} | {s['requests']} | "
            f"{s['answered_in_time']} ({s['answered_in_time_share']:.0%}) | "
            f"{s['answered_in_time_per_min']:.1f} | {s['with_answer']} | {s['correct']} | "
            f"{s['refused']} | {ms(s['refusal_p95_s'])} | {ms(s['refusal_burst_max_s'])} / "
            f"{ms(s['refusal_after_burst_max_s'])} | {s['late']} | "
            f"{sec(s['latency_p50_s'])} | {sec(s['latency_p95_s'])} | {s['batch_max']} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    """Throughput and latency against clients; and the stress level's slowest refusals (arrival
    burst and later) per mode and client, against the 50 ms target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.2))
    for mode in ("batched", "serial"):
        mine = [r for r in rows if r["mode"] == mode and not r.get("stress")]
        x = [r["clients"] for r in mine]
        left.plot(x, [r["summary"]["answered_in_time_per_min"] for r in mine], "o-", label=mode)
        middle.plot(x, [r["summary"]["latency_p95_s"] or 0 for r in mine], "o-", label=mode)
    left.set(xlabel="concurrent clients", ylabel="answered within deadline per minute",
             title="Throughput in time")  # fmt: skip
    middle.set(xlabel="concurrent clients", ylabel="p95 latency of answered requests (s)",
               title="Latency")  # fmt: skip
    stress = [r for r in rows if r.get("stress")]
    at = range(len(stress))
    for shift, key, label in ((-0.2, "refusal_burst_max_s", "arrival burst"),
                              (0.2, "refusal_after_burst_max_s", "later")):  # fmt: skip
        right.bar([i + shift for i in at], [1000 * (r["summary"][key] or 0) for r in stress],
                  width=0.4, label=label)  # fmt: skip
    right.axhline(1000 * FAST_REFUSAL_S, color="k", ls="--", lw=1, label="target 50 ms")
    right.set_xticks(list(at), [_mode_label(r).replace(" (", "\n(") for r in stress])
    clients = stress[0]["clients"] if stress else "-"
    right.set(ylabel="slowest refusal (ms)", title=f"Refusals at {clients} clients")
    for ax in (left, middle, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("policies.bench_server: one engine, bundled SmolLM2-135M on this CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", default=None, help="policy folder (default: shipped)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument("--deadline", type=float, default=45.0, help="seconds per request")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per level/mode")
    parser.add_argument("--pause-s", type=float, default=0.5, help="client pause after a 429")
    parser.add_argument("--max-tokens", type=int, default=256, help="engine limit per branch")
    parser.add_argument(
        "--stress",
        default="50:8:32",
        help="CLIENTS:DEADLINE:MAX_TOKENS of the stress level, batched ('' = none)",
    )
    parser.add_argument(
        "--stress-clients",
        nargs="+",
        default=["httpx", "lean"],
        choices=["httpx", "lean"],
        help="HTTP clients the stress level runs with, each in turn (policies.lean_http_client)",
    )
    parser.add_argument("--calibrate-s", type=float, default=60.0)
    parser.add_argument("--modes", nargs="+", default=["serial", "batched"],
                        choices=["serial", "batched"])  # fmt: skip
    parser.add_argument("--out", default="runs/bench_server")
    args = parser.parse_args(argv)
    if min(args.clients) < 1 or args.deadline <= 0 or args.duration <= 0:
        parser.error("--clients must be >= 1, --deadline and --duration > 0")

    from env.paths import policies_dir
    from env.task.problems import load_math500
    from policies.server import create_app, serving_parts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = load_math500("bundled")
    texts = [p.problem for p in problems]
    gold = {p.problem: p.answer for p in problems}
    controller, latency = serving_parts(
        args.policy or policies_dir() / "default",
        max_tokens=args.max_tokens,
        calibrate_s=args.calibrate_s,
    )
    max_calls = {"batched": 64, "serial": 1}
    engine = controller.engine
    levels = [(c, args.deadline, None, False) for c in args.clients]
    if args.stress:
        clients, deadline, tokens = args.stress.split(":")
        levels.append((int(clients), float(deadline), int(tokens), True))
    rows = []
    runs = [(level, mode, client)
            for level in levels
            for mode in (["floor", "batched"] if level[3] else args.modes)
            for client in (args.stress_clients if level[3] else ["httpx"])]  # fmt: skip
    for (clients, deadline, request_tokens, stress), mode, client in runs:
        rss_before = _rss_mb()
        started = time.monotonic()
        floor = mode == "floor"  # else a fresh service
        app = (
            refusal_floor_app()
            if floor
            else create_app(controller, latency, max_calls=max_calls[mode])
        )
        duration = FLOOR_DURATION_S if floor else args.duration
        results = _level(app, clients, deadline, duration, args.pause_s, request_tokens,
                         texts, client, out)  # fmt: skip
        row = {
            "clients": clients, "mode": mode, "client": client, "deadline_s": deadline,
            "stress": stress,
            "request_max_tokens": request_tokens,
            "wall_s": time.monotonic() - started,
            "summary": {**summarize(results["requests"], deadline, duration, gold),
                        **health_summary(results["health"]),
                        **intake_summary(results["server"])},
            "engine_left_requests": engine.has_unfinished_requests(),
            "rss_mb_before": rss_before, "rss_mb_after": _rss_mb(),
            "latency_factors": {f"{key.method}/{key.k}": round(f, 3)
                                for key, f in latency.correction.factors().items()},
        }  # fmt: skip
        rows.append(row)
        print(_table([row]).splitlines()[-1], flush=True)
        summary = row["summary"]
        slowest = summary["health_max_s"] or 0.0
        print(f"  /health: {summary['health_ok']} of {summary['health_checks']} answered "
              f"200, slowest {1000 * slowest:.0f} ms", flush=True)  # fmt: skip
        if summary["burst_refusal_in_app_max_s"] is not None:
            print(f"  arrival burst: the app saw it over {1000 * summary['burst_intake_s']:.0f}"
                  f" ms; a refusal spent at most "
                  f"{1000 * summary['burst_refusal_in_app_max_s']:.1f} ms in the app",
                  flush=True)  # fmt: skip
    report = {
        "command": "python -m policies.bench_server " + " ".join(argv or sys.argv[1:]),
        "cpu_count": os.cpu_count(),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows,
    }
    tmp = out / "bench_server.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "bench_server.json")
    _plot(rows, out / "bench_server.png")
    print(_table(rows))
    by = {(r["clients"], r["mode"]): r["summary"] for r in rows if not r["stress"]}
    for clients in args.clients:
        if (clients, "serial") in by and (clients, "batched") in by:
            serial = by[clients, "serial"]["answered_in_time_per_min"]
            batched = by[clients, "batched"]["answered_in_time_per_min"]
            ratio = batched / serial if serial else float("inf")
            print(f"{clients} clients: batched answers {ratio:.2f}x as many in time as serial")
    print(f"wrote {out / 'bench_server.json'} and {out / 'bench_server.png'}")


if __name__ == "__main__":
    main()
