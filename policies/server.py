"""OpenAI-compatible HTTP service for the decoding controller, with deadline admission control.

    python -m policies.server                        # bundled model, data/policies/default
    python -m policies.server --policy runs/<run>/policy --port 8000

``POST /v1/chat/completions`` (the last user message is the problem) and ``POST
/v1/completions`` (``prompt``) take the usual OpenAI fields plus a required ``deadline_s``:
seconds from the server receiving the request, in the body or else the ``X-Deadline-S``
header, finite, > 0 and at most ``max_deadline_s`` (600 s by default; an open-ended request
could hold the single engine indefinitely).  The voted answer is the completion text (empty,
with ``finish_reason == "length"``, when no branch answered in time); the ``tts`` field carries
the allocation (n, k, budget), timings, votes and branches.  ``GET /health``, ``GET /metrics``
(Prometheus) and ``GET /v1/models`` complete the API; request parsing and the error shape are in
``policies.openai_api``.

One engine call runs at a time.  The engine's k is engine-wide, so problems batched together
would have to share one k, and the policy chose each (n, k, budget) from latencies measured
with the engine to itself; batching two problems here raised throughput but not mean latency
and delayed the first one (``python -m policies.bench_server`` measures it; README).  So
requests queue FIFO for one worker thread (``policies.deadline_queue``): one that cannot meet
its deadline given the queue is refused at once with 429 (plus ``x-should-retry: false``, as a
retry cannot keep the original deadline, and ``Retry-After``); an admitted one gets what is
left of its deadline, so it is never answered late, and is refused with 503 while it waits if
the engine falls so far behind the queue's estimate that its deadline can no longer be met.
A client that disconnects is dropped from the queue or has its branches aborted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from env.paths import policies_dir
from policies.controller import Answer, DecodingController
from policies.deadline_queue import DeadlineExpired, DeadlineQueue, Job, Refused
from policies.openai_api import (
    PROBLEM_FIELD,
    APIError,
    check_model_and_options,
    completion_body,
    deadline_of,
    max_tokens_of,
    problem_of,
    read_json,
)

SERVED_MODEL_NAME = "latency-tts-smollm2"
MAX_DEADLINE_S = 600.0
DISCONNECT_POLL_S = 0.1
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)


class ServiceMetrics:
    """The service's Prometheus metrics, in their own registry (vLLM uses the global one)."""

    def __init__(self, n_grid: tuple[int, ...], k_grid: tuple[int, ...]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "tts_requests",
            "Completion requests by endpoint and HTTP status (499: client disconnected)",
            ["endpoint", "status"],
            registry=r,
        )
        self.refusals = Counter("tts_refusals", "Requests refused", ["reason"], registry=r)
        self.cancellations = Counter(
            "tts_cancellations",
            "Requests whose client disconnected, by stage (queued: dropped; running: aborted)",
            ["stage"],
            registry=r,
        )
        self.latency = Histogram(
            "tts_latency_seconds", "Arrival to answer", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.queue_wait = Histogram(
            "tts_queue_wait_seconds",
            "Arrival to engine start",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.chosen_n = Histogram(
            "tts_chosen_n", "Branches the policy chose", registry=r, buckets=sorted(n_grid)
        )
        self.chosen_k = Histogram(
            "tts_chosen_k",
            "Draft tokens per step the policy chose",
            registry=r,
            buckets=sorted(k_grid),
        )
        self.queue_length = Gauge("tts_queue_length", "Requests waiting", registry=r)


def create_app(
    controller: DecodingController,
    served_model_name: str = SERVED_MODEL_NAME,
    max_queue: int = 64,
    min_service_s: float = 0.5,
    overrun_s: float = 0.3,
    response_margin_s: float = 0.2,
    max_deadline_s: float = MAX_DEADLINE_S,
    max_body_bytes: int = 1_000_000,
) -> FastAPI:
    """The FastAPI app serving ``controller`` (see the module docstring for the API).

    :param controller: the decoding controller; its engine serves one call at a time.
    :param served_model_name: the only ``model`` accepted (others get 404 model_not_found).
    :param max_queue: most requests waiting at once; more are refused (429 queue_full).
    :param min_service_s: least engine time a request must be sure to get before its deadline
        to be admitted (else 429 deadline_unmeetable).
    :param overrun_s: per request ahead, least allowance for the engine step in flight when its
        call stops (a step cannot be interrupted); the queue raises it to what it measures.
    :param response_margin_s: least time kept back from each deadline for building and sending
        the reply; the queue adds how late recent results reached the event loop.
    :param max_deadline_s: largest accepted ``deadline_s``.
    :param max_body_bytes: largest accepted request body (413 beyond).
    """
    engine = controller.engine
    metrics = ServiceMetrics(controller.n_grid, controller.k_grid)
    engine_idle = {"after_last_call": True}

    def record_engine_state() -> None:  # on the worker, after each call (waits for its abort)
        engine_idle["after_last_call"] = not engine.has_unfinished_requests()

    queue = DeadlineQueue(
        max_queue, min_service_s, overrun_s, response_margin_s, record_engine_state
    )
    metrics.queue_length.set_function(lambda: queue.waiting)
    # Prompts are tokenized off the event loop on one long-lived thread: starting a thread per
    # request (a default thread pool under a burst) stalls the loop while each one starts.
    tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tts-tokenize")
    tokenizer.submit(lambda: None).result()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        queue.close()
        tokenizer.shutdown(wait=False)

    app = FastAPI(title="Latency-aware test-time scaling", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return APIError(
            500, f"internal error: {type(exc).__name__}: {exc}", "server_error"
        ).response()

    async def complete(request: Request, endpoint: str) -> Response:
        arrival = time.monotonic()
        status = "500"
        try:
            body = await read_json(request, max_body_bytes)
            problem = problem_of(body, endpoint)
            check_model_and_options(body, served_model_name)
            deadline = deadline_of(body, request.headers.get("x-deadline-s"), max_deadline_s)
            max_tokens = max_tokens_of(body, engine.config.max_tokens)
            with refused_as_429():  # refuse before the work of tokenizing
                queue.admit(arrival + deadline)
            try:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(tokenizer, controller.prompt_tokens, problem)
            except ValueError as exc:
                raise APIError(400, str(exc), param=PROBLEM_FIELD[endpoint]) from exc
            with refused_as_429():
                work = functools.partial(controller.answer, problem, max_tokens=max_tokens)
                job = queue.submit(arrival + deadline, work)  # work(seconds left, cancel)
            answer = await wait_for(job, request)
            latency = time.monotonic() - arrival
            queue_wait = job.started_at - arrival
            metrics.latency.observe(latency)
            metrics.queue_wait.observe(queue_wait)
            metrics.chosen_n.observe(answer.n)
            metrics.chosen_k.observe(answer.k)
            tts = {
                "answer": answer.answer,
                "n": answer.n,
                "k": answer.k,
                "budget": answer.budget,
                "latency_s": latency,
                "engine_latency_s": answer.latency_s,
                "deadline_s": deadline,
                "queue_wait_s": queue_wait,
                "stopped_by": answer.stopped_by,
                "votes": answer.votes,
                "branches": answer.branches,
            }
            status = "200"
            return JSONResponse(completion_body(endpoint, served_model_name, answer, tts))
        except APIError as err:
            status = str(err.status)
            raise
        except (ClientDisconnect, _ClientGone):
            status = "499"
            return Response(status_code=499)
        finally:
            metrics.requests.labels(endpoint, status).inc()

    def refusal_error(refusal: Refused, status: int) -> APIError:
        metrics.refusals.labels(refusal.reason).inc()
        retry_after = str(max(1, math.ceil(refusal.retry_after_s)))
        headers = {"x-should-retry": "false", "retry-after": retry_after}
        message = f"{refusal}; retry later or with a longer deadline"
        param = None if refusal.reason == "queue_full" else "deadline_s"
        return APIError(status, message, "overloaded_error", param, refusal.reason, headers)

    @contextlib.contextmanager
    def refused_as_429():
        try:
            yield
        except Refused as refusal:
            raise refusal_error(refusal, 429) from None

    async def wait_for(job: Job, request: Request) -> Answer:
        try:
            while not job.future.done():
                await asyncio.wait([job.future], timeout=DISCONNECT_POLL_S)
                if job.future.done():
                    break
                if await request.is_disconnected():
                    metrics.cancellations.labels(queue.cancel(job)).inc()
                    raise _ClientGone
                refusal = queue.drop_if_behind(job)
                if refusal is not None:
                    raise refusal_error(refusal, 503)
            return job.future.result()
        except DeadlineExpired as exc:
            metrics.refusals.labels("deadline_expired").inc()
            raise APIError(503, str(exc), "overloaded_error", code="deadline_expired") from exc
        except ValueError as exc:  # the controller refused the request before the engine ran
            raise APIError(400, str(exc)) from exc
        finally:
            if not job.future.done():  # the handler was cancelled (shutdown): abort the call
                queue.cancel(job)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, "completions")

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": served_model_name, "object": "model", "created": 0, "owned_by": "local"}
        return {"object": "list", "data": [entry]}

    @app.get("/health")
    async def health() -> dict:
        running, now = queue.running, time.monotonic()
        return {
            "status": "ok",
            "model": served_model_name,
            "queue_length": queue.waiting,
            "running": running,
            "engine_idle": engine_idle["after_last_call"] and not running,
            "worst_case_wait_s": queue.latest_start(now) - now,
            "overrun_estimate_s": queue.overrun_estimate_s,
        }

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class _ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


def main() -> None:
    """Command line: load the policy, start an engine sized for its grids and speculative
    method, serve."""
    import uvicorn

    from engine.vllm_engine import EngineConfig, VLLMEngine
    from policies.ppo_policy import load_policy

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", default=str(policies_dir() / "default"), help="policy folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=SERVED_MODEL_NAME)
    parser.add_argument(
        "--spec-method",
        help="engine speculation: ngram, draft_model or none (default: the policy's, else "
        "draft_model)",
    )
    parser.add_argument("--max-tokens", type=int, default=512, help="per branch")
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--min-service-s", type=float, default=0.5)
    parser.add_argument("--max-deadline-s", type=float, default=MAX_DEADLINE_S)
    args = parser.parse_args()
    if not (Path(args.policy) / "policy.json").is_file():
        raise SystemExit(
            f"no policy at {args.policy}: train one (python train.py) and pass its policy "
            "folder with --policy (or copy it there)"
        )
    policy = load_policy(args.policy)
    n_grid, k_grid = policy.env_config.n_grid or (1,), policy.env_config.k_grid or (0,)
    method = args.spec_method or policy.info.get("spec_method") or "draft_model"
    config = EngineConfig(
        spec_method=None if method == "none" else method,
        max_n=max(n_grid),
        k_max=max(max(k_grid), 1),
        max_tokens=args.max_tokens,
    )
    controller = DecodingController(policy, VLLMEngine(config))
    app = create_app(
        controller,
        args.served_model_name,
        args.max_queue,
        args.min_service_s,
        max_deadline_s=args.max_deadline_s,
    )
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
