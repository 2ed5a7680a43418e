"""An admitted call lets the requests that arrived with it get their verdicts first
(``CompletionService._after_pending_verdicts``; the burst itself: ``test_server``'s load test
and ``./run policies.bench_server``'s stress level)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from policies.server import VERDICTS_FIRST_S, CompletionService


async def _admitted_call_waits(decisions_s: float) -> tuple[float, float]:
    """An admitted call starts while another request is still being decided (for
    ``decisions_s``); returns when the decision ended and when the call went on."""
    service = SimpleNamespace(_deciding=1)
    ended: list[float] = []

    async def other_request() -> None:
        await asyncio.sleep(decisions_s)
        service._deciding -= 1
        ended.append(time.monotonic())

    started = time.monotonic()
    other = asyncio.create_task(other_request())
    await CompletionService._after_pending_verdicts(service)
    went_on = time.monotonic()
    await other
    return ended[0] - started, went_on - started


def test_an_admitted_call_waits_for_the_verdicts_in_progress():
    decided, went_on = asyncio.run(_admitted_call_waits(0.02))
    assert decided <= went_on < VERDICTS_FIRST_S


def test_an_admitted_call_waits_no_longer_than_its_bound():
    decided, went_on = asyncio.run(_admitted_call_waits(4 * VERDICTS_FIRST_S))
    assert VERDICTS_FIRST_S <= went_on < decided
