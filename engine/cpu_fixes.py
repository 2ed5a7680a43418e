"""Work-around for vLLM's CPU defect that corrupts *sampled* speculative decoding.

Without Triton, vLLM's CPU platform swaps the rejection sampler's Triton kernels for C++
stand-ins (``vllm/utils/cpu_triton_utils.py``).  The stand-in for ``expand_kernel`` casts its
output buffer to int64 before writing, so for float tensors the cast copy is written and thrown
away, and ``expand_batch_to_tokens`` (``vllm/v1/sample/rejection_sampler.py``) hands
uninitialised temperatures / top-k / top-p to the sampler.  Greedy decoding never reads them,
so it looks fine; at temperature > 0 the output is garbage and top-k can crash the engine.
Upstream: vllm-project/vllm issue #55005, fix PR #55006.

We replace ``expand_batch_to_tokens`` with a dtype-preserving pure-torch version (repeat each
request's value over its tokens, substituting ``replace_from`` by ``replace_to``).  The fix is
applied only on the CPU platform for the affected releases, and in this process; the engine
runs in-process (see ``engine.vllm_engine``) so the patched function is the one used.
``tests/engine/test_cpu_fix.py`` compares token distributions with and without speculation and
fails on the defect.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

AFFECTED_RANGE = ((0, 27, 1), (0, 32, 99))


def _version_tuple(version: str) -> tuple[int, int, int]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


def expand_batch_to_tokens_fixed(
    x: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    num_tokens: int,
    replace_from: int = 0,
    replace_to: int = 0,
) -> torch.Tensor:
    """Expand a per-request tensor to per-token, keeping its dtype (see module docstring)."""
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1))
    values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return torch.repeat_interleave(values, counts, output_size=num_tokens)


def defect_present() -> bool:
    """True on vLLM's CPU platform in the releases known to carry the defect."""
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    low, high = AFFECTED_RANGE
    return low <= _version_tuple(vllm.__version__) <= high


def apply_cpu_fixes() -> bool:
    """Patch the rejection sampler when the defect is present; return whether it was patched."""
    if not defect_present():
        return False
    from vllm.v1.sample import rejection_sampler

    if rejection_sampler.expand_batch_to_tokens is not expand_batch_to_tokens_fixed:
        rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens_fixed
        log.info("patched vllm rejection_sampler.expand_batch_to_tokens (CPU defect #55005)")
    return True


def guard_llvmlite_for_kernel_scan() -> bool:
    """Let a second engine start after numba is loaded; return whether the guard is in place.

    Every CPU engine start-up scans all loaded modules for Triton kernels to override
    (``vllm.triton_utils.dispatcher._rebind_kernels``), asking each attribute for its
    ``__dict__``.  ``llvmlite.binding.ffi.lib`` (loaded with numba, which vLLM's n-gram
    proposer imports) wraps *any* missing attribute as a library function, ``__dict__``
    included, and the scan then fails with "'_lib_fn_wrapper' object has no attribute 'get'":
    no engine can start after an n-gram engine in the same process.  Dunder lookups on that
    object now raise AttributeError, as they do on ordinary objects.
    """
    import sys

    ffi = sys.modules.get("llvmlite.binding.ffi")
    wrapper = getattr(ffi, "_lib_wrapper", None)
    if wrapper is None:  # not loaded yet: nothing to guard; called again before each start
        return False
    if getattr(wrapper, "_dunder_guard", False):
        return True
    lazy = wrapper.__getattr__

    def guarded(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return lazy(self, name)

    wrapper.__getattr__ = guarded
    wrapper._dunder_guard = True
    log.info("guarded llvmlite's library wrapper against vLLM's kernel scan")
    return True
