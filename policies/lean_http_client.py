"""A minimal asyncio HTTP/1.1 client for the serving benchmark's arrival burst.

Why not httpx there: 50 clients sharing one ``httpx.AsyncClient`` on one event loop serialise
their own request building, connection pooling and response parsing, so on a 2-core machine
the last request of a burst of 50 leaves the client tens of milliseconds after the first, and
the client's own queue is counted in each refusal's time.  Measured with
``python -m policies.bench_server --clients 1 --modes batched --duration 30`` (runs/bench_stress7,
the stress level's ``floor`` rows: a bare app that refuses every request at once): the burst's
slowest refusal took 53 ms through httpx and 11 ms through this client; against the real server,
82 ms and 25 ms, while no refusal spent more than 1.3 ms inside the app.  Users on their own
machines do not queue behind each other's clients, so the stress level measures with both.

This client sends each request on a fresh TCP connection (as a new user would), written as
bytes in one call, and reads back the status line, headers and a ``Content-Length`` body.  It
speaks only what the server answers to a non-streaming request (no chunked bodies, TLS or
redirects) and fails loudly on anything else.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class LeanResponse:
    """The parts of a response the benchmark reads (``httpx.Response``'s names)."""

    status_code: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class LeanClient:
    """``await LeanClient(timeout).post(url, json=body)``: one POST on a fresh connection."""

    def __init__(self, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.timeout = timeout

    async def post(self, url: str, json: dict) -> LeanResponse:
        return await asyncio.wait_for(self._post(url, json), self.timeout)

    async def _post(self, url: str, body: dict) -> LeanResponse:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"LeanClient speaks plain http://host:port/... only, got {url!r}")
        payload = json.dumps(body, separators=(",", ":")).encode()
        head = (
            f"POST {parts.path or '/'} HTTP/1.1\r\nhost: {parts.netloc}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n"
            "connection: close\r\n\r\n"
        )
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            writer.write(head.encode("latin-1") + payload)
            return await read_response(reader)
        finally:
            writer.close()


async def read_response(reader: asyncio.StreamReader) -> LeanResponse:
    """Status line, headers (names lower-cased) and a ``Content-Length`` body."""
    status_line = await reader.readline()
    fields = status_line.split(maxsplit=2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/1."):
        raise ConnectionError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" not in headers:
        raise ConnectionError(
            f"response without Content-Length (transfer-encoding "
            f"{headers.get('transfer-encoding')!r}): LeanClient reads sized bodies only"
        )
    body = await reader.readexactly(int(headers["content-length"]))
    return LeanResponse(int(fields[1]), headers, body)
