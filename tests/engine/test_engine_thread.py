"""The engine thread (all engine compute on one thread) and the llvmlite guard; no engine."""

from __future__ import annotations

import threading

import pytest

from engine import engine_thread
from engine.cpu_fixes import guard_llvmlite_for_kernel_scan


def test_call_runs_on_one_long_lived_thread_and_returns_results():
    names = {engine_thread.call(lambda: threading.current_thread().name) for _ in range(5)}
    assert len(names) == 1 and next(iter(names)).startswith(engine_thread.THREAD_NAME)
    assert not engine_thread.on_engine_thread()
    assert engine_thread.call(engine_thread.on_engine_thread)
    assert engine_thread.call(pow, 2, exp=10) == 1024


def test_errors_reach_the_caller():
    def fail():
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        engine_thread.call(fail)
    with pytest.raises(KeyError, match="boom"):
        engine_thread.submit(fail).result()


def test_work_submitted_from_the_engine_thread_runs_inline():
    """Engine code may call the helpers itself; queueing behind itself would deadlock."""
    assert engine_thread.call(lambda: engine_thread.call(lambda: 7)) == 7
    assert engine_thread.call(lambda: engine_thread.submit(lambda: 8).result(timeout=1)) == 8


def test_llvmlite_library_wrapper_no_longer_answers_dunder_lookups():
    """vLLM's kernel scan asks every module attribute for ``__dict__``; llvmlite's lazily
    wrapping library object used to answer with a function wrapper and crash engine start-up
    (any engine built after an n-gram engine)."""
    import llvmlite.binding.ffi as ffi  # installed with numba, which vLLM's n-gram uses

    assert guard_llvmlite_for_kernel_scan()
    assert not hasattr(ffi.lib, "__dict__")
    assert guard_llvmlite_for_kernel_scan()  # idempotent
    version = ffi.lib.LLVMPY_GetVersionInfo  # ordinary library functions still resolve
    assert callable(version)
