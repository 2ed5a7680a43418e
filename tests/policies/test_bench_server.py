"""The serving benchmark's figures from client records (the benchmark itself needs minutes of
engine time and runs as ``python -m policies.bench_server``)."""

from __future__ import annotations

import pytest

from policies.bench_server import ServerClock, health_summary, intake_summary, summarize


def _record(
    status,
    elapsed,
    answer=None,
    problem="p1",
    batch_max=3,
    admission="fits",
    degraded=False,
    sent=5.0,
):
    return {"problem": problem, "status": status, "elapsed_s": elapsed, "answer": answer,
            "sent_s": sent,
            "batch_max": batch_max, "admission": admission, "degraded": degraded,
            "error": None}  # fmt: skip


def test_in_time_late_refused_and_correct_are_counted_apart():
    gold = {"p1": "42", "p2": "7"}
    results = [
        _record(200, 10.0, "42"),  # in time, right
        _record(200, 30.05, "41", "p2"),  # in time (within the 0.1 s slack), wrong
        _record(200, 30.5, "42"),  # late
        _record(429, 0.004),
        _record(429, 0.03),
        _record(429, 0.08, sent=0.01),  # in the arrival burst
        _record(500, 1.0),
    ]
    s = summarize(results, deadline=30.0, duration=60.0, gold=gold)
    assert (s["requests"], s["answered_in_time"], s["late"], s["refused"], s["errors"]) == (
        7, 2, 1, 3, 1)  # fmt: skip
    assert s["answered_in_time_per_min"] == pytest.approx(2.0)
    assert (s["with_answer"], s["correct"]) == (2, 1)
    assert s["refusal_max_s"] == pytest.approx(0.08) and s["refused_within_50ms"] == 2
    assert s["refusal_burst_max_s"] == pytest.approx(0.08)
    assert s["refusal_after_burst_max_s"] == pytest.approx(0.03)
    assert s["latency_p50_s"] == pytest.approx(30.05) and s["batch_max"] == 3


def test_no_answers_leave_the_latencies_empty():
    s = summarize([_record(429, 0.01)], deadline=8.0, duration=60.0, gold={})
    assert s["answered_in_time"] == 0 and s["latency_p50_s"] is None


def test_the_floor_app_refuses_every_request_in_the_servers_error_shape():
    """The stress level's floor: a bare app that answers every completion with 429."""
    import asyncio

    import httpx

    from policies.bench_server import refusal_floor_app

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=refusal_floor_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://floor") as http:
            body = {"model": "m", "messages": [{"role": "user", "content": "1 + 1?"}]}
            return await http.post("/v1/chat/completions", json=body)

    response = asyncio.run(ask())
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "engine_busy"


def test_health_checks_are_counted_and_the_slowest_kept():
    checks = [{"at_s": 0.0, "status": 200, "elapsed_s": 0.004},
              {"at_s": 1.0, "status": 200, "elapsed_s": 0.09},
              {"at_s": 2.0, "status": 0, "elapsed_s": 5.0}]  # fmt: skip
    assert health_summary(checks) == {"health_checks": 3, "health_ok": 2, "health_max_s": 5.0}
    assert health_summary([])["health_max_s"] is None


def test_the_server_clock_times_requests_inside_the_app_with_a_real_client():
    """Through a real httpx client over ASGI: the clock records when the app saw each request
    and when its response began (the app sleeps 20 ms before a 429)."""
    import asyncio
    import time

    import httpx

    async def app(scope, receive, send):
        await asyncio.sleep(0.02)
        await send({"type": "http.response.start", "status": 429, "headers": []})
        await send({"type": "http.response.body", "body": b"busy"})

    clock = ServerClock(app)

    async def burst():
        transport = httpx.ASGITransport(app=clock)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await asyncio.gather(*(http.post("/v1/chat/completions") for _ in range(3)))

    started = time.monotonic()
    replies = asyncio.run(burst())
    assert [r.status_code for r in replies] == [429] * 3
    assert len(clock.records) == 3 and all(r["status"] == 429 for r in clock.records)
    assert all(started <= r["in"] < r["out"] for r in clock.records)
    summary = intake_summary(clock.records)
    assert 0.02 <= summary["burst_refusal_in_app_max_s"] < 1.0
    assert 0 <= summary["burst_intake_s"] < 0.02


def test_intake_summary_keeps_to_the_burst_and_to_completions():
    records = [
        {"path": "/v1/chat/completions", "in": 10.0, "out": 10.001, "status": 429},
        {"path": "/v1/chat/completions", "in": 10.08, "out": 10.09, "status": 429},
        {"path": "/v1/chat/completions", "in": 10.09, "out": 15.0, "status": 200},
        {"path": "/health", "in": 10.5, "out": 10.9, "status": 200},
        {"path": "/v1/chat/completions", "in": 13.0, "out": 13.5, "status": 429},  # later
    ]
    summary = intake_summary(records)
    assert summary["burst_intake_s"] == pytest.approx(0.09)
    assert summary["burst_refusal_in_app_max_s"] == pytest.approx(0.01)
    assert intake_summary([])["burst_intake_s"] is None


def test_the_lean_client_reads_what_httpx_reads_from_a_real_server():
    """Over real TCP from uvicorn: the stress level's lean client and httpx see the same status,
    Retry-After and error body from the floor app."""
    import asyncio

    import httpx

    from policies.bench_server import _Server, refusal_floor_app
    from policies.lean_http_client import LeanClient

    server = _Server(refusal_floor_app())
    body = {"model": "m", "messages": [{"role": "user", "content": "1 + 1?"}], "deadline_s": 8}
    try:
        url = server.url + "/v1/chat/completions"
        lean = asyncio.run(LeanClient(timeout=10.0).post(url, json=body))
        reference = httpx.post(url, json=body, timeout=10.0)
    finally:
        server.stop()
    assert lean.status_code == reference.status_code == 429
    assert lean.headers["retry-after"] == reference.headers["retry-after"] == "1"
    assert lean.json() == reference.json()
    assert lean.json()["error"]["code"] == "engine_busy"


def test_the_lean_client_refuses_what_it_cannot_read():
    import asyncio

    from policies.lean_http_client import LeanClient, read_response

    def parse(raw: bytes):
        async def run():
            reader = asyncio.StreamReader()
            reader.feed_data(raw)
            reader.feed_eof()
            return await read_response(reader)

        return asyncio.run(run())

    ok = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nRetry-After: 3\r\n\r\n{}")
    assert (ok.status_code, ok.headers["retry-after"], ok.json()) == (200, "3", {})
    with pytest.raises(ConnectionError, match="Content-Length"):
        parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    with pytest.raises(ConnectionError, match="status line"):
        parse(b"SSH-2.0-OpenSSH\r\n")
    with pytest.raises(ValueError, match="plain http"):
        asyncio.run(LeanClient(timeout=1.0).post("https://example.org/v1", json={}))
    with pytest.raises(ValueError, match="timeout"):
        LeanClient(timeout=0)
