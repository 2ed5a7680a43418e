"""vLLM's distributed options (tensor / pipeline parallelism, executor), checked for this engine.

Placeholder written before the distributed work lands: single-device only.
"""

from __future__ import annotations

from typing import Any


def check_distributed_options(config: Any) -> None:
    """Raise ValueError for a distributed combination this engine cannot run."""
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def distributed_kwargs(config: Any) -> dict[str, Any]:
    """The keyword arguments for ``vllm.LLM`` that carry the distributed options."""
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": config.tensor_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
    }
    if config.distributed_executor_backend is not None:
        kwargs["distributed_executor_backend"] = config.distributed_executor_backend
    return kwargs
