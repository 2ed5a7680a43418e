"""One OpenAI-compatible front end over several server replicas, admitting by every replica's
predicted load.

Each replica is a whole ``policies.server`` (its own engine, controller and predictive
admission) on its own port; ``policies.serve_replicas`` starts them as Ray actors.  This front
end serves the same API (``/v1/chat/completions``, ``/v1/completions``, ``stream``, the same
error shape, ``/v1/models``, ``/health``, ``/metrics``) and, per request:

1. checks what it can alone (JSON body, model, ``deadline_s`` in the body or ``X-Deadline-S``),
   so a malformed request costs the replicas nothing;
2. asks every replica at once for admission's verdict on this very request
   (``POST /v1/admission``: the replica's own latency model, corrected on its machine, over the
   calls it is running now; nothing is reserved).  A 4xx there (blank or over-long prompt, bad
   ``max_tokens``) is the request's fault and is answered as it is;
3. sends the request to the best replica that is predicted to fit (``rank``), with the time
   left of its deadline less ``response_margin_s`` for this hop; if that replica refuses it
   after all (429: the load changed since the preview), the next one, and so on;
4. refuses with 429 only when no replica fits, with the smallest ``Retry-After`` over the
   replicas (none when no replica could meet the deadline even idle) and every replica's reason.

Why previews and not load figures pushed by the replicas: admission depends on the request
(its prompt length, ``max_tokens`` and deadline) and on the calls in flight to the second; a
preview answers exactly that in about a millisecond of replica time, while pushed figures are
stale by their period and would have to re-implement admission here.  The replica still decides
again when the request arrives, so a stale preview can cost a retry, never a late answer.

The reply is the replica's, with ``tts.replica`` (its index) and ``tts.routing`` (the previews
and the replicas that refused) added; streamed replies are built here from it
(``policies.openai_api.completion_chunks``), as the server does.  A client that disconnects
closes the forwarded connection, which aborts the call on its replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.requests import ClientDisconnect

from policies.openai_api import (
    MAX_DEADLINE_S,
    SERVED_MODEL_NAME,
    APIError,
    check_model_and_options,
    completion_chunks,
    deadline_of,
    install_error_handlers,
    read_json,
    sse_events,
)

DISCONNECT_POLL_S = 0.1
PREVIEW_TIMEOUT_S = 2.0
"""A replica that does not answer a preview within this is skipped for the request."""
RESPONSE_MARGIN_S = 0.1
"""Kept back from every deadline for the front end's own hop (see ``ReplicaRouter``)."""
FORWARD_SLACK_S = 10.0
"""Beyond the deadline, how long to wait for a replica's reply before taking it for lost (a
replica answers by the deadline by construction; this only bounds a hung one)."""
PASSED_HEADERS = ("retry-after", "x-should-retry")
RETRY_HINT = "; retry later or with a longer deadline"
"""The tail of a replica's 429 message, dropped when the front end quotes it."""


@dataclass(frozen=True)
class ReplicaVerdict:
    """One replica's admission verdict on one request (``POST /v1/admission``, or a 429 it
    answered to the request itself).

    :param running: calls the replica is running (admitted, not answered) when it answered.
    """

    replica: int
    admitted: bool
    reason: str
    max_n: int = 0
    predicted_s: float | None = None
    retry_after_s: float | None = None
    message: str = ""
    running: int = 0


def rank(verdicts: Sequence[ReplicaVerdict | None], in_flight: Sequence[int]) -> list[int]:
    """The replicas predicted to fit, best first.

    Best: the most branches admission allows (the answer's quality), then the fewest calls
    running there (the replica's count, or this front end's requests sent to it and not yet
    answered when that is larger: it also counts requests sent since the preview), then the
    earliest predicted answer, then the lower index.  ``None`` marks a replica that did not
    answer the preview.
    """
    admitted = [v for v in verdicts if v is not None and v.admitted]

    def key(v: ReplicaVerdict) -> tuple[int, int, float, int]:
        predicted = v.predicted_s if v.predicted_s is not None else math.inf
        return (-v.max_n, max(v.running, in_flight[v.replica]), predicted, v.replica)

    return [v.replica for v in sorted(admitted, key=key)]


class RoutedRefusal(APIError):
    """429 from the front end: no replica is predicted to answer in time.  The error body
    also lists every replica's verdict (``error.replicas``), so a client sees why."""

    def __init__(self, refusals: Sequence[ReplicaVerdict], replicas: int) -> None:
        finite = [v.retry_after_s for v in refusals if v.retry_after_s is not None]
        headers = {"x-should-retry": "false"}
        if finite:
            headers["retry-after"] = str(max(1, math.ceil(min(finite))))
        reasons = {v.reason for v in refusals}
        reason = next(iter(reasons)) if len(reasons) == 1 else "engine_busy"
        why = "; ".join(f"replica {v.replica}: {v.message or v.reason}" for v in refusals)
        message = (f"no replica of {replicas} can answer within the deadline ({why}); retry "
                   "later or with a longer deadline")  # fmt: skip
        param = None if reason == "server_full" else "deadline_s"
        super().__init__(429, message, "overloaded_error", param, reason, headers)
        self.refusals = list(refusals)

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param,
                 "code": self.code, "replicas": [asdict(v) for v in self.refusals]}  # fmt: skip
        return JSONResponse({"error": error}, self.status, headers=self.headers)


class _ReplicaError(Exception):
    """A replica's own error reply (4xx/5xx other than 429), handed to the client as is."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.status_code)
        self.response = response

    def as_response(self) -> Response:
        headers = {k: v for k, v in self.response.headers.items() if k.lower() in PASSED_HEADERS}
        media = self.response.headers.get("content-type", "application/json")
        return Response(self.response.content, self.response.status_code, headers, media)


class _ClientGone(Exception):
    """The client disconnected while its request was forwarded."""


class RouterMetrics:
    """The front end's Prometheus metrics (each replica keeps its own on its port)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "tts_router_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.routed = Counter(
            "tts_router_routed", "Requests answered, by replica", ["replica"], registry=r
        )
        self.refusals = Counter(
            "tts_router_refusals", "Requests no replica admitted", ["reason"], registry=r
        )
        self.retries = Counter(
            "tts_router_retries",
            "Requests a replica refused after its preview admitted them (sent to the next)",
            registry=r,
        )


class ReplicaRouter:
    """What the front end's routes do (see the module docstring).

    :param urls: the replicas' base URLs (``http://host:port``), index = position.
    :param served_model_name: the only ``model`` accepted (the replicas serve the same).
    :param max_deadline_s: largest accepted ``deadline_s`` (the replicas' own limit).
    :param max_body_bytes: largest accepted request body (413 beyond).
    :param preview_timeout_s: how long a replica may take to answer a preview.
    :param response_margin_s: time kept back from each deadline for the front end's own hop
        (forwarding, relaying the reply): a replica gets the deadline less this.
    """

    def __init__(
        self,
        urls: Sequence[str],
        served_model_name: str = SERVED_MODEL_NAME,
        max_deadline_s: float = MAX_DEADLINE_S,
        max_body_bytes: int = 1_000_000,
        preview_timeout_s: float = PREVIEW_TIMEOUT_S,
        response_margin_s: float = RESPONSE_MARGIN_S,
    ) -> None:
        if not urls:
            raise ValueError("a replica router needs at least one replica URL")
        bad = [u for u in urls if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"replica URLs must start with http:// or https://, got {bad}")
        if preview_timeout_s <= 0 or response_margin_s < 0:
            raise ValueError(f"preview_timeout_s must be > 0 and response_margin_s >= 0, got "
                             f"{preview_timeout_s!r}, {response_margin_s!r}")  # fmt: skip
        self.urls = [u.rstrip("/") for u in urls]
        self.served_model_name, self.max_deadline_s = served_model_name, max_deadline_s
        self.max_body_bytes, self.preview_timeout_s = max_body_bytes, preview_timeout_s
        self.response_margin_s = response_margin_s
        self.in_flight = [0] * len(self.urls)
        self.metrics = RouterMetrics()
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self.client = httpx.AsyncClient(timeout=None, limits=limits)

    async def close(self) -> None:
        await self.client.aclose()

    async def complete(self, request: Request, endpoint: str) -> Response:
        """Serve one completion request of ``endpoint`` (``"chat"`` or ``"completions"``)."""
        arrival = time.monotonic()
        status = "500"
        try:
            body = await read_json(request, self.max_body_bytes)
            check_model_and_options(body, self.served_model_name)
            deadline = deadline_of(body, request.headers.get("x-deadline-s"), self.max_deadline_s)
            reply, replica = await self._route(body, endpoint, arrival + deadline, request)
            status = "200"
            self.metrics.routed.labels(str(replica)).inc()
            headers = {"x-tts-replica": str(replica)}
            if body.get("stream") is True:
                events = sse_events(completion_chunks(reply))
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            return JSONResponse(reply, headers=headers)
        except RoutedRefusal as err:
            status = "429"
            self.metrics.refusals.labels(err.code or "").inc()
            raise
        except APIError as err:
            status = str(err.status)
            raise
        except _ReplicaError as err:
            status = str(err.response.status_code)
            return err.as_response()
        except (ClientDisconnect, _ClientGone):
            status = "499"
            return Response(status_code=499)
        finally:
            self.metrics.requests.labels(endpoint, status).inc()

    async def _route(
        self, body: dict, endpoint: str, deadline_at: float, request: Request
    ) -> tuple[dict, int]:
        """Preview on every replica, then send to the best that fits until one answers."""
        forward = {**body, "stream": False}
        forward.pop("stream_options", None)
        deadline_at -= self.response_margin_s  # what a replica may use
        verdicts = await self._previews(forward, endpoint, deadline_at)
        refused = [v for v in verdicts if v is not None and not v.admitted]
        tried: list[int] = []
        while True:
            order = [i for i in rank(verdicts, self.in_flight) if i not in tried]
            if not order:
                break
            replica = order[0]
            tried.append(replica)
            left = deadline_at - time.monotonic()
            if left <= 0:
                raise APIError(503, "the deadline passed before a replica could be asked",
                               "overloaded_error", code="deadline_expired")  # fmt: skip
            try:
                response = await self._forward(replica, endpoint, {**forward, "deadline_s": left},
                                               left, request)  # fmt: skip
            except httpx.HTTPError:  # replica gone mid-call: the next one, with the time left
                continue
            if response.status_code == 429:
                self.metrics.retries.inc()
                refused.append(_verdict_of_refusal(replica, response))
                continue
            if response.status_code != 200:
                raise _ReplicaError(response)
            reply = response.json()
            reply["tts"]["replica"] = replica
            reply["tts"]["routing"] = {
                "previews": [asdict(v) for v in verdicts if v is not None],
                "refused_by": [v.replica for v in refused if v.replica in tried],
                "unreachable": [i for i, v in enumerate(verdicts) if v is None],
            }
            return reply, replica
        if not refused:
            raise APIError(503, f"no replica of {len(self.urls)} answered", "overloaded_error",
                           code="replicas_unavailable")  # fmt: skip
        raise RoutedRefusal(_latest_per_replica(refused), len(self.urls))

    async def _previews(
        self, body: dict, endpoint: str, deadline_at: float
    ) -> list[ReplicaVerdict | None]:
        """Every replica's verdict on ``body`` now (``None``: it did not answer in time)."""
        payload = {**body, "deadline_s": max(deadline_at - time.monotonic(), 1e-6)}

        async def ask(index: int) -> ReplicaVerdict | None:
            try:
                response = await self.client.post(
                    f"{self.urls[index]}/v1/admission", params={"endpoint": endpoint},
                    json=payload, timeout=self.preview_timeout_s,
                )  # fmt: skip
            except httpx.HTTPError:
                return None
            if 400 <= response.status_code < 500:  # the request's fault: same on every replica
                raise _ReplicaError(response)
            if response.status_code != 200:
                return None
            v = response.json()
            return ReplicaVerdict(index, bool(v["admitted"]), str(v["reason"]), int(v["max_n"]),
                                  v.get("predicted_s"), v.get("retry_after_s"),
                                  str(v.get("message", "")), int(v.get("running", 0)))  # fmt: skip

        return list(await asyncio.gather(*(ask(i) for i in range(len(self.urls)))))

    async def _forward(
        self, replica: int, endpoint: str, body: dict, left: float, request: Request
    ) -> httpx.Response:
        """Send the request to one replica and wait for its reply; a client disconnect cancels
        it (the replica sees its connection close and aborts the call)."""
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        self.in_flight[replica] += 1
        try:
            sent = self.client.post(f"{self.urls[replica]}{path}", json=body,
                                    timeout=left + FORWARD_SLACK_S)  # fmt: skip
            task = asyncio.ensure_future(sent)
            while not task.done():
                await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                        await task
                    raise _ClientGone
            return task.result()
        finally:
            self.in_flight[replica] -= 1

    async def health(self) -> dict:
        """Every replica's ``/health`` (or why it could not be read)."""

        async def read(url: str) -> dict:
            try:
                response = await self.client.get(f"{url}/health", timeout=self.preview_timeout_s)
                return {"url": url, **response.json()}
            except (httpx.HTTPError, ValueError) as exc:
                return {"url": url, "status": "unreachable", "error": type(exc).__name__}

        replicas = await asyncio.gather(*(read(u) for u in self.urls))
        up = sum(r.get("status") == "ok" for r in replicas)
        status = "ok" if up == len(replicas) else ("degraded" if up else "down")
        return {"status": status, "model": self.served_model_name, "replicas": list(replicas)}


def _verdict_of_refusal(replica: int, response: httpx.Response) -> ReplicaVerdict:
    """The verdict a replica's 429 carries (its Retry-After, reason code and message)."""
    try:
        error = response.json().get("error", {})
    except ValueError:
        error = {}
    retry = response.headers.get("retry-after")
    return ReplicaVerdict(
        replica,
        False,
        str(error.get("code") or "engine_busy"),
        retry_after_s=float(retry) if retry and retry.isdigit() else None,
        message=str(error.get("message", "")).removesuffix(RETRY_HINT),
    )


def _latest_per_replica(refusals: Sequence[ReplicaVerdict]) -> list[ReplicaVerdict]:
    """One refusal per replica, its latest, in replica order."""
    latest = {v.replica: v for v in refusals}
    return [latest[i] for i in sorted(latest)]


def create_router_app(urls: Sequence[str], **options) -> FastAPI:
    """The front end's FastAPI app over the replicas at ``urls`` (``options``:
    ``ReplicaRouter``'s)."""
    router = ReplicaRouter(urls, **options)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await router.close()

    app = FastAPI(title="Latency-aware test-time scaling over replicas", lifespan=lifespan)
    app.state.router = router
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await router.complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await router.complete(request, "completions")

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": router.served_model_name, "object": "model", "created": 0,
                 "owned_by": "local"}  # fmt: skip
        return {"object": "list", "data": [entry]}

    @app.get("/health")
    async def health() -> dict:
        return await router.health()

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
