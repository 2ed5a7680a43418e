"""Serving behind several replicas: a real local Ray cluster, two CPU replicas of the bundled
model (each the whole server: engine, controller, predictive admission) as Ray actors, the
front end (``policies.replica_router``) on loopback and the real openai client.

The replicas step one sequence at a time (``max_batch=1``) and the policy starts one branch,
so a replica running a call has no room for another: its admission refuses (engine_busy, with
the predicted time at which it frees), and where a new request goes is decided by admission,
not by luck.
"""

from __future__ import annotations

import inspect
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn

from policies.replica_router import (
    RESPONSE_MARGIN_S,
    SERVED_MODEL_NAME,
    ReplicaRouter,
    ReplicaVerdict,
    RoutedRefusal,
    create_router_app,
    rank,
)
from policies.serve_replicas import APP_OPTIONS, ServingSpec
from tests.fresh_imports import modules_loaded_by
from tests.policies.test_learned_controller import tiny_race_policy

LONG = "Write a long, detailed story about a cat who learns algebra."
SHORT = "What is $12 + 30$?"
LONG_TOKENS = 64
"""A call this long keeps a replica busy for a few seconds on this CPU."""


def _verdict(replica: int, admitted: bool = True, **fields) -> ReplicaVerdict:
    return ReplicaVerdict(replica, admitted, "fits" if admitted else "engine_busy", **fields)


# ----------------------------------------------------------------- without engines
def test_rank_prefers_more_branches_then_fewer_calls_then_the_earliest_answer():
    verdicts = [
        _verdict(0, max_n=4, running=2, predicted_s=1.0),
        _verdict(1, max_n=8, running=3, predicted_s=5.0),
        _verdict(2, max_n=8, running=1, predicted_s=4.0),
        _verdict(3, max_n=8, running=1, predicted_s=2.0),
        _verdict(4, admitted=False, retry_after_s=1.0),
        None,  # did not answer its preview
    ]
    assert rank(verdicts, [0] * 6) == [3, 2, 1, 0]
    # requests this front end sent to replica 3 since its preview count as running there
    assert rank(verdicts, [0, 0, 0, 2, 0, 0]) == [2, 3, 1, 0]
    assert rank([None, _verdict(1, admitted=False)], [0, 0]) == []


def test_a_refusal_over_replicas_takes_the_smallest_retry_after_and_names_each():
    refusal = RoutedRefusal(
        [_verdict(0, False, retry_after_s=7.2, message="busy A"),
         _verdict(1, False, retry_after_s=2.1, message="busy B")],
        2,
    )  # fmt: skip
    assert refusal.status == 429 and refusal.headers["retry-after"] == "3"
    assert refusal.code == "engine_busy" and "replica 0: busy A" in refusal.message
    unmeetable = RoutedRefusal([ReplicaVerdict(0, False, "deadline_unmeetable")], 1)
    assert "retry-after" not in unmeetable.headers and unmeetable.code == "deadline_unmeetable"


def test_bad_configurations_are_refused_naming_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match="at least one replica"):
        ReplicaRouter([])
    with pytest.raises(ValueError, match="http://"):
        ReplicaRouter(["localhost:8000"])
    with pytest.raises(ValueError, match="no policy at"):
        ServingSpec(str(tmp_path))
    (tmp_path / "policy.json").write_text("{}")
    with pytest.raises(ValueError, match=r"allowed: .*max_calls"):
        ServingSpec(str(tmp_path), app_options={"workers": 2})
    with pytest.raises(ValueError, match="cpus > 0"):
        ServingSpec(str(tmp_path), cpus=0)


def test_replica_options_are_create_apps():
    from policies.server import create_app

    assert set(APP_OPTIONS) <= set(inspect.signature(create_app).parameters)


def test_the_front_end_imports_neither_the_engine_nor_training_code():
    loaded = modules_loaded_by("policies.replica_router")
    assert not {"vllm", "torch", "datasets", "gymnasium", "policies.server"} & loaded


# ----------------------------------------------------------------- real Ray, real engines
@pytest.fixture(scope="module")
def served(tmp_path_factory) -> SimpleNamespace:
    """Two replicas on a local Ray cluster and the front end on a free loopback port."""
    import ray

    from env.ray_runtime import ray_runtime_env
    from policies.serve_replicas import start_server_replicas, stop_server_replicas

    policy = tiny_race_policy(tmp_path_factory.mktemp("policy") / "one", (1,), (0,), "ngram")
    spec = ServingSpec(str(policy), max_tokens=LONG_TOKENS, max_batch=1, kv_cache_gb=0.25,
                       calibrate_s=0.0, app_options={"margin_s": 0.2})  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=ray_runtime_env(),
             log_to_driver=False)  # fmt: skip
    started = time.monotonic()
    actors, described = start_server_replicas(spec, 2)
    startup_s = time.monotonic() - started
    app = create_router_app([d["url"] for d in described])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the front end did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    print(f"2 replicas up in {startup_s:.0f} s")
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", replicas=described)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        stop_server_replicas(actors)
        ray.shutdown()


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0)


def _chat(client: openai.OpenAI, problem: str, deadline_s: float, max_tokens: int, **options):
    return client.chat.completions.create(
        model=SERVED_MODEL_NAME,
        messages=[{"role": "user", "content": problem}],
        max_tokens=max_tokens,
        extra_body={"deadline_s": deadline_s},
        **options,
    )


def _running(served) -> list[int]:
    """Calls each replica is running now, read from the front end's /health."""
    health = httpx.get(f"{served.url}/health", timeout=5).json()
    return [r["running"] for r in health["replicas"]]


def _wait_for_running(served, wanted, what: str, timeout_s: float = 30.0) -> list[int]:
    """Poll the replicas' running calls until ``wanted(running)``; return that reading."""
    limit = time.monotonic() + timeout_s
    while not wanted(running := _running(served)):
        assert time.monotonic() < limit, f"timed out waiting until {what}"
        time.sleep(0.02)
    return running


@pytest.mark.engine
def test_the_front_end_serves_the_openai_api_from_both_replicas(served, client):
    health = httpx.get(f"{served.url}/health", timeout=5).json()
    assert health["status"] == "ok" and len(health["replicas"]) == 2
    assert [m.id for m in client.models.list().data] == [SERVED_MODEL_NAME]
    completion = client.completions.create(
        model=SERVED_MODEL_NAME, prompt=SHORT, max_tokens=8, extra_headers={"X-Deadline-S": "20"}
    )
    tts = completion.model_extra["tts"]
    assert completion.object == "text_completion" and tts["replica"] in (0, 1)
    assert completion.choices[0].text == (tts["answer"] or "")
    assert tts["deadline_s"] <= 20 - RESPONSE_MARGIN_S and tts["latency_s"] <= tts["deadline_s"]
    assert [p["replica"] for p in tts["routing"]["previews"]] == [0, 1]
    assert all(p["admitted"] for p in tts["routing"]["previews"])  # both were idle


ATTEMPTS = 3
"""How often a scenario with a long call is run before the test fails: a long call may end
early (its branch samples an end of text), and then a new request is rightly admitted beside
it, so such an attempt says nothing and is run again."""


def _ends_no_earlier_than(sent: float, reply) -> float:
    """The earliest a call can have ended on its replica's engine: it starts there no earlier
    than its request was sent, and then runs for its engine time (``tts.engine_latency_s``).
    Whether the client had its reply yet is no measure: the reply can reach it after a later
    call's (seen once in a fresh-clone run, with the front end in this busy process)."""
    return sent + reply.model_extra["tts"]["engine_latency_s"]


@pytest.mark.engine
def test_a_request_goes_to_the_replica_that_is_not_busy(served, client):
    for _ in range(ATTEMPTS):
        with ThreadPoolExecutor(1) as pool:
            sent = time.monotonic()
            long = pool.submit(_chat, client, LONG, 60.0, LONG_TOKENS)
            running = _wait_for_running(served, lambda r: sum(r) == 1, "one replica is busy")
            busy = running.index(1)
            chunks = list(_chat(client, SHORT, 30.0, 8, stream=True))
            answered = time.monotonic()
            long_reply = long.result(timeout=90)
        tts = chunks[-1].model_extra["tts"]
        previews = {p["replica"]: p for p in tts["routing"]["previews"]}
        if previews[busy]["admitted"]:  # right only if its long call may have ended by then
            ended = _ends_no_earlier_than(sent, long_reply)
            assert ended <= answered, (
                f"the busy replica admitted while its long call surely still ran (it ended at "
                f"least {ended - answered:.3f} s after the short one); short: {tts}; long: "
                f"{_summary(long_reply)}"
            )
            continue
        assert tts["replica"] == 1 - busy
        assert previews[busy]["reason"] == "engine_busy"
        assert previews[1 - busy]["admitted"]
        assert tts["routing"]["refused_by"] == []  # sent straight there, not after a refusal
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert long_reply.model_extra["tts"]["replica"] == busy
        return
    pytest.fail(f"the long call ended before the short request in all {ATTEMPTS} attempts")


def _summary(reply) -> dict:
    """What a failed admission check shows of a reply: where and how long it ran."""
    tts = reply.model_extra["tts"]
    keys = ("replica", "n", "latency_s", "engine_latency_s", "stop_reason", "routing")
    return {key: tts.get(key) for key in keys}


def _third_request_while_both_replicas_are_busy(served, client):
    """Two long calls, one per replica, then a short request: its refusal and the long replies.

    An attempt in which the short request was admitted is repeated (``ATTEMPTS`` in all) only
    when a long call may have been over before the short one answered
    (``_ends_no_earlier_than``); an admission while both surely still ran fails the test."""
    for _ in range(ATTEMPTS):
        with ThreadPoolExecutor(2) as pool:
            sent, longs = [], []
            for _ in range(2):
                sent.append(time.monotonic())
                longs.append(pool.submit(_chat, client, LONG, 60.0, LONG_TOKENS))
            _wait_for_running(served, lambda r: r == [1, 1], "both replicas run a long call")
            try:
                short = _chat(client, SHORT, 30.0, 8)
            except openai.RateLimitError as refusal:
                return refusal, [f.result(timeout=90) for f in longs]
            answered = time.monotonic()
            replies = [f.result(timeout=90) for f in longs]
        ended_after = [_ends_no_earlier_than(t, r) for t, r in zip(sent, replies, strict=True)]
        assert min(ended_after) <= answered, (
            f"admitted while both replicas were still running a long call: they ended at "
            f"least {[round(e - answered, 3) for e in ended_after]} s after the short one; "
            f"short: {_summary(short)}; long: {[_summary(r) for r in replies]}"
        )
    pytest.fail(f"a long call ended before the short request in all {ATTEMPTS} attempts")


@pytest.mark.engine
def test_refused_with_the_smallest_retry_after_only_when_no_replica_fits(served, client):
    with pytest.raises(openai.RateLimitError) as unmeetable:
        _chat(client, SHORT, 0.05, 8)
    assert unmeetable.value.body["code"] == "deadline_unmeetable"
    assert "retry-after" not in unmeetable.value.response.headers  # no wait would help
    busy, replies = _third_request_while_both_replicas_are_busy(served, client)
    error = busy.body
    assert error["code"] == "engine_busy" and error["param"] == "deadline_s"
    assert sorted(r["replica"] for r in error["replicas"]) == [0, 1]
    retry = [r["retry_after_s"] for r in error["replicas"]]
    assert all(r is not None and 0 < r < 60 for r in retry)
    assert busy.response.headers["retry-after"] == str(max(1, math.ceil(min(retry))))
    assert sorted(r.model_extra["tts"]["replica"] for r in replies) == [0, 1]  # spread
    metrics = httpx.get(f"{served.url}/metrics", timeout=5).text
    assert 'tts_router_refusals_total{reason="engine_busy"}' in metrics


@pytest.mark.engine
def test_bad_requests_get_the_servers_errors(served, client):
    with pytest.raises(openai.NotFoundError) as other_model:
        client.completions.create(model="gpt-4", prompt=SHORT, extra_body={"deadline_s": 5})
    assert other_model.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as blank:  # found by the replicas' preview
        _chat(client, "   ", 5.0, 8)
    assert blank.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as no_deadline:
        client.completions.create(model=SERVED_MODEL_NAME, prompt=SHORT)
    assert no_deadline.value.body["param"] == "deadline_s"
    replica = served.replicas[0]["url"]
    wrong = httpx.post(f"{replica}/v1/admission", params={"endpoint": "embeddings"}, json={})
    assert (
        wrong.status_code == 400 and "('chat', 'completions')" in wrong.json()["error"]["message"]
    )
    body = {"model": SERVED_MODEL_NAME, "prompt": SHORT, "deadline_s": 20, "max_tokens": 8}
    preview = httpx.post(f"{replica}/v1/admission", params={"endpoint": "completions"}, json=body)
    assert preview.status_code == 200 and preview.json()["admitted"] is True
    assert preview.json()["max_n"] == 1 and preview.json()["predicted_s"] > 0
    assert _running(served) == [0, 0]  # a preview holds no place
