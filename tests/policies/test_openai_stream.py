"""``stream: true`` in OpenAI's chunk format, read by the real openai client (no engine: the
server's bytes are served by an httpx mock transport).  End to end on the engine:
``tests/policies/test_server.py``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import openai
import pytest

from policies.openai_api import (
    APIError,
    check_model_and_options,
    completion_body,
    completion_chunks,
    sse_events,
)

MODEL = "served"
TTS = {"answer": "42", "n": 4}


def _solution(answer: str | None) -> SimpleNamespace:
    return SimpleNamespace(answer=answer, prompt_tokens=10, completion_tokens=30)


def _client(endpoint: str, answer: str | None) -> openai.OpenAI:
    """An openai client whose every request gets the streamed reply of ``answer``."""
    reply = completion_body(endpoint, MODEL, _solution(answer), TTS)
    body = b"".join(sse_events(completion_chunks(reply)))
    headers = {"content-type": "text/event-stream"}
    transport = httpx.MockTransport(lambda _: httpx.Response(200, content=body, headers=headers))
    return openai.OpenAI(
        base_url="http://test/v1", api_key="x", http_client=httpx.Client(transport=transport)
    )


@pytest.mark.parametrize(("answer", "finish"), [("42", "stop"), (None, "length")])
def test_streamed_chat_chunks_read_by_the_openai_client(answer, finish):
    chunks = list(
        _client("chat", answer).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "q"}], stream=True
        )
    )
    assert [c.object for c in chunks] == ["chat.completion.chunk"] * 3
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {c.model for c in chunks} == {MODEL} and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (answer or "")
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, finish]
    assert chunks[-1].choices[0].delta.content is None
    assert chunks[-1].usage.total_tokens == 40 and chunks[-1].model_extra["tts"] == TTS
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_completion_chunks_read_by_the_openai_client():
    chunks = list(_client("completions", "42").completions.create(
        model=MODEL, prompt="q", stream=True
    ))  # fmt: skip
    assert [c.object for c in chunks] == ["text_completion"] * 2
    assert chunks[0].id == chunks[1].id and chunks[0].id.startswith("cmpl-")
    assert [c.choices[0].text for c in chunks] == ["42", ""]
    assert [c.choices[0].finish_reason for c in chunks] == [None, "stop"]
    assert chunks[-1].usage.completion_tokens == 30 and chunks[-1].model_extra["tts"] == TTS


def test_sse_framing_ends_with_done():
    events = list(sse_events([{"a": 1}]))
    assert events == [b'data: {"a": 1}\n\n', b"data: [DONE]\n\n"]
    assert json.loads(events[0][len(b"data: ") :]) == {"a": 1}


@pytest.mark.parametrize("stream", [None, False, True])
def test_stream_flags_are_accepted(stream):
    check_model_and_options({"model": MODEL, "stream": stream}, MODEL)


@pytest.mark.parametrize("stream", ["yes", 1, {}])
def test_a_stream_that_is_not_a_boolean_is_a_400(stream):
    with pytest.raises(APIError, match="stream must be a boolean") as info:
        check_model_and_options({"model": MODEL, "stream": stream}, MODEL)
    assert info.value.status == 400 and info.value.param == "stream"
