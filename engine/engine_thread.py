"""The one thread that does every piece of engine compute in this process.

On the CPU build, the thread that builds a vLLM engine is the one that runs it fast: the same
64-token call took 3.3-3.9 s stepped on the building thread and 6.6-7.1 s stepped from another
one, and once two threads had run engine steps both stayed slow (measured here with
``LLMEngine.step()`` loops; PyTorch's OpenMP worker teams belong to the thread that starts a
parallel region, and two teams compete for the two cores).  So every engine in the process is
built, stepped, benchmarked and shut down on one long-lived worker thread, and callers hand
work to it with ``call`` (wait for the result) or ``submit`` (get a future).  Work submitted
from the engine thread itself runs inline, so engine code may call these freely.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

THREAD_NAME = "vllm-engine"
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)


def on_engine_thread() -> bool:
    """Whether the calling thread is the engine thread."""
    return threading.current_thread().name.startswith(THREAD_NAME)


def submit(fn: Callable[..., T], *args, **kwargs) -> Future[T]:
    """Queue ``fn(*args, **kwargs)`` on the engine thread (FIFO) and return its future."""
    if on_engine_thread():
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # delivered through the future, as from the executor
            future.set_exception(exc)
        return future
    return _executor.submit(fn, *args, **kwargs)


def defer(fn: Callable[..., T], *args, **kwargs) -> Future[T]:
    """Queue ``fn`` on the engine thread behind the work already queued, even when called from
    the engine thread itself (a loop that re-queues itself lets other work run in between)."""
    return _executor.submit(fn, *args, **kwargs)


def call(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run ``fn(*args, **kwargs)`` on the engine thread and return (or raise) its result."""
    if on_engine_thread():
        return fn(*args, **kwargs)
    return _executor.submit(fn, *args, **kwargs).result()
