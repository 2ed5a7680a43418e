"""OpenAI-compatible HTTP service for the decoding controller: many calls at once on one
engine, admitted by prediction.

    python -m policies.server                        # bundled model, data/policies/default
    python -m policies.server --policy runs/<run>/policy --port 8000

``POST /v1/chat/completions`` (the last user message is the problem) and ``POST
/v1/completions`` (``prompt``) take the usual OpenAI fields plus a required ``deadline_s``:
seconds from the server receiving the request, in the body or else the ``X-Deadline-S``
header, finite, > 0 and at most ``max_deadline_s`` (600 s by default).  The voted answer is
the completion text (empty, with ``finish_reason == "length"``, when no branch answered in
time); the ``tts`` field carries the race (n and k at the start, k changes, why it stopped),
timings, votes, branches, the answer's calibrated ``confidence``, the engine batch it shared
and the admission verdict.  The policy is a race policy (``LatencyTTS-v1``): it decides while
the call runs (``policies.controller``); an older one-decision policy is refused at start with
a "retrain" error.  ``GET /health``, ``GET /metrics`` (Prometheus) and ``GET /v1/models``
complete the API; request parsing and the error shape are in ``policies.openai_api``.
``POST /v1/admission?endpoint=chat|completions`` takes a completion body and answers
admission's verdict now without running or reserving anything (a front end over several
replicas asks each, ``policies.replica_router``).

Every admitted request runs at once on its own worker thread; the engine steps the branches of
all of them in one batch (``engine.batch_loop``: each call keeps its own race, stops and
deadline; a disconnect aborts that call only).  A request is admitted when the latency model,
corrected on this machine (``policies.serving_latency``), predicts that it and every call
already running still answer before their deadlines with ``margin_s`` to spare, with as many
branches as fit (degraded to fewer when the engine is busy); otherwise it is refused at once
with 429, a message saying why and a ``Retry-After`` (``policies.admission``).  An admitted call
gets what is left of its deadline less a response margin, so it is never answered late.

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
import gc
import math
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
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
from starlette.requests import ClientDisconnect

from engine.rollout import NO_SPECULATION
from policies.admission import Admission, Verdict
from policies.controller import DecodingController, PreparedProblem, Solution
from policies.openai_api import (
    MAX_DEADLINE_S,
    PROBLEM_FIELD,
    SERVED_MODEL_NAME,
    APIError,
    check_model_and_options,
    completion_body,
    completion_chunks,
    deadline_of,
    install_error_handlers,
    max_tokens_of,
    problem_of,
    read_json,
    sse_events,
)
from policies.serving_latency import ServingLatency
from policies.serving_options import add_serving_arguments

DISCONNECT_POLL_S = 0.25
GIL_SWITCH_S = 0.001
"""The interpreter's thread switch interval while serving (Python's default is 5 ms): the event
loop shares the interpreter with the engine thread and one worker per running call, and a
refusal is only as fast as the loop gets to run."""
VERDICTS_FIRST_S = 0.05
"""Longest an admitted call waits, before its work starts, for the verdicts of the requests
that arrived with it (``CompletionService._after_pending_verdicts``)."""
VERDICT_POLL_S = 0.001
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
LATENESS_WINDOW = 16
"""Recent calls over which the largest lateness of a result reaching the event loop is kept."""
CHARS_PER_TOKEN = 3.0
"""Admission predicts before tokenizing (so a refusal costs no tokenizer time): a prompt is
taken as its characters / this, plus the chat template's tokens."""
TEMPLATE_TOKENS = 40
ADMISSION_ENDPOINTS = ("chat", "completions")
"""What ``POST /v1/admission?endpoint=...`` previews: the body of a chat or a completions call."""


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
        self.degraded = Counter(
            "tts_degraded",
            "Requests admitted with fewer branches than the policy's most",
            registry=r,
        )
        self.cancellations = Counter(
            "tts_cancellations", "Requests whose client disconnected while running", registry=r
        )
        self.latency = Histogram(
            "tts_latency_seconds", "Arrival to answer", buckets=LATENCY_BUCKETS_S, registry=r
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
        self.running = Gauge("tts_running_calls", "Calls admitted and not answered", registry=r)
        self.live_branches = Gauge("tts_live_branches", "Branches in the engine batch", registry=r)


class CompletionService:
    """What the routes do: check, admit, run and await a request, and reply or refuse.

    A request is checked field by field (``policies.openai_api``), admitted or refused by
    ``policies.admission`` at once, tokenized once (``DecodingController.prepare``, off the
    event loop) and solved by the controller on a worker thread with what is left of its
    deadline, beside every other call in flight.  Parameters as in ``create_app``.
    """

    def __init__(
        self,
        controller: DecodingController,
        latency: ServingLatency,
        served_model_name: str,
        max_calls: int,
        margin_s: float,
        response_margin_s: float,
        max_deadline_s: float,
        max_body_bytes: int,
    ) -> None:
        if max_calls < 1 or margin_s < 0 or response_margin_s < 0:
            raise ValueError("max_calls must be >= 1 and the margins >= 0")
        self.controller, self.engine, self.latency = controller, controller.engine, latency
        self.served_model_name, self.max_calls = served_model_name, max_calls
        self.max_deadline_s, self.max_body_bytes = max_deadline_s, max_body_bytes
        self.response_margin_s = response_margin_s
        self.metrics = ServiceMetrics(controller.n_grid, controller.k_grid)
        self.admission = Admission(
            latency.model, latency.method, latency.answer_lengths, latency.acceptance,
            controller.n_grid, self.engine.config.max_batch, margin_s,
            self.engine.batch.calls_in_flight,
        )  # fmt: skip
        self._running = 0
        self._deciding = 0  # requests between arrival and their verdict (event loop only)
        self._lateness: deque[float] = deque(maxlen=LATENESS_WINDOW)
        self._lock = threading.Lock()
        self.metrics.running.set_function(lambda: self._running)
        self.metrics.live_branches.set_function(lambda: self.engine.batch.load[1])
        self._workers = ThreadPoolExecutor(max_workers=max_calls, thread_name_prefix="tts-call")
        # Prompts are tokenized off the event loop on one long-lived thread: starting a thread
        # per request (a default thread pool under a burst) stalls the loop while each starts.
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tts-tokenize")
        self._tokenizer.submit(lambda: None).result()

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._tokenizer.shutdown(wait=False)

    def _margin(self) -> float:
        """Time kept back from a deadline for handing the answer back: the configured margin
        plus how late recent answers reached the event loop (a busy loop, the last step)."""
        with self._lock:
            return self.response_margin_s + max([0.0, *self._lateness])

    async def complete(self, request: Request, endpoint: str) -> Response:
        """Serve one completion request of ``endpoint`` (``"chat"`` or ``"completions"``)."""
        arrival = time.monotonic()
        status = "500"
        try:
            self._deciding += 1
            try:
                body, problem, deadline, max_tokens, prepared = await self._parse(request, endpoint)
                verdict, ticket = self._admit(problem, prepared, max_tokens, arrival + deadline)
            finally:
                self._deciding -= 1
            try:
                await self._after_pending_verdicts()
                prepared = prepared or await self._prepare(problem, endpoint)
                solution, wanted_n = await self._run(
                    prepared, max_tokens, verdict, ticket, arrival + deadline, request
                )
            finally:
                self._done(ticket)
            reply = self._reply(endpoint, solution, verdict, wanted_n, arrival, deadline)
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

    async def _after_pending_verdicts(self) -> None:
        """Let every request that has arrived get its verdict before this call's work starts
        (at most ``VERDICTS_FIRST_S``).

        The event loop shares the interpreter with the engine thread and a thread per running
        call.  When 50 clients arrive at once, the calls admitted first would otherwise start
        tokenizing, choosing n and k and prefilling at once, and every refusal after them
        would wait its turn for the interpreter behind all of that.  A verdict takes about a
        millisecond of the loop; an admitted call loses at most ``VERDICTS_FIRST_S`` of its
        deadline (within the response margin kept back from every deadline).
        """
        await asyncio.sleep(0)  # handlers of requests that arrived meanwhile start first
        give_up = time.monotonic() + VERDICTS_FIRST_S
        while self._deciding and time.monotonic() < give_up:
            await asyncio.sleep(VERDICT_POLL_S)

    async def _parse(
        self, request: Request, endpoint: str
    ) -> tuple[dict, str, float, int | None, PreparedProblem | None]:
        """Read and check a request: its body, problem, deadline, max_tokens and, when the
        prompt is blank or likely too long, its tokenization (a 400 comes before admission)."""
        body = await read_json(request, self.max_body_bytes)
        problem = problem_of(body, endpoint)
        check_model_and_options(body, self.served_model_name)
        deadline = deadline_of(body, request.headers.get("x-deadline-s"), self.max_deadline_s)
        max_tokens = max_tokens_of(body, self.engine.config.max_tokens)
        prepared = None
        long = self._estimated_prompt_tokens(problem) >= self.engine.config.max_model_len
        if long or not problem.strip():
            prepared = await self._prepare(problem, endpoint)
        return body, problem, deadline, max_tokens, prepared

    async def preview(self, request: Request, endpoint: str) -> dict:
        """Admission's verdict on a request now, without admitting it or holding a place.

        A front end over several replicas (``policies.replica_router``) asks every replica
        this and sends the request to one predicted to fit; the replica still decides again
        when the request itself arrives (``_admit``), so a stale preview never overloads it.
        Checks the request exactly as ``complete`` does (same 4xx errors).
        """
        arrival = time.monotonic()
        _, problem, deadline, max_tokens, prepared = await self._parse(request, endpoint)
        tokens = max_tokens or self.engine.config.max_tokens
        prompt_tokens = (
            prepared.prompt_tokens if prepared else self._estimated_prompt_tokens(problem)
        )
        now = time.monotonic()
        with self._lock:
            running = self._running
            if running >= self.max_calls:
                verdict = Verdict(False, 0, "server_full", math.nan, 1.0)
                message = f"server busy: {running} calls running (max_calls={self.max_calls})"
            else:
                left = self._time_left(arrival + deadline, now)
                _, k = self._expected_start()
                verdict = self.admission.decide(prompt_tokens, k, tokens, left, now)
                message = verdict.message if not verdict.admitted else ""
        calls, branches = self.engine.batch.load
        return {
            "admitted": verdict.admitted,
            "reason": verdict.reason,
            "max_n": verdict.max_n,
            "predicted_s": _finite_or_none(verdict.predicted_s),
            "retry_after_s": _finite_or_none(verdict.retry_after_s),
            "message": message,
            "running": running,
            "engine_calls": calls,
            "live_branches": branches,
        }

    def _time_left(self, deadline_at: float, now: float) -> float:
        """Seconds a call starting now may use: to its deadline, less the response margin and
        the recent lateness of answers (the caller holds ``self._lock``)."""
        return deadline_at - now - self.response_margin_s - max([0.0, *self._lateness])

    @staticmethod
    def _estimated_prompt_tokens(problem: str) -> int:
        return int(len(problem) / CHARS_PER_TOKEN) + TEMPLATE_TOKENS

    def _admit(
        self,
        problem: str,
        prepared: PreparedProblem | None,
        max_tokens: int | None,
        deadline_at: float,
    ) -> tuple[Verdict, int]:
        """Admit the request (holding its place) or raise its 429; before tokenizing, the
        prompt's length is estimated (``CHARS_PER_TOKEN``)."""
        now = time.monotonic()
        tokens = max_tokens or self.engine.config.max_tokens
        prompt_tokens = (
            prepared.prompt_tokens if prepared else self._estimated_prompt_tokens(problem)
        )
        with self._lock:
            if self._running >= self.max_calls:
                self._refuse("server_full", f"server busy: {self._running} calls running "
                             f"(max_calls={self.max_calls})", 1.0)  # fmt: skip
            left = self._time_left(deadline_at, now)
            n, k = self._expected_start()
            verdict = self.admission.decide(prompt_tokens, k, tokens, left, now)
            if not verdict.admitted:
                self._refuse(verdict.reason, verdict.message, verdict.retry_after_s)
            self._running += 1
        return verdict, self.admission.reserve(verdict, k, tokens, now + left, n)

    def _expected_start(self) -> tuple[int, int]:
        """The (n, k) admission expects a new call's controller to choose: the latest call's
        (``DecodingController.last_start``), else the most branches and the least k."""
        return self.controller.last_start or (max(self.controller.n_grid),
                                              min(self.controller.k_grid))  # fmt: skip

    def _done(self, ticket: int) -> None:
        """An admitted request ended (answered, failed or gone)."""
        self.admission.release(ticket)
        with self._lock:
            self._running -= 1

    def _refuse(self, reason: str, message: str, retry_after_s: float) -> None:
        self.metrics.refusals.labels(reason).inc()
        retry = math.ceil(retry_after_s) if math.isfinite(retry_after_s) else None
        headers = {"x-should-retry": "false"}
        if retry is not None:
            headers["retry-after"] = str(max(1, retry))
        message += "; retry later or with a longer deadline"
        param = None if reason == "server_full" else "deadline_s"
        raise APIError(429, message, "overloaded_error", param, reason, headers)

    async def _prepare(self, problem: str, endpoint: str) -> PreparedProblem:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._tokenizer, self.controller.prepare, problem)
        except ValueError as exc:
            raise APIError(400, str(exc), param=PROBLEM_FIELD[endpoint]) from exc

    async def _run(
        self,
        prepared: PreparedProblem,
        max_tokens: int | None,
        verdict: Verdict,
        ticket: int,
        deadline_at: float,
        request: Request,
    ) -> tuple[Solution, int]:
        """Solve on a worker thread with what is left of the deadline (abort on disconnect);
        the solution and the n the controller wanted before admission's cap."""
        cancel = threading.Event()
        work_deadline = deadline_at - self._margin()
        wanted = [0]  # the controller's n, told before the admission's cap

        def started(n: int, k: int) -> None:
            self.admission.release(ticket)  # the engine counts the call from now on
            wanted[0] = n
            if n > verdict.max_n:
                self.metrics.degraded.inc()

        loop = asyncio.get_running_loop()
        try:
            left = work_deadline - time.monotonic()
            if left <= 0:
                raise APIError(503, "the deadline passed before the call could start",
                               "overloaded_error", code="deadline_expired")  # fmt: skip
            work = functools.partial(self.controller.solve, prepared, left, cancel,
                                     max_tokens=max_tokens, max_n=verdict.max_n,
                                     on_start=started)  # fmt: skip
            future = loop.run_in_executor(self._workers, work)
            while not future.done():
                await asyncio.wait([future], timeout=DISCONNECT_POLL_S)
                if not future.done() and await request.is_disconnected():
                    cancel.set()
                    self.metrics.cancellations.inc()
                    raise _ClientGone
            solution = future.result()
            self.latency.observe(solution.branches)  # the served answers' lengths
            with self._lock:
                self._lateness.append(max(0.0, time.monotonic() - work_deadline))
            return solution, wanted[0]
        except ValueError as exc:  # the controller refused the request before the engine ran
            raise APIError(400, str(exc)) from exc
        finally:
            cancel.set()  # no-op once answered; aborts the call if the handler was cancelled

    def _reply(
        self,
        endpoint: str,
        solution: Solution,
        verdict: Verdict,
        wanted_n: int,
        arrival: float,
        deadline: float,
    ) -> dict:
        """Record the served request's metrics and build its OpenAI body with the tts field."""
        latency = time.monotonic() - arrival
        self.metrics.latency.observe(latency)
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
            "stopped_by": solution.stopped_by,
            "stop_reason": solution.stop_reason,
            "k_changes": solution.k_changes,
            "decisions": solution.decisions,
            "votes": solution.votes,
            "confidence": solution.confidence,
            "batch_max": solution.batch_max,
            "admission": {
                "reason": verdict.reason,
                "max_n": verdict.max_n,
                "predicted_s": verdict.predicted_s,
                "wanted_n": wanted_n,
                "degraded": wanted_n > solution.n,
            },
            "branches": solution.branches,
        }
        return completion_body(endpoint, self.served_model_name, solution, tts)

    def health(self) -> dict:
        calls, branches = self.engine.batch.load
        return {
            "status": "ok",
            "model": self.served_model_name,
            "running": self._running,
            "engine_calls": calls,
            "live_branches": branches,
            "engine_idle": self._running == 0 and calls == 0,
            "latency_factors": {
                f"{key.method}/{key.k}": round(f, 3)
                for key, f in self.latency.correction.factors().items()
            },
        }


def create_app(
    controller: DecodingController,
    latency: ServingLatency,
    served_model_name: str = SERVED_MODEL_NAME,
    max_calls: int = 64,
    margin_s: float = 0.5,
    response_margin_s: float = 0.2,
    max_deadline_s: float = MAX_DEADLINE_S,
    max_body_bytes: int = 1_000_000,
) -> FastAPI:
    """The FastAPI app serving ``controller`` (see the module docstring for the API).

    :param controller: the decoding controller; concurrent calls share its engine's batch.
    :param latency: the corrected latency model and profile figures admission predicts with
        (``ServingLatency.from_profile``; it listens to the engine's steps).
    :param served_model_name: the only ``model`` accepted (others get 404 model_not_found).
    :param max_calls: most calls running at once; more are refused (429 server_full).
        1 serves one call at a time.
    :param margin_s: least time every call must be predicted to have left at its answer for a
        new one to be admitted (else 429 engine_busy or deadline_unmeetable).
    :param response_margin_s: least time kept back from each deadline for building and sending
        the reply; raised by how late recent answers reached the event loop.
    :param max_deadline_s: largest accepted ``deadline_s``.
    :param max_body_bytes: largest accepted request body (413 beyond).
    """
    service = CompletionService(
        controller,
        latency,
        served_model_name,
        max_calls,
        margin_s,
        response_margin_s,
        max_deadline_s,
        max_body_bytes,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    sys.setswitchinterval(GIL_SWITCH_S)
    app = FastAPI(title="Latency-aware test-time scaling", lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    _add_routes(app, service)
    return app


def _add_routes(app: FastAPI, service: CompletionService) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await service.complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await service.complete(request, "completions")

    @app.post("/v1/admission")
    async def admission_preview(request: Request, endpoint: str = "chat") -> dict:
        """Admission's verdict on a completion body, without running it (``preview``)."""
        if endpoint not in ADMISSION_ENDPOINTS:
            raise APIError(400, f"endpoint must be one of {ADMISSION_ENDPOINTS}, got "
                           f"{endpoint!r}", param="endpoint")  # fmt: skip
        return await service.preview(request, endpoint)

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


def _finite_or_none(value: float) -> float | None:
    """JSON has no infinity or NaN: such a figure (none predicted) is sent as null."""
    return value if math.isfinite(value) else None


def _response(reply: dict, streamed: bool) -> Response:
    """The reply as one JSON body, or (``stream: true``) as server-sent chunk events."""
    if not streamed:
        return JSONResponse(reply)
    events = sse_events(completion_chunks(reply))
    return StreamingResponse(events, media_type="text/event-stream")


class _ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


def serving_parts(
    policy_dir: str | Path,
    spec_method: str | None = None,
    max_tokens: int = 512,
    max_batch: int = 64,
    kv_cache_gb: float = 2.0,
    calibrate_s: float = 60.0,
) -> tuple[DecodingController, ServingLatency]:
    """Load a saved race policy, start an engine sized for its grids and speculative method,
    and fit the latency model of the policy's profile to this machine (``calibrate_s``,
    progress shown): what ``create_app`` serves.  Everything built so far is then frozen out of
    the cyclic garbage collector (``freeze_startup_objects``).

    :raises SystemExit: with the reason, when there is no policy, it must be retrained, or its
        profile is missing.
    """
    from engine.vllm_engine import EngineConfig, VLLMEngine
    from policies.saved_policy import load_race_policy

    if not (Path(policy_dir) / "policy.json").is_file():
        raise SystemExit(
            f"no policy at {policy_dir}: train one (python train.py) and pass its policy "
            "folder with --policy (or copy it there)"
        )
    try:
        policy = load_race_policy(policy_dir)
    except ValueError as error:  # e.g. a one-decision (v0) policy: the message says retrain
        raise SystemExit(f"cannot serve {policy_dir}: {error}") from None
    profile = (policy.info.get("profile") or {}).get("name")
    if not profile:
        raise SystemExit(f"policy {policy_dir} does not name the profile it was trained on")
    n_grid, k_grid = policy.env_config.n_grid or (1,), policy.env_config.k_grid or (0,)
    method = spec_method or policy.info.get("spec_method") or "draft_model"
    config = EngineConfig(
        spec_method=None if method == NO_SPECULATION else method,
        max_n=max(n_grid),
        k_max=max(max(k_grid), 1),
        max_tokens=max_tokens,
        max_batch=max_batch,
        kv_cache_gb=kv_cache_gb,
    )
    controller = DecodingController(policy, VLLMEngine(config))
    try:
        latency = ServingLatency.from_profile(profile, controller.engine, calibrate_s=calibrate_s)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"cannot predict latency from profile {profile!r}: {error}") from None
    freeze_startup_objects()
    return controller, latency


def freeze_startup_objects() -> int:
    """Move every object alive now (the engine, model and policy: about 900,000 of them) out
    of reach of the cyclic garbage collector (``gc.freeze``); return how many are frozen.

    Why: a full collection stops every thread, the HTTP event loop included, while it scans
    the whole heap.  Measured on this CPU during the 50-client stress level (two runs each,
    scratch ``gc.callbacks`` timing): full collections took 52-68 ms, and refusals reached
    59 ms; after the freeze the one full collection took 18 ms and no refusal passed 42 ms.
    Objects made while serving are still collected as usual.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def app_for_policy(
    policy_dir: str | Path,
    spec_method: str | None = None,
    max_tokens: int = 512,
    max_batch: int = 64,
    kv_cache_gb: float = 2.0,
    calibrate_s: float = 60.0,
    **app_options,
) -> FastAPI:
    """``create_app`` (``app_options``: its options) over ``serving_parts`` of a policy."""
    controller, latency = serving_parts(
        policy_dir, spec_method, max_tokens, max_batch, kv_cache_gb, calibrate_s
    )
    return create_app(controller, latency, **app_options)


def main() -> None:
    """Command line: build the app for a policy (``app_for_policy``) and serve it."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    add_serving_arguments(parser)
    args = parser.parse_args()
    app = app_for_policy(
        args.policy, args.spec_method, args.max_tokens, args.max_batch, args.kv_cache_gb,
        calibrate_s=args.calibrate_s, served_model_name=args.served_model_name,
        max_calls=args.max_calls, margin_s=args.margin_s, max_deadline_s=args.max_deadline_s,
    )  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
