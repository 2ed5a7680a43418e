"""The OpenAI wire format of the server: parsing requests, building responses and errors.

Requests are validated by hand rather than by a schema library so that every malformed input
(bad JSON, wrong types, missing fields, NaN or out-of-range numbers, oversized bodies) gets one
plain sentence naming the field, in OpenAI's error shape ``{"error": {"message", "type",
"param", "code"}}``, and so that ``deadline_s`` is checked the same way whether it comes in the
body or in the ``X-Deadline-S`` header.  Sampling fields the controller decides itself
(temperature, top_p, ...) are accepted and ignored; ``n`` > 1 is refused.

``stream: true`` is served as server-sent events in OpenAI's chunk format
(``completion_chunks``, ``sse_events``), but only once the call is done: the answer is a vote
over the branches, so no text is known before the race ends.  The chunks are the role (chat),
the voted answer, and a last chunk with ``finish_reason``, ``usage`` and the ``tts`` field.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

if TYPE_CHECKING:
    from policies.controller import Solution

PROBLEM_FIELD = {"chat": "messages", "completions": "prompt"}
SERVED_MODEL_NAME = "latency-tts-smollm2"
"""The ``model`` a server (or the front end over replicas) answers to by default."""
MAX_DEADLINE_S = 600.0
"""Largest ``deadline_s`` accepted by default: an open-ended request could hold an engine."""


class APIError(Exception):
    """An error to answer with ``status`` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_
        self.param, self.code, self.headers = param, code, headers

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, self.status, headers=self.headers)


async def read_json(request: Request, limit: int) -> dict:
    """The request body as a JSON object, read up to ``limit`` bytes (413 beyond)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def problem_of(body: dict, endpoint: str) -> str:
    """The problem text: the last user message (chat) or the prompt (completions)."""
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be one string", param="prompt")
        return prompt
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(
            400, "'messages' must be a non-empty list of {role, content}", param="messages"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(
                400, f"messages[{i}] must be an object with a string 'role'", param="messages"
            )
    users = [i for i, message in enumerate(messages) if message["role"] == "user"]
    if not users:
        raise APIError(400, "'messages' has no user message (the problem)", param="messages")
    content = messages[users[-1]].get("content")
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(
            400,
            f"messages[{users[-1]}].content must be a string or a list of text parts",
            param="messages",
        )
    return content


def check_model_and_options(body: dict, served: str) -> None:
    """404 for another model than ``served``; 400 for options this server cannot honour."""
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "'model' must be a string naming the served model", param="model")
    if model != served:
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves '{served}'",
            "invalid_request_error",
            "model",
            "model_not_found",
        )
    if not isinstance(body.get("stream", False), bool | None):
        raise APIError(400, f"stream must be a boolean, got {body['stream']!r}", param="stream")
    if body.get("n") not in (None, 1):
        raise APIError(
            400,
            "n must be 1: one voted answer is returned; the policy chooses "
            "how many branches to sample (tts.n)",
            param="n",
        )


def deadline_of(body: dict, header: str | None, max_deadline_s: float) -> float:
    """``deadline_s`` from the body, else from the ``X-Deadline-S`` header: finite, in (0, max]."""
    value: Any = body.get("deadline_s")
    if value is None and header is not None:
        try:
            value = float(header)
        except ValueError:
            raise APIError(
                400, f"X-Deadline-S must be a number of seconds, got {header!r}", param="deadline_s"
            ) from None
    if value is None:
        raise APIError(
            400,
            "deadline_s is required: seconds from arrival, in the body or the X-Deadline-S header",
            param="deadline_s",
        )
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise APIError(
            400, f"deadline_s must be a number of seconds, got {value!r}", param="deadline_s"
        )
    if not 0 < value <= max_deadline_s:  # also false for NaN, and safe for huge ints
        raise APIError(
            400,
            f"deadline_s must be a finite number of seconds in (0, "
            f"{max_deadline_s:g}], got {value!r}",
            param="deadline_s",
        )
    return float(value)


def max_tokens_of(body: dict, limit: int) -> int | None:
    """``max_completion_tokens`` or ``max_tokens`` (per branch), in 1..limit, or None."""
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise APIError(
            400, f"{name} must be an integer in 1..{limit} (per branch), got {value!r}", param=name
        )
    return value


def completion_body(endpoint: str, model: str, solution: Solution, tts: dict) -> dict:
    """An OpenAI chat.completion or text_completion whose text is the voted answer.

    No answer in time gives empty text with ``finish_reason == "length"``.  ``usage`` counts
    the prompt once and the tokens of every branch.  ``tts`` is the extension field.
    """
    text = solution.answer or ""
    finish = "stop" if solution.answer is not None else "length"
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if endpoint == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    prefix, kind = (
        ("chatcmpl", "chat.completion") if endpoint == "chat" else ("cmpl", "text_completion")
    )
    usage = {
        "prompt_tokens": solution.prompt_tokens,
        "completion_tokens": solution.completion_tokens,
        "total_tokens": solution.prompt_tokens + solution.completion_tokens,
    }
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
        "tts": tts,
    }


def completion_chunks(body: dict) -> list[dict]:
    """The streamed form of a ``completion_body``: the same id, created and model.

    Chat: a chunk with the assistant role, one with the answer as ``delta.content`` and a last
    one with an empty delta; completions: one with the answer as ``text`` and a last one with
    empty text.  The last chunk carries ``finish_reason``, ``usage`` and ``tts``; the others
    have ``finish_reason: null``.
    """
    chat = body["object"] == "chat.completion"
    head = {
        "id": body["id"],
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": body["created"],
        "model": body["model"],
    }
    choice = body["choices"][0]

    def chunk(part: dict, finish: str | None = None, **extra: Any) -> dict:
        parts = {"index": 0, **part, "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [parts], **extra}

    if chat:
        parts = [{"delta": {"role": "assistant", "content": ""}}]
        parts.append({"delta": {"content": choice["message"]["content"]}})
        last = {"delta": {}}
    else:
        parts, last = [{"text": choice["text"]}], {"text": ""}
    end = chunk(last, choice["finish_reason"], usage=body["usage"], tts=body["tts"])
    return [*(chunk(part) for part in parts), end]


def sse_events(chunks: list[dict]) -> Iterator[bytes]:
    """Server-sent events: one ``data:`` event per chunk, then ``data: [DONE]``."""
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n".encode()
    yield b"data: [DONE]\n\n"


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` in OpenAI's error shape: ``APIError`` as raised, HTTP errors
    of the framework (404 route, 405 method) with their status, anything else as a 500."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return APIError(exc.status_code, str(exc.detail)).response()


async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()
