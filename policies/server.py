"""OpenAI-compatible HTTP service for the decoding controller, with deadline admission control.

    python -m policies.server                        # bundled model, data/policies/default
    python -m policies.server --policy runs/<run>/policy --port 8000

``POST /v1/chat/completions`` (the last user message is the problem) and ``POST
/v1/completions`` (``prompt``) take the usual OpenAI fields plus a required ``deadline_s``:
seconds from the server receiving the request, in the body or else the ``X-Deadline-S``
header, finite, > 0 and at most ``max_deadline_s`` (600 s by default; an open-ended request
could hold the single engine indefinitely).  The voted answer is the completion text (empty,
with ``finish_reason == "length"``, when no branch answered in time); the ``tts`` field carries
the race (n and k at the start, k changes, why it stopped), timings, votes and branches.  The
policy is a race policy (``LatencyTTS-v1``): it decides while the call runs
(``policies.controller``); an older one-decision policy is refused at start with a "retrain"
error.  ``GET /health``, ``GET /metrics`` (Prometheus) and ``GET /v1/models`` complete the
API; request parsing and the error shape are in ``policies.openai_api``.

One engine call runs at a time.  The engine's k is engine-wide, so problems batched together
would have to share one k (the race sets it step by step), and the policy was trained on
latencies measured with the engine to itself; batching two problems here raised throughput
but not mean latency and delayed the first one (``python -m policies.bench_server`` measures
it; README).  So
requests queue FIFO for one worker thread (``policies.deadline_queue``): one that cannot meet
its deadline given the queue is refused at once with 429 (plus ``x-should-retry: false``, as a
retry cannot keep the original deadline, and ``Retry-After``); an admitted one gets what is
left of its deadline, so it is never answered late, and is refused with 503 while it waits if
the engine falls so far behind the queue's estimate that its deadline can no longer be met.
A client that disconnects is dropped from the queue or has its branches aborted.

``stream: true`` is answered with server-sent events in OpenAI's chunk format, sent when the
call is done (the answer is a vote, known only when the race ends): the request waits, is
cancelled on disconnect and is refused exactly as a non-streamed one (plain JSON errors with
their status codes), then the chunks go out at once (``policies.openai_api.completion_chunks``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import math
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
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

from engine.rollout import NO_SPECULATION
from env.paths import policies_dir
from policies.controller import DecodingController, PreparedProblem, Solution
from policies.deadline_queue import DeadlineExpired, DeadlineQueue, Job, Refused
from policies.openai_api import (
    PROBLEM_FIELD,
    APIError,
    check_model_and_options,
    completion_body,
    completion_chunks,
    deadline_of,
    max_tokens_of,
    problem_of,
    read_json,
    sse_events,
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


class CompletionService:
    """What the routes do: admit, prepare, queue and await a request, and reply or refuse.

    A request is checked field by field (``policies.openai_api``), refused at once if the queue
    cannot meet its deadline, tokenized once (``DecodingController.prepare``, off the event
    loop), queued (``policies.deadline_queue``) and, when its turn comes, solved by the
    controller with what is left of its deadline.  Parameters as in ``create_app``.
    """

    def __init__(
        self,
        controller: DecodingController,
        served_model_name: str,
        max_queue: int,
        min_service_s: float,
        overrun_s: float,
        response_margin_s: float,
        max_deadline_s: float,
        max_body_bytes: int,
    ) -> None:
        self.controller, self.engine = controller, controller.engine
        self.served_model_name = served_model_name
        self.max_deadline_s, self.max_body_bytes = max_deadline_s, max_body_bytes
        self.metrics = ServiceMetrics(controller.n_grid, controller.k_grid)
        self.engine_clean_after_last_call = True
        self.queue = DeadlineQueue(
            max_queue, min_service_s, overrun_s, response_margin_s, self._check_engine_after_call
        )
        self.metrics.queue_length.set_function(lambda: self.queue.waiting)
        # Prompts are tokenized off the event loop on one long-lived thread: starting a thread
        # per request (a default thread pool under a burst) stalls the loop while each starts.
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tts-tokenize")
        self._tokenizer.submit(lambda: None).result()

    def _check_engine_after_call(self) -> None:
        """On the queue's worker after each call (it waits for the call's abort to finish)."""
        self.engine_clean_after_last_call = not self.engine.has_unfinished_requests()

    def close(self) -> None:
        self.queue.close()
        self._tokenizer.shutdown(wait=False)

    async def complete(self, request: Request, endpoint: str) -> Response:
        """Serve one completion request of ``endpoint`` (``"chat"`` or ``"completions"``)."""
        arrival = time.monotonic()
        status = "500"
        try:
            body = await read_json(request, self.max_body_bytes)
            problem = problem_of(body, endpoint)
            check_model_and_options(body, self.served_model_name)
            deadline = deadline_of(body, request.headers.get("x-deadline-s"), self.max_deadline_s)
            max_tokens = max_tokens_of(body, self.engine.config.max_tokens)
            prepared = await self._admit_and_prepare(problem, endpoint, arrival + deadline)
            with self._refused_as_429():
                work = functools.partial(self.controller.solve, prepared, max_tokens=max_tokens)
                job = self.queue.submit(arrival + deadline, work)  # work(seconds left, cancel)
            solution = await self._wait_for(job, request)
            reply = self._reply(endpoint, solution, job, arrival, deadline)
            status = "200"
            return _response(reply, streamed=body.get("stream") is True)
        except APIError as err:
            status = str(err.status)
            raise
        except (ClientDisconnect, _ClientGone):
            status = "499"
            return Response(status_code=499)
        finally:
            self.metrics.requests.labels(endpoint, status).inc()

    async def _admit_and_prepare(
        self, problem: str, endpoint: str, deadline_at: float
    ) -> PreparedProblem:
        """Refuse before the work of tokenizing, then check and tokenize the problem (once)."""
        with self._refused_as_429():
            self.queue.admit(deadline_at)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._tokenizer, self.controller.prepare, problem)
        except ValueError as exc:
            raise APIError(400, str(exc), param=PROBLEM_FIELD[endpoint]) from exc

    def _reply(
        self, endpoint: str, solution: Solution, job: Job, arrival: float, deadline: float
    ) -> dict:
        """Record the served request's metrics and build its OpenAI body with the tts field."""
        latency = time.monotonic() - arrival
        queue_wait = job.started_at - arrival
        self.metrics.latency.observe(latency)
        self.metrics.queue_wait.observe(queue_wait)
        self.metrics.chosen_n.observe(solution.n)
        self.metrics.chosen_k.observe(solution.k)
        tts = {
            "answer": solution.answer,
            "n": solution.n,
            "k": solution.k,
            "budget": solution.budget,
            "latency_s": latency,
            "engine_latency_s": solution.latency_s,
            "deadline_s": deadline,
            "queue_wait_s": queue_wait,
            "stopped_by": solution.stopped_by,
            "stop_reason": solution.stop_reason,
            "k_changes": solution.k_changes,
            "decisions": solution.decisions,
            "votes": solution.votes,
            "confidence": solution.confidence,
            "branches": solution.branches,
        }
        return completion_body(endpoint, self.served_model_name, solution, tts)

    def _refusal_error(self, refusal: Refused, status: int) -> APIError:
        self.metrics.refusals.labels(refusal.reason).inc()
        retry_after = str(max(1, math.ceil(refusal.retry_after_s)))
        headers = {"x-should-retry": "false", "retry-after": retry_after}
        message = f"{refusal}; retry later or with a longer deadline"
        param = None if refusal.reason == "queue_full" else "deadline_s"
        return APIError(status, message, "overloaded_error", param, refusal.reason, headers)

    @contextlib.contextmanager
    def _refused_as_429(self) -> Iterator[None]:
        try:
            yield
        except Refused as refusal:
            raise self._refusal_error(refusal, 429) from None

    async def _wait_for(self, job: Job, request: Request) -> Solution:
        """The job's result; drops it if the client goes or the engine falls behind."""
        try:
            while not job.future.done():
                await asyncio.wait([job.future], timeout=DISCONNECT_POLL_S)
                if job.future.done():
                    break
                if await request.is_disconnected():
                    self.metrics.cancellations.labels(self.queue.cancel(job)).inc()
                    raise _ClientGone
                refusal = self.queue.drop_if_behind(job)
                if refusal is not None:
                    raise self._refusal_error(refusal, 503)
            return job.future.result()
        except DeadlineExpired as exc:
            self.metrics.refusals.labels("deadline_expired").inc()
            raise APIError(503, str(exc), "overloaded_error", code="deadline_expired") from exc
        except ValueError as exc:  # the controller refused the request before the engine ran
            raise APIError(400, str(exc)) from exc
        finally:
            if not job.future.done():  # the handler was cancelled (shutdown): abort the call
                self.queue.cancel(job)

    def health(self) -> dict:
        running, now = self.queue.running, time.monotonic()
        return {
            "status": "ok",
            "model": self.served_model_name,
            "queue_length": self.queue.waiting,
            "running": running,
            "engine_idle": self.engine_clean_after_last_call and not running,
            "worst_case_wait_s": self.queue.latest_start(now) - now,
            "overrun_estimate_s": self.queue.overrun_estimate_s,
        }


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
    service = CompletionService(
        controller,
        served_model_name,
        max_queue,
        min_service_s,
        overrun_s,
        response_margin_s,
        max_deadline_s,
        max_body_bytes,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(title="Latency-aware test-time scaling", lifespan=lifespan)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    _add_routes(app, service)
    return app


def _add_routes(app: FastAPI, service: CompletionService) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await service.complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await service.complete(request, "completions")

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {
            "id": service.served_model_name,
            "object": "model",
            "created": 0,
            "owned_by": "local",
        }
        return {"object": "list", "data": [entry]}

    @app.get("/health")
    async def health() -> dict:
        return service.health()

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        registry = service.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return APIError(exc.status_code, str(exc.detail)).response()


async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()


def _response(reply: dict, streamed: bool) -> Response:
    """The reply as one JSON body, or (``stream: true``) as server-sent chunk events."""
    if not streamed:
        return JSONResponse(reply)
    events = sse_events(completion_chunks(reply))
    return StreamingResponse(events, media_type="text/event-stream")


class _ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


def main() -> None:
    """Command line: load the policy, start an engine sized for its grids and speculative
    method, serve."""
    import uvicorn

    from engine.vllm_engine import EngineConfig, VLLMEngine
    from policies.saved_policy import load_race_policy

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
    try:
        policy = load_race_policy(args.policy)
    except ValueError as error:  # e.g. a one-decision (v0) policy: the message says retrain
        raise SystemExit(f"cannot serve {args.policy}: {error}") from None
    n_grid, k_grid = policy.env_config.n_grid or (1,), policy.env_config.k_grid or (0,)
    method = args.spec_method or policy.info.get("spec_method") or "draft_model"
    config = EngineConfig(
        spec_method=None if method == NO_SPECULATION else method,
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
